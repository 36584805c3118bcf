"""The plan: global ranking meets channel, FLOPs and params targets within one channel."""
from __future__ import annotations

import numpy as np
import pytest
import timm
import torch

import ptsp
from ptsp.counting import Estimator
from ptsp.importance import normalised_scores
from ptsp.selection import Selection, select


@pytest.fixture(scope="module")
def resnet():
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    groups = ptsp.build_groups(model, x)
    return model, groups, normalised_scores(groups, dict(model.named_parameters())), Estimator(model, groups)


@pytest.mark.parametrize("target", ["flops", "params"])
@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_target_met_within_one_channel(resnet, target, ratio):
    model, groups, scores, est = resnet
    removed = select(groups, scores, ratio, target, estimator=est)
    measure = est.flops if target == "flops" else est.params
    before = est.flops_before if target == "flops" else est.params_before
    assert measure(removed) <= (1 - ratio) * before
    # giving back the last channel taken misses the target: nothing was removed needlessly
    sel = Selection(groups, scores)
    k = int(np.flatnonzero(np.isin(sel.order, np.flatnonzero(removed))).max())
    assert measure(sel.removed(k)) > (1 - ratio) * before


def test_channels_target(resnet):
    model, groups, scores, est = resnet
    removed = select(groups, scores, 0.5)
    assert removed.sum() == int(np.ceil(0.5 * groups.prunable_mask().sum()))
    assert not removed[~groups.prunable_mask()].any()


def test_lowest_scores_go_first(resnet):
    model, groups, scores, est = resnet
    removed = select(groups, scores, 0.2)
    assert np.nanmax(scores[removed]) <= np.nanmin(scores[~removed & groups.prunable_mask()])


def test_floor_and_max_ratio(resnet):
    model, groups, scores, est = resnet
    removed = select(groups, scores, 0.95, max_ratio=1.0)
    assert all((~removed[g.ids]).sum() >= 1 for g in groups)
    removed = select(groups, scores, 0.5, max_ratio=0.6)
    assert all(removed[g.ids].sum() <= 0.6 * g.channels for g in groups)
    with pytest.raises(ValueError, match="cannot be reached"):
        select(groups, scores, 0.7, max_ratio=0.5)


def test_round_to(resnet):
    model, groups, scores, est = resnet
    removed = select(groups, scores, 0.5, round_to=8)
    for g in groups:
        kept = int((~removed[g.ids]).sum())
        assert kept == g.channels or kept % 8 == 0


def test_concat_producers_keep_a_channel():
    model = timm.create_model("densenet121", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    pruned = ptsp.prune(model, None, 0.9, method="magnitude", example_inputs=x,
                        max_ratio=1.0)  # would empty some producers
    assert all(m.out_channels > 0 for m in pruned.modules() if isinstance(m, torch.nn.Conv2d))
    assert pruned(x).shape == (1, 1000)


def test_bad_target(resnet):
    model, groups, scores, est = resnet
    with pytest.raises(ValueError, match="target must be one of"):
        select(groups, scores, 0.5, "latency")
