"""Importance is a pure function of a group: PSP's mean squared norm over members."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from torch import nn

import ptsp
from ptsp.importance import l1, l2, normalised_scores, scores, taylor_scores


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


def _chain_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 6, 1),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(6, 3)).eval()
    return model, torch.randn(8, 3, 8, 8)


def _self_label_loss(model: nn.Module, x: torch.Tensor, labels: torch.Tensor) -> float:
    with torch.no_grad():
        return nn.functional.cross_entropy(model(x), labels, reduction="sum").item()


def test_taylor_is_the_first_order_loss_change_of_scaling_the_channel():
    """Σ w·∂L/∂w over a channel's slices is d/dt L at t=1 when every slice is scaled by t: check it
    against a finite difference, per channel of the first group (conv rows, BN γ/β, consumer columns)."""
    model, x = _chain_and_batch()
    model, x = model.double(), x.double()  # a finite difference needs the precision
    groups = ptsp.build_groups(model, x[:1])
    g = groups[0]
    labels = model(x).argmax(1)
    got = taylor_scores(groups, model, [x])
    assert got[g.ids].min() > 0 and np.isnan(got[groups.prunable_mask() == 0]).all()
    eps = 1e-5

    def loss_scaled(i: int, t: float) -> float:
        scaled = copy.deepcopy(model)
        params = dict(scaled.named_parameters())
        with torch.no_grad():
            for m in g.members:
                if m.tensor in params:
                    idx = [slice(None)] * params[m.tensor].dim()
                    for d in m.dims:
                        idx[d] = i
                    params[m.tensor][tuple(idx)] *= t
        return _self_label_loss(scaled, x, labels)

    for i, c in enumerate(g.ids):
        derivative = (loss_scaled(i, 1 + eps) - loss_scaled(i, 1 - eps)) / (2 * eps)
        assert np.isclose(got[c], derivative ** 2, rtol=1e-4), (i, got[c], derivative ** 2)


def test_taylor_sums_batches_and_ignores_a_dead_channel():
    model, x = _chain_and_batch()
    with torch.no_grad():
        model[3].weight[:, 2] = 0  # channel 2 of the first group feeds nothing
    groups = ptsp.build_groups(model, x[:1])
    ids = groups[0].ids
    whole = taylor_scores(groups, model, [x])
    split = taylor_scores(groups, model, [x[:4], x[4:]])
    halves = taylor_scores(groups, model, [x[:4]]) + taylor_scores(groups, model, [x[4:]])
    assert np.allclose(split[ids], halves[ids]) and not np.allclose(split[ids], whole[ids])
    assert np.allclose(taylor_scores(groups, model, [x], micro_batch=3)[ids], whole[ids])
    assert np.argmin(whole[ids]) == 2
    assert all(p.grad is None for p in model.parameters())  # the model itself is untouched


def test_taylor_needs_data_and_a_classifier():
    model, x = _chain_and_batch()
    groups = ptsp.build_groups(model, x[:1])
    with pytest.raises(ValueError, match="needs calibration"):
        scores(groups, model, "taylor")
    with pytest.raises(ValueError, match="needs calibration data"):
        normalised_scores(groups, dict(model.named_parameters()), "taylor")
    with pytest.raises(ValueError, match="needs a classifier"):
        taylor_scores(groups, model[:4], [x])
    with pytest.raises(ValueError, match="reads gradients on calibration data"):
        ptsp.prune(model, None, 0.5, method="magnitude", importance="taylor",
                   example_inputs=x[:1])


class _ConcatReadTwice(nn.Module):
    """``a`` and ``b`` are concatenated for ``c``; ``a``'s channels are also read by ``d``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(2, 4, 1, bias=False), nn.Conv2d(2, 4, 1, bias=False)
        self.c, self.d = nn.Conv2d(8, 2, 1, bias=False), nn.Conv2d(4, 2, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ya = self.a(x)
        return self.c(torch.cat([ya, self.b(x)], 1)) + self.d(ya)


def test_l2_averages_each_channel_over_the_members_that_hold_it():
    """A concat's channels read by more layers do not outrank the others for that alone: every
    slice of every member has the same squared norm, so every channel scores it."""
    model = _ConcatReadTwice()
    for p in model.parameters():
        nn.init.ones_(p)
    groups = ptsp.build_groups(model, torch.randn(1, 2, 4, 4))
    g = next(g for g in groups if g.channels == 8)
    assert {m.tensor for m in g.members} >= {"a.weight", "b.weight", "c.weight", "d.weight"}
    assert np.allclose(l2(g, dict(model.named_parameters())), 2.0)
