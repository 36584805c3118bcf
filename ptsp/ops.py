"""Channel semantics of ATen ops: one registry of rules, each a small function of bound arguments.

A rule receives the :class:`~ptsp.tracing.Context`, the op's arguments bound by name (graph values
replaced by :class:`~ptsp.tracing.Value`) and the output shape, and returns the output's Value(s).
Rules couple atoms (``ctx.unify``), create members on parameters, and pin what they cannot
express. Ops with no rule fall back to :func:`unknown`, which pins every channel touching them: an
op we do not understand can make a model less prunable, never wrong.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Iterable

import numpy as np
import torch

from .norms import is_grouped_norm, statistic_dim
from .tracing import Comp, Context, Value

aten = torch.ops.aten
Rule = Callable[[Context, dict, Any], Any]
RULES: dict[Any, Rule] = {}


def rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES[op] = fn
        return fn
    return register


def lookup(target: Any) -> Rule | None:
    """The rule for a graph node's target: by overload packet, then the generic pointwise rule."""
    if target in RULES:
        return RULES[target]
    packet = getattr(target, "overloadpacket", None)
    if packet in RULES:
        return RULES[packet]
    if isinstance(target, torch._ops.OpOverload) and torch.Tag.pointwise in target.tags:
        return pointwise
    return None


def bind(target: Any, args: tuple, kwargs: dict) -> dict:
    """Arguments by schema name, defaults filled in."""
    schema = target._schema
    out = {}
    for i, a in enumerate(schema.arguments):
        if i < len(args):
            out[a.name] = args[i]
        elif a.name in kwargs:
            out[a.name] = kwargs[a.name]
        else:
            out[a.name] = a.default_value if a.has_default_value() else None
    return out


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------
def tensor_args(a: dict) -> list[Value]:
    """The tensor values among bound arguments (lists of tensors included)."""
    vals = []
    for v in a.values():
        if isinstance(v, Value):
            vals.append(v)
        elif isinstance(v, (list, tuple)):
            vals.extend(x for x in v if isinstance(x, Value))
    return vals


def _norm_dims(dims: Any, ndim: int) -> list[int]:
    if dims is None:
        return list(range(ndim))
    if isinstance(dims, int):
        dims = [dims]
    return sorted({d % ndim for d in dims}) if ndim else []


def _comps(ctx: Context, v: Value) -> list[Comp]:
    """Canonical components of ``v``. A parameter or buffer used as data (layer scale, position
    embedding, a weight being standardised, ...) gets its own atoms along each dim at first use;
    the ops it meets then couple them like any activation's."""
    if v.param is None:
        return ctx.canon(v)
    if v.param not in ctx.param_comps:
        comps = []
        for d, n in enumerate(v.shape):
            if n > 1:
                atoms = ctx.fresh([n])
                comps.append(Comp((d,), atoms))
                ctx.add_member(v, (d,), atoms, "elem")
        ctx.param_comps[v.param] = comps
    return ctx.canon(Value(v.shape, ctx.param_comps[v.param]))


def _shift(comps: list[Comp], mapping: Callable[[int], int | None]) -> list[Comp]:
    """Renumber component dims; a dim mapped to None must not be covered."""
    out = []
    for c in comps:
        dims = [mapping(d) for d in c.dims]
        assert None not in dims
        order = np.argsort(dims)
        out.append(Comp(tuple(int(dims[i]) for i in order), np.transpose(c.atoms, order)))
    return out


def _pin_touching(ctx: Context, comps: list[Comp], dims: set[int], reason: str) -> list[Comp]:
    """Pin components that touch ``dims``; return the others."""
    keep = []
    for c in comps:
        if dims & set(c.dims) or (not c.dims and dims):
            ctx.pin(c.atoms, reason)
        else:
            keep.append(c)
    return keep


def _expand(comp: Comp, dims: tuple[int, ...], shape: tuple[int, ...]) -> np.ndarray:
    """``comp``'s atoms broadcast over ``dims`` (a superset of its dims) with sizes from ``shape``."""
    idx = [dims.index(d) for d in comp.dims]
    view_shape = [1] * len(dims)
    for i, d in zip(idx, comp.dims):
        view_shape[i] = comp.atoms.shape[comp.dims.index(d)]
    atoms = comp.atoms.reshape(view_shape)
    return np.broadcast_to(atoms, tuple(shape[d] for d in dims))


def _collapse_axis(ctx: Context, atoms: np.ndarray, axis: int) -> np.ndarray:
    """Unify atoms along ``axis`` and drop it."""
    first = np.take(atoms, [0], axis=axis)
    ctx.unify(atoms, np.broadcast_to(first, atoms.shape))
    return np.asarray(np.take(atoms, 0, axis=axis))


# ------------------------------------------------------------------------------------------------
# element-wise
# ------------------------------------------------------------------------------------------------
def elementwise(ctx: Context, vals: list[Value], out_shape: tuple[int, ...]) -> Value:
    """Couple operands position by position, with numpy broadcasting.

    A single-channel operand broadcast (size 1) along a dim where others carry channels is shared
    by all of them and cannot be removed with any one of them: it is pinned and does not couple.
    An operand that is full-size along a channel dim but carries no channels there is fixed-size,
    so the channels it meets are pinned.
    """
    nd = len(out_shape)
    ops = []
    for v in vals:
        off = nd - len(v.shape)
        comps = _shift(_comps(ctx, v), lambda d, off=off: d + off)
        ops.append(((1,) * off + tuple(v.shape), comps))
    covered = [set().union(*[set(c.dims) for c in comps]) if comps else set() for _, comps in ops]
    scalar = [any(not c.dims for c in comps) for _, comps in ops]
    active = []
    for i, (shape, comps) in enumerate(ops):
        bdims = {d for d in range(nd) if shape[d] == 1 and out_shape[d] > 1}
        others = set().union(*[covered[j] for j in range(len(ops)) if j != i]) if len(ops) > 1 else set()
        if bdims & others and scalar[i]:
            for c in comps:
                ctx.pin(c.atoms, "channels broadcast against other channels")
        else:
            active.append(i)
    # connected sets of dims over the active operands' components
    parent = list(range(nd))

    def find(d: int) -> int:
        while parent[d] != d:
            d = parent[d]
        return d

    for i in active:
        for c in ops[i][1]:
            for d in c.dims[1:]:
                parent[find(d)] = find(c.dims[0])
    sets: dict[int, list[Comp]] = {}
    scalars = []
    for i in active:
        for c in ops[i][1]:
            if c.dims:
                sets.setdefault(find(c.dims[0]), []).append(c)
            else:
                scalars.append(c.atoms)
    out = []
    for comps in sets.values():
        dims = tuple(sorted(set().union(*[set(c.dims) for c in comps])))
        arrays = [_expand(c, dims, out_shape) for c in comps]
        for arr in arrays[1:]:
            ctx.unify(arr, arrays[0])
        base = np.array(arrays[0])
        for i in active:
            shape, comps_i = ops[i]
            fixed = [d for d in dims if shape[d] == out_shape[d] > 1 and d not in covered[i]]
            if fixed and not scalar[i]:
                ctx.pin(base, "channels combined with a fixed-size tensor")
                break
        out.append(Comp(dims, base))
    if scalars:
        s = np.concatenate([np.ravel(x) for x in scalars])
        ctx.collapse(s)
        if out:
            for c in out:
                ctx.unify(c.atoms.ravel(), np.full(c.atoms.size, s[0]))
        else:
            out.append(Comp((), np.asarray(s[0])))
    return Value(tuple(out_shape), out)


