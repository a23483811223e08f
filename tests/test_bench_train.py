"""scripts/bench_train.py runs and checks its rows (a GPU lease depends on it; timings untested)."""

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import bench_train  # noqa: E402

TINY_SINE = {"tiny sine": dict(kind="sine", tasks=3, steps=2, lr=0.01)}
TINY_NET = {"tiny net": dict(kind="image", n_way=2, q=2, tasks=2, steps=1, lr=0.4)}


@pytest.fixture(autouse=True)
def keep_threads():
    """The in-process runs set torch's thread count (`--threads 1`): give it back."""
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def bench(*args: str, out: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "scripts/bench_train.py", *args, "--out", str(out)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)


def options(**changes) -> argparse.Namespace:
    args = dict(only="", quick=False, iterations=3, warmup=1, chunked_only=False, compile=False,
                memory_budget_mb=1024.0, peers=True, skip="")
    return argparse.Namespace(**{**args, **changes})


def run_bench(monkeypatch, settings: dict, peers: list, **changes) -> list[dict]:
    """`bench` in this process, on tiny settings and the given peers only."""
    monkeypatch.setattr(bench_train, "SETTINGS", settings)
    monkeypatch.setattr(bench_train, "PEERS", peers)
    torch.set_num_threads(1)
    return bench_train.bench(torch.device("cpu"), options(**changes), [], lambda: None)


def test_quick_cpu_run_writes_checked_rows(tmp_path):
    done = bench("--cpu-only", "--quick", "--only", "sinusoid", "--no-peers", out=tmp_path)
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
    assert bench_train.selected("5w1s q15 B32 1 step") == ["5w1s q15 B32 1 step"]
    assert bench_train.selected("5w1s") == ["5w1s q15 B32 1 step", "5w1s q15 B32 5 steps",
                                            "paper net 5w1s q15 B32 1 step"]
    assert bench_train.selected("") == list(bench_train.SETTINGS)


def test_quick_on_a_cpu_times_conv_nets_in_chunks_and_refuses_an_unwritable_out(tmp_path):
    """A whole 32-task conv-net batch under vmap needs up to 20 GB: `--quick` on a CPU must not
    try it. An --out that cannot be a folder is refused before anything is timed."""
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


def test_a_peer_not_installed_is_one_line_not_a_failure(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "learn2learn", None)  # find_spec: not importable
    monkeypatch.setitem(sys.modules, "torchopt", None)
    monkeypatch.setattr(bench_train, "SETTINGS", TINY_SINE)
    monkeypatch.setattr(sys, "argv", ["bench_train.py", "--cpu-only", "--iterations", "2",
                                      "--threads", "1", "--out", str(tmp_path)])
    bench_train.main()
    out = capsys.readouterr().out
    assert out.startswith("peer learn2learn MAML not installed: pip install learn2learn==0.2.0")
    assert "peer TorchOpt functional not installed: pip install --no-deps torchopt==0.7.3" in out
    [path] = tmp_path.glob("bench_train-*.json")
    saved = json.loads(path.read_text())
    assert len(saved["peers_not_installed"]) == 2
    engines = [r["engine"] for r in saved["results"]]
    assert "peer: higher innerloop_ctx (seed style)" in engines  # the others still run
    assert not any("learn2learn" in e or "TorchOpt functional" in e for e in engines)
    assert all("error" not in r for r in saved["results"])


def test_the_seed_style_higher_row_is_exact_through_batch_norm(monkeypatch):
    [seed] = [p for p in bench_train.PEERS if p.module is None and "higher" in p.name]
    rows = run_bench(monkeypatch, TINY_NET, [seed], iterations=1)
    assert [r["engine"] for r in rows][-1] == seed.name
    peer = rows[-1]
    assert peer["check"] == "exact" and peer["float64_rel_diff"] <= bench_train.EXACT
    assert peer["vs_fastest_exact_peer"] == 1.0 and peer["speedup"] > 0


def first_order_by_mistake(model, inner):
    """A peer that drops the second-order term (no graph through the support gradients)."""
    loss = bench_train.peer_loss(inner)
    params = dict(model.named_parameters())

    def step(batch):
        for sx, sy, qx, qy in zip(*batch.tensors()):
            out = torch.func.functional_call(model, params, (sx,))
            grads = torch.autograd.grad(loss(out, sy), tuple(params.values()))  # no create_graph
            fast = {k: p - inner.lr * g for (k, p), g in zip(params.items(), grads)}
            query = loss(torch.func.functional_call(model, fast, (qx,)), qy)
            (query / len(batch)).backward()

    return step


def test_a_wrong_peer_is_shown_as_wrong_and_is_no_speed_win(monkeypatch):
    seed = next(p for p in bench_train.PEERS if "higher" in p.name)
    wrong = bench_train.Peer("peer: first order by mistake", first_order_by_mistake, None)
    rows = run_bench(monkeypatch, TINY_SINE, [seed, wrong])
    by_name = {r["engine"]: r for r in rows}
    bad = by_name[wrong.name]
    assert bad["check"].startswith("wrong: ") and bad["check"].endswith(" off float64")
    assert bad["float64_rel_diff"] > 1e-3 and bad["ms"] > 0  # timed all the same
    assert bad["speedup"] is None and bad["vs_fastest_exact_peer"] is None
    seed_ms = by_name[seed.name]["ms"]  # the fastest *exact* peer, however fast the wrong one is
    for r in rows:
        if r is not bad:
            assert r["vs_fastest_exact_peer"] == pytest.approx(r["ms"] / seed_ms)
    line = next(line for line in bench_train.table(rows).splitlines() if wrong.name in line)
    assert "(wrong) | not a win: wrong |  |" in line and "| wrong: " in line


def test_rows_are_timed_round_robin_the_same_number_of_times(monkeypatch):
    calls = []

    def row(name, fail=False):
        def step(batch):
            calls.append(name)
            if fail and len(calls) > 3:
                raise RuntimeError("out of memory")
        return bench_train.Row(name, step, [], None)

    rows = [row("a"), row("b"), row("c", fail=True)]
    bench_train.interleave(rows, torch.device("cpu"), rounds=4)
    assert calls == ["a", "b", "c"] * 2 + ["a", "b"] * 2  # c fails in round 2: it leaves
    assert [len(r.times) for r in rows] == [4, 4, 1]
    assert rows[2].error == "RuntimeError: out of memory"
    # through `bench`: ours and every peer get `--iterations` timed rounds each
    results = run_bench(monkeypatch, TINY_SINE, bench_train.PEERS, iterations=3)
    assert len(results) >= 4 and {r["iterations"] for r in results} == {3}
    assert all(r["check"] == "exact" for r in results if r["peer"])  # the sinusoid has no norms


def test_skip_leaves_out_the_rows_it_names_a_part_of():
    assert bench_train.skipped("peer: torch.func vmap (TorchOpt-style)", "torch.func")
    assert bench_train.skipped("peer: learn2learn MAML", "nothing, learn2learn")
    assert not bench_train.skipped("higher loop", "torch.func, ")
    assert not bench_train.skipped("higher loop", "")
