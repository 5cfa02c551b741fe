"""Load what users actually have into the IR, and say plainly what is refused (DESIGN.md, "The IR").

Sources, by the form of ``source``:

- ``builtin:NAME``: a model from ``zoo/`` built for the requested classes and channels.
- ``*.pt2``: a ``torch.export`` program, lifted to module level (:mod:`ir.lift`).
- anything else (``.pt``, ``.pth``): a ``torch.save`` file, first opened with
  ``weights_only=True``. A state dict needs ``model_class`` (``pkg.module:ClassName``);
  a fully pickled module loads only with ``trust_model``, because unpickling it runs
  code named in the file.

Every refusal is one :class:`BadInputError` line that names the file and what to pass.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import pickle
import pickletools
import sys
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fxsculpt.ir.canonical import canonicalize
from fxsculpt.ir.errors import BadInputError, first_line
from fxsculpt.ir.fallback import export_graph
from fxsculpt.ir.graph import IR
from fxsculpt.ir.lift import lift_exported
from fxsculpt.ir.trace import trace_module

BUILTIN_PREFIX = "builtin:"


@dataclass
class LoadOptions:
    """How to load a model: the CLI's ``--trust-model``, ``--model-class``, ``--input-shape``, ...

    ``input_shape`` includes the batch dimension. ``in_channels`` and ``image_size`` only
    shape built-in models (and are read from ``input_shape`` when that is given).
    """

    trust_model: bool = False
    model_class: str | None = None
    input_shape: tuple[int, ...] | None = None
    num_classes: int | None = None
    in_channels: int = 3
    image_size: int = 32
    model_options: dict[str, str] = field(default_factory=dict)
    leaf_modules: tuple[str, ...] = ()


def load_ir(source: str, options: LoadOptions | None = None) -> IR:
    """Load ``source`` (``builtin:NAME`` or a file path), trace it and propagate its metadata.

    The model is put in eval mode. ``num_classes`` comes from the options or, when absent,
    from the last dimension of the propagated output shape.
    """
    options = options or LoadOptions()
    if options.input_shape is not None:
        _check_shape(options.input_shape)
    if source.startswith(BUILTIN_PREFIX):
        ir = _load_builtin(source[len(BUILTIN_PREFIX) :], options)
    else:
        path = Path(source)
        if not path.exists():
            raise BadInputError(f"model file {source} does not exist")
        if not path.is_file():
            raise BadInputError(f"model path {source} is not a file")
        if path.suffix == ".onnx":
            raise BadInputError(
                f"{source} is an ONNX file; fxsculpt loads PyTorch models (.pt/.pth/.pt2 or builtin:NAME)"
            )
        if path.suffix == ".pt2":
            ir = _load_program(path, options)
        else:
            module = _load_torch_file(path, options)
            ir = _ir_from_module(module, _require_shape(path, options), options, source)
    ir.source = source
    ir.gm.eval()
    ir.propagate()
    if canonicalize(ir.gm):
        ir.propagate()
    out_shape = ir.output_shape()
    inferred = int(out_shape[-1]) if out_shape is not None and len(out_shape) == 2 else None
    if options.num_classes is not None:
        if inferred is not None and inferred != options.num_classes:
            raise BadInputError(
                f"{source} outputs {inferred} classes but --num-classes says {options.num_classes}"
            )
        ir.num_classes = options.num_classes
    else:
        ir.num_classes = inferred
    return ir


# -- built-ins ---------------------------------------------------------------------------------


def _load_builtin(name: str, options: LoadOptions) -> IR:
    from fxsculpt.zoo import BuiltinSpec, build_builtin

    in_channels, image_size = options.in_channels, options.image_size
    if options.input_shape is not None:
        shape = options.input_shape
        if len(shape) != 4:
            raise BadInputError(
                f"builtin:{name} takes images: --input-shape must be N,C,H,W, got {','.join(map(str, shape))}"
            )
        if in_channels not in (3, shape[1]):
            raise BadInputError(
                f"--in-channels {in_channels} contradicts --input-shape {','.join(map(str, shape))}"
            )
        in_channels, image_size = shape[1], shape[2]
        input_shape = tuple(shape)
    else:
        if in_channels < 1 or image_size < 1:
            raise BadInputError("--in-channels and the image size must be positive")
        input_shape = (1, in_channels, image_size, image_size)
    spec = BuiltinSpec(
        num_classes=options.num_classes if options.num_classes is not None else 10,
        in_channels=in_channels,
        image_size=image_size,
        options=dict(options.model_options),
    )
    module = build_builtin(name, spec)
    return _ir_from_module(module, input_shape, options, BUILTIN_PREFIX + name)


def _ir_from_module(module: nn.Module, input_shape: tuple[int, ...], options: LoadOptions, source: str) -> IR:
    """Trace with torch.fx; where fx cannot, export with ``torch.export`` (:mod:`ir.fallback`).

    Only when both fail is the model refused: with fx's line (it names the user's code) and
    export's reason.
    """
    module.eval()
    try:
        gm = trace_module(module, options.leaf_modules)
    except BadInputError as fx_error:
        try:
            gm = export_graph(module, input_shape)
        except BadInputError as export_error:
            raise BadInputError(f"{fx_error}; {export_error}") from fx_error
    return IR(gm, input_shape, options.num_classes, source)


# -- torch.export programs ---------------------------------------------------------------------


def _load_program(path: Path, options: LoadOptions) -> IR:
    try:
        program = torch.export.load(str(path))
    except Exception as exc:  # zip, pickle and schema errors all mean one thing to the user
        raise BadInputError(
            f"{path} is not a readable torch.export program (.pt2): {first_line(exc).strip()}"
        ) from exc
    gm = lift_exported(program)
    shape = options.input_shape or _program_input_shape(program)
    if shape is None:
        raise BadInputError(f"cannot tell the input shape of {path}: pass --input-shape N,C,H,W")
    return IR(gm, shape, options.num_classes, str(path))


def _program_input_shape(program: torch.export.ExportedProgram) -> tuple[int, ...] | None:
    """The example input's shape when the program takes exactly one tensor."""
    example = program.example_inputs
    if example is None:
        return None
    args, kwargs = example
    tensors = [a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)]
    if len(tensors) != 1 or len(args) + len(kwargs) != 1:
        return None
    shape = [int(d) for d in tensors[0].shape]
    if shape and _batch_is_dynamic(program):
        shape[0] = 1  # metadata is per sample: use batch 1 when the program allows it
    return tuple(shape)


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    """Whether the single user input's first dimension is symbolic with 1 in its range."""
    inputs = set(program.graph_signature.user_inputs)
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in inputs:
            val = node.meta.get("val")
            if not isinstance(val, torch.Tensor) or val.dim() == 0:
                return False
            first = val.shape[0]
            if not isinstance(first, torch.SymInt):
                return False
            bounds = program.range_constraints.get(first.node.expr)
            return bounds is not None and int(bounds.lower) <= 1
    return False