def pointwise(ctx: Context, a: dict, out: Any) -> Value:
    return elementwise(ctx, tensor_args(a), out)


@rule(aten.dropout, aten.alias, aten.contiguous, aten.clone, aten.detach, aten._to_copy, aten.to,
      aten.lift_fresh_copy, aten.type_as, aten.zeros_like, aten.ones_like, aten.empty_like,
      aten.full_like, aten.feature_dropout, aten.alpha_dropout, aten.expand, aten.expand_as,
      aten.native_dropout, aten.hardswish, aten.hardswish_, aten.dropout_, aten.hardsigmoid_)
def identity(ctx: Context, a: dict, out: Any) -> Any:
    """Ops whose output has the first input's channels (dropout in eval, copies, dtype casts, ...)."""
    first = next(iter(a.values()))
    if not isinstance(first, Value):
        return unknown(ctx, a, out)
    comps = _comps(ctx, first)
    if isinstance(out, list):  # native_dropout: (output, mask)
        return [Value(out[0], comps), Value(out[1], [])]
    return Value(tuple(out), comps)


@rule(aten.zeros, aten.ones, aten.full, aten.empty, aten.arange, aten.scalar_tensor, aten.linspace,
      aten.eye, aten.randn, aten.rand, aten.new_zeros, aten.new_ones, aten.new_empty, aten.new_full)
def factory(ctx: Context, a: dict, out: Any) -> Value:
    """Tensors created in the graph have fixed sizes."""
    return Value(tuple(out), [])


# ------------------------------------------------------------------------------------------------
# producers: convolution, linear, matmul, attention
# ------------------------------------------------------------------------------------------------
def _channel_vector(ctx: Context, comps: list[Comp], dim: int, reason: str) -> tuple[np.ndarray | None, list[Comp]]:
    """The component on exactly ``(dim,)`` (a per-channel vector), and the other components.

    A component joining ``dim`` with other dims cannot be cut per channel: it is pinned."""
    vec, rest = None, []
    for c in comps:
        if c.dims == (dim,):
            vec = c.atoms
        elif dim in c.dims or not c.dims:
            ctx.pin(c.atoms, reason)
        else:
            rest.append(c)
    return vec, rest


