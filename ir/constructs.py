"""Search constructs: the submodules through which every search pass speaks to the graph.

They are ordinary ``nn.Module`` subclasses that the tracer keeps opaque, so each one is a
single ``call_module`` node: shape propagation, MAC counting, passes and the exporter all
see one kind of object. Three kinds exist (DESIGN.md, "The IR"):

- :class:`Choice` — a DARTS mixed op: candidate ops plus architecture logits α.
- :class:`Gate` — a learnable scale λ on an edge, branch or channel group (L1 pruning).
- :class:`Quantizer` — fake quantization with a bit-width, or logits over candidate widths.

Architecture parameters (α, λ, bit logits) are registered under names listed in
``ARCH_PARAM_NAMES`` so that optimizers and parameter counts can tell them from weights.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import torch
from torch import nn

#: Parameter names that hold architecture variables rather than model weights.
ARCH_PARAM_NAMES = ("alpha", "lam", "bit_logits")


class SearchConstruct(nn.Module):
    """Base of every search construct; traced as a leaf module."""

    def arch_parameters(self) -> Iterator[nn.Parameter]:
        """The construct's own architecture parameters (not those of nested weights)."""
        for name, param in self.named_parameters(recurse=False):
            if name in ARCH_PARAM_NAMES:
                yield param


class Choice(SearchConstruct):
    """A mixed op: ``sum_o softmax(alpha)_o * op_o(x)`` (DARTS, Liu et al. 2019, eq. 2).

    ``candidate_names[i]`` names ``candidates[i]``; the name ``"none"`` marks the zero op,
    which contributes nothing to the sum and is skipped rather than computed.
    """

    def __init__(self, candidates: Sequence[nn.Module], candidate_names: Sequence[str]) -> None:
        super().__init__()
        if len(candidates) != len(candidate_names) or not candidates:
            raise ValueError("a Choice needs one name per candidate and at least one candidate")
        self.candidates = nn.ModuleList(candidates)
        self.candidate_names = list(candidate_names)
        self.alpha = nn.Parameter(1e-3 * torch.randn(len(candidates)))

    def mixture_weights(self) -> torch.Tensor:
        """softmax(α): the weight of each candidate in the mixture."""
        return torch.softmax(self.alpha, dim=-1)

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor:
        weights = self.mixture_weights()
        total: torch.Tensor | None = None
        for weight, name, op in zip(weights, self.candidate_names, self.candidates, strict=True):
            if name == "none":
                continue
            term = weight * op(*inputs)
            total = term if total is None else total + term
        if total is None:  # only "none": the edge carries zeros of the input's shape
            return torch.zeros_like(inputs[0])
        return total

    def strongest(self, exclude: Sequence[str] = ("none",)) -> int:
        """Index of the candidate with the largest softmax weight, skipping ``exclude``."""
        weights = self.mixture_weights().detach()
        ranked = sorted(range(len(weights)), key=lambda i: -float(weights[i]))
        for index in ranked:
            if self.candidate_names[index] not in exclude:
                return index
        raise ValueError("every candidate of this Choice is excluded")


class Gate(SearchConstruct):
    """Multiplies its input by a non-negative learnable scale λ (DSO-NAS, Zhang et al. 2018).

    ``groups == 0`` is one scalar λ for the whole edge; ``groups == g`` puts one λ on each of
    ``g`` equal groups of channels (dimension 1), as in Sparse Structure Selection.
    """

    def __init__(self, groups: int = 0, channels: int | None = None) -> None:
        super().__init__()
        if groups < 0:
            raise ValueError("groups must be >= 0")
        if groups and (channels is None or channels % groups):
            raise ValueError("channel groups need a channel count divisible by the group count")
        self.groups = groups
        self.channels = channels
        self.lam = nn.Parameter(torch.ones(max(groups, 1)))

    def channel_scale(self) -> torch.Tensor:
        """λ expanded to one value per channel (or a scalar when ``groups == 0``)."""
        if not self.groups:
            return self.lam.reshape(())
        assert self.channels is not None
        return self.lam.repeat_interleave(self.channels // self.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.channel_scale()
        if scale.dim() == 0:
            return x * scale
        shape = [1, -1] + [1] * (x.dim() - 2)
        return x * scale.reshape(shape)


class Quantizer(SearchConstruct):
    """Base of fake-quantization constructs; the quantization issue supplies the concrete ones.

    ``bits`` is the active bit-width, or ``None`` for float (the construct is then identity).
    ``role`` says what is quantized: ``"weight"`` or ``"activation"``.
    """

    role: str = "activation"

    def __init__(self, bits: int | None) -> None:
        super().__init__()
        self.bits = bits
