"""Where the data lives, and `python -m maml data`: find (or fetch) Omniglot, build its arrays.

The default Omniglot folder does not depend on the current folder:
1. `$MAML_DATA/omniglot` when the environment variable `MAML_DATA` names a folder;
2. otherwise the per-user cache `$XDG_CACHE_HOME/maml-toolkit/omniglot`
   (`~/.cache/maml-toolkit/omniglot` when XDG_CACHE_HOME is unset), as torchvision and
   Hugging Face keep theirs.
`--data-root DIR` overrides both. A checkpoint stores the absolute folder it trained on.

In that folder the loader (`maml.tasks.omniglot.load_raw`) reads `images_background.npz` +
`images_evaluation.npz`, or else the upstream folders
`[omniglot-py/]images_{background,evaluation}/<Alphabet>/characterNN/XXXX_YY.png`.
`build_arrays` turns the folders (or the upstream zip archives of them) into the npz files,
which load in a second instead of a minute. This module is numpy-only until it reads images.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

import numpy as np

from maml.errors import UsageError

ENV = "MAML_DATA"
CACHE_NAME = "maml-toolkit"
NPZ = ("images_background.npz", "images_evaluation.npz")
OLD_DEFAULT = Path("..") / "shared" / "data" / "omniglot"
"""The default before there was one home: relative to the current folder (see `elsewhere`)."""


def data_home() -> Path:
    """`$MAML_DATA`, else `$XDG_CACHE_HOME/maml-toolkit` (default `~/.cache/maml-toolkit`)."""
    chosen = os.environ.get(ENV, "").strip()
    if chosen:
        return Path(chosen).expanduser().absolute()
    cache = os.environ.get("XDG_CACHE_HOME", "").strip()
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return (base / CACHE_NAME).absolute()


def default_root() -> Path:
    """The Omniglot folder used when no `--data-root` is given (absolute)."""
    return data_home() / "omniglot"


def origin(root: Path) -> str:
    """" (the default ...)" when `root` is the default folder: where that default comes from."""
    if root.absolute() != default_root():
        return ""
    if os.environ.get(ENV, "").strip():
        return f" (${ENV}/omniglot)"
    return f" (the default; set ${ENV} or --data-root for another folder)"


def elsewhere(root: Path) -> str:
    """"; a copy is at ../shared/data/omniglot ..." when the old default, relative to the
    current folder, holds the arrays: it is named, never used silently."""
    old = OLD_DEFAULT.absolute()
    if old == root.absolute() or not all((old / n).is_file() for n in NPZ):
        return ""
    return (f"; a copy is at {OLD_DEFAULT}: pass --data-root {OLD_DEFAULT} or "
            f"export {ENV}={OLD_DEFAULT.parent}")


def sha256(path: Path) -> str:
    """The hex sha256 of a file, read in 1 MiB blocks (adapter.json and `maml data` record it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _extract_archives(root: Path) -> None:
    """Unpack the upstream `images_{background,evaluation}.zip` found in `root` (or its
    `omniglot-py/`) whose folder is missing; a failed unpacking leaves no half folder."""
    for part in ("background", "evaluation"):
        for where in (root, root / "omniglot-py"):
            archive, folder = where / f"images_{part}.zip", where / f"images_{part}"
            if not archive.is_file() or folder.exists():
                continue
            scratch = Path(tempfile.mkdtemp(prefix=".unzip-", dir=where))
            try:
                with zipfile.ZipFile(archive) as z:
                    z.extractall(scratch)
                os.replace(scratch / folder.name, folder)
            except (OSError, zipfile.BadZipFile) as exc:
                raise UsageError(f"cannot unpack {archive} ({exc}); fetch it again") from None
            finally:
                shutil.rmtree(scratch, ignore_errors=True)


def arrays_from_folder(folder: Path, first: int, count: int) -> tuple[np.ndarray, np.ndarray]:
    """`images` `(count, 20, 105, 105)` bool (True = paper) and `labels` `(count, 20)` of the
    characters with file ids `first .. first + count - 1` in an upstream-layout `folder`; row
    `c` is file id `first + c`, as in the offline copy. A missing character is a one-line error."""
    from maml.tasks.omniglot import DRAWINGS, REFETCH, read_image_folder

    chars = read_image_folder(folder)
    wanted = range(first, first + count)
    missing = [c for c in wanted if c not in chars]
    if missing:
        raise UsageError(f"{folder} lacks {len(missing)} of its {count} characters (first file "
                         f"id {missing[0]:04d}); {REFETCH}")
    labels = np.repeat(np.arange(count, dtype=np.int64)[:, None], DRAWINGS, axis=1)
    return np.stack([chars[c] for c in wanted]), labels


def build_arrays(root: Path) -> list[Path]:
    """Write `root/images_background.npz` and `root/images_evaluation.npz` from the upstream
    folders (or zips) under `root`; each file appears whole or not at all."""
    from maml.tasks.omniglot import N_BACKGROUND, N_EVALUATION, _find_folder

    _extract_archives(root)
    parts = (("background", 1, N_BACKGROUND), ("evaluation", N_BACKGROUND + 1, N_EVALUATION))
    folders = {part: _find_folder(root, f"images_{part}") for part, _, _ in parts}
    absent = [f"images_{p}/" for p, f in folders.items() if f is None]
    if absent:
        raise UsageError(f"no Omniglot under {root}: neither {' + '.join(NPZ)} nor the folder(s) "
                         f"{' + '.join(absent)}{origin(root)}; put them there (or their zip "
                         f"archives), or add --download{elsewhere(root)}")
    written = []
    for (part, first, count), name in zip(parts, NPZ):
        images, labels = arrays_from_folder(folders[part], first, count)
        target = root / name
        partial = target.with_name(f".{name}.partial.npz")
        try:
            np.savez_compressed(partial, images=images, labels=labels)
            os.replace(partial, target)
        except OSError as exc:
            raise UsageError(f"cannot write {target} ({exc.strerror or exc}); choose a writable "
                             "--data-root") from None
        finally:
            partial.unlink(missing_ok=True)
        written.append(target)
    return written


def prepare(data_root: str | Path | None = None, download: bool = False) -> dict:
    """Find Omniglot under `data_root` (default `default_root()`), fetching it first with
    `download`; build the npz files from the folders when they are missing. Returns
    `{"root", "source", "built", "characters", "files": {path: sha256}}`."""
    from maml.tasks.omniglot import N_CHARACTERS, _download, load_raw

    root = Path(data_root).expanduser().absolute() if data_root else default_root()
    if download:  # a failed download removes what it created (`_download`)
        _download(root)
    built = not all((root / n).is_file() for n in NPZ)
    if built:
        build_arrays(root)
    raw, _ = load_raw(root)  # the loader's own checks: shapes, 1623 characters
    assert len(raw) == N_CHARACTERS
    files = {root / n: sha256(root / n) for n in NPZ}
    return {"root": root, "source": "folders" if built else "npz", "built": built,
            "characters": len(raw), "files": files}
