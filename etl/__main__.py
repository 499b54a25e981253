"""`python -m etl`."""

import os
import signal
import sys

# SIGTERM in the half second etl's modules take to load killed the process outright (exit -15, not a word):
# until a run installs its own handler, SIGTERM is taken as Ctrl-C is, exit 1 with nothing done.
signal.signal(signal.SIGTERM, signal.default_int_handler)

try:
    from etl.cli import main

    code = main()  # interrupts during the run are its own to report; one that escapes it came before
except KeyboardInterrupt:
    from etl.logs import interrupted_while_starting

    code = interrupted_while_starting(sys.argv[1:])
    # An interrupt that went through a C extension's import can leave Python marked to die by SIGINT at exit
    # (exit -2, whatever SystemExit says); nothing was done, so nothing is lost by leaving at once.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)

# The outcome is decided and recorded: a signal now would only turn the exit code into a death by signal.
for signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(signum, signal.SIG_IGN)
raise SystemExit(code)
