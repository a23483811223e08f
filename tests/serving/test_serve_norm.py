"""Normalisation modes in every runtime: a `support` adapter answers each query alone (the
library on both backends, the HTTP task store and stateless endpoint, the C++ program), and a
`transductive` one, old exports included, still serves, with a warning where its answers depend
on a too-small batch.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings

import httpx
import numpy as np
import pytest
from serve_helpers import make_task, reference
from test_serve_cpp import cpp_program, parse  # noqa: F401 - the session fixture, reused

import serve
from serve import tensor_file

ALONE = 1e-5  # the export's contract: one query at a time equals all together within this


def one_at_a_time(predict, query_x: np.ndarray) -> np.ndarray:
    return np.concatenate([predict(query_x[j:j + 1]) for j in range(len(query_x))])


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_a_support_adapter_answers_each_query_alone_in_the_library(sine_bn, backend):
    meta = sine_bn.meta
    assert meta["norm"]["mode"] == "support" and meta["norm"]["batch_norm_layers"] == 2
    assert [m["shape"] for m in meta["norm"]["moments"]] == [[16]] * 4  # mean, var per layer
    check_each_query_alone(sine_bn, backend, 4)


@pytest.mark.parametrize("backend", ["onnx", "torchscript"])
def test_a_tasknorm_adapter_answers_each_query_alone_in_the_library(omniglot_tasknorm, backend):
    meta = omniglot_tasknorm.meta
    assert meta["norm"]["mode"] == "tasknorm" and meta["norm"]["batch_norm_layers"] == 4
    # mean, var per layer, then the support size
    assert [m["shape"] for m in meta["norm"]["moments"]] == [[8]] * 8 + [[]]
    assert sum(p["name"].endswith("tasknorm_blend") for p in meta["parameters"]) == 4
    check_each_query_alone(omniglot_tasknorm, backend, 9)


def check_each_query_alone(exported, backend: str, n_moments: int) -> None:
    meta = exported.meta
    adapter = serve.load(exported.directory, backend)
    assert adapter.norm == meta["norm"]["mode"]
    task = make_task(meta, 2, 3, seed=3) if exported.classification else make_task(meta, 6, 9, 3)
    adapted = adapter.adapt(task["support_x"], task["support_y"])
    assert len(adapted.moments) == n_moments
    assert len(adapted.parameters) == len(meta["parameters"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the answers are each query's own
        together = adapted.predict(task["query_x"])
        alone = one_at_a_time(adapted.predict, task["query_x"])
    np.testing.assert_allclose(alone, together, atol=ALONE, rtol=0)
    np.testing.assert_allclose(together, reference(exported, task), atol=1e-5, rtol=0)
    stateless = adapter.adapt_predict(task["support_x"], task["support_y"], task["query_x"][:1])
    np.testing.assert_allclose(stateless, together[:1], atol=ALONE, rtol=0)


def test_a_transductive_adapter_still_depends_on_the_batch(sine_bn_transductive):
    """Guards the test above: the same model in the paper's mode is batch-dependent."""
    meta = sine_bn_transductive.meta
    assert meta["norm"] == {"mode": "transductive", "trained": "transductive",
                            "batch_norm_layers": 2, "moments": []}
    adapter = serve.load(sine_bn_transductive.directory)
    task = make_task(meta, 6, 9, seed=3)
    adapted = adapter.adapt(task["support_x"], task["support_y"])
    assert adapted.moments == ()
    together = adapted.predict(task["query_x"])
    pairs = np.concatenate([adapted.predict(task["query_x"][j:j + 3]) for j in range(0, 9, 3)])
    assert np.abs(pairs - together).max() > 1e-3
    np.testing.assert_allclose(together, reference(sine_bn_transductive, task), atol=1e-5)


