"""training.batchnorm_stats: BatchNorm statistics recomputed from data, checked against a hand count."""

from __future__ import annotations

import torch
from torch import nn

from fxsculpt.training.batchnorm_stats import recalibrate_batchnorm


def test_statistics_are_the_average_of_the_batches_statistics() -> None:
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 4, 3)
    bn = nn.BatchNorm2d(4, momentum=0.3)
    model = nn.Sequential(conv, nn.Dropout(0.5), bn).eval()
    batches = [torch.randn(8, 3, 6, 6) * (i + 1) for i in range(3)]
    used = recalibrate_batchnorm(model, batches, torch.device("cpu"))
    with torch.no_grad():
        feats = [conv(x) for x in batches]  # dropout is off: the norm sees the conv's output itself
    means = torch.stack([f.mean((0, 2, 3)) for f in feats])
    variances = torch.stack([f.transpose(0, 1).reshape(4, -1).var(dim=1, unbiased=True) for f in feats])
    assert used == 3
    torch.testing.assert_close(bn.running_mean, means.mean(0))
    torch.testing.assert_close(bn.running_var, variances.mean(0))
    assert bn.momentum == 0.3 and not model.training and not bn.training


def test_a_model_without_batchnorm_is_left_alone() -> None:
    model = nn.Sequential(nn.Linear(3, 2))
    before = [p.clone() for p in model.parameters()]
    assert recalibrate_batchnorm(model, [torch.randn(4, 3)], torch.device("cpu")) == 0
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
