"""Meta-training end to end: learning, exact resume, determinism, checkpoints, divergence."""

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maml.training
from maml import checkpoint
from maml.__main__ import main
from maml.adaptation import InnerLoop
from maml.config import Config
from maml.errors import Stopped, UsageError
from maml.evaluation import evaluate
from maml.experiment import build, restore
from maml.training import TrainingDiverged, paths, stop_requests, train

ROOT = Path(__file__).resolve().parents[1]


def sinusoid_config(tmp_path, **overrides):
    settings = dict(dataset="sinusoid", iterations=20, meta_batch_size=4, log_every=5,
                    val_every=10, val_tasks=10, checkpoint_every=10,
                    checkpoint=str(tmp_path / "run.pt"))
    settings.update(overrides)
    return Config(**settings)


def weights(path):
    state = torch.load(path, weights_only=True)
    tensors = dict(state["model"]["state_dict"])
    if state["inner_lrs"] is not None:
        tensors["inner_lrs"] = state["inner_lrs"]
    return state, tensors


def test_meta_training_beats_the_untrained_initialisation(tmp_path):
    cfg = sinusoid_config(tmp_path, iterations=300, meta_batch_size=10, val_every=300, meta_lr=0.005,
                          log_every=100, checkpoint_every=300)
    untrained = build(cfg.with_defaults())
    train(cfg, progress=False)
    trained = restore(checkpoint.load(cfg.checkpoint), cfg.checkpoint)
    inner = trained.cfg.inner_loop(5)

    def mse(exp):
        gen = torch.Generator().manual_seed(99)
        return evaluate(exp.model, exp.inner_lrs, exp.source, inner, 200, gen)["mean"]

    before, after = mse(untrained), mse(trained)
    print(f"untrained {before:.3f} trained {after:.3f}")
    assert after < 0.5 * before, (before, after)


