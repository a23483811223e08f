"""MAML meta-training of any PyTorch model.

    import maml

    run = maml.train(maml.Config(dataset="sinusoid", iterations=2000, checkpoint="runs/sine.pt"))
    score = maml.evaluate("runs/sine.pt", tasks=100)       # {"mean": ..., "ci95": ..., ...}

    stats = maml.meta_gradient(model, batch, inner)      # adds d(query loss)/d(weights) to .grad

Importing `maml` imports nothing heavy: torch is imported on the first call, so that
`maml.images` (numpy only) can be used by runtimes without torch.

- `maml.config`: every setting of a run (`Config`), with the MAML paper's defaults.
- `maml.adaptation`: what adaptation means (loss, SGD steps, step sizes); `maml.norms`: batch
  norm's statistics at prediction time.
- `maml.higher_engine` (the reference, one task at a time) and `maml.batched_engine` (`vmap`):
  meta-gradients; `maml.engine_select` picks one.
- `maml.training`, `maml.evaluation`: the training loop and evaluation.
- `maml.tasks`: sinusoid, harmonic and Omniglot task distributions; `maml.models`: built-in
  models and model specs.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import Tensor, nn

    from maml.adaptation import InnerLoop
    from maml.config import Config
    from maml.tasks import TaskBatch

__version__ = "0.1.0"
__all__ = ["Config", "InnerLoop", "evaluate", "meta_gradient", "train"]


def __getattr__(name: str) -> Any:
    """`maml.Config` and `maml.InnerLoop`, imported (with torch) when first used."""
    if name == "Config":
        from maml.config import Config

        return Config
    if name == "InnerLoop":
        from maml.adaptation import InnerLoop

        return InnerLoop
    raise AttributeError(f"module 'maml' has no attribute {name!r}")


def train(cfg: Config, *, resume: bool = False, overwrite: bool = False,
          minutes: float | None = None, progress: bool = True) -> dict[str, Any]:
    """Meta-train as `cfg` says, as `python -m maml train` does; returns the final metrics
    (iterations done, best validation, the checkpoint's path).

    `resume` continues the run saved at `cfg.checkpoint`, `overwrite` replaces it (one of them
    is needed when it exists), `minutes` stops after that long with a checkpoint."""
    from maml.training import train as run

    return run(cfg, resume=resume, progress=progress, max_minutes=minutes, overwrite=overwrite,
               given=[k for k, v in vars(cfg).items() if v is not None])


def evaluate(checkpoint: str, *, tasks: int = 600, steps: int | None = None, seed: int = 0,
             split: str = "test", device: str = "cpu", one_at_a_time: bool = True,
             data_root: str | None = None) -> dict[str, Any]:
    """Adapt the checkpoint's model to `tasks` new tasks and score its queries, as
    `python -m maml eval` does: the mean metric (accuracy, or MSE) and its 95% interval after
    `steps` steps (default: the run's), before adaptation, and with each query sent alone."""
    import torch

    from maml import checkpoint as ckpt
    from maml.evaluation import evaluate as run
    from maml.experiment import restore
    from maml.training import select_engine

    state = ckpt.load(checkpoint)
    if data_root is not None:
        state["config"] = {**state["config"], "data_root": data_root}
    exp = restore(state, checkpoint, device)
    steps = exp.cfg.eval_inner_steps if steps is None else steps
    engine = select_engine(exp.cfg.engine, exp.cfg)
    result = run(exp.model, exp.inner_lrs, exp.source, exp.cfg.inner_loop(steps), tasks,
                 torch.Generator().manual_seed(seed), split, adapt_predict=engine.adapt_predict,
                 one_at_a_time=one_at_a_time)
    result.pop("per_task")
    return result


def meta_gradient(model: nn.Module, batch: TaskBatch, inner: InnerLoop, *,
                  step_sizes: Tensor | None = None, engine: str = "higher") -> dict[str, Tensor]:
    """Add the MAML meta-gradient of `batch` to `.grad` of `model`'s parameters (and of
    `step_sizes`, learned per step and tensor, when given); return the mean query loss (and
    accuracy). `engine`: "higher" (one task at a time) or "batched" (all at once, `vmap`); both
    give the same meta-gradient."""
    if engine == "higher":
        from maml.higher_engine import meta_gradient as run
    elif engine == "batched":
        from maml.batched_engine import meta_gradient as run
    else:
        raise ValueError(f"unknown engine {engine!r}; choose higher or batched")
    return run(model, step_sizes, batch, inner)
