"""`python -m loadtest`: see `loadtest/run.py`."""

import sys

from loadtest.run import main

if __name__ == "__main__":
    sys.exit(main())
