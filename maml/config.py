"""Every setting of a meta-training run, in one place, with the MAML paper's defaults.

`Config` is what the command line fills in, what a checkpoint stores (as a plain dict) and what
`--resume` restores. Settings left `None` take the defaults of their dataset (`with_defaults`).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import Any

from maml.adaptation import InnerLoop
from maml.data import default_root
from maml.errors import UsageError
from maml.norms import NORM_MODES

DEFAULT_NORM = "support"
DEFAULT_FOLDER_SPLIT = "0.6,0.2,0.2"
"""New runs' normalisation mode (README, "Normalisation modes": measured against transductive)."""

DATASETS = ("sinusoid", "harmonic", "omniglot", "folder")
"""Built-in task sources; `--dataset package.module:factory` names your own (`maml.experiment`)."""
ENGINES = ("auto", "higher", "batched")
RESUMABLE = (
    "iterations", "device", "engine", "task_chunk", "memory_budget_mb", "compile", "cuda_graphs",
    "bf16", "tf32", "log_every", "val_every", "val_tasks", "checkpoint_every", "data_root",
    "download", "tensorboard",
)
"""Settings a resumed run may change: how and how long it runs, not what it learns."""


@dataclass
class Config:
    dataset: str = "sinusoid"
    # task shape
    n_way: int | None = None
    k_shot: int | None = None
    q_query: int | None = None
    # inner loop (adaptation)
    inner_steps: int | None = None
    inner_lr: float | None = None
    eval_inner_steps: int | None = None
    first_order: bool = False
    learn_inner_lr: bool = False
    norm: str | None = None  # batch norm's statistics at prediction time (maml.norms)
    # outer loop (meta-optimisation)
    meta_lr: float = 1e-3
    meta_batch_size: int | None = None
    iterations: int | None = None
    grad_clip: float | None = None
    # model
    model: str | None = None
    model_kwargs: dict[str, Any] = field(default_factory=dict)
    # data
    data_root: str = field(default_factory=lambda: str(default_root()))  # maml.data: absolute
    download: bool = False
    split: str = "maml"
    val_chars: int = 50
    # folder datasets (maml.tasks.folder) and your own task sources
    image_size: int | None = None  # folder: side of the square model input (default 28)
    channels: int | None = None  # folder: 1 (grayscale) or 3 (RGB) (default 1)
    invert: bool = False  # folder: v -> 1 - v (dark ink on light paper becomes ink = 1)
    normalize: bool = False  # folder: per-channel mean / std of the training images
    augment: str | None = None  # folder: "rot90" (rotations as new classes), "flip"; comma list
    dataset_kwargs: dict[str, Any] = field(default_factory=dict)  # package.module:factory's
    task_loss: str | None = None  # a custom source's loss (set from the source when built)
    # run
    seed: int = 0
    device: str = "cpu"
    engine: str = "auto"
    # batched engine (maml.engine_select): chunk of tasks (None: sized to the memory budget)
    task_chunk: int | str | None = None  # a number of tasks, or "auto"
    memory_budget_mb: float | None = None
    compile: bool = False
    cuda_graphs: bool = False
    bf16: bool = False  # opt-in: bfloat16 autocast in the batched step
    tf32: bool = False  # opt-in: TF32 matmuls and convolutions on CUDA
    dtype: str = "float32"
    checkpoint: str = "runs/model.pt"
    log_every: int = 50
    val_every: int = 500
    val_tasks: int = 100
    checkpoint_every: int = 500
    tensorboard: str | None = None  # a folder for TensorBoard event files, beside the JSON lines

    def with_defaults(self) -> Config:
        """Fill unset settings from the MAML paper's choices for this dataset."""
        self.check_choices()
        custom = self.dataset not in DATASETS
        if self.dataset in ("omniglot", "folder") or (custom and self.n_way is not None):
            twenty = (self.n_way or 5) >= 20  # classification: the paper's Omniglot settings
            defaults = dict(
                n_way=5, k_shot=1, q_query=15, inner_steps=5 if twenty else 1,
                inner_lr=0.1 if twenty else 0.4, eval_inner_steps=5 if twenty else 3,
                meta_batch_size=16 if twenty else 32, iterations=60000, model="cnn",
                norm=DEFAULT_NORM,
            )
            if self.dataset == "folder":
                defaults.update(image_size=28, channels=1, meta_batch_size=16 if twenty else 8,
                                iterations=10000)
                if self.split == "maml":  # Config's default split is Omniglot's
                    self = dataclasses.replace(self, split=DEFAULT_FOLDER_SPLIT)
        else:  # sinusoid and harmonic (and your own regression source): the paper's set-up
            if self.n_way is not None:
                raise UsageError(f"--n-way is for Omniglot; {self.dataset} tasks have no classes "
                                 "(--k-shot sets the support points)")
            defaults = dict(
                n_way=None, k_shot=10, q_query=10, inner_steps=1, inner_lr=0.01,
                eval_inner_steps=10, meta_batch_size=25, iterations=70000, model="mlp",
                norm=DEFAULT_NORM,
            )
        filled = dataclasses.replace(
            self, **{k: v for k, v in defaults.items() if getattr(self, k) is None}
        )
        filled.check()
        return filled

    def check_choices(self) -> None:
        """Refuse a dataset, engine or dtype this project does not have."""
        if self.dataset not in DATASETS and ":" not in str(self.dataset):
            raise UsageError(f"unknown dataset {self.dataset!r}; choose one of "
                             f"{', '.join(DATASETS)}, or name your own task source as "
                             "package.module:factory")
        if self.channels is not None and self.channels not in (1, 3):
            raise UsageError(f"--channels must be 1 (grayscale) or 3 (RGB), got {self.channels}")
        if self.image_size is not None and not 1 <= self.image_size <= 4096:
            raise UsageError(f"--image-size must be in [1, 4096], got {self.image_size}")
        if self.dataset == "folder":
            from maml.tasks.folder import parse_augment

            parse_augment(self.augment)
        if not isinstance(self.dataset_kwargs, dict):
            raise UsageError("dataset_kwargs must be a dict (--dataset-kwargs '{\"name\": 1}')")
        if self.engine not in ENGINES:
            raise UsageError(f"unknown engine {self.engine!r}; choose one of {', '.join(ENGINES)}")
        if self.norm is not None and self.norm not in NORM_MODES:
            raise UsageError(f"unknown --norm {self.norm!r}; choose one of {', '.join(NORM_MODES)}")
        if self.dtype not in ("float32", "float64"):
            raise UsageError(f"--dtype must be float32 or float64, got {self.dtype!r}")
        if self.model is not None and not isinstance(self.model, str):
            given = (f"the class {self.model.__name__}" if isinstance(self.model, type)
                     else f"a {type(self.model).__name__}")
            raise UsageError(
                f"model must be a built-in name or a 'package.module:factory' string, got "
                f"{given}: checkpoints rebuild the model from that name, so put the model's "
                "class or factory in an importable module and name it"
            )
        if not isinstance(self.model_kwargs, dict):
            raise UsageError(f"model_kwargs must be a dict, got {type(self.model_kwargs).__name__}")

    def check(self) -> None:
        """Refuse settings no run can use (also those of a checkpoint, which may be damaged).

        The comparisons are written so that NaN fails them."""
        self.check_choices()
        positive = ["k_shot", "q_query", "meta_batch_size", "iterations", "log_every",
                    "val_every", "val_tasks", "checkpoint_every"]
        for name in positive:
            if getattr(self, name) is None or getattr(self, name) < 1:
                raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.inner_steps < 0 or self.eval_inner_steps < 0:
            raise UsageError("--inner-steps and --eval-inner-steps must be >= 0")
        if self.inner_lr is not None and not 0 <= self.inner_lr < math.inf:
            raise UsageError(f"--inner-lr must be >= 0 and finite (a step size down the support "
                             f"loss), got {self.inner_lr}")
        if self.grad_clip is not None and not 0 < self.grad_clip <= math.inf:
            raise UsageError(f"--grad-clip must be > 0 (the largest meta-gradient norm), "
                             f"got {self.grad_clip}")
        if not 0 < self.meta_lr < math.inf:
            raise UsageError(f"--meta-lr must be > 0 and finite, got {self.meta_lr}")
        if not -(2**63) <= self.seed < 2**64:  # what torch.manual_seed takes
            raise UsageError(f"--seed must be in [-2**63, 2**64), got {self.seed}")
        if self.compile and self.norm == "tasknorm":
            raise UsageError("--compile does not support --norm tasknorm yet (its compiled step "
                             "is not exact); drop --compile, or use --norm support")
        if self.learn_inner_lr and self.inner_steps < 1:
            raise UsageError("--learn-inner-lr needs --inner-steps >= 1")

    @property
    def loss(self) -> str:
        if self.task_loss is not None:
            return self.task_loss
        return "cross_entropy" if self.dataset in ("omniglot", "folder") else "mse"

    def inner_loop(self, steps: int | None = None) -> InnerLoop:
        """The adaptation this run trains with (or evaluates with, given `steps`)."""
        return InnerLoop(
            loss=self.loss, steps=self.inner_steps if steps is None else steps,
            lr=self.inner_lr, first_order=self.first_order, norm=self.norm or "transductive",
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Config:
        known = {f.name for f in dataclasses.fields(cls)}
        d = {"norm": "transductive", **d}  # runs from before the modes normalised that way
        return cls(**{k: v for k, v in d.items() if k in known})


def resumed(saved: Config, requested: Config, given: Collection[str], source: str) -> Config:
    """The settings of a resumed run: the checkpoint's, with `requested`'s iterations, device
    and path, and those of its `given` settings that are `RESUMABLE`.

    A given setting that would change what the run learns (the task, model, inner loop, meta
    learning rate, seed, ...) and differs from the checkpoint's is refused rather than ignored:
    the resumed run could not honour it, and silently keeping the old value would surprise.
    """
    from maml.models import resolve_spec

    merged = dataclasses.replace(
        saved, checkpoint=requested.checkpoint, device=requested.device,
        iterations=requested.iterations or saved.iterations,
    )
    for name in given:
        value, before = getattr(requested, name, None), getattr(saved, name, None)
        if name == "checkpoint" or not hasattr(saved, name) or value is None:
            continue
        if name in RESUMABLE:
            setattr(merged, name, value)
            continue
        if name == "model_kwargs" and isinstance(value, dict) and isinstance(before, dict) \
                and "n_way" in before and "n_way" not in value:
            value = {**value, "n_way": before["n_way"]}  # older runs stored the n_way added
        same = (resolve_spec(value) == resolve_spec(before) if name == "model" and before
                else value == before)
        if not same:
            flag = "--" + name.replace("_", "-")
            raise UsageError(
                f"{flag} {_shown(value)} differs from the run being resumed ({_shown(before)} in "
                f"{source}); a resumed run keeps what it learns with: drop {flag}, or start a "
                "new run under another --checkpoint"
            )
    merged.check()
    return merged


def _shown(value: Any) -> str:
    return ("on" if value else "off") if isinstance(value, bool) else repr(value)
