"""The ``train`` pass: fit the model's weights on the training split.

Used to give a loaded or built-in model real accuracy before search, pruning or
quantization, and to fine-tune after them. It trains the IR's weights only (architecture
parameters of search constructs stay where they are), with the shared loop in
:mod:`training.loop` and ``--threads`` intra-op threads on CPU, then re-propagates
metadata and records the result. It checkpoints after every epoch when the run keeps
checkpoints (``--resume OUT`` continues after the last saved epoch) and trains data-parallel
under torchrun (see :mod:`training.distributed`).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Literal

import torch

from fxsculpt.ir.errors import BadInputError
from fxsculpt.ir.graph import IR
from fxsculpt.passes.base import Context, Pass
from fxsculpt.passes.options import option
from fxsculpt.training.checkpoint import pass_checkpointer
from fxsculpt.training.data import check_labels
from fxsculpt.training.loop import evaluate, torch_threads, train_model


@dataclass
class TrainOptions:
    """Overrides of the run's shared training settings; unset (none) means the CLI's value."""

    epochs: int | None = option(None, "epochs to train (default: --epochs)")
    lr: float | None = option(None, "initial learning rate (default: --lr)")
    batch_size: int | None = option(None, "batch size (default: --batch-size)")
    optimizer: Literal["sgd", "adam"] = option("sgd", "sgd (momentum 0.9) or adam")
    weight_decay: float = option(5e-4, "L2 weight decay on the weights")
    schedule: Literal["cosine", "constant"] = option("cosine", "learning-rate schedule over all steps")


class TrainPass(Pass):
    """Train the model's weights on the training split (cross-entropy, SGD + cosine by default)."""

    name = "train"
    Options = TrainOptions
    refines_float = True  # the model after training is the float reference of the report's before/after

    def run(self, ir: IR, ctx: Context) -> IR:
        opts: TrainOptions = self.options
        if ctx.data is None:
            raise BadInputError(
                "the train pass needs data: pass --data digits|npz:PATH|cifar10:DIR|mnist:DIR"
            )
        check_labels(ctx.data, ir.num_classes)
        if tuple(ir.input_shape[1:]) != tuple(ctx.data.input_shape):
            raise BadInputError(
                f"data '{ctx.data.name}' has images of shape {'x'.join(map(str, ctx.data.input_shape))} "
                f"but the model's input shape is {','.join(map(str, ir.input_shape))}"
            )
        settings = replace(
            ctx.train,
            epochs=opts.epochs if opts.epochs is not None else ctx.train.epochs,
            lr=opts.lr if opts.lr is not None else ctx.train.lr,
            batch_size=opts.batch_size if opts.batch_size is not None else ctx.train.batch_size,
        )
        if settings.epochs < 0 or settings.lr <= 0 or settings.batch_size < 1 or opts.weight_decay < 0:
            raise BadInputError(
                f"train needs epochs >= 0, lr > 0, batch size >= 1 and weight decay >= 0 (got {settings.epochs}, "
                f"{settings.lr}, {settings.batch_size}, {opts.weight_decay})"
            )
        weights = [p for p in ir.weight_parameters() if p.requires_grad]
        if not weights:
            raise BadInputError("the model has no trainable weights")
        optimizer: torch.optim.Optimizer
        if opts.optimizer == "adam":
            optimizer = torch.optim.Adam(weights, lr=settings.lr, weight_decay=opts.weight_decay)
        else:
            optimizer = torch.optim.SGD(weights, lr=settings.lr, momentum=0.9, weight_decay=opts.weight_decay)
        with torch_threads(ctx.threads if ctx.device.type == "cpu" else None):
            history = train_model(
                ir.gm,
                ctx.data.train,
                settings,
                ctx.device,
                ctx.generator("train"),
                optimizer=optimizer,
                desc="train",
                schedule=opts.schedule,
                checkpoint=pass_checkpointer(ctx),
            )
            ir.gm.eval()
            ir.propagate()
        summary: dict[str, float | int | str] = {
            "epochs": settings.epochs,
            "lr": settings.lr,
            "optimizer": opts.optimizer,
        }
        if history:
            summary["train_loss"] = round(history[-1]["loss"], 4)
            summary["train_accuracy"] = round(history[-1]["accuracy"], 4)
        if len(ctx.data.val):
            with torch_threads(ctx.threads if ctx.device.type == "cpu" else None):
                val_loss, val_acc = evaluate(ir.gm, ctx.data.val, batch_size=256, device=ctx.device)
            summary["val_loss"] = round(val_loss, 4)
            summary["val_accuracy"] = round(val_acc, 4)
        ctx.record(**summary)
        ctx.logger.info("train: %s", summary)
        return ir
