"""Smoke check of the whole pipeline: scripts/reproduce.py sinusoid, end to end, on CPU."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_sinusoid_reproduction_end_to_end(tmp_path):
    cmd = [sys.executable, "scripts/reproduce.py", "sinusoid", "--iterations", "60", "--tasks",
           "30", "--val-every", "30", "--log-every", "10", "--out", str(tmp_path), "--quiet",
           "--weights", "best"]
    run = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads((tmp_path / "sinusoid" / "result.json").read_text())
    # 60 of the protocol's 70000 iterations: a short run, never passed off as the protocol
    assert "| benchmark | setting | paper |" in run.stdout  # the run's rows, as a table
    assert "| sinusoid | 5-shot, 10 steps | 0.35 |" in run.stdout and "omniglot" not in run.stdout
    assert result["iterations"] == 60 and not result["complete"]
    assert result["protocol_iterations"] == 70000
    assert [(e["k_shot"], e["steps"]) for e in result["evaluations"]] == [
        (5, 1), (5, 5), (5, 10), (10, 1), (10, 5), (10, 10)]
    first = result["evaluations"][0]
    # evaluated with the weights best on the validation tasks (validations at 30 and 60)
    assert result["weights"]["chosen"] == "best" and result["weights"]["iteration"] in (30, 60)
    # the exported ONNX adapter, run by onnxruntime on the same 30 tasks, agrees task by task
    assert result["onnx"]["tasks_equal"] == 30 and result["onnx"]["max_task_diff"] < 1e-4
    assert abs(result["onnx"]["mean"] - first["mean"]) < 1e-4
    png = (tmp_path / "sinusoid" / "curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # a second call resumes the same run (GPU slots add up): nothing left to train here
    again = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "resuming" in again.stdout
    table = subprocess.run([sys.executable, "scripts/reproduce.py", "--table", "--out", str(tmp_path)],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert "| sinusoid | 5-shot, 10 steps | 0.35 |" in table.stdout
    assert "| 60/70000 (partial), best at " in table.stdout
    assert "| omniglot-5w1s | 1-shot, 3 steps | 98.7 +- 0.4 | not run yet |" in table.stdout
    assert not (tmp_path / "omniglot-5w1s-variants.png").exists()  # no 5-way 1-shot run here


def test_table_draws_the_5w1s_variants_that_ran(tmp_path):
    """Two of the three variants have metrics: one figure of both is drawn and named."""
    for name, rate in (("omniglot-5w1s", 1e-3), ("omniglot-5w1s-first-order", 2e-3)):
        (tmp_path / name).mkdir()
        lines = [{"iteration": i, "seconds": i * rate * 500, "loss": 1 / i, "accuracy": 0.9,
                  **({"val_accuracy": 0.5 + i * rate} if i % 10 == 0 else {})} for i in range(1, 41)]
        (tmp_path / name / "model.metrics.jsonl").write_text(
            "".join(json.dumps(line) + "\n" for line in lines))
    done = subprocess.run([sys.executable, "scripts/reproduce.py", "--table", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    png = tmp_path / "omniglot-5w1s-variants.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and str(png) in done.stderr


def test_table_lists_each_machines_run_of_a_benchmark(tmp_path):
    """A GPU run kept in a machine folder (OUT/h100/NAME) is a row beside the CPU run's."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    for folder, machine, mean, tasks in ((tmp_path, "CPU (x86_64, 2 cores)", 97.74, 600),
                                         (tmp_path / "h100", "NVIDIA H100 80GB HBM3", 98.09, 50)):
        (folder / "omniglot-5w1s").mkdir(parents=True)
        result = {"evaluations": [{"k_shot": 1, "steps": 3, "mean": mean, "ci95": 0.2,
                                   "tasks": tasks}],
                  "iterations": 10, "target_iterations": 60000, "complete": False,
                  "training_seconds": 60.0, "engine": "batched", "machine": machine}
        (folder / "omniglot-5w1s" / "result.json").write_text(json.dumps(result))
    rows = [line for line in reproduce.table(tmp_path).splitlines() if "omniglot-5w1s |" in line]
    assert len(rows) == 2
    assert "97.74 +- 0.20" in rows[0] and rows[0].endswith("| CPU (x86_64, 2 cores) |")
    assert "98.09 +- 0.20 (50 tasks, not the protocol's 600) |" in rows[1]  # never passed off
    assert rows[1].endswith("| NVIDIA H100 80GB HBM3 |") and "tasks" not in rows[0]
    assert "10/60000 (partial)" in rows[1]
    assert "| omniglot-5w5s | 5-shot, 3 steps | 99.9 +- 0.1 | not run yet |" in reproduce.table(tmp_path)


