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

import torch
from torch import fx
from torch.utils.data import Subset, TensorDataset

from ir.graph import IR
from passes.base import TrainSettings
from quant.haq.actions import Bits
from quant.haq.enforce import Policy
from quant.haq.search import Evaluation
from quant.insert import calibrate, input_quantizer, set_bits
from training.loop import evaluate, train_model


@dataclass
class EnvSettings:
    """How an episode measures a policy."""

    finetune_epochs: int = 1
    finetune_lr: float = 1e-3
    batch_size: int = 64
    calib_batches: int = 4
    eval_batch_size: int = 256


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


def apply_policy(ir: IR, layers: Sequence[fx.Node], policy: Policy) -> None:
    """Set weight bits per layer and activation bits per input quantizer (``None``: float)."""
    set_bits(
        ir,
        weight_bits={node.name: w for node, (w, _) in zip(layers, policy, strict=True)},
        act_bits=act_bits_by_quantizer(ir, layers, policy),
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

    def prepare(self, policy: Policy) -> None:
        """Float weights back, the policy's bits set, activation scales calibrated."""
        self.restore()
        apply_policy(self.ir, self.layers, policy)
        calibrate(self.ir, self.calibration_batches())

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

    def __call__(self, policy: Policy) -> Evaluation:
        """One episode's measurement: prepare, fine-tune, evaluate (timed separately)."""
        self.episode += 1
        self.prepare(policy)
        t0 = time.perf_counter()
        self.finetune(self.settings.finetune_epochs, self.settings.finetune_lr, salt=self.episode)
        t1 = time.perf_counter()
        acc = self.accuracy()
        t2 = time.perf_counter()
        return Evaluation(accuracy=acc, finetune_s=t1 - t0, evaluate_s=t2 - t1)


def policy_as_bits(layer_names: Sequence[str], policy: Policy) -> Mapping[str, tuple[Bits, Bits]]:
    return {name: pair for name, pair in zip(layer_names, policy, strict=True)}
