"""scripts/bench_train.py runs and checks its rows (a GPU lease depends on it; timings untested)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_train.py", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def test_quick_cpu_run_writes_checked_rows(tmp_path):
    done = bench("--cpu-only", "--quick", "--only", "sinusoid", out=tmp_path)
    assert done.returncode == 0, done.stderr
    [path] = tmp_path.glob("bench_train-*.json")
    rows = json.loads(path.read_text())["results"]
    assert [r["engine"] for r in rows] == ["higher loop", "batched"]
    assert [r["iterations"] for r in rows] == [20, 20]  # one sinusoid iteration is too short
    for r in rows:  # each row's meta-gradient against the float64 loop: float32 rounding only
        assert r["setting"].startswith("sinusoid") and r["ms"] > 0
        assert 0 < r["grad_rel_diff"] < 1e-5
    assert "| cpu | sinusoid K10 Q10 B25 1 step | batched |" in done.stdout


def test_only_takes_a_full_name_alone_and_rejects_an_unknown_one(tmp_path):
    done = bench("--cpu-only", "--quick", "--only", "nonsense", out=tmp_path)
    assert done.returncode == 2 and "--only 'nonsense' matches no setting" in done.stderr
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train

    assert bench_train.selected("5w1s q15 B32 1 step") == ["5w1s q15 B32 1 step"]
    assert bench_train.selected("5w1s") == ["5w1s q15 B32 1 step", "5w1s q15 B32 5 steps",
                                            "paper net 5w1s q15 B32 1 step"]
    assert bench_train.selected("") == list(bench_train.SETTINGS)


def test_quick_on_a_cpu_times_conv_nets_in_chunks_and_refuses_an_unwritable_out(tmp_path):
    """A whole 32-task conv-net batch under vmap needs up to 20 GB: `--quick` on a CPU must not
    try it. An --out that cannot be a folder is refused before anything is timed."""
    sys.path.insert(0, str(ROOT / "scripts"))
    import bench_train

    args = argparse.Namespace(quick=True, chunked_only=False, compile=False,
                                          memory_budget_mb=1024.0, iterations=10)
    cpu = bench_train.torch.device("cpu")
    image, sine = bench_train.SETTINGS["5w1s q15 B32 5 steps"], bench_train.SETTINGS[
        "sinusoid K10 Q10 B25 1 step"]
    names = [row for row, _, _ in bench_train.rows_for(cpu, args, image)]
    assert names == ["higher loop", "batched, auto chunk <= 1024 MB"]
    assert [row for row, _, _ in bench_train.rows_for(cpu, args, sine)] == ["higher loop", "batched"]
    assert (bench_train.iterations(args, image), bench_train.iterations(args, sine)) == (1, 20)
    (tmp_path / "file").write_text("")
    done = bench("--cpu-only", "--quick", "--only", "sinusoid", out=tmp_path / "file" / "out")
    assert done.returncode == 2 and "cannot be made a folder" in done.stderr
    assert done.stdout == ""  # nothing was timed
