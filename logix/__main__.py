"""`python -m logix`: the `logix` command line (`logix/cli.py`)."""

import sys

from logix.cli import main

sys.exit(main())
