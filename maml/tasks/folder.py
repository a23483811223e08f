"""N-way K-shot tasks from your own images: a folder of class folders (`--dataset folder`).

Layouts (torchvision's ImageFolder convention), under `--data-root DIR`:
- one level: `DIR/<class>/*.png|jpg|jpeg|bmp|gif|webp`;
- two levels: `DIR/<group>/<class>/...` (as Omniglot's alphabets); splits then go by group,
  so no group has classes on both sides of a split.
Class names are the folders' paths under DIR (`class`, or `group/class`), in sorted order.

Splits (`--split`): fractions `TRAIN,VAL,TEST` of the classes (or groups), shuffled by `--seed`
(default `0.6,0.2,0.2`), or a split file: JSON `{"train": [...], "val": [...], "test": [...]}`,
or text with a `train:` / `val:` / `test:` line before each list (one name per line), naming
classes or groups. The split (row indices and the class names) is stored in the checkpoint, so
eval and export rebuild the same one and refuse a folder whose classes have changed.

Every image is decoded and preprocessed once (`maml.images.preprocess_pixels`, the numpy
definition `adapter.json` records) into one float32 array `(images, channels, size, size)`,
cached as `<data home>/folder-cache/<key>.npy` (`maml.data.data_home`: `$MAML_DATA`, else
`~/.cache/maml-toolkit`), keyed by a hash of the files' names, sizes and modification times and
of the preprocessing; a second run loads it at once (memory-mapped when over `MMAP_BYTES`).
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch

from maml.errors import UsageError
from maml.images import decode_rgb, pixel_preprocessing, preprocess_pixels
from maml.tasks import TaskBatch

EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp")
AUGMENTATIONS = ("rot90", "flip")
DEFAULT_SPLIT = "0.6,0.2,0.2"
MMAP_BYTES = 1 << 30  # cached arrays larger than this are memory-mapped, not read into memory
SPLIT_NAMES = ("train", "val", "test")


def _is_image(path: Path) -> bool:
    return path.is_file() and path.suffix.lower() in EXTENSIONS and not path.name.startswith(".")


def scan(root: str | Path) -> tuple[list[str], list[list[Path]], bool]:
    """`(class names, image files per class, two_level)` of the tree under `root`."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise UsageError(f"--data-root {root} is not a folder; point it at a folder of class "
                         "folders (DIR/<class>/*.png)")
    tops = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not tops:
        raise UsageError(f"{root} has no class folders; put each class's images in its own "
                         "folder: DIR/<class>/*.png (or DIR/<group>/<class>/*.png)")
    two_level = not any(_is_image(f) for f in tops[0].iterdir()) and any(
        p.is_dir() for p in tops[0].iterdir())
    names: list[str] = []
    files: list[list[Path]] = []
    for top in tops:
        classes = (sorted(p for p in top.iterdir() if p.is_dir() and not p.name.startswith("."))
                   if two_level else [top])
        if two_level and any(_is_image(f) for f in top.iterdir()):
            raise UsageError(f"{top} holds images beside class folders; in a two-level tree "
                             "(DIR/<group>/<class>/) images go only in the class folders")
        if not classes:
            raise UsageError(f"group {top.name} under {root} has no class folders; remove it "
                             "or add DIR/<group>/<class>/ folders")
        for folder in classes:
            images = sorted(f for f in folder.iterdir() if _is_image(f))
            name = folder.relative_to(root).as_posix()
            if not images:
                raise UsageError(f"class {name} has no images ({', '.join(EXTENSIONS)}); add "
                                 "some or remove the folder")
            names.append(name)
            files.append(images)
    return names, files, two_level


def content_key(root: Path, files: list[list[Path]], prep: dict) -> str:
    """A hash of every file's path, size and modification time, and of the preprocessing."""
    digest = hashlib.sha256(json.dumps(prep, sort_keys=True).encode())
    for group in files:
        for f in group:
            st = f.stat()
            digest.update(f"{f.relative_to(root).as_posix()}\0{st.st_size}\0{st.st_mtime_ns}\n"
                          .encode())
    return digest.hexdigest()[:24]