# -- torch.save files -----------------------------------------------------------------------------


def _load_torch_file(path: Path, options: LoadOptions) -> nn.Module:
    """The module in a ``torch.save`` file: a state dict plus class, or a trusted pickled module."""
    if path.stat().st_size == 0:
        raise BadInputError(f"{path} is empty")
    _refuse_torchscript(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "Weights only load failed" not in str(exc):
            raise BadInputError(
                f"{path} is not a readable PyTorch file (corrupt or not made by torch.save)"
            ) from exc
        return _load_pickled_module(path, options)
    except Exception as exc:  # truncated zips, text files, foreign pickles: one message
        raise BadInputError(
            f"{path} is not a readable PyTorch file (truncated, corrupt or not made by torch.save: "
            f"{first_line(exc).strip()})"
        ) from exc
    state = _as_state_dict(obj)
    if state is None:
        raise BadInputError(
            f"{path} holds a {type(obj).__name__}, not a model: expected a state dict, a pickled "
            "nn.Module or a torch.export program"
        )
    if not options.model_class:
        raise BadInputError(
            f"{path} is a state dict (weights only): pass --model-class package.module:ClassName to build the model"
        )
    return _module_from_state(path, state, options.model_class)


def _as_state_dict(obj: Any) -> Mapping[str, torch.Tensor] | None:
    if isinstance(obj, Mapping) and "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        obj = obj["state_dict"]
    if (
        isinstance(obj, Mapping)
        and obj
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    ):
        return obj
    return None


def _refuse_torchscript(path: Path) -> None:
    if not zipfile.is_zipfile(path):
        return
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
    except (zipfile.BadZipFile, OSError):
        return
    if any(n.endswith("/constants.pkl") for n in names) and any("/code/" in n for n in names):
        raise BadInputError(
            f"{path} is a TorchScript archive, which torch.fx cannot trace: save the nn.Module "
            "(torch.save), its state dict, or a torch.export program (.pt2) instead"
        )


def pickled_globals(path: Path) -> list[str]:
    """The ``module.name`` globals a torch.save pickle references, read without unpickling."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as archive:
                name = next((n for n in archive.namelist() if n.endswith("data.pkl")), None)
                if name is None:
                    return []
                blob = archive.read(name)
        else:
            blob = path.read_bytes()
        found: list[str] = []
        strings: list[str] = []
        for opcode, arg, _ in pickletools.genops(blob):
            if opcode.name == "GLOBAL" and isinstance(arg, str):
                found.append(arg.replace(" ", "."))
            elif opcode.name in ("SHORT_BINUNICODE", "BINUNICODE", "UNICODE") and isinstance(arg, str):
                strings.append(arg)
            elif opcode.name == "STACK_GLOBAL" and len(strings) >= 2:
                found.append(f"{strings[-2]}.{strings[-1]}")
        return found
    except (ValueError, OSError, zipfile.BadZipFile, KeyError):
        return []


def _user_class(path: Path) -> str | None:
    """The first class a pickle names outside torch and the standard library: the user's model."""
    skip = ("torch.", "collections.", "builtins.", "_codecs.", "copyreg.", "numpy.", "__builtin__.")
    for name in pickled_globals(path):
        if not name.startswith(skip):
            return name
    return None


@contextlib.contextmanager
def _cwd_on_path() -> Iterator[None]:
    """Make modules in the current directory importable while loading user code."""
    cwd = os.getcwd()
    added = cwd not in sys.path
    if added:
        sys.path.insert(0, cwd)
    try:
        yield
    finally:
        if added and cwd in sys.path:
            sys.path.remove(cwd)


def _load_pickled_module(path: Path, options: LoadOptions) -> nn.Module:
    cls_name = _user_class(path)
    what = f"a pickled module ({cls_name})" if cls_name else "a pickled Python object"
    if not options.trust_model:
        raise BadInputError(
            f"{path} is {what}: unpickling it runs code named in the file; pass --trust-model if you "
            "trust it, or save a state dict (with --model-class) or a torch.export program instead"
        )
    if cls_name and cls_name.startswith("__main__."):
        raise BadInputError(
            f"{path} pickles {cls_name}, a class defined in the script that saved it, which cannot be "
            "imported here: move the class into a module and save a state dict (load it with --model-class)"
        )
    try:
        with _cwd_on_path():
            obj = torch.load(path, map_location="cpu", weights_only=False)
    except (ModuleNotFoundError, AttributeError) as exc:
        raise BadInputError(
            f"{path} needs code that cannot be imported here ({first_line(exc).strip()}): run from the folder "
            "that holds the model's package"
        ) from exc
    except Exception as exc:
        raise BadInputError(f"{path} could not be unpickled: {first_line(exc).strip()}") from exc
    if isinstance(obj, nn.Module):
        return obj
    state = _as_state_dict(obj)
    if state is not None and options.model_class:
        return _module_from_state(path, state, options.model_class)
    raise BadInputError(f"{path} unpickled to a {type(obj).__name__}, not an nn.Module")


def import_class(spec: str) -> type[nn.Module]:
    """``pkg.module:ClassName`` imported with the current directory on ``sys.path``."""
    module_name, sep, class_name = spec.partition(":")
    if not sep or not module_name or not class_name:
        raise BadInputError(f"--model-class must look like package.module:ClassName, got '{spec}'")
    try:
        with _cwd_on_path():
            module = importlib.import_module(module_name)
    except Exception as exc:
        raise BadInputError(
            f"cannot import '{module_name}' for --model-class: {first_line(exc).strip()}"
        ) from exc
    cls: Any = module
    for part in class_name.split("."):
        cls = getattr(cls, part, None)
        if cls is None:
            raise BadInputError(f"module '{module_name}' has no class '{class_name}' (from --model-class)")
    if not (isinstance(cls, type) and issubclass(cls, nn.Module)):
        raise BadInputError(f"--model-class {spec} is not an nn.Module subclass")
    return cls


def _module_from_state(path: Path, state: Mapping[str, torch.Tensor], class_spec: str) -> nn.Module:
    cls = import_class(class_spec)
    try:
        module = cls()
    except Exception as exc:
        raise BadInputError(
            f"{class_spec} cannot be built with no arguments: {first_line(exc).strip()}"
        ) from exc
    expected = set(module.state_dict())
    given = set(state)
    missing, unexpected = sorted(expected - given), sorted(given - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"missing {_few(missing)}")
        if unexpected:
            parts.append(f"unexpected {_few(unexpected)}")
        raise BadInputError(f"the state dict in {path} does not match {class_spec}: {'; '.join(parts)}")
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        detail = next((line.strip() for line in str(exc).splitlines() if "size mismatch" in line), None)
        raise BadInputError(
            f"the state dict in {path} does not fit {class_spec}: {detail or first_line(exc).strip()}"
        ) from exc
    return module


# -- small helpers ------------------------------------------------------------------------------------


def _few(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" (+{len(names) - limit} more)" if len(names) > limit else "")


def _check_shape(shape: tuple[int, ...]) -> None:
    if not shape or any(int(d) < 1 for d in shape):
        raise BadInputError(
            f"--input-shape must be positive integers like 1,3,32,32, got {','.join(map(str, shape))}"
        )


def _require_shape(path: Path, options: LoadOptions) -> tuple[int, ...]:
    if options.input_shape is None:
        raise BadInputError(
            f"the input shape of {path} is unknown: pass --input-shape N,C,H,W (e.g. 1,3,32,32)"
        )
    return tuple(options.input_shape)


def parse_shape(text: str) -> tuple[int, ...]:
    """``"1,3,32,32"`` (or ``1x3x32x32``) as a tuple; a clear error otherwise. For the CLI."""
    parts = [p for p in text.replace("x", ",").split(",") if p.strip()]
    try:
        shape = tuple(int(p) for p in parts)
    except ValueError:
        raise BadInputError(f"--input-shape must be integers like 1,3,32,32, got '{text}'") from None
    _check_shape(shape)
    return shape
