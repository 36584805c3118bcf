"""Fine-tune a pruned artifact: the retraining baseline (inherited weights, short schedule, small lr).

    accelerate launch recipes/finetune.py resnet18-psp.safetensors --epochs 1
    accelerate launch --multi_gpu --num_processes 2 recipes/finetune.py pruned.safetensors --sample --steps 20

The recipe is the reference one (``training.train``) at a tenth of its learning rate. The result is
saved as an artifact with the same plan (reload with ``ptsp.load``); the summary gives top-1 before
and after.
"""
from __future__ import annotations

from pathlib import Path

from accelerate.utils import set_seed

import training

import ptsp


def main(argv: list[str] | None = None) -> dict | None:
    ap = training.parser(__doc__, lr=2e-4, epochs=1)
    ap.add_argument("artifact", type=Path, help="a pruned model saved by ptsp")
    args = ap.parse_args(argv)
    acc = training.accelerator()
    set_seed(args.seed)
    model = ptsp.load(args.artifact)
    data = training.data_for(args.data, model, args.sample)
    before = training.evaluate(model, data)
    stats = training.train(acc, model, data, epochs=args.epochs, batch=args.batch, lr=args.lr,
                           seed=args.seed, steps=args.steps, state=args.state,
                           save_every=args.save_every)
    out = args.out or args.artifact.with_name(f"{args.artifact.stem}-finetuned.safetensors")
    return training.finish(acc, model, data, stats, out, args.summary, top1_before=round(before, 2))


if __name__ == "__main__":
    main()
