"""The exporter's parity rule: an absolute bound, widened only by the reference's own float32 error.

The formats are replaced by fake runners that return the reference plus a known offset, so the
rule itself is what is tested (the real formats are checked in tests/test_export.py).
"""

import numpy as np
import pytest

import export.verify as verify_module
from export.verify import TOLERANCE, float32_error, reference, sample_tasks, verify
from maml.config import Config
from maml.experiment import build


@pytest.fixture(scope="module")
def setup():
    exp = build(Config(dataset="sinusoid", k_shot=5, inner_steps=3).with_defaults())
    return exp, exp.cfg.inner_loop(), sample_tasks(exp, 2, seed=0)


def check(setup, monkeypatch, offset: float, noise: float | None = None) -> dict:
    """verify() with one fake format whose outputs are the reference + `offset`."""
    exp, inner, tasks = setup

    def run(sx, sy, qx):  # the task is found again by its support inputs
        task = next(t for t in tasks if np.array_equal(t.support_x[0].numpy(), sx))
        ref = reference(exp, None, inner, task)
        return [ref + offset, ref + offset]

    monkeypatch.setattr(verify_module, "runners", lambda folder, files: {"onnx": run})
    if noise is not None:
        monkeypatch.setattr(verify_module, "float32_error", lambda *args: noise)
    return verify(exp, None, inner, folder=None, files={}, tasks=tasks)


def test_a_well_conditioned_reference_is_close_to_float64(setup):
    exp, inner, tasks = setup
    errors = [float32_error(exp, None, inner, t, reference(exp, None, inner, t)) for t in tasks]
    assert all(0 < e < 1e-5 for e in errors), errors  # measured, and tiny: sinusoid MLP


def test_within_the_absolute_bound_passes(setup, monkeypatch):
    result = check(setup, monkeypatch, TOLERANCE / 2)
    assert result["passed"] and result["reference_float32_error"] == []


def test_beyond_it_fails_when_the_reference_is_precise(setup, monkeypatch):
    result = check(setup, monkeypatch, 5 * TOLERANCE)  # real float32 error: under 1e-5
    assert not result["passed"] and result["max_abs_diff"]["onnx"] == pytest.approx(5 * TOLERANCE, rel=1e-3)


def test_an_ill_conditioned_reference_widens_the_bound_to_twice_its_error(setup, monkeypatch):
    assert check(setup, monkeypatch, 5 * TOLERANCE, noise=3 * TOLERANCE)["passed"]
    result = check(setup, monkeypatch, 5 * TOLERANCE, noise=2 * TOLERANCE)
    assert not result["passed"] and result["reference_float32_error"] == [2 * TOLERANCE] * 4