def cache_folder() -> Path:
    from maml.data import data_home

    return data_home() / "folder-cache"


def _note(message: str) -> None:
    print(f"note: {message}", file=sys.stderr)


def decode_all(files: list[list[Path]], prep: dict, quiet: bool = False) -> np.ndarray:
    """Decode and preprocess every image into float32 `(images, channels, size, size)`."""
    from PIL import UnidentifiedImageError
    from tqdm import tqdm

    flat = [f for group in files for f in group]
    size, channels = int(prep["size"]), int(prep["channels"])
    out = np.empty((len(flat), channels, size, size), dtype=np.float32)
    sizes: dict[tuple[int, int], int] = {}
    colour = False
    for i, path in enumerate(tqdm(flat, desc="decoding images", unit="img", disable=True if quiet else None,
                                  file=sys.stderr)):
        try:
            rgb = decode_rgb(str(path))
        except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as exc:
            raise UsageError(f"{path} is not a readable image ({exc}); remove or replace it") \
                from None
        shape = rgb.shape[:2]
        sizes[shape] = sizes.get(shape, 0) + 1
        if channels == 1 and not colour and not (
                (rgb[..., 0] == rgb[..., 1]).all() and (rgb[..., 1] == rgb[..., 2]).all()):
            colour = True
        out[i] = preprocess_pixels(rgb, prep)
    if len(sizes) > 1:
        shown = ", ".join(f"{w}x{h}" for (h, w) in list(sizes)[:3])
        _note(f"the images come in {len(sizes)} sizes ({shown}{', ...' if len(sizes) > 3 else ''}); "
              f"all are resized to {size}x{size}")
    if colour:
        _note("colour images are read as grayscale (--channels 1); pass --channels 3 for RGB")
    return out


def load_images(root: str | Path, image_size: int, channels: int, invert: bool,
                quiet: bool = False) -> tuple[list[str], np.ndarray, np.ndarray, bool]:
    """`(class names, images (N, C, S, S), counts per class, two_level)`, from the cache when
    the folder is unchanged, else decoded (with a progress bar) and cached."""
    root = Path(root).expanduser().absolute()
    names, files, two_level = scan(root)
    prep = pixel_preprocessing(image_size, channels, invert)
    key = content_key(root, files, prep)
    counts = np.array([len(group) for group in files], dtype=np.int64)
    target = cache_folder() / f"{key}.npy"
    if target.is_file():
        try:
            big = target.stat().st_size > MMAP_BYTES
            images = np.load(target, mmap_mode="r" if big else None)
            if images.shape == (int(counts.sum()), channels, image_size, image_size):
                return names, images, counts, two_level
        except (OSError, ValueError):
            pass  # a damaged cache file: decode again and replace it
    images = decode_all(files, prep, quiet)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_name(f".{key}.{os.getpid()}.partial.npy")
        np.save(partial, images)
        os.replace(partial, target)
    except OSError as exc:
        _note(f"cannot cache the decoded images in {target.parent} ({exc.strerror or exc}); "
              "set MAML_DATA to a writable folder so the next run starts at once")
    return names, images, counts, two_level


# --- splits --------------------------------------------------------------------------------

