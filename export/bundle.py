"""Write an output folder atomically: build it in a hidden temporary folder beside the target,
then rename. On any failure the temporary folder is removed and the target is left as it was.

The new folder replaces the old one whole, so a target is only replaced when it holds nothing
but what an export writes: a user's own files in it are refused, never deleted."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Collection, Iterator
from contextlib import contextmanager
from pathlib import Path

from maml.checkpoint import umask
from maml.errors import UsageError

MARKER = "adapter.json"


def check_target(out: str | Path, owned: Collection[str] = ()) -> None:
    """Refuse an `out` that an export may not replace (also done by `staging`; call it first to
    fail before the slow work)."""
    given, out = str(out), Path(os.path.abspath(out))  # "." has no name or parent to build beside
    cwd = Path.cwd()
    if out == cwd or out in cwd.parents:
        raise UsageError(f"--out {given} is or holds the current folder, which the export would "
                         "replace whole; give a new folder, such as --out adapter")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {given} is a file; give a folder for the adapter")
    if not out.is_dir() or not any(out.iterdir()):
        return
    if not (out / MARKER).is_file():
        raise UsageError(f"--out {given} is a non-empty folder without {MARKER}; "
                         "choose a new or empty folder (an existing adapter is replaced)")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in {MARKER, *owned})
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3
                                          else "")
        raise UsageError(f"--out {given} holds files an export does not write ({shown}); the "
                         "adapter replaces the whole folder, so move them out or choose "
                         "another --out")


@contextmanager
def staging(out: Path, owned: Collection[str] = ()) -> Iterator[Path]:
    """Yield a fresh temporary folder; on success it replaces `out`, on failure it vanishes.

    `owned`: the file names an export writes (besides adapter.json), the only ones an existing
    `out` may hold."""
    check_target(out, owned)
    out = Path(os.path.abspath(out))
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
        tmp.chmod(0o777 & ~umask())  # mkdtemp's 0700 would hide the adapter from its users
    except OSError as exc:
        raise UsageError(f"cannot write to {out.parent}: {exc.strerror or exc}; "
                         "choose a writable --out") from None
    try:
        yield tmp
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _replace(tmp: Path, out: Path) -> None:
    """Rename `tmp` to `out`, moving an existing adapter aside first and deleting it after."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.rmdir(old)
        os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        if old is not None:
            os.replace(old, out)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)

