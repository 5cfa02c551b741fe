"""HAQ's environment: apply a policy to the model, fine-tune briefly, measure validation accuracy.

Per episode (HAQ §3.5 and the official code's ``LinearQuantizeEnv``): restore the float
weights, set every layer's weight bits and the bits of the activation quantizer feeding it,
calibrate the activation scales on a few training batches, fine-tune for a short while
(default: one pass over a fixed search subset of the training split, SGD with momentum 0.9
at lr 1e-3, as the official ``finetune_lr``), and return top-1 accuracy on the validation
split (carved from the training data; the test split is never touched by the search).
"""

from __future__ import annotations

import copy
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx
from torch.utils.data import Subset, TensorDataset

from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import TrainSettings
from fxsculpt.quant.haq.actions import Bits
from fxsculpt.quant.haq.enforce import Policy
from fxsculpt.quant.haq.search import Evaluation
from fxsculpt.quant.insert import act_quantizers, input_quantizer, is_relu_like, set_bits
from fxsculpt.quant.modules import ActQuantizer
from fxsculpt.training.loop import evaluate, train_model

#: Below this many bits an activation's clip threshold is chosen by ``low_bit_calibration``.
LOW_BITS = 5


@dataclass
class EnvSettings:
    """How an episode measures a policy.

    ``low_bit_calibration`` picks the clip threshold of activation quantizers below 5 bits
    (``percentile``, ``kl`` or ``minmax``; see :func:`calibrate_activations`); wider ones use min/max.
    """

    finetune_epochs: int = 1
    finetune_lr: float = 1e-3
    batch_size: int = 64
    calib_batches: int = 4
    eval_batch_size: int = 256
    low_bit_calibration: str = "percentile"


def calibrate_activations(ir: IR, batches: Sequence[torch.Tensor], low_bit_method: str) -> None:
    """Set every activation scale from ``batches``: min/max at 5 bits and more, ``low_bit_method`` below.

    HAQ (§3.4) clips low-bit activations at the KL-optimal threshold. On this code base's KL
    search (:func:`quant.calibrate.kl_threshold`) ReLU activations at 2–4 bits get thresholds of
    0.002–0.04 (measured on a CIFAR-10 MobileNet whose activations reach 6): everything clips to
    one level and the network answers one class whatever the policy, so HAQ's default here is the
    99.99th percentile, which kept such policies within a few points of float.
    """
    quantizers = act_quantizers(ir)
    for q in quantizers.values():
        q.start_observing()
    was_training = ir.gm.training
    ir.gm.eval()
    try:
        with torch.no_grad():
            for x in batches:
                ir.gm(x.to(ir.device))
    finally:
        ir.gm.train(was_training)
    for q in quantizers.values():
        q.calibrate("minmax" if q.bits is None or q.bits >= LOW_BITS else low_bit_method)


def act_bits_by_quantizer(ir: IR, layers: Sequence[fx.Node], policy: Policy) -> dict[str, Bits]:
    """Activation bits per quantizer node: a quantizer feeding several layers takes the widest.

    HAQ quantizes each layer's input at that layer's activation bits; here one activation
    quantizer may feed several layers (a residual branch point), so it keeps the highest
    precision any of them asked for (float above every integer width).
    """
    names = {
        id(m): n.name
        for n in ir.gm.graph.nodes
        if n.op == "call_module"
        for m in [ir.gm.get_submodule(str(n.target))]
    }
    chosen: dict[str, Bits] = {}
    for node, (_, a) in zip(layers, policy, strict=True):
        source = input_quantizer(ir, node)
        if source is None:
            continue
        name = names[id(source)]
        if name not in chosen:
            chosen[name] = a
        else:
            old = chosen[name]
            chosen[name] = None if old is None or a is None else max(old, a)
    return chosen


#: The width HAQ's quantizers are inserted at, and that an output quantizer of a quantized layer keeps.
OUTPUT_ACT_BITS = 8


