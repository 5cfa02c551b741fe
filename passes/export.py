"""``export``: write the IR as ONNX, check it, run it in ONNX Runtime and compare with PyTorch.

The pipeline always runs this pass last (``placement = "export"``). The file is produced by
``torch.onnx.export(..., dynamo=True, external_data=False)`` into the run's staging folder,
checked with ``onnx.checker`` (full check, which includes shape inference), then run in ONNX
Runtime on real inputs — the first test images when data is given, seeded random inputs
otherwise — and compared with PyTorch; a difference above the tolerance fails the run.

Besides the pass, this module holds the ONNX helpers other packages reuse:
:func:`export_onnx` (quiet, atomic, one-line errors, extra keyword arguments forwarded to
``torch.onnx.export`` such as ``custom_translation_table``), :func:`ort_session` and
:func:`run_onnx` / :func:`run_onnx_outputs`.

Opset facts for torch 2.13 (TOOLCHAIN.md): the dynamo exporter's native opset is 18 and the
highest it writes is 23; asking for less than 18 silently writes 18, so this pass refuses it.
"""

from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import re
import uuid
import warnings
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import numpy as np
import torch
from torch import fx

from fxsculpt.ir.errors import BadInputError, RunFailedError, first_line
from fxsculpt.ir.graph import IR
from fxsculpt.ir.verify import outputs_of
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.options import option
from fxsculpt.quant.onnx_weights import store_integer_weights

NATIVE_OPSET = 18
MAX_OPSET = 23

#: Loggers whose warnings (e.g. "torchvision is not installed") are noise during export.
_NOISY_LOGGERS = (
    "torch.onnx",
    "torch.export",
    "torch._export",
    "torch.fx.experimental",
    "onnxscript",
    "onnx_ir",
)

log = logging.getLogger(__name__)

_ANSI = re.compile(r"\x1b\[[0-9;]*m")


@contextlib.contextmanager
def _quiet() -> Iterator[io.StringIO]:
    """Capture prints, warnings and exporter log records; yields the captured text buffer."""
    buffer = io.StringIO()
    levels = {name: logging.getLogger(name).level for name in _NOISY_LOGGERS}
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    try:
        with (
            warnings.catch_warnings(record=True) as caught,
            contextlib.redirect_stdout(buffer),
            contextlib.redirect_stderr(buffer),
        ):
            warnings.simplefilter("always")
            try:
                yield buffer
            finally:
                for item in caught:
                    buffer.write(f"warning: {item.message}\n")
    finally:
        for name, level in levels.items():
            logging.getLogger(name).setLevel(level)


def export_error_line(exc: BaseException) -> str:
    """The one line of an exporter error that says what went wrong.

    The dynamo exporter's message is a page of advice with the cause under
    ``## Exception summary``; this returns that cause (or the message's first line).
    """
    text = _ANSI.sub("", str(exc)).strip()
    lines = [line.strip() for line in text.splitlines()]
    if "## Exception summary" in lines:
        after = lines[lines.index("## Exception summary") + 1 :]
        rest = [line for line in after if line]
        cause = rest[0] if rest else ""
        if cause.endswith(":") and len(rest) > 1:  # "Found the following conflicts ...:" + the conflict
            cause = f"{cause} {rest[1].lstrip('- ')}"
        cause = re.sub(r"^<class '([\w.]+\.)?(\w+)'>:\s*", r"\2: ", cause)
        if cause:
            return cause[:500]
    first = next((line for line in lines if line), type(exc).__name__)
    return first[:500]


