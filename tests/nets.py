"""Small hand-built models, one per op kind the group builder must handle."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from timm.layers import LayerNorm2d, RmsNorm2d, ScaledStdConv2d, SimpleNorm2d, StdConv2d
from timm.layers.grn import GlobalResponseNorm
from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp
from timm.layers.split_attn import SplitAttn
from timm.layers.norm_act import BatchNormAct2d, RmsNormAct2d
from timm.models.vision_transformer import Attention, LayerScale
from torch import nn


class ConvChain(nn.Module):
    """conv → BN → ReLU → conv → BN → pool → classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16)
        self.c2, self.b2 = nn.Conv2d(16, 24, 3, padding=1, bias=False), BatchNormAct2d(24)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = self.b2(self.c2(F.relu(self.b1(self.c1(x)))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Depthwise(nn.Module):
    """Depthwise conv ties input and output channels; a grouped conv ties whole groups."""

    def __init__(self) -> None:
        super().__init__()
        self.pw = nn.Conv2d(3, 16, 1)
        self.dw = nn.Conv2d(16, 16, 3, padding=1, groups=16)
        self.gc = nn.Conv2d(16, 32, 3, padding=1, groups=4)
        self.fc = nn.Linear(32, 5)

    def forward(self, x):
        x = self.gc(F.relu(self.dw(F.relu(self.pw(x)))))
        return self.fc(x.mean((2, 3)))


class Residual(nn.Module):
    """A residual add ties both branches' producers; a multiplicative gate (SE) ties the gate."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(8, 16, 3, padding=1)
        self.se_reduce, self.se_expand = nn.Conv2d(16, 4, 1), nn.Conv2d(4, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.b(F.relu(self.a(x)))
        gate = torch.sigmoid(self.se_expand(F.relu(self.se_reduce(y.mean((2, 3), keepdim=True)))))
        x = x + y * gate
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


class Concat(nn.Module):
    """Concat shifts the second input's channels; split and chunk cut channel dims."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(3, 12, 3, padding=1)
        self.c = nn.Conv2d(20, 16, 1)
        self.fc = nn.Linear(16, 5)

    def forward(self, x):
        x = self.c(torch.cat([F.relu(self.a(x)), self.b(x)], 1))
        p, q = x.chunk(2, dim=1)
        return self.fc(torch.cat([p, q.sigmoid()], 1).mean((2, 3)))


class FlattenLinear(nn.Module):
    """Flatten → linear: each channel owns H·W input features of the linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3, padding=1)
        self.fc1, self.fc2 = nn.Linear(8 * 4 * 4, 32), nn.Linear(32, 5)

    def forward(self, x):
        x = F.adaptive_avg_pool2d(F.relu(self.c(x)), 4)
        return self.fc2(F.gelu(self.fc1(torch.flatten(x, 1))))


class Norms(nn.Module):
    """LayerNorm2d (timm), GroupNorm with one and several groups."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.n1 = nn.Conv2d(3, 16, 3, padding=1), LayerNorm2d(16)
        self.c2, self.n2 = nn.Conv2d(16, 16, 3, padding=1), nn.GroupNorm(4, 16)
        self.c3, self.n3 = nn.Conv2d(16, 8, 1), nn.GroupNorm(1, 8)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.n1(self.c1(x)))
        x = F.relu(self.n2(self.c2(x)))
        x = self.n3(self.c3(x))
        return self.fc(x.mean((2, 3)))


class Tokens(nn.Module):
    """Permute/transpose/reshape between NCHW and tokens, a token-mixing linear (MLP-Mixer),
    layer scale and a channel LayerNorm."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.norm = nn.LayerNorm(16)
        self.token_fc1, self.token_fc2 = nn.Linear(16, 8), nn.Linear(8, 16)  # over the 16 tokens
        self.ls = LayerScale(16)
        self.fc1, self.fc2 = nn.Linear(16, 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x)
        b, c, h, w = x.shape
        x = x.reshape(b, c, h * w).transpose(1, 2)  # B, N, C
        x = x + self.token_fc2(F.gelu(self.token_fc1(x.transpose(1, 2)))).transpose(1, 2)
        x = x + self.ls(self.fc2(F.gelu(self.fc1(self.norm(x)))))
        return self.head(x.permute(0, 2, 1).mean(-1))


class Heads(nn.Module):
    """timm Attention (fused or unfused), with a class token and position embedding."""

    def __init__(self, fused: bool = True) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.cls_token = nn.Parameter(torch.randn(1, 1, 32) * 0.1)
        self.pos_embed = nn.Parameter(torch.randn(1, 17, 32) * 0.1)
        self.attn = Attention(32, num_heads=4, qkv_bias=True)
        self.attn.fused_attn = fused
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
        x = x + self.attn(x)
        return self.head(x[:, 0])


class RelativeBias(nn.Module):
    """Window attention with a relative-position bias table (swin): a flat buffer of positions
    picks each head's bias, so the table's heads follow the attention heads and the buffer's
    elements are positions, never channels."""

    def __init__(self, heads: int = 4, side: int = 4) -> None:
        super().__init__()
        self.num_heads, self.head_dim = heads, 32 // heads
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.qkv = nn.Linear(32, 3 * 32)
        self.table = nn.Parameter(torch.randn((2 * side - 1) ** 2, heads) * 0.1)
        rows, cols = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        pos = torch.stack([rows.flatten(), cols.flatten()])
        rel = (pos[:, :, None] - pos[:, None, :]) + side - 1
        self.register_buffer("index", (rel[0] * (2 * side - 1) + rel[1]).flatten(), persistent=False)
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        bias = self.table[self.index.view(-1)].view(n, n, -1).permute(2, 0, 1)
        attn = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5 + bias).softmax(-1)
        x = x + self.proj((attn @ v).transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


class CodedNorms(nn.Module):
    """Norms timm writes in module code: mobilenetv5's RmsNorm2d on the residual stream (and
    RmsNormAct2d after a conv, then convnext_zepto_rms's SimpleNorm2d), and
    ConvNeXt-V2's MLP, where a global response norm divides each hidden channel's response by
    their mean over channels (channels last), and once more on a conv's output (channels first)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3, padding=1)
        self.rms = RmsNorm2d(16)
        self.fc1 = nn.Linear(16, 32)
        self.grn = GlobalResponseNorm(32)
        self.fc2 = nn.Linear(32, 16)
        self.conv = nn.Conv2d(16, 24, 3, padding=1)
        self.grn2 = GlobalResponseNorm(24, channels_last=False)
        self.rms_act = RmsNormAct2d(24, act_layer=nn.GELU)
        self.simple = SimpleNorm2d(24)
        self.head = nn.Linear(24, 5)
        for grn in (self.grn, self.grn2):  # timm starts them at zero: the identity
            nn.init.normal_(grn.weight)
            nn.init.normal_(grn.bias)
        for norm in (self.rms, self.rms_act, self.simple):
            nn.init.uniform_(norm.weight, 0.5, 1.5)

    def forward(self, x):
        x = self.rms(self.stem(x))
        x = x + self.fc2(self.grn(F.gelu(self.fc1(x.permute(0, 2, 3, 1))))).permute(0, 3, 1, 2)
        return self.head(self.simple(self.rms_act(self.grn2(F.relu(self.conv(x))))).mean((2, 3)))


class TimmRelPos(nn.Module):
    """Window attention with timm's relative-position modules (RelPosBias, RelPosMlp):
    their ``get_bias`` reshapes by ``bias_shape`` and ``num_heads``, which surgery keeps in sync."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.num_heads, self.head_dim = 4, 8
        self.qkv = nn.Linear(32, 96)
        self.rel_pos = nn.ModuleList([RelPosBias((4, 4), 4), RelPosMlp((4, 4), 4, hidden_dim=16)])
        self.proj = nn.Linear(32, 32)
        self.head = nn.Linear(32, 5)
        for m in self.rel_pos.modules():
            for t in m.parameters(recurse=False):
                nn.init.normal_(t, std=0.5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        b, n, _ = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = q @ k.transpose(-2, -1) * self.head_dim ** -0.5
        for rel_pos in self.rel_pos:
            attn = rel_pos(attn)
        x = x + self.proj((attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1))
        return self.head(x.mean(1))


class EinsumAttention(nn.Module):
    """Attention written with einsum (as mvitv2 and samvit), with a relative-position term: the
    queries contracted with a parameter shared by the heads."""

    def __init__(self, dim: int = 32, num_heads: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.rel = nn.Parameter(torch.randn(tokens, self.head_dim) * 0.1)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhnd,bhmd->bhnm", q, k) + torch.einsum("bhnd,md->bhnm", q, self.rel)
        x = torch.einsum("bhnm,bhmd->bhnd", attn.softmax(-1), v)
        return self.proj(x.transpose(1, 2).reshape(B, N, -1))


class Einsum(nn.Module):
    """Tokens through an einsum attention, then an einsum over the channels to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 32, 4, stride=4)
        self.attn = EinsumAttention()
        self.fc = nn.Linear(32, 24)
        self.head = nn.Parameter(torch.randn(5, 24) * 0.1)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        x = x + self.attn(x)
        return torch.einsum("bnc,kc->bk", F.gelu(self.fc(x)), self.head)


