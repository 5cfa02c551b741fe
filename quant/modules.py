"""Quantizer constructs: the graph nodes through which the ``quantize`` pass speaks to the IR.

Three concrete :class:`ir.constructs.Quantizer` subclasses, all traced as leaf ``call_module``
nodes:

- :class:`ActQuantizer` sits after a node whose output it quantizes (per tensor; unsigned after
  ReLU-like ops, signed otherwise). It observes values during calibration.
- :class:`WeightQuantizer` *wraps* a Conv/Linear (the node keeps the layer's name and target, so
  MAC counting, the layer table and the exporter still see one node per layer) and feeds the layer
  a fake-quantized weight: symmetric, per output channel by default. For DFQ it holds
  ``bit_logits`` α over candidate widths, per layer or per group of output channels, and uses the
  softmax mixture ``Σ_j softmax(α)_j · Q_{b_j}(w)`` (Cheng et al. 2018, §3; the lecture's
  ``q_i = Σ_j softmax(α_i)_j · B(q_ij)``).
- :class:`FloatBoundary` sits in front of a layer kept in float that reads a quantized activation,
  so that ONNX Runtime does not quantize that layer itself (see the class).

After :meth:`WeightQuantizer.freeze` the weight is stored on its quantization grid, the bias on the
int32 grid (input scale × weight scale) that ONNX Runtime's integer kernels use, and the scales
are buffers, which is the form exported to ONNX (8-bit QDQ, opset-21 INT4 QDQ for 4 bits, an
8-bit container for other widths; see :mod:`quant.export`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from fxsculpt.ir.constructs import Quantizer
from fxsculpt.quant import fake_quant as fq

#: Layers a :class:`WeightQuantizer` can wrap (weights with output channels on dim 0).
WRAPPABLE = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)


class ActQuantizer(Quantizer):
    """Per-tensor activation fake quantization at ``bits`` (``None``: identity).

    ``signed`` picks symmetric codes around zero; otherwise the codes cover ``[0, t]``. With
    ``affine`` a signed quantizer calibrated by min/max (or MSE) at 8 bits instead spreads its 256 codes over
    ``[min(lo, 0), max(hi, 0)]`` with a zero point from calibration, as ``quantize_static`` does: a
    SiLU or hard-swish output (lo ≈ −0.3, hi ≫ 1) keeps nearly all 8 bits, where symmetric codes
    spend half of them on negatives it never reaches. The scale (and zero point) is set by
    :meth:`calibrate` from values seen while ``observing`` is on (the forward is then the identity);
    they are kept in the module's extra state with signedness and bits.
    """

    role = "activation"

    def __init__(
        self, bits: int | None = 8, signed: bool = False, sample_cap: int = 16384, affine: bool = False
    ) -> None:
        super().__init__(None if bits is None else fq.check_bits(bits))
        self.signed = signed
        self.affine = affine and signed  # unsigned codes already span [0, max]
        self.scale = 1.0
        #: the uint8 code of 0.0: 128 (signed) or 0 (unsigned) unless an affine calibration moved it
        self.zero_point = 128 if signed else 0
        self.low = 0.0
        self.calibrated = False
        self.observing = False
        self.sample_cap = sample_cap
        self.peak = 0.0
        self._samples: list[torch.Tensor] = []

    # -- calibration --------------------------------------------------------------------
    def start_observing(self) -> None:
        """Forget earlier observations and record what the following forwards see."""
        self.observing = True
        self.peak = 0.0
        self.low = 0.0
        self._samples = []

    def _observe(self, x: torch.Tensor) -> None:
        flat = x.detach().flatten().float()
        if not flat.numel():
            return
        if self.affine:  # the two ends apart: the top and the bottom of the range
            self.peak = max(self.peak, float(flat.max()))
            self.low = min(self.low, float(flat.min()))
        else:
            mags = flat.abs() if self.signed else flat.clamp_min(0)
            self.peak = max(self.peak, float(mags.max()))
        step = max(1, -(-flat.numel() // self.sample_cap))
        self._samples.append(flat[::step].cpu())

    def observed(self) -> torch.Tensor:
        """The (strided) sample of every value observed since :meth:`start_observing`."""
        return torch.cat(self._samples) if self._samples else torch.zeros(0)

    def calibrate(self, method: str = "minmax", percentile: float = 99.99) -> float:
        """Stop observing and set the scale from the observed values; returns the threshold."""
        from fxsculpt.quant.calibrate import mse_affine_range, threshold

        self.observing = False
        if self.bits is None:
            return 0.0
        if method in ("minmax", "mse") and self.affine and self.bits == 8:
            low, high = (
                (self.low, self.peak)
                if method == "minmax"
                else mse_affine_range(self.observed(), self.low, self.peak)
            )
            self.set_range(low, high)
            self._samples = []
            return high
        if self.affine:  # the other methods are symmetric: they need the largest magnitude
            self.peak = max(self.peak, -self.low)
        if method == "minmax":
            t = self.peak  # exact, not from the subsample
        else:
            t = threshold(self.observed(), method, self.bits, self.signed, percentile)
        self.set_threshold(t)
        self._samples = []
        return t

    def set_threshold(self, t: float) -> None:
        """Scale so that ``t`` is the largest positive grid point."""
        assert self.bits is not None
        self.scale = max(float(t), fq.EPS) / fq.positive_levels(self.bits, self.signed)
        self.zero_point = 128 if self.signed else 0
        self.calibrated = True

    def set_range(self, low: float, high: float) -> None:
        """Affine 8-bit codes: 0..255 over ``[min(low, 0), max(high, 0)]``, 0.0 exactly on a code."""
        self.scale, self.zero_point = fq.affine_grid(low, high)
        self.calibrated = True

    # -- forward ------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.observing:
            self._observe(x)
            return x
        if self.bits is None:
            return x
        if self.signed and self.zero_point != 128:  # an affine range (8 bits only)
            return fq.fake_quant_per_tensor(x, self.scale, self.zero_point, 0, 255)
        return fq.activation_fake_quant(x, self.scale, self.bits, self.signed)

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "signed": self.signed,
            "scale": self.scale,
            "calibrated": self.calibrated,
            "affine": self.affine,
            "zero_point": self.zero_point,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits, self.signed = state["bits"], state["signed"]
        self.scale, self.calibrated = float(state["scale"]), bool(state["calibrated"])
        self.affine = bool(state.get("affine", False))
        self.zero_point = int(state.get("zero_point", 128 if self.signed else 0))

    def extra_repr(self) -> str:
        kind = "signed" if self.signed else "unsigned"
        if self.signed and self.zero_point != 128:
            kind = f"affine, zero point {self.zero_point}"
        return f"bits={self.bits}, {kind}, scale={self.scale:.4g}"


class FloatBoundary(Quantizer):
    """Where a quantized activation enters a layer kept in float: an exact identity, ``max(x, x)``.

    ONNX Runtime (1.32, ``WeightBiasQuantization``) quantizes a Conv/Gemm's *float* weights to
    int8 itself, per tensor, whenever the layer's input comes straight from a DequantizeLinear
    and its output leads to a QuantizeLinear; its QDQ fusion then runs the layer as QLinearConv.
    So a layer the user kept in float silently became an int8 layer with weights the PyTorch model
    never had (97.9% top-1 agreement on CIFAR-10). This node sits between the activation quantizer
    and the float layer: in ONNX it is a ``Max(x, x)``, so the layer's input is no longer a
    DequantizeLinear output and ONNX Runtime leaves it a float Conv/Gemm on its float weights.

    Why ``max(x, x)``: it returns its input bit for bit for every value (±inf and NaN included), so
    the PyTorch model computes exactly what it did (the float layer still reads the quantized
    activation, on its grid), and ONNX Runtime has no rule that removes it. What it does remove was
    tried and failed: ``x * 1`` (no-op elimination), a same-shape Reshape. Reading the activation
    before its quantizer instead would have changed the PyTorch model, and would branch the
    producer's output before its QuantizeLinear, which stops ONNX Runtime from fusing the
    *producer* into an integer kernel. The cost is one elementwise op in front of a float layer.

    A quantizer fixed at float (``bits`` is None, as :class:`ir.constructs.Quantizer` defines
    one): the tracer keeps it a leaf, and hardware models count it as free like the other
    activation quantizers.
    """

    role = "activation"

    def __init__(self) -> None:
        super().__init__(None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(x, x)


class WeightQuantizer(Quantizer):
    """A Conv/Linear whose weight is fake-quantized before every use (symmetric, STE).

    ``bits`` is the layer's width (``None``: float). ``group_bits`` (set by a per-group DFQ
    search) gives one width per contiguous group of output channels; ``bits`` is then their
    maximum. ``per_channel`` picks one scale per output channel (default) or one per tensor.
    ``reduce_range`` keeps 8-bit weights to the codes ±63, so that int8 kernels that add product
    pairs in saturating 16 bits (x86 without VNNI, :mod:`hardware.int8_arithmetic`) compute
    exactly what this layer computes; the layer still stores 8 bits a weight.
    """

    role = "weight"

    def __init__(
        self, layer: nn.Module, bits: int | None = 8, per_channel: bool = True, reduce_range: bool = False
    ) -> None:
        if not isinstance(layer, WRAPPABLE):
            raise TypeError(f"cannot quantize the weights of {type(layer).__name__}")
        super().__init__(None if bits is None else fq.check_bits(bits))
        self.layer = layer
        self.per_channel = per_channel
        self.reduce_range = reduce_range
        self.group_bits: list[int] | None = None
        self.candidates: tuple[int, ...] = ()
        self.bit_logits: nn.Parameter | None = None
        self.frozen = False
        #: the scale of the activation quantizer feeding the layer, set by :meth:`freeze` (``None``:
        #: a float input); with it a frozen layer accumulates on integer codes (:meth:`integer_forward`)
        self.input_scale: float | None = None
        self.register_buffer("scale", None)

    # -- shapes ---------------------------------------------------------------------------
    @property
    def out_channels(self) -> int:
        return int(self.layer.weight.shape[0])

    @property
    def groups(self) -> int:
        """How many channel groups carry their own width (1: the whole layer)."""
        if self.bit_logits is not None:
            return int(self.bit_logits.shape[0])
        return len(self.group_bits) if self.group_bits is not None else 1

    def channel_groups(self, groups: int) -> torch.Tensor:
        """Group index of every output channel: ``groups`` contiguous, near-equal blocks."""
        return torch.arange(self.out_channels, device=self.layer.weight.device) * groups // self.out_channels

    def channel_bits(self) -> list[int] | None:
        """The width of every output channel (``None`` when the layer is float)."""
        if self.group_bits is not None:
            index = self.channel_groups(len(self.group_bits)).tolist()
            return [self.group_bits[g] for g in index]
        return None if self.bits is None else [self.bits] * self.out_channels

    # -- DFQ ------------------------------------------------------------------------------
    def enable_search(self, candidates: tuple[int, ...], groups: int = 1) -> None:
        """Add logits α (``groups × len(candidates)``, zeros: a uniform mixture) and search over them."""
        if not candidates:
            raise ValueError("a bit-width search needs at least one candidate")
        for b in candidates:
            fq.check_bits(b)
        groups = max(1, min(int(groups), self.out_channels))
        self.candidates = tuple(int(b) for b in candidates)
        self.bit_logits = nn.Parameter(torch.zeros(groups, len(candidates), device=self.layer.weight.device))
        self.group_bits = None
        self.frozen = False

    def probabilities(self) -> torch.Tensor:
        """softmax(α) per group (``groups × candidates``)."""
        assert self.bit_logits is not None
        return torch.softmax(self.bit_logits, dim=-1)

    def discretize(self) -> list[int]:
        """Replace the logits by the argmax width of each group (Cheng et al. 2018, §3.3)."""
        assert self.bit_logits is not None
        chosen = [self.candidates[int(i)] for i in self.bit_logits.detach().argmax(dim=-1).tolist()]
        self.set_group_bits(chosen)
        return chosen

    def set_group_bits(self, chosen: list[int]) -> None:
        """Fix one width per group (a single entry: the whole layer); drops any logits."""
        for b in chosen:
            fq.check_bits(b)
        self.bit_logits = None
        self.candidates = ()
        self.group_bits = list(chosen) if len(chosen) > 1 else None
        self.bits = max(chosen)
        self.frozen = False

    # -- quantized weights ----------------------------------------------------------------
    def _quantize_at(self, w: torch.Tensor, bits: int) -> torch.Tensor:
        return fq.fake_quant_per_channel(
            w, fq.weight_scale(w, bits, self.per_channel, self.reduce_range), bits
        )

    def quantized_weight(self) -> torch.Tensor:
        """The weight the layer computes with (differentiable in w by STE and in α)."""
        w = self.layer.weight
        if self.bit_logits is not None:
            shape = [-1] + [1] * (w.dim() - 1)
            per_channel = self.probabilities()[self.channel_groups(self.groups)]  # C × K
            mixed = torch.zeros_like(w)
            for k, b in enumerate(self.candidates):
                mixed = mixed + per_channel[:, k].reshape(shape) * self._quantize_at(w, b)
            return mixed
        if self.bits is None:
            return w
        if self.frozen:
            return self._export_form(w)
        if self.group_bits is None:
            return self._quantize_at(w, self.bits)
        bits_per_channel = torch.tensor(self.channel_bits(), device=w.device)
        shape = [-1] + [1] * (w.dim() - 1)
        out = torch.zeros_like(w)
        for b in sorted(set(self.group_bits)):
            mask = (bits_per_channel == b).to(w.dtype).reshape(shape)
            out = out + mask * self._quantize_at(w, b)
        return out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.computes_on_codes() and not torch.is_grad_enabled():
            return self.integer_forward(x)
        weight = self.quantized_weight()
        out = torch.func.functional_call(self.layer, {"weight": weight}, (x,))
        if self.computes_on_codes():  # the exact values, the float computation's gradient
            with torch.no_grad():
                exact = self.integer_forward(x)
            out = out + (exact - out).detach()
        return out

    def computes_on_codes(self) -> bool:
        """Whether the forward accumulates on integer codes: frozen on a quantized input, in eval mode
        (a training-mode dropout would move the input off its grid), and not being exported."""
        return (
            self.frozen
            and self.bits is not None
            and self.input_scale is not None
            and not self.training
            and not torch.compiler.is_exporting()
        )

    def integer_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The layer as an integer kernel computes it: an exact sum of code products, scaled once.

        ``x`` lies on its quantizer's grid and the frozen weight on its own, so both are integer
        codes times a scale. ONNX Runtime's QLinearConv/QGemm add the code products exactly in
        int32 and multiply the sum by one float32 multiplier; a float32 convolution of the
        dequantized values instead rounds every partial sum, and a layer output within that error
        of a half-code boundary (the next quantizer's) then rounds the other way. Here the codes are
        multiplied and added in float64 (exact: every partial sum is an integer below 2^53), the
        bias's int32 codes are added to that sum, and the scales applied once, so the float32
        result is the true value rounded once, as close to ONNX Runtime's as float32 allows. On
        timm's vit_tiny (trained 10 epochs) the teacher-forced one-code steps at Linear outputs
        fell from 1325 to 317 (of 3.5e8 values); with random weights end-to-end top-1 agreement
        with ONNX Runtime rose from 89.0% to 95.4% (CIFAR-10 test). The export still traces the
        float form (``torch.compiler.is_exporting``), which is the QDQ graph.
        """
        assert self.scale is not None and self.input_scale is not None
        shape = [-1] + [1] * (self.layer.weight.dim() - 1)
        weight_scale = self.scale.detach().double()
        weight_codes = torch.round(self.layer.weight.detach().double() / weight_scale.reshape(shape))
        input_codes = torch.round(x.double() / self.input_scale)
        if isinstance(self.layer, nn.Linear):
            total = torch.nn.functional.linear(input_codes, weight_codes)
            channel_axis = -1
        else:
            total = self.layer._conv_forward(input_codes, weight_codes, None)
            channel_axis = 1
        view = [1] * total.dim()
        view[channel_axis] = -1
        step = (self.input_scale * weight_scale).reshape(view)
        bias = getattr(self.layer, "bias", None)
        if bias is not None:  # frozen on the int32 grid: add its codes, as the kernels do
            total = total + torch.round(bias.detach().double().reshape(view) / step)
        return (total * step).to(x.dtype)

    # -- export form ----------------------------------------------------------------------
    def frozen_scales(self) -> torch.Tensor:
        """One scale per output channel for the current widths (from the current weight)."""
        bits = self.channel_bits()
        assert bits is not None
        w = self.layer.weight.detach()
        peak = (
            w.abs().flatten(1).amax(dim=1) if self.per_channel else w.abs().amax().expand(self.out_channels)
        )
        levels = torch.tensor(
            [fq.weight_levels(b, self.reduce_range) for b in bits], dtype=w.dtype, device=w.device
        )
        return (peak / levels).clamp_min(fq.EPS)

    def freeze(self, input_scale: float | None = None) -> None:
        """Snap the weight onto its grid and keep the scales as buffers (the exported form).

        Afterwards the weight is written as one 8-bit QDQ (or an INT4 QDQ when every channel is
        4-bit) on a constant, which exports cleanly, and gives the same values as before.

        ``input_scale`` is the scale of the activation quantizer feeding the layer (``None``: its
        input is float). With it the bias is also rounded onto the int32 grid ``input_scale ·
        scale[c]`` (:func:`quant.fake_quant.snap_bias`): that is the bias integer kernels add, and
        ONNX Runtime rounds a float bias onto that grid itself, for the fused QLinearConv/QGemm and
        for the INT4 layers it runs as a float Conv alike. Without this the PyTorch model kept the
        exact bias, and at 2 to 4 bits (a coarse grid) the half-step differences flipped 0.7 to
        1.5% of the top-1 predictions between PyTorch and ONNX Runtime on CIFAR-10. The bias
        moves by at most half a step, ``input_scale · scale[c] / 2`` per output channel. What
        still differs is float rounding within ~1e-5 of a tie (ONNX Runtime requantizes an exact
        integer accumulator, PyTorch a float sum): about one activation code in a million.
        """
        if self.bit_logits is not None:
            raise ValueError("discretize the bit-width search before freezing")
        if self.bits is None:
            self.frozen = False
            self.input_scale = None
            return
        self.input_scale = None if input_scale is None else float(input_scale)
        bias = getattr(self.layer, "bias", None)
        with torch.no_grad():
            snapped = self.quantized_weight().detach().clone()
            self.layer.weight.copy_(snapped)
            self.scale = fq.bias_safe_weight_scale(self.frozen_scales(), bias, input_scale)
            self.frozen = True
            # a scale raised for the bias's sake moves the grid: store the weight on the final one
            self.layer.weight.copy_(self._export_form(self.layer.weight))
            if bias is not None and input_scale is not None:
                bias.copy_(fq.snap_bias(bias, input_scale, self.scale))

    def uses_int4(self) -> bool:
        """Whether the exported form is an opset-21 INT4 QDQ (every channel 4-bit)."""
        return self.frozen and self.bits == 4 and self.group_bits is None

    def _export_form(self, w: torch.Tensor) -> torch.Tensor:
        assert self.scale is not None
        if self.uses_int4():
            from fxsculpt.quant.onnx_int4 import fake_quant_int4

            return fake_quant_int4(w, self.scale, 0)
        # 8 bits, or narrower codes held in the int8 container: |code| <= 2^(b-1) <= 128.
        return fq.fake_quant_per_channel(w, self.scale, 8)

    # -- size -------------------------------------------------------------------------------
    def weight_numel_per_channel(self) -> int:
        return int(self.layer.weight[0].numel())

    def size_bits(self) -> int:
        """Storage of the layer: each weight at its width, bias and per-channel scales at 32 bits."""
        bias = getattr(self.layer, "bias", None)
        extra = 32 * (bias.numel() if bias is not None else 0)
        bits = self.channel_bits()
        if bits is None:
            return 32 * int(self.layer.weight.numel()) + extra
        scales = 32 * (self.out_channels if self.per_channel else 1)
        return self.weight_numel_per_channel() * sum(bits) + extra + scales

    def expected_weight_bits(self) -> torch.Tensor:
        """``Σ_c n_c Σ_j softmax(α_{g(c)})_j b_j``: the weights' expected storage, differentiable in α."""
        if self.bit_logits is None:
            bits = self.channel_bits()
            numel = self.weight_numel_per_channel()
            return torch.tensor(float(numel * (sum(bits) if bits is not None else 32 * self.out_channels)))
        widths = torch.tensor(self.candidates, dtype=torch.float32, device=self.bit_logits.device)
        expected_per_group = self.probabilities() @ widths  # G
        channels_per_group = torch.bincount(self.channel_groups(self.groups), minlength=self.groups).float()
        return float(self.weight_numel_per_channel()) * (channels_per_group * expected_per_group).sum()

    def expected_size_bits(self) -> torch.Tensor:
        """DFQ's G for this layer: :meth:`expected_weight_bits` plus bias and scales at 32 bits.

        Differentiable in α; equals :meth:`size_bits` once the softmax is one-hot.
        """
        if self.bit_logits is None:
            return torch.tensor(float(self.size_bits()))
        bias = getattr(self.layer, "bias", None)
        fixed = 32.0 * (bias.numel() if bias is not None else 0) + 32.0 * (
            self.out_channels if self.per_channel else 1
        )
        return self.expected_weight_bits() + fixed

    def get_extra_state(self) -> dict[str, Any]:
        return {
            "bits": self.bits,
            "group_bits": self.group_bits,
            "per_channel": self.per_channel,
            "reduce_range": self.reduce_range,
            "frozen": self.frozen,
            "candidates": self.candidates,
            "input_scale": self.input_scale,
        }

    def set_extra_state(self, state: dict[str, Any]) -> None:
        self.bits, self.group_bits = state["bits"], state["group_bits"]
        self.per_channel, self.frozen = state["per_channel"], state["frozen"]
        self.reduce_range = bool(state.get("reduce_range", False))
        self.candidates = tuple(state["candidates"])
        self.input_scale = state.get("input_scale")

    def extra_repr(self) -> str:
        bits = self.group_bits if self.group_bits is not None else self.bits
        reduced = ", reduce_range=True" if self.reduce_range else ""
        return f"bits={bits}, per_channel={self.per_channel}{reduced}, frozen={self.frozen}"
