"""Dependency groups: the sets of parameter slices that must be removed together.

``build_groups`` exports the model, runs every node through its channel rule (:mod:`ptsp.ops`) and
turns the resulting classes of coupled atoms into :class:`Group` objects. Every prunable channel of
the model gets a global id; a pruning decision is a boolean mask over those ids.
"""
from __future__ import annotations

import dataclasses
import operator
import warnings
from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch import nn

from . import ops
from .tracing import Context, Value, export, shape_of

#: ops whose FLOPs torch.utils.flop_counter counts (after decomposition); recorded for estimates
FLOP_OPS = {ops.aten.conv1d, ops.aten.conv2d, ops.aten.conv3d, ops.aten.convolution,
            ops.aten._convolution, ops.aten.linear, ops.aten.matmul, ops.aten.mm, ops.aten.bmm,
            ops.aten.addmm, ops.aten.baddbmm, ops.aten.scaled_dot_product_attention, ops.aten.einsum}


CONSUMER_ROLES = ("in", "standardised")  # slices that read a channel rather than make it


@dataclasses.dataclass
class Slice:
    """One member of a group: ``tensor`` indexed along ``dims`` by the group's channels.

    ``channel`` has the shape of those dims and holds global channel ids (-1: never removed)."""

    tensor: str
    dims: tuple[int, ...]
    channel: np.ndarray
    role: str


@dataclasses.dataclass
class Group:
    """Channels that are removed together, with every tensor slice they index."""

    index: int
    ids: np.ndarray  # the group's global channel ids, in channel order
    members: list[Slice]
    prunable: bool
    reasons: list[str]
    norm_crossing: bool

    @property
    def channels(self) -> int:
        return len(self.ids)

    def __repr__(self) -> str:
        state = "prunable" if self.prunable else "unprunable: " + "; ".join(self.reasons[:3])
        norm = ", crosses a channel normalisation" if self.norm_crossing else ""
        lines = [f"Group {self.index}: {self.channels} channels, {state}{norm}"]
        for m in self.members:
            held = m.channel[m.channel >= 0]
            per = held.size // max(1, len(np.unique(held)))
            dims = ",".join(map(str, m.dims))
            lines.append(f"  {m.tensor} [dim {dims}] {m.role}" + (f" (x{per} per channel)" if per > 1 else ""))
        return "\n".join(lines)


@dataclasses.dataclass
class SiteTensor:
    """A tensor argument of a FLOP-bearing op: its shape and the channel ids along its dims."""

    shape: tuple[int, ...]
    comps: list[tuple[tuple[int, ...], np.ndarray]]
    param: str | None


@dataclasses.dataclass
class FlopSite:
    """A FLOP-bearing op with its arguments (SiteTensor for tensors, constants otherwise)."""

    target: Any
    args: dict


class Groups(Sequence[Group]):
    """The groups of a model, plus what planning needs: tensor shapes and FLOP-bearing ops."""

    def __init__(self, groups: list[Group], num_channels: int, shapes: dict[str, tuple[int, ...]],
                 flop_sites: list[FlopSite], unknown_ops: dict[str, int],
                 by_module: dict[str, np.ndarray]) -> None:
        self._groups = groups
        self.num_channels = num_channels
        self.shapes = shapes
        self.flop_sites = flop_sites
        self.unknown_ops = unknown_ops
        self._by_module = by_module

    def touching(self, module: str) -> set[int]:
        """Indices of the groups whose channels pass through ``module`` (or its submodules)."""
        prefix = module + "." if module else ""
        return {int(g) for path, gs in self._by_module.items()
                if path == module or path.startswith(prefix) for g in gs}

    def __getitem__(self, i):  # type: ignore[override]
        return self._groups[i]

    def __len__(self) -> int:
        return len(self._groups)

    def __iter__(self) -> Iterator[Group]:
        return iter(self._groups)

    def __repr__(self) -> str:
        n = sum(g.prunable for g in self)
        ch = sum(g.channels for g in self if g.prunable)
        return f"<Groups: {len(self)} groups, {n} prunable with {ch} channels>"

    def prunable_mask(self) -> np.ndarray:
        mask = np.zeros(self.num_channels, dtype=bool)
        for g in self:
            if g.prunable:
                mask[g.ids] = True
        return mask


