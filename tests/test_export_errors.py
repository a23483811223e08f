"""`python -m export` on bad input: one `error:` line, exit status 2, nothing half-written."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import export.build
import export.trace
from export.__main__ import main
from maml.__main__ import main as maml_main
from maml.errors import Stopped

ROOT = Path(__file__).resolve().parents[1]
OMNIGLOT_CKPT = ROOT / "tests" / "fixtures" / "page_omniglot_5w1s.pt"


def train_one_iteration(path: Path, *args: str) -> Path:
    """A sinusoid checkpoint after one tiny iteration (`args`: e.g. `--model ...`)."""
    assert maml_main(["train", "--iterations", "1", "--meta-batch-size", "2", "--val-tasks", "2",
                      "--checkpoint", str(path), "--quiet", *args]) == 0
    return path


@pytest.fixture(scope="module")
def sinusoid_ckpt(tmp_path_factory) -> Path:
    return train_one_iteration(tmp_path_factory.mktemp("ckpt") / "s.pt")


def run_main(capsys, *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    err = capsys.readouterr().err.strip().splitlines()
    return code, err[-1] if err else ""


def test_missing_checkpoint_is_one_line_and_exit_2(tmp_path):
    out = tmp_path / "adapter"
    done = subprocess.run(
        [sys.executable, "-m", "export", "--checkpoint", str(tmp_path / "nope.pt"), "--out",
         str(out)], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        f"error: checkpoint {tmp_path / 'nope.pt'} does not exist; "
        "train one with `python -m maml train`"]
    assert not out.exists()


def test_foreign_checkpoint(tmp_path, capsys):
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    code, line = run_main(capsys, "--checkpoint", str(foreign), "--out", str(tmp_path / "a"))
    assert code == 2 and line.startswith("error: ") and "not a maml-toolkit checkpoint" in line
    assert list(tmp_path.iterdir()) == [foreign]


def test_unwritable_out_dir(tmp_path, sinusoid_ckpt, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out",
                          str(blocker / "adapter"), "--formats", "torchscript")
    assert code == 2 and line.startswith("error: cannot write to ") and "--out" in line


def test_out_dir_that_is_not_an_adapter_is_left_alone(tmp_path, sinusoid_ckpt, capsys):
    out = tmp_path / "data"
    out.mkdir()
    (out / "precious.txt").write_text("keep me")
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out", str(out))
    assert code == 2 and "non-empty folder" in line
    assert [p.name for p in out.iterdir()] == ["precious.txt"]


def test_bad_formats(tmp_path, sinusoid_ckpt, capsys):
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out",
                          str(tmp_path / "a"), "--formats", "onnx,tflite")
    assert code == 2 and "tflite" in line and "onnx,torchscript,pt2" in line


def test_zero_steps_is_refused(tmp_path, sinusoid_ckpt, capsys):
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out",
                          str(tmp_path / "a"), "--steps", "0")
    assert code == 2 and line.startswith("error: --steps must be >= 1, got 0")
    assert list(tmp_path.iterdir()) == []


def test_verification_failure_leaves_nothing(tmp_path, sinusoid_ckpt, capsys, monkeypatch):
    """A gradient bug of the kind onnxscript's nll_loss_forward causes (gradients N times too
    large) must stop the export with the measured difference."""
    true_grad = export.trace.func_grad

    def doubled(loss_of, params):
        return tuple(2 * g for g in true_grad(loss_of, params))

    monkeypatch.setattr(export.trace, "func_grad", doubled)
    out = tmp_path / "adapter"
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out", str(out),
                          "--formats", "torchscript", "--steps", "2", "--tasks", "1")
    assert code == 2 and line.startswith("error: verification failed: max |difference| ")
    assert "torchscript" in line and "nothing was written" in line
    assert list(tmp_path.iterdir()) == []  # neither the adapter nor its temporary folder


def test_existing_adapter_is_replaced(tmp_path, sinusoid_ckpt, capsys):
    out = tmp_path / "adapter"
    for steps in ("1", "2"):
        code, _ = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out", str(out),
                           "--formats", "torchscript", "--steps", steps, "--tasks", "1")
        assert code == 0
    assert '"steps": 2' in (out / "adapter.json").read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_unsupported_operator_is_named(tmp_path, capsys):
    ckpt = train_one_iteration(tmp_path / "u.pt", "--model", "tests.export_models:ceil_avgpool_mlp")
    code, line = run_main(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"),
                          "--formats", "onnx", "--steps", "1")
    assert code == 2
    assert line == ("error: cannot export to ONNX: operator aten.avg_pool2d_backward has no "
                    "ONNX translation; --formats torchscript,pt2 writes the other formats")
    assert not [p for p in tmp_path.iterdir() if not p.name.startswith("u.")]


def test_a_fixed_number_of_examples_is_refused_with_its_line(tmp_path, capsys):
    """A forward that loops over its examples in Python cannot take another support size; the
    refusal points at the line of the model that fixed it."""
    ckpt = train_one_iteration(tmp_path / "p.pt", "--model", "tests.export_models:per_example_mlp")
    code, line = run_main(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript", "--steps", "1")
    assert code == 2
    assert line.startswith("error: the model fixes the number of examples of support_x while "
                           "tracing (at export_models.py:")
    assert "in forward: `return torch.stack([self.body(x[i]) for i in range(x.shape[0])])" in line
    assert line.endswith("; the adapter needs a model whose batch size can vary")
    assert not (tmp_path / "a").exists()


def test_a_random_forward_is_refused(tmp_path, capsys):
    """Dropout is turned off for the adapter; any other randomness would make its outputs (and
    the float32 noise the check measures) meaningless, so the export stops and says why."""
    ckpt = train_one_iteration(tmp_path / "n.pt", "--model", "tests.export_models:noisy_mlp")
    code, line = run_main(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript", "--steps", "1")
    assert code == 2
    assert line.startswith("error: the model's forward is random") and "dropout" in line
    assert not (tmp_path / "a").exists()


def test_a_forward_that_changes_a_buffer_is_named(tmp_path, capsys):
    """It trains (with the higher engine), but the adapter cannot keep the side effect: the
    refusal names the buffer update, not torch.func's words about captured tensors."""
    ckpt = train_one_iteration(tmp_path / "c.pt", "--model", "tests.export_models:counting_mlp",
                               "--engine", "higher")
    code, line = run_main(capsys, "--checkpoint", str(ckpt), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript", "--steps", "1")
    assert code == 2
    assert line.startswith("error: cannot trace the adaptation routine: the model's forward "
                           "changes a buffer in place")
    assert not (tmp_path / "a").exists()


def test_infinite_step_size_is_refused(tmp_path, sinusoid_ckpt, capsys):
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out",
                          str(tmp_path / "a"), "--inner-lr", "inf")
    assert code == 2 and line == "error: --inner-lr must be a finite number > 0, got inf"