def export_onnx(
    gm: torch.nn.Module,
    example_input: torch.Tensor,
    path: str | os.PathLike[str],
    opset: int = NATIVE_OPSET,
    dynamic_batch: bool = True,
    **extra: Any,
) -> None:
    """Export ``gm`` (as it is: call ``.eval()`` first) to ONNX at ``path``.

    Uses the dynamo exporter with the weights inside the one file. ``dynamic_batch`` makes
    dimension 0 of the input symbolic. The exporter's prints, warnings and log records are
    swallowed; on failure they are logged at debug level and a :class:`RunFailedError` with
    one line is raised. The file is written under a temporary name in the same folder and
    renamed into place, so ``path`` is either complete or absent. ``extra`` goes to
    ``torch.onnx.export`` unchanged and overrides the defaults here (e.g.
    ``custom_translation_table`` for int4 QuantizeLinear).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    kwargs: dict[str, Any] = {
        "dynamo": True,
        "external_data": False,
        "opset_version": opset,
        "verbose": False,
    }
    if dynamic_batch:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim.DYNAMIC},)
    kwargs.update(extra)
    single_file = not kwargs.get("external_data", False)
    # Not mkstemp: the exporter creates the file itself, so it gets the usual permissions (umask).
    tmp = target.parent / f".{target.stem}.{os.getpid()}.{uuid.uuid4().hex[:8]}.partial.onnx"
    out_file = tmp if single_file else target
    try:
        with _quiet() as captured:
            try:
                torch.onnx.export(gm, (example_input,), str(out_file), **kwargs)
            except Exception as exc:
                log.debug("ONNX exporter output:\n%s\n%s", captured.getvalue(), exc)
                line = export_error_line(exc)
                if dynamic_batch and "static shape" in line:
                    line += " (the model fixes its batch size: set export.dynamic_batch=false)"
                raise RunFailedError(f"ONNX export failed: {line}") from exc
        if single_file:
            store_integer_weights(tmp)  # int8 weights as int8 in the file (quant.onnx_weights)
            os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


OrtLevel = Literal["disable", "basic", "extended", "all"]


def ort_session(
    path: str | os.PathLike[str],
    threads: int = 1,
    *,
    optimization: OrtLevel = "all",
    profile_prefix: str | None = None,
) -> Any:
    """An ONNX Runtime CPU session with fixed thread counts (``threads`` intra-op, 1 inter-op).

    ``optimization`` sets the graph optimization level (profile at ``"extended"`` so node
    names still map to the file, TOOLCHAIN.md); ``profile_prefix`` turns profiling on.
    """
    import onnxruntime as ort

    levels = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = max(1, int(threads))
    options.inter_op_num_threads = 1
    options.graph_optimization_level = levels[optimization]
    options.log_severity_level = 3  # errors only
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        first = first_line(exc)
        raise RunFailedError(f"ONNX Runtime cannot load {Path(path).name}: {first}") from exc


def run_onnx_outputs(session: Any, x: np.ndarray) -> list[np.ndarray]:
    """Every output of ``session`` on the one input ``x`` (cast to float32 when it is float)."""
    if np.issubdtype(x.dtype, np.floating) and x.dtype != np.float32:
        x = x.astype(np.float32)
    name = session.get_inputs()[0].name
    try:
        return list(session.run(None, {name: np.ascontiguousarray(x)}))
    except Exception as exc:  # onnxruntime raises its own exception types
        first = first_line(exc)
        raise RunFailedError(f"ONNX Runtime failed on an input of shape {tuple(x.shape)}: {first}") from exc


def run_onnx(session: Any, x: np.ndarray) -> np.ndarray:
    """The first output of ``session`` on input ``x``."""
    return run_onnx_outputs(session, x)[0]


#: Parity rule for models with quantizers: top-1 agreement between ONNX Runtime and PyTorch.
QUANTIZED_MIN_AGREEMENT = 0.99


@dataclass
class ExportOptions:
    opset: int = option(NATIVE_OPSET, "ONNX opset, 18 (the exporter's native one) to 23 (its maximum)")
    atol: float = option(1e-4, "parity tolerance, scaled by max(1, max |PyTorch output|)")
    dynamic_batch: bool = option(True, "make the batch dimension symbolic (checked at several batch sizes)")
    compare_samples: int = option(256, "inputs compared between ONNX Runtime and PyTorch")

    def __post_init__(self) -> None:
        if not NATIVE_OPSET <= self.opset <= MAX_OPSET:
            raise ValueError(
                f"export.opset must be {NATIVE_OPSET}..{MAX_OPSET} (torch 2.13 writes 18 for anything lower)"
            )
        if not self.atol > 0:
            raise ValueError("export.atol must be positive")
        if self.compare_samples < 1:
            raise ValueError("export.compare_samples must be at least 1")


def batch_sizes(total: int, dynamic: bool, fixed: int, chunk: int = 64) -> list[int]:
    """How ``total`` compared samples are split into batches.

    Dynamic: 1, then 5, then chunks of ``chunk`` (so batch sizes 1 and 5 always run when
    ``total`` allows). Fixed: whole batches of the exported size, at least one.
    """
    if not dynamic:
        return [fixed] * max(1, total // fixed)
    sizes: list[int] = []
    left = total
    for size in (1, 5):
        if left <= 0:
            break
        sizes.append(min(size, left))
        left -= sizes[-1]
    while left > 0:
        sizes.append(min(chunk, left))
        left -= sizes[-1]
    return sizes


def comparison_inputs(ir: IR, ctx: Context, samples: int, dynamic: bool) -> tuple[list[torch.Tensor], str]:
    """The batches to compare on: the first test images when data is given, else seeded noise.

    With data, at most ``samples`` test images are used (all of them when there are fewer);
    a fixed-batch export with fewer test images than its batch size falls back to noise.
    """
    fixed = ir.input_shape[0]
    shape = tuple(ir.input_shape[1:])
    if ctx.data is not None:
        images = ctx.data.test.tensors[0]
        if tuple(images.shape[1:]) != shape:
            raise BadInputError(f"test images have shape {tuple(images.shape[1:])}, the model takes {shape}")
        available = min(samples, len(images))
        if available >= (1 if dynamic else fixed):
            sizes = batch_sizes(available, dynamic, fixed)
            flat = images[: sum(sizes)].float()
            return list(torch.split(flat, sizes)), "test split"
    generator = ctx.generator("export")
    sizes = batch_sizes(samples, dynamic, fixed)
    return [torch.randn(size, *shape, generator=generator) for size in sizes], "random"


def onnx_structure(path: Path) -> tuple[int, dict[str, int], int]:
    """Node count, op-type counts (main graph) and opset (default domain) of an ONNX file."""
    import onnx

    model = onnx.load(str(path))
    counts = Counter(node.op_type for node in model.graph.node)
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), -1)
    return len(model.graph.node), dict(sorted(counts.items())), int(opset)


@dataclass
class Parity:
    """The outcome of comparing ONNX Runtime with PyTorch."""

    max_abs_diff: float
    tolerance: float
    samples: int
    top1_agreement: float | None
    batch_sizes: list[int]
    #: with a float64 reference: top-1 agreement with the model in its own float32 arithmetic
    top1_agreement_float32: float | None = None


def compare_with_torch(
    gm: torch.nn.Module,
    session: Any,
    batches: Sequence[torch.Tensor],
    atol: float,
    num_classes: int | None,
    exact: torch.nn.Module | None = None,
) -> Parity:
    """Run every batch through PyTorch and ONNX Runtime and measure the worst difference.

    The tolerance is ``atol * max(1, max |PyTorch output|)``, as in ``ir.verify``. Top-1
    agreement is measured on the first output when it is ``(N, num_classes)``. With ``exact``
    (``gm`` in float64, :func:`float64_reference`) the difference and the agreement are measured
    against it, and the agreement with ``gm`` itself is kept as ``top1_agreement_float32``.
    """
    worst, scale, samples = 0.0, 1.0, 0
    agree, agree_float32, counted = 0, 0, 0
    reference = cast(fx.GraphModule, exact if exact is not None else gm)
    for x in batches:
        x_reference = x.double() if exact is not None else x
        expected = [t.detach().cpu().float().numpy() for t in outputs_of(reference, x_reference)]
        got = run_onnx_outputs(session, x.cpu().numpy())
        if len(got) != len(expected):
            raise RunFailedError(f"ONNX model has {len(got)} outputs, PyTorch returned {len(expected)}")
        for e, g in zip(expected, got, strict=True):
            if e.shape != g.shape:
                raise RunFailedError(f"ONNX output shape {g.shape} differs from PyTorch's {e.shape}")
            if e.size:
                worst = max(worst, float(np.max(np.abs(e.astype(np.float64) - g.astype(np.float64)))))
                scale = max(scale, float(np.max(np.abs(e))))
        first_e, first_g = expected[0], got[0]
        if num_classes is not None and first_e.ndim == 2 and first_e.shape[1] == num_classes:
            predicted = first_g.argmax(axis=1)
            agree += int((first_e.argmax(axis=1) == predicted).sum())
            if exact is not None:
                single = outputs_of(cast(fx.GraphModule, gm), x)[0].detach().cpu().float().numpy()
                agree_float32 += int((single.argmax(axis=1) == predicted).sum())
            counted += first_e.shape[0]
        samples += int(x.shape[0])
    top1 = agree / counted if counted else None
    top1_float32 = agree_float32 / counted if counted and exact is not None else None
    return Parity(worst, atol * scale, samples, top1, [int(b.shape[0]) for b in batches], top1_float32)


def float64_reference(gm: torch.nn.Module, example: torch.Tensor) -> torch.nn.Module | None:
    """A float64 copy of the quantized model ``gm``: the reference its ONNX file is held to.

    The quantized model is integer codes and scales; PyTorch's float32 run of it and ONNX
    Runtime's kernels are two approximations of the same values, and each rounds a value within
    its float error of a half-code boundary its own way. Where the two disagree on a top-1
    prediction, either may be the one that moved, so float32 PyTorch is not a fair judge of the
    file: on timm's vit_tiny (trained) PyTorch's own float32 and float64 runs disagreed on 6 of
    846 CIFAR-10 test images, ONNX Runtime and float64 on 7. In float64 the model's float ops
    (LayerNorm, softmax, GELU) are exact to far below a code, and the layers already accumulate
    exactly (:meth:`quant.modules.WeightQuantizer.integer_forward`), so only the file's own
    rounding is counted against it. ``None`` where some op of ``gm`` has no float64 kernel.
    """
    exact = copy.deepcopy(gm).double()
    try:
        outputs_of(cast(fx.GraphModule, exact), example.double())
    except (RuntimeError, TypeError, NotImplementedError):
        return None
    return exact


def _kernel_mismatch(kernels: Any, source: str) -> str:
    """One line naming the quantizer where ONNX Runtime's integer kernels part from PyTorch."""
    worst = kernels.worst
    if worst is not None and not worst.faithful:
        return (
            f"ONNX Runtime's integer kernels differ from the quantized PyTorch model at {worst.name}: "
            f"codes off by up to {worst.max_step}, by one on {100 * worst.off_boundary_fraction:.2f}% of "
            "values away from a half-code boundary "
            f"({kernels.samples} {source} inputs, each layer fed ONNX Runtime's own inputs)"
        )
    return (
        f"with ONNX Runtime's activations fed back, PyTorch's outputs differ by "
        f"{kernels.forced_max_abs_diff:.3g} (tolerance {kernels.tolerance:.3g}) on {kernels.samples} {source} inputs"
    )


