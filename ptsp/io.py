"""Self-describing artifacts: one safetensors file holding the pruned weights and, in its metadata,
everything needed to rebuild the architecture they fit.

A pruned ``state_dict`` no longer fits the class it came from. The file therefore records the base
model (timm name and creation arguments) and the plan (kept original indices per tensor); loading
creates the base model without weights, replays the plan with :func:`ptsp.surgery.apply` (no
tracing) and loads the weights strictly. A digest of the tensors catches corruption that keeps the
file's structure intact.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path
from typing import Any, Mapping

import safetensors.torch
import torch
from torch import nn

from . import __version__
from .pruning import PLAN_ATTR
from .surgery import apply

FORMAT = "ptsp"
#: bumped whenever a file written by this version cannot be read by an older ptsp
FORMAT_VERSION = 1
#: attribute under which a loaded model keeps how to rebuild it (so it can be saved again)
BASE_ATTR = "_ptsp_base"


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False,
         model_args: Mapping[str, Any] | None = None) -> Path:
    """Write ``model`` (pruned by ptsp, or dense) to ``path`` as one safetensors file that
    :func:`load` rebuilds without the original code path.

    For a timm model the base architecture is read from the model (``pretrained_cfg``,
    ``num_classes``, input channels, ViT image and patch sizes) and checked by replaying the plan
    on it; ``model_args`` adds or overrides ``timm.create_model`` arguments the model does not
    reveal. Other models are saved too, and loaded with ``load(path, model=build())``.

    The write is atomic: a temporary file in the same folder is renamed over ``path`` only once
    complete. An existing ``path`` is replaced only with ``overwrite=True``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    path = Path(path)
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass overwrite=True to replace it")
    if not path.parent.is_dir():
        raise FileNotFoundError(f"folder {path.parent} does not exist")
    plan = getattr(model, PLAN_ATTR, None) or {"ptsp_version": __version__, "method": None, "kept": {}}
    tensors, aliases = _unique_tensors(model)
    base = _base_of(model, plan["kept"], model_args, tensors, aliases)
    metadata = {
        "format": FORMAT, "format_version": str(FORMAT_VERSION), "ptsp_version": __version__,
        "base": json.dumps(base), "plan": json.dumps(plan), "aliases": json.dumps(aliases),
        "digest": _digest(tensors),
    }
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        safetensors.torch.save_file(tensors, str(tmp), metadata=metadata)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # the permissions a plain open() would have given
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def load(path: str | os.PathLike, model: nn.Module | None = None, *,
         device: str | torch.device = "cpu") -> nn.Module:
    """The model saved at ``path``, in eval mode, with its plan (``ptsp.plan_of``).

    A timm base is created from the file's metadata (no weights downloaded). For any other model
    pass ``model``, the unpruned architecture: it is pruned in place to the saved widths and
    receives the saved weights. Raises ``ValueError`` with one clear line for a file that is not a
    ptsp artifact, is truncated or corrupted, comes from a newer format, names a model this timm
    does not know, or holds tensors whose shapes do not match the plan.
    """
    path = Path(path)
    meta = read_metadata(path)
    base, plan, aliases = (json.loads(meta[k]) for k in ("base", "plan", "aliases"))
    if model is not None and not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    try:
        tensors = safetensors.torch.load_file(str(path))
    except Exception as exc:
        raise ValueError(f"{path} is corrupted: {exc}") from None
    if _digest(tensors) != meta["digest"]:
        raise ValueError(f"{path} is corrupted: its tensors do not match the digest written with them")
    # torch's CPU allocator aligns every tensor to 64 bytes; the file's tensors may sit anywhere,
    # and some kernels round differently on unaligned data (their vector body and scalar tail
    # split at other elements). Aligned copies keep the outputs bit-identical to the saved model.
    tensors = {k: t if t.data_ptr() % 64 == 0 else t.clone() for k, t in tensors.items()}
    tensors.update({alias: tensors[name] for alias, name in aliases.items()})
    # Fast path: a timm base built on the meta device (no init, no memory) receives the file's
    # tensors as they are. Ties, and buffers the file does not hold, need a real base.
    fast = model is None and not aliases
    if model is None:
        _check_base(base, path)
        try:
            with torch.device("meta"):
                model = create_base(base)
        except Exception:  # module code that cannot run on meta tensors
            model, fast = create_base(base), False
    _fit(model, plan["kept"], tensors, path, assign=fast)
    if fast and any(t.is_meta for t in model.buffers()):  # non-persistent buffers
        model = create_base(base)
        _fit(model, plan["kept"], tensors, path, assign=False)
    setattr(model, PLAN_ATTR, plan)
    setattr(model, BASE_ATTR, base)
    return model.to(device).eval()