def test_a_support_mode_row_shows_each_query_alone_then_together(tmp_path):
    """The support row's label names the single-query protocol: its cell gives that number first,
    and the paper's (queries together) beside it, never one passed off as the other."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    (tmp_path / "omniglot-5w1s-support").mkdir()
    result = {"evaluations": [{"k_shot": 1, "steps": 3, "mean": 97.5, "ci95": 0.3, "tasks": 600,
                               "alone": {"mean": 97.4, "ci95": 0.31}}],
              "iterations": 10, "target_iterations": 60000, "complete": False,
              "training_seconds": 60.0, "engine": "higher", "machine": "CPU"}
    (tmp_path / "omniglot-5w1s-support" / "result.json").write_text(json.dumps(result))
    row = next(line for line in reproduce.table(tmp_path).splitlines()
               if line.startswith("| omniglot-5w1s-support |"))
    assert "| 1-shot, 3 steps, each query alone (the paper's 98.7 sends them together) |" in row
    assert "| 97.40 +- 0.31 alone (97.50 +- 0.30 together) |" in row


@pytest.mark.parametrize("norm", ["support", "tasknorm"])
def test_the_non_transductive_rows_measure_each_query_alone(tmp_path, synthetic_omniglot, norm):
    """Run end to end for 2 iterations on the synthetic Omniglot: the single-query accuracy is
    measured (not assumed), and in these modes it equals the together one."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    name = f"omniglot-5w1s-{norm}"
    assert reproduce.main([name, "--out", str(tmp_path), "--iterations", "2",
                           "--tasks", "4", "--skip-onnx", "--quiet",
                           "--data-root", str(synthetic_omniglot)]) == 0
    result = json.loads((tmp_path / name / "result.json").read_text())
    assert result["settings"]["norm"] == norm
    (row,) = result["evaluations"]
    assert row["alone"]["mean"] == pytest.approx(row["mean"], abs=1e-9)


@pytest.mark.parametrize("flags, message", [
    (["--minutes", "-1"], "--minutes must be > 0"),
    (["--minutes", "nan"], "--minutes must be > 0 and finite, got nan"),
    (["--tasks", "1"], "--tasks must be >= 2 for a confidence interval"),
    (["--iterations", "0"], "--iterations must be >= 1"),
    (["--val-every", "0"], "--val-every must be >= 1"),
])
def test_bad_settings_are_refused_before_anything_runs(tmp_path, capsys, flags, message):
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    with pytest.raises(SystemExit) as stop:
        reproduce.main(["sinusoid", "--out", str(tmp_path), *flags])
    assert stop.value.code == 2 and message in capsys.readouterr().err
    assert not list(tmp_path.iterdir())


def test_a_run_started_with_a_seed_continues_without_retyping_it(tmp_path, capsys):
    """The script's own defaults are not options the user typed: continuing a --seed 3 run
    with the command minus --seed must not be refused as a change of seed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    common = ["sinusoid", "--out", str(tmp_path), "--tasks", "3", "--skip-onnx", "--quiet",
              "--val-every", "1"]
    assert reproduce.main([*common, "--iterations", "2", "--seed", "3"]) == 0
    assert reproduce.main([*common, "--iterations", "3"]) == 0
    result = json.loads((tmp_path / "sinusoid" / "result.json").read_text())
    assert result["iterations"] == 3 and result["settings"]["seed"] == 3
    # another typed seed is refused, naming the script's own way out (--out), before training
    assert reproduce.main([*common, "--iterations", "5", "--seed", "4"]) == 2
    assert capsys.readouterr().err.strip().splitlines()[-1] == (
        f"error: --seed 4 differs from the run in {tmp_path / 'sinusoid'} (seed 3); drop --seed "
        "to continue it, or give another --out for a new run")
    assert json.loads((tmp_path / "sinusoid" / "result.json").read_text())["iterations"] == 3


def test_an_out_that_runs_into_a_file_is_one_line_naming_out(tmp_path, capsys):
    sys.path.insert(0, str(ROOT / "scripts"))
    import reproduce

    (tmp_path / "file").write_text("")
    assert reproduce.main(["sinusoid", "--out", str(tmp_path / "file"), "--quiet"]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: --out: {tmp_path / 'file'} is a file, not a folder; choose another --out")