def test_a_transductive_model_exported_with_norm_support_answers_each_query_alone(
        sine_bn_transductive, tmp_path, capsys):
    """`export --norm support` on a transductive checkpoint: the export's own verification (the
    support-mode inner loop, each query alone) passes, and the library answers each query alone
    with the numbers of the training-time inner loop in that mode. `eval --norm support`
    measures the same thing before exporting."""
    from export.__main__ import main as export_main
    from maml.__main__ import main as maml_main

    out = tmp_path / "adapter"
    assert export_main(["--checkpoint", str(sine_bn_transductive.checkpoint), "--out", str(out),
                        "--formats", "onnx,torchscript", "--steps", "2", "--norm", "support",
                        "--tasks", "2"]) == 0
    log = capsys.readouterr().out
    assert "support normalisation (trained transductive)" in log
    assert "each query alone against all together" in log  # checked by the export itself
    meta = json.loads((out / "adapter.json").read_text())
    assert meta["norm"]["mode"] == "support" and meta["norm"]["trained"] == "transductive"
    assert meta["verification"]["passed"]
    served = type(sine_bn_transductive)(sine_bn_transductive.checkpoint, out, meta)
    check_each_query_alone(served, "onnx", 4)  # against the support-mode inner loop

    def evaluated(*norm: str) -> dict:
        assert maml_main(["eval", "--checkpoint", str(sine_bn_transductive.checkpoint),
                          "--tasks", "6", "--inner-steps", "2", "--json", *norm]) == 0
        return json.loads(capsys.readouterr().out)

    as_support, as_trained = evaluated("--norm", "support"), evaluated()
    assert (as_support["norm"], as_support["trained_norm"]) == ("support", "transductive")
    assert as_support["one_at_a_time"]["mean"] == pytest.approx(as_support["mean"], rel=1e-4)
    assert (as_trained["norm"], as_trained["trained_norm"]) == ("transductive", "transductive")
    assert as_trained["one_at_a_time"]["mean"] != pytest.approx(as_trained["mean"], rel=1e-2)


