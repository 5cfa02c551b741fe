"""fxsculpt: search, prune and quantize PyTorch models on one torch.fx IR, then export measured ONNX.

Every part of the tool lives under this one namespace (``fxsculpt.ir``, ``fxsculpt.passes``,
``fxsculpt.hardware``, ``fxsculpt.cli``, …), so installing it adds no top-level modules
beside ``fxsculpt``. In a checkout the subpackages are links to the repository's top-level
folders, which is where the design card keeps them.
"""

__version__ = "0.1.0"
