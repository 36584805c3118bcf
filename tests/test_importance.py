"""Importance is a pure function of a group: PSP's mean squared norm over members."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import ptsp
from ptsp.importance import l1, l2, normalised_scores


def test_l2_is_mean_of_squared_norms_over_members():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 2, 1)).eval()
    groups = ptsp.build_groups(model, torch.randn(1, 3, 8, 8))
    g = groups[0]
    t = dict(model.named_parameters())
    want = (t["0.weight"].pow(2).sum((1, 2, 3)) + t["1.weight"].pow(2) + t["3.weight"].pow(2).sum((0, 2, 3))) / 3
    assert np.allclose(l2(g, t), want.detach().numpy())
    want1 = (t["0.weight"].abs().sum((1, 2, 3)) + t["1.weight"].abs() + t["3.weight"].abs().sum((0, 2, 3))) / 3
    assert np.allclose(l1(g, t), want1.detach().numpy())
    s = normalised_scores(groups, t)
    assert np.isclose(s[g.ids].mean(), 1.0) and np.isnan(s[groups[1].ids]).all()


def test_unknown_importance():
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Conv2d(4, 2, 1))
    groups = ptsp.build_groups(model, torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="unknown importance"):
        normalised_scores(groups, dict(model.named_parameters()), "taylor2")