def _read_split_file(path: Path) -> dict[str, list[str]]:
    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"cannot read the split file {path} ({exc.strerror})") from None
    if path.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"split file {path} is not valid JSON ({exc})") from None
    else:
        data, current = {}, None
        for line in text.splitlines():
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if line.rstrip(":") in SPLIT_NAMES and line.endswith(":"):
                current = data.setdefault(line[:-1], [])
            elif current is None:
                raise UsageError(f"split file {path}: {line!r} comes before any 'train:', "
                                 "'val:' or 'test:' line")
            else:
                current.append(line)
    if not isinstance(data, dict) or set(data) - set(SPLIT_NAMES) or not all(
            isinstance(v, list) and all(isinstance(n, str) for n in v) for v in data.values()):
        raise UsageError(f"split file {path} must map train / val / test to lists of class or "
                         'group names, e.g. {"train": ["a", "b"], "val": [], "test": ["c"]}')
    return {name: list(data.get(name, [])) for name in SPLIT_NAMES}


def make_split(names: list[str], two_level: bool, split: str, seed: int) -> dict[str, Any]:
    """Class rows for train / val / test (and the class names, to check on restore)."""
    units = sorted({n.split("/")[0] for n in names}) if two_level else list(names)
    unit_of = [n.split("/")[0] if two_level else n for n in names]
    path = Path(split).expanduser()
    if path.suffix.lower() in (".json", ".txt") or path.is_file():
        chosen = _read_split_file(path)
        by_name = {n: i for i, n in enumerate(names)}
        rows: dict[str, list[int]] = {}
        for part, listed in chosen.items():
            rows[part] = []
            for entry in listed:
                if entry in by_name:
                    rows[part].append(by_name[entry])
                elif entry in units:
                    rows[part] += [i for i, u in enumerate(unit_of) if u == entry]
                else:
                    raise UsageError(f"split file {path} names {entry!r}, which is neither a "
                                     f"class nor a group under the data folder (e.g. {names[0]!r})")
        taken = [r for part in rows.values() for r in part]
        if len(taken) != len(set(taken)):
            raise UsageError(f"split file {path} puts a class in two splits; list each once")
    else:
        try:
            fractions = [float(f) for f in split.split(",")]
        except ValueError:
            fractions = []
        if len(fractions) != 3 or min(fractions) < 0 or not 0 < sum(fractions) <= 1.0 + 1e-9:
            raise UsageError(f"--split {split!r}: give fractions TRAIN,VAL,TEST (e.g. "
                             f"{DEFAULT_SPLIT}) or a split file (.json or .txt)")
        perm = torch.randperm(len(units), generator=torch.Generator().manual_seed(seed)).tolist()
        n_train = round(fractions[0] * len(units))
        n_val = round(fractions[1] * len(units))
        n_test = len(units) - n_train - n_val if abs(sum(fractions) - 1) < 1e-9 \
            else round(fractions[2] * len(units))
        parts = {"train": perm[:n_train], "val": perm[n_train:n_train + n_val],
                 "test": perm[n_train + n_val:n_train + n_val + n_test]}
        chosen_units = {part: {units[i] for i in idx} for part, idx in parts.items()}
        rows = {part: [i for i, u in enumerate(unit_of) if u in chosen_units[part]]
                for part in SPLIT_NAMES}
    out: dict[str, Any] = {part: torch.tensor(sorted(rows[part]), dtype=torch.long)
                           for part in SPLIT_NAMES}
    out["classes"] = list(names)
    return out


def check_tasks(split: dict[str, Any], names: list[str], counts: np.ndarray, n_way: int,
                k_shot: int, q_query: int, rotations: bool) -> None:
    """One line for each way the data cannot give these tasks."""
    if k_shot < 1 or q_query < 1:
        raise UsageError(f"--k-shot and --q-query must be >= 1, got {k_shot} and {q_query}")
    if n_way < 2:
        raise UsageError(f"--n-way must be at least 2, got {n_way}")
    need = k_shot + q_query
    used = sorted({int(r) for part in SPLIT_NAMES for r in split[part].tolist()})
    short = [r for r in used if counts[r] < need]
    if short:
        first = short[0]
        more = f" (and {len(short) - 1} more classes)" if len(short) > 1 else ""
        raise UsageError(f"class {names[first]} has {counts[first]} images{more}, but --k-shot "
                         f"{k_shot} + --q-query {q_query} needs {need} per class: lower "
                         "--q-query or --k-shot, add images, or remove the class")
    if split["train"].numel() == 0:
        raise UsageError("the train split has no classes; give it a larger fraction "
                         "(--split) or list classes under train in the split file")
    for part in SPLIT_NAMES:
        classes = split[part].numel() * (4 if part == "train" and rotations else 1)
        if 0 < classes < n_way or (part != "val" and classes < n_way):
            raise UsageError(f"the {part} split has {classes} classes, fewer than --n-way "
                             f"{n_way}: lower --n-way, or give {part} more classes (--split)")