def test_a_mode_with_another_inner_loop_is_refused_in_one_line(sine_bn_transductive, tmp_path,
                                                               capsys):
    from export.__main__ import main as export_main
    from maml.__main__ import main as maml_main

    ckpt = str(sine_bn_transductive.checkpoint)
    assert export_main(["--checkpoint", ckpt, "--out", str(tmp_path / "a"), "--norm",
                        "tasknorm"]) == 2
    assert maml_main(["eval", "--checkpoint", ckpt, "--norm", "tasknorm", "--tasks", "2"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2, lines  # one line each
    for line in lines:
        assert line.startswith("error: --norm tasknorm: this model was trained with --norm "
                               "transductive"), line
    assert not (tmp_path / "a").exists()


def test_the_http_service_answers_each_query_alone(sine_bn, server_factory):
    server = server_factory(sine_bn.directory)
    task = make_task(sine_bn.meta, 6, 5, seed=4)
    created = httpx.post(server.url + "/v1/tasks", json={
        "support_x": task["support_x"].tolist(), "support_y": task["support_y"].tolist()})
    assert created.status_code == 201, created.text
    url = f"{server.url}/v1/tasks/{created.json()['task_id']}/predict"
    together = httpx.post(url, json={"query_x": task["query_x"].tolist()}).json()
    assert "warning" not in together
    alone = [httpx.post(url, json={"query_x": task["query_x"][j:j + 1].tolist()}).json()
             for j in range(5)]
    assert all("warning" not in a for a in alone)
    np.testing.assert_allclose(np.concatenate([a["predictions"] for a in alone]),
                               together["predictions"], atol=ALONE, rtol=0)
    stateless = [httpx.post(server.url + "/v1/predict", json={
        "support_x": task["support_x"].tolist(), "support_y": task["support_y"].tolist(),
        "query_x": task["query_x"][j:j + 1].tolist()}).json() for j in range(5)]
    np.testing.assert_allclose(np.concatenate([s["predictions"] for s in stateless]),
                               together["predictions"], atol=ALONE, rtol=0)
    meta = httpx.get(server.url + "/v1/adapter").json()["metadata"]
    assert meta["norm"]["mode"] == "support"


@pytest.mark.parametrize("name", ["sine_bn", "omniglot_tasknorm"])
def test_the_cpp_program_answers_each_query_alone(cpp_program, name, request,  # noqa: F811
                                                  tmp_path):
    exported = request.getfixturevalue(name)
    task = make_task(exported.meta, 2, 2, seed=5)

    def run(query_x: np.ndarray) -> np.ndarray:
        file = tmp_path / "task.bin"
        tensor_file.save(file, {**task, "query_x": query_x})
        result = subprocess.run([str(cpp_program), str(exported.directory), str(file)],
                                capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        return parse(result.stdout)[0]

    together = run(task["query_x"])
    np.testing.assert_allclose(one_at_a_time(run, task["query_x"]), together, atol=ALONE, rtol=0)
    expected = serve.load(exported.directory, "torchscript").adapt(
        task["support_x"], task["support_y"]).predict(task["query_x"])
    np.testing.assert_allclose(together, expected, atol=1e-5, rtol=0)


def test_declared_moments_that_do_not_match_the_files_are_refused(sine_bn, tmp_path):
    copy = tmp_path / "adapter"
    shutil.copytree(sine_bn.directory, copy)
    meta = json.loads((copy / "adapter.json").read_text())
    meta["norm"]["moments"] = meta["norm"]["moments"][:2]  # two of the four
    (copy / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(serve.UsageError, match=r"adapt.onnx takes .* returns .*m3.*declares"):
        serve.load(copy)
    task = make_task(meta, 3, 2, seed=1)
    with pytest.raises(serve.UsageError, match="adapt.ts returns 14 tensors, but adapter.json "
                                               "declares 12"):
        serve.load(copy, "torchscript").adapt(task["support_x"], task["support_y"])
    meta["norm"] = {"mode": "running-averages", "moments": []}
    (copy / "adapter.json").write_text(json.dumps(meta))
    with pytest.raises(serve.UsageError, match="'norm' must be"):
        serve.load(copy)


def test_an_old_transductive_classifier_serves_with_a_warning(omniglot_transductive, tmp_path,
                                                               server_factory):
    """An export from before the modes (no `norm` in adapter.json) loads as transductive; a
    query batch smaller than n_way gets a warning, in the library and in the JSON answer."""
    copy = tmp_path / "adapter"
    shutil.copytree(omniglot_transductive.directory, copy)
    meta = json.loads((copy / "adapter.json").read_text())
    del meta["norm"]
    (copy / "adapter.json").write_text(json.dumps(meta))
    adapter = serve.load(copy)
    assert adapter.norm == "transductive"
    n = meta["n_way"]
    task = make_task(meta, 1, 1, seed=2)  # n queries: enough
    adapted = adapter.adapt(task["support_x"], task["support_y"])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        adapted.predict(task["query_x"])
    with pytest.warns(serve.TransductiveWarning, match=f"these 1 queries depend on the batch: "
                                                       f"send at least {n} queries together"):
        adapted.predict(task["query_x"][:1])
    with pytest.warns(serve.TransductiveWarning):
        adapter.adapt_predict(task["support_x"], task["support_y"], task["query_x"][:2])

    server = server_factory(copy)
    created = httpx.post(server.url + "/v1/tasks", json={
        "support_x": task["support_x"].tolist(), "support_y": task["support_y"].tolist()}).json()
    url = f"{server.url}/v1/tasks/{created['task_id']}/predict"
    small = httpx.post(url, json={"query_x": task["query_x"][:1].tolist()})
    assert small.status_code == 200 and "depend on the batch" in small.json()["warning"]
    full = httpx.post(url, json={"query_x": task["query_x"].tolist()})
    assert full.status_code == 200 and "warning" not in full.json()
    stateless = httpx.post(server.url + "/v1/predict", json={
        "support_x": task["support_x"].tolist(), "support_y": task["support_y"].tolist(),
        "query_x": task["query_x"][:3].tolist()}).json()
    assert "warning" in stateless
    assert "warning" not in server.log.read_text()  # said to the client, not to the log
