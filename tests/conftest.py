"""Fixtures shared by every layer of tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory):
    """A real local Ray for the whole session (Ray's own tests do the same)."""
    import ray

    # Actors import test helpers (e.g. a user verifier given by dotted path) from the repository.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
    # What actors cache (e.g. the checkpoints vLLM engines start from) stays out of the user's cache.
    os.environ["ORCHARD_CACHE"] = str(tmp_path_factory.mktemp("orchard-cache"))
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def warm_cache(tmp_path_factory) -> Path:
    """One warm-start cache for the session, so each test run's SFT happens once."""
    return tmp_path_factory.mktemp("warmstart-cache")
