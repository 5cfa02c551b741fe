"""Pass registry shared by the CLI and the Python API; plugins add to an instance, not a global."""

from __future__ import annotations

import importlib
import importlib.metadata
import importlib.util
import inspect
import pkgutil
import sys
from collections.abc import Iterable
from pathlib import Path
from types import ModuleType

from fxsculpt.ir.errors import BadInputError
from fxsculpt.passes.base import Pass

ENTRY_POINT_GROUP = "fxsculpt.passes"


def pass_classes_in(module: ModuleType) -> list[type[Pass]]:
    """The named ``Pass`` subclasses defined (not merely imported) in ``module``."""
    found = []
    for _, obj in inspect.getmembers(module, inspect.isclass):
        if issubclass(obj, Pass) and obj is not Pass and obj.name and obj.__module__ == module.__name__:
            found.append(obj)
    return found


class PassRegistry:
    """Name → pass class. ``PassRegistry.with_builtins()`` holds every pass in ``passes/``."""

    def __init__(self) -> None:
        self._passes: dict[str, type[Pass]] = {}

    def register(self, pass_cls: type[Pass]) -> type[Pass]:
        """Add a pass class under its ``name`` (usable as a decorator); a name is taken once."""
        if not pass_cls.name:
            raise ValueError(f"{pass_cls.__name__} has no name")
        existing = self._passes.get(pass_cls.name)
        if existing is not None and existing is not pass_cls:
            raise BadInputError(
                f"two passes are named '{pass_cls.name}' ({existing.__module__} and {pass_cls.__module__})"
            )
        self._passes[pass_cls.name] = pass_cls
        return pass_cls

    def register_module(self, module: ModuleType) -> list[type[Pass]]:
        classes = pass_classes_in(module)
        for cls in classes:
            self.register(cls)
        return classes

    @classmethod
    def with_builtins(cls) -> PassRegistry:
        """A registry holding every pass defined in the modules of the ``passes`` package."""
        registry = cls()
        import fxsculpt.passes as package

        for info in sorted(pkgutil.iter_modules(package.__path__), key=lambda i: i.name):
            registry.register_module(importlib.import_module(f"fxsculpt.passes.{info.name}"))
        return registry

    def load_plugin(self, path: str | Path) -> list[type[Pass]]:
        """Import a user's Python file and register the passes it defines."""
        file = Path(path)
        if not file.is_file():
            raise BadInputError(f"plugin file {file} does not exist")
        module_name = f"fxsculpt_plugin_{file.stem}_{abs(hash(str(file.resolve()))) % 10**8}"
        spec = importlib.util.spec_from_file_location(module_name, file)
        if spec is None or spec.loader is None:
            raise BadInputError(f"plugin file {file} is not an importable Python file")
        module = importlib.util.module_from_spec(spec)
        sys.modules[module_name] = module
        try:
            spec.loader.exec_module(module)
        except Exception as exc:
            raise BadInputError(f"plugin file {file} failed to import: {type(exc).__name__}: {exc}") from exc
        classes = self.register_module(module)
        if not classes:
            raise BadInputError(f"plugin file {file} defines no Pass subclass with a name")
        return classes

    def load_entry_points(self) -> None:
        """Register passes that installed packages expose under the ``fxsculpt.passes`` group."""
        for entry in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
            loaded = entry.load()
            if isinstance(loaded, ModuleType):
                self.register_module(loaded)
            elif inspect.isclass(loaded) and issubclass(loaded, Pass):
                self.register(loaded)

    def get(self, name: str) -> type[Pass]:
        try:
            return self._passes[name]
        except KeyError:
            known = ", ".join(sorted(self._passes))
            raise BadInputError(f"unknown pass '{name}' (known passes: {known})") from None

    def __contains__(self, name: object) -> bool:
        return name in self._passes

    def names(self) -> list[str]:
        return sorted(self._passes)

    def classes(self) -> Iterable[type[Pass]]:
        return [self._passes[n] for n in self.names()]