def _fit(model: nn.Module, kept: dict, tensors: dict[str, torch.Tensor], path: Path, assign: bool) -> None:
    """Prune ``model`` to the plan's widths, then load ``tensors`` strictly."""
    try:
        apply(model, kept)
    except (AttributeError, IndexError, RuntimeError) as exc:
        raise ValueError(f"{path}: the saved plan does not fit this model ({type(exc).__name__}: "
                         f"{exc})") from None
    _check_shapes(path, model.state_dict(), tensors)
    model.load_state_dict(tensors, strict=True, assign=assign)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ptsp metadata of the file at ``path``, read from its header alone (cheap), after
    checking that the file is a complete safetensors file written by a compatible ptsp."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist")
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
        start = f.read(min(max(n, 0), 1 << 27)) if n > 0 else b""
    if n <= 0 or not start.lstrip().startswith(b"{"):
        raise ValueError(f"{path} is not a ptsp file (not a safetensors file)")
    if 8 + n > size:
        raise ValueError(f"{path} is truncated: its header needs {8 + n} bytes, the file has {size}")
    try:
        header = json.loads(start)
    except ValueError:
        raise ValueError(f"{path} is corrupted: its header is not valid JSON") from None
    meta = header.pop("__metadata__", None) or {}
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a safetensors file but not a ptsp file (no ptsp metadata); "
                         "load plain weights with safetensors.torch.load_file")
    try:
        version = int(meta["format_version"])
    except (KeyError, ValueError):
        raise ValueError(f"{path} is corrupted: unreadable format version") from None
    if version > FORMAT_VERSION:
        raise ValueError(f"{path} has format version {version}, newer than this ptsp "
                         f"{__version__} reads (up to {FORMAT_VERSION}); upgrade ptsp")
    end = max((t["data_offsets"][1] for t in header.values()), default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated: its tensors need {8 + n + end} bytes, the file "
                         f"has {size}")
    missing = [k for k in ("base", "plan", "aliases", "digest") if k not in meta]
    if missing:
        raise ValueError(f"{path} is corrupted: metadata lacks {', '.join(missing)}")
    return meta


def _unique_tensors(model: nn.Module) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The state dict on the host with each shared tensor stored once, and the names that alias
    a stored one (tied weights): safetensors refuses shared storage."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for name, t in model.state_dict(keep_vars=False).items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape),
               t.stride(), t.dtype) if t.numel() else None
        if key is not None and key in seen:
            aliases[name] = seen[key]
            continue
        if key is not None:
            seen[key] = name
        tensors[name] = t.detach().to("cpu").contiguous()
    return tensors, aliases


