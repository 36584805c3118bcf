"""Calibration data: build a seeded, model-ready loader from common sources and read any loader
back as validated image batches.

Reconstruction makes many passes over a few hundred images, so the batches are read once, checked
(shape, dtype, finite values) before any work starts, and kept in host memory.
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Mapping

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

#: dict keys searched, in order, for the images of a batch given as a mapping
IMAGE_KEYS = ("pixel_values", "image", "images", "img", "x", "input", "inputs")


def calibration_loader(source: Any, num_samples: int = 512, batch_size: int = 64,
                       model: nn.Module | None = None, *, seed: int = 0, split: str = "train",
                       transform: Any = None) -> DataLoader:
    """A loader of ``num_samples`` unlabeled images drawn without replacement (seeded) from
    ``source``, preprocessed for ``model``.

    ``source`` may be a folder (of images, optionally in class subfolders, or of parquet files
    such as :func:`save_calibration_set` writes), a ``datasets`` dataset (or its hub name, when
    online), a torch ``Dataset`` of images or ``(image, label)`` pairs, or a tensor of model-ready
    images ``[N, C, H, W]``. PIL images are preprocessed with the model's timm data config (eval
    transform) unless ``transform`` is given; tensors are used as they are.
    """
    return _loader(source, num_samples, batch_size, model, seed, split, transform, labels=False)


def evaluation_loader(source: Any, model: nn.Module | None = None, *, split: str = "test",
                      batch_size: int = 64, num_samples: int | None = None, seed: int = 0,
                      transform: Any = None) -> DataLoader:
    """A loader of ``(images, labels)`` from a labelled ``source`` (the forms of
    :func:`calibration_loader`, with labels), preprocessed for ``model``: every item in order, or
    a seeded sample of ``num_samples``."""
    return _loader(source, num_samples, batch_size, model, seed, split, transform, labels=True)


def save_calibration_set(source: Any, path: str | os.PathLike, num_samples: int = 512, *,
                         seed: int = 0, split: str = "train") -> str:
    """Draw ``num_samples`` items without replacement (seeded) from a folder of images or a
    ``datasets`` dataset (or hub name) and write them, images and labels as they are, to
    ``path/<split>.parquet``: a small calibration set that :func:`calibration_loader` reads from
    ``path`` offline (for example 1024 ImageNet training images)."""
    import datasets

    dataset = _as_dataset(source, split)
    if not isinstance(dataset, datasets.Dataset):
        raise TypeError("save_calibration_set takes a folder of images or a datasets dataset "
                        f"(or its name), not a {type(dataset).__name__}")
    order = _sample(len(dataset), num_samples, seed)
    os.makedirs(path, exist_ok=True)
    out = os.path.join(path, f"{split}.parquet")
    tmp = out + ".tmp"
    dataset.select(sorted(order)).to_parquet(tmp)  # source order: faster reads, stable files
    os.replace(tmp, out)
    return out


def _loader(source: Any, num_samples: int | None, batch_size: int, model: nn.Module | None,
            seed: int, split: str, transform: Any, labels: bool) -> DataLoader:
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset = _as_dataset(source, split)
    if labels and isinstance(dataset, torch.Tensor):
        raise TypeError("a tensor holds no labels: pass a dataset of (image, label) pairs")
    order = list(range(len(dataset))) if num_samples is None else _sample(len(dataset), num_samples, seed)
    if transform is None and not isinstance(source, torch.Tensor):
        transform = image_transform(model)
    return DataLoader(_Items(dataset, order, transform, labels), batch_size=batch_size, shuffle=False)


def _sample(size: int, num_samples: int, seed: int) -> list[int]:
    """``num_samples`` distinct positions out of ``size``, the same for the same seed."""
    if isinstance(num_samples, bool) or not isinstance(num_samples, int) or num_samples < 1:
        raise ValueError(f"num_samples must be a positive integer, got {num_samples!r}")
    if size < num_samples:
        raise ValueError(f"the source has {size} images, fewer than the num_samples={num_samples} "
                         "asked for")
    return torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:num_samples].tolist()


def image_transform(model: nn.Module | None):
    """timm's eval transform for ``model`` (its data config), with images converted to the number
    of channels the model takes."""
    import timm.data

    if model is None:
        raise ValueError("pass model= (its timm data config preprocesses the images) or transform=")
    cfg = timm.data.resolve_data_config({}, model=model)
    chans = cfg["input_size"][0]
    for key in ("mean", "std"):  # a 3-channel config on a 1-channel model: one grey statistic
        if len(cfg[key]) != chans:
            cfg[key] = (sum(cfg[key]) / len(cfg[key]),) * chans
    base = timm.data.create_transform(**cfg)
    mode = {1: "L", 3: "RGB"}.get(chans)

    def transform(image: Any) -> torch.Tensor:
        if mode is not None and getattr(image, "mode", mode) != mode:
            image = image.convert(mode)
        return base(image)
    return transform


class _Items(Dataset):
    """The chosen items of a dataset: transformed images, with their labels if asked."""

    def __init__(self, dataset: Any, indices: list[int], transform: Any, labels: bool) -> None:
        self.dataset, self.indices, self.transform, self.labels = dataset, indices, transform, labels

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        item = self.dataset[self.indices[i]]
        image = _image_of(item)
        image = self.transform(image) if self.transform is not None else image
        return (image, _label_of(item)) if self.labels else image


def _as_dataset(source: Any, split: str) -> Any:
    if isinstance(source, torch.Tensor):
        if source.dim() != 4:
            raise ValueError(f"a tensor of calibration images must be [N, C, H, W], got shape "
                             f"{tuple(source.shape)}")
        return source
    if isinstance(source, (str, os.PathLike)):
        import datasets

        path = os.path.expanduser(os.fspath(source))
        if not os.path.exists(path) and (os.path.isabs(path) or path.startswith(".")):
            # a hub name is "owner/name": a path like this one can only be a missing folder
            raise ValueError(f"image source {path!r}: no such folder")
        if os.path.exists(path) and not os.path.isdir(path):
            raise ValueError(f"image source {path!r} is a file; pass a folder of images, "
                             "a datasets dataset or a tensor")
        try:  # a local folder: datasets infers images (imagefolder) or parquet, and the splits
            if os.path.isdir(path):
                found = datasets.load_dataset(path)
                if split not in found and len(found) == 1:  # one split: whatever it is named
                    return next(iter(found.values()))
                return found[split]
            return datasets.load_dataset(path, split=split)
        except Exception as exc:
            what = "folder" if os.path.isdir(path) else "datasets name"
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ValueError(f"image source {path!r}: cannot read split {split!r} of this {what}: "
                             f"{reason}") from exc
    if hasattr(source, "__getitem__") and hasattr(source, "__len__"):
        return source
    raise TypeError(f"unsupported calibration source of type {type(source).__name__}: pass a "
                    "folder, a datasets dataset or name, a torch Dataset or a tensor")


def _image_of(item: Any) -> Any:
    """The image in a dataset item: the item itself, the first of a tuple, or a dict's image."""
    if isinstance(item, (tuple, list)):
        return item[0]
    if isinstance(item, Mapping):
        for key in IMAGE_KEYS:
            if key in item:
                return item[key]
        raise ValueError(f"no image in a dataset item with keys {sorted(item)}; expected one of "
                         f"{IMAGE_KEYS}")
    return item