@pytest.mark.parametrize("learn", [False, True], ids=["fixed-lr", "learned-lr"])
def test_resume_continues_exactly(tmp_path, learn):
    straight = sinusoid_config(tmp_path / "a", iterations=20, learn_inner_lr=learn)
    train(straight, progress=False)
    first = sinusoid_config(tmp_path / "b", iterations=10, learn_inner_lr=learn)
    train(first, progress=False)
    resumed = sinusoid_config(tmp_path / "b", iterations=20)
    train(resumed, resume=True, progress=False)
    state_a, a = weights(straight.checkpoint)
    state_b, b = weights(first.checkpoint)
    assert state_a["iteration"] == state_b["iteration"] == 20
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    assert torch.equal(state_a["rng"]["tasks"], state_b["rng"]["tasks"])
    # the metrics file continues rather than restarting
    lines = [json.loads(line) for line in paths(first.checkpoint)["metrics"].read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [5, 10, 15, 20]


def test_resume_drops_metric_lines_logged_after_the_checkpoint(tmp_path):
    straight = sinusoid_config(tmp_path / "a", iterations=20)
    train(straight, progress=False)
    logged = paths(straight.checkpoint)["metrics"].read_text().splitlines(keepends=True)
    stopped = sinusoid_config(tmp_path / "b", iterations=10)
    train(stopped, progress=False)
    # the stopped run had logged iterations 15 and 20 past its last checkpoint, the last line cut short
    with paths(stopped.checkpoint)["metrics"].open("a") as f:
        f.writelines(logged[2:])
        f.write('{"iteration": 2')
    train(sinusoid_config(tmp_path / "b", iterations=20), resume=True, progress=False)
    lines = [json.loads(line) for line in paths(stopped.checkpoint)["metrics"].read_text().splitlines()]
    expected = [json.loads(line) for line in logged]
    assert [r["iteration"] for r in lines] == [5, 10, 15, 20]
    assert [r["loss"] for r in lines] == [r["loss"] for r in expected]


def test_validation_keeps_its_own_schedule(tmp_path):
    cfg = sinusoid_config(tmp_path, iterations=12, log_every=4, val_every=6, checkpoint_every=12)
    train(cfg, progress=False)
    lines = [json.loads(line) for line in paths(cfg.checkpoint)["metrics"].read_text().splitlines()]
    assert [r["iteration"] for r in lines] == [4, 6, 8, 12]
    assert [r["iteration"] for r in lines if "val_mse" in r] == [6, 12]


def test_same_seed_same_weights_other_seed_other_weights(tmp_path):
    runs = {}
    for name, seed in [("a", 3), ("b", 3), ("c", 4)]:
        cfg = sinusoid_config(tmp_path / name, iterations=5, seed=seed)
        train(cfg, progress=False)
        runs[name] = weights(cfg.checkpoint)[1]
    assert all(torch.equal(runs["a"][k], runs["b"][k]) for k in runs["a"])
    assert not all(torch.equal(runs["a"][k], runs["c"][k]) for k in runs["a"])


def test_checkpoint_contents_and_best_copy(tmp_path):
    cfg = sinusoid_config(tmp_path, iterations=20, learn_inner_lr=True)
    train(cfg, progress=False)
    where = paths(cfg.checkpoint)
    state = torch.load(where["latest"], weights_only=True)  # no arbitrary pickles
    assert state["format"] == checkpoint.FORMAT
    assert state["model"]["spec"] == "maml.models:sinusoid_mlp"
    assert state["config"]["inner_lr"] == 0.01 and state["config"]["meta_batch_size"] == 4
    assert state["inner_lrs"].shape == (1, 6)
    assert state["optimizer"]["state"], "meta-optimizer state must be saved for resume"
    best = torch.load(where["best"], weights_only=True)
    assert best["iteration"] in (10, 20) and best["metrics"]["best_val"] is not None
    assert not list(tmp_path.glob("*.tmp")), "temporary files must not be left behind"
    umask = os.umask(0)
    os.umask(umask)
    assert where["latest"].stat().st_mode & 0o777 == 0o666 & ~umask  # not mkstemp's 0600


def test_every_setting_a_run_stores_loads_back(tmp_path):
    """`checkpoint.load` checks the config's types; what training itself stores must pass."""
    cfg = sinusoid_config(tmp_path, iterations=2, task_chunk="auto", grad_clip=1.0,
                          memory_budget_mb=100.0, model_kwargs={"hidden": 8})
    train(cfg, progress=False)
    assert checkpoint.load(cfg.checkpoint)["config"]["task_chunk"] == "auto"


def test_run_files_keep_every_dot_of_a_name_without_pt(tmp_path):
    assert paths(tmp_path / "m.pt")["best"] == tmp_path / "m.best.pt"
    a, b = paths(tmp_path / "lr0.01"), paths(tmp_path / "lr0.05")
    assert a["best"] == tmp_path / "lr0.01.best.pt" and a["best"] != b["best"]
    assert a["metrics"] == tmp_path / "lr0.01.metrics.jsonl" != b["metrics"]


def test_overwrite_drops_the_old_runs_best_checkpoint(tmp_path):
    old = sinusoid_config(tmp_path, iterations=10, inner_lr=0.02)
    train(old, progress=False)
    best = paths(old.checkpoint)["best"]
    assert best.exists()
    new = sinusoid_config(tmp_path, iterations=50, val_every=1000)
    train(new, progress=False, overwrite=True, max_minutes=0)  # one iteration, validated
    assert torch.load(old.checkpoint, weights_only=True)["iteration"] == 1
    kept = torch.load(best, weights_only=True)  # the new run's best, not the old one's
    assert kept["iteration"] == 1 and kept["config"]["inner_lr"] != 0.02


def test_a_failed_overwrite_leaves_no_half_of_the_old_run(tmp_path):
    """--overwrite replaces all of the old run: a new run that fails before its first
    checkpoint must not leave the old checkpoint to be resumed without its metrics and best."""
    old = sinusoid_config(tmp_path, iterations=10)
    train(old, progress=False)
    where = paths(old.checkpoint)
    assert where["latest"].exists() and where["best"].exists()
    diverging = sinusoid_config(tmp_path, iterations=30, inner_lr=1e30, checkpoint_every=20,
                                log_every=1)
    with pytest.raises(TrainingDiverged, match="no checkpoint of this run was written"):
        train(diverging, progress=False, overwrite=True)
    assert not where["latest"].exists() and not where["best"].exists()
    with pytest.raises(UsageError, match="a run here stopped before its first checkpoint; add "
                                         "--overwrite"):
        train(old, progress=False)  # its metrics lines are there: not replaced by accident


def test_runs_a_and_a_pt_share_files_so_a_new_one_is_refused(tmp_path):
    first = sinusoid_config(tmp_path, iterations=10, checkpoint=str(tmp_path / "col.pt"))
    train(first, progress=False)
    where = paths(first.checkpoint)
    before = {p: p.read_bytes() for p in (where["metrics"], where["best"])}
    with pytest.raises(UsageError, match=re.escape(f"{where['metrics']} exists: it is the run "
                                                   f"{tmp_path / 'col.pt'}'s")):
        train(dataclasses.replace(first, checkpoint=str(tmp_path / "col")), progress=False)
    assert {p: p.read_bytes() for p in before} == before


def test_an_unwritable_folder_is_named_not_the_probe_file(tmp_path, monkeypatch):
    """A read-only file system fails the write probe; the error names the --checkpoint's folder
    (exit_status prints it), not the probe's random temporary name."""
    import errno
    import tempfile

    def read_only(dir: str) -> None:
        raise OSError(errno.EROFS, "Read-only file system", f"{dir}/tmpv672aks9")

    monkeypatch.setattr(tempfile, "TemporaryFile", read_only)
    with pytest.raises(OSError) as failed:
        train(sinusoid_config(tmp_path / "ro"), progress=False)
    assert (failed.value.errno, failed.value.filename) == (errno.EROFS, str(tmp_path / "ro"))


def test_a_seed_torch_cannot_take_is_one_line(tmp_path):
    with pytest.raises(UsageError, match=re.escape(f"--seed must be in [-2**63, 2**64), got {2**70}")):
        train(sinusoid_config(tmp_path, seed=2**70), progress=False)
    assert not list(tmp_path.iterdir())


def test_a_second_process_on_the_same_run_is_refused(tmp_path):
    """Two runs started together on one checkpoint both passed the 'already holds a run' check
    and interleaved their metrics lines mid-line. The run's lock now refuses the second (here
    held through another open file, as another process would), and goes when the run ends."""
    import fcntl

    cfg = sinusoid_config(tmp_path, iterations=2)
    lock = paths(cfg.checkpoint)["lock"]
    with open(lock, "a") as other:
        fcntl.flock(other, fcntl.LOCK_EX | fcntl.LOCK_NB)
        with pytest.raises(UsageError, match=re.escape(
                f"another process is training the run at {cfg.checkpoint} (it holds {lock})")):
            train(cfg, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["run.lock"]  # nothing of a run written
    train(cfg, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.best.pt", "run.metrics.jsonl",
                                                          "run.pt"]


def test_a_model_object_in_the_config_is_refused_with_the_fix(tmp_path):
    """A notebook user passes the module itself: the run could not be rebuilt from a checkpoint,
    so the error says to name an importable factory (it was an AttributeError deep inside)."""
    for model, given in ((torch.nn.Linear(1, 1), "a Linear"), (torch.nn.Linear, "the class Linear")):
        with pytest.raises(UsageError, match=f"got {given}: checkpoints rebuild the model"):
            train(sinusoid_config(tmp_path, model=model), progress=False)
    assert not list(tmp_path.iterdir())


def test_a_full_disk_while_saving_is_one_line_and_keeps_the_last_checkpoint(tmp_path):
    """A file-size limit makes the checkpoint write fail as a full disk would (EFBIG rather
    than ENOSPC): one line, exit status 1, the last good checkpoint intact, no temp file."""
    ckpt = tmp_path / "run.pt"
    first = ["train", "--iterations", "2", "--checkpoint", str(ckpt), "--quiet"]
    assert main(first) == 0
    before = ckpt.read_bytes()
    limited = ("import resource, signal, sys; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
               f"resource.setrlimit(resource.RLIMIT_FSIZE, ({len(before) // 2}, "
               f"{len(before) // 2})); from maml.__main__ import main; "
               f"sys.exit(main({[*first[:2], '4', *first[3:], '--resume']!r}))")
    done = subprocess.run([sys.executable, "-c", limited], cwd=ROOT, capture_output=True,
                          text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    named = re.match(r"error: File too large \((.+)\); check the path", lines[0])
    assert named and named.group(1) in (str(ckpt), str(tmp_path / "run.best.pt")), lines
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.best.pt", "run.metrics.jsonl",
                                                          "run.pt"]


def test_a_non_finite_validation_score_is_never_the_best():
    assert not maml.training._better("mse", float("nan"), None)
    assert not maml.training._better("accuracy", float("inf"), 0.5)
    assert maml.training._better("mse", 3.0, float("nan"))
    assert maml.training._better("accuracy", 0.2, float("nan"))
    assert maml.training._better("mse", 0.1, 0.2) and not maml.training._better("accuracy", 0.1, 0.2)


def test_evaluation_tasks_do_not_depend_on_the_batch_size():
    from maml.tasks.regression import Sinusoid

    def evaluated(batch_size):
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(1, 8), torch.nn.ReLU(), torch.nn.Linear(8, 1))
        return evaluate(model, None, Sinusoid(5, 5), InnerLoop("mse", 2, 0.01), 7,
                        torch.Generator().manual_seed(5), batch_size=batch_size)["per_task"]

    whole = evaluated(7)
    for size in (1, 3):
        torch.testing.assert_close(evaluated(size), whole, rtol=1e-6, atol=1e-7)


def test_non_finite_meta_loss_stops_before_writing_nan_weights(tmp_path):
    cfg = sinusoid_config(tmp_path, iterations=30, inner_lr=1e30, checkpoint_every=5,
                          log_every=5, val_every=1000)
    with pytest.raises(TrainingDiverged, match="non-finite") as stopped:
        train(cfg, progress=False)
    latest = paths(cfg.checkpoint)["latest"]
    if latest.exists():  # the message names the checkpoint only if this run wrote it
        state = torch.load(latest, weights_only=True)
        assert all(torch.isfinite(t).all() for t in state["model"]["state_dict"].values())
        assert f"of iteration {state['iteration']}, is {latest}" in str(stopped.value)
    else:
        assert "no checkpoint of this run was written" in str(stopped.value)


def test_an_existing_run_is_not_replaced_by_accident(tmp_path):
    cfg = sinusoid_config(tmp_path, iterations=2)
    train(cfg, progress=False)
    latest = paths(cfg.checkpoint)["latest"]
    before = latest.read_bytes()
    with pytest.raises(UsageError, match="already holds a run; add --resume to continue it"):
        train(cfg, progress=False)
    assert latest.read_bytes() == before  # nothing ran, nothing was truncated
    assert len(paths(cfg.checkpoint)["metrics"].read_text().splitlines()) >= 1
    train(dataclasses.replace(cfg, iterations=1), progress=False, overwrite=True)
    assert torch.load(latest, weights_only=True)["iteration"] == 1
    folder = dataclasses.replace(cfg, checkpoint=str(tmp_path))
    with pytest.raises(UsageError, match="is a folder; give a file name"):
        train(folder, progress=False)
    under_a_file = dataclasses.replace(cfg, checkpoint=str(latest / "deeper" / "m.pt"))
    with pytest.raises(UsageError, match=f"{latest} is a file, not a folder"):
        train(under_a_file, progress=False)
    weights_only = {k: v for k, v in torch.load(latest, weights_only=True).items()
                    if k not in ("optimizer", "rng")}
    torch.save(weights_only, latest)
    with pytest.raises(UsageError, match=r"not a resumable run \(no optimizer, rng\)"):
        train(cfg, resume=True, progress=False)


def test_atomic_save_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "c.pt"
    checkpoint.save(path, {"config": {}, "model": {}, "inner_lrs": None, "iteration": 1})

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        checkpoint.save(path, {"config": {}, "model": Unpicklable(), "inner_lrs": None,
                               "iteration": 2})
    assert checkpoint.load(path)["iteration"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["c.pt"]


def test_time_capped_slots_add_up_to_one_run(tmp_path):
    straight = sinusoid_config(tmp_path / "a", iterations=12)
    train(straight, progress=False)
    slotted = sinusoid_config(tmp_path / "b", iterations=12)
    first = train(slotted, progress=False, max_minutes=1e-9)  # stops after one iteration
    assert first["iterations"] == 1 and torch.load(slotted.checkpoint, weights_only=True)["iteration"] == 1
    while torch.load(slotted.checkpoint, weights_only=True)["iteration"] < 12:
        train(slotted, resume=True, progress=False, max_minutes=1e-9)
    _, a = weights(straight.checkpoint)
    state_b, b = weights(slotted.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert state_b["metrics"]["seconds"] > 0


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_a_signal_mid_run_stops_after_the_iteration_with_a_checkpoint(tmp_path, monkeypatch, signum):
    """The signal arrives inside iteration 7's meta-gradient; the run finishes that iteration,
    writes it (the periodic checkpoint is every 10), and resuming gives the straight run."""
    straight = sinusoid_config(tmp_path / "a", iterations=12)
    train(straight, progress=False)
    real_select, calls = maml.training.select_engine, []

    def signalling_engine(name, cfg=None, *rest):
        engine = real_select(name, cfg, *rest)
        real_step = engine.meta_gradient

        def meta_gradient(*args, **kwargs):
            calls.append(1)
            if len(calls) == 7:
                os.kill(os.getpid(), signum)
            return real_step(*args, **kwargs)

        monkeypatch.setattr(engine, "meta_gradient", meta_gradient)
        return engine

    monkeypatch.setattr(maml.training, "select_engine", signalling_engine)
    stopped = sinusoid_config(tmp_path / "b", iterations=12)
    before = signal.getsignal(signum)
    with pytest.raises(Stopped, match=f"{signum.name} after iteration 7 of 12") as caught:
        train(stopped, progress=False)
    assert caught.value.status == 128 + signum
    assert signal.getsignal(signum) is before, "the handlers are put back"
    assert torch.load(stopped.checkpoint, weights_only=True)["iteration"] == 7
    monkeypatch.setattr(maml.training, "select_engine", real_select)
    train(stopped, resume=True, progress=False)
    _, a = weights(straight.checkpoint)
    _, b = weights(stopped.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_a_second_signal_stops_at_once_or_is_ignored_under_torchrun():
    said = []
    before = signal.getsignal(signal.SIGINT)  # Python's Ctrl-C handler, or SIG_IGN where the
    # suite was started in the background by a shell without job control
    with stop_requests(said.append) as received:
        os.kill(os.getpid(), signal.SIGINT)
        assert received == [signal.SIGINT] and "Ctrl-C again" in said[0]
        with pytest.raises(Stopped, match="SIGTERM again: stopped at once") as now:
            os.kill(os.getpid(), signal.SIGTERM)
        assert now.value.status == 143  # the second signal's status, not Ctrl-C's 130
    with stop_requests(said.append, again_stops_now=False) as received:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGINT)  # torchrun's agent forwarding it: ignored
        assert received == [signal.SIGTERM]
    assert signal.getsignal(signal.SIGINT) is before
