"""Peak host memory of the psp pipeline (CPU): resnet50 at 224×224, calibration batch 64.

    python recipes/bench_memory.py                           # batch 64, and micro-batches of 16
    python recipes/bench_memory.py --model convnext_tiny --micro-batch 0 8

Each setting runs in a fresh process (peak resident memory is per process): ``ptsp.prune`` with
``method="psp"`` on one batch of random images, one pass per phase (more passes repeat the same
work; they add only the teacher's activations kept between passes, which
``Reconstruction.teacher_cache_gb`` bounds and 0 turns off). Peak = the process's maximum resident
set size, which includes the interpreter, torch, the dense model, the teacher, the student and the
pruned copy. Writes ``recipes/results/memory.md``.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"


def child(model_name: str, size: int, batch: int, micro_batch: int) -> None:
    import timm
    import torch

    import ptsp

    torch.manual_seed(0)
    model = timm.create_model(model_name, pretrained=False).eval()
    images = torch.randn(batch, 3, size, size)
    settings = ptsp.Reconstruction(phase1_passes=1, phase2_passes=1, progress=False,
                                   micro_batch=micro_batch or None)
    t0 = time.perf_counter()
    ptsp.prune(model, ptsp.data.calibration_loader(images, batch, batch), 0.5, target="flops",
               reconstruction=settings)
    seconds = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    print(json.dumps({"peak": peak, "seconds": seconds}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet50")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--micro-batch", type=int, nargs="+", default=[0, 16], help="0: whole batches")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args.model, args.size, args.batch, args.micro_batch[0])
        return
    rows = []
    for mb in args.micro_batch:
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--size",
                              str(args.size), "--batch", str(args.batch), "--micro-batch", str(mb)],
                             capture_output=True, text=True, check=True)
        result = json.loads(out.stdout.strip().splitlines()[-1])
        rows.append(f"| {args.model} | {args.size}×{args.size} | {args.batch} | {mb or 'whole batch'} | "
                    f"**{result['peak'] / 2**30:.2f}** | {result['seconds']:.0f} |")
        print(rows[-1], flush=True)
    lines = ["# Peak memory of ptsp.prune (psp, CPU)", "",
             f"Regenerate: `python recipes/bench_memory.py --model {args.model} --size {args.size} "
             f"--batch {args.batch} --micro-batch {' '.join(map(str, args.micro_batch))}` "
             f"({time.strftime('%Y-%m-%d')}). Peak resident memory of a fresh process running "
             "`ptsp.prune(..., method='psp')` (one pass per phase) on one calibration batch; "
             "target for resnet50 at batch 64: under 12 GB.", "",
             "| model | input | batch | micro_batch | peak GiB | seconds |", "|---|---|---|---|---|---|"]
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "memory.md").write_text("\n".join(lines + rows) + "\n")
    print("\n".join(lines + rows))


if __name__ == "__main__":
    main()
