"""`python -m etl`."""

import signal
import sys

# SIGTERM in the half second etl's modules take to load killed the process outright (exit -15, not a word):
# until a run installs its own handler, SIGTERM is taken as Ctrl-C is, exit 1 with nothing done.
signal.signal(signal.SIGTERM, signal.default_int_handler)

from etl.logs import interrupted_while_starting  # noqa: E402 - after the handler: this import already takes time

try:
    from etl.cli import main
except KeyboardInterrupt:
    raise SystemExit(interrupted_while_starting(sys.argv[1:])) from None

raise SystemExit(main())
