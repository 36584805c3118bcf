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