class Gated(nn.Module):
    """A gated MLP as timm's GluMlp (eva02, gMixer): one linear makes the value and
    the gate halves, ``chunk`` parts them, and their product feeds the next linear."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Conv2d(3, 16, 4, stride=4)
        self.fc1, self.fc2 = nn.Linear(16, 2 * 24), nn.Linear(24, 16)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        value, gate = self.fc1(x).chunk(2, dim=-1)
        x = x + self.fc2(value * F.silu(gate))
        return self.head(x.mean(1))


class MixedParts(nn.Module):
    """Channels split by sizes held in a module attribute (timm's MixedConv2d): each part has its
    own depthwise conv, and the outputs are concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.splits = [8, 4]
        self.convs = nn.ModuleList([nn.Conv2d(8, 8, 3, padding=1, groups=8),
                                    nn.Conv2d(4, 4, 5, padding=2, groups=4)])

    def forward(self, x):
        return torch.cat([c(p) for c, p in zip(self.convs, torch.split(x, self.splits, 1))], 1)


class Mixed(nn.Module):
    """A mixed depthwise conv between two convs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 12, 3, padding=1)
        self.mixed = MixedParts()
        self.pw = nn.Conv2d(12, 6, 1)
        self.fc = nn.Linear(6, 5)

    def forward(self, x):
        x = self.mixed(F.relu(self.stem(x)))
        return self.fc(F.relu(self.pw(x)).mean((2, 3)))


class ScalesBlock(nn.Module):
    """timm's Res2Net Bottle2neck: ``torch.split`` into parts of ``self.width`` channels; each part
    but the last is convolved after adding the previous part's output, and the parts are
    concatenated back."""

    def __init__(self, width: int = 6, scale: int = 3) -> None:
        super().__init__()
        self.width = width
        self.conv1 = nn.Conv2d(8, width * scale, 1)
        self.convs = nn.ModuleList([nn.Conv2d(width, width, 3, padding=1) for _ in range(scale - 1)])
        self.conv3 = nn.Conv2d(width * scale, 8, 1)

    def forward(self, x):
        spx = torch.split(F.relu(self.conv1(x)), self.width, 1)
        out, sp = [], None
        for i, conv in enumerate(self.convs):
            sp = F.relu(conv(spx[i] if sp is None else sp + spx[i]))
            out.append(sp)
        return self.conv3(torch.cat(out + [spx[-1]], 1))


class Scales(nn.Module):
    """A Res2Net block between a stem and a classifier."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.block = ScalesBlock()
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        return self.fc(F.relu(self.block(F.relu(self.stem(x)))).mean((2, 3)))


class CrossStage(nn.Module):
    """timm's CSPNet stage: ``x.split(self.expand_chs // 2)`` into halves, one through a
    residual block, concatenated back."""

    def __init__(self) -> None:
        super().__init__()
        self.expand_chs = 16
        self.conv_exp = nn.Conv2d(3, 16, 3, padding=1)
        self.block = nn.Conv2d(8, 8, 3, padding=1)
        self.conv_transition = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x1, x2 = F.relu(self.conv_exp(x)).split(self.expand_chs // 2, dim=1)
        x1 = x1 + F.relu(self.block(x1))
        return self.fc(F.relu(self.conv_transition(torch.cat([x1, x2], 1))).mean((2, 3)))


class Standardised(nn.Module):
    """Weight-standardised convs (timm's StdConv2d, NFNets' ScaledStdConv2d, one grouped): each
    filter is normalised over its input columns at every call."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv2d(3, 8, 3, padding=1)
        self.conv = ScaledStdConv2d(8, 16, 3, padding=1)
        self.grouped = ScaledStdConv2d(16, 16, 3, padding=1, groups=4)
        self.pw = StdConv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.grouped(F.relu(self.conv(F.relu(self.stem(x))))))
        return self.fc(F.relu(self.pw(x)).mean((2, 3)))


class WideGroups(nn.Module):
    """Few wide conv groups: ResNeSt's split attention (radix 2, cardinality 2: a conv of 4 groups
    of 6 columns, the softmax across the radix after a view by cardinality and radix) and an
    NFNet-style standardised conv with 2 groups of 8 columns. Position j of every group is one
    channel."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 24, 3, padding=1)
        self.split = SplitAttn(24, 16, groups=2, radix=2)
        self.std = ScaledStdConv2d(16, 24, 3, padding=1, groups=2)
        self.fc = nn.Linear(24, 5)

    def forward(self, x):
        x = F.relu(self.std(self.split(F.relu(self.stem(x)))))
        return self.fc(x.mean((2, 3)))


class PathsAttn(nn.Module):
    """timm's SelectiveKernelAttn: per-channel weights of each path, softmaxed across the paths
    after a view that cuts the channel dim into ``num_paths`` parts (``fixed``: a view that writes
    the part size in the code, which a pruned model cannot follow)."""

    def __init__(self, channels: int, paths: int = 2, fixed: bool = False) -> None:
        super().__init__()
        self.num_paths, self.fixed = paths, fixed
        self.fc_reduce = nn.Conv2d(channels, 8, 1)
        self.fc_select = nn.Conv2d(8, channels * paths, 1)

    def forward(self, x):
        a = self.fc_select(F.relu(self.fc_reduce(x.sum(1).mean((2, 3), keepdim=True))))
        B, C = a.shape[:2]
        return torch.softmax(a.view(B, self.num_paths, 16 if self.fixed else C // self.num_paths, 1, 1), 1)


class Paths(nn.Module):
    """A selective-kernel conv (timm's SelectiveKernel, skresnet): two convs on one input, summed
    with the attention's weights."""

    def __init__(self, fixed: bool = False) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.paths = nn.ModuleList([nn.Conv2d(8, 16, 3, padding=1), nn.Conv2d(8, 16, 5, padding=2)])
        self.attn = PathsAttn(16, fixed=fixed)
        self.pw = nn.Conv2d(16, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = torch.stack([p(x) for p in self.paths], 1)
        x = (x * self.attn(x)).sum(1)
        return self.fc(F.relu(self.pw(x)).mean((2, 3)))


class Windows(nn.Module):
    """Ops that move pixels, not channels: a transposed conv, an antialiased resize, windows of
    ``Tensor.unfold``, ``tile``, ``F.unfold`` (im2col: each channel's kernel positions in a
    row each) and back with ``F.fold``, into a linear."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.up = nn.ConvTranspose2d(8, 12, 2, stride=2)
        self.fc = nn.Linear(12 * 4, 10)
        self.head = nn.Linear(10, 5)

    def forward(self, x):
        x = self.up(F.relu(self.c1(x)))
        x = F.interpolate(x, scale_factor=0.5, mode="bicubic", antialias=True)
        x = x.unfold(3, 2, 2).mean(-1).tile((1, 1, 2))
        cols = F.unfold(x, 2, stride=2)
        x = x + F.fold(cols, x.shape[-2:], 2, stride=2)
        y = self.fc(F.unfold(x, 2, stride=2).transpose(1, 2))
        return self.head(F.relu(y).mean(1))


class PixelShuffle(nn.Module):
    """An op with no channel rule (pixel_shuffle moves channels into space)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 16, 3, padding=1)
        self.c2 = nn.Conv2d(4, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = F.pixel_shuffle(self.c1(x), 2)
        return self.fc(self.c3(F.relu(self.c2(x))).mean((2, 3)))


class SharedModule(nn.Module):
    """One conv registered under two names and applied twice (as CoaT-lite shares its CPE)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.blocks = nn.ModuleList([nn.Sequential(self.mix, nn.ReLU())])
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.stem(x)
        x = x + self.blocks[0](x)
        return self.fc(self.mix(x).mean((2, 3)))


class DataDependent(nn.Module):
    """Control flow on tensor values: cannot be traced."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 8, 3)

    def forward(self, x):
        y = self.c(x)
        if y.sum() > 0:
            return y.mean((2, 3))
        return y.amax((2, 3))


NETS = {cls.__name__: cls for cls in (ConvChain, Depthwise, Residual, Concat, FlattenLinear, Norms,
                                      Standardised, WideGroups, CodedNorms, Tokens, Heads, RelativeBias, TimmRelPos, Einsum, Gated, Mixed,
                                      Scales, CrossStage, Paths, PixelShuffle, Windows, SharedModule)}


class SmallCNN(nn.Module):
    """A Fashion-MNIST classifier small enough to train inside a test (1×28×28 input)."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        w = width
        self.features = nn.Sequential(*[
            nn.Sequential(nn.Conv2d(i, o, 3, s, 1, bias=False), nn.BatchNorm2d(o), nn.ReLU())
            for i, o, s in ((1, w, 1), (w, 2 * w, 2), (2 * w, 2 * w, 1), (2 * w, 4 * w, 2))])
        self.fc = nn.Linear(4 * w, 10)

    def forward(self, x):
        return self.fc(self.features(x).mean((2, 3)))


class OutOfOrder(nn.Module):
    """Registration order (head, body) differs from execution order (body, head)."""

    def __init__(self) -> None:
        super().__init__()
        self.head = nn.Linear(8, 4)
        self.body = nn.Conv2d(3, 8, 3, padding=1)

    def forward(self, x):
        return self.head(self.body(x).mean((2, 3)))
