"""Surgery: every member shrinks, attributes follow, the state_dict is consistent."""
from __future__ import annotations

import copy

import numpy as np
import pytest
import timm
import torch
from timm.layers import RmsNorm
from torch import nn

import ptsp
from ptsp.importance import normalised_scores
from ptsp.selection import select
from ptsp.surgery import apply, criterion_error, kept_indices, zero_removed_inputs

from nets import CrossStage, Heads, Mixed, Scales, Standardised, TimmRelPos, WideGroups, Windows


def _pruned(model, x, ratio=0.5):
    groups = ptsp.build_groups(model, x)
    removed = select(groups, normalised_scores(groups, dict(model.named_parameters())), ratio)
    return groups, removed, apply(copy.deepcopy(model), kept_indices(groups, removed))


def test_attributes_follow_tensors():
    model = timm.create_model("mobilenetv3_small_050", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    _, _, pruned = _pruned(model, x)
    for m in pruned.modules():
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape[0] == m.out_channels
            assert m.weight.shape[1] * m.groups == m.in_channels
        elif isinstance(m, nn.BatchNorm2d):
            assert m.running_mean.shape[0] == m.num_features == m.weight.shape[0]
        elif isinstance(m, nn.Linear):
            assert tuple(m.weight.shape) == (m.out_features, m.in_features)
    assert pruned(x).shape == (1, 1000)


def test_transposed_conv_widths_follow_its_weight():
    """A transposed conv's weight is (in, out, ...): both widths are read the other way round."""
    torch.manual_seed(0)
    model = Windows().eval()
    x = torch.randn(2, 3, 16, 16)
    groups, removed, pruned = _pruned(model, x[:1])
    up = pruned.up
    assert up.weight.shape[:2] == (up.in_channels, up.out_channels) == (pruned.c1.out_channels, 6)
    assert criterion_error(model, groups, removed, x) <= 1e-5


def test_kept_indices_replay_on_fresh_model():
    """The plan's kept map rebuilds the same pruned model from the original architecture."""
    model = timm.create_model("resnet18", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    groups, removed, pruned = _pruned(model, x)
    kept = kept_indices(groups, removed)
    conv1 = kept["layer1.0"]["conv1"] if "conv1" in kept.get("layer1.0", {}) else kept["layer1.0.conv1"]["weight"]
    assert set(conv1) <= {0, 1}
    replay = apply(copy.deepcopy(model), kept)
    for (n1, t1), (n2, t2) in zip(pruned.state_dict().items(), replay.state_dict().items()):
        assert n1 == n2 and torch.equal(t1, t2)
    fresh = timm.create_model("resnet18", pretrained=False)
    apply(fresh, kept).load_state_dict(pruned.state_dict())  # shapes line up strictly


def test_split_sizes_follow_the_parts():
    """A split whose sizes a module attribute holds: each part loses channels of its own, the
    attribute becomes what each part keeps, and the plan replays it on a fresh model."""
    torch.manual_seed(0)
    model = Mixed().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = ptsp.build_groups(model, x[:1])
    stem = next(g for g in groups if any(m.tensor == "stem.weight" for m in g.members))
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[stem.ids[[0, 1, 2, 9]]] = True  # three of the first part's 8, one of the second's 4
    kept = kept_indices(groups, removed)
    pruned = apply(copy.deepcopy(model), kept)
    assert pruned.mixed.splits == [5, 3]
    assert [c.in_channels for c in pruned.mixed.convs] == [5, 3]
    assert criterion_error(model, groups, removed, x) <= 1e-5
    fresh = apply(Mixed().eval(), kept)
    fresh.load_state_dict(pruned.state_dict())
    assert fresh.mixed.splits == [5, 3] and torch.equal(fresh(x), pruned(x))


@pytest.mark.parametrize("net, producer, attribute, after, width", [
    (Scales, "block.conv1", "block.width", 4, 12), (CrossStage, "conv_exp", "expand_chs", 12, 12)])
def test_one_split_width_follows_the_kept_positions(net, producer, attribute, after, width):
    """A split by one size held in an int attribute, the size itself (Res2Net's ``width``) or the
    total it is a share of (CSPNet's ``expand_chs // 2``): every part drops the same positions,
    the attribute follows, and the plan replays on a fresh model."""
    torch.manual_seed(0)
    model = net().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = ptsp.build_groups(model, x[:1])
    rows = next(m.channel for g in groups for m in g.members
                if m.tensor == f"{producer}.weight" and m.dims == (0,))
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[rows[[1, 4]]] = True  # two positions, so two rows of every part
    kept = kept_indices(groups, removed)
    pruned = apply(copy.deepcopy(model), kept)
    owner, name = attribute.rpartition(".")[::2]
    assert getattr(pruned.get_submodule(owner), name) == after
    assert pruned.get_submodule(producer).out_channels == width
    assert criterion_error(model, groups, removed, x) <= 1e-5
    fresh = apply(net().eval(), kept)
    fresh.load_state_dict(pruned.state_dict())
    assert torch.equal(fresh(x), pruned(x))


def test_heads_and_tied_weights():
    torch.manual_seed(0)
    model = Heads().eval()
    x = torch.randn(1, 3, 16, 16)
    _, _, pruned = _pruned(model, x)
    attn = pruned.attn
    assert attn.qkv.out_features == 3 * attn.num_heads * attn.head_dim
    assert attn.proj.in_features == attn.attn_dim
    tied = nn.Sequential(nn.Conv2d(3, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.ReLU(), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 2, 1))
    tied[4].weight = tied[2].weight
    _, removed, p = _pruned(tied.eval(), x)
    assert p[4].weight is p[2].weight and p(x).shape == tied(x).shape


def test_kept_statistics_reach_norms_bound_at_import():
    """timm's RmsNorm calls ``rms_norm`` bound from ``torch.nn.functional`` when timm was imported:
    the reference still takes its statistics over the kept channels, as the pruned model does."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), RmsNorm(16), nn.Linear(16, 3)).eval()
    x = torch.randn(8, 4)
    groups = ptsp.build_groups(model, x[:1])
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[next(g for g in groups if len(g.ids) == 16).ids[::2]] = True
    assert criterion_error(model, groups, removed, x) <= 1e-5


def test_standardised_convs_standardise_over_the_kept_columns():
    """A weight-standardised conv that loses input columns normalises over the ones it keeps; the
    reference takes the same statistics (and reads nothing from the removed columns), which
    zeroing the columns alone would not give."""
    torch.manual_seed(0)
    model = Standardised().eval()
    x = torch.randn(2, 3, 16, 16)
    groups = ptsp.build_groups(model, x[:1])
    g = next(g for g in groups for m in g.members if m.tensor == "conv.weight" and m.dims == (1,))
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[g.ids[[0, 3, 5]]] = True
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed))
    assert pruned.conv.weight.shape[1] == 5
    assert criterion_error(model, groups, removed, x) <= 1e-5
    zeroed = zero_removed_inputs(copy.deepcopy(model), groups, removed)
    with torch.no_grad():
        assert (zeroed(x) - pruned(x)).abs().max() > 1e-3


def test_kept_statistics_stay_float32_under_bfloat16_autocast():
    """Phase 1 runs the student under autocast: the norms over kept channels then take their
    statistics in float32, as the pruned model's ``layer_norm`` does, so a channel mean far from
    zero (50 here, where bfloat16's spacing is 0.25) does not swamp them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 16), nn.LayerNorm(16), nn.Linear(16, 3)).eval()
    with torch.no_grad():
        model[0].bias.fill_(50.0)
    x = torch.randn(8, 4)
    groups = ptsp.build_groups(model, x[:1])
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[next(g for g in groups if len(g.ids) == 16).ids[::2]] = True
    with torch.autocast("cpu", torch.bfloat16):
        error = criterion_error(model, groups, removed, x)
    assert error < 0.05


def test_relative_position_modules_follow_the_heads():
    """timm's RelPosBias and RelPosMlp reshape their bias by ``bias_shape`` / ``num_heads``:
    surgery sets them to the heads kept, so the pruned model runs without a repair."""
    model, x = TimmRelPos().eval(), torch.randn(2, 3, 16, 16)
    groups = ptsp.build_groups(model, x[:1])
    heads = next(g for g in groups for m in g.members if m.tensor == "rel_pos.1.mlp.fc2.weight" and m.dims == (0,))
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[heads.ids[[0, 2]]] = True
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed))
    assert pruned.num_heads == 2 and pruned.rel_pos[1].num_heads == 2
    assert [m.bias_shape for m in pruned.rel_pos] == [(16, 16, 2), (16, 16, 2)]
    assert criterion_error(model, groups, removed, x) <= 1e-4


@pytest.mark.parametrize("layer", ["Scale", "BlurPool2d"])
def test_width_attributes_follow_their_tensors(layer):
    """timm metaformer's Scale views its vector by a ``shape`` attribute (the one entry that is
    not 1 follows the vector), BlurPool2d runs its depthwise blur with ``groups=self.channels``:
    surgery sets both, so the pruned model runs with nothing left out."""
    from timm.layers.blur_pool import BlurPool2d
    from timm.models.metaformer import Scale

    middle = Scale(8) if layer == "Scale" else BlurPool2d(8)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), middle, nn.ReLU(), nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    groups = ptsp.build_groups(model, x[:1])
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[next(g for g in groups if g.prunable).ids[[1, 4, 6]]] = True
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed))
    assert (pruned[1].shape == (5, 1, 1)) if layer == "Scale" else (pruned[1].channels == 5)
    assert criterion_error(model, groups, removed, x) <= 1e-4


