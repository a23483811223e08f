"""scripts/query_batching.py measures the shipped adapter: its `together` row is the accuracy
`maml eval` computes for the exported steps, task for task; a `support` adapter answers the same
in every row, and a transductive one does not."""

from __future__ import annotations

import sys

import pytest
import torch
from serve_helpers import ROOT

from maml import checkpoint
from maml.evaluation import evaluate
from maml.experiment import restore

sys.path.insert(0, str(ROOT / "scripts"))
import query_batching  # noqa: E402

TASKS = 4
pytestmark = pytest.mark.omniglot


def eval_per_task(exported, data_root) -> list[float]:
    """`maml eval`'s per-task accuracy with the adapter's own steps and mode."""
    state = checkpoint.load(exported.checkpoint)
    state["config"]["data_root"] = str(data_root)
    exp = restore(state, str(exported.checkpoint))
    inner = exp.cfg.inner_loop(exported.meta["steps"])
    return evaluate(exp.model, exp.inner_lrs, exp.source, inner, TASKS,
                    torch.Generator().manual_seed(1234))["per_task"]


@pytest.mark.parametrize("name", ["omniglot", "omniglot_transductive"])
def test_rows_are_the_adapters_accuracy_sent_each_way(name, request, synthetic_omniglot):
    """(The exports are cached across sessions; this session's synthetic Omniglot is passed, as
    a user passes `--data-root` for data that has moved since training.)"""
    exported = request.getfixturevalue(name)
    rows, about = query_batching.batching_rows(str(exported.directory),
                                               str(exported.checkpoint), TASKS, 1234,
                                               str(synthetic_omniglot))
    mode = exported.meta["norm"]["mode"]
    assert f"{mode} normalisation, 2 steps" in about
    assert list(rows) == ["together", "one at a time", "in random groups of 5",
                          "each alone, with the support set"]
    assert all(len(values) == TASKS for values in rows.values())
    assert rows["together"] == pytest.approx(eval_per_task(exported, synthetic_omniglot),
                                             abs=1e-9)
    if mode == "support":  # each query's answer is its own, however it is sent
        assert all(values == rows["together"] for values in rows.values())


def test_a_transductive_adapters_rows_differ(omniglot_transductive, synthetic_omniglot):
    """Guards the test above: the rows can tell the modes apart."""
    rows, _ = query_batching.batching_rows(str(omniglot_transductive.directory),
                                           str(omniglot_transductive.checkpoint), TASKS, 1234,
                                           str(synthetic_omniglot))
    assert rows["one at a time"] != rows["together"]


def test_refuses_what_it_cannot_measure_in_one_line(sine, tmp_path, capsys):
    assert query_batching.main(["--adapter", str(tmp_path), "--checkpoint", "x.pt"]) == 2
    assert capsys.readouterr().err.strip() == (f"error: no adapter at {tmp_path} (a folder from "
                                               "`python -m export`)")
    assert query_batching.main(["--adapter", str(sine.directory), "--checkpoint",
                                str(sine.checkpoint)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is a regression adapter" in err[0], err
