"""How the command lines end: one line on standard error and an exit status, never a traceback.

A `UsageError` (bad input) is `error: ...` and status 2; a file that cannot be read or written is
status 1; a run the user stopped (`Stopped`, or Ctrl-C anywhere else) is `stopped: ...` and the
shell's status for the signal, 128 + its number (130 for Ctrl-C, 143 for SIGTERM).
"""

import os
import signal
import sys
import threading
from collections.abc import Callable


def gist(exc: BaseException, limit: int = 200, lines: int = 1, typed: bool = False) -> str:
    """The first `lines` non-empty lines of an exception's message, joined, for quoting another
    library's error inside one of ours.

    The message is cut to at most `limit` characters at a word, with "..." (never mid-word).
    `typed` puts the exception's type name in front ("RuntimeError: ..."); a message-less
    exception is its type name either way.
    """
    name = type(exc).__name__
    kept = [line.strip() for line in str(exc).splitlines() if line.strip()][:lines]
    text = shorten(" ".join(kept), limit)
    if not text:
        return name
    return f"{name}: {text}" if typed else text


def shorten(text: str, limit: int) -> str:
    """`text` cut to at most `limit` characters at a word, with "..." (never mid-word)."""
    if len(text) <= limit:
        return text
    cut = text[:limit - 3]
    space = cut.rfind(" ")
    return (cut[:space] if space > limit // 2 else cut).rstrip(" ,;:.") + "..."


class UsageError(Exception):
    """Bad input from the user: the message names the problem and, where there is one, the fix.

    Under torchrun the processes of one machine check the same input and files and would say
    the same thing, so on each machine the first (LOCAL_RANK 0) alone prints it; a `RankError`
    is the exception."""


class RankError(UsageError):
    """A problem one torchrun rank has on its own (its GPU, its contact with the others): the
    rank that hit it prints it, whichever rank that is."""


class Stopped(BaseException):
    """The user (Ctrl-C) or a scheduler (SIGTERM) stopped a run; the message says what was kept.

    A `BaseException`, like `KeyboardInterrupt`, so that no `except Exception` (ours or a
    library's, such as torch.onnx trying its next strategy) turns a stop into an error."""

    def __init__(self, message: str, signum: int = signal.SIGINT) -> None:
        super().__init__(message)
        self.signum = int(signum)

    @property
    def status(self) -> int:
        """The shell's exit status for a process ended by this signal."""
        return 128 + self.signum


def _terminated(signum: int, frame: object) -> None:
    raise Stopped("terminated (SIGTERM)", signum)


def exit_status(run: Callable[[], object]) -> int:
    """Run a command and return its exit status, turning the errors above into one line.

    SIGTERM unwinds like Ctrl-C (instead of killing the process on the spot), so that what a
    command cleans up on the way out, such as a half-written export folder, is cleaned up."""
    handle = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL)
    if handle:
        signal.signal(signal.SIGTERM, _terminated)
    try:
        return _status(run)
    finally:
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _secondary_rank() -> bool:
    """Whether torchrun started this process and not as the first on its machine."""
    return "WORLD_SIZE" in os.environ and os.environ.get("LOCAL_RANK", "0") != "0"


def _status(run: Callable[[], object]) -> int:
    try:
        run()
    except UsageError as exc:
        if isinstance(exc, RankError) or not _secondary_rank():
            print(f"error: {exc}", file=sys.stderr)
        return 2
    except (Stopped, KeyboardInterrupt) as exc:
        return _stopped(exc)
    except Exception as exc:
        stop = _stop_behind(exc)
        if stop is not None:
            return _stopped(stop)
        if not isinstance(exc, OSError):
            raise
        # the machine's own file system: said once per machine, as above
        where = f" ({exc.filename})" if exc.filename else ""
        if not _secondary_rank():
            print(f"error: {exc.strerror or exc}{where}; check the path, its permissions and the "
                  "free space", file=sys.stderr)
        return 1
    return 0


def _stopped(exc: BaseException) -> int:
    """Say that Ctrl-C or a signal stopped the command; return the shell's status for it."""
    if isinstance(exc, Stopped):
        if str(exc):  # empty on the other ranks of a torchrun launch
            print(f"stopped: {exc}", file=sys.stderr)
        return exc.status
    if not _secondary_rank():
        print("stopped: interrupted (Ctrl-C)", file=sys.stderr)
    return 128 + signal.SIGINT


def _stop_behind(exc: BaseException) -> BaseException | None:
    """The Ctrl-C or SIGTERM that `exc` was raised while unwinding from, if any.

    A stop lands wherever Python happens to be; inside a library's bookkeeping (torch's stack of
    function modes, say) it can leave that half-done, and the library then fails on the way out.
    That second error is a consequence of the stop and must not hide it."""
    seen: set[int] = set()
    cause = exc.__context__
    while cause is not None and id(cause) not in seen:
        if isinstance(cause, (Stopped, KeyboardInterrupt)):
            return cause
        seen.add(id(cause))
        cause = cause.__context__
    return None
