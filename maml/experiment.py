"""A run's pieces built from its `Config`, or rebuilt from a checkpoint.

`build(cfg)` makes the task source, the model and the learned step sizes of a new run;
`restore(state)` rebuilds the same objects from a checkpoint, for resuming, evaluation and
export. Both go through the same code, so a checkpoint always means the same model and tasks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from maml.checkpoint import load_weights
from maml.config import Config
from maml.errors import UsageError
from maml.models import build_model, model_kwargs, resolve_spec
from maml.norms import add_parameters, check_call_order

DTYPES = {"float32": torch.float32, "float64": torch.float64}


@dataclass
class Experiment:
    cfg: Config
    source: Any  # Sinusoid | Harmonic | Omniglot
    model: nn.Module
    inner_lrs: nn.Parameter | None
    split: dict[str, torch.Tensor] | None
    model_spec: str
    model_kwargs: dict[str, Any]

    @property
    def meta_parameters(self) -> list[torch.Tensor]:
        extra = [] if self.inner_lrs is None else [self.inner_lrs]
        return list(self.model.parameters()) + extra


_OMNIGLOT_CACHE: dict[tuple[str, bool], torch.Tensor] = {}


def omniglot_images(data_root: str, download: bool = False) -> torch.Tensor:
    """The pooled 28x28 Omniglot tensor, loaded once per process."""
    from maml.tasks.omniglot import load_raw, to_model_input

    key = (str(Path(data_root).expanduser().resolve()), download)
    if key not in _OMNIGLOT_CACHE:
        raw, _ = load_raw(data_root, download)
        _OMNIGLOT_CACHE[key] = to_model_input(raw)
    return _OMNIGLOT_CACHE[key]


def make_source(cfg: Config, split: dict[str, torch.Tensor] | None = None):
    """The task distribution of `cfg`; for Omniglot, `split` fixes the characters (else seeded)."""
    from maml.tasks.regression import Harmonic, Sinusoid

    if cfg.dataset == "sinusoid":
        return Sinusoid(cfg.k_shot, cfg.q_query, cfg.device), None
    if cfg.dataset == "harmonic":
        return Harmonic(cfg.k_shot, cfg.q_query, cfg.device), None
    if cfg.dataset == "folder":
        from maml.tasks.folder import folder_source

        return folder_source(cfg, split)
    if ":" in cfg.dataset:
        return custom_source(cfg), None
    from maml.tasks.omniglot import Omniglot, check_task_shape, make_split

    if split is None:
        split = make_split(cfg.split, cfg.seed, cfg.val_chars)
    check_task_shape(split, cfg.n_way, cfg.k_shot, cfg.q_query)
    images = omniglot_images(cfg.data_root, cfg.download)
    source = Omniglot(images, split, cfg.n_way, cfg.k_shot, cfg.q_query, cfg.device, cfg.split)
    return source, split


SOURCE_ARGUMENTS = ("n_way", "k_shot", "q_query", "device", "seed", "data_root")
"""What a `package.module:factory` task source is given, of the arguments its signature names."""


def custom_source(cfg: Config):
    """Your own task source, `--dataset package.module:factory`: the factory is called with
    those of `SOURCE_ARGUMENTS` it takes, plus `cfg.dataset_kwargs`; what it returns must
    implement the interface of `maml.tasks` (see docs/your-own-data.md)."""
    import inspect

    from maml.adaptation import LOSSES
    from maml.models import import_factory

    factory = import_factory(cfg.dataset, "dataset")
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        params = {}
    given = {name: getattr(cfg, name) for name in SOURCE_ARGUMENTS
             if name in params and name not in cfg.dataset_kwargs}
    try:
        source = factory(**given, **cfg.dataset_kwargs)
    except UsageError:
        raise
    except Exception as exc:
        raise UsageError(f"task source {cfg.dataset!r} raised {type(exc).__name__}: {exc}") from None
    missing = [a for a in ("kind", "loss", "input_shape", "output_shape", "sample", "describe")
               if not hasattr(source, a)]
    if missing:
        raise UsageError(f"task source {cfg.dataset!r} returned a {type(source).__name__} without "
                         f"{', '.join(missing)}; implement the interface of maml.tasks (see "
                         "docs/your-own-data.md)")
    if source.kind not in ("classification", "regression") or source.loss not in LOSSES:
        raise UsageError(f"task source {cfg.dataset!r}: kind must be classification or regression "
                         f"and loss one of {', '.join(LOSSES)}; got {source.kind!r}, {source.loss!r}")
    if source.kind == "classification" and cfg.n_way is None:
        raise UsageError(f"task source {cfg.dataset!r} samples classification tasks: give --n-way")
    cfg.task_loss = source.loss
    return source


def validation_split(source) -> str:
    """The split validation draws its tasks from: the source's `validation_split` if it names
    one, else held-out classes (`val`) for classification, fresh tasks (`test`) for regression."""
    chosen = getattr(source, "validation_split", None)
    if chosen:
        return chosen
    return "val" if source.kind == "classification" else "test"


def check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UsageError(f"unknown device {device!r}; use cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {device} asked for, but no CUDA GPU is available; use cpu")
    return dev


def build(cfg: Config, split: dict[str, torch.Tensor] | None = None,
          kwargs: dict[str, Any] | None = None) -> Experiment:
    """A fresh run: seeded model initialisation, tasks, and step sizes. `kwargs` (a
    checkpoint's) build the model instead of `cfg.model_kwargs` with `n_way` added."""
    check_device(cfg.device)
    source, split = make_source(cfg, split)
    spec = resolve_spec(cfg.model)
    n_way = cfg.n_way if source.kind == "classification" else None
    kwargs = model_kwargs(spec, cfg.model_kwargs if kwargs is None else kwargs, n_way,
                          tuple(source.input_shape))
    torch.manual_seed(cfg.seed)
    example = torch.zeros(2, *source.input_shape, dtype=DTYPES[cfg.dtype])
    model = build_model(spec, kwargs, example, source.output_shape).to(cfg.device)
    if cfg.norm == "tasknorm":
        problem = check_call_order(model, example.to(cfg.device))
        if problem is not None:
            raise UsageError(f"the model {spec} cannot use TaskNorm: {problem}")
    add_parameters(model, cfg.norm or "transductive")
    n_tensors = len(list(model.parameters()))
    inner_lrs = None
    if cfg.learn_inner_lr:
        inner_lrs = nn.Parameter(
            torch.full((cfg.inner_steps, n_tensors), cfg.inner_lr, dtype=DTYPES[cfg.dtype],
                       device=cfg.device)
        )
    return Experiment(cfg, source, model, inner_lrs, split, spec, kwargs)


def restore(state: dict[str, Any], source: str, device: str | None = None) -> Experiment:
    """Rebuild a checkpoint's run (on `device`, default the run's own) with its weights loaded."""
    cfg = Config.from_dict(state["config"])
    if device is not None:
        cfg.device = device
    cfg.check()
    split = state.get("split")
    cfg.model = state["model"]["spec"]  # the user's --model-kwargs stay in cfg as typed
    exp = build(cfg, split, kwargs=state["model"]["kwargs"])
    load_weights(exp.model, state["model"]["state_dict"], source)
    if exp.inner_lrs is not None:
        if state["inner_lrs"] is None or state["inner_lrs"].shape != exp.inner_lrs.shape:
            raise UsageError(f"the learned step sizes in {source} do not fit the model")
        with torch.no_grad():
            exp.inner_lrs.copy_(state["inner_lrs"])
    return exp
