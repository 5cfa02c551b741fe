"""Quantization: fake-quant constructs, calibration, mixed-precision search and low-bit export."""
