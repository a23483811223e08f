"""The one error type the command lines turn into a one-line message and exit status 2."""

import sys
from collections.abc import Callable


class UsageError(Exception):
    """Bad input from the user: the message names the problem and, where there is one, the fix."""


def exit_status(run: Callable[[], object]) -> int:
    """Run a command; a `UsageError` becomes `error: ...` on standard error and status 2, and a
    file that cannot be read or written (a bad path, no permission, a full disk) status 1."""
    try:
        run()
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and the free "
              "space", file=sys.stderr)
        return 1
    return 0
