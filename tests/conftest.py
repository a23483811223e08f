"""Omniglot for every test folder: synthetic copies, the `needs_omniglot` skip, the `omniglot`
marker (see `tests/omniglot_data.py`)."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.omniglot_data import missing_omniglot, write_synthetic_folders, write_synthetic_npz

SYNTHETIC = {"synthetic_omniglot", "synthetic_omniglot_folders"}


def pytest_configure(config) -> None:
    config.addinivalue_line(
        "markers", "needs_omniglot(*files): reads these files of the real Omniglot copy "
        "(default: the two npz files); skips, naming them, where they are missing")
    config.addinivalue_line(
        "markers", "omniglot: reads Omniglot, real or synthetic (set from needs_omniglot and "
        "the synthetic fixtures); `-m omniglot` selects them")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        needs = item.get_closest_marker("needs_omniglot")
        if needs is not None:
            reason = missing_omniglot(*needs.args)
            if reason is not None:
                item.add_marker(pytest.mark.skip(reason=reason))
        if needs is not None or SYNTHETIC & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.omniglot)


@pytest.fixture(scope="session")
def synthetic_omniglot(tmp_path_factory) -> Path:
    """A folder with synthetic `images_background.npz` + `images_evaluation.npz`: all 1623
    characters the loader insists on, 20 drawings each (about 3 MB, 3 s to write)."""
    return write_synthetic_npz(tmp_path_factory.mktemp("omniglot-npz"))


@pytest.fixture(scope="session")
def synthetic_omniglot_folders(tmp_path_factory) -> Path:
    """A folder with `images_background/` and `images_evaluation/` in the upstream layout, a
    few characters each (copy it before changing it: it is shared by the session)."""
    return write_synthetic_folders(tmp_path_factory.mktemp("omniglot-folders"))