def build_groups(model: nn.Module, example_inputs: Any) -> Groups:
    """Trace ``model`` on ``example_inputs`` and return its groups of coupled channels.

    Ops without a channel rule make the channels they touch unprunable (one warning names them).
    """
    trace = export(model, example_inputs)
    ctx = Context()
    ctx.module_of_node, ctx.param_of_node = trace.modules, trace.params
    env: dict[str, Any] = {}
    sites: list[tuple[Any, dict]] = []
    touched: dict[str, list[np.ndarray]] = {}
    outputs: list[Value] = []

    def resolve(x: Any) -> Any:
        if isinstance(x, torch.fx.Node):
            return env.get(x.name)
        if isinstance(x, (list, tuple)):
            return type(x)(resolve(y) for y in x)
        return x

    for node in trace.graph.nodes:
        ctx.node = node
        if node.op == "placeholder":
            shape = shape_of(node)
            name = trace.params.get(node.name)
            env[node.name] = Value(shape, [], name) if shape is not None else None
        elif node.op == "call_function":
            env[node.name] = _apply(ctx, node, resolve, sites, touched)
        elif node.op == "output":
            for v in _flatten(resolve(node.args)):
                if isinstance(v, Value):
                    outputs.append(v)
        elif node.op == "get_attr":
            shape = shape_of(node)
            env[node.name] = Value(shape, []) if isinstance(shape, tuple) else None
    ctx.node = None
    for v in outputs:
        ctx.pin(ctx.canon(v), "model output")
    for m in ctx.members:
        if m.tensor in ctx.rigid_tensors:
            ctx.pin(m.atoms, f"{m.tensor} is {ctx.rigid_tensors[m.tensor]}")
    if ctx.unknown_ops:
        names = ", ".join(f"{k} (x{v})" for k, v in sorted(ctx.unknown_ops.items()))
        warnings.warn(f"ptsp: no channel rule for {names}; channels reaching them are left unpruned",
                      stacklevel=2)
    return _make_groups(ctx, trace, sites, touched)


def _flatten(x: Any) -> Iterator[Any]:
    if isinstance(x, (list, tuple)):
        for y in x:
            yield from _flatten(y)
    else:
        yield x


def _apply(ctx: Context, node: torch.fx.Node, resolve, sites: list, touched: dict) -> Any:
    out = shape_of(node)
    fn = ops.lookup(node.target)
    if node.target is operator.getitem:
        a = {"seq": resolve(node.args[0]), "idx": node.args[1]}
    elif isinstance(node.target, torch._ops.OpOverload):
        a = {k: resolve(v) for k, v in ops.bind(node.target, node.args, node.kwargs).items()}
    else:
        a = {f"arg{i}": resolve(v) for i, v in enumerate(node.args)}
        fn = None
    if out is None and fn is None:
        return None
    if fn is None:
        return ops.unknown(ctx, a, out)
    try:
        res = fn(ctx, a, out)
    except Exception as exc:  # a rule that cannot handle this use degrades to "unknown"
        ctx.unknown_ops[f"{node.target} ({type(exc).__name__})"] = 1
        return ops.unknown(ctx, a, out)
    if getattr(node.target, "overloadpacket", None) in FLOP_OPS:
        sites.append((node.target, a))
    stack = node.meta.get("nn_module_stack") or {}
    if stack:  # remember which channels each module's code handles (see Groups.touching)
        path = list(stack.values())[-1][0]
        arrays = [c.atoms.ravel() for v in list(ops.tensor_args(a)) + list(_flatten(res))
                  if isinstance(v, Value) for c in v.comps]
        if arrays:
            touched.setdefault(path, []).extend(arrays)
    return res


