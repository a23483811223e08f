"""The exporter's parity rule: an absolute bound, widened only by a task's measured float32 noise.

The formats are replaced by fake runners that return the reference plus a known offset, so the
rule itself is what is tested (the real formats are checked in tests/test_export.py).
"""

import dataclasses

import numpy as np
import pytest
import torch

import export.verify as verify_module
from export.verify import TOLERANCE, Noise, reference, sample_tasks, task_noise, verify
from maml.config import Config
from maml.experiment import build


@pytest.fixture(scope="module")
def setup():
    exp = build(Config(dataset="sinusoid", k_shot=5, inner_steps=3).with_defaults())
    return exp, exp.cfg.inner_loop(), sample_tasks(exp, 2, seed=0)


def check(setup, monkeypatch, offset: float, noise: Noise | None = None) -> dict:
    """verify() with one fake format whose outputs are the reference + `offset`."""
    exp, inner, tasks = setup

    def run(sx, sy, qx):  # the task is found again by its support inputs
        task = next(t for t in tasks if np.array_equal(t.support_x[0].numpy(), sx))
        ref = reference(exp, None, inner, task)
        return [ref + offset, ref + offset, ref + offset]  # together, predict(adapt), alone

    monkeypatch.setattr(verify_module, "runners", lambda folder, files: {"onnx": run})
    if noise is not None:
        monkeypatch.setattr(verify_module, "task_noise", lambda *args: noise)
    return verify(exp, None, inner, folder=None, files={}, tasks=tasks)


def test_a_well_conditioned_task_has_a_tiny_measured_noise(setup):
    exp, inner, tasks = setup
    for task in tasks:  # sinusoid MLP: close to float64, and barely moved by the perturbation
        noise = task_noise(exp, None, inner, task, reference(exp, None, inner, task))
        assert 0 < noise.float32_error < 1e-5 and 0 < noise.perturbation_spread < 1e-5, noise
        assert noise.scale == max(noise.float32_error, noise.perturbation_spread)
        assert noise.predictions is None  # regression: no classes to compare


def test_the_noise_also_moves_the_weights(setup):
    """All-zero support inputs do not move under a relative jitter of the images, yet the
    float64 loop still moves when the weights do: that spread is part of the noise (a 20-way
    checkpoint's ONNX adapter differed by exactly such a weight-direction near-tie)."""
    exp, inner, tasks = setup
    zeros = dataclasses.replace(tasks[0], support_x=tasks[0].support_x * 0)
    before = [p.clone() for p in exp.model.parameters()]
    noise = task_noise(exp, None, inner, zeros, reference(exp, None, inner, zeros))
    assert 0 < noise.perturbation_spread < 1e-4, noise
    assert all(torch.equal(a, b) for a, b in zip(before, exp.model.parameters()))  # untouched


def test_within_the_absolute_bound_passes(setup, monkeypatch):
    result = check(setup, monkeypatch, TOLERANCE / 2)
    assert result["passed"] and result["ill_conditioned"] == []


def test_beyond_it_fails_when_the_task_is_well_conditioned(setup, monkeypatch):
    result = check(setup, monkeypatch, 5 * TOLERANCE)  # measured noise: under 1e-5
    assert not result["passed"] and result["max_abs_diff"]["onnx"] == pytest.approx(5 * TOLERANCE, rel=1e-3)
    assert result["ill_conditioned"] == []


@pytest.mark.parametrize("source", ["float32_error", "perturbation_spread"])
def test_an_ill_conditioned_task_widens_the_bound_to_twice_its_noise(setup, monkeypatch, source):
    def noise(scale):
        return Noise(**{"float32_error": 0.0, "perturbation_spread": 0.0, source: scale},
                     predictions=None)

    assert check(setup, monkeypatch, 5 * TOLERANCE, noise(3 * TOLERANCE))["passed"]
    result = check(setup, monkeypatch, 5 * TOLERANCE, noise(2 * TOLERANCE))
    assert not result["passed"] and len(result["ill_conditioned"]) == 4
    assert result["ill_conditioned"][0][source] == 2 * TOLERANCE


