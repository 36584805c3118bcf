"""Trace a model with ``torch.export`` and hold the channel bookkeeping that the op rules fill in.

Vocabulary (shared with :mod:`ptsp.ops` and :mod:`ptsp.groups`):

* An **atom** is one channel index of one tensor dimension somewhere in the graph (a conv's output
  row, a parameter's column, ...). Atoms that must be removed together are unioned; the
  union-find root of a set of atoms is a **class**, i.e. one prunable channel.
* A tensor's **label** is a list of **components**. A component ``Comp(dims, atoms)`` says that the
  tensor's elements along ``dims`` belong to the channel ``atoms[i, j, ...]``; dimensions covered by
  no component carry no channel identity (batch, space, tokens). Components of one tensor cover
  disjoint dimensions, and an element is removed when any of its components' atoms is removed.
* A **member** is a parameter or buffer slice indexed by atoms: ``(tensor name, dims, atoms)``.
  Surgery removes the slices whose atoms belong to removed classes.
* A class is **pinned** when removing it would change the model in a way no rule can express
  (model inputs/outputs, unknown ops, channel-mixing reductions, ...). Pins carry reasons.
"""
from __future__ import annotations

import dataclasses
import warnings
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn


class TraceError(RuntimeError):
    """The model could not be traced into a graph (data-dependent control flow, unsupported input)."""


@dataclasses.dataclass
class Comp:
    """Channel identity of a tensor along ``dims`` (sorted); ``atoms.shape`` equals those dims' sizes."""

    dims: tuple[int, ...]
    atoms: np.ndarray


@dataclasses.dataclass
class Value:
    """What the propagation knows about one tensor in the graph."""

    shape: tuple[int, ...]
    comps: list[Comp]
    param: str | None = None  # fully-qualified name when the tensor is a parameter or buffer


@dataclasses.dataclass
class Member:
    """A slice of a parameter or buffer indexed by atoms along ``dims``."""

    tensor: str
    dims: tuple[int, ...]
    atoms: np.ndarray
    # "out" (producer rows), "in" (consumer columns), "elem" (per-channel tensors), "norm" (the
    # parameters of a normalisation whose statistics are taken over these channels),
    # "standardised" (consumer columns of a weight standardised over them: ``ops.batch_norm``) or
    # "split" (a module attribute holding split sizes, as a vector of positions: see ``ops.split``)
    role: str


class UnionFind:
    """Union-find over integer atoms with a growable numpy parent array."""

    def __init__(self) -> None:
        self.parent = np.zeros(1024, dtype=np.int64)
        self.size = 0

    def new(self, n: int) -> np.ndarray:
        while self.size + n > len(self.parent):
            self.parent = np.concatenate([self.parent, np.zeros_like(self.parent)])
        ids = np.arange(self.size, self.size + n, dtype=np.int64)
        self.parent[self.size:self.size + n] = ids
        self.size += n
        return ids

    def roots(self, atoms: np.ndarray) -> np.ndarray:
        r = np.asarray(atoms, dtype=np.int64)
        while True:
            p = self.parent[r]
            if np.array_equal(p, r):
                return r
            r = p

    def union(self, a: np.ndarray, b: np.ndarray) -> list[tuple[int, int]]:
        """Union ``a[i]`` with ``b[i]``; returns the (winner, loser) root pairs that were merged."""
        ra, rb = self.roots(a).ravel(), self.roots(np.broadcast_to(b, np.shape(a))).ravel()
        diff = ra != rb
        if not diff.any():
            return []
        pairs = np.unique(np.stack([ra[diff], rb[diff]], 1), axis=0)
        merged = []
        for x, y in pairs.tolist():
            x, y = self._find(x), self._find(y)
            if x != y:
                if x > y:
                    x, y = y, x
                self.parent[y] = x
                merged.append((x, y))
        return merged

    def _find(self, x: int) -> int:
        root = x
        while self.parent[root] != root:
            root = int(self.parent[root])
        while self.parent[x] != root:
            self.parent[x], x = root, int(self.parent[x])
        return root


