"""The IR: a module-level ``torch.fx.GraphModule`` plus per-node metadata.

Every pass takes an :class:`IR` and returns one. Metadata lives on each node as
``node.meta["sculpt"]`` (a :class:`NodeMeta`), so it follows the node through graph edits;
:meth:`IR.propagate` recomputes it from the graph and the example input shape.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from fxsculpt.ir.canonical import canonicalize
from fxsculpt.ir.constructs import ARCH_PARAM_NAMES, SearchConstruct
from fxsculpt.ir.errors import BadInputError, first_line

META_KEY = "sculpt"


@dataclass
class NodeMeta:
    """What the IR knows about one node; per-sample counts (batch size 1)."""

    shape: tuple[int, ...] | None = None
    dtype: str | None = None
    params: int = 0
    macs: int = 0
    weight_bits: int | None = None  # None: float32
    act_bits: int | None = None  # None: float32
    latency_ms: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class LayerRow:
    """One row of the layer table in reports: a node that holds weights or does work."""

    name: str
    op: str
    shape: tuple[int, ...] | None
    params: int
    macs: int
    weight_bits: int | None = None
    act_bits: int | None = None

    def as_dict(self) -> dict[str, Any]:
        row = asdict(self)
        row["shape"] = list(self.shape) if self.shape is not None else None
        return row


#: Layer classes whose subclasses stay leaves when they compute exactly what the base class does.
_STANDARD_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)
#: Third-party subclasses that override ``forward`` only for TorchScript (eager result unchanged):
#: timm's ``Linear`` casts its weights when scripted and otherwise calls ``F.linear``.
_EQUIVALENT_SUBCLASSES = frozenset({"timm.layers.linear.Linear"})


def is_standard_layer(m: nn.Module) -> bool:
    """Whether ``m`` is a Conv/Linear, or a third-party subclass with the base class's forward.

    Such a subclass traced through becomes a bare ``F.linear`` on its parameters, which no pass
    recognises as a layer (timm's classifier head stayed unquantized that way); kept as a leaf it
    is a layer like any other. A subclass with its own forward (timm's ``Conv2dSame`` pads first)
    is traced through, so what it adds stays in the graph.
    """
    cls = type(m)
    for base in _STANDARD_LAYERS:
        if isinstance(m, base):
            qualified = f"{cls.__module__}.{cls.__qualname__}"
            return cls.forward is base.forward or qualified in _EQUIVALENT_SUBCLASSES
    return False


class SculptTracer(fx.Tracer):
    """fx tracer that keeps search constructs, standard layers (:func:`is_standard_layer`) and
    modules the user names as leaves."""

    def __init__(self, leaf_modules: Iterable[str] = ()) -> None:
        super().__init__()
        self.leaf_names = set(leaf_modules)

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if isinstance(m, SearchConstruct):
            return True
        if module_qualified_name in self.leaf_names or type(m).__name__ in self.leaf_names:
            return True
        if is_standard_layer(m):
            return True
        return super().is_leaf_module(m, module_qualified_name)


def trace(module: nn.Module, leaf_modules: Iterable[str] = ()) -> fx.GraphModule:
    """Symbolically trace ``module`` at module level (no friendly errors; see ``ir.trace``)."""
    tracer = SculptTracer(leaf_modules)
    graph = tracer.trace(module)
    name = type(module).__name__
    return fx.GraphModule(tracer.root, graph, name)


def conv_macs(module: nn.modules.conv._ConvNd, out_shape: Sequence[int]) -> int:
    """MACs of one convolution for one sample: output elements × (C_in / groups) × kernel area."""
    kernel = 1
    for k in module.kernel_size:
        kernel *= int(k)
    out_elems = 1
    for d in out_shape[1:]:
        out_elems *= int(d)
    return out_elems * (module.in_channels // module.groups) * kernel


def linear_macs(module: nn.Linear, out_shape: Sequence[int]) -> int:
    """MACs of one Linear for one sample: output elements × input features."""
    out_elems = 1
    for d in out_shape[1:]:
        out_elems *= int(d)
    return out_elems * module.in_features


def module_macs(module: nn.Module, inputs: Sequence[Any]) -> int:
    """MACs of any module for one sample, counted with hooks on its Conv and Linear leaves.

    ``inputs`` are real tensors (batch size ``b``); the total is divided by ``b``.
    """
    if isinstance(module, nn.modules.conv._ConvNd | nn.Linear):
        leaves: list[nn.Module] = [module]
    else:
        leaves = [m for m in module.modules() if isinstance(m, nn.modules.conv._ConvNd | nn.Linear)]
    if not leaves:
        return 0
    total = 0

    def hook(mod: nn.Module, _inp: Any, out: torch.Tensor) -> None:
        nonlocal total
        if isinstance(mod, nn.Linear):
            total += linear_macs(mod, tuple(out.shape)) * int(out.shape[0])
        else:
            assert isinstance(mod, nn.modules.conv._ConvNd)
            total += conv_macs(mod, tuple(out.shape)) * int(out.shape[0])

    handles = [leaf.register_forward_hook(hook) for leaf in leaves]
    try:
        with torch.no_grad():
            module(*inputs)
    finally:
        for h in handles:
            h.remove()
    batch = next((int(t.shape[0]) for t in inputs if isinstance(t, torch.Tensor) and t.dim() > 0), 1)
    return total // max(batch, 1)


def weight_param_count(module: nn.Module) -> int:
    """Parameters of ``module`` that are model weights (architecture variables excluded)."""
    return sum(
        p.numel() for name, p in module.named_parameters() if name.rsplit(".", 1)[-1] not in ARCH_PARAM_NAMES
    )


class _MetadataInterpreter(fx.Interpreter):
    """Runs the graph once on an example input and fills ``NodeMeta`` for every node."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        meta = NodeMeta()
        if isinstance(result, torch.Tensor):
            meta.shape = tuple(int(d) for d in result.shape)
            meta.dtype = str(result.dtype).replace("torch.", "")
        previous = n.meta.get(META_KEY)
        if isinstance(previous, NodeMeta):  # bits and measured latency survive re-propagation
            meta.weight_bits, meta.act_bits = previous.weight_bits, previous.act_bits
            meta.latency_ms, meta.extra = previous.latency_ms, previous.extra
        if n.op == "call_module":
            module = self.module.get_submodule(str(n.target))
            meta.params = weight_param_count(module)
            args = self.fetch_args_kwargs_from_env(n)[0]
            if isinstance(module, nn.modules.conv._ConvNd) and meta.shape is not None:
                meta.macs = conv_macs(module, meta.shape)
            elif isinstance(module, nn.Linear) and meta.shape is not None:
                meta.macs = linear_macs(module, meta.shape)
            else:
                meta.macs = module_macs(module, args)
        elif n.op == "get_attr":
            attr = self.fetch_attr(str(n.target))
            if isinstance(attr, nn.Parameter) and str(n.target).rsplit(".", 1)[-1] not in ARCH_PARAM_NAMES:
                meta.params = attr.numel()
        n.meta[META_KEY] = meta
        return result


class IR:
    """A traced model and what the passes know about it.

    ``input_shape`` includes the batch dimension (e.g. ``(1, 3, 32, 32)``); metadata counts
    are per sample. ``num_classes`` is the width of the model's output, when it is a classifier.
    """

    def __init__(
        self,
        gm: fx.GraphModule,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        source: str = "",
    ) -> None:
        self.gm = gm
        self.input_shape = tuple(int(d) for d in input_shape)
        self.num_classes = num_classes
        self.source = source

    # -- construction -------------------------------------------------------------------
    @classmethod
    def from_module(
        cls,
        module: nn.Module,
        input_shape: Sequence[int],
        num_classes: int | None = None,
        source: str = "",
        leaf_modules: Iterable[str] = (),
    ) -> IR:
        """Trace ``module``, put it in canonical form (:mod:`ir.canonical`) and propagate metadata.

        Raises the raw fx error if untraceable.
        """
        ir = cls(trace(module, leaf_modules), input_shape, num_classes, source)
        ir.propagate()
        if canonicalize(ir.gm):
            ir.propagate()
        return ir

    def clone(self) -> IR:
        """A deep copy: passes that need the graph they were given keep one of these."""
        return IR(copy.deepcopy(self.gm), self.input_shape, self.num_classes, self.source)

    # -- metadata ---------------------------------------------------------------------
    def example_input(self, batch: int | None = None, seed: int = 0) -> torch.Tensor:
        """A deterministic random input of the IR's shape (batch overridable)."""
        shape = list(self.input_shape)
        if batch is not None:
            shape[0] = batch
        generator = torch.Generator().manual_seed(seed)
        device = self.device
        return torch.randn(*shape, generator=generator).to(device)

    @property
    def device(self) -> torch.device:
        first = next(self.gm.parameters(), None)
        return first.device if first is not None else torch.device("cpu")

    def propagate(self) -> None:
        """Recompute shapes, dtypes, parameter counts and MACs of every node.

        Runs the graph in eval mode on an example input so BatchNorm statistics stay as
        they are; raises :class:`BadInputError` when the input shape does not fit.
        """
        was_training = self.gm.training
        self.gm.eval()
        try:
            with torch.no_grad():
                _MetadataInterpreter(self.gm).run(self.example_input())
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            raise BadInputError(
                f"input shape {','.join(map(str, self.input_shape))} does not fit the model: {first_line(exc)}"
            ) from exc
        finally:
            self.gm.train(was_training)

    def meta(self, node: fx.Node) -> NodeMeta:
        """The node's metadata (propagating first if it is missing)."""
        meta = node.meta.get(META_KEY)
        if not isinstance(meta, NodeMeta):
            self.propagate()
            meta = node.meta[META_KEY]
        return meta

    def nodes(self) -> list[fx.Node]:
        return list(self.gm.graph.nodes)

    def output_shape(self) -> tuple[int, ...] | None:
        out = next(n for n in reversed(self.gm.graph.nodes) if n.op == "output")
        arg = out.args[0]
        if isinstance(arg, list | tuple):
            arg = arg[0]
        return self.meta(arg).shape if isinstance(arg, fx.Node) else None

    def layers(self) -> list[LayerRow]:
        """Rows for every call_module node and every call_function node that does MACs."""
        rows: list[LayerRow] = []
        for node in self.gm.graph.nodes:
            if node.op not in ("call_module", "call_function", "call_method"):
                continue
            meta = self.meta(node)
            if node.op == "call_module":
                op = type(self.gm.get_submodule(str(node.target))).__name__
            else:
                op = getattr(node.target, "__name__", str(node.target))
                if not meta.macs and not meta.params:
                    continue
            rows.append(
                LayerRow(node.name, op, meta.shape, meta.params, meta.macs, meta.weight_bits, meta.act_bits)
            )
        return rows

    def param_count(self) -> int:
        """Model weights (architecture parameters excluded)."""
        return weight_param_count(self.gm)

    def mac_count(self) -> int:
        """MACs for one sample: the sum over nodes."""
        return sum(self.meta(n).macs for n in self.gm.graph.nodes)

    def size_bytes(self) -> int:
        """Model size counting each layer's weight bits (float32 where none is set)."""
        total_bits = 0
        counted: set[str] = set()
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                counted.add(str(node.target))
                bits = self.meta(node).weight_bits or 32
                total_bits += self.meta(node).params * bits
        for name, param in self.gm.named_parameters():
            owner = name.rsplit(".", 1)[0] if "." in name else ""
            if any(owner == c or owner.startswith(c + ".") for c in counted):
                continue
            if name.rsplit(".", 1)[-1] in ARCH_PARAM_NAMES:
                continue
            total_bits += param.numel() * 32
        return (total_bits + 7) // 8

    def summary(self) -> dict[str, int]:
        """The headline counts every report carries."""
        return {
            "params": self.param_count(),
            "macs": self.mac_count(),
            "size_bytes": self.size_bytes(),
            "nodes": len(self.gm.graph.nodes),
        }

    def construct_nodes(self, kind: type[SearchConstruct] = SearchConstruct) -> list[fx.Node]:
        """call_module nodes whose module is a search construct of ``kind``."""
        return [
            n
            for n in self.gm.graph.nodes
            if n.op == "call_module" and isinstance(self.gm.get_submodule(str(n.target)), kind)
        ]

    def arch_parameters(self) -> list[nn.Parameter]:
        """Every architecture parameter (α, λ, bit logits) in the graph."""
        params: list[nn.Parameter] = []
        for module in self.gm.modules():
            if isinstance(module, SearchConstruct):
                params.extend(module.arch_parameters())
        return params

    def weight_parameters(self) -> list[nn.Parameter]:
        """Every parameter that is not an architecture parameter."""
        arch = {id(p) for p in self.arch_parameters()}
        return [p for p in self.gm.parameters() if id(p) not in arch]
