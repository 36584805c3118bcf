"""Physical removal: index every tensor down to its kept slices and bring module attributes in line.

The unit of exchange is ``kept``: ``{module path: {tensor name: {dim: [kept original indices]}}}``
(a split-sizes attribute, role "split", counts as a vector of the split dim's positions).
It is computed from groups and a removal mask, stored in the plan (JSON-serialisable), and replayed
on a fresh copy of the architecture when an artifact is loaded.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import torch
from torch import nn

from .groups import CONSUMER_ROLES, Groups
from .norms import is_coded_norm, is_grouped_norm, kept_forwards
from .ops import by_positions

Kept = dict[str, dict[str, dict[int, list[int]]]]


def whole_slices(gone: np.ndarray, axis: int) -> np.ndarray:
    """Indices along ``axis`` whose entire slice of the boolean array ``gone`` is True."""
    return np.flatnonzero(np.moveaxis(gone, axis, 0).reshape(gone.shape[axis], -1).all(axis=1))


def removed_slices(groups: Groups, removed: np.ndarray) -> dict[str, dict[int, np.ndarray]]:
    """For each tensor, the indices removed along each dim (only dims that lose something)."""
    ext = np.append(removed, False)  # channel id -1 (never removed) maps to the last entry
    out: dict[str, dict[int, set[int]]] = {}
    for g in groups:
        if not removed[g.ids].any():
            continue
        for m in g.members:
            gone = ext[m.channel]
            if not gone.any():
                continue
            for ax, dim in enumerate(m.dims):
                idx = whole_slices(gone, ax)
                if idx.size:
                    out.setdefault(m.tensor, {}).setdefault(dim, set()).update(idx.tolist())
    return {t: {d: np.array(sorted(s)) for d, s in dims.items()} for t, dims in out.items()}


def kept_indices(groups: Groups, removed: np.ndarray) -> Kept:
    """The plan's ``kept`` map for removing the channels in ``removed`` (a mask over channel ids)."""
    kept: Kept = {}
    for tensor, dims in removed_slices(groups, removed).items():
        module, _, name = tensor.rpartition(".")
        size = groups.shapes[tensor]
        kept.setdefault(module, {})[name] = {
            d: np.setdiff1d(np.arange(size[d]), gone).tolist() for d, gone in sorted(dims.items())}
    return kept


def compose(first: dict, then: dict) -> dict:
    """The kept map of pruning by ``first`` and then by ``then``, whose indices count the widths
    ``first`` left: a model pruned twice still records original indices of its base."""
    out = {m: {t: dict(dims) for t, dims in ts.items()} for m, ts in first.items()}
    for module, tensors in then.items():
        for name, dims in tensors.items():
            prior = out.setdefault(module, {}).setdefault(name, {})
            for dim, idx in dims.items():
                prior[dim] = [prior[dim][i] for i in idx] if dim in prior else list(idx)
    return out


def apply(model: nn.Module, kept: Kept) -> nn.Module:
    """Index ``model``'s tensors in place to the kept slices, then resync module attributes (a
    split-sizes attribute in ``kept`` is set to the number of kept positions in each part, or,
    an integer, in every part or in all).

    A tensor shared by several modules (tied weights) is replaced everywhere it is used."""
    users: dict[int, list[tuple[nn.Module, str]]] = {}
    for m in model.modules():
        for name, t in list(m._parameters.items()) + list(m._buffers.items()):
            if t is not None:
                users.setdefault(id(t), []).append((m, name))
    widths: dict[int, int] = {}  # id of a module -> its weight's width before surgery
    for path, tensors in kept.items():
        module = model.get_submodule(path)
        for name, dims in tensors.items():
            old = getattr(module, name)
            if name == "weight" and isinstance(old, torch.Tensor) and old.dim():
                widths[id(module)] = old.shape[0]
            if isinstance(old, (list, tuple)) or type(old) is int:  # a split's sizes (role
                # "split"): what each part keeps; one int (equal parts keeping alike: a part's
                # size or their total) becomes the kept positions below it
                kept_at = np.asarray(next(iter(dims.values())))
                counts = [int(n) for n in np.diff(np.searchsorted(kept_at, np.cumsum(old)), prepend=0)]
                setattr(module, name, counts[0] if type(old) is int else type(old)(counts))
                continue
            new = old.detach()
            for dim, idx in sorted(dims.items(), key=lambda kv: int(kv[0])):
                new = new.index_select(int(dim), torch.as_tensor(idx, dtype=torch.long, device=new.device))
            new = new.contiguous()
            if isinstance(old, nn.Parameter):
                new = nn.Parameter(new, requires_grad=old.requires_grad)
            for m, n in users.get(id(old), [(module, name)]):
                (m._parameters if isinstance(old, nn.Parameter) else m._buffers)[n] = new
    sync_attributes(model.modules(), widths)
    return model