class Context:
    """State of one channel propagation over an exported graph; the op rules act on it."""

    def __init__(self) -> None:
        self.uf = UnionFind()
        self.members: list[Member] = []
        self.pins: dict[int, set[str]] = {}  # root -> reasons
        self.norm_crossing: set[int] = set()  # roots whose channels are normalised together
        self.invariant: list[tuple[np.ndarray, int, str]] = []  # (atoms, axis, where): size must not change
        self.even: list[tuple[list[np.ndarray], str]] = []  # (pieces, where): each must lose alike
        self.split_sizes: list[tuple[str, list[np.ndarray]]] = []  # ("module.attr", pieces)
        self.rigid_tensors: dict[str, str] = {}  # parameter/buffer -> why its shape must not change
        self.unknown_ops: dict[str, int] = {}
        self.param_comps: dict[str, list[Comp]] = {}
        self.node: torch.fx.Node | None = None  # node being processed, for messages
        self.module_of_node: dict[str, nn.Module] = {}
        self.param_of_node: dict[str, str] = {}  # placeholder name -> parameter/buffer name

    # --- atoms and classes -------------------------------------------------------------------
    def fresh(self, shape: Sequence[int]) -> np.ndarray:
        return self.uf.new(int(np.prod(shape, dtype=np.int64))).reshape(tuple(shape))

    def unify(self, a: np.ndarray, b: np.ndarray) -> None:
        for keep, gone in self.uf.union(a, b):
            if gone in self.pins:
                self.pins.setdefault(keep, set()).update(self.pins.pop(gone))
            if gone in self.norm_crossing:
                self.norm_crossing.discard(gone)
                self.norm_crossing.add(keep)

    def collapse(self, atoms: np.ndarray) -> None:
        """Make all ``atoms`` one class."""
        flat = np.asarray(atoms).ravel()
        if flat.size > 1:
            self.unify(flat[1:], flat[:1])

    def pin(self, atoms: np.ndarray | Iterable[Comp], reason: str) -> None:
        if not isinstance(atoms, (np.ndarray, np.integer)):
            arrays = [np.ravel(c.atoms) for c in atoms]
            atoms = np.concatenate(arrays) if arrays else np.zeros(0, np.int64)
        where = f"{reason} at {self.where()}" if self.node is not None else reason
        for r in np.unique(self.uf.roots(atoms)).tolist():
            reasons = self.pins.setdefault(r, set())
            if len(reasons) < 4:
                reasons.add(where)

    def mark_norm(self, atoms: np.ndarray) -> None:
        self.norm_crossing.update(np.unique(self.uf.roots(atoms)).tolist())

    def require_invariant(self, atoms: np.ndarray, axis: int) -> None:
        """Record that the size of ``atoms``' axis must not change (checked once groups exist)."""
        self.invariant.append((atoms, axis, self.where()))

    def require_even(self, pieces: list[np.ndarray]) -> None:
        """Record that the channel ``pieces`` of one dim, split into equal parts by their count at
        run time (``chunk``), must each lose as many channels (checked once groups exist)."""
        self.even.append((pieces, self.where()))

    def require_split_sizes(self, attribute: str, pieces: list[np.ndarray]) -> None:
        """Record that a split's sizes come from the module attribute ``attribute``
        ("path.name"): its ``pieces`` may each lose channels, and surgery sets the attribute to
        what each keeps."""
        for known, parts in self.split_sizes:  # a module called twice splits alike
            if known == attribute:
                for a, b in zip(parts, pieces):
                    self.unify(a, b)
                return
        self.split_sizes.append((attribute, pieces))

    def where(self) -> str:
        if self.node is None:
            return "?"
        return f"{self.node.target} in '{self.module_path() or '<root>'}'"

    def module_path(self) -> str | None:
        """Path of the innermost module whose forward produced the current node ("": the root;
        None: not known)."""
        stack = (self.node.meta.get("nn_module_stack") or {}) if self.node is not None else {}
        return list(stack.values())[-1][0] if stack else None

    def module(self) -> nn.Module | None:
        """Innermost module whose forward produced the current node."""
        path = self.module_path()
        return None if path is None else self.module_of_node.get(path)

    # --- members -----------------------------------------------------------------------------
    def add_member(self, value: Value, dims: tuple[int, ...], atoms: np.ndarray, role: str) -> None:
        if value.param is None:
            raise AssertionError("members are parameters or buffers")
        atoms = np.asarray(atoms)
        for m in self.members:  # a tensor used twice (tied weights): the same slices go together
            if m.tensor == value.param and m.dims == dims and m.atoms.shape == atoms.shape:
                self.unify(m.atoms, atoms)
        self.members.append(Member(value.param, dims, atoms, role))

    def rigid(self, value: Value, why: str) -> None:
        """A parameter or buffer is used where its shape cannot change."""
        if value.param is not None:
            self.rigid_tensors.setdefault(value.param, f"{why} at {self.where()}")

    # --- canonical components ----------------------------------------------------------------
    def canon(self, value: Value) -> list[Comp]:
        """Components with atoms replaced by class roots and axes along which they are constant dropped."""
        out = []
        for c in value.comps:
            atoms = self.uf.roots(c.atoms)
            dims = list(c.dims)
            for ax in range(atoms.ndim - 1, -1, -1):
                first = np.take(atoms, [0], axis=ax)
                if (atoms == first).all():
                    atoms = np.asarray(np.take(atoms, 0, axis=ax))
                    del dims[ax]
            out.append(Comp(tuple(dims), atoms))
        return out