def output_quantizer_bits(
    ir: IR, layers: Sequence[fx.Node], policy: Policy, taken: set[str]
) -> dict[str, Bits]:
    """Bits of the activation quantizers no searched layer reads, by quantizer node name.

    Such a quantizer sits on a layer's output before a residual add or a pooling (quantizing
    them keeps the add and the pool on integer kernels). It follows the layer that writes it:
    8 bits when that layer is quantized, float when the layer keeps float weights or inputs —
    there it would only add a QuantizeLinear/DequantizeLinear pair to a float path
    (:mod:`hardware.qdq`) and rounding to the model. Quantizers fed by anything else are left alone.
    """
    pairs = dict(zip(layers, policy, strict=True))
    out: dict[str, Bits] = {}
    for node in ir.gm.graph.nodes:
        if node.name in taken or node.op != "call_module":
            continue
        if not isinstance(ir.gm.get_submodule(str(node.target)), ActQuantizer):
            continue
        source = node.all_input_nodes[0] if node.all_input_nodes else None
        while (
            source is not None
            and source not in pairs
            and is_relu_like(ir.gm, source)
            and source.all_input_nodes
        ):
            source = source.all_input_nodes[0]  # conv → ReLU → quantizer: the conv writes it
        if source in pairs:
            w, a = pairs[source]
            out[node.name] = None if w is None or a is None else OUTPUT_ACT_BITS
    return out


def apply_policy(ir: IR, layers: Sequence[fx.Node], policy: Policy) -> None:
    """Set weight bits per layer and activation bits per input quantizer (``None``: float); the
    quantizers on layer outputs that no layer reads follow their layer (:func:`output_quantizer_bits`)."""
    act_bits = act_bits_by_quantizer(ir, layers, policy)
    act_bits.update(output_quantizer_bits(ir, layers, policy, set(act_bits)))
    set_bits(
        ir,
        weight_bits={node.name: w for node, (w, _) in zip(layers, policy, strict=True)},
        act_bits=act_bits,
    )


