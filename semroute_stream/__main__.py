"""``python -m semroute_stream``: the same as the ``semroute-stream`` command."""

import sys

from ._cli import main

if __name__ == "__main__":
    sys.exit(main())
