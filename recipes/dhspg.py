"""Train a timm model from scratch on Fashion-MNIST with DHSPG (OTOv2), compress, evaluate, save.

    accelerate launch recipes/dhspg.py --model resnet18 --epochs 4 --target 0.5
    accelerate launch --multi_gpu --num_processes 2 recipes/dhspg.py --model resnet10t --sample --steps 40   # 2 CPU processes
    accelerate launch --multi_gpu --num_processes 8 recipes/dhspg.py --model resnet50 --epochs 30
    python recipes/dhspg.py --dense ...        # the same schedule with the plain optimiser

The same script runs single-process, multi-process on CPU and on GPUs: accelerate places the model,
shards the data and averages gradients, so every rank takes the same DHSPG step and holds the same
parameters and zero groups (checked at the end). Models are the reference architectures
(``recipes/reference.py``: 1×32×32 inputs, 10 classes). SGD with momentum 0.9 and a cosine
schedule; the partition happens after ``--start`` of the steps (default a quarter) and the target
is forced by twice that. Rank 0 logs loss and group sparsity, evaluates full and compressed top-1
on the 10k test images (1000 with ``--sample``), checks the compressed outputs, saves the artifact
and appends a row to ``recipes/results/dhspg.csv``.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from accelerate.utils import set_seed

import reference
import table
import training

import ptsp
from ptsp.counting import count

RESULTS = Path(__file__).resolve().parent / "results"
FIELDS = ["model", "mode", "variant", "target", "group_sparsity", "epochs", "steps", "top1",
          "top1_compressed", "params", "params_compressed", "flops", "flops_compressed",
          "max_rel_diff", "processes", "seconds"]


def train(acc, model: torch.nn.Module, data: training.Data, *, epochs: float, steps: int | None = None,
          batch: int = 128, lr: float = 0.1, variant: str = "sgd", target: float | None = 0.5,
          epsilon: float = 0.0, start: float = 0.25, weight_decay: float = 1e-4, seed: int = 0,
          state: Path | None = None, target_flops: float | None = None) -> tuple[ptsp.OTO | None, dict]:
    """Train ``model`` from its current weights with DHSPG towards ``target`` group sparsity
    (``None``: the plain optimiser with the same schedule), or towards ``target_flops`` fewer
    FLOPs, exactly (no tolerance: the redundant set is what the target needs): cosine schedule,
    partition after ``start`` of the steps. Returns the OTO (None when dense) and the loop's
    statistics."""
    loader = training.loader(data.train, batch, seed)
    steps = steps or training.steps_for(epochs, len(loader), acc)
    momentum = 0.9 if variant == "sgd" else None
    oto = None
    if target is None and target_flops is None:
        optimizer = (torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=weight_decay)
                     if variant == "sgd" else torch.optim.AdamW(model.parameters(), lr, weight_decay=weight_decay))
    else:
        oto = ptsp.OTO(model, data.test[0][0][None])
        by = ({"target_group_sparsity": target} if target_flops is None
              else {"target_flops": target_flops, "tolerance_group_sparsity": 0.0})
        optimizer = oto.dhspg(lr=lr, variant=variant, **by, epsilon=epsilon,
                              start_pruning_steps=max(1, int(start * steps)), first_momentum=momentum,
                              weight_decay=weight_decay)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    describe = None if oto is None else (lambda: f"group sparsity {oto.optimizer.group_sparsity:.3f}")
    stats = training.fit(acc, model, optimizer, loader, steps=steps, schedule=schedule, seed=seed,
                         state=state, describe=describe)
    return oto, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="resnet18", choices=list(reference.MODELS))
    ap.add_argument("--epochs", type=float, default=2)
    ap.add_argument("--steps", type=int, help="train this many steps instead of --epochs")
    ap.add_argument("--batch", type=int, default=128, help="per process")
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--variant", choices=["sgd", "adam", "adamw"], default="sgd")
    ap.add_argument("--target", type=float, default=0.5, help="target group sparsity")
    ap.add_argument("--target-flops", type=float,
                    help="target fraction of FLOPs removed, exactly (instead of --target)")
    ap.add_argument("--epsilon", type=float, default=0.0)
    ap.add_argument("--start", type=float, default=0.25, help="partition after this fraction of steps")
    ap.add_argument("--weight-decay", type=float, default=1e-4)
    ap.add_argument("--dense", action="store_true", help="plain optimiser, same schedule (baseline)")
    ap.add_argument("--sample", action="store_true", help="the committed sample instead of the full data")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", type=Path, help="checkpoint folder: saved every epoch, resumed from")
    ap.add_argument("--out", type=Path, help="artifact path (default recipes/results/dhspg-<model>.safetensors)")
    ap.add_argument("--summary", type=Path, help="also write the run's summary (JSON) here")
    args = ap.parse_args()

    accelerator = training.accelerator()
    set_seed(args.seed)
    data = training.fashion_mnist_data(args.sample)
    test_x, test_labels = data.test.tensors
    model = reference.create(args.model, data.mean, data.std)
    oto, stats = train(accelerator, model, data, epochs=args.epochs, steps=args.steps,
                       batch=args.batch, lr=args.lr, variant=args.variant,
                       target=None if args.dense else args.target, epsilon=args.epsilon,
                       target_flops=None if args.dense else args.target_flops,
                       start=args.start, weight_decay=args.weight_decay, seed=args.seed,
                       state=args.state)
    seconds, steps = stats["seconds"], stats["steps"]
    full = accelerator.unwrap_model(model).eval()
    sums = accelerator.gather_for_metrics([training.checksum(full)], use_gather_object=True)
    sparsities = accelerator.gather_for_metrics(
        [oto.optimizer.group_sparsity if oto else 0.0], use_gather_object=True)
    if not accelerator.is_main_process:
        return
    if len(set(sums)) != 1 or len(set(sparsities)) != 1:
        raise SystemExit(f"ranks disagree: parameters {sums}, sparsity {sparsities}")
    full = full.cpu()
    row = {"model": args.model, "mode": "dense" if args.dense else "dhspg", "variant": args.variant,
           "target": "" if args.dense else args.target if args.target_flops is None
           else f"−{args.target_flops:.0%} FLOPs",
           "epochs": round(steps * args.batch * accelerator.num_processes / len(data.train), 2),
           "steps": steps, "top1": f"{reference.evaluate(full, test_x, test_labels):.2f}",
           "processes": accelerator.num_processes, "seconds": round(seconds)}
    params, flops = count(full, test_x[:1])
    row.update(params=params, flops=flops)
    if oto is not None:
        slim = oto.compress()
        with torch.no_grad():
            a, b = full(test_x[:256]), slim(test_x[:256])
        plan = ptsp.plan_of(slim)
        row.update(group_sparsity=f"{oto.optimizer.group_sparsity:.4f}",
                   top1_compressed=f"{reference.evaluate(slim, test_x, test_labels):.2f}",
                   params_compressed=plan["params"]["after"], flops_compressed=plan["flops"]["after"],
                   max_rel_diff=f"{((a - b).abs().max() / a.abs().max()).item():.2e}")
        out = args.out or RESULTS / f"dhspg-{args.model}.safetensors"
        ptsp.save(slim, out, overwrite=True, model_args=reference.MODELS[args.model] or None)
        print(f"saved {out}")
    print(json.dumps(row), flush=True)
    if args.summary:
        args.summary.write_text(json.dumps({**row, "checksums": sums, "sparsities": sparsities}))
    else:
        path = RESULTS / "dhspg.csv"
        table.append(path, FIELDS, row)
        write_report(path)


def write_report(path: Path) -> None:
    """``dhspg.md`` from the CSV: every run, dense baselines next to DHSPG."""
    rows = table.rows(path)
    lines = ["# DHSPG from scratch on Fashion-MNIST (reference models)", "",
             "Regenerate a row: `python recipes/dhspg.py --model M --epochs E [--dense]` (or under "
             "`accelerate launch`). SGD, momentum 0.9, lr 0.1, cosine schedule, weight decay 1e-4, "
             "batch 128 per process; DHSPG partitions after a quarter of the steps and meets the "
             "target by half. Short runs (`--steps`) check sparsity control only.", "",
             "| model | mode | steps | epochs | target | group sparsity | top-1 | top-1 compressed | "
             "params | FLOPs | max rel diff | processes | seconds |", "|" + "---|" * 13]
    for r in rows:
        params = (f"{int(r['params']) / 1e6:.2f}M → {int(r['params_compressed']) / 1e6:.2f}M"
                  if r.get("params_compressed") else f"{int(r['params']) / 1e6:.2f}M")
        flops = (f"{int(r['flops']) / 1e6:.1f}M → {int(r['flops_compressed']) / 1e6:.1f}M"
                 if r.get("flops_compressed") else f"{int(r['flops']) / 1e6:.1f}M")
        lines.append(f"| {r['model']} | {r['mode']} | {r['steps']} | {r['epochs']} | {r['target']} | "
                     f"{r['group_sparsity']} | {r['top1']} | {r['top1_compressed']} | {params} | "
                     f"{flops} | {r['max_rel_diff']} | {r['processes']} | {r['seconds']} |")
    (RESULTS / "dhspg.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
