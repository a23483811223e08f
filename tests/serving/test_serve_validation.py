"""Input checks of the runtime (`serve.validation`), the task store and the tensor file format.

These need no exported adapter: they exercise the pure parts of `serve` on small arrays.
"""

from __future__ import annotations

import numpy as np
import pytest

from maml.errors import UsageError
from serve import tensor_file
from serve.task_store import TaskStore
from serve.validation import Limits, Signature, check_query, check_support

IMAGE = Signature(input_shape=(1, 4, 4), target_shape=(), n_way=3)
SINE = Signature(input_shape=(1,), target_shape=(1,), n_way=None)
LIMITS = Limits(max_support=10, max_query=6)


def images(n: int) -> np.ndarray:
    return np.random.default_rng(n).random((n, 1, 4, 4))


def test_valid_support_is_cast_to_the_graph_dtypes():
    x, y = check_support(images(6).tolist(), [0, 1, 2, 2, 1, 0], IMAGE, LIMITS)
    assert x.dtype == np.float32 and x.shape == (6, 1, 4, 4) and x.flags.c_contiguous
    assert y.dtype == np.int64 and y.tolist() == [0, 1, 2, 2, 1, 0]
    np.testing.assert_allclose(x, images(6), atol=1e-7)
    rx, ry = check_support([[0.5], [1.5]], [[1.0], [2.0]], SINE, LIMITS)
    assert rx.shape == (2, 1) and ry.dtype == np.float32 and ry.shape == (2, 1)


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (images(3)[:, :, :3], [0, 1, 2],
         r"support_x has shape \(3, 1, 3, 4\), expected \(N, 1, 4, 4\)"),
        (images(3)[:, 0], [0, 1, 2], r"support_x has shape \(3, 4, 4\)"),
        (images(3), [0, 1, 3], r"label 3 outside \[0, 3\)"),
        (images(3), [0, -1, 2], r"label -1 outside"),
        (images(3), [0, 1, 1], r"class 2 has no support example"),
        (images(3), [0.0, 1.0, 2.0], r"integer class indices"),
        (images(3), [[0], [1], [2]], r"support_y has shape \(3, 1\), expected \(N,\)"),
        (images(3), [0, 1, 2, 2], r"support_x has 3 examples but support_y has 4"),
        ([], [], r"support_x is empty"),
        (images(11), list(range(3)) * 3 + [0, 1], r"11 examples, more than the limit of 10"),
        (np.full((3, 1, 4, 4), np.nan), [0, 1, 2], r"non-finite"),
        (np.full((3, 1, 4, 4), 1e39), [0, 1, 2], r"non-finite"),  # finite in float64 only
        ([[[["a"] * 4] * 4]] * 3, [0, 1, 2], r"must hold real numbers"),
        ([images(1)[0].tolist(), [[1.0]]], [0, 1], r"not a rectangular array|ragged"),
        (np.ones((3, 1, 4, 4), dtype=bool), [0, 1, 2], r"real numbers, got boolean"),
        (3.0, [0], r"must be an array"),
        (images(3), [True, False, True], r"integer class indices 0..2, got boolean"),
    ],
)
def test_bad_support_sets_get_one_clear_message(x, y, message):
    with pytest.raises(UsageError, match=message):
        check_support(x, y, IMAGE, LIMITS)


def test_regression_targets_are_checked_like_inputs():
    with pytest.raises(UsageError, match=r"support_y has shape \(2,\), expected \(N, 1\)"):
        check_support([[0.5], [1.5]], [1.0, 2.0], SINE, LIMITS)
    with pytest.raises(UsageError, match="support_y has 1 non-finite"):
        check_support([[0.5], [1.5]], [[1.0], [float("inf")]], SINE, LIMITS)


def test_query_checks():
    assert check_query(images(6), IMAGE, LIMITS).shape == (6, 1, 4, 4)
    with pytest.raises(UsageError, match="query_x is empty"):
        check_query(np.zeros((0, 1, 4, 4)), IMAGE, LIMITS)
    with pytest.raises(UsageError, match="more than the limit of 6"):
        check_query(images(7), IMAGE, LIMITS)
    with pytest.raises(UsageError, match=r"query_x has shape \(2, 2\), expected \(N, 1\)"):
        check_query([[1.0, 2.0], [3.0, 4.0]], SINE, LIMITS)