@dataclasses.dataclass
class Trace:
    """An exported graph with the maps from graph names to the model's tensors."""

    graph: torch.fx.Graph
    params: dict[str, str]  # graph placeholder name -> parameter/buffer fully-qualified name
    modules: dict[str, nn.Module]


def export(model: nn.Module, example_inputs: Any) -> Trace:
    """Trace ``model`` (in eval mode) to an ATen-level graph with shapes on every node.

    The graph is the pre-dispatch ATen graph that ``torch.export`` produces; ``make_fx`` over
    ``functional_call`` builds it in about half the time, and ``torch.export`` is the fallback."""
    args = example_inputs if isinstance(example_inputs, tuple) else (example_inputs,)
    was_training = model.training
    model.eval()
    # per-node Python stack traces are not needed (nn_module_stack is) and cost time (the
    # setting is newer than torch 2.11: without it they are emitted)
    config = torch.fx.config
    emit = getattr(config, "do_not_emit_stack_traces", None)
    if emit is not None:
        config.do_not_emit_stack_traces = True
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                return _make_fx(model, args)
            except Exception:
                return _export(model, args)
    except Exception as exc:  # tracing raises many exception types; all mean "cannot trace"
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise TraceError(f"cannot trace {type(model).__name__}: {msg}") from exc
    finally:
        if emit is not None:
            config.do_not_emit_stack_traces = emit
        model.train(was_training)


def _make_fx(model: nn.Module, args: tuple) -> Trace:
    from torch.fx.experimental.proxy_tensor import make_fx

    # every name of every tensor (a module registered twice has two), each mapped to the
    # canonical name that named_parameters()/named_buffers() report
    canonical = {id(t): n for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    tensors = {**dict(model.named_parameters(remove_duplicate=False)),
               **dict(model.named_buffers(remove_duplicate=False))}

    def forward(tensors: dict, *args: Any) -> Any:
        return torch.func.functional_call(model, tensors, args, tie_weights=False)

    forward._orig_mod = model  # makes make_fx record nn_module_stack
    slots = [(m, k, v) for m in model.modules() for d in (m._parameters, m._buffers) for k, v in d.items()]
    try:
        with torch.no_grad():
            gm = make_fx(forward, tracing_mode="fake", pre_dispatch=True,
                         record_module_stack=True)(tensors, *args)
    finally:  # functional_call must leave the model as it was, whatever happened
        for m, k, v in slots:
            (m._parameters if k in m._parameters else m._buffers)[k] = v
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    names = list(tensors)
    if len(placeholders) < len(names) or any(
            tuple(n.meta["val"].shape) != tuple(tensors[k].shape) for n, k in zip(placeholders, names)):
        raise TraceError("make_fx placeholders do not line up with the model's tensors")
    params = {n.name: canonical[id(tensors[k])] for n, k in zip(placeholders, names)}
    return Trace(gm.graph, params, dict(model.named_modules()))


def _export(model: nn.Module, args: tuple) -> Trace:
    ep = torch.export.export(model, args, strict=False)
    params = {spec.arg.name: spec.target for spec in ep.graph_signature.input_specs
              if spec.kind.name in ("PARAMETER", "BUFFER") and hasattr(spec.arg, "name")}
    return Trace(ep.graph, params, dict(model.named_modules()))


def shape_of(node: Any) -> Any:
    """Static shape(s) of a graph value: a tuple, a list of tuples, or None for non-tensors."""
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    if isinstance(val, torch.Tensor):
        return tuple(int(s) for s in val.shape)
    if isinstance(val, (list, tuple)):
        return [tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None for v in val]
    return None
