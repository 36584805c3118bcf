"""Round trip over the public coverage list: prune, ``ptsp.save``, ``ptsp.load`` in a fresh
process, identical outputs.

    python recipes/roundtrip.py                          # every model that passes coverage
    python recipes/roundtrip.py --models resnet18 vit_tiny_patch16_224

Stage 1 (worker processes): each model is created as in ``coverage.py`` (pretrained=False, 96x96
where it runs), pruned data-free at 50% of its prunable channels, saved with the creation
arguments it needed, and its outputs on two inputs kept. Stage 2 (new worker processes, which
never saw the model object): each artifact is loaded and must give bit-identical outputs.
Resumable: ``recipes/results/roundtrip.csv`` keeps the rows; ``roundtrip.md`` is rewritten.
"""
from __future__ import annotations

import argparse
import csv
import os
import sys
import tempfile
from pathlib import Path

import coverage

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "roundtrip.csv"
FIELDS = ["model", "status", "input", "params_m", "file_mb", "load_s", "error"]
WORK = Path(os.environ.get("PTSP_ROUNDTRIP_DIR", Path(tempfile.gettempdir()) / "ptsp-roundtrip"))


def save_one(name: str) -> dict:
    """Prune and save ``name``; its inputs and outputs go next to the artifact."""
    import warnings

    import torch

    import ptsp

    torch.manual_seed(0)
    try:
        model, x, kwargs = coverage.create(name)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pruned = ptsp.prune(model, None, 0.5, method="magnitude", example_inputs=x[:1])
            path = ptsp.save(pruned, WORK / f"{name}.safetensors", overwrite=True,
                             model_args=kwargs or None)
        with torch.no_grad():
            torch.save({"x": x, "y": pruned(x)}, WORK / f"{name}.pt")
    except Exception as exc:
        return {"model": name, "status": "error", "error": "save: " + coverage.error_text(exc)}
    return {"model": name, "status": "saved", "input": "x".join(map(str, x.shape[1:])),
            "params_m": round(sum(p.numel() for p in pruned.parameters()) / 1e6, 2),
            "file_mb": round(path.stat().st_size / 1e6, 2)}


def load_one(name: str) -> dict:
    """Load ``name``'s artifact (in a process that did not make it) and compare its outputs."""
    import time

    import torch

    import ptsp

    try:
        t0 = time.perf_counter()
        model = ptsp.load(WORK / f"{name}.safetensors")
        seconds = time.perf_counter() - t0
        ref = torch.load(WORK / f"{name}.pt")
        with torch.no_grad():
            y = model(ref["x"])
    except Exception as exc:
        return {"model": name, "status": "error", "error": "load: " + coverage.error_text(exc)}
    same = isinstance(y, torch.Tensor) and y.shape == ref["y"].shape and torch.equal(y, ref["y"])
    error = "" if same else f"max abs difference {(y - ref['y']).abs().max().item():.3g}"
    return {"model": name, "status": "pass" if same else "differ", "load_s": round(seconds, 3),
            "error": error}


def _rows() -> dict[str, dict]:
    if not CSV.exists():
        return {}
    with CSV.open() as f:
        return {r["model"]: r for r in csv.DictReader(f)}


def write_report(rows: list[dict]) -> str:
    passed = [r for r in rows if r["status"] == "pass"]
    loads = sorted(float(r["load_s"]) for r in passed if r.get("load_s"))
    median = loads[len(loads) // 2] if loads else float("nan")
    summary = (f"{len(passed)}/{len(rows)} models round-trip with bit-identical outputs; "
               f"median ptsp.load {median:.2f} s (1 thread).")
    lines = ["# Round trip: prune, save, load in a fresh process", "",
             "Regenerate: `python recipes/roundtrip.py [--models NAMES]` (resumable). Models: the "
             "ones named (the README's run names the public list, `tests/test_groups.py::TIMM_MODELS`), "
             "by default every model passing `coverage.md`; created as in coverage, pruned "
             "data-free at 50% of prunable channels.", "", summary, ""]
    bad = [r for r in rows if r["status"] != "pass"]
    if bad:
        lines += ["## Failures", ""] + coverage.reasons(bad, "error") + [""]
    lines += ["## All models", ""] + coverage.table(rows, FIELDS[:-1])
    (RESULTS / "roundtrip.md").write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="default: every model that passes coverage.csv")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model and stage")
    args = ap.parse_args()
    if args.models:
        names = args.models
    else:
        with (RESULTS / "coverage.csv").open() as f:
            names = [r["model"] for r in csv.DictReader(f) if r["status"] == "pass"]
    done = _rows()
    todo = [n for n in names if n not in done]
    print(f"{len(names)} models, {len(done)} done, {len(todo)} to run", flush=True)
    WORK.mkdir(parents=True, exist_ok=True)
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for chunk in (todo[i:i + 40] for i in range(0, len(todo), 40)):
            saved = {r["model"]: r for r in coverage.run_pool(chunk, args.workers, args.timeout, save_one)}
            loaded = {r["model"]: r for r in coverage.run_pool(
                [n for n in chunk if saved[n]["status"] == "saved"], args.workers, args.timeout, load_one)}
            for name in chunk:
                row = {**saved[name], **loaded.get(name, {})}
                writer.writerow({k: row.get(k, "") for k in FIELDS})
                f.flush()
                done[name] = row
                print(f"{name:45s} {row['status']:7s} {row.get('error', '') or ''}", flush=True)
                for suffix in (".safetensors", ".pt"):
                    (WORK / f"{name}{suffix}").unlink(missing_ok=True)
    print(write_report([done[n] for n in names if n in done]))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
