"""The command line: train, eval --json, resume, and one-line errors for bad input."""

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from maml.__main__ import command_help, main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "maml", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)


@pytest.fixture(scope="module")
def sinusoid_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "s.pt"
    assert main(["train", "--iterations", "6", "--meta-batch-size", "3", "--checkpoint", str(path),
                 "--val-every", "3", "--log-every", "3", "--val-tasks", "5", "--quiet"]) == 0
    return path


def test_train_then_eval_json_end_to_end(tmp_path):
    ckpt = tmp_path / "run" / "m.pt"
    train = run_cli("train", "--dataset", "harmonic", "--iterations", "4", "--meta-batch-size", "2",
                    "--checkpoint", str(ckpt), "--val-every", "2", "--log-every", "2",
                    "--val-tasks", "4", "--quiet")
    assert train.returncode == 0, train.stderr
    assert "trained 4 of 4 iterations" in train.stdout
    evaluation = run_cli("eval", "--checkpoint", str(ckpt), "--tasks", "7", "--inner-steps", "2",
                         "--k-shot", "5", "--json")
    assert evaluation.returncode == 0, evaluation.stderr
    result = json.loads(evaluation.stdout)  # the JSON alone, so programs can read it
    assert result["metric"] == "mse" and result["tasks"] == 7 and result["inner_steps"] == 2
    assert result["mean"] > 0 and result["ci95"] > 0 and "before" in result
    assert "Traceback" not in evaluation.stderr


def test_resume_flag_continues_from_the_checkpoint(tmp_path, capsys):
    ckpt = str(tmp_path / "r.pt")
    common = ["--checkpoint", ckpt, "--meta-batch-size", "2", "--log-every", "2", "--val-every", "4",
              "--val-tasks", "3", "--quiet"]
    assert main(["train", "--iterations", "2", *common]) == 0
    assert main(["train", "--iterations", "4", "--resume", *common]) == 0
    assert torch.load(ckpt, weights_only=True)["iteration"] == 4
    assert "--iterations 3 is fewer than the 4 the run" in bad(
        capsys, "train", "--iterations", "3", "--resume", *common)


def test_resume_takes_a_new_schedule_and_refuses_a_new_setting(tmp_path, capsys):
    """How a run is driven may change between slots; what it learns with may not, and a flag
    that would change it is refused by name, not silently ignored."""
    ckpt = str(tmp_path / "r.pt")
    common = ["--checkpoint", ckpt, "--meta-batch-size", "2", "--val-tasks", "3", "--quiet",
              "--resume"]
    assert main(["train", "--iterations", "2", "--log-every", "1", "--val-every", "2",
                 *common[:-1]]) == 0
    line = bad(capsys, "train", "--iterations", "4", "--inner-lr", "0.5", *common)
    assert "--inner-lr 0.5 differs from the run being resumed (0.01 in" in line
    assert "--learn-inner-lr on differs" in bad(capsys, "train", "--learn-inner-lr", *common)
    assert torch.load(ckpt, weights_only=True)["iteration"] == 2  # nothing ran
    assert main(["train", "--iterations", "3", "--val-every", "1", "--inner-lr", "0.01",
                 "--engine", "higher", *common]) == 0  # the same inner lr is fine
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 3
    assert state["config"]["val_every"] == 1 and state["config"]["engine"] == "higher"
    lines = [json.loads(x) for x in Path(ckpt).with_suffix(".metrics.jsonl").read_text().splitlines()]
    assert [x["iteration"] for x in lines if "val_mse" in x] == [2, 3]  # validated at 3: every 1


def test_resume_compares_only_the_options_typed(tmp_path, capsys):
    """A run started with non-default settings resumes with the README's short command: the
    defaults of options not typed again are not "changes" (fire passes every default)."""
    ckpt = str(tmp_path / "r.pt")
    assert main(["train", "--seed", "3", "--model-kwargs", '{"hidden": 8}', "--iterations", "1",
                 "--meta-batch-size", "2", "--val-tasks", "2", "--checkpoint", ckpt,
                 "--quiet"]) == 0
    assert main(["train", "--checkpoint", ckpt, "--iterations", "2", "--resume", "--quiet"]) == 0
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 2 and state["config"]["seed"] == 3
    assert state["config"]["model_kwargs"] == {"hidden": 8}
    line = bad(capsys, "train", "--checkpoint", ckpt, "--iterations", "3", "--resume", "--seed", "0")
    assert "--seed 0 differs from the run being resumed (3 in" in line


