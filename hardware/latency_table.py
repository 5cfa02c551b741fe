"""Latency tables: each layer signature measured once on a target, cached on disk.

A search asks for the latency of thousands of candidate layers; measuring each on the
runtime takes tens of milliseconds, a cached lookup a few microseconds. Entries live in one
JSON file per *table identity*: the target's name and everything its numbers depend on
(for ``ort-cpu``: the CPU model, the ONNX Runtime version and the thread count; for
``bitserial``: its parameters), so a changed thread count or a new runtime never reads stale
numbers. The folder is ``$FXSCULPT_CACHE`` if set, else ``~/.cache/fxsculpt/latency``, or
the ``cache_dir`` given.

:func:`predict_model` sums the table entries of a model's layers (as the runtime groups them,
:func:`hardware.layers.layer_groups`). Every single-layer measurement includes the runtime's
fixed cost per inference call, which a whole model pays once, so the prediction is
``Σ (t_layer − o) + o`` where ``o`` is the latency of a one-element model
(:meth:`hardware.targets.Target.per_call_overhead_ms`; 0 for the analytical target).
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from fxsculpt.hardware.layers import LayerGroup, LayerSignature, layer_groups
from fxsculpt.hardware.targets import Target
from fxsculpt.ir.graph import IR

CACHE_ENV = "FXSCULPT_CACHE"
TABLE_VERSION = 1
_OVERHEAD_KEY = "__per_call_overhead__"


def default_cache_dir() -> Path:
    """``$FXSCULPT_CACHE`` or ``~/.cache/fxsculpt/latency``."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "fxsculpt" / "latency"


class LatencyTable:
    """Signature → milliseconds on one target, measured on first use and cached on disk.

    ``measurements`` counts how many layers were actually measured (or computed) by this
    instance; a cached lookup does not add to it.
    """

    def __init__(self, target: Target, cache_dir: str | Path | None = None) -> None:
        self.target = target
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.identity: dict[str, Any] = {"target": target.name, "version": TABLE_VERSION, **target.identity()}
        digest = hashlib.sha256(json.dumps(self.identity, sort_keys=True).encode()).hexdigest()[:16]
        self.path = self.cache_dir / f"{target.name}-{digest}.json"
        self.entries: dict[str, float] = {}
        self._memo: dict[LayerSignature, float] = {}  # hash lookups without re-serializing the key
        self.measurements = 0
        self.measure_seconds = 0.0
        self._load()

    # -- storage -----------------------------------------------------------------------------
    def _read(self) -> dict[str, float]:
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        if not isinstance(data, dict) or data.get("identity") != self.identity:
            return {}
        entries = data.get("entries", {})
        return {str(k): float(v) for k, v in entries.items()} if isinstance(entries, dict) else {}

    def _load(self) -> None:
        self.entries.update(self._read())

    def _save(self) -> None:
        """Merge with what is on disk (another process may have added entries) and replace atomically."""
        merged = self._read()
        merged.update(self.entries)
        self.entries = merged
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=f".{self.path.name}.", dir=self.cache_dir)
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump({"identity": self.identity, "entries": merged}, handle, indent=0, sort_keys=True)
            os.replace(tmp, self.path)
        except OSError:
            pass  # an unwritable cache only costs re-measuring next time

    # -- lookups -----------------------------------------------------------------------------
    def __len__(self) -> int:
        return len([k for k in self.entries if k != _OVERHEAD_KEY])

    def __contains__(self, sig: object) -> bool:
        return isinstance(sig, LayerSignature) and sig.key() in self.entries

    def lookup(self, sig: LayerSignature, module: nn.Module | None = None, save: bool = True) -> float:
        """Milliseconds of ``sig`` on the target: from the table, else measured now and stored."""
        memo = self._memo.get(sig)
        if memo is not None:
            return memo
        key = sig.key()
        cached = self.entries.get(key)
        if cached is not None:
            self._memo[sig] = cached
            return cached
        start = time.perf_counter()
        value = float(self.target.layer_latency_ms(sig, module))
        self.measure_seconds += time.perf_counter() - start
        self.measurements += 1
        self.entries[key] = value
        self._memo[sig] = value
        if save:
            self._save()
        return value

    def overhead_ms(self) -> float:
        """The target's fixed cost per inference call, cached like a layer."""
        cached = self.entries.get(_OVERHEAD_KEY)
        if cached is None:
            cached = float(self.target.per_call_overhead_ms())
            self.entries[_OVERHEAD_KEY] = cached
            self._save()
        return cached

    def fill(self, groups: list[LayerGroup]) -> int:
        """Measure every signature of ``groups`` not yet in the table; returns how many were new."""
        before = self.measurements
        for group in groups:
            if group.signature is not None:
                self.lookup(group.signature, group.module, save=False)
        self.overhead_ms()
        self._save()
        return self.measurements - before


@dataclass
class LayerPrediction:
    nodes: list[str]
    signature: str
    ms: float


@dataclass
class Prediction:
    """A model's latency predicted from a table: Σ (layer − overhead) + overhead."""

    total_ms: float
    overhead_ms: float
    layers: list[LayerPrediction] = field(default_factory=list)
    unpredicted: list[str] = field(default_factory=list)  # compute nodes with no single-layer model

    def as_dict(self) -> dict[str, Any]:
        return {
            "total_ms": self.total_ms,
            "overhead_ms": self.overhead_ms,
            "layers": [{"nodes": r.nodes, "signature": r.signature, "ms": r.ms} for r in self.layers],
            "unpredicted": self.unpredicted,
        }


def ir_at_batch(ir: IR, batch: int) -> IR:
    """``ir`` itself when its batch is ``batch``, else a copy propagated at that batch size."""
    if ir.input_shape[0] == batch:
        return ir
    copy = ir.clone()
    for src, dst in zip(ir.gm.graph.nodes, copy.gm.graph.nodes):  # keep the bit-widths
        if "sculpt" in src.meta:
            dst.meta["sculpt"] = src.meta["sculpt"]
    copy.input_shape = (batch, *ir.input_shape[1:])
    copy.propagate()
    return copy


def additive_latency_ms(layer_ms: list[float], overhead_ms: float) -> float:
    """``o + Σ max(t − o, 0)``: each single-layer time includes the per-call cost a model pays once."""
    return overhead_ms + sum(max(ms - overhead_ms, 0.0) for ms in layer_ms)


def predict_model(ir: IR, table: LatencyTable, batch: int | None = None) -> Prediction:
    """Predict ``ir``'s whole-model latency on ``table.target`` from its layers' entries."""
    model = ir_at_batch(ir, batch) if batch is not None else ir
    groups = layer_groups(model)
    table.fill(groups)
    overhead = table.overhead_ms()
    rows: list[LayerPrediction] = []
    missing: list[str] = []
    for group in groups:
        if group.signature is None:
            if model.meta(group.main).macs or model.meta(group.main).params:
                missing.append(group.main.name)
            continue
        ms = table.lookup(group.signature, group.module)
        rows.append(LayerPrediction(group.names, group.signature.describe(), ms))
    total = additive_latency_ms([row.ms for row in rows], overhead)
    return Prediction(total_ms=total, overhead_ms=overhead, layers=rows, unpredicted=missing)
