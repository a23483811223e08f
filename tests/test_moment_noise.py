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
from maml.norms import predict, support_moments

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


def test_held_out_sets_aside_the_first_images_of_each_class():
    labels = torch.tensor([2, 0, 1, 0, 2, 1, 0, 1, 2, 2])
    mask = moment_noise.held_out(labels, 3, 2)
    assert mask.tolist() == [True, True, True, True, True, True, False, False, False, False]
    assert not moment_noise.held_out(labels, 3, 0).any()


def test_extra_images_are_never_predicted(support_run, monkeypatch):
    """With 3 images per class set aside, every row predicts the other 12 per class, and the
    `support + j more` rows take their moments from the 5 support images and 5 * j of those."""
    predicted, moment_sizes = [], []

    def spy_predict(forward, params, moments, x, norm):
        predicted.append(len(x))
        return predict(forward, params, moments, x, norm)

    def spy_moments(forward, params, x, norm):
        moment_sizes.append(len(x))
        return support_moments(forward, params, x, norm)

    monkeypatch.setattr(moment_noise, "predict", spy_predict)
    monkeypatch.setattr(moment_noise, "support_moments", spy_moments)
    rows, about = moment_noise.moment_rows(str(support_run), TASKS, None, 1234, None, 3)
    assert "12 of 15 queries per class predicted, 3 set aside" in about
    for name in ("support + rotated copies", "support + mirrored copies",
                 *(f"support + {j} more images per class" for j in (1, 2, 3))):
        assert len(rows[name]) == TASKS
    assert set(predicted) == {60}
    # per task: support, support + the 60 predicted queries, 4 turns, mirrored, 1..3 more
    assert moment_sizes == [5, 65, 20, 10, 10, 15, 20] * TASKS


def test_refuses_runs_it_cannot_measure_in_one_line(tmp_path, support_run, capsys):
    assert moment_noise.main(["--checkpoint", str(tmp_path / "missing.pt")]) == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoint at {tmp_path / 'missing.pt'}"
    assert moment_noise.main(["--checkpoint", str(support_run), "--tasks", "1"]) == 2
    assert "--tasks must be >= 2" in capsys.readouterr().err
    assert moment_noise.main(["--checkpoint", str(support_run), "--extra-per-class", "15"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--extra-per-class must be between 0 and 14" in err[0]
    sine = tmp_path / "sine.pt"
    assert main(["train", "--iterations", "1", "--val-tasks", "2", "--checkpoint", str(sine),
                 "--quiet"]) == 0
    assert moment_noise.main(["--checkpoint", str(sine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a sinusoid run" in err[0]
