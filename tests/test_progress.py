"""Progress that fits the run: a bar toward the time limit, lines outside a terminal, a
validation at the end of a time-capped slot, and TensorBoard event files on request."""

import io
import json

import pytest

import maml.progress
from maml.config import Config
from maml.errors import UsageError
from maml.progress import Progress
from maml.training import paths, train


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def config(tmp_path, **overrides):
    settings = dict(dataset="sinusoid", iterations=6, meta_batch_size=4, log_every=2,
                    val_every=1000, val_tasks=5, checkpoint_every=1000,
                    checkpoint=str(tmp_path / "run.pt"))
    return Config(**{**settings, **overrides})


def test_a_time_limited_bar_counts_seconds_toward_the_limit_not_iterations():
    out = Terminal()
    bar = Progress(0, 60000, limit_s=240, stream=out)
    bar.update(3, {"loss": 0.5})
    bar.close()
    text = out.getvalue()
    assert "/240 s" in text and "iteration 3/60000" in text and "loss 0.5000" in text
    assert "60000/60000" not in text and "333" not in text  # no bar toward the iterations


def test_outside_a_terminal_progress_is_a_line_now_and_then(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(maml.progress, "LINE_EVERY_S", 0.0)
    bar = Progress(0, 6, stream=io.StringIO(), every_s=3600)
    bar.update(1)
    assert bar.stream.getvalue() == ""  # not yet due
    train(config(tmp_path), progress=True)
    err = capsys.readouterr().err
    assert "\r" not in err  # no redrawn bar in a log
    lines = [line for line in err.splitlines() if line.startswith("meta-train: ")]
    assert lines[-1].startswith("meta-train: iteration 6/6, ") and "loss" in lines[-1]
    assert len(err) < 2000


def test_a_time_capped_slot_ends_with_a_validation(tmp_path):
    cfg = config(tmp_path, iterations=50)
    result = train(cfg, progress=False, max_minutes=1e-9)  # stops after one iteration
    assert result["iterations"] == 1
    last = json.loads(paths(cfg.checkpoint)["metrics"].read_text().splitlines()[-1])
    assert last["iteration"] == 1 and "val_mse" in last
    assert paths(cfg.checkpoint)["best"].is_file()


def test_tensorboard_gets_the_same_metrics(tmp_path):
    pytest.importorskip("tensorboard", reason="tensorboard is not installed (pip install tensorboard)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    board = tmp_path / "tb"
    cfg = config(tmp_path, tensorboard=str(board), val_every=6)
    train(cfg, progress=False)
    events = EventAccumulator(str(board))
    events.Reload()
    assert {"loss", "val_mse"} <= set(events.Tags()["scalars"])
    logged = [json.loads(line) for line in paths(cfg.checkpoint)["metrics"].read_text().splitlines()]
    scalars = events.Scalars("loss")
    assert [e.step for e in scalars] == [r["iteration"] for r in logged] == [2, 4, 6]
    assert [e.value for e in scalars] == pytest.approx([r["loss"] for r in logged], rel=1e-6)


def test_tensorboard_without_the_package_is_one_line(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_tensorboard(name, *args, **kwargs):
        if name.startswith("torch.utils.tensorboard"):
            raise ImportError(name)
        return real(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    with pytest.raises(UsageError, match="--tensorboard needs the tensorboard package: pip install"):
        train(config(tmp_path, tensorboard=str(tmp_path / "tb")), progress=False)
