"""Omniglot N-way K-shot tasks with the MAML paper's protocol.

Data: 1623 characters (964 "background" + 659 "evaluation"), 20 drawings each, resized once to
28x28 with ink = 1 (`maml.images`) and held in one `(1623, 20, 28, 28)` tensor on the training
device; row `c` is the character whose files are named `{c+1:04d}_NN.png` upstream.

Sources, tried in this order under `data_root`:
- `images_background.npz` + `images_evaluation.npz` (the offline copy, arrays `images`, `labels`);
- the folder layout `torchvision.datasets.Omniglot` downloads:
  `[omniglot-py/]images_{background,evaluation}/<Alphabet>/characterNN/XXXX_YY.png`.
`download=True` asks torchvision to fetch the folder layout first (needs internet); a failed
download removes what it created.

Splits (`split=`):
- `maml`: both sets pooled, a seeded permutation, 1200 characters for meta-training (of which
  `val_chars` are held out for validation) and the other 423 for meta-testing.
- `background`: Lake et al.'s alphabet split: meta-train on the 964 background characters
  (minus the validation hold-out), meta-test on the 659 evaluation characters.
During meta-training each character's rotations by 0/90/180/270 degrees are four distinct
classes; validation and test tasks use unrotated characters.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import numpy as np
import torch

from maml.errors import UsageError
from maml.images import ink_from_omniglot, ink_image
from maml.tasks import TaskBatch

N_BACKGROUND, N_EVALUATION, DRAWINGS, SIDE = 964, 659, 20, 105
N_CHARACTERS = N_BACKGROUND + N_EVALUATION
SPLITS = ("maml", "background")
REFETCH = "re-extract the archives (or fetch them with `python -m maml data --download`)"
_FILE = re.compile(r"(\d{4})_(\d{2})\.png$")


def read_image_folder(folder: Path) -> dict[int, np.ndarray]:
    """Read an upstream-layout folder into `{character file id: (20, 105, 105) bool}`.

    Every character must have all 20 drawings at 105 x 105: a missing or damaged file is a
    one-line error naming it, never a blank drawing in the tasks."""
    from PIL import Image, UnidentifiedImageError  # only folder users pay the import

    found: dict[int, np.ndarray] = {}
    seen: dict[int, set[int]] = {}
    for png in sorted(folder.glob("*/character*/*.png")):
        match = _FILE.search(png.name)
        if match is None:
            continue
        char, drawing = int(match[1]), int(match[2])
        try:
            pixels = np.asarray(Image.open(png).convert("1"), dtype=bool)
        except (OSError, UnidentifiedImageError) as exc:
            raise UsageError(f"{png} is not a readable image ({exc}); {REFETCH}") from None
        if pixels.shape != (SIDE, SIDE) or not 1 <= drawing <= DRAWINGS:
            raise UsageError(f"{png} is {pixels.shape[1]}x{pixels.shape[0]} (or numbered past "
                             f"{DRAWINGS}); Omniglot drawings are {SIDE}x{SIDE}, 20 per "
                             "character: re-extract the archives")
        found.setdefault(char, np.ones((DRAWINGS, SIDE, SIDE), dtype=bool))[drawing - 1] = pixels
        seen.setdefault(char, set()).add(drawing)
    for char, drawings in seen.items():
        if len(drawings) != DRAWINGS:
            absent = sorted(set(range(1, DRAWINGS + 1)) - drawings)
            raise UsageError(f"character {char:04d} under {folder} lacks drawings "
                             f"{', '.join(f'{char:04d}_{d:02d}.png' for d in absent[:3])}"
                             f"{' ...' if len(absent) > 3 else ''}; {REFETCH}")
    return found


def _find_folder(root: Path, name: str) -> Path | None:
    for candidate in (root / name, root / "omniglot-py" / name):
        if candidate.is_dir():
            return candidate
    return None


def _download(root: Path) -> None:
    """Let torchvision fetch the folder layout into `root/omniglot-py`; if that fails, remove
    what this attempt created (folders, a half-written zip), so that no empty data folder is
    left behind for a later run to mistake for data."""
    from torchvision.datasets import Omniglot

    target = root / Omniglot.folder
    created = target  # the outermost folder that does not exist yet, if any
    while not created.parent.exists():
        created = created.parent
    before = set(target.iterdir()) if target.is_dir() else None
    try:
        for background in (True, False):
            Omniglot(str(root), background=background, download=True)
    except BaseException as exc:
        if before is None:
            shutil.rmtree(created, ignore_errors=True)
        else:  # the folder was there: remove only what appeared in it
            for path in set(target.iterdir()) - before:
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)
        if isinstance(exc, (OSError, RuntimeError)):  # urllib's URLError is an OSError
            raise UsageError(f"cannot download Omniglot into {root} ({exc}); without "
                             "internet, put the images_background/ and images_evaluation/ "
                             "folders (or the npz files) there yourself") from None
        raise


def load_raw(data_root: str | Path, download: bool = False) -> tuple[np.ndarray, str]:
    """All 1623 characters as `(1623, 20, 105, 105)` bool (True = paper), and the source's name."""
    root = Path(data_root).expanduser()
    if download:
        _download(root)
    npz = [root / "images_background.npz", root / "images_evaluation.npz"]
    if all(p.is_file() for p in npz):
        try:
            parts = [np.load(p)["images"] for p in npz]
        except Exception as exc:
            raise UsageError(f"cannot read Omniglot arrays in {root}: {exc}") from None
        shape = (N_CHARACTERS, DRAWINGS, SIDE, SIDE)
        if sum(len(p) for p in parts) != N_CHARACTERS or any(p.shape[1:] != shape[1:] for p in parts):
            found = " + ".join(str(tuple(p.shape)) for p in parts)
            raise UsageError(f"the Omniglot arrays in {root} have shapes {found}, expected "
                             f"{shape} together; re-create the npz files from the upstream "
                             "folders, or point --data-root at those folders")
        return np.concatenate(parts), "npz"
    folders = [_find_folder(root, f"images_{s}") for s in ("background", "evaluation")]
    if all(folders):
        chars = {**read_image_folder(folders[0]), **read_image_folder(folders[1])}
        missing = sorted(set(range(1, N_CHARACTERS + 1)) - set(chars))
        if missing:
            raise UsageError(
                f"Omniglot folders under {root} lack {len(missing)} characters "
                f"(first id {missing[0]}); {REFETCH}"
            )
        return np.stack([chars[c] for c in range(1, N_CHARACTERS + 1)]), "folders"
    from maml.data import elsewhere, origin

    raise UsageError(
        f"no Omniglot data under {root}{origin(root)}: expected images_background.npz + "
        "images_evaluation.npz or the images_background/ + images_evaluation/ folders; set "
        f"--data-root or MAML_DATA (or fetch them: `python -m maml data --download`)"
        f"{elsewhere(root)}"
    )