class FolderTasks:
    """N-way K-shot tasks with Q queries per class from a folder's cached images.

    Sampling follows `maml.tasks.omniglot.Omniglot.sample` draw for draw (N distinct classes,
    with rotations as new classes under `rot90`; K + Q distinct images per class), so the same
    classes and generator give the same tensors as the Omniglot loader."""

    kind = "classification"
    loss = "cross_entropy"

    def __init__(self, images: np.ndarray | torch.Tensor, counts: np.ndarray, names: list[str],
                 split: dict[str, Any], n_way: int, k_shot: int, q_query: int,
                 device: str | torch.device = "cpu", augment: tuple[str, ...] = (),
                 invert: bool = False, normalize: bool = False, split_name: str = "") -> None:
        self.rotations = "rot90" in augment
        self.flips = "flip" in augment
        check_tasks(split, names, counts, n_way, k_shot, q_query, self.rotations)
        self.device = torch.device(device)
        self.names, self.splits, self.split_name = names, split, split_name
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.augment = tuple(augment)
        self.counts = torch.as_tensor(counts, dtype=torch.long)
        self.offsets = torch.cumsum(self.counts, 0) - self.counts
        self.longest = int(self.counts.max())
        self.uniform = bool((self.counts == self.longest).all())
        channels, size = int(images.shape[1]), int(images.shape[2])
        self.input_shape = (channels, size, size)
        mean, std = [0.0] * channels, [1.0] * channels
        if normalize:  # per-channel moments of the training classes' images
            mean, std = self._moments(images)
        self.preprocessing = pixel_preprocessing(size, channels, invert, mean, std)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.normalize = normalize
        self.mapped = isinstance(images, np.memmap)
        if self.mapped:
            self.images = images
        else:
            self.images = torch.as_tensor(np.asarray(images)).to(self.device)
            if normalize:
                self.images = (self.images - self._mean.to(self.device)) / self._std.to(self.device)

    def _moments(self, images) -> tuple[list[float], list[float]]:
        total = np.zeros(images.shape[1]), np.zeros(images.shape[1])
        n = 0
        for row in self.splits["train"].tolist():
            start, count = int(self.offsets[row]), int(self.counts[row])
            block = np.asarray(images[start:start + count], dtype=np.float64)
            total[0].__iadd__(block.sum(axis=(0, 2, 3)))
            total[1].__iadd__((block ** 2).sum(axis=(0, 2, 3)))
            n += block.shape[0] * block.shape[2] * block.shape[3]
        mean = total[0] / n
        std = np.sqrt(np.maximum(total[1] / n - mean ** 2, 1e-12))
        return [float(m) for m in mean], [float(s) for s in std]

    @property
    def output_shape(self) -> tuple[int]:
        return (self.n_way,)

    def describe(self) -> dict:
        return {"name": "folder", "split": self.split_name, "n_way": self.n_way,
                "k_shot": self.k_shot, "q_query": self.q_query,
                "image_size": self.input_shape[-1], "channels": self.input_shape[0],
                "classes": {k: int(self.splits[k].numel()) for k in SPLIT_NAMES},
                "augment": list(self.augment)}

    @property
    def validation_split(self) -> str:
        """Validate on held-out classes; without any, on the training classes (said once)."""
        return "val" if self.splits["val"].numel() >= self.n_way else "train"

    def _gather(self, index: torch.Tensor) -> torch.Tensor:
        if not self.mapped:
            return self.images[index.to(self.device)]
        flat = np.asarray(self.images[index.reshape(-1).numpy()])
        out = torch.from_numpy(flat).reshape(*index.shape, *self.input_shape)
        if self.normalize:
            out = (out - self._mean) / self._std
        return out.to(self.device)

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        classes = self.splits[split]
        if classes.numel() == 0:
            raise UsageError(f"the {split} split has no classes; give it some with --split")
        rotations = 4 if split == "train" and self.rotations else 1
        n, k, q = self.n_way, self.k_shot, self.q_query
        pick = torch.rand(batch_size, classes.numel() * rotations, generator=generator)
        pick = pick.argsort(dim=1)[:, :n]
        cls, rot = classes[pick % classes.numel()], pick // classes.numel()
        order = torch.rand(batch_size, n, self.longest, generator=generator)
        if not self.uniform:  # images past a class's count sort last
            absent = torch.arange(self.longest).view(1, 1, -1) >= self.counts[cls].unsqueeze(-1)
            order = order.masked_fill(absent, 2.0)
        drawing = order.argsort(-1)[..., : k + q]
        images = self._gather(self.offsets[cls].unsqueeze(-1) + drawing)  # (B, N, K+Q, C, S, S)
        if rotations > 1:
            turns = rot.to(self.device).view(batch_size, n, 1, 1, 1, 1)
            images = sum(
                torch.where(turns == t, images.rot90(t, dims=(-2, -1)), 0.0) for t in range(4)
            )
        if self.flips and split == "train":
            flip = torch.rand(batch_size, n, k + q, generator=generator) < 0.5
            flip = flip.to(self.device).view(batch_size, n, k + q, 1, 1, 1)
            images = torch.where(flip, images.flip(-1), images)
        labels = torch.arange(n, device=self.device).view(1, n, 1)
        support_y = labels.expand(batch_size, n, k).reshape(batch_size, n * k)
        query_y = labels.expand(batch_size, n, q).reshape(batch_size, n * q)
        shape = self.input_shape
        return TaskBatch(
            images[:, :, :k].reshape(batch_size, n * k, *shape), support_y,
            images[:, :, k:].reshape(batch_size, n * q, *shape), query_y,
        )


