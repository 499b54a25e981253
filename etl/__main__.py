"""`python -m etl`."""

import sys

from etl.logs import interrupted_while_starting

try:
    from etl.cli import main
except KeyboardInterrupt:
    raise SystemExit(interrupted_while_starting(sys.argv[1:])) from None

raise SystemExit(main())
