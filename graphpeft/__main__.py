"""python -m graphpeft: the command line."""

import sys

from graphpeft.cli import main

sys.exit(main())