def test_diverged_weights_are_named_not_hidden(tmp_path, sinusoid_ckpt, capsys):
    """NaN weights (a diverged run) used to pass through max(0.0, nan) == 0.0 and end in a
    "verification failed: max |difference| 0.00e+00" that named nothing."""
    state = torch.load(sinusoid_ckpt, weights_only=True)
    first = next(iter(state["model"]["state_dict"]))
    state["model"]["state_dict"][first].fill_(float("nan"))
    nan_ckpt = tmp_path / "nan.pt"
    torch.save(state, nan_ckpt)
    code, line = run_main(capsys, "--checkpoint", str(nan_ckpt), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript", "--tasks", "1")
    assert code == 2 and "inner loop gives non-finite outputs" in line, line
    assert not (tmp_path / "a").exists()


def test_own_files_in_an_adapter_folder_are_refused_not_deleted(tmp_path, sinusoid_ckpt, capsys):
    out = tmp_path / "adapter"
    args = ["--checkpoint", str(sinusoid_ckpt), "--out", str(out), "--formats", "torchscript",
            "--tasks", "1"]
    assert run_main(capsys, *args)[0] == 0
    (out / "NOTES.txt").write_text("mine")
    code, line = run_main(capsys, *args)
    assert code == 2 and "holds files an export does not write (NOTES.txt)" in line
    assert (out / "NOTES.txt").read_text() == "mine" and (out / "adapter.json").is_file()


def test_sigterm_mid_export_leaves_nothing_behind(tmp_path, sinusoid_ckpt):
    """SIGTERM unwinds like Ctrl-C: the half-written temporary folder is removed."""
    out = tmp_path / "adapter"
    proc = subprocess.Popen(
        [sys.executable, "-m", "export", "--checkpoint", str(sinusoid_ckpt), "--out", str(out)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list(tmp_path.glob(".adapter.*.tmp")) and time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert err.strip().splitlines()[-1] == "stopped: terminated (SIGTERM)"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("formats, module, name", [
    ("onnx", torch.export, "export"),  # torch.onnx catches Exception to try its next strategy
    ("pt2", torch.export, "export"),
    ("torchscript", torch.jit, "script"),
    ("torchscript", export.trace, "make_fx"),
])
def test_a_stop_inside_a_library_call_is_a_stop_not_an_error(tmp_path, sinusoid_ckpt, capsys,
                                                              monkeypatch, formats, module, name):
    """SIGTERM raises `Stopped` wherever Python is; no `except Exception` may turn it into an
    export error (exit 2) instead of a stop (exit 143)."""
    def terminated(*args, **kwargs):
        raise Stopped("terminated (SIGTERM)", signal.SIGTERM)

    monkeypatch.setattr(module, name, terminated)
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out",
                          str(tmp_path / "a"), "--formats", formats, "--no-verify")
    assert (code, line) == (143, "stopped: terminated (SIGTERM)")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("out", [".", "sub/.."])
def test_the_current_folder_as_out_is_refused_up_front(tmp_path, sinusoid_ckpt, capsys,
                                                       monkeypatch, out):
    """`--out .` has no parent to build beside and would replace the folder the user is in."""
    (tmp_path / "sub").mkdir()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(export.build, "write_formats", None)  # never reached
    code, line = run_main(capsys, "--checkpoint", str(sinusoid_ckpt), "--out", out,
                          "--formats", "torchscript", "--no-verify")
    assert code == 2 and line == (f"error: --out {out} is or holds the current folder, which "
                                  "the export would replace whole; give a new folder, such as "
                                  "--out adapter")
    assert [p.name for p in tmp_path.iterdir()] == ["sub"]


def test_missing_omniglot_data_names_an_option_export_has(tmp_path, capsys):
    """export has --data-root but no --download: the hint may not send the user to a flag it
    would refuse."""
    missing = tmp_path / "nowhere"
    code, line = run_main(capsys, "--checkpoint", str(OMNIGLOT_CKPT), "--data-root",
                          str(missing), "--out", str(tmp_path / "a"))
    assert code == 2 and line.startswith(f"error: no Omniglot data under {missing}: ")
    assert "--data-root" in line and "pass --download" not in line, line


@pytest.mark.parametrize("corrupt, problem", [
    (lambda s: s["config"].update(eval_inner_steps="x"),
     "config['eval_inner_steps'] is 'x', not int or None"),
    (lambda s: s.update(config="oops"), "its config is a str, not a dict of settings"),
    (lambda s: s["config"].update(dataset=3), "config['dataset'] is 3, not str"),
])
def test_a_config_with_bad_values_is_a_corrupt_checkpoint(tmp_path, sinusoid_ckpt, capsys,
                                                          corrupt, problem):
    state = torch.load(sinusoid_ckpt, weights_only=True)
    corrupt(state)
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, line = run_main(capsys, "--checkpoint", str(bad), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript", "--data-root", str(tmp_path))
    assert code == 2 and line == (f"error: {bad} is an incomplete or corrupt checkpoint: "
                                  f"{problem}; use another checkpoint of the run or train again")
    assert list(tmp_path.iterdir()) == [bad]


@pytest.mark.parametrize("setting, value, line", [
    ("inner_lr", float("nan"), "--inner-lr must be >= 0 and finite (a step size down the support "
                               "loss), got nan"),
    ("meta_lr", float("inf"), "--meta-lr must be > 0 and finite, got inf"),
    ("dataset", "cifar", "unknown dataset 'cifar'; choose one of sinusoid, harmonic, omniglot, "
                            "folder, or name your own task source as package.module:factory"),
])
def test_a_stored_setting_no_run_can_use_is_one_line(tmp_path, sinusoid_ckpt, capsys, setting,
                                                     value, line):
    """Right type, unusable value (a damaged or hand-edited checkpoint): refused by name, not a
    traceback from deep inside, nor NaN results."""
    state = torch.load(sinusoid_ckpt, weights_only=True)
    state["config"][setting] = value
    bad = tmp_path / "bad.pt"
    torch.save(state, bad)
    code, said = run_main(capsys, "--checkpoint", str(bad), "--out", str(tmp_path / "a"),
                          "--formats", "torchscript")
    assert (code, said) == (2, f"error: {line}")
    assert not (tmp_path / "a").exists()
