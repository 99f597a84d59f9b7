"""``python -m ecp_fast``: the same command line as ``ecp-fast``."""

import sys

from ecp_fast.apps.cli import main

if __name__ == "__main__":
    sys.exit(main())
