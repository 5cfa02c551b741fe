"""Built-in models, loaded as ``builtin:NAME``.

Each module in this package may define ``BUILTINS: dict[str, Builder]``; a builder takes a
:class:`BuiltinSpec` and returns an ``nn.Module``. Search spaces (``darts-supernet``,
``dso-supernet``, ...) are added by dropping a module here, without touching this file.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field

from torch import nn

from fxsculpt.ir.errors import BadInputError


@dataclass
class BuiltinSpec:
    """What a built-in model is built for: classes, input channels, image size, extra options.

    ``options`` holds builder-specific settings as strings (``--model-opt KEY=VALUE``;
    ``--genotype`` is stored as ``options["genotype"]``).
    """

    num_classes: int = 10
    in_channels: int = 3
    image_size: int = 32
    options: dict[str, str] = field(default_factory=dict)


Builder = Callable[[BuiltinSpec], nn.Module]


def builtin_models() -> dict[str, Builder]:
    """Every ``BUILTINS`` entry of every module in this package, by name."""
    import fxsculpt.zoo as package

    found: dict[str, Builder] = {}
    for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
        module = importlib.import_module(f"fxsculpt.zoo.{info.name}")
        for name, builder in getattr(module, "BUILTINS", {}).items():
            if name in found:
                raise RuntimeError(f"built-in model '{name}' is defined twice")
            found[name] = builder
    return found


def build_builtin(name: str, spec: BuiltinSpec) -> nn.Module:
    """Build ``builtin:name``; an unknown name is a clear error listing the known ones."""
    models = builtin_models()
    if name not in models:
        raise BadInputError(f"unknown built-in model '{name}' (known: {', '.join(sorted(models))})")
    return models[name](spec)
