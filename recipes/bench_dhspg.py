"""Cost of a DHSPG training step against a plain SGD step on the same model (CPU).

    python recipes/bench_dhspg.py                          # resnet18, 1×32×32, batch 128
    python recipes/bench_dhspg.py --model resnet50 --rounds 9

A step is forward, backward and optimiser step. DHSPG is timed in each of its regimes: before the
partition (the plain base step plus bookkeeping), while the penalty is active (group norms, the
adaptive λ and the half-space test every step: the most expensive regime), and after the target
(zero groups held at zero). Each round times ``--steps`` steps of SGD and then of each regime,
and the table shows the median over rounds of each ratio, so slow drifts of a shared machine
cancel. Writes ``recipes/results/dhspg_overhead.md``.
"""
from __future__ import annotations

import argparse
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import reference

import ptsp

RESULTS = Path(__file__).resolve().parent / "results"


def timed(model, optimizer, x, y, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
        loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return (time.perf_counter() - t0) / steps


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=list(reference.MODELS))
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=7)
    args = ap.parse_args()
    torch.manual_seed(0)
    x = torch.randn(args.batch, 1, reference.SIZE, reference.SIZE)
    y = torch.randint(0, 10, (args.batch,))

    def model():
        torch.manual_seed(0)
        return reference.create(args.model, 0.0, 1.0).train()

    sgd_model = model()
    sgd = torch.optim.SGD(sgd_model.parameters(), lr=0.01, momentum=0.9)
    regimes = {}
    m = model()  # before the partition: never reached within the benchmark
    regimes["before partition"] = (m, ptsp.OTO(m, x[:1]).dhspg(lr=0.01, first_momentum=0.9,
                                                               start_pruning_steps=10**9))
    m = model()  # penalty active for good: no deadline, no projection
    regimes["penalty active"] = (m, ptsp.OTO(m, x[:1]).dhspg(lr=0.01, first_momentum=0.9,
                                                             start_pruning_steps=1, pruning_steps=math.inf))
    m = model()  # target reached at step 2, then zero groups held
    regimes["after target"] = (m, ptsp.OTO(m, x[:1]).dhspg(lr=0.01, first_momentum=0.9,
                                                           start_pruning_steps=1, pruning_steps=1))
    for m, opt in regimes.values():
        timed(m, opt, x, y, 3)  # warm up, and cross the partition / reach the target
    timed(sgd_model, sgd, x, y, 3)
    ratios: dict[str, list[float]] = {k: [] for k in regimes}
    base_times = []
    for _ in range(args.rounds):
        base = timed(sgd_model, sgd, x, y, args.steps)
        base_times.append(base)
        for name, (m, opt) in regimes.items():
            ratios[name].append(timed(m, opt, x, y, args.steps) / base)
    assert regimes["after target"][1].target_reached
    lines = ["# DHSPG step vs SGD step", "",
             f"Regenerate: `python recipes/bench_dhspg.py --model {args.model} --batch {args.batch} "
             f"--steps {args.steps} --rounds {args.rounds}` ({time.strftime('%Y-%m-%d')}; CPU, "
             f"{torch.get_num_threads()} threads). {args.model} (1×{reference.SIZE}×{reference.SIZE}, "
             f"10 classes), batch {args.batch}; a step is forward + backward + optimiser step; "
             f"median over {args.rounds} rounds of (DHSPG step / SGD step), target ≤ 1.15.", "",
             f"Plain SGD step (momentum 0.9): median {statistics.median(base_times) * 1e3:.1f} ms.", "",
             "| DHSPG regime | step / SGD step (median) | all rounds |", "|---|---|---|"]
    for name, values in ratios.items():
        lines.append(f"| {name} | **{statistics.median(values):.3f}** | "
                     + ", ".join(f"{v:.2f}" for v in values) + " |")
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "dhspg_overhead.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
