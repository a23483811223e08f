"""The library API as the README shows it: its example runs as written, and `maml` stays light."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maml
from maml.adaptation import use_batch_statistics
from maml.models import sinusoid_mlp
from maml.tasks.regression import Sinusoid

ROOT = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    blocks = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    found = [b for b in blocks if "maml.train(" in b and "maml.meta_gradient(" in b]
    assert len(found) == 1, "the README's library example (maml.train, maml.meta_gradient)"
    return found[0]


def test_the_readme_library_example_runs(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md", "exec"), {})
    mse = float(capsys.readouterr().out.strip().splitlines()[-1])
    assert 0 < mse < 3  # an untrained sinusoid MLP is near 3-4 after 10 steps
    assert (tmp_path / "runs" / "lib.pt").is_file()


def test_evaluate_equals_the_command_line(tmp_path, capsys):
    import json

    from maml.__main__ import main

    cfg = maml.Config(dataset="sinusoid", iterations=20, checkpoint=str(tmp_path / "a.pt"),
                      val_every=20, log_every=10)
    result = maml.train(cfg, progress=False)
    assert result["iterations"] == 20
    ours = maml.evaluate(str(tmp_path / "a.pt"), tasks=10, seed=3)
    assert main(["eval", "--checkpoint", str(tmp_path / "a.pt"), "--tasks", "10", "--seed", "3",
                 "--json", "--quiet"]) == 0
    cli = json.loads(capsys.readouterr().out)
    assert ours["mean"] == pytest.approx(cli["mean"], rel=1e-12)
    assert ours["one_at_a_time"] == pytest.approx(cli["one_at_a_time"], rel=1e-12)


def test_meta_gradient_takes_step_sizes_as_a_keyword_and_both_engines_agree():
    torch.manual_seed(0)
    model = use_batch_statistics(sinusoid_mlp(hidden=8).double())
    batch = Sinusoid(k_shot=5, q_query=5).sample(3, torch.Generator().manual_seed(1))
    batch = batch.to("cpu", torch.float64)
    n = len(list(model.parameters()))
    lrs = torch.nn.Parameter(torch.full((2, n), 0.02, dtype=torch.float64))
    inner = maml.InnerLoop("mse", 2, 0.02)
    grads = {}
    for engine in ("higher", "batched"):
        model.zero_grad()
        lrs.grad = None
        maml.meta_gradient(model, batch, inner, step_sizes=lrs, engine=engine)
        grads[engine] = torch.cat([p.grad.flatten() for p in model.parameters()] + [lrs.grad.flatten()])
    assert torch.allclose(grads["higher"], grads["batched"], rtol=1e-10, atol=1e-14)
    with pytest.raises(ValueError, match="unknown engine 'fast'"):
        maml.meta_gradient(model, batch, inner, engine="fast")


def test_importing_maml_imports_no_torch():
    code = "import sys, maml, maml.images; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                         check=True).stdout
    assert out.strip() == "False"
