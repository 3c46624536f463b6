"""The `anvil` command line."""

import os
import signal
import sys


def _stopped_while_starting(_signum: int, _frame: object) -> None:
    # Ctrl-C on `anvil serve` (and `make run`) while the command is still importing: nothing is open
    # yet, so end now, quietly and successfully (exit 0: make then reports no error), rather than
    # with a KeyboardInterrupt traceback. `serve` takes over the signal once it starts.
    os.write(2, b"\nanvil serve: stopped before it started\n")
    os._exit(0)


if sys.argv[1:2] == ["serve"]:
    signal.signal(signal.SIGINT, _stopped_while_starting)