def parse_augment(augment: str | None) -> tuple[str, ...]:
    names = tuple(a.strip() for a in (augment or "").split(",") if a.strip())
    unknown = [a for a in names if a not in AUGMENTATIONS]
    if unknown:
        raise UsageError(f"--augment {augment!r}: unknown {', '.join(unknown)}; choose from "
                         f"{', '.join(AUGMENTATIONS)} (comma-separated)")
    return names


def folder_source(cfg, split: dict[str, Any] | None = None, quiet: bool = False):
    """The `FolderTasks` of `cfg` and its split (a checkpoint's `split` is checked, not redrawn)."""
    augment = parse_augment(cfg.augment)
    names, images, counts, two_level = load_images(cfg.data_root, cfg.image_size, cfg.channels,
                                                   cfg.invert, quiet)
    if split is None:
        split = make_split(names, two_level, cfg.split, cfg.seed)
    elif list(split.get("classes", names)) != names:
        saved = list(split["classes"])
        gone = sorted(set(saved) - set(names))[:3]
        new = sorted(set(names) - set(saved))[:3]
        raise UsageError(f"the classes under {cfg.data_root} changed since training (missing "
                         f"{gone or 'none'}, new {new or 'none'}); restore the folder the run "
                         "trained on, or pass its copy with --data-root")
    source = FolderTasks(images, counts, names, split, cfg.n_way, cfg.k_shot, cfg.q_query,
                         cfg.device, augment, cfg.invert, cfg.normalize, cfg.split)
    return source, split
