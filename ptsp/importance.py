"""Channel importance: pure functions of a group and the model's tensors.

Each criterion returns one score per channel of the group (higher = more important).

* Magnitude criteria (l2, l1, bn_scale) read the weights. Their scales differ from group to group,
  so each group's scores are divided by the group's mean before the global ranking (PSP's choice),
  which prunes every group at about the same rate whatever its sensitivity.
* Taylor reads ``w·∂L/∂w`` on calibration batches, where L is the cross-entropy of the model
  against its own predictions (no labels needed). Its score estimates the loss change when the
  channel is removed, in the same units for every group, so it is ranked unnormalised and spares
  the groups the model cannot do without (narrow stems and residual streams). Being first-order,
  it can also rank nearly all of a wide group below the rest (mobilenetv3's 1280-channel head):
  ``prune``'s max_ratio keeps such a group from being stripped.
"""
from __future__ import annotations

import copy
from typing import Callable, Iterable, Mapping

import numpy as np
import torch
from torch import nn

from .groups import Group
from .modes import gradient_modes

Importance = Callable[[Group, Mapping[str, torch.Tensor]], np.ndarray]


def _channel_sums(group: Group, tensors: Mapping[str, torch.Tensor],
                  transform: Callable[[torch.Tensor], torch.Tensor],
                  biases: bool) -> tuple[np.ndarray, np.ndarray]:
    """Per channel, the sum over the group's members found in ``tensors`` of ``transform(slice)``
    summed over the slice, and how many of those members index the channel (in a concat group
    each producer indexes only its own channels, and a consumer only those it reads). Running
    statistics are never in ``tensors`` (parameters only); biases carry no magnitude information
    about a channel's contribution, but they are part of its loss change (``biases``)."""
    lookup = {int(c): i for i, c in enumerate(group.ids)}
    scores = np.zeros(group.channels)
    counts = np.zeros(group.channels)
    for m in group.members:
        if m.tensor not in tensors or (not biases and m.tensor.endswith("bias")):
            continue
        t = tensors[m.tensor]
        other = [d for d in range(t.dim()) if d not in m.dims]
        per = transform(t.detach())
        per = per.sum(other) if other else per
        if list(m.dims) != sorted(m.dims):
            per = per.permute(*np.argsort(np.argsort(m.dims)))
        per = per.double().cpu().numpy().reshape(m.channel.shape)
        idx = np.array([lookup.get(int(c), -1) for c in m.channel.ravel()])
        ok = idx >= 0
        np.add.at(scores, idx[ok], per.ravel()[ok])
        counts[np.unique(idx[ok])] += 1
    return scores, counts


def _norm(group: Group, tensors: Mapping[str, torch.Tensor], p: float) -> np.ndarray:
    """Each channel's mean over the members that index it: a sum, or a mean over all members,
    would rank a concat's early channels, read by every later layer of a dense block, far above
    the last layer's, and the plan would strip whole late layers while keeping their bottlenecks
    (densenet121: 3 members index the last layer's channels of a block, up to 51 the first's)."""
    scores, counts = _channel_sums(group, tensors, lambda t: t.abs().pow(p), biases=False)
    return scores / np.maximum(counts, 1)


