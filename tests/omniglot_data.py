"""Omniglot for the tests: where the real copy lives, and a synthetic one the tests write.

The real copy is `../shared/data/omniglot` beside the repository (see its README.md); a fresh
clone has nothing there. So every test that reads Omniglot either
- runs on the synthetic copy (`tests/conftest.py`'s fixtures `synthetic_omniglot`, the npz
  layout, and `synthetic_omniglot_folders`, the upstream folder layout), which has the real
  data's shapes and file formats: anything about training, exporting or serving on Omniglot; or
- needs the real files (to compare with the published drawings, the upstream archives, the pen
  strokes) and says so with `@pytest.mark.needs_omniglot(*files)`: it skips with one line that
  names the folder and the files it lacks.
Both kinds carry the `omniglot` marker, so `pytest -m omniglot` runs every test that reads
Omniglot (`.ci/run` does, in a copy with nothing beside it).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from maml.tasks.omniglot import DRAWINGS, N_BACKGROUND, N_CHARACTERS, SIDE

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT = ROOT.parent / "shared" / "data" / "omniglot"  # the real copy, if any
NPZ = ("images_background.npz", "images_evaluation.npz")
IMAGES_ZIP = "images_background_small1.zip"
STROKES_ZIP = "strokes_background_small1.zip"


def missing_omniglot(*files: str) -> str | None:
    """Why a test that reads `files` (default: the two npz files) of the real copy cannot run."""
    files = files or NPZ
    if all((OMNIGLOT / name).is_file() for name in files):
        return None
    return f"Omniglot data not found at {OMNIGLOT} (needs {', '.join(files)})"


# The synthetic drawings: per character a random pattern of 7x7-pixel ink blocks on a 13x13
# grid, inside a 7-pixel margin of paper (a real drawing's edge is paper too); each drawing
# flips a few blocks of its character's pattern. Drawings are distinct (also under rotation),
# those of one character alike, about 11% ink like the real ones (8%). Each character has its
# own random stream, so any rows can be made alone.
SEED, GRID, CELL, MARGIN, INK, CHANGE = 20240601, 13, 7, 7, 0.08, 0.08


def synthetic_drawings(rows: range | list[int]) -> np.ndarray:
    """`(len(rows), 20, 105, 105)` bool, True = paper: the synthetic characters `rows`."""
    out = np.ones((len(rows), DRAWINGS, SIDE, SIDE), dtype=bool)
    for i, row in enumerate(rows):
        rng = np.random.default_rng([SEED, row])
        blocks = (rng.random((GRID, GRID)) < INK) ^ (rng.random((DRAWINGS, GRID, GRID)) < CHANGE)
        out[i, :, MARGIN:-MARGIN, MARGIN:-MARGIN] = ~blocks.repeat(CELL, 1).repeat(CELL, 2)
    return out


def write_synthetic_npz(root: Path) -> Path:
    """The offline copy's layout in `root`: `images_background.npz` (964 characters) and
    `images_evaluation.npz` (659), arrays `images` (chars, 20, 105, 105) bool, `labels`."""
    root.mkdir(parents=True, exist_ok=True)
    for name, rows in (("images_background", range(N_BACKGROUND)),
                       ("images_evaluation", range(N_BACKGROUND, N_CHARACTERS))):
        labels = np.repeat(np.arange(len(rows), dtype=np.int64)[:, None], DRAWINGS, axis=1)
        np.savez_compressed(root / f"{name}.npz", images=synthetic_drawings(rows), labels=labels)
    return root


# A few characters in the upstream folder layout: {set: {alphabet: character file ids}}.
FOLDER_CHARACTERS = {"background": {"Alphabet_A": [1, 2, 3], "Alphabet_B": [4, 5]},
                     "evaluation": {"Alphabet_C": [965, 966]}}


def write_synthetic_folders(root: Path) -> Path:
    """`root/images_{background,evaluation}/<Alphabet>/characterNN/XXXX_YY.png` for the
    characters of FOLDER_CHARACTERS (the same drawings as the npz rows `XXXX - 1`)."""
    from PIL import Image

    for part, alphabets in FOLDER_CHARACTERS.items():
        for alphabet, ids in alphabets.items():
            for n, (char, drawings) in enumerate(zip(ids, synthetic_drawings([i - 1 for i in ids])), 1):
                folder = root / f"images_{part}" / alphabet / f"character{n:02d}"
                folder.mkdir(parents=True, exist_ok=True)
                for d, pixels in enumerate(drawings, 1):
                    Image.fromarray(pixels).save(folder / f"{char:04d}_{d:02d}.png")
    return root