@pytest.mark.parametrize("norm", ["EvoNorm2dS0", "EvoNorm2dS1", "EvoNorm2dS2a"])
def test_grouped_evonorms_lose_whole_groups(norm):
    """timm's grouped EvoNorms take a statistic over each group of channels, reshaping by their
    ``groups`` attribute: the group builder ties each group's channels, and surgery sets ``groups``
    to the groups kept, so the pruned model runs and computes what the masked one did."""
    from timm.layers import evo_norm

    model = nn.Sequential(nn.Conv2d(3, 8, 3), getattr(evo_norm, norm)(8, group_size=2),
                          nn.Conv2d(8, 4, 1)).eval()
    x = torch.randn(2, 3, 12, 12)
    groups = ptsp.build_groups(model, x[:1])
    group = next(g for g in groups if g.prunable)
    assert len(group.ids) == 4  # the norm's four groups
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[group.ids[[1, 2]]] = True
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed))
    assert pruned[1].groups == 2 and pruned[1].weight.shape == (4,)
    assert criterion_error(model, groups, removed, x) <= 1e-4


def test_few_wide_groups_keep_their_count():
    """Convs that lose positions within each group keep ``groups`` (whole groups would recount
    them): the pruned model runs, computes what the masked one did, and replays on a fresh one."""
    torch.manual_seed(0)
    model = WideGroups().eval()
    x = torch.randn(2, 3, 16, 16)
    groups, removed, pruned = _pruned(model, x[:1])
    assert (pruned.split.conv.groups, pruned.std.groups) == (4, 2)
    for conv, before in ((pruned.split.conv, model.split.conv), (pruned.std, model.std)):
        assert conv.weight.shape[1] * conv.groups == conv.in_channels < before.in_channels
        assert conv.weight.shape[0] == conv.out_channels < before.out_channels
    assert criterion_error(model, groups, removed, x) <= 1e-4
    fresh = apply(WideGroups(), kept_indices(groups, removed))
    fresh.load_state_dict(pruned.state_dict())
    assert torch.allclose(fresh.eval()(x), pruned(x))