def to_model_input(raw: np.ndarray, size: int = 28) -> torch.Tensor:
    """Bool `(..., 105, 105)` drawings to float `(..., size, size)` ink images, in chunks."""
    flat = raw.reshape(-1, *raw.shape[-2:])
    out = np.empty((flat.shape[0], size, size), dtype=np.float32)
    for start in range(0, flat.shape[0], 4096):
        out[start : start + 4096] = ink_image(ink_from_omniglot(flat[start : start + 4096]), size)
    return torch.from_numpy(out.reshape(*raw.shape[:-2], size, size))


def make_split(split: str, seed: int, val_chars: int) -> dict[str, torch.Tensor]:
    """Character indices (rows of the pooled tensor) for `train`, `val` and `test`."""
    if split == "maml":
        perm = torch.randperm(N_CHARACTERS, generator=torch.Generator().manual_seed(seed))
        trainval, test = perm[:1200], perm[1200:]
    elif split == "background":
        trainval = torch.randperm(N_BACKGROUND, generator=torch.Generator().manual_seed(seed))
        test = torch.arange(N_BACKGROUND, N_CHARACTERS)
    else:
        raise UsageError(f"unknown Omniglot split {split!r}; choose one of {', '.join(SPLITS)}")
    if not 1 <= val_chars < len(trainval):  # training validates (and keeps its best) on them
        raise UsageError(f"--val-chars must be in [1, {len(trainval)}), got {val_chars}: "
                         "training validates on held-out characters")
    cut = len(trainval) - val_chars
    return {"train": trainval[:cut].sort().values, "val": trainval[cut:].sort().values,
            "test": test.sort().values}


