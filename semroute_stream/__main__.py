"""``python -m semroute_stream``: the same as the ``semroute-stream`` command."""

import sys

from semroute_stream._cli import main

if __name__ == "__main__":
    sys.exit(main())