def _make_groups(ctx: Context, trace, sites: list, touched: dict) -> Groups:
    uf = ctx.uf
    members = [(m, uf.roots(m.atoms)) for m in ctx.members]
    # classes touched by members, in first-use order; groups = classes linked through a member
    order: dict[int, int] = {}
    for _, roots in members:
        for r in roots.ravel().tolist():
            order.setdefault(r, len(order))
    link = list(range(len(order)))

    def find(i: int) -> int:
        while link[i] != i:
            link[i] = link[link[i]]
            i = link[i]
        return i

    for _, roots in members:
        idx = np.unique([order[r] for r in roots.ravel().tolist()])
        for j in idx[1:]:
            a, b = find(int(idx[0])), find(int(j))
            if a != b:
                link[max(a, b)] = min(a, b)
    by_group: dict[int, list[int]] = {}
    for r, i in order.items():
        by_group.setdefault(find(i), []).append(r)
    group_roots = sorted(by_group.values(), key=lambda rs: order[rs[0]])
    gid = {}
    for rs in group_roots:
        for r in sorted(rs, key=order.__getitem__):
            gid[r] = len(gid)
    n = len(gid)
    lut = _Lut(gid, uf)
    group_of = np.zeros(n, dtype=np.int64)
    for gi, rs in enumerate(group_roots):
        group_of[[gid[r] for r in rs]] = gi
    sizes = np.bincount(group_of, minlength=len(group_roots))

    pinned = np.zeros(n, dtype=bool)
    reasons: dict[int, set[str]] = {}
    for r, why in ctx.pins.items():
        if r in gid:
            pinned[gid[r]] = True
            reasons.setdefault(int(group_of[gid[r]]), set()).update(why)
    for m, roots in members:
        _check_separable(m, lut(roots), pinned, reasons, group_of)

    def group_blocked() -> np.ndarray:
        return np.bincount(group_of, weights=pinned, minlength=len(group_roots)) > 0

    changed = True
    while changed:  # invariance constraints can pin groups, which can satisfy others: iterate
        changed = False
        blocked = group_blocked()
        for atoms, axis, where in ctx.invariant:
            ids = lut(uf.roots(atoms))
            if not _size_invariant(ids, axis, group_of, sizes, blocked):
                live = ids[ids >= 0]
                if live.size and not pinned[live].all():
                    pinned[live] = True
                    for g in np.unique(group_of[live]).tolist():
                        reasons.setdefault(g, set()).add(f"channel dim split or sliced at {where}")
                    changed = True
                    blocked = group_blocked()
        for pieces, where in ctx.even:
            uneven = _uneven(pieces, lut, uf, group_of, sizes, blocked)
            if uneven.size:
                pinned[uneven] = True
                for g in np.unique(group_of[uneven]).tolist():
                    reasons.setdefault(g, set()).add(f"channel dim chunked unevenly at {where}")
                changed = True
                blocked = group_blocked()
    blocked = group_blocked()
    norm = np.zeros(n, dtype=bool)
    for r in ctx.norm_crossing:
        if r in gid:
            norm[gid[r]] = True
    slices: dict[int, list[Slice]] = {}
    for m, roots in members:
        ch = lut(roots)
        slices.setdefault(int(group_of[ch.ravel()[0]]), []).append(Slice(m.tensor, m.dims, ch, m.role))
    for tensor, pieces in ctx.split_sizes:  # a slice per part and group: each part keeps a channel
        parts = [lut(uf.roots(p)) for p in pieces]
        starts = np.cumsum([0] + [len(p) for p in parts])
        for part, start in zip(parts, starts):
            for gi in np.unique(group_of[part[part >= 0]]).tolist():
                ch = np.full(starts[-1], -1, dtype=np.int64)
                ch[start:start + len(part)] = np.where((part >= 0) & (group_of[part] == gi), part, -1)
                slices.setdefault(gi, []).append(Slice(tensor, (0,), ch, "split"))
    groups = []
    for gi, rs in enumerate(group_roots):
        ids = np.array([gid[r] for r in sorted(rs, key=order.__getitem__)], dtype=np.int64)
        why = sorted(reasons.get(gi, ()))
        groups.append(Group(gi, ids, slices.get(gi, []), not blocked[gi], why, bool(norm[ids].any())))
    shapes = {name: tuple(t.shape) for name, t in _named_tensors(trace.modules[""])}
    shapes.update({tensor: (sum(len(p) for p in pieces),) for tensor, pieces in ctx.split_sizes})
    flop_sites = [FlopSite(t, {k: _site_arg(v, ctx, lut) for k, v in a.items()}) for t, a in sites]
    by_module = {}
    for path, arrays in touched.items():
        ids = np.unique(lut(uf.roots(np.concatenate(arrays))))
        by_module[path] = np.unique(group_of[ids[ids >= 0]])
    return Groups(groups, n, shapes, flop_sites, dict(ctx.unknown_ops), by_module)


