"""Third-party model definitions for the conformance suite: timm, torchvision and Hugging Face.

Every entry of :data:`ZOO` builds a model from its package's own code, sized for 32×32 images
and 10 classes, with random weights (nothing is downloaded). ``tests/test_zoo_conformance.py``
and ``bench/bench_zoo.py`` run fxsculpt's passes over this table.

torchvision's compiled operators (``torchvision::nms`` and friends) do not load beside the CPU
build of torch installed here, and timm and transformers import torchvision when they find it.
The model definitions are pure Python and need none of those operators, so
:func:`allow_torchvision_definitions` makes ``import torchvision`` give the package without
running its ``__init__`` (which registers the operators); ``torchvision.models`` then imports as
usual. It is called when this module is imported, before any of the three packages.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

NUM_CLASSES = 10
INPUT_SHAPE = (1, 3, 32, 32)


def allow_torchvision_definitions() -> None:
    """Make ``import torchvision`` skip loading its compiled operators (see the module docstring).

    Does nothing when torchvision is absent, already imported, or its operators load.
    """
    if "torchvision" in sys.modules:
        return
    spec = importlib.util.find_spec("torchvision")
    if spec is None or spec.submodule_search_locations is None:
        return
    try:
        torch.ops.load_library  # noqa: B018 - the attribute exists on every torch build
        importlib.import_module("torchvision")
        return
    except RuntimeError:  # "operator torchvision::nms does not exist": the mismatch described above
        for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
            del sys.modules[name]
    package = types.ModuleType("torchvision")
    package.__path__ = list(spec.submodule_search_locations)
    package.__spec__ = spec
    package.__file__ = spec.origin
    sys.modules["torchvision"] = package


allow_torchvision_definitions()


@dataclass(frozen=True)
class ZooModel:
    """One architecture of the suite.

    ``features`` names what it exercises (for the table); ``slow`` rows run only with
    ``pytest -m slow`` and in the benchmark.
    """

    name: str
    package: str
    features: str
    build: Callable[[], nn.Module]
    slow: bool = False


def _timm(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name, pretrained=False, num_classes=NUM_CLASSES, **kwargs)

    return build


def _torchvision(name: str, **kwargs: object) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision import models

        return getattr(models, name)(weights=None, num_classes=NUM_CLASSES, **kwargs)

    return build


def _hf_resnet() -> nn.Module:
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_labels=NUM_CLASSES,
        embedding_size=32,
        hidden_sizes=[32, 64, 128, 256],
        depths=[1, 1, 1, 1],
        layer_type="basic",
    )
    return ResNetForImageClassification(config)


def _hf_mobilenet_v2() -> nn.Module:
    from transformers import MobileNetV2Config, MobileNetV2ForImageClassification

    return MobileNetV2ForImageClassification(
        MobileNetV2Config(num_labels=NUM_CLASSES, image_size=32, depth_multiplier=0.5)
    )


def _hf_vit() -> nn.Module:
    from transformers import ViTConfig, ViTForImageClassification

    config = ViTConfig(
        num_labels=NUM_CLASSES,
        image_size=32,
        patch_size=4,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=128,
    )
    return ViTForImageClassification(config)


ZOO: dict[str, ZooModel] = {
    m.name: m
    for m in (
        ZooModel("timm_resnet18", "timm", "residual", _timm("resnet18")),
        ZooModel("tv_resnet18", "torchvision", "residual", _torchvision("resnet18")),
        ZooModel("timm_mobilenetv2_050", "timm", "inverted residual, depthwise", _timm("mobilenetv2_050")),
        ZooModel(
            "timm_mobilenetv3_small_050",
            "timm",
            "SE, hard-swish, depthwise",
            _timm("mobilenetv3_small_050"),
        ),
        ZooModel(
            "tv_mobilenet_v3_small",
            "torchvision",
            "SE, hard-swish, depthwise",
            _torchvision("mobilenet_v3_small"),
            slow=True,
        ),
        ZooModel("timm_efficientnet_b0", "timm", "SE, SiLU, depthwise", _timm("efficientnet_b0"), slow=True),
        ZooModel("timm_regnetx_002", "timm", "grouped conv", _timm("regnetx_002")),
        ZooModel("timm_ghostnet_050", "timm", "ghost modules, SE, concat", _timm("ghostnet_050"), slow=True),
        ZooModel(
            "tv_shufflenet_v2_x0_5",
            "torchvision",
            "channel shuffle, split, concat",
            _torchvision("shufflenet_v2_x0_5"),
        ),
        ZooModel(
            "tv_densenet121", "torchvision", "dense concatenation", _torchvision("densenet121"), slow=True
        ),
        ZooModel("timm_repvgg_a0", "timm", "RepVGG branches", _timm("repvgg_a0"), slow=True),
        ZooModel(
            "timm_convnext_atto", "timm", "LayerNorm, GELU, depthwise 7×7", _timm("convnext_atto"), slow=True
        ),
        ZooModel(
            "timm_vit_tiny",
            "timm",
            "attention, Linear, LayerNorm",
            _timm("vit_tiny_patch16_224", img_size=32, patch_size=4),
            slow=True,
        ),
        ZooModel("hf_resnet", "transformers", "residual; ModelOutput, pixel_values", _hf_resnet),
        ZooModel(
            "hf_mobilenet_v2", "transformers", "TF padding, ReLU6; ModelOutput", _hf_mobilenet_v2, slow=True
        ),
        ZooModel("hf_vit", "transformers", "attention; ModelOutput", _hf_vit, slow=True),
    )
}


def missing_package(model: ZooModel) -> str | None:
    """Why ``model`` cannot be built here (its package is not installed), else None."""
    if importlib.util.find_spec(model.package) is None:
        return f"{model.package} is not installed (pip install -e '.[zoo]')"
    return None


def build(name: str, seed: int = 0) -> nn.Module:
    """The model ``name`` of :data:`ZOO` in eval mode, with weights fixed by ``seed``.

    BatchNorm statistics are made non-trivial (random weights leave them at identity), so that
    BatchNorm folding and calibration see what a trained model has.
    """
    torch.manual_seed(seed)
    model = ZOO[name].build().eval()
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.running_mean is not None:
            assert module.running_var is not None
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)
    return model