REF = np.array([[1.0, 0.99999, 0.0], [0.0, 2.0, 0.0]], dtype=np.float32)


def classify(monkeypatch, setup, exported: np.ndarray, predictions: np.ndarray | None,
             noise_scale: float = 0.0) -> dict:
    """verify() on a fake 3-class task: reference logits `REF`, the format returns `exported`,
    the measured noise allows the predictions `predictions` (runs, queries)."""
    exp, _, tasks = setup
    inner = dataclasses.replace(setup[1], loss="cross_entropy")
    monkeypatch.setattr(verify_module, "reference", lambda *args: REF)
    monkeypatch.setattr(verify_module, "runners",
                        lambda folder, files: {"onnx": lambda *a: [exported] * 3})
    noise = Noise(noise_scale, 0.0, predictions)
    monkeypatch.setattr(verify_module, "task_noise", lambda *args: noise)
    return verify(exp, None, inner, folder=None, files={}, tasks=tasks[:1])


def test_a_near_tie_may_go_the_way_the_exact_loop_goes(setup, monkeypatch):
    flipped = REF + np.array([[0, 2e-5, 0], [0, 0, 0]], dtype=np.float32)  # query 0 -> class 1
    exact_goes = np.array([[0, 1], [1, 1], [0, 1]])  # float32 ref, float64, a perturbed run
    result = classify(monkeypatch, setup, flipped, exact_goes)
    assert result["passed"] and result["argmax_equal"] == {"onnx": True}


def test_a_prediction_the_inner_loop_never_makes_fails(setup, monkeypatch):
    flipped = REF + np.array([[0, 2e-5, 0], [0, 0, 0]], dtype=np.float32)
    never = np.array([[0, 1], [0, 1], [0, 1]])  # every run of the inner loop says class 0
    result = classify(monkeypatch, setup, flipped, never)
    assert not result["passed"] and result["argmax_equal"] == {"onnx": False}
    wrong = REF + np.array([[0, 0, 0], [0, 0, 3.0]], dtype=np.float32)  # far beyond the bound
    assert not classify(monkeypatch, setup, wrong, np.array([[0, 2]] * 3), 1e-5)["passed"]


def test_the_bound_is_relative_for_outputs_beyond_one(setup, monkeypatch):
    """float32 rounding is relative: 20-way logits near 10 differ by 1.5e-4 between onnxruntime
    and PyTorch on a well-conditioned task, so the bound is TOLERANCE x the largest |output|."""
    exp, inner, tasks = setup
    plain = verify_module.reference
    monkeypatch.setattr(verify_module, "reference", lambda *a: 50 * plain(*a))  # logits-sized
    largest = max(float(np.abs(verify_module.reference(exp, None, inner, t)).max()) for t in tasks)
    assert largest > 2
    quiet = Noise(float32_error=0.0, perturbation_spread=0.0, predictions=None)

    def offset_by(offset):
        def run(sx, sy, qx):
            task = next(t for t in tasks if np.array_equal(t.support_x[0].numpy(), sx))
            out = verify_module.reference(exp, None, inner, task) + offset
            return [out, out, out]
        monkeypatch.setattr(verify_module, "runners", lambda folder, files: {"onnx": run})
        monkeypatch.setattr(verify_module, "task_noise", lambda *args: quiet)
        return verify(exp, None, inner, folder=None, files={}, tasks=tasks)

    smallest = min(float(np.abs(verify_module.reference(exp, None, inner, t)).max()) for t in tasks)
    assert smallest > 2  # so 0.9 x the relative bound is beyond the old absolute 1e-4
    assert offset_by(0.9 * TOLERANCE * max(1.0, smallest))["passed"]
    assert not offset_by(1.1 * TOLERANCE * largest)["passed"]
