"""Train any timm model with the reference recipe and save it as a ptsp artifact (dense).

    accelerate launch recipes/train.py --model resnet18 --epochs 2                 # Fashion-MNIST, offline
    accelerate launch --multi_gpu --num_processes 2 recipes/train.py --model resnet10t --sample --steps 20
    accelerate launch recipes/train.py --model resnet50 --pretrained --data food101 --epochs 5   # online
    accelerate launch recipes/train.py ... --state runs/r18     # checkpoint per epoch; rerun to resume

``--data fashion-mnist`` (the default) reads the IDX files of Debian's dataset-fashion-mnist at
1×32×32; anything else is a ``datasets`` name or local folder with ``train`` and ``test`` splits,
preprocessed with the model's timm data config (timm's training transform for training). The recipe
is ``training.train``: AdamW, one-cycle schedule, label smoothing. Rank 0 evaluates top-1 on the
test split, saves the model with ``ptsp.save`` (reload it with ``ptsp.load``) and prints a JSON
summary.
"""
from __future__ import annotations

from pathlib import Path

import timm
from accelerate.utils import set_seed

import reference
import training


def main(argv: list[str] | None = None) -> dict | None:
    ap = training.parser(__doc__, lr=2e-3, epochs=2)
    ap.add_argument("--model", default="resnet18", help="timm model name")
    ap.add_argument("--pretrained", action="store_true", help="start from timm's pretrained weights")
    args = ap.parse_args(argv)
    acc = training.accelerator()
    set_seed(args.seed)
    if args.data == "fashion-mnist":
        if args.pretrained:
            ap.error("--pretrained needs 3-channel images: pass --data with a datasets source")
        data = training.fashion_mnist_data(args.sample)
        model = reference.create(args.model, data.mean, data.std)
        model_args = reference.MODELS.get(args.model) or None  # what reference.create adds
    else:
        model = timm.create_model(args.model, pretrained=args.pretrained,
                                  num_classes=training.num_classes(args.data))
        data = training.datasets_data(args.data, model)
        model_args = None
    stats = training.train(acc, model, data, epochs=args.epochs, batch=args.batch, lr=args.lr,
                           seed=args.seed, steps=args.steps, state=args.state,
                           save_every=args.save_every)
    return training.finish(acc, model, data, stats, args.out or Path(f"{args.model}.safetensors"),
                           args.summary, model_args, arch=args.model)


if __name__ == "__main__":
    main()
