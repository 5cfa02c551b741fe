"""An evaluator pool for candidate evaluation: sequential, or in parallel through Ray.

Sample-based searches (random, evolution, RL, NAO) and HAQ's episodes evaluate many candidates
independently. :func:`map_in_order` runs ``fn`` over them one by one when ``workers <= 1``, and
as Ray tasks (Moritz et al., "Ray: A Distributed Framework for Emerging AI Applications",
OSDI 2018) when ``workers > 1``. Either way each item runs with every global RNG (torch, NumPy,
Python's ``random``) seeded from ``derive_seed(seed, index)`` and with ``threads`` intra-op
threads, so a result depends on the item, its position and the seed, never on which worker ran
it or in which order: the same seed gives the same results as the sequential run.

Ray is an optional extra (``pip install fxsculpt[distributed]``). Without an address, a local Ray
runtime with ``workers`` CPUs is started on first use and kept for later calls. To use an existing
cluster, start it with ``ray start --head`` on one machine and ``ray start --address HEAD:6379``
on the others (each with fxsculpt installed in the same environment), then pass
``ray_address="HEAD:6379"`` (``--ray-address`` on the command line; ``auto`` finds a cluster
started on this machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import random
import sys
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

import numpy as np
import torch

from fxsculpt.ir.errors import BadInputError, first_line

T = TypeVar("T")
R = TypeVar("R")

_ROOT = Path(__file__).resolve().parent.parent
_STARTED_BY_US = False
_REMOTE: Any = None

RAY_MISSING = (
    "parallel evaluation (--workers > 1) needs Ray, which is not installed: "
    "pip install 'fxsculpt[distributed]' (or run with --workers 1)"
)


def derive_seed(seed: int, index: int) -> int:
    """The seed of item ``index`` of a run seeded with ``seed`` (NumPy's SeedSequence mixing)."""
    state = np.random.SeedSequence([int(seed) % 2**63, int(index)]).generate_state(2, dtype=np.uint32)
    return (int(state[0]) << 31 | int(state[1]) >> 1) % 2**63


@contextlib.contextmanager
def seeded_globals(seed: int) -> Iterator[None]:
    """Seed torch's, NumPy's and Python's global RNGs with ``seed``; restore their states afterwards."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        np.random.seed(seed % 2**32)
        random.seed(seed)
        try:
            yield
        finally:
            np.random.set_state(np_state)
            random.setstate(py_state)


def _call(fn: Callable[[Any], Any], item: Any, seed: int, threads: int) -> Any:
    """Run one item as every worker does: seeded globals, fixed thread count."""
    previous = torch.get_num_threads()
    torch.set_num_threads(max(1, threads))
    try:
        with seeded_globals(seed):
            return fn(item)
    finally:
        torch.set_num_threads(previous)


def require_ray() -> ModuleType:
    """The ``ray`` module, or a one-line :class:`BadInputError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise BadInputError(RAY_MISSING) from None
    return ray


def _local_pythonpath() -> str:
    """The driver's project folders, so local workers import the same modules (tests included)."""
    entries = [str(_ROOT)]
    for entry in sys.path:
        if entry and Path(entry).is_dir() and Path(entry).resolve().is_relative_to(_ROOT):
            resolved = str(Path(entry).resolve())
            if resolved not in entries:
                entries.append(resolved)
    existing = os.environ.get("PYTHONPATH")
    if existing:
        entries.append(existing)
    return os.pathsep.join(entries)


def ensure_ray(workers: int, ray_address: str | None = None) -> ModuleType:
    """Connect to Ray once: the cluster at ``ray_address``, or a local runtime with ``workers`` CPUs."""
    global _STARTED_BY_US
    ray = require_ray()
    if ray.is_initialized():
        return ray
    common: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if ray_address:
            ray.init(address=ray_address, **common)
        else:
            ray.init(
                num_cpus=max(1, workers),
                include_dashboard=False,
                runtime_env={"env_vars": {"PYTHONPATH": _local_pythonpath()}},
                **common,
            )
    except (ConnectionError, RuntimeError, ValueError) as exc:
        where = f"the Ray cluster at {ray_address}" if ray_address else "a local Ray runtime"
        detail = first_line(exc)
        raise BadInputError(f"cannot connect to {where}: {detail}") from exc
    _STARTED_BY_US = True
    return ray


def shutdown_ray() -> None:
    """Stop the Ray runtime this module connected to (a no-op otherwise)."""
    global _STARTED_BY_US, _REMOTE
    if _STARTED_BY_US:
        import ray

        ray.shutdown()
    _STARTED_BY_US = False
    _REMOTE = None


def map_in_order(
    fn: Callable[[T], R],
    items: Iterable[T],
    workers: int = 1,
    ray_address: str | None = None,
    *,
    seed: int = 0,
    threads: int = 1,
) -> list[R]:
    """``[fn(item) for item in items]``, in input order, each item with globals seeded per item.

    ``workers <= 1`` runs in this process; ``workers > 1`` runs the items as Ray tasks (one CPU
    each) on a local runtime or the cluster at ``ray_address``, with the same results. ``fn`` and
    the items must be picklable (module-level functions, or closures cloudpickle can carry); ``fn``
    is shipped once. An exception raised by ``fn`` in a worker is re-raised here as itself.
    """
    global _REMOTE
    items = list(items)
    if workers <= 1:
        return [_call(fn, item, derive_seed(seed, index), threads) for index, item in enumerate(items)]
    ray = ensure_ray(workers, ray_address)
    if _REMOTE is None:
        _REMOTE = ray.remote(num_cpus=1, max_retries=0)(_call)
    fn_ref = ray.put(fn)
    refs = [
        _REMOTE.remote(fn_ref, item, derive_seed(seed, index), threads) for index, item in enumerate(items)
    ]
    results: list[R] = []
    try:
        for ref in refs:
            try:
                results.append(ray.get(ref))
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                if isinstance(cause, BaseException):
                    raise cause from None
                raise
    except Exception:
        # Let the other tasks finish before raising: cancelling them (ray.cancel) crashed the
        # Ray 2.60 driver later ("Tried to complete task that was not pending").
        with contextlib.suppress(Exception):
            ray.wait(refs, num_returns=len(refs))
        raise
    return results