def l2(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """PSP's score: each channel's squared L2 norm, averaged over the group's members that hold it."""
    return _norm(group, tensors, 2.0)


def l1(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Mean over members of each channel's L1 norm."""
    return _norm(group, tensors, 1.0)


def bn_scale(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """|γ| of the batch norms in the group (Network Slimming); falls back to l2 without one."""
    lookup = {int(c): i for i, c in enumerate(group.ids)}
    scores, found = np.zeros(group.channels), False
    for m in group.members:
        if m.tensor.endswith(".weight") and m.role == "elem" and m.tensor in tensors and len(m.dims) == 1:
            t = tensors[m.tensor].detach().abs().double().cpu().numpy()
            for c, v in zip(m.channel.tolist(), t.tolist()):
                if c in lookup:
                    scores[lookup[c]] += v
            found = True
    return scores if found else l2(group, tensors)


def taylor(group: Group, tensors: Mapping[str, torch.Tensor]) -> np.ndarray:
    """Group Taylor (Molchanov et al. 2019) for one batch, given ``tensors`` = ``w·∂L/∂w``: the
    square of the first-order loss change when the channel's whole slice goes,
    ``(Σ_members Σ_slice w·∂L/∂w)²``. Summed over batches by :func:`taylor_scores`."""
    return _channel_sums(group, tensors, lambda t: t, biases=True)[0] ** 2


def random(group: Group, tensors: Mapping[str, torch.Tensor], seed: int = 0) -> np.ndarray:
    """A control: seeded random scores."""
    rng = np.random.default_rng(seed + group.index)
    return rng.random(group.channels)


IMPORTANCE: dict[str, Importance] = {"l2": l2, "l1": l1, "bn_scale": bn_scale, "taylor": taylor,
                                     "random": random}
#: criteria that read gradients on calibration data, ranked unnormalised
DATA_IMPORTANCE = ("taylor",)


def scores(groups, model: nn.Module, criterion: str = "l2",
           batches: Iterable[torch.Tensor] | None = None, micro_batch: int | None = None) -> np.ndarray:
    """Scores of every prunable channel over global channel ids (NaN for channels that cannot be
    pruned): :func:`taylor_scores` for a data criterion, else :func:`normalised_scores`."""
    if criterion in DATA_IMPORTANCE:
        if batches is None:
            raise ValueError(f"importance {criterion!r} needs calibration batches")
        return taylor_scores(groups, model, batches, micro_batch)
    return normalised_scores(groups, dict(model.named_parameters()), criterion)


def taylor_scores(groups, model: nn.Module, batches: Iterable[torch.Tensor],
                  micro_batch: int | None = None) -> np.ndarray:
    """:func:`taylor` summed over the calibration batches (one forward and backward pass over
    them, on a copy of ``model`` in :func:`~ptsp.modes.gradient_modes`), unnormalised.

    L is the cross-entropy of the model's logits against its own top-1 predictions, so no labels
    are needed; ``micro_batch`` splits each batch (same gradient, less memory)."""
    work = copy.deepcopy(model).requires_grad_(True)
    gradient_modes(work)
    params = dict(work.named_parameters())
    device = next(iter(params.values())).device
    prunable = [g for g in groups if g.prunable]
    sums = {g.index: np.zeros(g.channels) for g in prunable}
    for x in batches:
        work.zero_grad(set_to_none=True)
        for piece in x.split(micro_batch or len(x)):
            logits = work(piece.to(device))
            if not isinstance(logits, torch.Tensor) or logits.dim() != 2:
                raise ValueError("importance 'taylor' needs a classifier: a model whose output is "
                                 "a (batch, classes) tensor of logits")
            target = logits.detach().argmax(1)
            nn.functional.cross_entropy(logits, target, reduction="sum").backward()
        grads = {n: p * p.grad for n, p in params.items() if p.grad is not None}
        for g in prunable:
            sums[g.index] += taylor(g, grads)
    out = np.full(groups.num_channels, np.nan)
    for g in prunable:
        out[g.ids] = sums[g.index]
    return out


def normalised_scores(groups, tensors: Mapping[str, torch.Tensor], criterion: str = "l2") -> np.ndarray:
    """Scores of a magnitude criterion for every prunable channel over global channel ids, each
    group divided by its mean (NaN for channels that cannot be pruned)."""
    if criterion not in IMPORTANCE:
        raise ValueError(f"unknown importance {criterion!r}; choose from {sorted(IMPORTANCE)}")
    if criterion in DATA_IMPORTANCE:
        raise ValueError(f"importance {criterion!r} needs calibration data: use scores()")
    fn = IMPORTANCE[criterion]
    out = np.full(groups.num_channels, np.nan)
    for g in groups:
        if g.prunable:
            s = fn(g, tensors)
            mean = s.mean()
            out[g.ids] = s / mean if mean > 0 else np.ones_like(s)
    return out