@rule(aten.conv1d, aten.conv2d, aten.conv3d, aten.convolution, aten._convolution)
def conv(ctx: Context, a: dict, out: Any) -> Value:
    """A conv's rows make its output channels and its columns read the input's. A grouped conv
    ties them by group: with many narrow groups (depthwise, ResNeXt's 32×4d) whole groups go,
    rows and columns together; with few wide ones (ResNeSt's radix, NFNets' 128-wide groups:
    fewer groups than columns per group) position j of every group is one channel and the group
    count stays (:func:`by_positions`, which surgery's attribute sync reads too)."""
    x, w, b = a["input"], a["weight"], a.get("bias")
    if a.get("transposed"):
        return unknown(ctx, a, out)
    groups = int(a.get("groups") or 1)
    positions = by_positions(groups, w.shape[1])
    vec, rest = _channel_vector(ctx, ctx.canon(x), 1, "conv input channels not separable")
    _pin_touching(ctx, rest, set(range(len(x.shape))) - {1}, "channels mixed by a convolution")
    cols = vec if groups == 1 else None  # the input channels the weight's columns read
    if positions and vec is not None:
        per_group = vec.reshape(groups, -1)
        ctx.unify(per_group, np.broadcast_to(per_group[:1], per_group.shape))
        cols = per_group[0]
    o = w.shape[0]
    if w.param is None:  # a computed weight (e.g. standardised): its own channels are the rows
        wvec, _ = _channel_vector(ctx, [c for c in ctx.canon(w) if 0 in c.dims], 0, "conv weight rows")
        atoms = wvec if wvec is not None else ctx.fresh([o])
        if wvec is None:
            ctx.pin(atoms, "conv with a fixed-size computed weight")
        win = next((c.atoms for c in ctx.canon(w) if c.dims == (1,)), None)
        if cols is not None and win is not None:
            ctx.unify(cols, win)
        elif cols is not None:
            ctx.pin(cols, "conv with a computed weight")
        elif win is not None:  # columns per whole group, or reading fixed channels: their count stays
            ctx.pin(win, "grouped conv with a computed weight" if groups > 1 and not positions
                    else "conv with a computed weight on inseparable input channels")
    else:
        atoms = ctx.fresh([o])
        ctx.add_member(w, (0,), atoms, "out")
        if cols is not None:
            ctx.add_member(w, (1,), cols, "in")
    _attach(ctx, b, atoms, "out", "conv")
    if groups > 1:
        blocks = atoms.reshape(groups, o // groups)
        if positions:  # row q of every group
            ctx.unify(blocks, np.broadcast_to(blocks[:1], blocks.shape))
        else:  # whole convolution groups are removed
            ctx.unify(blocks, np.broadcast_to(blocks[:, :1], blocks.shape))
            if vec is None:
                ctx.pin(atoms, "grouped conv on fixed-size input")
            else:
                vb = vec.reshape(groups, -1)
                ctx.unify(vb, np.broadcast_to(blocks[:, :1], vb.shape))
    return Value(tuple(out), [Comp((1,), atoms)])


def by_positions(groups: int, columns: int) -> bool:
    """Whether a conv with ``groups`` groups of ``columns`` input channels each loses positions
    within every group (the group count stays) rather than whole groups: the finer choice."""
    return 1 < groups < columns


@rule(aten.conv_transpose1d, aten.conv_transpose2d, aten.conv_transpose3d)
def conv_transpose(ctx: Context, a: dict, out: Any) -> Value:
    """A transposed conv's weight is (in, out / groups, ...): its rows read the input channels
    and its columns make the output's (one group; grouped ones have no rule)."""
    x, w, b = a["input"], a["weight"], a.get("bias")
    if int(a.get("groups") or 1) != 1 or w.param is None:
        return unknown(ctx, a, out)
    vec, rest = _channel_vector(ctx, ctx.canon(x), 1, "conv input channels not separable")
    _pin_touching(ctx, rest, set(range(len(x.shape))) - {1}, "channels mixed by a convolution")
    atoms = ctx.fresh([w.shape[1]])
    ctx.add_member(w, (1,), atoms, "out")
    _attach(ctx, b, atoms, "out", "conv")
    if vec is not None:
        ctx.add_member(w, (0,), vec, "in")
    return Value(tuple(out), [Comp((1,), atoms)])


def _linear(ctx: Context, x: Value, w: Value, b: Value | None, out: tuple[int, ...]) -> Value:
    last = len(x.shape) - 1
    vec, rest = _channel_vector(ctx, ctx.canon(x), last, "linear input features not separable")
    if w.param is None:
        if vec is not None:
            ctx.pin(vec, "linear with a computed weight")
        return Value(tuple(out), rest)
    atoms = ctx.fresh([w.shape[0]])
    ctx.add_member(w, (0,), atoms, "out")
    _attach(ctx, b, atoms, "out", "linear")
    if vec is not None:
        ctx.add_member(w, (1,), vec, "in")
    return Value(tuple(out), rest + [Comp((len(out) - 1,), atoms)])


@rule(aten.linear)
def linear(ctx: Context, a: dict, out: Any) -> Value:
    return _linear(ctx, a["input"], a["weight"], a.get("bias"), out)


def _transpose_last(v: Value) -> Value:
    nd = len(v.shape)
    shape = v.shape[:-2] + (v.shape[-1], v.shape[-2])
    swap = {nd - 1: nd - 2, nd - 2: nd - 1}
    return Value(shape, _shift(v.comps, lambda d: swap.get(d, d)), v.param)


def _matmul(ctx: Context, x: Value, y: Value, out: tuple[int, ...]) -> Value:
    """Batched matrix product of two activations: a contracted channel dim that reaches the
    output through batch dims (attention heads) collapses per batch index; otherwise it is pinned."""
    if len(x.shape) < 2 or len(y.shape) < 2:
        return unknown(ctx, {"self": x, "other": y}, out)
    if x.param is not None or y.param is not None:
        return unknown(ctx, {"self": x, "other": y}, out)
    nd = len(out)
    parts = []
    for v, k_axis, free in ((x, -1, -2), (y, -2, -1)):
        off = nd - len(v.shape)
        comps = _shift(_comps(ctx, v), lambda d, off=off: d + off)
        k, f = nd + k_axis, nd + free
        kept = []
        for c in comps:
            if k not in c.dims:
                kept.append(c)
                continue
            if f in c.dims or len(c.dims) == 1:
                ctx.pin(c.atoms, "channels contracted by a matrix product")
                continue
            ax = c.dims.index(k)
            kept.append(Comp(tuple(d for d in c.dims if d != k), _collapse_axis(ctx, c.atoms, ax)))
        shape = list((1,) * off + tuple(v.shape))
        shape[k] = 1
        parts.append(Value(tuple(shape), kept))
    return elementwise(ctx, parts, out)


@rule(aten.matmul, aten.mm, aten.bmm)
def matmul(ctx: Context, a: dict, out: Any) -> Value:
    x, y = a["self"], a.get("other", a.get("mat2"))
    if y.param is not None and len(y.shape) == 2:
        # members on the transposed parameter: rows are input features, columns outputs
        last = len(x.shape) - 1
        vec, rest = _channel_vector(ctx, ctx.canon(x), last, "matmul input features not separable")
        atoms = ctx.fresh([y.shape[1]])
        ctx.add_member(y, (1,), atoms, "out")
        if vec is not None:
            ctx.add_member(y, (0,), vec, "in")
        return Value(tuple(out), rest + [Comp((len(out) - 1,), atoms)])
    return _matmul(ctx, x, y, tuple(out))


def _einsum_letters(equation: str, ndims: list[int]) -> tuple[list[list[str]], list[str]] | None:
    """Each operand's letters and the output's, an ellipsis spelled out as letters of its own
    (aligned from the right, as it broadcasts); None for an equation the rule does not take."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ndims):
        return None
    width = max([n - len(t) + 3 for t, n in zip(terms, ndims) if "..." in t] or [0])
    fill = [chr(0x100 + i) for i in range(width)]  # no equation letter
    ins = []
    for t, n in zip(terms, ndims):
        head, dots, tail = t.partition("...")
        letters = list(head) + (fill[width - (n - len(head) - len(tail)):] if dots else []) + list(tail)
        if len(letters) != n or len(set(letters)) != n:  # a repeated letter takes a diagonal
            return None
        ins.append(letters)
    if arrow:
        head, dots, tail = rhs.partition("...")
        return ins, list(head) + (fill if dots else []) + list(tail)
    once = [c for c in sorted({c for t in ins for c in t if c not in fill})
            if sum(t.count(c) for t in ins) == 1]
    return ins, fill + once


@rule(aten.einsum)
def einsum(ctx: Context, a: dict, out: Any) -> Value:
    """Letters kept in the output couple the operands position by position (batch dims, with
    broadcasting); a letter summed away, within one operand or contracted between two, mixes
    channels along it: each operand's component unifies them into its other letters (a head's
    channels into the head, as the matrix product does), or is pinned if it has none."""
    vals = a["tensors"]
    spec = _einsum_letters(a["equation"], [len(v.shape) for v in vals]) \
        if all(isinstance(v, Value) for v in vals) else None
    if spec is None:
        return unknown(ctx, a, out)
    ins, outs = spec
    parts = []
    for v, letters in zip(vals, ins):
        gone = {d for d, c in enumerate(letters) if c not in outs}
        comps = _mix_along(ctx, _comps(ctx, v), gone, True, "channels contracted by einsum")
        shape = [1] * len(outs)
        for d, c in enumerate(letters):
            if c in outs:
                shape[outs.index(c)] = v.shape[d]
        parts.append(Value(tuple(shape), _shift(comps, lambda d, letters=letters: outs.index(letters[d]))))
    return elementwise(ctx, parts, tuple(out))


@rule(aten.addmm)
def addmm(ctx: Context, a: dict, out: Any) -> Value:
    prod = matmul(ctx, {"self": a["mat1"], "other": a["mat2"]}, out)
    return elementwise(ctx, [prod, a["self"]], tuple(out))


@rule(aten.scaled_dot_product_attention)
def sdpa(ctx: Context, a: dict, out: Any) -> Value:
    """softmax(q kᵀ) v composed from the matmul, element-wise and softmax rules: heads are a
    batch dim, so each head's q, k and v channels become one class."""
    q, k, v = a["query"], a["key"], a["value"]
    if a.get("enable_gqa"):
        return unknown(ctx, a, out)
    s_shape = tuple(q.shape[:-1]) + (k.shape[-2],)
    s = _matmul(ctx, q, _transpose_last(Value(k.shape, ctx.canon(k))), s_shape)
    mask = a.get("attn_mask")
    if isinstance(mask, Value):
        s = elementwise(ctx, [s, mask], s_shape)
    s = Value(s_shape, _pin_touching(ctx, ctx.canon(s), {len(s_shape) - 1}, "channels mixed by softmax"))
    return _matmul(ctx, s, v, tuple(out))


