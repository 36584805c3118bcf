"""The group builder: structure on hand-built nets, and the correctness criterion over timm."""
from __future__ import annotations

import copy
import warnings

import numpy as np
import pytest
import timm
import torch

import ptsp
from ptsp.importance import normalised_scores
from ptsp.pruning import remove_checked
from ptsp.selection import select
from ptsp.surgery import apply, criterion_error, kept_indices

from nets import NETS, DataDependent, Heads, Paths

EXACT = 1e-4


def x_for(shape=(2, 3, 16, 16)):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(0))


def by_tensor(groups, tensor, dim=0):
    return next(g for g in groups for m in g.members if m.tensor == tensor and m.dims == (dim,))


def check(model, x, ratio):
    """Prune ``ratio`` of the prunable channels, return the criterion error."""
    groups = ptsp.build_groups(model, x[:1])
    scores = normalised_scores(groups, dict(model.named_parameters()))
    removed, _, _, _ = remove_checked(model, groups, x[:1], set(), lambda s: select(groups, scores, ratio, skip=s))
    return groups, removed, criterion_error(model, groups, removed, x)


@pytest.mark.parametrize("name", sorted(NETS))
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_hand_built_nets_match_reference(name, ratio):
    torch.manual_seed(0)
    model = NETS[name]().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        groups, removed, err = check(model, x_for(), ratio)
    assert removed.any()
    assert err <= EXACT


