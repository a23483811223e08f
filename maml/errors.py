"""How the command lines end: one line on standard error and an exit status, never a traceback.

A `UsageError` (bad input) is `error: ...` and status 2; a file that cannot be read or written is
status 1; a run the user stopped (`Stopped`, or Ctrl-C anywhere else) is `stopped: ...` and the
shell's status for the signal, 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
"""

import signal
import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user: the message names the problem and, where there is one, the fix."""


class Stopped(Exception):
    """The user (Ctrl-C) or a scheduler (SIGTERM) stopped a run; the message says what was kept."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def status(self) -> int:
        """The shell's exit status for a process ended by this signal."""
        return 128 + self.signum


def exit_status(run: Callable[[], object]) -> int:
    """Run a command and return its exit status, turning the errors above into one line."""
    try:
        run()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except Stopped as exc:
        if str(exc):  # empty on the other ranks of a torchrun launch
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.status
    except KeyboardInterrupt:
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
        return 128 + signal.SIGINT
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and the free "
              "space", file=sys.stderr)
        return 1
    return 0