# ------------------------------------------------------------------------------------------------
# normalisation
# ------------------------------------------------------------------------------------------------
def _attach(ctx: Context, t: Any, vec: np.ndarray, role: str, what: str) -> None:
    """A per-channel tensor (bias, norm parameter, running statistic) indexed by ``vec``: a
    parameter becomes a member; a computed one (e.g. a bias concatenated at run time) must
    shrink with the channels, so its own channels are coupled to them."""
    if not isinstance(t, Value):
        return
    if t.param is not None:
        ctx.add_member(t, (0,), vec, role)
        return
    own = next((c.atoms for c in ctx.canon(t) if c.dims == (0,)), None)
    if own is not None and own.shape == vec.shape:
        ctx.unify(own, vec)
    elif t.shape and t.shape[0] > 1:
        ctx.pin(vec, f"{what} with a fixed-size computed argument")


def _per_channel(ctx: Context, x: Value, tensors: list[Any], dim: int, what: str) -> np.ndarray | None:
    vec, _ = _channel_vector(ctx, ctx.canon(x), dim, f"{what} channels not separable")
    if vec is not None:
        for t in tensors:
            _attach(ctx, t, vec, "elem", what)
    return vec


@rule(aten.batch_norm, aten._native_batch_norm_legit_no_training, aten.instance_norm,
      aten.native_batch_norm, aten._native_batch_norm_legit)
def batch_norm(ctx: Context, a: dict, out: Any) -> Any:
    """Per-channel parameters and statistics. Batch statistics mix what they reduce over, except
    in a weight standardisation (timm's ``StdConv2d``, NFNets' ``ScaledStdConv2d``: a conv weight
    viewed as ``(1, out, -1)``), whose input columns are then normalised together: the pruned conv
    standardises over the kept ones (``surgery.kept_statistics``)."""
    x = a["input"]
    tensors = [a.get(n) for n in ("weight", "bias", "running_mean", "running_var")]
    _per_channel(ctx, x, tensors, 1, "batch norm")
    comps = ctx.canon(x)
    columns = _standardised_columns(ctx, a)
    within = [c for c in comps if columns is not None and 1 not in c.dims and np.isin(c.atoms, columns).all()]
    for c in within:
        ctx.mark_norm(c.atoms)
    rest = _pin_touching(ctx, [c for c in comps if 1 not in c.dims and not any(c is w for w in within)],
                         set(range(2, len(x.shape))), "channels mixed by batch statistics")
    res = Value(tuple(x.shape), [c for c in comps if c.dims == (1,)] + within + rest)
    if isinstance(out, list):
        return [res] + [Value(s, []) if s else None for s in out[1:]]
    return res


def _standardised(ctx: Context, x: Value) -> bool:
    """Whether this reshape of ``x`` views a parameter for a batch norm to standardise."""
    return x.param is not None and ctx.node is not None and any(
        getattr(u.target, "overloadpacket", None) in (aten.batch_norm, aten._native_batch_norm_legit)
        for u in ctx.node.users)


def _standardised_columns(ctx: Context, a: dict) -> np.ndarray | None:
    """The class roots of a conv weight's input columns when this batch norm standardises the
    weight (batch statistics of the weight itself, viewed as ``(1, out, -1)``); its columns'
    member becomes "standardised": the consumer's columns, normalised together."""
    x, node = a["input"], ctx.node.args[0] if ctx.node is not None and ctx.node.args else None
    if not a.get("training") or a.get("running_mean") is not None or len(x.shape) != 3 or x.shape[0] != 1:
        return None
    while isinstance(node, torch.fx.Node) and node.target in (aten.reshape.default, aten.view.default):
        node = node.args[0]
    param = ctx.param_of_node.get(node.name) if isinstance(node, torch.fx.Node) else None
    shape = tuple(getattr(node.meta.get("val"), "shape", ())) if param is not None else ()
    member = next((m for m in ctx.members if m.tensor == param and m.dims == (1,)), None)
    if member is None or len(shape) < 3 or shape[0] != x.shape[1] or int(np.prod(shape[1:])) != x.shape[2]:
        return None
    member.role = "standardised"
    return np.unique(ctx.uf.roots(member.atoms))


@rule(aten.group_norm, aten.native_group_norm)
def group_norm(ctx: Context, a: dict, out: Any) -> Any:
    x, g = a["input"], int(a.get("num_groups", a.get("group", 1)))
    comps = ctx.canon(x)
    vec, rest = _channel_vector(ctx, comps, 1, "group norm channels not separable")
    rest = _pin_touching(ctx, rest, set(range(2, len(x.shape))), "channels mixed by group norm")
    if vec is not None:
        if g == 1:
            ctx.mark_norm(vec)
        else:  # whole normalisation groups go together, so the others' statistics are untouched
            blocks = vec.reshape(g, -1)
            ctx.unify(blocks, np.broadcast_to(blocks[:, :1], blocks.shape))
        if g == 1 and a.get("weight") is None:
            ctx.pin(vec, "channel normalisation without parameters")
        for t in (a.get("weight"), a.get("bias")):
            if isinstance(t, Value) and t.param is not None:
                ctx.add_member(t, (0,), vec, "norm" if g == 1 else "elem")
    res = Value(tuple(x.shape), ([Comp((1,), vec)] if vec is not None else []) + rest)
    return [res] + [Value(s, []) for s in out[1:]] if isinstance(out, list) else res


