"""Reading a built-in model's ``--model-opt KEY=VALUE`` settings with clear errors."""

from __future__ import annotations

from fxsculpt.ir.errors import BadInputError
from fxsculpt.zoo import BuiltinSpec


def int_option(spec: BuiltinSpec, model: str, key: str, default: int, minimum: int = 1) -> int:
    """``spec.options[key]`` as an int >= ``minimum`` (``default`` when absent)."""
    raw = spec.options.get(key)
    if raw is None:
        return default
    try:
        value = int(str(raw).strip())
    except ValueError:
        raise BadInputError(f"builtin:{model} option {key}={raw!r} is not an integer") from None
    if value < minimum:
        raise BadInputError(f"builtin:{model} option {key}={value} must be at least {minimum}")
    return value


def check_known(spec: BuiltinSpec, model: str, known: tuple[str, ...]) -> None:
    """Refuse options the builder does not read, naming the ones it does."""
    unknown = sorted(set(spec.options) - set(known))
    if unknown:
        raise BadInputError(
            f"builtin:{model} has no option {', '.join(unknown)} (its options: {', '.join(known) or 'none'})"
        )


def check_spec(spec: BuiltinSpec, model: str) -> None:
    """Classes and channels must be positive."""
    if spec.num_classes < 1:
        raise BadInputError(f"builtin:{model} needs at least 1 class, got {spec.num_classes}")
    if spec.in_channels < 1:
        raise BadInputError(f"builtin:{model} needs at least 1 input channel, got {spec.in_channels}")
