"""``builtin:darts-supernet`` and ``builtin:darts-eval``: the DARTS search and evaluation networks.

darts-supernet (Liu et al., ICLR 2019, sec. 3.1.1): every edge of every cell is a mixed op
over the 8 candidate ops, α shared by all normal cells and by all reduction cells. Options:
``layers`` (8), ``channels`` (16), ``nodes`` (4 intermediate nodes per cell), ``multiplier``
(4 nodes concatenated), ``stem_multiplier`` (3), ``mode`` (``lean``, or ``reference``: the
DARTS code's computation, for benchmarks).

darts-eval (sec. 3.2): the network built from a genotype, ``--genotype NAME_OR_FILE`` (the
published ``DARTS_V2`` by default, ``DARTS_V1``, or a ``genotype.json`` the darts pass wrote).
Options: ``layers`` (20), ``channels`` (36), ``auxiliary`` (1: build the auxiliary head at 2/3
depth; it is used only by training code through ``forward_with_aux`` and is not part of the
traced IR), ``drop_path`` (0.0; the paper trains with 0.2), ``stem_multiplier`` (3).
"""

from __future__ import annotations

from torch import nn

from fxsculpt.ir.errors import BadInputError
from fxsculpt.nas.darts.genotype import load_genotype
from fxsculpt.nas.darts.network import EvalNetwork
from fxsculpt.nas.darts.supernet import SearchNetwork
from fxsculpt.zoo import BuiltinSpec
from fxsculpt.zoo._options import check_known, check_spec, int_option


def _float_option(spec: BuiltinSpec, model: str, key: str, default: float) -> float:
    raw = spec.options.get(key)
    if raw is None:
        return default
    try:
        value = float(str(raw).strip())
    except ValueError:
        raise BadInputError(f"builtin:{model} option {key}={raw!r} is not a number") from None
    if not 0.0 <= value < 1.0:
        raise BadInputError(f"builtin:{model} option {key}={value} must be in [0, 1)")
    return value


def build_supernet(spec: BuiltinSpec) -> nn.Module:
    """The DARTS search network for ``spec``'s classes and input channels."""
    model = "darts-supernet"
    check_spec(spec, model)
    check_known(spec, model, ("layers", "channels", "nodes", "multiplier", "stem_multiplier", "mode"))
    nodes = int_option(spec, model, "nodes", 4)
    multiplier = int_option(spec, model, "multiplier", min(4, nodes))
    if multiplier > nodes:
        raise BadInputError(f"builtin:{model} option multiplier={multiplier} exceeds nodes={nodes}")
    mode = spec.options.get("mode", "lean")
    if mode not in ("lean", "reference"):
        raise BadInputError(f"builtin:{model} option mode={mode!r} must be lean or reference")
    return SearchNetwork(
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        channels=int_option(spec, model, "channels", 16, minimum=2),
        layers=int_option(spec, model, "layers", 8),
        steps=nodes,
        multiplier=multiplier,
        stem_multiplier=int_option(spec, model, "stem_multiplier", 3),
        lean=mode == "lean",
    )


def build_eval(spec: BuiltinSpec) -> nn.Module:
    """The DARTS evaluation network of the genotype in ``spec.options["genotype"]``."""
    model = "darts-eval"
    check_spec(spec, model)
    check_known(spec, model, ("genotype", "layers", "channels", "auxiliary", "drop_path", "stem_multiplier"))
    genotype = load_genotype(spec.options.get("genotype", "DARTS_V2"))
    return EvalNetwork(
        genotype,
        num_classes=spec.num_classes,
        in_channels=spec.in_channels,
        channels=int_option(spec, model, "channels", 36, minimum=2),
        layers=int_option(spec, model, "layers", 20),
        auxiliary=bool(int_option(spec, model, "auxiliary", 1, minimum=0)),
        drop_path=_float_option(spec, model, "drop_path", 0.0),
        stem_multiplier=int_option(spec, model, "stem_multiplier", 3),
    )


BUILTINS = {"darts-supernet": build_supernet, "darts-eval": build_eval}