class Export(Pass):
    """Export ONNX, run onnx.checker, and check ONNX Runtime's outputs against PyTorch's."""

    name = "export"
    Options = ExportOptions
    placement = "export"

    def run(self, ir: IR, ctx: Context) -> IR:
        import onnx

        opts: ExportOptions = self.options
        path = ctx.stage("model.onnx")
        gm = ir.gm if ir.device.type == "cpu" else copy.deepcopy(ir.gm).cpu()
        was_training = gm.training
        gm.eval()
        try:
            fixed = ir.input_shape[0]
            example = ir.example_input(batch=2 if opts.dynamic_batch else fixed, seed=ctx.seed).cpu()
            # Quantizers say what they need (opset 21 + a translation table for INT4 weights).
            from fxsculpt.quant.export import export_settings, has_quantizers

            quantized = has_quantizers(gm)
            opset_needed, extra = export_settings(gm, opts.opset)
            export_onnx(gm, example, path, opset=opset_needed, dynamic_batch=opts.dynamic_batch, **extra)
            try:
                onnx.checker.check_model(str(path), full_check=True)
            except Exception as exc:
                raise RunFailedError(
                    f"onnx.checker rejected the exported model: {export_error_line(exc)}"
                ) from exc
            session = ort_session(path, threads=ctx.threads)
            batches, source = comparison_inputs(ir, ctx, opts.compare_samples, opts.dynamic_batch)
            exact = float64_reference(gm, example) if quantized else None
            parity = compare_with_torch(gm, session, batches, opts.atol, ir.num_classes, exact)
        except BaseException:
            path.unlink(missing_ok=True)  # nothing half-checked stays behind, even in staging
            raise
        finally:
            gm.train(was_training)
        nodes, op_counts, opset = onnx_structure(path)
        section = {
            "path": "model.onnx",
            "opset": opset,
            "max_abs_diff": parity.max_abs_diff,
            "tolerance": parity.tolerance,
            "top1_agreement": parity.top1_agreement,
            "reference": "quantized PyTorch model in float64" if exact is not None else "PyTorch model",
            "samples_compared": parity.samples,
            "inputs": source,
            "batch_sizes": sorted(set(parity.batch_sizes)),
            "dynamic_batch": opts.dynamic_batch,
            "nodes": nodes,
            "op_counts": op_counts,
            "file_bytes": path.stat().st_size,
        }
        ctx.section("onnx", section)
        ctx.record(
            max_abs_diff=parity.max_abs_diff,
            samples_compared=parity.samples,
            onnx_nodes=nodes,
            file_bytes=section["file_bytes"],
        )
        if parity.top1_agreement_float32 is not None:
            section["top1_agreement_float32"] = parity.top1_agreement_float32
        kernels = None
        if quantized:
            from fxsculpt.quant.kernel_parity import kernel_parity

            kernels = kernel_parity(gm, path, batches, opts.atol, threads=ctx.threads)
        if kernels is not None:
            # Each integer kernel is judged on ONNX Runtime's own inputs (teacher forcing): end-to-end
            # agreement of a random-weight network measures how it amplifies one-code ties, not the
            # export (quant/kernel_parity.py). Top-1 agreement and the max diff are still reported.
            summary = kernels.summary()
            section["kernel_parity"] = summary
            section["parity_rule"] = summary["rule"]
            if not kernels.holds:
                path.unlink(missing_ok=True)
                raise RunFailedError(_kernel_mismatch(kernels, source))
        elif quantized and parity.top1_agreement is not None:
            # Integer kernels round intermediate values differently from fake quantization, so
            # a quantized classifier is held to top-1 agreement (>= 99%), the max diff reported.
            section["parity_rule"] = f"top-1 agreement >= {QUANTIZED_MIN_AGREEMENT}"
            if parity.top1_agreement < QUANTIZED_MIN_AGREEMENT:
                path.unlink(missing_ok=True)
                raise RunFailedError(
                    f"ONNX Runtime agrees with the quantized PyTorch model on only "
                    f"{100 * parity.top1_agreement:.1f}% of top-1 predictions "
                    f"(max abs diff {parity.max_abs_diff:.3g}) on {parity.samples} {source} inputs"
                )
        elif parity.max_abs_diff > parity.tolerance:
            path.unlink(missing_ok=True)
            raise RunFailedError(
                f"ONNX Runtime's outputs differ from PyTorch's by {parity.max_abs_diff:.3g} "
                f"(tolerance {parity.tolerance:.3g}) on {parity.samples} {source} inputs"
            )
        return ir
