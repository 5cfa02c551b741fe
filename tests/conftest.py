"""Shared fixtures: the real data subsets beside the checkout, and a local Ray runtime."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

SHARED_DATA = ROOT.parent / "shared" / "data"


@pytest.fixture
def cifar_npz() -> Path:
    """Path to the real CIFAR-10 subset; the test skips where ../shared/data is absent."""
    path = SHARED_DATA / "cifar10-subset.npz"
    if not path.is_file():
        pytest.skip(f"real CIFAR-10 subset not found at {path} (../shared/data is absent)")
    return path


@pytest.fixture
def mnist_npz() -> Path:
    """Path to the real MNIST subset; the test skips where ../shared/data is absent."""
    path = SHARED_DATA / "mnist-subset.npz"
    if not path.is_file():
        pytest.skip(f"real MNIST subset not found at {path} (../shared/data is absent)")
    return path


@pytest.fixture(scope="module")
def ray_runtime() -> Iterator[None]:
    """One local Ray runtime (2 CPUs) for the whole module, stopped after it (start-up costs
    seconds); the test skips where Ray is not installed."""
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'fxsculpt[distributed]')")
    import ray

    from fxsculpt.training import parallel

    if ray.is_initialized():
        ray.shutdown()
    parallel.ensure_ray(2)
    yield
    parallel.shutdown_ray()
