"""python -m graphpeft: the command line."""

import sys

from graphpeft.cli.commands import main

sys.exit(main())