def test_task_store_bounds_count_and_idle_time():
    now = [0.0]
    store: TaskStore[str] = TaskStore(max_tasks=2, ttl_s=10.0, clock=lambda: now[0])
    a, b = store.add("a"), store.add("b")
    assert store.get(a) == "a"  # a is now the most recently used
    c = store.add("c")  # evicts b, the least recently used
    assert store.get(b) is None and store.get(a) == "a" and store.get(c) == "c"
    now[0] = 5.0
    assert store.get(a) == "a"  # refreshes a's idle time only
    now[0] = 12.0
    assert store.get(c) is None and store.get(a) == "a" and len(store) == 1
    assert store.delete(a) and not store.delete(a) and len(store) == 0
    assert store.evicted == 2
    with pytest.raises(UsageError, match="--max-tasks"):
        TaskStore(max_tasks=0)


def test_tensor_file_round_trip_and_corruption():
    tensors = {"support_x": images(3).astype(np.float32), "support_y": np.arange(3),
               "query_x": np.zeros((0, 1, 4, 4), np.float32)}
    data = tensor_file.encode(tensors)
    back = tensor_file.decode(data)
    assert list(back) == list(tensors)
    for name, value in tensors.items():
        assert back[name].dtype == value.dtype and np.array_equal(back[name], value)
    with pytest.raises(UsageError, match="corrupt tensor file"):
        tensor_file.decode(data[:-4])
    with pytest.raises(UsageError, match="does not start with MAMLTSR1"):
        tensor_file.decode(b"PK" + data)
    with pytest.raises(UsageError, match="only float32 and int64"):
        tensor_file.encode({"x": np.zeros(2, np.float64)})


def test_tensor_file_command_converts_an_npz(tmp_path, capsys):
    np.savez(tmp_path / "task.npz", support_x=images(2), support_y=np.arange(2, dtype=np.int32))
    assert tensor_file.main([str(tmp_path / "task.npz"), str(tmp_path / "task.bin")]) == 0
    back = tensor_file.load(tmp_path / "task.bin")
    assert back["support_x"].dtype == np.float32 and back["support_y"].dtype == np.int64
    np.testing.assert_allclose(back["support_x"], images(2), atol=1e-7)
    assert tensor_file.main([str(tmp_path / "missing.npz"), str(tmp_path / "x.bin")]) == 2
    assert capsys.readouterr().err.startswith("error: ")


@pytest.mark.parametrize(
    ("x", "y", "message"),
    [
        (images(5), [False, True, 2, 2, 1], r"support_y must hold integer class indices 0..2, "
                                            r"got boolean values"),
        ([[True], [0.5]], [[1.0], [2.0]], r"support_x must hold real numbers, got boolean"),
        ([[0.5], [1.5]], [[1.0], [np.True_]], r"support_y must hold real numbers, got boolean"),
        ([np.array([0.5]), np.array([True])], [[1.0], [2.0]], r"support_x .* got boolean"),
    ],
)
def test_booleans_mixed_with_numbers_are_refused(x, y, message):
    """numpy reads [False, True, 2] as integers; a JSON true is still not a number."""
    sig = IMAGE if len(x) == 5 else SINE
    with pytest.raises(UsageError, match=message):
        check_support(x, y, sig, LIMITS)


def test_task_store_refuses_a_non_finite_ttl():
    for ttl in (float("inf"), float("nan"), 0.0, -1.0):
        with pytest.raises(UsageError, match="--task-ttl must be a positive, finite number"):
            TaskStore(ttl_s=ttl)


def test_tensor_file_refuses_negative_dimensions():
    data = bytearray(tensor_file.encode({"x": np.zeros(3, np.float32)}))
    shape_at = 8 + 4 + 4 + 1 + 2  # magic, count, name length, b"x", dtype and ndim
    data[shape_at : shape_at + 8] = (-1).to_bytes(8, "little", signed=True)
    with pytest.raises(UsageError, match=r"corrupt tensor file \(tensor 'x' has a negative "
                                         r"dimension in \(-1,\)\)"):
        tensor_file.decode(bytes(data))


def test_tensor_file_command_names_a_file_that_is_not_an_npz(tmp_path, capsys):
    np.save(tmp_path / "task.npy", images(2))
    (tmp_path / "text.npz").write_text("support_x = [1, 2]\n")
    (tmp_path / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    for name, message in (
        ("task.npy", "task.npy is a single .npy array, not an .npz archive; save the task with "
                     "np.savez("),
        ("text.npz", "text.npz is not a zip file, so not an .npz archive"),
        ("broken.npz", "broken.npz is a damaged .npz archive"),
    ):
        assert tensor_file.main([str(tmp_path / name), str(tmp_path / "out.bin")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out.bin").exists()
