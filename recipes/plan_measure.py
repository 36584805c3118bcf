"""How each candidate plan of ``importance="auto"`` looks to measures of its distortion.

For one cached reference model and each FLOPs level: each criterion's plan with BatchNorm
re-estimated (``method="bn"``, the model ``auto`` compares), its top-1 on the test images, and on the
512 calibration images its relative squared logit error, the same error after the best
non-negative rescaling of the logits (scale-free), KL divergence from the dense model's
predictions, agreement with them and the ratio of its logits' mean norm to the dense model's:
whether a measure can prefer a plan that re-estimates worse. With ``--psp``, also the top-1 of
``method="psp"`` planned with each criterion: which plan is better once reconstructed, what
``auto`` should pick. With ``--short P``, also each plan's scale-free error (on the calibration
images) and test top-1 after a short reconstruction (``method="global"`` with ``phase2_passes=P``):
whether a plan's error once partly reconstructed ranks the plans as the full reconstruction does.
Each run appends its table to ``recipes/results/plan_measure.md`` with the command that produced it.

    python recipes/plan_measure.py --model mobilenetv3_large_100 --levels 0.3 0.5 0.7 --psp --cache DIR
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import reference

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, choices=list(reference.MODELS))
    parser.add_argument("--levels", nargs="+", type=float, default=[0.5])
    parser.add_argument("--psp", action="store_true", help="also prune with method='psp' from each plan")
    parser.add_argument("--short", type=int, help="also measure each plan after this many passes of method='global'")
    parser.add_argument("--cache", type=Path, help="folder of the reference models (DIR/reference)")
    args = parser.parse_args()
    if args.cache is not None:
        reference.use_cache(args.cache)
    model = reference.load(args.model)
    test_x, test_y, train_x = reference.prepared(model)
    calib = ptsp.data.calibration_loader(train_x, 512, 64, seed=0)
    batches = ptsp.data.read_batches(calib)
    with torch.no_grad():
        dense = torch.cat([model(x) for x in batches]).float()
    dense_top1 = reference.evaluate(model, test_x, test_y)
    short = [f"error after {args.short} global passes", f"top-1 after {args.short} global passes"] if args.short else []
    header = ["level", "plan", "test top-1", "psp top-1", "relative error", "scale-free error", "KL", "agreement",
              "logit scale", *short]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    quiet = ptsp.Reconstruction(progress=False)
    for level in args.levels:
        for criterion in ptsp.pruning.AUTO:
            pruned = ptsp.prune(model, calib, level, method="bn", target="flops", importance=criterion,
                                reconstruction=quiet)
            with torch.no_grad():
                out = torch.cat([pruned(x) for x in batches]).float()
            error = (out - dense).pow(2).sum() / dense.pow(2).sum()
            kl = F.kl_div(out.log_softmax(1), dense.log_softmax(1), log_target=True, reduction="batchmean")
            agree = reference.percent(out.argmax(1) == dense.argmax(1))
            scale = out.norm(dim=1).mean() / dense.norm(dim=1).mean()
            psp = "–"
            if args.psp:
                psp = f"{reference.evaluate(ptsp.prune(model, calib, level, target='flops', importance=criterion, reconstruction=quiet), test_x, test_y):.2f}"
            after = ""
            if args.short:
                briefly = ptsp.prune(model, calib, level, method="global", target="flops", importance=criterion,
                                     reconstruction=ptsp.Reconstruction(progress=False, phase2_passes=args.short))
                with torch.no_grad():
                    out_short = torch.cat([briefly(x) for x in batches]).float()
                after = (f" {ptsp.pruning.scale_free_error(out_short, dense):.3f} |"
                         f" {reference.evaluate(briefly, test_x, test_y):.2f} |")
            rows.append(f"| −{level:.0%} | {criterion} | {reference.evaluate(pruned, test_x, test_y):.2f} | "
                        f"{psp} | {error:.3f} | {ptsp.pruning.scale_free_error(out, dense):.3f} | {kl:.3f} | "
                        f"{agree:.1f}% | {scale:.2f} |{after}")
            print(rows[-1], flush=True)
    out_md = RESULTS / "plan_measure.md"
    text = out_md.read_text() if out_md.exists() else (
        "# The candidate plans of importance=\"auto\" under several distortion measures\n\n"
        "Each plan with BatchNorm re-estimated (method=\"bn\"); the measures on the 512 calibration "
        "images against the dense model.\n")
    levels = " ".join(f"{level:g}" for level in args.levels)
    cmd = (f"python recipes/plan_measure.py --model {args.model} --levels {levels}"
           f"{' --psp' if args.psp else ''}{f' --short {args.short}' if args.short else ''}"
           f"{' --cache DIR' if args.cache else ''}")
    out_md.write_text(text + f"\n## {args.model} (dense {dense_top1:.2f})\n\n"
                      f"`{cmd}` ({time.strftime('%Y-%m-%d')})\n\n" + "\n".join(rows) + "\n")


if __name__ == "__main__":
    main()
