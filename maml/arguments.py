"""Checks of command-line values that the scripts share (numpy- and torch-free).

A benchmark or load test that runs for minutes must not find out at the end that its report
cannot be written, or at the start only as a traceback: these turn such values into one-line
`UsageError`s before any work starts.
"""

from __future__ import annotations

from pathlib import Path

from maml.errors import UsageError


def whole_numbers(text: str, option: str, example: str) -> list[int]:
    """Comma-separated whole numbers >= 1 (`--procs 1,2`), or a UsageError naming `option`."""
    try:
        values = [int(v) for v in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise UsageError(f"{option} takes comma-separated whole numbers >= 1, such as {example}; "
                         f"got {text!r}")
    return values


def writable_file(path: Path, option: str) -> None:
    """Refuse an output file that cannot be written, before the work that fills it: make its
    folder and open it for appending (a file that was not there is removed again)."""
    existed = path.exists()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a"):
            pass
    except OSError as exc:
        why = ("a file stands where a folder is needed"
               if isinstance(exc, (FileExistsError, NotADirectoryError)) else exc.strerror or exc)
        raise UsageError(f"{option} {path} cannot be written ({why}); choose another path") \
            from None
    if not existed:
        path.unlink()