class QuantizeEnv:
    """Measures policies on one quantizer-equipped IR, restoring its float weights every time."""

    def __init__(
        self,
        ir: IR,
        layers: Sequence[fx.Node],
        train_subset: TensorDataset | Subset[tuple[torch.Tensor, ...]],
        val: TensorDataset | Subset[tuple[torch.Tensor, ...]],
        settings: EnvSettings,
        device: torch.device,
        seed: int,
    ) -> None:
        self.ir = ir
        self.layers = list(layers)
        self.train_subset = train_subset
        self.val = val
        self.settings = settings
        self.device = device
        self.seed = seed
        self.pretrained = copy.deepcopy(ir.gm.state_dict())
        self.episode = 0

    def calibration_batches(self) -> list[torch.Tensor]:
        bs = self.settings.batch_size
        n = min(len(self.train_subset), bs * self.settings.calib_batches)
        return [
            torch.stack([self.train_subset[i][0] for i in range(s, min(s + bs, n))]) for s in range(0, n, bs)
        ]

    def restore(self) -> None:
        self.ir.gm.load_state_dict(self.pretrained)

    def calibrate(self) -> None:
        """Activation scales from a few training batches (:func:`calibrate_activations`)."""
        calibrate_activations(self.ir, self.calibration_batches(), self.settings.low_bit_calibration)

    def apply(self, policy: Policy) -> None:
        """The policy's bits set on the weights as they are now, activation scales calibrated."""
        apply_policy(self.ir, self.layers, policy)
        self.calibrate()

    def prepare(self, policy: Policy) -> None:
        """Float weights back, the policy's bits set, activation scales calibrated."""
        self.restore()
        self.apply(policy)

    def finetune(self, epochs: int, lr: float, salt: int) -> None:
        if epochs <= 0:
            return
        settings = TrainSettings(epochs=epochs, batch_size=self.settings.batch_size, lr=lr, progress=False)
        generator = torch.Generator().manual_seed(self.seed * 7919 + salt)
        params = [p for p in self.ir.gm.parameters() if p.requires_grad]
        optimizer = torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=4e-5)
        train_model(
            self.ir.gm,
            self.train_subset,
            settings,
            self.device,
            generator,
            optimizer=optimizer,
            desc="haq fine-tune",
            schedule="constant",
        )

    def accuracy(self) -> float:
        return evaluate(self.ir.gm, self.val, self.settings.eval_batch_size, self.device)[1]

    def evaluate(self, policy: Policy, episode: int) -> Evaluation:
        """Episode ``episode``'s measurement: prepare, fine-tune, evaluate (timed separately).

        A function of the policy and the episode index only (float weights restored, the
        fine-tune's batch order seeded from the seed and the episode), so any copy of the
        environment, in this process or on a Ray worker, measures the same.
        """
        self.prepare(policy)
        t0 = time.perf_counter()
        self.finetune(self.settings.finetune_epochs, self.settings.finetune_lr, salt=episode + 1)
        t1 = time.perf_counter()
        acc = self.accuracy()
        t2 = time.perf_counter()
        return Evaluation(accuracy=acc, finetune_s=t1 - t0, evaluate_s=t2 - t1)

    def __call__(self, policy: Policy) -> Evaluation:
        """The next episode's measurement (episodes counted by this environment)."""
        self.episode += 1
        return self.evaluate(policy, self.episode - 1)

    def portable(self) -> QuantizeEnv:
        """This environment, or a copy on the CPU when it runs elsewhere: what Ray workers get."""
        if self.device.type == "cpu":
            return self
        clone = copy.copy(self)
        clone.ir = IR(
            copy.deepcopy(self.ir.gm).cpu(), self.ir.input_shape, self.ir.num_classes, self.ir.source
        )
        nodes = {node.name: node for node in clone.ir.gm.graph.nodes}
        clone.layers = [nodes[node.name] for node in self.layers]
        clone.pretrained = {
            k: v.cpu() if isinstance(v, torch.Tensor) else v for k, v in self.pretrained.items()
        }
        clone.device = torch.device("cpu")
        return clone

    # A pickled graph module is rebuilt from its code, with new nodes: the layers travel by name.
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["layers"] = [node.name for node in self.layers]
        state["ir"] = _picklable(self.ir)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        names = state.pop("layers")
        self.__dict__.update(state)
        nodes = {node.name: node for node in self.ir.gm.graph.nodes}
        self.layers = [nodes[name] for name in names]


def _picklable(ir: IR) -> IR:
    """``ir``, or a copy without string type annotations on its nodes (a model traced from a module
    with ``from __future__ import annotations`` has them, and fx cannot pickle its code then)."""
    if not any(isinstance(node.type, str) for node in ir.gm.graph.nodes):
        return ir
    gm = copy.deepcopy(ir.gm)
    for node in gm.graph.nodes:
        if isinstance(node.type, str):
            node.type = None
    gm.recompile()
    return IR(gm, ir.input_shape, ir.num_classes, ir.source)


@dataclass(frozen=True)
class EpisodeEvaluator:
    """Evaluates ``(episode, policy)`` items with :meth:`QuantizeEnv.evaluate`, each with the
    global RNGs seeded from ``seed`` and the episode (picklable: Ray workers run it on their copy)."""

    env: QuantizeEnv
    seed: int

    def __call__(self, item: tuple[int, Policy]) -> Evaluation:
        from fxsculpt.training.parallel import derive_seed, seeded_globals

        episode, policy = item
        with seeded_globals(derive_seed(self.seed, episode)):
            return self.env.evaluate(policy, episode)


def policy_as_bits(layer_names: Sequence[str], policy: Policy) -> Mapping[str, tuple[Bits, Bits]]:
    return {name: pair for name, pair in zip(layer_names, policy, strict=True)}
