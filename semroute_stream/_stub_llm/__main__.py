"""``python -m semroute_stream._stub_llm``: the stub served from the command line."""

import sys

from .cli import main

sys.exit(main())
