"""Typed pass options: dataclass fields that carry their help text, parsed from strings.

A pass declares ``Options`` as a dataclass whose fields are made with :func:`option`; the
CLI's ``--set PASS.NAME=VALUE``, the TOML config file and ``cli.py passes`` all read them.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from typing import Any, Literal, get_args, get_origin

from fxsculpt.ir.errors import BadInputError


def option(default: Any, help: str, *, default_factory: Any = None) -> Any:
    """A documented option field; ``help`` is shown by ``cli.py passes``."""
    if default_factory is not None:
        return dataclasses.field(default_factory=default_factory, metadata={"help": help})
    return dataclasses.field(default=default, metadata={"help": help})


@dataclasses.dataclass
class NoOptions:
    """For passes that take no options."""


def option_fields(options_cls: type) -> list[dataclasses.Field[Any]]:
    return list(dataclasses.fields(options_cls))


def resolved_types(options_cls: type) -> dict[str, Any]:
    """Field name → annotation with string annotations resolved."""
    return typing.get_type_hints(options_cls)


def describe_type(tp: Any) -> str:
    """A short human spelling of an option's type, e.g. ``int``, ``{1,2}``, ``list[str]``."""
    origin = get_origin(tp)
    if origin is Literal:
        return "{" + ",".join(str(a) for a in get_args(tp)) + "}"
    if origin in (typing.Union, types.UnionType):
        return " | ".join(describe_type(a) for a in get_args(tp))
    if origin in (list, tuple):
        inner = [a for a in get_args(tp) if a is not Ellipsis]
        return f"{origin.__name__}[{describe_type(inner[0]) if inner else 'str'}]"
    if tp is type(None):
        return "none"
    return getattr(tp, "__name__", str(tp))


def parse_value(tp: Any, text: Any, where: str) -> Any:
    """Convert ``text`` (a string from the CLI, or a TOML value) to type ``tp``.

    Raises :class:`BadInputError` naming ``where`` (e.g. ``darts.order``) on a bad value.
    """
    origin = get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if type(None) in args and (text is None or (isinstance(text, str) and text.lower() in ("none", ""))):
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return parse_value(arg, text, where)
            except BadInputError as exc:
                errors.append(str(exc))
        raise BadInputError(f"bad value {text!r} for {where}: expected {describe_type(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        for choice in choices:
            if str(choice) == str(text):
                return choice
        raise BadInputError(
            f"bad value {text!r} for {where}: expected one of {', '.join(str(c) for c in choices)}"
        )
    if origin in (list, tuple):
        inner = [a for a in get_args(tp) if a is not Ellipsis]
        item_type = inner[0] if inner else str
        items = text if isinstance(text, list | tuple) else [s for s in str(text).split(",") if s.strip()]
        values = [parse_value(item_type, i.strip() if isinstance(i, str) else i, where) for i in items]
        return tuple(values) if origin is tuple else values
    if tp is bool:
        if isinstance(text, bool):
            return text
        lowered = str(text).strip().lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise BadInputError(f"bad value {text!r} for {where}: expected true or false")
    if tp in (int, float):
        if isinstance(text, bool):
            raise BadInputError(f"bad value {text!r} for {where}: expected {tp.__name__}")
        try:
            value = tp(text) if not (tp is int and isinstance(text, str)) else int(text.strip(), 0)
        except (TypeError, ValueError):
            if tp is int:
                try:
                    as_float = float(text)
                except (TypeError, ValueError):
                    as_float = float("nan")
                if as_float.is_integer():
                    return int(as_float)
            raise BadInputError(f"bad value {text!r} for {where}: expected {tp.__name__}") from None
        if tp is float and value != value:  # NaN is never a meaningful option value
            raise BadInputError(f"bad value {text!r} for {where}: NaN is not allowed")
        return value
    if tp is str:
        return str(text)
    raise BadInputError(f"option {where} has a type ({tp!r}) that cannot be set from text")


def build_options(options_cls: type, values: dict[str, Any], pass_name: str) -> Any:
    """Instantiate ``options_cls`` from raw values, checking names and types."""
    types_by_name = resolved_types(options_cls)
    known = {f.name for f in option_fields(options_cls)}
    parsed: dict[str, Any] = {}
    for key, raw in values.items():
        if key not in known:
            hint = ", ".join(sorted(known)) or "none"
            raise BadInputError(f"pass '{pass_name}' has no option '{key}' (its options: {hint})")
        parsed[key] = parse_value(types_by_name[key], raw, f"{pass_name}.{key}")
    try:
        return options_cls(**parsed)
    except (TypeError, ValueError) as exc:
        raise BadInputError(f"bad options for pass '{pass_name}': {exc}") from exc
