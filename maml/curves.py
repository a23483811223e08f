"""Learning curves: a run's `<run>.metrics.jsonl` (beside `<run>.pt`) drawn as a PNG.

Two panels side by side: the validation metric (accuracy or MSE) and the training meta-loss
against meta-iterations, and the validation metric against training seconds (time to accuracy).
Several runs can share one figure, e.g. the `higher` and batched engines on one benchmark.
"""

from __future__ import annotations

import json
from pathlib import Path

from maml.errors import UsageError


def read_metrics(path: str | Path) -> list[dict]:
    """The JSON lines of a metrics file, in order.

    A last line cut short (a run killed mid-write, or still writing it) is left out; a damaged
    line before it is a one-line `UsageError`."""
    lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            if number == len(lines):
                break
            raise UsageError(f"{path}, line {number}, is not a metrics record (damaged file); "
                             "delete that line and plot again") from None
    return records


def plot_curves(runs: dict[str, str | Path], out: str | Path, title: str = "") -> Path:
    """Draw the curves of `{label: metrics.jsonl}` into the PNG `out`; return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (by_iter, by_time) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    loss_axis = by_iter.twinx()
    metric_name = "metric"
    for label, path in runs.items():
        records = read_metrics(path)
        val = [r for r in records if any(k.startswith("val_") for k in r)]
        if val:
            key = next(k for k in val[0] if k.startswith("val_"))
            metric_name = key.removeprefix("val_")
            by_iter.plot([r["iteration"] for r in val], [r[key] for r in val], marker="o",
                         label=f"{label} (validation)")
            by_time.plot([r["seconds"] for r in val], [r[key] for r in val], marker="o", label=label)
        loss_axis.plot([r["iteration"] for r in records], [r["loss"] for r in records], alpha=0.35,
                       linestyle="--", label=f"{label} (meta-loss)")
    by_iter.set_xlabel("meta-iteration")
    by_iter.set_ylabel(f"validation {metric_name}")
    loss_axis.set_ylabel("training meta-loss (dashed)")
    by_time.set_xlabel("training seconds (validation excluded)")
    by_time.set_ylabel(f"validation {metric_name}")
    for axis in (by_iter, by_time):
        axis.grid(alpha=0.3)
    if by_time.get_legend_handles_labels()[0]:  # no validation yet: nothing to name
        by_time.legend(loc="best")
    if title:
        fig.suptitle(title)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