def test_model_kwargs_are_json(tmp_path, monkeypatch):
    """JSON `false` and `null` reach the factory as False and None, in both spellings of the
    option (fire alone would pass the strings 'false' and 'null', and 'false' is true)."""
    (tmp_path / "json_kwargs_models.py").write_text(
        "from torch import nn\n"
        "def net(bias=True, width=None):\n"
        "    return nn.Sequential(nn.Linear(1, width or 4), nn.ReLU(), nn.Linear(width or 4, 1, bias=bias))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    common = ["--model", "json_kwargs_models:net", "--meta-batch-size", "2", "--val-tasks", "2",
              "--quiet"]
    for n, option in enumerate((["--model-kwargs", '{"bias": false, "width": null}'],
                                ['--model-kwargs={"bias": false, "width": null}'])):
        ckpt = str(tmp_path / f"j{n}.pt")
        assert main(["train", *option, *common, "--checkpoint", ckpt, "--iterations", "1"]) == 0
        state = torch.load(ckpt, weights_only=True)
        assert state["model"]["kwargs"] == {"bias": False, "width": None}
        assert "2.bias" not in state["model"]["state_dict"]
        assert main(["train", *option, *common, "--checkpoint", ckpt, "--iterations", "2",
                     "--resume"]) == 0  # the same JSON is the same setting
        assert torch.load(ckpt, weights_only=True)["iteration"] == 2