def check_task_shape(splits: dict[str, torch.Tensor], n_way: int, k_shot: int, q_query: int) -> None:
    """Reject task shapes the data cannot provide, before any image is loaded."""
    if k_shot < 1 or q_query < 1:
        raise UsageError(f"--k-shot and --q-query must be >= 1, got {k_shot} and {q_query}")
    if k_shot + q_query > DRAWINGS:
        raise UsageError(
            f"--k-shot + --q-query = {k_shot + q_query}, but Omniglot has only {DRAWINGS} "
            "drawings per character; lower one of them"
        )
    if n_way < 2:
        raise UsageError(f"--n-way must be at least 2, got {n_way}")
    for name, chars in splits.items():
        classes = chars.numel() * (4 if name == "train" else 1)
        if chars.numel() and n_way > classes:
            raise UsageError(
                f"--n-way {n_way} exceeds the {classes} classes of the {name} split; lower --n-way"
                + (" or raise --val-chars" if name == "val" else "")
            )


class Omniglot:
    """N-way K-shot Omniglot tasks with Q queries per class, sampled by tensor indexing."""

    kind = "classification"
    loss = "cross_entropy"
    input_shape = (1, 28, 28)

    def __init__(
        self, images: torch.Tensor, splits: dict[str, torch.Tensor], n_way: int, k_shot: int,
        q_query: int, device: str | torch.device = "cpu", split_name: str = "maml",
    ) -> None:
        check_task_shape(splits, n_way, k_shot, q_query)
        self.device = torch.device(device)
        self.images = images.to(self.device)
        self.splits = splits
        self.n_way, self.k_shot, self.q_query = n_way, k_shot, q_query
        self.split_name = split_name

    @property
    def output_shape(self) -> tuple[int]:
        """What the model must return per example: one logit per class of the task."""
        return (self.n_way,)

    def describe(self) -> dict:
        return {"name": "omniglot", "split": self.split_name, "n_way": self.n_way,
                "k_shot": self.k_shot, "q_query": self.q_query, "image_size": 28,
                "classes": {k: int(v.numel()) for k, v in self.splits.items()},
                "train_rotations": [0, 90, 180, 270]}

    def sample(self, batch_size: int, generator: torch.Generator, split: str = "train") -> TaskBatch:
        chars = self.splits[split]
        if chars.numel() == 0:
            raise UsageError(f"the {split} split is empty; raise --val-chars to validate")
        rotations = 4 if split == "train" else 1
        n, k, q = self.n_way, self.k_shot, self.q_query
        # N distinct (character, rotation) classes per task; K + Q distinct drawings per class.
        pick = torch.rand(batch_size, chars.numel() * rotations, generator=generator)
        pick = pick.argsort(dim=1)[:, :n]
        char, rot = chars[pick % chars.numel()], pick // chars.numel()
        drawing = torch.rand(batch_size, n, DRAWINGS, generator=generator).argsort(-1)[..., : k + q]
        char, rot, drawing = (t.to(self.device) for t in (char, rot, drawing))
        images = self.images[char.unsqueeze(-1), drawing]  # (B, N, K+Q, 28, 28)
        if rotations > 1:  # select among the four rotations without a host sync
            turns = rot.view(batch_size, n, 1, 1, 1)
            images = sum(
                torch.where(turns == t, images.rot90(t, dims=(-2, -1)), 0.0) for t in range(4)
            )
        labels = torch.arange(n, device=self.device).view(1, n, 1)
        x = images.unsqueeze(3)  # channel dimension
        support_y = labels.expand(batch_size, n, k).reshape(batch_size, n * k)
        query_y = labels.expand(batch_size, n, q).reshape(batch_size, n * q)
        return TaskBatch(
            x[:, :, :k].reshape(batch_size, n * k, 1, 28, 28), support_y,
            x[:, :, k:].reshape(batch_size, n * q, 1, 28, 28), query_y,
        )