def _label_of(item: Any) -> int:
    """The label in a dataset item: the second of a pair, or a dict's label."""
    if isinstance(item, (tuple, list)) and len(item) > 1:
        return int(item[1])
    if isinstance(item, Mapping):
        for key in ("label", "labels"):
            if key in item:
                return int(item[key])
    raise ValueError("evaluation needs labelled items: (image, label) pairs or dicts with 'label'")


def read_batches(loader: Iterable) -> list[torch.Tensor]:
    """Every batch of images in ``loader`` (tensors, ``(images, labels)`` or dicts), on the host,
    after checking they form a usable calibration set; raises ``ValueError`` naming the problem."""
    if isinstance(loader, torch.Tensor):
        raise TypeError("calib_loader must be an iterable of batches; wrap a tensor of images "
                        "with ptsp.data.calibration_loader(images)")
    batches: list[torch.Tensor] = []
    try:
        iterator = iter(loader)
    except TypeError:
        raise TypeError(f"calib_loader must be an iterable of batches, got "
                        f"{type(loader).__name__}") from None
    for i, batch in enumerate(iterator):
        images = _image_of(batch)
        if not isinstance(images, torch.Tensor):
            raise ValueError(f"calibration batch {i} holds a {type(images).__name__}, not a tensor "
                             "of images (preprocess them, e.g. with ptsp.data.calibration_loader)")
        if not images.is_floating_point():
            raise ValueError(f"calibration batch {i} has dtype {images.dtype}; expected float "
                             "images (normalised as the model expects)")
        if images.dim() < 2:
            raise ValueError(f"calibration batch {i} has shape {tuple(images.shape)}; expected "
                             "[batch, ...]")
        if batches and images.shape[1:] != batches[0].shape[1:]:
            raise ValueError(f"calibration batch {i} has images of shape {tuple(images.shape[1:])}, "
                             f"batch 0 has {tuple(batches[0].shape[1:])}")
        if not torch.isfinite(images).all():
            raise ValueError(f"calibration batch {i} contains NaN or Inf values")
        batches.append(images.detach().cpu())
    if not batches or sum(len(b) for b in batches) == 0:
        raise ValueError("the calibration loader is empty")
    return batches
