"""scripts/compare_runs.py pairs two runs on the same tasks: each side is what `maml eval` reports
for that run, the difference is theirs, and runs that draw other tasks are refused in one line."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import maml
from maml.__main__ import main as maml_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import compare_runs  # noqa: E402

TASKS, SEED = 12, 7


def train(path: Path, *extra: str) -> str:
    assert maml_main(["train", "--dataset", "sinusoid", "--iterations", "5", "--meta-batch-size",
                      "4", "--val-tasks", "2", "--checkpoint", str(path), "--quiet", *extra]) == 0
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("compare")
    return {"a": train(folder / "a.pt", "--seed", "0"), "b": train(folder / "b.pt", "--seed", "1"),
            "5shot": train(folder / "c.pt", "--k-shot", "5")}


def test_each_side_is_maml_eval_and_the_difference_is_theirs(runs):
    r = compare_runs.compare(runs["a"], runs["b"], TASKS, SEED)
    evals = {k: maml.evaluate(runs[k], tasks=TASKS, seed=SEED, one_at_a_time=False)
             for k in ("a", "b")}
    assert r["metric"] == "mse" and r["tasks"] == TASKS
    for key in ("a", "b"):
        assert r[key]["mean"] == pytest.approx(evals[key]["mean"], rel=1e-12)
        assert r[key]["ci95"] == pytest.approx(evals[key]["ci95"], rel=1e-12)
    assert r["b_minus_a"] == pytest.approx(evals["b"]["mean"] - evals["a"]["mean"], abs=1e-12)
    # differently seeded weights score differently on every task; a lower MSE counts as better
    assert r["b_better"] + r["a_better"] == TASKS
    va, vb = (compare_runs.per_task(compare_runs.load(runs[k], None), TASKS, SEED)
              for k in ("a", "b"))
    assert r["b_better"] == int((vb < va).sum())
    assert r["ci95"] > 0


def test_a_run_against_itself_differs_by_nothing(runs):
    r = compare_runs.compare(runs["a"], runs["a"], TASKS, SEED)
    assert r["b_minus_a"] == 0 and r["ci95"] == 0
    assert r["b_better"] == r["a_better"] == 0


def test_runs_that_draw_other_tasks_are_refused_in_one_line(runs, capsys):
    assert compare_runs.main(["--a", runs["a"], "--b", runs["5shot"], "--tasks", "4"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "draw different meta-test tasks" in err[0]
    assert compare_runs.main(["--a", runs["a"], "--b", runs["a"] + ".missing"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint at" in err[0]


def test_the_table_names_both_runs_and_the_paired_interval(runs, capsys):
    assert compare_runs.main(["--a", runs["a"], "--b", runs["b"], "--tasks", "4"]) == 0
    out = capsys.readouterr().out
    assert runs["a"] in out and runs["b"] in out
    assert "b - a, task by task:" in out and "(95%)" in out
