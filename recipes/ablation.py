"""Ablation of the psp settings that method.md leaves open, on a reference model (Fashion-MNIST).

    python recipes/ablation.py                                   # resnet18, 50% fewer FLOPs
    python recipes/ablation.py --models resnet18 resnet10t --level 0.7
    python recipes/ablation.py --importance l2 --variants defaults "authors()"   # the authors' plan
    python recipes/ablation.py --models resnet10t --cache DIR    # DIR/reference: other reference models
    python recipes/ablation.py --seed 1 --variants defaults augment=cutmix   # another calibration draw

Each row changes one ``ptsp.Reconstruction`` field from the defaults (the first row), plus the
authors' full configuration (``Reconstruction.authors()``); every run of one ``--seed`` uses the same
512 unlabeled training images (drawn with that seed; 0 by default, the accuracy table's draw) and is
evaluated on the 10k test images, so a variant compares with the defaults row of its own draw and
runs at several seeds pair a change over draws (``noise.py`` does the same for methods). Rows are appended to
``recipes/results/ablation.csv`` (re-running resumes); ``ablation.md`` is rewritten from it. The
``importance`` column is the option given to ``ptsp.prune``, ``plan`` the criterion it planned with.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path

import torch

import reference
import table

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"
CSV = RESULTS / "ablation.csv"
FIELDS = ["model", "level", "variant", "top1", "agree", "dense_top1", "seconds", "importance", "plan", "defaults",
          "bf16", "seed"]
#: the defaults a row's variant departs from (rows made before this column existed: empty)
DEFAULTS = table.defaults_line()
#: single changes from the defaults
SINGLE: dict[str, dict] = {
    "penalty=l2": {"penalty": "l2"},
    "penalty=fade": {"penalty": "fade"},
    "phase1_targets=kept": {"phase1_targets": "kept"},
    "phase1_norms=kept": {"phase1_norms": "kept"},
    "balance=both": {"balance": "both"},
    "balance=none": {"balance": "none"},
    "order=registration": {"order": "registration"},
    "bn=train": {"bn": "train"},
    "bn=train+reestimate": {"bn": "train+reestimate"},
    "bn=reestimate": {"bn": "reestimate"},
    "bn=none": {"bn": "none"},
    "lr=1e-3": {"lr": 1e-3},
    "lr=3e-3": {"lr": 3e-3},
    "phase1_lr=3e-4": {"phase1_lr": 3e-4},
    "phase1_lr=1e-3": {"phase1_lr": 1e-3},
    "phase1_lr=1e-2": {"phase1_lr": 1e-2},
    "phase1_passes=5": {"phase1_passes": 5},
    "phase1_passes=10": {"phase1_passes": 10},
    "augment=mixup": {"augment": "mixup"},
    "augment=cutmix": {"augment": "cutmix"},
    "augment=flip": {"augment": "flip"},
    "augment=shift": {"augment": "shift"},
    **{f"relative_lr, lr={name}": {"relative_lr": True, "lr": float(name)} for name in ("3e-3", "1e-2", "3e-2")},
    # one rate for every tensor, as before relative_lr became the default (3e-3: that default)
    **{f"absolute lr={name}": {"relative_lr": False, "lr": float(name)} for name in ("1e-3", "3e-3")},
}
#: the paper's loss choices (the defaults until this ablation favoured the authors' code)
L2_KEPT = {"penalty": "l2", "phase1_targets": "kept"}
#: name → the fields that differ from the defaults
VARIANTS: dict[str, dict] = {
    "defaults": {}, **SINGLE,
    "authors()": dataclasses.asdict(ptsp.Reconstruction.authors()),
    "l2+kept": L2_KEPT,
    "penalty=fade, balance=both": {"penalty": "fade", "balance": "both"},
    # fade shrinks the doomed slices outside Adam, so a lower phase-1 rate no longer slows that
    **{f"penalty=fade, phase1_lr={name}": {"penalty": "fade", "phase1_lr": float(name)}
       for name in ("3e-4", "1e-3", "3e-3")},
    # doomed slices exactly zero at removal, norms over the kept channels: removal changes nothing
    "penalty=fade, phase1_norms=kept": {"penalty": "fade", "phase1_norms": "kept"},
    # remixed batches keep giving new inputs: do more passes pay there?
    "augment=cutmix, passes 60+30": {"augment": "cutmix", "phase1_passes": 60, "phase2_passes": 30},
    "passes 60+30": {"phase1_passes": 60, "phase2_passes": 30},
    # the same number of passes, more of them after removal (where `global` spends all of its)
    "passes 10+20": {"phase1_passes": 10, "phase2_passes": 20},
    # phase 2 at one small rate for every layer (phase 1 as the defaults): the balanced rate
    # lr/(L−k+1) all but freezes the early layers of a 240-module densenet121
    "phase 2 unbalanced, lr=3e-4": {"balance": "none", "lr": 3e-4, "phase1_lr": 3e-3},
    **{f"l2+kept, {name}": {**L2_KEPT, **change} for name, change in SINGLE.items()
       if name not in ("penalty=l2", "phase1_targets=kept")},
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["resnet18"], choices=list(reference.MODELS))
    ap.add_argument("--level", type=float, default=0.5, help="fraction of FLOPs removed")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    ap.add_argument("--importance", default="auto", choices=("auto", "l2", "taylor"))
    ap.add_argument("--seed", type=int, default=0, help="calibration draw (512 training images drawn with it)")
    ap.add_argument("--cache", type=Path, help="folder of other reference models (DIR/reference), "
                    "e.g. longer-trained ones made by accuracy.py --reference-epochs")
    args = ap.parse_args()
    torch.manual_seed(0)
    if args.cache is not None:
        reference.use_cache(args.cache)
    # a retrained reference model (another dense top-1) is another model: it gets its own rows
    done = {(r["model"], r["level"], r["variant"], r["importance"], r["dense_top1"], r.get("defaults") or "",
             r.get("bf16") or "", seed_of(r)) for r in table.rows(CSV)}
    bf16 = "yes" if table.native_bf16() else "no"
    RESULTS.mkdir(exist_ok=True)
    for name in args.models:
        model = reference.load(name)
        test_x, test_labels, train_x = reference.prepared(model)
        calib = ptsp.data.calibration_loader(train_x, 512, 64, seed=args.seed)
        teacher = reference.predictions(model, test_x)
        dense = reference.percent(teacher == test_labels)
        for variant in args.variants:
            if (name, str(args.level), variant, args.importance, f"{dense:.2f}", DEFAULTS, bf16,
                str(args.seed)) in done:
                continue
            settings = ptsp.Reconstruction(**{**VARIANTS[variant], "progress": False})
            t0 = time.perf_counter()
            pruned = ptsp.prune(model, calib, args.level, target="flops", reconstruction=settings,
                                importance=args.importance)
            pred = reference.predictions(pruned, test_x)
            row = {"model": name, "level": str(args.level), "variant": variant,
                   "importance": args.importance, "plan": ptsp.plan_of(pruned)["importance"],
                   "top1": f"{reference.percent(pred == test_labels):.2f}",
                   "agree": f"{reference.percent(pred == teacher):.2f}",
                   "dense_top1": f"{dense:.2f}", "seconds": f"{time.perf_counter() - t0:.0f}",
                   "defaults": DEFAULTS, "bf16": bf16, "seed": str(args.seed)}
            print(row, flush=True)
            table.append(CSV, FIELDS, row)
    write_report()


def seed_of(row: dict) -> str:
    """The calibration draw of a row; rows before the seed column drew with 0."""
    return row.get("seed") or "0"


def write_report() -> None:
    rows = table.rows(CSV)
    lines = ["# psp ablation (Fashion-MNIST reference models)", "",
             "Regenerate: `python recipes/ablation.py` (CPU). Top-1 (%) on the 10k test images after "
             "psp pruning with one `ptsp.Reconstruction` field changed from the defaults; same 512 "
             "unlabeled calibration images for every row; agree: the share of test images on which "
             "the pruned model predicts what the dense model does (rows before that column: –). "
             "importance is the option given to `ptsp.prune` (rows before `importance=\"auto\"` existed say l2; they also predate the fix "
             "that copies teacher outputs later modified in place, commit 3e1e14b), plan the "
             "criterion it planned with; \"vs defaults\" compares with the defaults row of the same "
             "option, reference model and defaults (a retrained reference model, with another dense "
             "top-1, has rows of its own, and so does each set of defaults: the CSV's defaults column "
             "records them). Rows from before that column ran the defaults of their day: every "
             "defaults row but densenet121's at dense 86.60 and mobilenetv3_large_100's at 71.81 "
             "ran `bn=\"reestimate\"`, the default until `\"train+reestimate\"` replaced it, and "
             "all of them `lr=1e-3` and `max_ratio=1.0`. bf16: whether the reconstruction ran under "
             "bfloat16 autocast (a CPU with native bfloat16) or in float32; rows before that column: –, "
             "and a row compares only with defaults rows of its own kind. seed: the calibration draw "
             "(`--seed`; rows before that column drew with 0); a row compares with the defaults row "
             "of its own draw.", "",
             "| model | FLOPs removed | importance | plan | variant | seed | top-1 | vs defaults | agree | dense | bf16 | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    def key(r: dict) -> tuple:
        return (r["model"], r["level"], r["importance"], r["dense_top1"], r.get("defaults") or "",
                r.get("bf16") or "", seed_of(r))

    base = {key(r): float(r["top1"]) for r in rows if r["variant"] == "defaults"}
    for r in rows:
        ref = base.get(key(r))
        delta = f"{float(r['top1']) - ref:+.2f}" if ref is not None else "–"
        lines.append(f"| {r['model']} | {float(r['level']):.0%} | {r['importance']} | {r['plan']} | "
                     f"{r['variant']} | {seed_of(r)} | {r['top1']} | {delta} | {r.get('agree') or '–'} | {r['dense_top1']} | "
                     f"{r.get('bf16') or '–'} | {r['seconds']} |")
    (RESULTS / "ablation.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
