"""The installed commands `maml`, `maml-export` and `maml-serve` (setup.cfg's entry points).

Each is `python -m maml|export|serve` under a shorter name. `maml` and `maml-export` need the
training packages (the `train` extra: torch, fire, onnx, ...), which a serving runtime installed
without them (`pip install maml-toolkit`, the `serve` part alone) lacks: there they end with one
line naming the install command, not an ImportError's traceback.
"""

from __future__ import annotations

import importlib.util
import sys

TRAIN_EXTRA = "pip install 'maml-toolkit[train]'"
NEEDS = {"maml": ("torch", "fire", "higher", "tqdm"), "maml-export": ("torch", "onnx", "onnxscript")}


def _missing(command: str) -> int | None:
    """Exit status 2 with one line when `command`'s packages are not installed, else None."""
    missing = [m for m in NEEDS[command] if importlib.util.find_spec(m) is None]
    if not missing:
        return None
    print(f"error: `{command}` needs the training packages ({', '.join(missing)} not installed); "
          f"install them with {TRAIN_EXTRA}", file=sys.stderr)
    return 2


def maml() -> int:
    if (code := _missing("maml")) is not None:
        return code
    from maml.__main__ import main

    return main()


def export() -> int:
    if (code := _missing("maml-export")) is not None:
        return code
    from export.__main__ import main

    return main()


def serve() -> int:
    from serve.__main__ import main

    return main()
