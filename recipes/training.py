"""The one training loop of the recipes (``train``, ``finetune``, ``scratch``, ``dhspg``, ``compare``).

accelerate places the model, shards the data and averages the gradients, so the same code runs in
one process, in several CPU processes (gloo) and on GPUs. With a state folder the loop saves
``accelerator.save_state`` (weights as safetensors) after every epoch and at the end; started again
with the same folder it resumes from the last save and takes exactly the steps an uninterrupted run
would have taken (per-epoch seeded shuffling, per-step seeded augmentation).
"""
from __future__ import annotations

import argparse
import atexit
import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fashion_mnist

import ptsp
from ptsp.counting import count

#: side of the reference models' square inputs (Fashion-MNIST's 28×28 resized)
SIZE = 32


@dataclass
class Data:
    """A labelled image-classification dataset ready for training."""
    train: Dataset                      #: (image tensor, label) items
    test: Dataset
    num_classes: int
    in_chans: int
    #: batch augmentation for tensor data (None when the dataset's transform augments)
    augment: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None
    #: mean and std of the training images (the normalisation baked into the model's data config)
    mean: float | None = None
    std: float | None = None


def fashion_mnist_data(sample: bool = False) -> Data:
    """Fashion-MNIST offline, 1×32×32 and normalised by the training set's statistics; ``sample``
    uses the small committed sample (3000 train / 1000 test images) instead of 60k / 10k."""
    images, labels = fashion_mnist.load("train", sample=sample)
    scaled = images.float().div(255)
    mean, std = scaled.mean().item(), scaled.std().item()
    test_images, test_labels = fashion_mnist.load("test", sample=sample)
    return Data(TensorDataset(fashion_mnist.prepare(images, SIZE, mean, std), labels),
                TensorDataset(fashion_mnist.prepare(test_images, SIZE, mean, std), test_labels),
                10, 1, augment, mean, std)


def datasets_data(source: str, model: torch.nn.Module, train_split: str = "train",
                  test_split: str = "test") -> Data:
    """Any ``datasets`` image-classification dataset (hub name when online, or a local folder),
    preprocessed by the model's timm data config: timm's training transform (random resized crop,
    flip) for training, its eval transform for testing."""
    import timm.data

    cfg = timm.data.resolve_data_config({}, model=model)
    train_tf = timm.data.create_transform(**cfg, is_training=True)
    chans = cfg["input_size"][0]
    mode = {1: "L", 3: "RGB"}[chans]

    def train_transform(image):
        return train_tf(image.convert(mode) if getattr(image, "mode", mode) != mode else image)

    train = ptsp.data.evaluation_loader(source, model, split=train_split, transform=train_transform)
    test = ptsp.data.evaluation_loader(source, model, split=test_split)
    return Data(train.dataset, test.dataset, num_classes(source, train_split), chans, None)


def num_classes(source: str, split: str = "train") -> int:
    """The number of classes of a ``datasets`` dataset's ``label`` column."""
    import datasets

    features = datasets.load_dataset_builder(source).info.features
    if features is None or "label" not in features:
        labels = datasets.load_dataset(source, split=split)["label"]
        return max(labels) + 1
    return features["label"].num_classes