class _Lut:
    """Maps class roots to global channel ids (-1 for classes that no member indexes)."""

    def __init__(self, gid: dict[int, int], uf) -> None:
        self.table = np.full(uf.size + 1, -1, dtype=np.int64)
        for r, i in gid.items():
            self.table[r] = i

    def __call__(self, roots: np.ndarray) -> np.ndarray:
        return self.table[np.asarray(roots)]


def _named_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    yield from model.named_parameters(remove_duplicate=False)
    yield from model.named_buffers(remove_duplicate=False)


def _site_arg(v: Any, ctx: Context, lut: _Lut) -> Any:
    if isinstance(v, Value):
        return SiteTensor(tuple(v.shape), [(c.dims, lut(c.atoms)) for c in ctx.canon(v)], v.param)
    if isinstance(v, (list, tuple)):
        return type(v)(_site_arg(x, ctx, lut) for x in v)
    return v


def _size_invariant(ids: np.ndarray, axis: int, group_of: np.ndarray, sizes: np.ndarray,
                    blocked: np.ndarray) -> bool:
    """Every slice along ``axis`` keeps at least one channel whatever is pruned."""
    return all(_keeps_one(np.take(ids, i, axis=axis), group_of, sizes, blocked)
               for i in range(ids.shape[axis]))


def _keeps_one(ids: np.ndarray, group_of: np.ndarray, sizes: np.ndarray, blocked: np.ndarray) -> bool:
    """``ids`` hold a channel that is never removed, or all channels of one group (which always
    keeps one)."""
    sl = np.unique(ids)
    if (sl < 0).any():
        return True
    groups, counts = np.unique(group_of[sl], return_counts=True)
    return bool(blocked[groups].any() or (counts == sizes[groups]).any())


def _uneven(pieces: list[np.ndarray], lut: "_Lut", uf, group_of: np.ndarray, sizes: np.ndarray,
            blocked: np.ndarray) -> np.ndarray:
    """The removable channels that would leave the ``pieces`` of a chunked dim unequal (held more
    often in one piece than in another), or every removable one if a piece could empty."""
    ids = [lut(uf.roots(p)) for p in pieces]
    if not all(_keeps_one(p, group_of, sizes, blocked) for p in ids):
        live = np.unique(np.concatenate(ids))
    else:  # per channel, how often each piece holds it (sparse: pieces may be many and large)
        k = len(ids)
        key = np.concatenate([p[p >= 0].ravel() * k + i for i, p in enumerate(ids)])
        pairs, counts = np.unique(key, return_counts=True)
        channel = pairs // k
        live, first = np.unique(channel, return_index=True)
        held_by = np.diff(np.append(first, len(channel)))
        even = (held_by == k) & (np.minimum.reduceat(counts, first) == np.maximum.reduceat(counts, first))
        live = live[~even]
    live = live[live >= 0]
    return live[~blocked[group_of[live]]]


def _check_separable(m, ids: np.ndarray, pinned: np.ndarray, reasons: dict, group_of: np.ndarray) -> None:
    """Each channel of a multi-dim member must occupy whole slices, or removal leaves holes."""
    if ids.ndim < 2:
        return
    covered = np.zeros(ids.shape, dtype=bool)
    for ax in range(ids.ndim):  # a slice along ax is whole when all its elements share a channel
        planes = np.moveaxis(ids, ax, 0).reshape(ids.shape[ax], -1)
        whole = (planes == planes[:, :1]).all(axis=1)
        view = [1] * ids.ndim
        view[ax] = ids.shape[ax]
        covered |= np.broadcast_to(whole.reshape(view), ids.shape)
    bad = ids[~covered]
    bad = bad[bad >= 0]
    if bad.size:
        pinned[bad] = True
        for g in np.unique(group_of[bad]).tolist():
            reasons.setdefault(g, set()).add(f"channels of {m.tensor} do not form whole slices")