def test_a_factory_may_build_float64_weights(tmp_path, monkeypatch):
    """The run's --dtype decides, whatever dtype the factory's weights have."""
    (tmp_path / "f64_models.py").write_text(
        "from torch import nn\n"
        "def net():\n"
        "    return nn.Sequential(nn.Linear(1, 4), nn.ReLU(), nn.Linear(4, 1)).double()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    for dtype in ("float32", "float64"):
        ckpt = str(tmp_path / f"{dtype}.pt")
        assert main(["train", "--model", "f64_models:net", "--dtype", dtype, "--iterations", "1",
                     "--meta-batch-size", "2", "--val-tasks", "2", "--checkpoint", ckpt,
                     "--quiet"]) == 0
        weights = torch.load(ckpt, weights_only=True)["model"]["state_dict"].values()
        assert {w.dtype for w in weights} == {getattr(torch, dtype)}


def test_a_short_flag_names_one_option_or_is_refused(capsys):
    assert "-q is ambiguous for `train` (--q-query, --quiet)" in bad(capsys, "train", "-q", "5")
    assert "`train` has no option -z" in bad(capsys, "train", "-z", "5")
    assert "unknown command 'trian'; did you mean train?" in bad(capsys, "trian")


def test_omniglot_train_and_eval(tmp_path, capsys, monkeypatch, synthetic_omniglot):
    """Trained with a relative --data-root, the run evaluates from any folder (the path is kept
    absolute), and `eval --data-root` finds data that has moved since."""
    ckpt = str(tmp_path / "o.pt")
    relative = os.path.relpath(synthetic_omniglot, ROOT)
    monkeypatch.chdir(ROOT)
    args = ["train", "--dataset", "omniglot", "--meta-batch-size", "2", "--model-kwargs",
            '{"hidden": 8}', "--checkpoint", ckpt, "--val-every", "2", "--log-every", "1",
            "--val-tasks", "4", "--data-root", relative, "--quiet"]
    assert main([*args, "--iterations", "1"]) == 0
    for iterations in ("2", "3"):  # "the same command with --resume", again and again
        assert main([*args, "--iterations", iterations, "--resume"]) == 0, capsys.readouterr().err
    state = torch.load(ckpt, weights_only=True)
    assert state["iteration"] == 3 and state["config"]["model_kwargs"] == {"hidden": 8}
    assert set(state["split"]) == {"train", "val", "test"}
    assert state["model"]["kwargs"] == {"hidden": 8, "n_way": 5}
    assert Path(state["config"]["data_root"]).samefile(synthetic_omniglot)
    assert Path(state["config"]["data_root"]).is_absolute()
    monkeypatch.chdir(tmp_path)
    capsys.readouterr()
    assert main(["eval", "--checkpoint", ckpt, "--tasks", "5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["metric"] == "accuracy" and 0 <= result["mean"] <= 1 and result["inner_steps"] == 3
    (tmp_path / "moved").symlink_to(synthetic_omniglot)
    assert main(["eval", "--checkpoint", ckpt, "--tasks", "5", "--json",
                 "--data-root", "moved"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == result
    assert f"no Omniglot data under {tmp_path / 'gone'}:" in bad(capsys, "eval", "--checkpoint",
                                                                ckpt, "--data-root", "gone")


def test_a_failed_download_is_one_line_and_leaves_no_empty_data_folder(tmp_path, capsys,
                                                                      monkeypatch):
    """Offline, `--download` once left `<data root>/omniglot-py/` behind, which later runs took
    for data. (urlopen is replaced: nothing may download during the tests.)"""
    import urllib.error
    import urllib.request

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network in the tests")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    root = tmp_path / "data" / "omniglot"
    line = bad(capsys, "train", "--dataset", "omniglot", "--download", "--data-root", str(root),
               "--iterations", "1", "--checkpoint", str(tmp_path / "o.pt"), "--quiet")
    assert line.startswith(f"error: cannot download Omniglot into {root} (")
    assert not (tmp_path / "data").exists() and not (tmp_path / "o.pt").exists()


def bad(capsys, *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_bad_training_input_is_one_clear_line(tmp_path, capsys):
    ck = ["--checkpoint", str(tmp_path / "x.pt"), "--iterations", "1", "--quiet"]
    assert "unknown dataset 'mnist'" in bad(capsys, "train", "--dataset", "mnist", *ck)
    assert "--n-way is for Omniglot" in bad(capsys, "train", "--n-way", "5", *ck)
    assert "neither a built-in" in bad(capsys, "train", "--model", "resnet", *ck)
    assert "cannot import 'no_such_pkg.mod'" in bad(capsys, "train", "--model", "no_such_pkg.mod:f", *ck)
    assert "has no callable 'nope'" in bad(capsys, "train", "--model", "maml.models:nope", *ck)
    assert "must be a JSON object" in bad(capsys, "train", "--model-kwargs", "[1, 2]", *ck)
    assert "rejected its arguments" in bad(capsys, "train", "--model-kwargs", '{"depth": 3}', *ck)
    assert "returns a tuple, not one tensor" in bad(
        capsys, "train", "--model", "tests.export_models:tuple_output_mlp", *ck)
    assert "returns shape (2, 3) for 2 examples, but the tasks need (2, 1)" in bad(
        capsys, "train", "--model-kwargs", '{"out_features": 3}', *ck)
    frozen = "tests.export_models:frozen_first_layer_mlp"
    assert "frozen parameters (0.weight, 0.bias)" in bad(capsys, "train", "--model", frozen, *ck)
    for factory, message in (("failing_factory", "raised RuntimeError: weights file not found"),
                             ("parameterless", "the model has no parameters"),
                             ("integer_output", "returns torch.int64 outputs")):
        assert message in bad(capsys, "train", "--model", f"tests.export_models:{factory}", *ck)
    omni = ["train", "--dataset", "omniglot", *ck]
    assert "only 20 drawings" in bad(capsys, *omni, "--k-shot", "10", "--q-query", "15")
    assert "exceeds the 423 classes" in bad(capsys, *omni, "--n-way", "424", "--val-chars", "800")
    assert "--val-chars must be in [1, 1200), got 0" in bad(capsys, *omni, "--val-chars", "0")
    assert "no Omniglot data under" in bad(capsys, *omni, "--data-root", str(tmp_path / "none"))
    assert "no CUDA GPU" in bad(capsys, "train", "--device", "cuda", *ck) or torch.cuda.is_available()


def test_option_typos_and_wrong_types_stop_before_anything_runs(tmp_path, capsys, monkeypatch):
    ckpt = tmp_path / "x.pt"
    ck = ["--checkpoint", str(ckpt), "--quiet"]
    # fire alone would train first and complain about the unknown option afterwards
    assert "no option --itertions; did you mean --iterations?" in bad(
        capsys, "train", "--itertions", "5", *ck)
    assert not ckpt.exists() and not list(tmp_path.iterdir())
    assert "--iterations must be an integer, got 'abc'" in bad(capsys, "train", "--iterations", "abc", *ck)
    assert "--iterations must be an integer, got 5.5" in bad(capsys, "train", "--iterations=5.5", *ck)
    assert "--meta-lr must be a number, got 'x'" in bad(capsys, "train", "--meta-lr", "x", *ck)
    assert "--checkpoint needs a value" in bad(capsys, "train", "--iterations", "1", "--checkpoint")
    assert "--first-order is a switch" in bad(capsys, "train", "--first-order", "3", *ck)
    assert "--inner-lr must be >= 0" in bad(capsys, "train", "--inner-lr", "-0.1", *ck)
    assert "--grad-clip must be > 0" in bad(capsys, "train", "--grad-clip", "-1", *ck)
    assert "--val-tasks must be >= 1" in bad(capsys, "train", "--val-tasks", "0", *ck)
    assert "no option --outt; did you mean --out?" in bad(capsys, "plot", str(ckpt), "--outt", "a")
    assert not list(tmp_path.iterdir())
    # a path that fire reads as a number is still a path
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--checkpoint", "2024", "--iterations=2", "--meta-batch-size", "2",
                 "--val-tasks", "2", "--quiet", "--nofirst-order"]) == 0
    assert torch.load(tmp_path / "2024", weights_only=True)["iteration"] == 2


def test_no_dash_switches_and_missing_required_options(tmp_path, capsys):
    """`--no-first-order` (the spelling `--help` suggests elsewhere) turns a switch off; fire
    alone would train the whole run and then fail on it. A missing required option is one line
    before anything runs, not fire's usage block."""
    ckpt = tmp_path / "m.pt"
    args = ["--iterations", "2", "--meta-batch-size", "2", "--val-tasks", "2", "--quiet",
            "--checkpoint", str(ckpt)]
    assert main(["train", "--first-order", *args]) == 0
    assert torch.load(ckpt, weights_only=True)["config"]["first_order"] is True
    assert main(["train", "--no-first-order", "--overwrite", *args]) == 0
    assert torch.load(ckpt, weights_only=True)["config"]["first_order"] is False
    capsys.readouterr()
    assert "`eval` needs --checkpoint CHECKPOINT" in bad(capsys, "eval", "--tasks", "3")
    assert main(["eval", str(ckpt), "--tasks", "2", "--json"]) == 0  # positional is fine


def test_a_path_that_cannot_be_written_is_one_line(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    line = bad(capsys, "train", "--checkpoint", str(blocker / "sub" / "m.pt"), "--iterations", "1",
               "--quiet")
    assert f"{blocker} is a file, not a folder; choose another --checkpoint path" in line
    assert blocker.read_text() == "not a folder"


def test_bad_checkpoints_are_one_clear_line(tmp_path, capsys, sinusoid_ckpt):
    assert "does not exist" in bad(capsys, "eval", "--checkpoint", str(tmp_path / "missing.pt"))
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(sinusoid_ckpt.read_bytes()[:2000])
    assert "not a readable checkpoint" in bad(capsys, "eval", "--checkpoint", str(truncated))
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    assert "not a readable checkpoint" in bad(capsys, "eval", "--checkpoint", str(text))
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    assert "not a maml-toolkit checkpoint" in bad(capsys, "eval", "--checkpoint", str(foreign))
    state = torch.load(sinusoid_ckpt, weights_only=True)
    state["model"]["state_dict"]["0.weight"] = torch.zeros(7, 1)
    misfit = tmp_path / "misfit.pt"
    torch.save(state, misfit)
    assert "do not fit the model" in bad(capsys, "eval", "--checkpoint", str(misfit))
    assert "--tasks must be >= 1" in bad(capsys, "eval", "--checkpoint", str(sinusoid_ckpt),
                                         "--tasks", "0")
    assert "--k-shot must be >= 1" in bad(capsys, "eval", "--checkpoint", str(sinusoid_ckpt),
                                          "--k-shot", "0")
    assert "--batch-size must be >= 1" in bad(capsys, "eval", "--checkpoint", str(sinusoid_ckpt),
                                              "--batch-size", "0")  # was an endless loop


def test_exit_status_and_no_traceback_from_a_real_process(tmp_path):
    result = run_cli("eval", "--checkpoint", str(tmp_path / "missing.pt"))
    assert result.returncode == 2
    assert result.stderr.strip().startswith("error: ") and "Traceback" not in result.stderr


def test_one_task_has_no_confidence_interval_rather_than_a_zero_one(capsys, sinusoid_ckpt):
    """A single task has no spread to estimate: "+- 0.0000" would claim certainty."""
    common = ["eval", "--checkpoint", str(sinusoid_ckpt), "--quiet"]
    assert main([*common, "--tasks", "1", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tasks"] == 1 and result["ci95"] is None and result["before"]["ci95"] is None
    assert main([*common, "--tasks", "1"]) == 0
    sentence = capsys.readouterr().out
    assert "+-" not in sentence and "one task: no confidence interval" in sentence
    assert main([*common, "--tasks", "2"]) == 0
    two = capsys.readouterr().out
    assert two.count("+-") == 3 and "no confidence interval" not in two  # together, alone, before


def test_plot_draws_the_learning_curves(tmp_path, capsys, sinusoid_ckpt):
    out = tmp_path / "curves.png"
    assert main(["plot", "--checkpoint", str(sinusoid_ckpt), "--out", str(out)]) == 0
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    assert "no metrics file" in bad(capsys, "plot", "--checkpoint", str(tmp_path / "none.pt"))
    assert "give a .png, .pdf or .svg file name" in bad(
        capsys, "plot", "--checkpoint", str(sinusoid_ckpt), "--out", str(tmp_path / "c.txt"))
    (tmp_path / "empty.metrics.jsonl").write_text("")
    assert "has no metric lines yet" in bad(capsys, "plot", "--checkpoint",
                                            str(tmp_path / "empty.pt"))


def test_ctrl_c_stops_a_real_run_with_a_checkpoint_and_one_line(tmp_path):
    ckpt = tmp_path / "m.pt"
    metrics = tmp_path / "m.metrics.jsonl"
    run = subprocess.Popen(
        [sys.executable, "-m", "maml", "train", "--iterations", "1000000", "--meta-batch-size", "2",
         "--log-every", "10", "--val-every", "1000000", "--checkpoint-every", "1000000",
         "--checkpoint", str(ckpt), "--quiet"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    started = time.monotonic()
    while not (metrics.is_file() and metrics.read_text().count("\n") >= 2):
        assert run.poll() is None and time.monotonic() - started < 120, run.communicate()
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, err = run.communicate(timeout=120)
    assert run.returncode == 130 and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("stopped: SIGINT after iteration ") and "--resume" in last, err
    at = int(re.search(r"after iteration (\d+)", last).group(1))
    assert torch.load(ckpt, weights_only=True)["iteration"] == at >= 20
    logged = [json.loads(line)["iteration"] for line in metrics.read_text().splitlines()]
    assert logged[-1] <= at
    assert main(["train", "--checkpoint", str(ckpt), "--resume", "--iterations", str(at + 3),
                 "--quiet"]) == 0
    assert torch.load(ckpt, weights_only=True)["iteration"] == at + 3


def test_ctrl_c_outside_training_is_one_line_and_status_130(capsys, sinusoid_ckpt, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("maml.evaluation.evaluate", interrupted)
    assert main(["eval", "--checkpoint", str(sinusoid_ckpt), "--quiet"]) == 130
    assert capsys.readouterr().err.strip() == "stopped: interrupted (Ctrl-C)"


@pytest.mark.parametrize("command", ["train", "eval", "plot", "data"])
def test_help_describes_every_option(command):
    """`--help` shows each option's description from the docstring's Args section, in the
    layout of `python -m export --help` (argparse's), so an option added without one fails here."""
    import inspect

    from maml.__main__ import CLI

    method = getattr(CLI, command)
    described = set(re.findall(r"^\s{12}(\w+): \S", method.__doc__, re.M))
    options = set(inspect.signature(method).parameters) - {"self"}
    assert described == options
    text = command_help(command)  # spelled as typed: --n-way, not fire's --n_way
    assert text.startswith(f"usage: python -m maml {command} [-h]") and "\noptions:\n" in text
    for name, parameter in inspect.signature(method).parameters.items():
        if name == "self":
            continue
        flag = f"--{name.replace('_', '-')}"
        switch = parameter.default is False
        assert re.search(rf"^  {flag}( {name.upper()})?( |$)", text, re.M), name
        assert (f"[{flag}]" if switch else f"{flag} {name.upper()}") in text, name
    assert not re.search(r"--\w+_\w+", text) and "Optional[" not in text
    if command == "eval":
        shown = run_cli(command, "--help")
        assert shown.returncode == 0 and shown.stdout.strip() == text.strip()
        assert "the run to evaluate" in shown.stdout and shown.stderr == ""
        assert "--tasks TASKS" in text and "(default: 600)" in text


def test_program_help_lists_the_commands():
    shown = run_cli("--help")
    assert shown.returncode == 0 and shown.stderr == ""
    assert shown.stdout.startswith("usage: python -m maml [-h] COMMAND ...")
    for command in ("train", "eval", "plot", "data"):
        assert re.search(rf"^\s+{command}\s+\S", shown.stdout, re.M), command


def test_the_three_programs_share_one_help_layout():
    """maml (fire underneath), export and serve (argparse): the same usage line, sections and
    `(default: X)` after an option's help."""
    from export.__main__ import parser as export_parser
    from serve.__main__ import parser as serve_parser

    texts = {"python -m maml train": command_help("train"),
             "python -m export": export_parser().format_help(),
             "python -m serve": serve_parser().format_help()}
    for prog, text in texts.items():
        assert text.startswith(f"usage: {prog} [-h] "), text[:80]
        assert "\noptions:\n  -h, --help            show this help message and exit\n" in text
        assert re.search(r"\(default: [^)]+\)", text), prog
        assert "(default: None)" not in text and "(default: False)" not in text, prog


def test_every_option_of_export_serve_and_reproduce_has_a_help_line():
    import importlib.util

    from export.__main__ import parser as export_parser
    from serve.__main__ import parser as serve_parser

    spec = importlib.util.spec_from_file_location("reproduce", ROOT / "scripts" / "reproduce.py")
    reproduce = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(reproduce)
    for make in (export_parser, serve_parser, reproduce.parser):
        bare = [a.dest for a in make()._actions if not (a.help or "").strip()]
        assert not bare, f"{make.__module__}: options without help: {bare}"


def test_plot_compares_several_runs_in_one_figure(tmp_path, capsys, monkeypatch, sinusoid_ckpt):
    other = tmp_path / "other" / sinusoid_ckpt.name  # the same file name: told apart by folder
    assert main(["train", "--iterations", "4", "--meta-batch-size", "2", "--checkpoint", str(other),
                 "--val-every", "2", "--log-every", "2", "--val-tasks", "3", "--quiet"]) == 0
    drawn = {}

    def record(runs, out, title=""):
        drawn.update(runs)
        return out

    monkeypatch.setattr("maml.curves.plot_curves", record)
    both = f"{sinusoid_ckpt},{other}"
    assert main(["plot", "--checkpoint", both, "--out", str(tmp_path / "c.png")]) == 0
    assert list(drawn) == [f"{sinusoid_ckpt.parent.name}/s", "other/s"]
    assert all(Path(p).is_file() for p in drawn.values())
    assert "the same run twice" in bad(capsys, "plot", "--checkpoint", f"{other},{other}")
    assert "no metrics file" in bad(capsys, "plot", "--checkpoint", f"{other},{tmp_path / 'x.pt'}")


def test_plot_keeps_runs_apart_by_their_dots_and_reads_a_cut_last_line(tmp_path, capsys):
    """lr0.01 and lr0.05 are two runs (only .pt is dropped); a metrics file whose last line a
    killed run cut short still plots, and a damaged line before it is one line."""
    record = {"iteration": 1, "seconds": 1.0, "loss": 1.0, "val_mse": 2.0}
    for name in ("lr0.01", "lr0.05"):
        (tmp_path / f"{name}.metrics.jsonl").write_text(json.dumps(record) + "\n"
                                                        + '{"iteration": 2, "seco')
    out = tmp_path / "both.png"
    runs = f"{tmp_path / 'lr0.01'},{tmp_path / 'lr0.05'}"
    assert main(["plot", "--checkpoint", runs, "--out", str(out)]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    damaged = tmp_path / "lr0.01.metrics.jsonl"
    damaged.write_text('{"iteration": 1, "seco\n' + json.dumps(record) + "\n")
    capsys.readouterr()
    assert main(["plot", "--checkpoint", str(tmp_path / "lr0.01"), "--out", str(out)]) == 2
    assert capsys.readouterr().err.strip() == (
        f"error: {damaged}, line 1, is not a metrics record (damaged file); delete that line "
        "and plot again")


def test_a_tilde_after_an_equals_sign_is_the_home_folder(tmp_path, monkeypatch, capsys):
    """`--checkpoint=~/run.pt` reaches us unexpanded (no shell expands ~ after =)."""
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--iterations", "1", "--checkpoint=~/run.pt", "--quiet"]) == 0
    assert (tmp_path / "home" / "run.pt").is_file() and not (tmp_path / "~").exists()
    assert main(["eval", "--checkpoint=~/run.pt", "--tasks", "2", "--quiet"]) == 0
    assert main(["plot", "--checkpoint=~/run.pt", "--out=~/c.png"]) == 0
    assert (tmp_path / "home" / "c.png").is_file()