def augment(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and a random crop after 2-pixel padding (tensor images)."""
    flip = (torch.rand(len(x), generator=g) < 0.5).to(x.device)
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    size = x.shape[-1]
    padded = F.pad(x, (2, 2, 2, 2), mode="replicate")
    i, j = torch.randint(0, 5, (2,), generator=g).tolist()
    return padded[..., i:i + size, j:j + size]


def accelerator() -> Accelerator:
    """An accelerator for the recipes: gloo processes on a CPU-only machine, seeded shuffling.
    Each process leaves the process group when its script ends: a rank that exits with gloo's
    threads still running can abort ("terminate called without an active exception")."""
    acc = Accelerator(cpu=not torch.cuda.is_available(),
                      dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True))
    atexit.register(acc.end_training)
    return acc


def loader(dataset: Dataset, batch: int, seed: int, shuffle: bool = True) -> DataLoader:
    """Batches of ``dataset`` (shuffled with ``seed``, incomplete last batch dropped when shuffling)."""
    return DataLoader(dataset, batch_size=batch, shuffle=shuffle, drop_last=shuffle,
                      generator=torch.Generator().manual_seed(seed))


def steps_for(epochs: float, batches: int, acc: Accelerator) -> int:
    """Optimiser steps per process for ``epochs`` passes over ``batches`` batches (all processes
    together make one pass in ``batches / num_processes`` steps)."""
    return max(1, math.ceil(epochs * batches / acc.num_processes))


class _Progress:
    """The step count, saved and restored with the accelerate state."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict:
        return {"step": self.step}

    def load_state_dict(self, state: dict) -> None:
        self.step = int(state["step"])


def fit(acc: Accelerator, model: torch.nn.Module, optimizer: torch.optim.Optimizer, data: DataLoader,
        *, steps: int, schedule: torch.optim.lr_scheduler.LRScheduler | None = None,
        augment: Callable | None = None, label_smoothing: float = 0.0, seed: int = 0,
        state: Path | None = None, save_every: int | None = None,
        describe: Callable[[], str] | None = None) -> dict:
    """Train ``model`` for ``steps`` optimiser steps per process; returns seconds and final loss.

    ``schedule`` is stepped once per step (its length is the per-process step count, so it does
    not depend on the number of processes). ``model`` is moved to the accelerator's device in
    place. With ``state``, the run is saved there after every epoch, every ``save_every`` steps
    and at the end. ``describe`` adds text to the log lines (for example DHSPG's group sparsity).
    """
    progress = _Progress()
    model, optimizer, data = acc.prepare(model, optimizer, data)
    acc.register_for_checkpointing(progress)
    if schedule is not None:
        acc.register_for_checkpointing(schedule)
    if state is not None and (state / "progress.json").exists():
        acc.load_state(str(state / "checkpoint"))
        acc.print(f"resumed from {state} at step {progress.step}/{steps}")
    per_epoch = len(data)
    log_every = max(1, steps // 20)
    loss = torch.tensor(float("nan"))
    t0 = time.perf_counter()
    while progress.step < steps:
        epoch, skip = divmod(progress.step, per_epoch)
        data.set_epoch(epoch)
        model.train()
        for xb, yb in (acc.skip_first_batches(data, skip) if skip else data):
            if augment is not None:
                xb = augment(xb, torch.Generator().manual_seed(seed * 1_000_003 + progress.step))
            loss = F.cross_entropy(model(xb), yb, label_smoothing=label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            acc.backward(loss)
            optimizer.step()
            if schedule is not None:
                schedule.step()
            progress.step += 1
            if progress.step % log_every == 0 or progress.step == steps:
                extra = f", {describe()}" if describe else ""
                acc.print(f"step {progress.step}/{steps}: loss {loss.item():.3f}{extra}", flush=True)
            if state is not None and save_every and progress.step % save_every == 0:
                _save(acc, state, progress.step)
            if progress.step >= steps:
                break
        if state is not None:
            _save(acc, state, progress.step)
    # accelerate's mixed precision wraps the module's own forward in autocast, in place: undo it, so
    # that what the caller evaluates, times or compresses next runs in float32 like every other model
    acc.unwrap_model(model, keep_fp32_wrapper=False)
    return {"seconds": time.perf_counter() - t0, "loss": loss.item(), "steps": steps,
            "epochs": round(steps / per_epoch, 2)}


def _save(acc: Accelerator, state: Path, step: int) -> None:
    acc.save_state(str(state / "checkpoint"))
    if acc.is_main_process:
        (state / "progress.json").write_text(json.dumps({"step": step}))
    acc.wait_for_everyone()


def train(acc: Accelerator, model: torch.nn.Module, data: Data, *, epochs: float, batch: int = 128,
          lr: float = 2e-3, seed: int = 0, steps: int | None = None, state: Path | None = None,
          save_every: int | None = None) -> dict:
    """The reference recipe: AdamW (weight decay 0.05), one-cycle schedule (15% warm-up), label
    smoothing 0.1, the data's augmentation. Reference models, fine-tuning and Scratch-E/B all
    train with it (fine-tuning with a smaller ``lr``)."""
    batches = loader(data.train, batch, seed)
    steps = steps or steps_for(epochs, len(batches), acc)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=lr, total_steps=steps,
                                                   pct_start=0.15)
    return fit(acc, model, optimizer, batches, steps=steps, schedule=schedule, augment=data.augment,
               label_smoothing=0.1, seed=seed, state=state, save_every=save_every)


def top1(model: torch.nn.Module, batches: Iterable, device: torch.device | str | None = None) -> float:
    """Top-1 accuracy (%) of ``model`` over ``(images, labels)`` batches."""
    model.eval()
    device = device or next(model.parameters()).device
    correct = total = 0
    with torch.inference_mode():
        for x, y in batches:
            correct += (model(x.to(device)).argmax(1).cpu() == y).sum().item()
            total += len(y)
    return 100.0 * correct / total


def evaluate(model: torch.nn.Module, data: Data, batch: int = 500) -> float:
    """Top-1 accuracy (%) on the data's whole test split."""
    return top1(model, loader(data.test, batch, 0, shuffle=False))


def checksum(model: torch.nn.Module) -> str:
    """Digest of the parameters: equal on every rank after a correct data-parallel run (BatchNorm
    running statistics are per rank by design, so buffers are left out)."""
    h = hashlib.sha256()
    for t in model.parameters():
        h.update(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()[:16]


def parser(doc: str, lr: float, epochs: float) -> argparse.ArgumentParser:
    """The options every training recipe takes (data, schedule, checkpointing, outputs)."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="fashion-mnist",
                    help="fashion-mnist (offline, 1×32×32), or a datasets name / folder")
    ap.add_argument("--sample", action="store_true",
                    help="Fashion-MNIST: the 3000 + 1000 images committed in calib_data/")
    ap.add_argument("--epochs", type=float, default=epochs)
    ap.add_argument("--steps", type=int, help="train this many steps instead of --epochs")
    ap.add_argument("--batch", type=int, default=128, help="per process")
    ap.add_argument("--lr", type=float, default=lr)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--state", type=Path, help="checkpoint folder: saved every epoch, resumed from")
    ap.add_argument("--save-every", type=int, help="also save the state every this many steps")
    ap.add_argument("--out", type=Path, help="artifact path")
    ap.add_argument("--summary", type=Path, help="also write the run's summary (JSON) here")
    return ap


def data_for(source: str, model: torch.nn.Module, sample: bool = False) -> Data:
    """The training data a recipe names: Fashion-MNIST, or a ``datasets`` source for ``model``."""
    if source == "fashion-mnist":
        return fashion_mnist_data(sample)
    return datasets_data(source, model)


def finish(acc: Accelerator, model: torch.nn.Module, data: Data, stats: dict, out: Path,
           summary_path: Path | None = None, model_args: dict | None = None, **extra) -> dict | None:
    """Rank 0 evaluates ``model``, saves it with ``ptsp.save`` and prints (and optionally writes)
    the run's JSON summary; every rank returns once that is done (others get None)."""
    sums = acc.gather_for_metrics([checksum(model)], use_gather_object=True)
    if len(set(sums)) != 1:
        raise SystemExit(f"ranks disagree on the trained parameters: {sums}")
    summary = None
    if acc.is_main_process:
        model = acc.unwrap_model(model).cpu().eval()
        params, flops = count(model, data.test[0][0][None])
        summary = {"top1": round(evaluate(model, data), 2), "params": params, "flops": flops,
                   "seconds": round(stats["seconds"], 1), "steps": stats["steps"],
                   "epochs": stats["epochs"], "loss": round(stats["loss"], 4),
                   "processes": acc.num_processes, "checksums": sums, "out": str(out), **extra}
        ptsp.save(model, out, overwrite=True, model_args=model_args)
        print(json.dumps(summary), flush=True)
        if summary_path:
            summary_path.write_text(json.dumps(summary))
    acc.wait_for_everyone()
    return summary
