"""Fashion-MNIST, offline: the IDX files of Debian's ``dataset-fashion-mnist`` package (or the
committed sample in ``calib_data/``), as tensors ready for the reference models.

    python recipes/fashion_mnist.py     # rewrite the committed sample calib_data/fashion_mnist/
"""
from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(os.environ.get("FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
SAMPLE = Path(__file__).resolve().parent.parent / "calib_data" / "fashion_mnist"
#: images per split in the committed sample
SAMPLE_SIZES = {"train": 3000, "test": 1000}
CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker",
           "Bag", "Ankle boot")


def _idx(path: Path) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load(split: str, sample: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(uint8 images [N, 28, 28], int64 labels [N]) of the "train" or "test" split; ``sample``
    reads the small committed sample instead of the full dataset."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if sample:
        import datasets

        items = datasets.load_dataset(str(SAMPLE), split=split)
        return (torch.from_numpy(np.stack([np.asarray(im) for im in items["image"]])),
                torch.tensor(items["label"], dtype=torch.long))
    prefix = "train" if split == "train" else "t10k"
    images = ROOT / f"{prefix}-images-idx3-ubyte.gz"
    if not images.exists():
        raise FileNotFoundError(f"{images} not found: install Debian's dataset-fashion-mnist or "
                                "set FASHION_MNIST to a folder with the IDX files")
    return (torch.from_numpy(_idx(images).copy()),
            torch.from_numpy(_idx(ROOT / f"{prefix}-labels-idx1-ubyte.gz").copy()).long())


def prepare(images: torch.Tensor, size: int, mean: float, std: float) -> torch.Tensor:
    """uint8 [N, 28, 28] → normalised float [N, 1, size, size] (bilinear resize)."""
    x = images.float().div(255).unsqueeze(1)
    if size != x.shape[-1]:
        x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x - mean) / std


def dataset(split: str):
    """The full split as a ``datasets`` dataset of PIL images, labels and original positions."""
    import datasets
    from PIL import Image

    images, labels = load(split)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=CLASSES),
                                  "index": datasets.Value("int64")})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(a) for a in images.numpy()], "label": labels.tolist(),
         "index": list(range(len(labels)))}, features=features)


def write_sample() -> None:
    """The committed sample: a seeded draw per split, written by ptsp's calibration-set builder."""
    import ptsp

    for split, n in SAMPLE_SIZES.items():
        print(ptsp.data.save_calibration_set(dataset(split), SAMPLE, n, seed=0, split=split))


if __name__ == "__main__":
    write_sample()
