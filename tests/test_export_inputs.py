"""`export.inputs.check_task`: the runtime's input check against adapter.json (numpy only)."""

from __future__ import annotations

import numpy as np
import pytest

from export.inputs import InputError, check_task

CLASSIFIER = {"task": "classification", "n_way": 5, "input": {"shape": [1, 28, 28]},
              "target": {"shape": [], "dtype": "int64"}}
REGRESSOR = {"task": "regression", "n_way": None, "input": {"shape": [1]},
             "target": {"shape": [1], "dtype": "float32"}}


def images(n: int) -> np.ndarray:
    return np.zeros((n, 1, 28, 28), np.float32)


def test_a_valid_five_way_task_passes():
    check_task(CLASSIFIER, images(5), np.arange(5), images(75))
    check_task(REGRESSOR, np.zeros((10, 1), np.float32), np.zeros((10, 1), np.float32))


@pytest.mark.parametrize("labels, message", [
    (np.array([0, 1, 2, 3, 5]), "class label 5 is outside [0, 5)"),
    (np.array([0, 1, -1, 3, 4]), "class label -1 is outside [0, 5)"),
    (np.arange(4), "support_y must have shape (5)"),
    (np.arange(5).astype(np.int32), "support_y must be int64"),
])
def test_bad_labels_are_named(labels, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)")
                       .replace("[", r"\[")):
        check_task(CLASSIFIER, images(5), labels)


def test_bad_examples_are_named():
    with pytest.raises(InputError, match="query_x must have shape"):
        check_task(CLASSIFIER, images(5), np.arange(5), np.zeros((3, 28, 28), np.float32))
    with pytest.raises(InputError, match="support_x must be float32"):
        check_task(CLASSIFIER, images(5).astype(np.float64), np.arange(5))
    with pytest.raises(InputError, match="support_y must have shape"):
        check_task(REGRESSOR, np.zeros((10, 1), np.float32), np.zeros((10,), np.float32))
