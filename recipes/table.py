"""Results tables of the recipes: CSV files that grow a row at a time, so runs resume."""
from __future__ import annotations

import csv
import sys
from pathlib import Path


def rows(path: Path) -> list[dict]:
    """Every row of ``path`` (none if it does not exist yet)."""
    if not path.exists():
        return []
    with path.open() as f:
        return list(csv.DictReader(f))


def defaults() -> dict:
    """Today's defaults of ``ptsp.Reconstruction`` and of ``ptsp.prune``'s max_ratio: what a
    results row records it ran with, so a change of default shows which rows are stale."""
    import dataclasses
    import inspect

    import ptsp

    return {**dataclasses.asdict(ptsp.Reconstruction()),
            "max_ratio": inspect.signature(ptsp.prune).parameters["max_ratio"].default}


def defaults_line() -> str:
    """Today's defaults as one ``key=value`` line, the column of a results row that keeps each
    set of defaults apart (progress bars and the teacher cache change no result)."""
    return " ".join(f"{k}={v}" for k, v in defaults().items()
                    if k not in ("progress", "teacher_cache_gb"))


def native_bf16() -> bool:
    """Whether the pipeline's autocast runs bfloat16 on this CPU (only where it is native): 3-4x
    the speed, and other arithmetic, so results and timings of the two kinds are kept apart."""
    import torch

    from ptsp.reconstruction import autocast

    return isinstance(autocast(torch.device("cpu")), torch.autocast)


def cpu(threads: int | None = None) -> str:
    """The CPU's model name, whether it computes bfloat16 natively and the threads torch uses
    (``threads``: this many instead), recorded with timed rows: seconds and latencies compare
    only on one machine at one thread count."""
    import platform

    import torch

    name, flags = platform.processor() or platform.machine(), []
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        lines = cpuinfo.read_text().splitlines()
        name = next((ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name")), name)
        flags = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
    # a virtual CPU's model name hides whether it has AMX, which doubles its bfloat16 speed
    amx = " with AMX" if "amx_bf16" in flags else ""
    threads = threads or torch.get_num_threads()
    bf16 = ", native bfloat16" if native_bf16() else ""
    return f"{name}{amx}{bf16}, {threads} thread{'s' if threads > 1 else ''}"


def settings(plan: dict) -> dict:
    """The settings of ``defaults()`` a pruned model ran with, read off its plan, as a row records
    them (empty where the method has none: magnitude does no reconstruction)."""
    reconstruction = plan["reconstruction"] or {}
    return {"bn": str(reconstruction.get("bn", "")), "lr": _lr(reconstruction),
            "max_ratio": str(plan["max_ratio"])}


def _lr(reconstruction: dict) -> str:
    """The learning rate as a row records it: "0.03 relative" when it is a fraction of each
    tensor's RMS (``relative_lr``), so that rows of an absolute rate, the kind every row made
    before the flag existed ran, stay apart from it."""
    lr = str(reconstruction.get("lr", ""))
    return f"{lr} relative" if reconstruction.get("relative_lr") else lr


def stale(row: dict, fields: tuple[str, ...], recorded_later: dict) -> bool:
    """Whether ``row`` ran with other values of ``fields`` than today's defaults; ``recorded_later``
    holds what rows written before a field was recorded ran with."""
    now = defaults()
    now["lr"] = _lr(now)
    return any((row.get(f) or recorded_later.get(f, "")) != str(now[f]) for f in fields)


def append(path: Path, fields: list[str], row: dict) -> None:
    """Add ``row`` to ``path``, writing the header first when the file is new. A file with other
    columns (written by an earlier version of the recipe) is first rewritten with ``fields``."""
    if path.exists():
        with path.open() as f:
            if next(csv.reader(f), None) != fields:
                rewrite(path, fields, rows(path))
    new = not path.exists()
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fields)
        if new:
            writer.writeheader()
        writer.writerow({k: row.get(k, "") for k in fields})


def pyplot():
    """matplotlib's pyplot for writing plot files, or None (with a note) when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing (pip install -e '.[bench]'): no plot", file=sys.stderr)
        return None
    return plt


def rewrite(path: Path, fields: list[str], rows: list[dict]) -> None:
    """Replace ``path`` with ``rows`` (written to a temporary file first: nothing lost on failure)."""
    tmp = path.with_suffix(path.suffix + ".tmp")
    with tmp.open("w", newline="") as f:
        writer = csv.DictWriter(f, fields)
        writer.writeheader()
        writer.writerows({k: r.get(k, "") for k in fields} for r in rows)
    tmp.replace(path)