def _bias_heads(m: nn.Module, at: int, heads: int) -> None:
    """Set a relative-position bias's head count, entry ``at`` of its ``bias_shape``."""
    m.bias_shape = tuple(heads if i == at % len(m.bias_shape) else n for i, n in enumerate(m.bias_shape))
    if hasattr(m, "num_heads"):
        m.num_heads = heads


def _timm_widths() -> dict[type, Callable[[nn.Module], None]]:
    """timm modules that keep a width in an attribute their code reads outside ``forward``'s
    tensors' shapes: class -> sets it from their tensors. Relative-position biases hold their
    head count in ``bias_shape`` (and ``num_heads``); ``BlurPool2d`` its ``channels`` (the
    depthwise blur's groups)."""
    from timm.layers.blur_pool import BlurPool2d
    from timm.layers.pos_embed_rel import RelPosBias, RelPosMlp

    def blur(m: nn.Module) -> None:
        if m.channels is not None:
            m.channels = m.filt.shape[0]

    return {RelPosBias: lambda m: _bias_heads(m, -1, m.relative_position_bias_table.shape[1]),
            RelPosMlp: lambda m: _bias_heads(m, -1, m.mlp.fc2.weight.shape[0]),
            BlurPool2d: blur}


def sync_attributes(modules: Iterable[nn.Module], widths: dict[int, int] | None = None) -> None:
    """Set width attributes (``out_channels``, ``num_features``, ``num_heads``, the timm ones of
    :func:`_timm_widths`, ...) from tensor shapes (and ``widths``: module id -> its weight's width
    before surgery), so a module's Python code computes shapes that match its tensors again."""
    modules = list(modules)
    for m in modules:  # attention first: heads shrink with the projection that makes them
        heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
        proj = next((p for p in (getattr(m, "qkv", None), getattr(m, "q", None))
                     if isinstance(p, nn.Linear)), None)
        if isinstance(heads, int) and isinstance(head_dim, int) and proj is not None:
            if proj.weight.shape[0] != proj.out_features:
                m.num_heads = heads * proj.weight.shape[0] // proj.out_features
            if isinstance(getattr(m, "attn_dim", None), int):
                m.attn_dim = m.num_heads * head_dim
    timm_widths = _timm_widths()
    for m in modules:
        if type(m) in timm_widths:
            timm_widths[type(m)](m)
        before = (widths or {}).get(id(m))
        if is_grouped_norm(m) and before:  # whole groups of a fixed size went
            m.groups = m.groups * m.weight.shape[0] // before
    for m in modules:
        if isinstance(m, nn.modules.conv._ConvNd) and m.transposed:  # weight (in, out / groups, ...)
            m.in_channels, m.out_channels = m.weight.shape[0], m.weight.shape[1] * m.groups
        elif isinstance(m, nn.modules.conv._ConvNd):
            per_group = m.out_channels // m.groups
            out = m.weight.shape[0]
            if m.groups > 1 and not by_positions(m.groups, m.in_channels // m.groups):
                m.groups = out // per_group  # whole groups went (the attributes are still the traced ones)
            m.out_channels, m.in_channels = out, m.weight.shape[1] * m.groups
        elif isinstance(m, nn.Linear):
            m.out_features, m.in_features = m.weight.shape
        elif isinstance(m, nn.modules.batchnorm._NormBase):
            t = m.weight if m.weight is not None else m.running_mean
            if t is not None:
                m.num_features = t.shape[0]
        elif isinstance(m, nn.GroupNorm) and m.weight is not None:
            per_group = m.num_channels // m.num_groups
            m.num_channels = m.weight.shape[0]
            if m.num_groups > 1:
                m.num_groups = m.num_channels // per_group
        elif getattr(m, "weight", None) is not None and isinstance(getattr(m, "normalized_shape", None), tuple):
            m.normalized_shape = tuple(m.weight.shape)
        else:
            _sync_view_shape(m)


def _sync_view_shape(m: nn.Module) -> None:
    """A module whose one vector parameter is viewed by a ``shape`` attribute (timm metaformer's
    ``Scale``: ``x * self.scale.view(self.shape)``, ``shape`` = (dim, 1, 1)): the one entry that is
    not 1 follows the vector's length."""
    shape, params = getattr(m, "shape", None), list(m.parameters(recurse=False))
    if not (isinstance(shape, tuple) and all(type(n) is int for n in shape) and len(params) == 1
            and params[0].dim() == 1):
        return
    wide = [i for i, n in enumerate(shape) if n != 1]
    if len(wide) == 1 and shape[wide[0]] != params[0].numel():
        m.shape = tuple(params[0].numel() if i == wide[0] else n for i, n in enumerate(shape))


def zero_removed_inputs(model: nn.Module, groups: Groups, removed: np.ndarray) -> nn.Module:
    """Zero, in place, the consumer input columns of removed channels (no shapes change).

    With :func:`kept_statistics` around its forward, this is the reference of the correctness
    criterion: the pruned model must compute exactly what this model computes."""
    ext = np.append(removed, False)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    with torch.no_grad():
        for g in groups:
            for m in g.members:
                if m.role not in CONSUMER_ROLES:
                    continue
                gone = ext[m.channel]
                if gone.any():
                    t = tensors[m.tensor]
                    t.masked_fill_(broadcast_mask(torch.as_tensor(gone, device=t.device), m.dims, t.dim()), 0)
    return model


def broadcast_mask(mask: torch.Tensor, dims: tuple[int, ...], ndim: int) -> torch.Tensor:
    """``mask`` (indexed by ``dims``) shaped to broadcast against an ``ndim``-dim tensor."""
    shape = [1] * ndim
    for ax, dim in enumerate(dims):
        shape[dim] = mask.shape[ax]
    return mask.reshape(shape)


@contextlib.contextmanager
def kept_statistics(model: nn.Module, groups: Groups, removed: np.ndarray) -> Iterator[None]:
    """Within this context, layer/group/RMS norms over channels of ``model``, the norms timm
    writes in module code (:mod:`ptsp.norms`), and the
    standardisation of a conv weight over its input columns, take their statistics over the kept
    channels only (a standardised weight's removed columns become zero): what the pruned model
    computes (the reference of the surgery check, and phase 1's student under
    ``Reconstruction(phase1_norms="kept")``). The
    statistics are taken in float32 and the result given in the input's precision. The ``torch``
    functions are replaced, not ``F``'s: module code that bound ``F.rms_norm`` to a name of its
    own at import (timm's ``RmsNorm``) reaches them too."""
    ext = np.append(removed, False)
    tensors = dict(model.named_parameters(remove_duplicate=False))
    keep: dict[int, torch.Tensor] = {}  # id of a norm's weight -> its kept elements
    columns: dict[int, torch.Tensor] = {}  # data_ptr of a standardised conv weight -> kept columns
    for g in groups:
        for m in g.members:
            if m.role in ("norm", "standardised") and ext[m.channel].any():
                t = tensors[m.tensor]
                gone = broadcast_mask(torch.as_tensor(ext[m.channel]), m.dims, t.dim()).expand(t.shape)
                if m.role == "norm":
                    keep[id(t)] = keep.get(id(t), torch.ones(t.shape, dtype=torch.bool)) & ~gone
                else:
                    columns[t.data_ptr()] = columns.get(t.data_ptr(), True) & ~gone[0].reshape(-1)
    rows = {m.tensor: ext[m.channel] for g in groups for m in g.members if m.dims == (0,)}
    coded: dict[int, torch.Tensor] = {}  # id of a norm written in module code -> kept channels
    for path, module in model.named_modules():
        gone = rows.get(f"{path}.weight") if is_coded_norm(module) else None
        if gone is not None and gone.any():
            coded[id(module)] = torch.as_tensor(~gone)
    ln, gn, rms, bn = torch.layer_norm, torch.group_norm, getattr(torch, "rms_norm", None), torch.batch_norm

    def layer_norm(x, shape, weight=None, bias=None, eps=1e-5, *cudnn):
        k = keep.get(id(weight)) if weight is not None else None
        if k is None:
            return ln(x, shape, weight, bias, eps, *cudnn)
        dtype = x.dtype
        dims = tuple(range(-len(shape), 0))
        x, k = x.float(), k.to(x.device, torch.float32)  # statistics in float32, as autocast's
        mean = (x * k).sum(dims, keepdim=True) / k.sum()
        var = ((x - mean) ** 2 * k).sum(dims, keepdim=True) / k.sum()
        y = (x - mean) / torch.sqrt(var + eps) * weight
        return (y + bias if bias is not None else y).to(dtype)

    def rms_norm(x, shape, weight=None, eps=None):
        k = keep.get(id(weight)) if weight is not None else None
        if k is None:
            return rms(x, shape, weight, eps)
        dims = tuple(range(-len(shape), 0))
        dtype, x, k = x.dtype, x.float(), k.to(x.device, torch.float32)
        eps = torch.finfo(dtype).eps if eps is None else eps
        return (x * torch.rsqrt((x * x * k).sum(dims, keepdim=True) / k.sum() + eps) * weight).to(dtype)

    def group_norm(x, num_groups, weight=None, bias=None, eps=1e-5, *cudnn):
        k = keep.get(id(weight)) if weight is not None and num_groups == 1 else None
        if k is None:
            return gn(x, num_groups, weight, bias, eps, *cudnn)
        dtype, x = x.dtype, x.float()
        k = broadcast_mask(k.to(x.device, torch.float32), (1,), x.dim())
        dims = tuple(range(1, x.dim()))
        n = k.sum() * x[0, 0].numel()
        mean = (x * k).sum(dims, keepdim=True) / n
        var = ((x - mean) ** 2 * k).sum(dims, keepdim=True) / n
        y = (x - mean) / torch.sqrt(var + eps) * broadcast_mask(weight, (1,), x.dim())
        return (y + broadcast_mask(bias, (1,), x.dim()) if bias is not None else y).to(dtype)

    def batch_norm(x, weight, bias, running_mean, running_var, training, momentum, eps, *cudnn):
        k = columns.get(x.data_ptr()) if training and running_mean is None and x.dim() == 3 else None
        if k is None or x.shape[0] != 1 or x.shape[2] != k.numel():  # not a standardised weight
            return bn(x, weight, bias, running_mean, running_var, training, momentum, eps, *cudnn)
        dtype, x, k = x.dtype, x.float(), k.to(x.device, torch.float32)
        mean = (x * k).sum(2, keepdim=True) / k.sum()
        var = ((x - mean) ** 2 * k).sum(2, keepdim=True) / k.sum()
        y = (x - mean) / torch.sqrt(var + eps)
        y = y * weight.view(1, -1, 1) if weight is not None else y
        y = y + bias.view(1, -1, 1) if bias is not None else y
        return (y * k).to(dtype)  # the removed columns read nothing, as in the pruned conv

    torch.layer_norm, torch.group_norm, torch.batch_norm = layer_norm, group_norm, batch_norm
    if rms is not None:
        torch.rms_norm = rms_norm
    try:
        with kept_forwards(coded):
            yield
    finally:
        torch.layer_norm, torch.group_norm, torch.batch_norm = ln, gn, bn
        if rms is not None:
            torch.rms_norm = rms


def criterion_error(model: nn.Module, groups: Groups, removed: np.ndarray, inputs: Any) -> float:
    """Relative max-abs difference between the pruned model and the reference (the original with
    removed channels' consumer columns zeroed and channel norms over kept channels) on ``inputs``."""
    args = inputs if isinstance(inputs, tuple) else (inputs,)
    pruned = apply(copy.deepcopy(model), kept_indices(groups, removed)).eval()
    ref = zero_removed_inputs(copy.deepcopy(model), groups, removed).eval()
    with torch.no_grad():
        y = pruned(*args)
        with kept_statistics(ref, groups, removed):
            y_ref = ref(*args)
    if y.shape != y_ref.shape or not torch.isfinite(y).all():
        return float("inf")
    return ((y - y_ref).abs().max() / y_ref.abs().max().clamp_min(1e-12)).item()
