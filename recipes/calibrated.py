"""The calibrated pipeline over timm: ``ptsp.prune`` with method="psp" (importance "auto", so
Taylor's gradients too) end to end on one model of each timm family.

    python recipes/calibrated.py                          # one model per timm family
    python recipes/calibrated.py --models levit_128s efficientformer_l1

The coverage benchmark checks the groups and the surgery of every model; this one checks what the
calibrated methods add: hooks on every layer, gradient passes through the teacher and student,
Taylor importance, the phase losses. Each family's model is its smallest that passes
``coverage.csv``, created as there (pretrained=False, 96x96 where it runs), pruned at 30% fewer
FLOPs from 4 random images in 2 batches, 1 pass per phase (the passes, not the accuracy, are under
test). Status: ``pass`` (finite outputs of the dense model's shape, FLOPs target met on the
counted model), ``refused`` (ptsp's own clear ``ValueError``: the model has too few prunable
channels for the target), ``bad`` (ran, but an output or the target is wrong), ``error``,
``timeout``. Resumable: ``recipes/results/calibrated.csv`` keeps the rows; ``calibrated.md`` is
rewritten over every family (and any model named), so a rerun of a few models keeps the rest.
"""
from __future__ import annotations

import argparse
import csv
import math
import os
import sys
import traceback
from pathlib import Path

import coverage

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "calibrated.csv"
FIELDS = ["model", "family", "status", "input", "importance", "flops_kept", "phase1_loss",
          "phase2_loss", "seconds", "notes"]
RATIO = 0.3


def families() -> dict[str, list[str]]:
    """timm family (module) → its models."""
    import timm

    return {family: timm.list_models(module=family) for family in timm.list_modules()}


def smallest_passing(members: dict[str, list[str]]) -> list[str]:
    """Each family's smallest model passing coverage.csv."""
    with (RESULTS / "coverage.csv").open() as f:
        size = {r["model"]: float(r["params_m"]) for r in csv.DictReader(f) if r["status"] == "pass"}
    return sorted(min(passing, key=lambda m: (size[m], m)) for models in members.values()
                  if (passing := [m for m in models if m in size]))


def run_one(name: str) -> dict:
    import time
    import warnings

    import torch

    import ptsp

    torch.manual_seed(0)
    row: dict = {"model": name}
    try:
        model, x, _ = coverage.create(name)
        x = torch.cat([x, torch.randn_like(x)])
        row["input"] = "x".join(map(str, x.shape[1:]))
        t0 = time.perf_counter()
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            pruned = ptsp.prune(model, [x[:2], x[2:]], RATIO, target="flops", reconstruction=ptsp.Reconstruction(
                phase1_passes=1, phase2_passes=1, progress=False))
        row["seconds"] = round(time.perf_counter() - t0, 2)
        with torch.no_grad():
            out, ref = pruned(x), model(x)
    except ValueError as exc:  # ptsp's own refusal (too few prunable channels): the message is the result
        ours = Path(traceback.extract_tb(exc.__traceback__)[-1].filename).parent.name == "ptsp"
        return {**row, "status": "refused" if ours else "error", "notes": coverage.error_text(exc)}
    except Exception as exc:
        return {**row, "status": "error", "notes": coverage.error_text(exc)}
    plan = ptsp.plan_of(pruned)
    kept = plan["flops"]["after"] / plan["flops"]["before"]
    losses = {p: plan["report"][p]["loss"][-1] for p in ("phase1", "phase2") if p in plan["report"]}
    good = (isinstance(out, torch.Tensor) and out.shape == ref.shape and bool(torch.isfinite(out).all())
            and kept <= 1 - RATIO + 0.005 and all(map(math.isfinite, losses.values())))
    notes = sorted({str(w.message).split("(")[0].strip() for w in caught if "ptsp" in str(w.message)})
    return {**row, "status": "pass" if good else "bad", "importance": plan["importance"],
            "flops_kept": round(kept, 4), **{f"{p}_loss": f"{v:.4g}" for p, v in losses.items()},
            "notes": "; ".join(notes)[:300]}


def write_report(rows: list[dict], command: str) -> str:
    count = {s: sum(r["status"] == s for r in rows) for s in ("pass", "refused", "bad", "error", "timeout")}
    summary = (f"{count['pass']}/{len(rows)} families pass (psp end to end, FLOPs target met); "
               f"{count['refused']} refused with ptsp's clear error (too few prunable channels); bad: {count['bad']}; "
               f"errors: {count['error']}; timeouts: {count['timeout']}.")
    lines = ["# The calibrated pipeline over timm", "",
             f"Regenerate: `{command}` (resumable; a new timm version adds families). One model per "
             f"timm family, its smallest passing `coverage.md`, created as there; `ptsp.prune` with "
             f"the defaults (psp, importance auto) at {RATIO:.0%} fewer FLOPs from 4 random images "
             "in 2 batches, 1 pass per phase, 1 thread. flops_kept: counted FLOPs after / before; "
             "losses: each phase's last mean loss (untrained models: a layer whose outputs are "
             "nearly silent makes large relative errors); notes: ptsp's warnings (channels left "
             "unpruned).", "", summary, ""]
    bad = [r for r in rows if r["status"] != "pass"]
    if bad:
        lines += ["## Not passing", ""] + coverage.reasons(bad, "notes") + [""]
    lines += ["## All families", ""] + coverage.table(rows, FIELDS)
    (RESULTS / "calibrated.md").write_text("\n".join(lines) + "\n")
    return summary


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="*", help="default: one model per timm family")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=300.0, help="seconds per model")
    args = ap.parse_args()
    members = families()
    family_of = {m: family for family, models in members.items() for m in models}
    default = smallest_passing(members)
    names = args.models or default
    done = {}
    if CSV.exists():
        with CSV.open() as f:
            done = {r["model"]: r for r in csv.DictReader(f)}
    todo = [n for n in names if n not in done]
    print(f"{len(names)} models, {len(done)} done, {len(todo)} to run", flush=True)
    new = not CSV.exists()
    with CSV.open("a", newline="") as f:
        writer = csv.DictWriter(f, FIELDS)
        if new:
            writer.writeheader()
        for row in coverage.run_pool(todo, args.workers, args.timeout, run_one):
            row["family"] = family_of.get(row["model"], "")
            writer.writerow({k: row.get(k, "") for k in FIELDS})
            f.flush()
            done[row["model"]] = row
            print(f"{row['model']:45s} {row['status']:8s} {row.get('notes', '') or ''}", flush=True)
    shown = list(dict.fromkeys(default + names))  # a partial rerun keeps the others
    print(write_report([done[n] for n in shown if n in done], "python recipes/calibrated.py"))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