def test_conv_chain_groups():
    model = NETS["ConvChain"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    assert [g.channels for g in groups] == [16, 24, 5]
    g1 = groups[0]
    assert {(m.tensor, m.dims, m.role) for m in g1.members} >= {
        ("c1.weight", (0,), "out"), ("c1.bias", (0,), "out"), ("b1.weight", (0,), "elem"),
        ("b1.running_var", (0,), "elem"), ("c2.weight", (1,), "in")}
    # timm's BatchNormAct2d is traced through: its parameters join the conv's group
    assert any(m.tensor == "b2.running_mean" for m in groups[1].members)
    assert not groups[2].prunable and "model output" in groups[2].reasons[0]
    assert "Group 0: 16 channels, prunable" in repr(g1)


def test_depthwise_and_grouped_conv():
    model = NETS["Depthwise"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "pw.weight")
    assert {m.tensor for m in g.members} >= {"dw.weight", "dw.bias", "gc.weight"}
    # the grouped conv has 4 groups (4 inputs, 8 outputs each) that go whole: its outputs join
    # the same group, whose 4 channels each own 4 input and 8 output rows
    assert g.channels == 4
    rows = next(m for m in g.members if m.tensor == "gc.weight")
    assert rows.dims == (0,) and np.array_equal(rows.channel, np.repeat(g.ids, 8))


def test_residual_and_gate_couple_producers():
    model = NETS["Residual"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "stem.weight")
    tensors = {m.tensor for m in g.members if m.role == "out"}
    assert tensors == {"stem.weight", "stem.bias", "b.weight", "b.bias", "se_expand.weight", "se_expand.bias"}


def test_concat_offsets_and_chunk_pins():
    model = NETS["Concat"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "a.weight")
    consumer = next(m for m in g.members if m.tensor == "c.weight")
    assert consumer.dims == (1,) and consumer.channel.shape == (20,)
    a_ids = next(m for m in g.members if m.tensor == "a.weight" and m.dims == (0,)).channel
    assert np.array_equal(consumer.channel[:8], a_ids)
    # its halves go different ways, so pruning one channel would move the other half's start
    chunked = by_tensor(groups, "c.weight")
    assert not chunked.prunable and any("chunked unevenly" in r for r in chunked.reasons)


def test_gated_halves_go_together():
    """chunk(2) of a gated MLP: value channel i and gate channel i are one channel of fc1's two
    rows, so both halves lose alike and chunk still parts them at run time."""
    model = NETS["Gated"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "fc2.weight", dim=1)
    rows = next(m for m in g.members if m.tensor == "fc1.weight")
    assert g.prunable and g.channels == 24
    assert np.array_equal(rows.channel, np.concatenate([g.ids, g.ids]))


def test_split_sizes_from_an_attribute_free_the_parts():
    """torch.split by a module attribute (timm's MixedConv2d.splits): each part is its own member
    (so each keeps a channel), and the channels stay prunable."""
    model = NETS["Mixed"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "stem.weight")
    parts = [m.channel for m in g.members if m.tensor == "mixed.splits"]
    assert g.prunable and all(m.role == "split" for m in g.members if m.tensor == "mixed.splits")
    assert [np.flatnonzero(p >= 0).tolist() for p in parts] == [list(range(8)), list(range(8, 12))]
    # the most that can go (18 prunable channels): each part and pw's group keep one
    removed = select(groups, normalised_scores(groups, dict(model.named_parameters())), 15 / 18)
    assert [int((~removed[p[p >= 0]]).sum()) for p in parts] == [1, 1]


def test_parts_of_one_width_lose_the_same_positions():
    """torch.split by one size held in an int attribute (Res2Net's ``self.width``): position i of
    every part is one channel, so the parts keep one width, and the attribute is a member."""
    model = NETS["Scales"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "block.conv1.weight")
    rows = next(m for m in g.members if m.tensor == "block.conv1.weight").channel
    assert g.prunable and (rows >= 0).all()
    assert np.array_equal(rows[:6], rows[6:12]) and np.array_equal(rows[:6], rows[12:])
    assert sum(m.tensor == "block.width" for m in g.members) == 3


def test_standardised_weights_normalise_the_columns_they_keep():
    """A weight standardised over its input columns (StdConv2d): those columns cross a channel
    normalisation, like a LayerNorm's channels; a grouped conv's columns per group stay."""
    model = NETS["Standardised"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "conv.weight", dim=1)
    assert g.prunable and g.norm_crossing and g.channels == 8
    assert {(m.tensor, m.role) for m in g.members if m.dims == (1,)} == {("conv.weight", "standardised")}
    assert not by_tensor(groups, "grouped.weight", dim=1).prunable
    blocks = by_tensor(groups, "pw.weight", dim=1)  # the grouped conv's output: whole groups
    assert blocks.prunable and blocks.channels == 4


def test_few_wide_groups_lose_positions():
    """Fewer conv groups than columns per group (ResNeSt's radix, NFNets' wide groups): position j
    of every group is one channel, on the input and the output side, so the groups keep one width
    and their count; a standardised grouped conv's columns then cross its normalisation."""
    model = NETS["WideGroups"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "stem.weight")
    rows = next(m for m in g.members if m.tensor == "stem.weight").channel
    assert g.prunable and g.channels == 6 and (rows.reshape(4, 6) == rows[:6]).all()
    assert ("split.conv.weight", (1,), "in") in {(m.tensor, m.dims, m.role) for m in g.members}
    cols = by_tensor(groups, "std.weight", dim=1)  # also the split's radix parts, viewed by
    assert cols.prunable and cols.norm_crossing  # cardinality and radix for the softmax
    out = next(m for m in by_tensor(groups, "std.weight").members if m.tensor == "std.weight").channel
    assert len(set(out)) == 12 and np.array_equal(out[:12], out[12:])


def test_norms_in_module_code_normalise_channels():
    """timm's RmsNorm2d(Act), SimpleNorm2d and GlobalResponseNorm take their statistic (a mean, a
    variance) over channels in module code: those channels cross a normalisation (statistics over
    the kept ones), channels last or first, and the norm's weight follows them."""
    model = NETS["CodedNorms"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    for producer, norms in (("stem.weight", ["rms"]), ("fc1.weight", ["grn"]),
                            ("conv.weight", ["grn2", "rms_act", "simple"])):
        g = by_tensor(groups, producer)
        assert g.prunable and g.norm_crossing
        assert {f"{norm}.weight" for norm in norms} <= {m.tensor for m in g.members}


def test_paths_cut_from_one_dim_go_together():
    """A view into (num_paths, C // num_paths), softmax and sum across the paths (timm's selective
    kernel): channel i of every path is one channel, with fc_select's rows i and C + i."""
    model = NETS["Paths"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "pw.weight", dim=1)
    rows = next(m for m in g.members if m.tensor == "attn.fc_select.weight")
    assert g.prunable and g.channels == 16
    assert {m.tensor for m in g.members if m.role == "out"} >= {"paths.0.weight", "paths.1.weight"}
    assert np.array_equal(rows.channel, np.concatenate([g.ids, g.ids]))


def test_paths_with_a_part_size_in_the_code_are_left_whole():
    """The same view with the part size written as a number fails once pruned: prune leaves
    the paths' channels as they are, and says so."""
    torch.manual_seed(0)
    model = Paths(fixed=True).eval()
    with pytest.warns(UserWarning, match="fixed widths.*PathsAttn"):
        groups, removed, err = check(model, x_for(), 0.5)
    assert not removed[by_tensor(groups, "pw.weight", dim=1).ids].any()
    assert removed.any() and err <= EXACT


def test_einsum_attention_prunes_whole_heads():
    """einsum: the head dim couples q, k and v; head_dim, summed away, joins each head's channels
    into one; a parameter contracted with the queries keeps its width."""
    model = NETS["Einsum"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    heads = by_tensor(groups, "attn.qkv.weight")
    assert heads.prunable and heads.channels == 4
    rel = by_tensor(groups, "attn.rel", dim=1)
    assert not rel.prunable and any("einsum" in r for r in rel.reasons)
    removed = np.zeros(groups.num_channels, dtype=bool)
    removed[heads.ids[:2]] = True
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed))
    assert pruned.attn.num_heads == 2 and pruned.attn.qkv.out_features == 48
    assert criterion_error(model, groups, removed, x_for()) <= EXACT


def test_flatten_expands_channels_to_features():
    model = NETS["FlattenLinear"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    g = by_tensor(groups, "c.weight")
    fc = next(m for m in g.members if m.tensor == "fc1.weight")
    assert fc.channel.shape == (128,)
    assert np.array_equal(fc.channel.reshape(8, 16), np.repeat(g.ids[:, None], 16, 1))


def test_norms():
    model = NETS["Norms"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    assert by_tensor(groups, "c1.weight").norm_crossing  # LayerNorm2d over channels
    gn4 = by_tensor(groups, "c2.weight")
    assert gn4.channels == 4 and not gn4.norm_crossing  # whole GroupNorm groups: exact
    assert by_tensor(groups, "c3.weight").norm_crossing  # GroupNorm(1, C)


def test_tokens_mixer_layerscale():
    model = NETS["Tokens"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    residual = by_tensor(groups, "embed.weight")
    assert {"ls.gamma", "norm.weight", "fc2.weight", "head.weight"} <= {m.tensor for m in residual.members}
    token_hidden = by_tensor(groups, "token_fc1.weight")
    assert token_hidden.prunable and token_hidden.channels == 8
    assert not by_tensor(groups, "token_fc2.weight").prunable  # the token count is fixed


@pytest.mark.parametrize("fused", [True, False])
def test_attention_heads(fused):
    model = Heads(fused).eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    heads = by_tensor(groups, "attn.qkv.weight")
    assert heads.prunable and heads.channels == 4
    qkv = next(m for m in heads.members if m.tensor == "attn.qkv.weight")
    assert qkv.channel.shape == (96,) and len(np.unique(qkv.channel)) == 4
    residual = by_tensor(groups, "embed.weight")
    assert {"cls_token", "pos_embed", "attn.proj.weight", "head.weight"} <= {m.tensor for m in residual.members}
    groups, removed, err = check(model, x_for(), 0.5)
    assert err <= EXACT
    pruned = ptsp.prune(model, None, 0.5, method="magnitude", example_inputs=x_for()[:1])
    assert pruned.attn.num_heads < 4 and pruned.attn.attn_dim == pruned.attn.num_heads * pruned.attn.head_dim


def test_index_tensors_are_positions():
    """The tensor used as indices addresses positions: its elements stay, while the table it
    gathers from keeps a channel dim (heads) that follows the attention heads."""
    model = NETS["RelativeBias"]().eval()
    groups = ptsp.build_groups(model, x_for()[:1])
    index = by_tensor(groups, "index")
    assert not index.prunable and any("used as indices" in r for r in index.reasons)
    heads = by_tensor(groups, "table", dim=1)
    assert heads.prunable and heads.channels == 4
    assert "qkv.weight" in {m.tensor for m in heads.members}


def test_a_buffer_used_as_indices_keeps_its_size():
    """A buffer that indexes and also meets channels as data: those channels stay, since
    removing its elements would change what it picks."""

    class Picks(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(4, 8)
            self.table = torch.nn.Parameter(torch.randn(8, 8))
            self.register_buffer("idx", torch.arange(8).flip(0))
            self.head = torch.nn.Linear(8, 3)

        def forward(self, x):
            h = self.proj(x) * self.idx.float() + self.table[self.idx].sum(0)
            return self.head(h)

    groups = ptsp.build_groups(Picks().eval(), torch.randn(1, 4))
    g = by_tensor(groups, "proj.weight")
    assert "idx" in {m.tensor for m in g.members}
    assert not g.prunable and any("used as indices" in r for r in g.reasons)


def test_unknown_op_pins_and_warns():
    model = NETS["PixelShuffle"]().eval()
    with pytest.warns(UserWarning, match="pixel_shuffle"):
        groups = ptsp.build_groups(model, x_for()[:1])
    assert not by_tensor(groups, "c1.weight").prunable
    assert by_tensor(groups, "c2.weight").prunable


def test_tracing_leaves_the_model_as_it_was():
    model = NETS["SharedModule"]().eval()
    before = {n: t for n, t in model.named_parameters(remove_duplicate=False)}
    groups = ptsp.build_groups(model, x_for()[:1])
    after = dict(model.named_parameters(remove_duplicate=False))
    assert all(after[n] is t and type(t) is torch.nn.Parameter for n, t in before.items())
    # the shared conv's tensors are members under one name only
    assert not any(m.tensor.startswith("blocks.") for g in groups for m in g.members)


def test_untraceable_model():
    with pytest.raises(ptsp.TraceError, match="cannot trace DataDependent"):
        ptsp.build_groups(DataDependent(), x_for()[:1])


# ------------------------------------------------------------------------------------------------
# The public list of timm models checked against the criterion (README links it).
# name -> (creation kwargs, input side)
TIMM_MODELS = {
    "resnet18": ({}, 64), "resnet50": ({}, 64), "resnext26ts": ({}, 64),
    "seresnext26d_32x4d": ({}, 64), "res2net50_14w_8s": ({}, 64), "resnetv2_50": ({}, 64),
    "regnetx_002": ({}, 64), "regnety_002": ({}, 64), "efficientnet_b0": ({}, 64),
    "efficientnet_lite0": ({}, 64), "tf_mixnet_s": ({}, 64), "mobilenetv2_050": ({}, 64),
    "mobilenetv3_small_050": ({}, 64), "mobilenetv3_large_100": ({}, 64), "lcnet_050": ({}, 64),
    "mnasnet_small": ({}, 64), "ghostnet_050": ({}, 64), "densenet121": ({}, 64), "vgg11": ({}, 64),
    "convnext_atto": ({}, 64), "convnextv2_atto": ({}, 64), "vit_tiny_patch16_224": ({"img_size": 64}, 64),
    "deit_tiny_patch16_224": ({"img_size": 64}, 64), "swin_tiny_patch4_window7_224": ({}, 224),
    "mixer_s16_224": ({"img_size": 64}, 64), "resmlp_12_224": ({"img_size": 64}, 64),
    "dla34": ({}, 64), "dpn48b": ({}, 64), "inception_v3": ({}, 96), "cspresnet50": ({}, 64),
    "cspdarknet53": ({}, 64), "rexnet_100": ({}, 64), "repvgg_a0": ({}, 64), "levit_128s": ({}, 224),
    "hrnet_w18_small": ({}, 64), "poolformer_s12": ({}, 64), "mobilevit_xxs": ({}, 64),
    "edgenext_xx_small": ({}, 64), "pit_ti_224": ({}, 224), "gernet_s": ({}, 64),
    "selecsls42b": ({}, 64), "ese_vovnet19b_dw": ({}, 64), "efficientformer_l1": ({}, 224),
    "eva02_tiny_patch14_224": ({"img_size": 56}, 56), "mixnet_s": ({}, 64), "mambaout_femto": ({}, 64),
    "skresnet18": ({}, 64), "nf_regnet_b0": ({}, 64), "test_efficientnet_evos": ({}, 64),
    "resnest14d": ({}, 64),
}


@pytest.fixture(scope="module")
def timm_cache():
    return {}


def _timm_case(name, cache):
    if name not in cache:
        kwargs, side = TIMM_MODELS[name]
        torch.manual_seed(0)
        model = timm.create_model(name, pretrained=False, **kwargs).eval()
        x = x_for((2, 3, side, side))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            groups = ptsp.build_groups(model, x[:1])
        cache[name] = (model, x, groups)
    return cache[name]


@pytest.mark.parametrize("name", sorted(TIMM_MODELS))
@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_timm_models_match_reference(name, ratio, timm_cache):
    """The pruned model equals the reference (consumer columns of removed channels zeroed,
    channel norms over kept channels) for every timm model of the public list."""
    model, x, groups = _timm_case(name, timm_cache)
    scores = normalised_scores(groups, dict(model.named_parameters()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        removed, _, _, _ = remove_checked(model, groups, x[:1], set(), lambda s: select(groups, scores, ratio, skip=s))
    assert removed.any()
    assert criterion_error(model, groups, removed, x) <= EXACT