def _digest(tensors: Mapping[str, torch.Tensor]) -> str:
    h = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _base_of(model: nn.Module, kept: dict, model_args: Mapping[str, Any] | None,
             tensors: dict[str, torch.Tensor], aliases: dict[str, str]) -> dict:
    """How to recreate the unpruned architecture: a saved base, or one read from the timm model
    and verified by replaying the plan on it."""
    if getattr(model, BASE_ATTR, None) is not None and model_args is None:
        return getattr(model, BASE_ATTR)
    cls = f"{type(model).__module__}.{type(model).__qualname__}"
    cfg = getattr(model, "pretrained_cfg", None)
    name = cfg.get("architecture") if isinstance(cfg, dict) else None
    if not name:
        if model_args:
            raise ValueError("model_args given, but the model is not a timm model (no "
                             "pretrained_cfg['architecture'])")
        return {"timm": None, "class": cls}
    args = _timm_args(model)
    args.update(model_args or {})
    base = {"timm": name, "args": args, "pretrained_cfg": _jsonable(cfg), "class": cls}
    try:
        with torch.device("meta"):
            rebuilt = apply(create_base(base), kept)
    except Exception as exc:
        raise ValueError(f"cannot recreate {name} with {args}: {type(exc).__name__}: {exc}; pass "
                         "the timm.create_model arguments as model_args") from None
    expected = {k: tuple(v.shape) for k, v in rebuilt.state_dict().items()}
    actual = {k: tuple(v.shape) for k, v in tensors.items()}
    actual.update({a: actual[n] for a, n in aliases.items()})
    if expected != actual:
        diff = sorted(set(expected.items()) ^ set(actual.items()))[:3]
        raise ValueError(f"timm.create_model({name!r}, **{args}) with the plan does not give this "
                         f"model's tensors (first differences {diff}); pass the creation "
                         "arguments as model_args")
    return base


def _timm_args(model: nn.Module) -> dict[str, Any]:
    """The ``timm.create_model`` arguments that fix tensor shapes, as far as the model shows them."""
    args: dict[str, Any] = {}
    if isinstance(getattr(model, "num_classes", None), int):
        args["num_classes"] = model.num_classes
    stem = next((m for m in model.modules() if isinstance(m, nn.modules.conv._ConvNd)), None)
    if stem is not None:  # input channels are never pruned
        args["in_chans"] = int(stem.in_channels)
    embed = getattr(model, "patch_embed", None)
    for key in ("img_size", "patch_size"):
        value = getattr(embed, key, None)
        if value is not None:
            args[key] = list(value) if isinstance(value, (tuple, list)) else value
    return args


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


def as_tuples(value: Any) -> Any:
    """JSON lists back to the tuples timm configs and arguments use."""
    return tuple(as_tuples(v) for v in value) if isinstance(value, list) else value


def _check_base(base: dict, path: Path | None) -> None:
    """One clear error when the file's base cannot be created here."""
    import timm

    name = base.get("timm")
    if name is None:
        raise ValueError(f"{path} holds a pruned {base.get('class', 'model')}, not a timm model: "
                         "pass model=<the unpruned architecture> to ptsp.load")
    if not timm.is_model(name):
        raise ValueError(f"{path}: base model {name!r} is unknown to timm {timm.__version__}")


def create_base(base: dict) -> nn.Module:
    """The unpruned timm model an artifact's ``base`` metadata describes, randomly initialised."""
    import timm

    cfg = {k: as_tuples(v) for k, v in (base.get("pretrained_cfg") or {}).items()}
    args = {k: as_tuples(v) for k, v in base.get("args", {}).items()}
    return timm.create_model(base["timm"], pretrained=False, pretrained_cfg_overlay=cfg, **args)


def _check_shapes(path: Path, expected: Mapping[str, torch.Tensor], tensors: Mapping[str, torch.Tensor]) -> None:
    missing = sorted(set(expected) - set(tensors))
    extra = sorted(set(tensors) - set(expected))
    wrong = [(k, tuple(tensors[k].shape), tuple(v.shape)) for k, v in expected.items()
             if k in tensors and tensors[k].shape != v.shape]
    if missing or extra or wrong:
        parts = ([f"missing {missing[:3]}"] if missing else []) + (
            [f"unexpected {extra[:3]}"] if extra else []) + (
            [f"{k} is {a} where the plan gives {b}" for k, a, b in wrong[:3]])
        raise ValueError(f"{path}: tensors do not match the plan: " + "; ".join(parts))