@rule(aten.layer_norm, aten.native_layer_norm, aten.rms_norm)
def layer_norm(ctx: Context, a: dict, out: Any) -> Any:
    x = a["input"]
    nd, k = len(x.shape), len(a["normalized_shape"])
    normed = set(range(nd - k, nd))
    params = [t for t in (a.get("weight"), a.get("bias")) if isinstance(t, Value) and t.param is not None]
    comps = ctx.canon(x)
    for c in comps:
        inside = set(c.dims) & normed
        if not inside:
            continue
        if set(c.dims) <= normed and a.get("weight") is None:
            ctx.pin(c.atoms, "channel normalisation without parameters")
        elif set(c.dims) <= normed:
            ctx.mark_norm(c.atoms)
            for t in params:
                ctx.add_member(t, tuple(d - (nd - k) for d in c.dims), c.atoms, "norm")
        else:  # e.g. a norm over each head's features: shared weights, so those dims keep their size
            for d in inside:
                ctx.require_invariant(c.atoms, c.dims.index(d))
            for t in params:
                ctx.rigid(t, "norm weights shared across channels")
    res = Value(tuple(x.shape), comps)
    return [res] + [Value(s, []) for s in out[1:]] if isinstance(out, list) else res


# ------------------------------------------------------------------------------------------------
# shape and data movement
# ------------------------------------------------------------------------------------------------
def _reshape_groups(a: tuple[int, ...], b: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Pair up runs of input and output dims with equal products."""
    groups, i, j = [], 0, 0
    while i < len(a) and j < len(b):
        if a[i] == 1 and b[j] != 1:
            groups.append(([i], []))
            i += 1
            continue
        if b[j] == 1 and a[i] != 1:
            groups.append(([], [j]))
            j += 1
            continue
        ins, outs, pa, pb = [i], [j], a[i], b[j]
        i, j = i + 1, j + 1
        while pa != pb:
            if pa < pb:
                pa *= a[i]
                ins.append(i)
                i += 1
            else:
                pb *= b[j]
                outs.append(j)
                j += 1
        groups.append((ins, outs))
    groups += [([k], []) for k in range(i, len(a))] + [([], [k]) for k in range(j, len(b))]
    return groups


def _heads_dim(ctx: Context, outs: list[int], shape: tuple[int, ...]) -> int | None:
    """In a split of channels inside an attention module, the dim whose size is its ``num_heads``
    (followed by a ``head_dim``-sized dim): surgery keeps that attribute in sync, so it may shrink."""
    m = ctx.module()
    heads, head_dim = getattr(m, "num_heads", None), getattr(m, "head_dim", None)
    if not isinstance(heads, int) or not isinstance(head_dim, int):
        return None
    if not any(isinstance(getattr(m, name, None), torch.nn.Linear) for name in ("qkv", "q")):
        return None
    for pos in range(len(outs) - 1):
        if shape[outs[pos]] == heads and shape[outs[pos + 1]] == head_dim:
            return outs[pos]
    return None


def _parts_split(ctx: Context, a: dict, outs: list[int], shape: tuple[int, ...]) -> bool:
    """Whether a channel dim split into two, ``(n, m)``, cuts it into ``n`` equal parts, as timm's
    ``x.view(B, self.num_paths, C // self.num_paths, ...)`` or ``reshape(B, self.radix, -1, ...)``
    do (``outs``: the two dims the channels vary along, when a third repeats them): ``n`` is
    written in the call (not -1) and equals an integer attribute of the module. Then
    ``m`` is the only size that can follow a removal, so the parts may shrink if they lose as many
    channels each (``require_even``); a module that writes ``m`` in its code fails once pruned,
    which ``prune`` catches and repairs."""
    requested = a.get("size", a.get("shape"))
    if len(outs) != 2 or not isinstance(requested, (list, tuple)) or len(requested) != len(shape):
        return False
    n = requested[outs[0]]
    module = ctx.module()
    return (type(n) is int and n > 1 and module is not None
            and any(type(v) is int and v == n for v in vars(module).values()))


@rule(aten.view, aten.reshape, aten._unsafe_view, aten.flatten, aten.unflatten, aten.view_as,
      aten.reshape_as, aten.squeeze, aten.unsqueeze)
def reshape(ctx: Context, a: dict, out: Any) -> Value:
    """Any reshape: channels move with their elements. Merging a channel dim with others (flatten)
    is free; splitting one keeps every new dim's size, except the one dim its channels vary along
    (a flattened channel dim split back), an attention module's heads, a grouped norm's groups and
    equal parts."""
    x = a["self"] if "self" in a else a["input"]
    src, dst = tuple(x.shape), tuple(out)
    groups = _reshape_groups(src, dst)
    where = {d: gi for gi, (ins, _) in enumerate(groups) for d in ins}
    res, clusters = [], []  # components that share a reshape group must become one
    for c in _comps(ctx, x):
        if not c.dims:
            res.append(c)
            continue
        touched, members = {where[d] for d in c.dims}, [c]
        for cl in [cl for cl in clusters if cl[0] & touched]:
            clusters.remove(cl)
            touched |= cl[0]
            members += cl[1]
        clusters.append((touched, members))
    for touched, members in clusters:
        touched = sorted(touched)
        ins = tuple(d for gi in touched for d in groups[gi][0])
        outs = tuple(d for gi in touched for d in groups[gi][1])
        if len(members) > 1 and _standardised(ctx, x):  # a conv weight viewed as
            # (1, out, in·k·k) to be standardised: its input columns label the merged dim; the
            # kernel dims stay whole, so dropping their labels loses nothing
            members = sorted(members, key=lambda c: c.dims)
            ctx.pin([c for c in members[1:]], "dims of a parameter merged by a reshape")
            members = members[:1]
        arrays = [_expand(c, ins, src) for c in members]
        for arr in arrays[1:]:
            ctx.unify(arr, arrays[0])
        atoms = np.ascontiguousarray(arrays[0]).reshape([dst[d] for d in outs])
        for gi in touched:
            g_outs = [d for d in groups[gi][1] if dst[d] > 1]
            if len(g_outs) > 1:
                roots = ctx.uf.roots(atoms)  # channels that vary along one new dim only (a
                # flattened channel dim unflattened): that dim shrinks, the others keep their size
                varying = [d for d in g_outs if not (roots == np.take(roots, [0], outs.index(d))).all()]
                free = varying[0] if len(varying) == 1 else _heads_dim(ctx, g_outs, dst)
                if free is None and is_grouped_norm(ctx.module()) and dst[g_outs[0]] == ctx.module().groups:
                    free = g_outs[0]  # whole groups of a grouped norm (their statistic ties each)
                pair = varying if len(varying) == 2 else g_outs  # dims the channels already
                # repeat along (ResNeSt's cardinality before its radix: grouped convs that lose
                # positions) keep their size as they are
                if free is None and _parts_split(ctx, a, pair, dst):
                    axis = outs.index(pair[0])
                    ctx.require_even([np.take(atoms, i, axis=axis) for i in range(dst[pair[0]])])
                    free = pair[1]
                for d in g_outs:
                    if d != free:
                        ctx.require_invariant(atoms, outs.index(d))
        res.append(Comp(outs, atoms))
    return Value(dst, res)


@rule(aten.permute, aten.transpose, aten.t, aten.movedim, aten.swapaxes)
def permute(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"] if "self" in a else a["input"]
    nd = len(x.shape)
    if "dims" in a and a["dims"] is not None and not isinstance(a["dims"], int):
        perm = [d % nd for d in a["dims"]]
    else:
        d0, d1 = (a.get("dim0", 0) % nd, a.get("dim1", 1) % nd) if nd else (0, 0)
        if "source" in a:
            src = _norm_dims(a["source"], nd)
            dst = _norm_dims(a["destination"], nd)
            rest = [d for d in range(nd) if d not in src]
            perm = [None] * nd
            for s, t in zip(src, dst):
                perm[t] = s
            it = iter(rest)
            perm = [p if p is not None else next(it) for p in perm]
        else:
            perm = list(range(nd))
            perm[d0], perm[d1] = perm[d1], perm[d0]
    inv = {old: new for new, old in enumerate(perm)}
    return Value(tuple(out), _shift(_comps(ctx, x), lambda d: inv[d]))


def _slice_out(ctx: Context, x: Value, dim: int, index: Any, keep_dim: bool, shape: Any,
               free: bool = False) -> Value:
    """The selected ``index`` of ``dim``; the dim's size must not change unless ``free`` (a
    channel-only component whose split the caller constrains instead)."""
    comps = []
    for c in _comps(ctx, x):
        if dim in c.dims:
            ax = c.dims.index(dim)
            if not (free and c.dims == (dim,)):
                ctx.require_invariant(c.atoms, ax)
            atoms = np.take(c.atoms, index, axis=ax)
            dims = c.dims if keep_dim else tuple(d for d in c.dims if d != dim)
            c = Comp(dims, atoms)
        if not keep_dim:
            c = _shift([c], lambda d: d - 1 if d > dim else d)[0]
        comps.append(c)
    return Value(tuple(shape), comps)


@rule(aten.select)
def select(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"]
    dim = a["dim"] % len(x.shape)
    return _slice_out(ctx, x, dim, a["index"] % x.shape[dim], False, out)


@rule(aten.slice, aten.narrow)
def slice_(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"]
    dim = a["dim"] % len(x.shape)
    n = x.shape[dim]
    if "length" in a:
        start = a["start"] % n
        idx = np.arange(start, start + a["length"])
    else:
        start = 0 if a.get("start") is None else a["start"]
        end = n if a.get("end") is None else a["end"]
        idx = np.arange(n)[slice(start, end, a.get("step") or 1)]
    return _slice_out(ctx, x, dim, idx, True, out)


@rule(aten.split, aten.split_with_sizes, aten.chunk, aten.tensor_split)
def split(ctx: Context, a: dict, out: Any) -> list[Value]:
    """Split sizes fixed in the code keep the split dim's size. ``chunk`` into equal parts splits
    by the size it finds, so channels may go if every part loses as many (a gated MLP's value and
    gate halves, coupled element by element, lose the same channels). Sizes read from a module
    attribute (timm's ``MixedConv2d.splits``; or one size for all parts, whose parts then lose
    the same positions: Res2Net's ``width``, CSPNet's ``expand_chs // 2``) may change too: surgery
    rewrites the attribute."""
    x = a["self"]
    dim = a.get("dim", 0) % len(x.shape)
    sizes = [shape[dim] for shape in out]
    starts = np.cumsum([0] + sizes)
    even = len(out) == a.get("chunks") and len(set(sizes)) == 1
    attribute = None if even else _sizes_attribute(ctx, sizes, a.get("split_size"))
    free = even or attribute is not None
    for c in _comps(ctx, x) if free else ():
        if c.dims == (dim,):
            pieces = [c.atoms[starts[i]:starts[i + 1]] for i in range(len(out))]
            if even:
                ctx.require_even(pieces)
            else:
                if type(a.get("split_size")) is int:  # one size for all: the parts lose alike
                    for piece in pieces[1:]:
                        ctx.unify(piece, pieces[0])
                ctx.require_split_sizes(attribute, pieces)
    return [_slice_out(ctx, x, dim, np.arange(starts[i], starts[i + 1]), True, shape, free)
            for i, shape in enumerate(out)]


def _sizes_attribute(ctx: Context, sizes: list[int], size: Any = None) -> str | None:
    """"path.name" of the attribute of the splitting module that holds exactly these sizes, or,
    for ``torch.split`` by one int ``size`` into equal parts, that size (Res2Net's
    ``split(x, self.width)``) or the total it is a share of (CSPNet's
    ``split(self.expand_chs // 2)``). Equal sizes first: a total that happens to match is the
    weaker guess."""
    module = ctx.module()
    if module is None or len(sizes) < 2:
        return None
    if type(size) is int:
        wanted = [size, sum(sizes)] if set(sizes) == {size} else []
        found = [(wanted.index(v), n) for n, v in vars(module).items() if type(v) is int and v in wanted]
    else:
        found = [(0, n) for n, v in vars(module).items() if isinstance(v, (list, tuple))
                 and list(v) == sizes and all(type(i) is int for i in v)]
    if not found:
        return None
    path, name = ctx.module_path(), min(found)[1]
    return f"{path}.{name}" if path else name


@rule(aten.unbind)
def unbind(ctx: Context, a: dict, out: Any) -> list[Value]:
    x = a["self"]
    dim = a.get("dim", 0) % len(x.shape)
    return [_slice_out(ctx, x, dim, i, False, shape) for i, shape in enumerate(out)]


@rule(aten.cat, aten.concat)
def cat(ctx: Context, a: dict, out: Any) -> Value:
    """Channels of the inputs follow each other along the cat dim; other dims couple as element-wise."""
    vals = [v for v in a["tensors"] if isinstance(v, Value) and v.shape != (0,)]
    dim = a.get("dim", 0) % len(out)
    along, others = [], []
    for v in vals:
        comps = _comps(ctx, v)
        vec, rest = None, []
        for c in comps:
            if c.dims == (dim,):
                vec = c.atoms
            elif dim in c.dims or not c.dims:
                ctx.pin(c.atoms, "channels concatenated jointly with other dims")
            else:
                rest.append(c)
        along.append(vec)
        shape = list(v.shape)
        shape[dim] = 1
        others.append(Value(tuple(shape), rest))
    o_shape = list(out)
    o_shape[dim] = 1
    res = elementwise(ctx, others, tuple(o_shape))
    comps = list(res.comps)
    if any(v is not None for v in along):
        parts = []
        for v, vec in zip(vals, along):
            if vec is None:
                vec = ctx.fresh([v.shape[dim]])
                ctx.pin(vec, "concatenated with a fixed-size tensor")
            parts.append(vec)
        comps.append(Comp((dim,), np.concatenate(parts)))
    return Value(tuple(out), comps)


@rule(aten.stack)
def stack(ctx: Context, a: dict, out: Any) -> Value:
    dim = a.get("dim", 0) % len(out)
    vals = []
    for v in a["tensors"]:
        comps = _shift(_comps(ctx, v), lambda d: d + 1 if d >= dim else d)
        shape = list(v.shape)
        shape.insert(dim, 1)
        vals.append(Value(tuple(shape), comps))
    o_shape = list(out)
    o_shape[dim] = 1
    return Value(tuple(out), elementwise(ctx, vals, tuple(o_shape)).comps)


def _pin_indices(ctx: Context, indices: Iterable[Any]) -> None:
    """Pin the elements of tensors used as indices: each element addresses a position, so
    removing some would shift what the others pick (a relative-position index buffer is a
    table of positions, not channels)."""
    for t in indices:
        if isinstance(t, Value) and t.param is not None:  # a buffer: no member of its own for this
            ctx.rigid(t, "used as indices")
        elif isinstance(t, Value):
            for c in ctx.canon(t):
                ctx.pin(c.atoms, "tensor used as indices")


@rule(aten.index)
def index(ctx: Context, a: dict, out: Any) -> Value:
    """Advanced indexing with one index tensor on a dim that carries no channels."""
    x, indices = a["self"], a["indices"]
    _pin_indices(ctx, indices)
    used = [i for i, t in enumerate(indices) if t is not None]
    comps = _comps(ctx, x)
    if len(used) != 1:
        return unknown(ctx, a, out)
    d = used[0]
    comps = _pin_touching(ctx, comps, {d}, "channels gathered by an index")
    extra = len(out) - len(x.shape)
    return Value(tuple(out), _shift(comps, lambda k: k + extra if k > d else k))


def _mix_along(ctx: Context, comps: list[Comp], dims: set[int], drop: bool, reason: str) -> list[Comp]:
    """The op combines elements along ``dims``, position by position of the other dims. A
    component only along ``dims`` is pinned. One that spans other dims too (a channel dim cut into
    parts, as a selective kernel's paths: ``softmax`` or ``sum`` over the paths) keeps its
    channels once the elements combined at each position are one channel: they are unified, and
    ``dims`` leave the component if ``drop`` (reduced)."""
    out = []
    for c in comps:
        along = [i for i, d in enumerate(c.dims) if d in dims]
        if (not c.dims and dims) or (along and len(along) == len(c.dims)):
            ctx.pin(c.atoms, reason)
        elif not along:
            out.append(c)
        else:
            atoms = c.atoms
            for axis in reversed(along):
                atoms = _collapse_axis(ctx, atoms, axis)
            out.append(Comp(tuple(d for d in c.dims if d not in dims), atoms) if drop else c)
    return out


def _pin_along(ctx: Context, x: Value, dims: list[int], out: Any) -> Value:
    """Channels along ``dims`` are reordered, gathered or mixed: pin them; others pass through."""
    comps = _pin_touching(ctx, _comps(ctx, x), set(dims), f"channels mixed along dims {dims}")
    return Value(tuple(out), comps if len(out) == len(x.shape) else [])


@rule(aten.index_select, aten.gather, aten.cumsum, aten.repeat_interleave)
def along_dim(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"] if "self" in a else a["input"]
    _pin_indices(ctx, (a.get("index"), a.get("repeats")))
    nd = len(x.shape)
    return _pin_along(ctx, x, _norm_dims(a.get("dim"), nd) if a.get("dim") is not None else list(range(nd)), out)


@rule(aten.softmax, aten._softmax, aten.log_softmax, aten._log_softmax)
def softmax(ctx: Context, a: dict, out: Any) -> Value:
    """Normalises along ``dim`` at each position of the others (see :func:`_mix_along`)."""
    x = a["self"] if "self" in a else a["input"]
    dims = set(_norm_dims(a["dim"], len(x.shape)))
    return Value(tuple(out), _mix_along(ctx, _comps(ctx, x), dims, False, f"channels mixed along dims {sorted(dims)}"))


@rule(aten.roll, aten.flip)
def along_dims(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"]
    return _pin_along(ctx, x, _norm_dims(a.get("dims") or None, len(x.shape)), out)


@rule(aten.repeat, aten.tile)
def repeat(ctx: Context, a: dict, out: Any) -> Value:
    """Copies along the repeated dims (pinned if they carry channels); ``tile`` pads its
    repeats with ones on the left when it has fewer than dims."""
    x = a["self"]
    reps = list(a["repeats"] if "repeats" in a else a["dims"])
    reps = [1] * (len(x.shape) - len(reps)) + reps
    lead = len(reps) - len(x.shape)
    dims = [d - lead for d, r in enumerate(reps) if r != 1 and d >= lead]
    res = _pin_along(ctx, x, dims, tuple(out)[lead:])
    return Value(tuple(out), _shift(res.comps, lambda d: d + lead))


@rule(aten.mean, aten.sum, aten.amax, aten.amin, aten.max, aten.min, aten.var, aten.std,
      aten.norm, aten.logsumexp, aten.prod, aten.argmax, aten.argmin, aten.linalg_vector_norm,
      aten.var_mean, aten.all, aten.any)
def reduction(ctx: Context, a: dict, out: Any) -> Any:
    """Reducing over a channel dim mixes channels (pinned, unless the channels are cut into parts:
    :func:`_mix_along`, or the reduction is a norm's statistic in a module :mod:`ptsp.norms`
    knows); other channels pass through."""
    x = a["self"] if "self" in a else a["input"]
    nd = len(x.shape)
    dims = _norm_dims(a.get("dim"), nd) if "dim" in a else list(range(nd))
    keep = bool(a.get("keepdim", False))
    comps = _comps(ctx, x)
    if dims == [statistic_dim(ctx.module(), ctx.node.target.overloadpacket, nd)]:
        for c in comps:
            if set(c.dims) & set(dims):
                ctx.mark_norm(c.atoms)
        comps = [c for c in comps if not set(c.dims) & set(dims)]
    comps = _mix_along(ctx, comps, set(dims), True, "channels mixed by a reduction")
    if not keep:
        comps = _shift(comps, lambda d: d - sum(1 for r in dims if r < d))
    if isinstance(out, list):
        return [Value(s, comps if i == 0 else []) if s is not None else None for i, s in enumerate(out)]
    return Value(tuple(out), comps)


def _spatial(k: int) -> Rule:
    def spatial(ctx: Context, a: dict, out: Any) -> Any:
        """Pooling and resampling act on the last ``k`` dims only."""
        x = a["self"] if "self" in a else a["input"]
        nd = len(x.shape)
        comps = _pin_touching(ctx, _comps(ctx, x), set(range(nd - k, nd)), "channels mixed by pooling")
        res = Value(tuple(out[0] if isinstance(out, list) else out), comps)
        return [res] + [Value(s, []) for s in out[1:]] if isinstance(out, list) else res
    return spatial


rule(aten.avg_pool1d, aten.max_pool1d, aten.adaptive_avg_pool1d, aten.adaptive_max_pool1d,
     aten.upsample_nearest1d, aten.upsample_linear1d)(_spatial(1))
rule(aten.avg_pool2d, aten.max_pool2d, aten.max_pool2d_with_indices, aten.adaptive_avg_pool2d,
     aten._adaptive_avg_pool2d, aten.adaptive_max_pool2d, aten.upsample_nearest2d,
     aten.upsample_bilinear2d, aten.upsample_bicubic2d, aten._upsample_nearest_exact2d,
     aten._upsample_bilinear2d_aa, aten._upsample_bicubic2d_aa)(_spatial(2))


@rule(aten.unfold)
def unfold(ctx: Context, a: dict, out: Any) -> Value:
    """Sliding windows along one dim, in a new last dim: channels elsewhere pass through."""
    x = a["self"]
    comps = _pin_touching(ctx, _comps(ctx, x), {a["dimension"] % max(len(x.shape), 1)},
                          "channels mixed by unfold")
    return Value(tuple(out), comps)


@rule(aten.im2col)
def im2col(ctx: Context, a: dict, out: Any) -> Value:
    """``F.unfold``: (N, C, H, W) → (N, C·kh·kw, L); channel c owns rows c·kh·kw onwards, as a
    flatten of (C, kh, kw) would give them."""
    x = a["self"]
    vec, rest = _channel_vector(ctx, ctx.canon(x), 1, "im2col input channels not separable")
    _pin_touching(ctx, rest, set(range(len(x.shape))), "channels mixed by im2col")
    comps = [] if vec is None else [Comp((1,), np.repeat(vec, out[1] // len(vec)))]
    return Value(tuple(out), comps)


@rule(aten.col2im)
def col2im(ctx: Context, a: dict, out: Any) -> Value:
    """``F.fold``, im2col's inverse: (N, C·kh·kw, L) → (N, C, H, W) sums each channel's rows into
    it, so those rows are one channel."""
    x = a["self"]
    vec, rest = _channel_vector(ctx, ctx.canon(x), 1, "col2im input channels not separable")
    _pin_touching(ctx, rest, set(range(len(x.shape))), "channels mixed by col2im")
    if vec is None:
        return Value(tuple(out), [])
    return Value(tuple(out), [Comp((1,), _collapse_axis(ctx, vec.reshape(out[1], -1), 1))])
rule(aten.avg_pool3d, aten.max_pool3d, aten.adaptive_avg_pool3d, aten.adaptive_max_pool3d,
     aten.upsample_nearest3d, aten.upsample_trilinear3d)(_spatial(3))


@rule(aten.pad, aten.constant_pad_nd, aten.reflection_pad1d, aten.reflection_pad2d,
      aten.replication_pad1d, aten.replication_pad2d, aten.reflection_pad3d, aten.replication_pad3d)
def pad(ctx: Context, a: dict, out: Any) -> Value:
    x = a["self"] if "self" in a else a["input"]
    nd = len(x.shape)
    amounts = list(a["pad"])
    padded = {nd - 1 - i for i in range(len(amounts) // 2) if amounts[2 * i] or amounts[2 * i + 1]}
    return Value(tuple(out), _pin_touching(ctx, _comps(ctx, x), padded, "channels padded"))


@rule(operator.getitem)
def getitem(ctx: Context, a: dict, out: Any) -> Any:
    seq, i = a["seq"], a["idx"]
    return seq[i] if isinstance(seq, (list, tuple)) else None


def unknown(ctx: Context, a: dict, out: Any) -> Any:
    """No rule: every channel reaching the op is pinned and its outputs are fixed-size."""
    touched = False
    for v in tensor_args(a):
        comps = _comps(ctx, v)
        if comps:
            touched = True
            ctx.pin(comps, "op with no channel rule")
    if touched:
        name = str(getattr(ctx.node, "target", "?"))
        ctx.unknown_ops[name] = ctx.unknown_ops.get(name, 0) + 1
    if isinstance(out, list):
        return [Value(s, []) if s is not None else None for s in out]
    return Value(tuple(out), []) if out is not None else None
