"""scripts/moment_noise.py measures the product, not a copy of it: its `support` row is the
accuracy `maml eval` computes for a `support` run, task for task, its `query batch` row the
transductive protocol's, and pooling a layer's moments changes that layer only."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from maml import checkpoint
from maml.__main__ import main
from maml.adaptation import InnerLoop
from maml.evaluation import evaluate
from maml.experiment import restore

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import moment_noise  # noqa: E402

TASKS = 6


@pytest.fixture(scope="module")
def support_run(tmp_path_factory, synthetic_omniglot) -> Path:
    """A `--norm support` Omniglot run of 3 iterations (seconds)."""
    ckpt = tmp_path_factory.mktemp("moments") / "s.pt"
    assert main(["train", "--dataset", "omniglot", "--meta-batch-size", "2", "--model-kwargs",
                 '{"hidden": 8}', "--iterations", "3", "--norm", "support", "--val-tasks", "2",
                 "--checkpoint", str(ckpt), "--data-root", str(synthetic_omniglot),
                 "--quiet"]) == 0
    return ckpt


def eval_per_task(ckpt: Path, norm: str) -> list[float]:
    state = checkpoint.load(ckpt)
    exp = restore(state, str(ckpt))
    steps = exp.cfg.eval_inner_steps
    inner = InnerLoop(exp.cfg.loss, steps, exp.cfg.inner_lr, exp.cfg.first_order, norm)
    result = evaluate(exp.model, exp.inner_lrs, exp.source, inner, TASKS,
                      torch.Generator().manual_seed(1234))
    return result["per_task"]


def test_rows_are_the_shipped_modes_accuracy_task_for_task(support_run):
    rows, about = moment_noise.moment_rows(str(support_run), TASKS, None, 1234, None)
    assert "--norm support for 3 iterations" in about
    assert rows["support"] == pytest.approx(eval_per_task(support_run, "support"), abs=1e-12)
    # the inner loop is the same in both modes; only the queries' moments differ
    assert rows["query batch"] == pytest.approx(eval_per_task(support_run, "transductive"),
                                                abs=1e-12)
    layers = [name for name in rows if name.startswith("support, layer ")]
    assert len(layers) == 4  # the cnn's four batch-norm layers
    assert all(len(values) == TASKS for values in rows.values())


def test_refuses_runs_it_cannot_measure_in_one_line(tmp_path, support_run, capsys):
    assert moment_noise.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoint at {tmp_path / 'missing.pt'}"
    assert moment_noise.main(["--checkpoint", str(support_run), "--tasks", "1"]) == 2
    assert "--tasks must be >= 2" in capsys.readouterr().err
    sine = tmp_path / "sine.pt"
    assert main(["train", "--iterations", "1", "--val-tasks", "2", "--checkpoint", str(sine),
                 "--quiet"]) == 0
    assert moment_noise.main(["--checkpoint", str(sine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a sinusoid run" in err[0]
