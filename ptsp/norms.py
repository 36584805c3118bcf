"""Norms that timm writes out in module code rather than as one torch op.

Their statistic over channels is a ``mean`` (or ``var``) across the channel dim: in code we do not
know that mixes channels and pins them, but in these modules it normalises them, as a layer norm's
does. The group builder asks :func:`statistic_dim` which reduction that is; the surgery reference
(:func:`ptsp.surgery.kept_statistics`) runs :func:`kept_forwards`, in which they take it over the
kept channels, as the pruned module does. The grouped EvoNorms take it over fixed-size groups of
channels, as a group norm: whole groups go, and their ``groups`` attribute follows
(:func:`is_grouped_norm`).
"""
from __future__ import annotations

import contextlib
import functools
from typing import Any, Callable, Iterator

import torch
from torch import nn

KeptForward = Callable[[nn.Module, torch.Tensor, torch.Tensor], torch.Tensor]


def _response_norm(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """timm's GlobalResponseNorm (ConvNeXt-V2) with its channel mean over the ``k`` (0/1) channels."""
    k = k.view(m.wb_shape)
    x_g = x.norm(p=2, dim=m.spatial_dim, keepdim=True)
    x_n = x_g / ((x_g * k).sum(m.channel_dim, keepdim=True) / k.sum() + m.eps)
    return x + torch.addcmul(m.bias.view(m.wb_shape), m.weight.view(m.wb_shape), x * x_n)


def _rms_norm2d(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """timm's RmsNorm2d (NCHW, mobilenetv5) with its mean square over the ``k`` channels."""
    k = k.view(1, -1, 1, 1)
    v = (x * x * k).sum(1, keepdim=True) / k.sum()
    return x * torch.rsqrt(v + m.eps) * m.weight.view(1, -1, 1, 1)


def _rms_norm_act2d(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """timm's RmsNormAct2d: :func:`_rms_norm2d`, then its dropout and activation."""
    return m.act(m.drop(_rms_norm2d(m, x, k)))


def _simple_norm(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """timm's SimpleNorm (channels last): x / std(x) with the (unbiased) variance over the ``k``
    channels."""
    n = k.sum()
    mean = (x * k).sum(-1, keepdim=True) / n
    v = ((x - mean) ** 2 * k).sum(-1, keepdim=True) / (n - 1)
    return x * torch.rsqrt(v + m.eps) * m.weight


def _simple_norm2d(m: nn.Module, x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """timm's SimpleNorm2d: :func:`_simple_norm` on the NCHW input made channels last."""
    return _simple_norm(m, x.permute(0, 2, 3, 1), k).permute(0, 3, 1, 2)


@functools.cache
def _known() -> dict[type, tuple[Any, Callable[[nn.Module], int], KeptForward]]:
    """Module class -> (the ATen op of its statistic, the channel dim it takes it over, its
    forward over kept channels). Exact classes: a subclass may compute more (RmsNormAct2d adds an
    activation). Imported on use: timm is only needed by models that have these modules."""
    from timm.layers.grn import GlobalResponseNorm
    from timm.layers.norm import RmsNorm2d, RmsNorm2dFp32, SimpleNorm, SimpleNorm2d
    from timm.layers.norm_act import RmsNormAct2d, RmsNormAct2dFp32

    mean, var = torch.ops.aten.mean, torch.ops.aten.var
    first, last = (lambda m: 1), (lambda m: -1)  # NCHW; channels last (SimpleNorm2d permutes)
    return {GlobalResponseNorm: (mean, lambda m: m.channel_dim, _response_norm),
            RmsNorm2d: (mean, first, _rms_norm2d), RmsNorm2dFp32: (mean, first, _rms_norm2d),
            RmsNormAct2d: (mean, first, _rms_norm_act2d), RmsNormAct2dFp32: (mean, first, _rms_norm_act2d),
            SimpleNorm: (var, last, _simple_norm), SimpleNorm2d: (var, last, _simple_norm2d)}


@functools.cache
def _grouped() -> tuple[type, ...]:
    """timm's EvoNorms that take their statistic over groups of channels, reshaping the channel
    dim into ``(self.groups, C // self.groups)``."""
    from timm.layers import evo_norm

    return (evo_norm.EvoNorm2dS0, evo_norm.EvoNorm2dS0a, evo_norm.EvoNorm2dS1,
            evo_norm.EvoNorm2dS1a, evo_norm.EvoNorm2dS2, evo_norm.EvoNorm2dS2a)


def is_grouped_norm(module: nn.Module | None) -> bool:
    """Whether ``module`` normalises ``module.groups`` groups of channels of one fixed size: whole
    groups may go (each keeps its statistic), and surgery sets ``groups`` to those kept."""
    return type(module) in _grouped() and isinstance(getattr(module, "groups", None), int)


def is_coded_norm(module: nn.Module | None) -> bool:
    """Whether ``module`` is a norm known here. One without a weight is left out: the reference
    finds its kept channels through its weight's member."""
    return type(module) in _known() and isinstance(getattr(module, "weight", None), nn.Parameter)


def statistic_dim(module: nn.Module | None, op: Any, ndim: int) -> int | None:
    """The dim (of an ``ndim`` input) over which ``module`` takes a channel norm's statistic with
    the ATen op (overload packet) ``op`` in its code, or None."""
    if not is_coded_norm(module):
        return None
    stat, dim, _ = _known()[type(module)]
    return dim(module) % ndim if op is stat else None


@contextlib.contextmanager
def kept_forwards(kept: dict[int, torch.Tensor]) -> Iterator[None]:
    """Within this context, the known modules whose id is in ``kept`` (-> bool mask of kept
    channels) take their statistic over those channels, in float32, and give the input's dtype."""
    known = _known()
    originals = {cls: cls.forward for cls in known}

    def patched(cls: type, fn: KeptForward) -> Callable[[nn.Module, torch.Tensor], torch.Tensor]:
        def forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
            k = kept.get(id(self))
            if k is None:
                return originals[cls](self, x)
            return fn(self, x.float(), k.to(x.device, torch.float32)).to(x.dtype)
        return forward

    for cls, (_, _, fn) in known.items():
        cls.forward = patched(cls, fn)
    try:
        yield
    finally:
        for cls, forward in originals.items():
            cls.forward = forward
