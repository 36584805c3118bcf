"""Counting: the plan estimator agrees exactly with FlopCounterMode on the pruned model."""
from __future__ import annotations

import pytest
import timm
import torch

import ptsp
from ptsp.counting import Estimator, count
from ptsp.importance import normalised_scores
from ptsp.selection import select
from ptsp.surgery import apply, kept_indices


@pytest.mark.parametrize("name,kwargs,side", [
    ("resnet18", {}, 64), ("mobilenetv3_small_050", {}, 64), ("densenet121", {}, 64),
    ("vit_tiny_patch16_224", {"img_size": 64}, 64), ("regnety_002", {}, 64)])
def test_estimator_matches_measurement(name, kwargs, side):
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    x = torch.randn(1, 3, side, side)
    groups = ptsp.build_groups(model, x)
    est = Estimator(model, groups)
    assert (est.params_before, est.flops_before) == count(model, x)
    removed = select(groups, normalised_scores(groups, dict(model.named_parameters())), 0.5)
    pruned = apply(__import__("copy").deepcopy(model), kept_indices(groups, removed))
    assert (est.params(removed), est.flops(removed)) == count(pruned, x)


def test_count_leaves_mode():
    model = torch.nn.Sequential(torch.nn.Linear(4, 3)).train()
    params, flops = count(model, torch.randn(2, 4))
    assert params == 15 and flops == 2 * 2 * 4 * 3 and model.training


class _WithBatchedMatmulAdd(torch.nn.Module):
    """A ``baddbmm`` (no channel rule: its channels stay; FLOPs counted by torch) between
    prunable convs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 16, 3, padding=1)
        self.mix = torch.nn.Parameter(torch.randn(1, 16, 16) / 4)
        self.conv2 = torch.nn.Conv2d(16, 32, 3, padding=1)
        self.conv3 = torch.nn.Conv2d(32, 8, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv1(x).relu()
        z = torch.baddbmm(y.flatten(2), self.mix.expand(len(x), -1, -1), y.flatten(2))
        return self.conv3(self.conv2(z.view_as(y)).relu())


def test_estimator_counts_the_ops_the_trace_cannot_prune():
    """The FLOPs of an op without a channel rule are counted (as a constant, its channels being
    left unpruned), so a FLOPs target holds on the measured count."""
    torch.manual_seed(0)
    model = _WithBatchedMatmulAdd().eval()
    x = torch.randn(1, 3, 16, 16)
    with pytest.warns(UserWarning, match="no channel rule"):
        groups = ptsp.build_groups(model, x)
    est = Estimator(model, groups, x)
    assert est.unmodelled > 0 and (est.params_before, est.flops_before) == count(model, x)
    removed = select(groups, normalised_scores(groups, dict(model.named_parameters())), 0.5)
    assert removed.any()
    pruned = apply(__import__("copy").deepcopy(model), kept_indices(groups, removed))
    assert (est.params(removed), est.flops(removed)) == count(pruned, x)
    with pytest.warns(UserWarning, match="no channel rule"):
        pruned = ptsp.prune(model, None, 0.4, method="magnitude", target="flops", example_inputs=x)
    flops = ptsp.plan_of(pruned)["flops"]
    assert flops["before"] == count(model, x)[1] and flops["after"] == count(pruned, x)[1]
    assert 0.55 <= flops["after"] / flops["before"] <= 0.6
