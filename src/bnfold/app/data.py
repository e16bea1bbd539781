"""Real image data for training, calibrating and verifying: an ImageFolder on disk, or scikit-learn's digits offline.

Both are normalised with the ImageNet statistics torchvision's models expect. The digits (1,797 images of
8 x 8 pixels, 10 classes) ship inside scikit-learn, so an experiment runs on any machine without a download.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset, Subset, TensorDataset

from ..errors import InvalidInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Splits:
    """A train and a validation set of ``(image, label)`` pairs, with the class names."""

    train: Dataset
    val: Dataset
    classes: list[str]
    source: str


def digits(size: int = 32, val_fraction: float = 0.2, seed: int = 0, limit: int | None = None) -> Splits:
    """scikit-learn's digits scaled to [0, 1], upsampled (bilinear) to 3-channel ``size`` x ``size`` images,
    split stratified and seeded; ``limit`` caps each split (quick runs)."""
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as error:
        raise InvalidInputError("the digits data set needs scikit-learn: pip install 'bnfold[data]'") from error
    bunch = load_digits()
    images = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1) / 16.0
    images = torch.nn.functional.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    mean = torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    images = (images.repeat(1, 3, 1, 1) - mean) / torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1)
    labels = torch.tensor(bunch.target, dtype=torch.int64)
    train_index, val_index = train_test_split(
        list(range(len(labels))), test_size=val_fraction, random_state=seed, stratify=bunch.target
    )
    if limit is not None:
        train_index, val_index = train_index[:limit], val_index[:limit]
    return Splits(
        TensorDataset(images[train_index], labels[train_index]),
        TensorDataset(images[val_index], labels[val_index]),
        [str(c) for c in bunch.target_names],
        "scikit-learn digits",
    )


def _root(path: str | Path, parts: tuple[str, ...]) -> Path:
    root = Path(path)
    layout = " and ".join(f"{root}/{part}/<class>/<image>" for part in parts)
    if not root.is_dir():
        raise InvalidInputError(f"--data {root}: no such directory; give a folder with {' and '.join(f'{p}/' for p in parts)} inside")
    missing = [part for part in parts if not (root / part).is_dir()]
    if missing:
        raise InvalidInputError(
            f"--data {root}: missing {' and '.join(f'{m}/' for m in missing)}; the layout is {layout} (as in ImageNette)"
        )
    return root


def _read_folder(root: Path, part: str, size: int) -> Dataset:
    """torchvision's ``ImageFolder`` of ``root/part``, resized, centre-cropped and normalised for ImageNet models."""
    try:
        from torchvision import datasets, transforms
    except ImportError as error:
        raise InvalidInputError("reading an image folder needs torchvision: pip install 'bnfold[vision]'") from error
    transform = transforms.Compose([
        transforms.Resize(size),
        transforms.CenterCrop(size),
        transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
    ])
    try:
        return datasets.ImageFolder(str(root / part), transform=transform)
    except (FileNotFoundError, RuntimeError) as error:  # ImageFolder's "Found no valid file for the classes ..."
        raise InvalidInputError(f"--data {root}: {error}") from error


def _sample(dataset: Dataset, limit: int | None, generator: torch.Generator) -> Dataset:
    """At most ``limit`` items, a seeded sample across classes (ImageFolder lists the images class by class)."""
    if limit is None:
        return dataset
    return Subset(dataset, torch.randperm(len(dataset), generator=generator)[:limit].tolist())  # type: ignore[arg-type]


def validation_folder(path: str | Path, size: int = 224, limit: int | None = None) -> Dataset:
    """The ``val/`` part of an ImageFolder data set, alone: comparing two models needs no training images."""
    root = _root(path, ("val",))
    return _sample(_read_folder(root, "val", size), limit, torch.Generator().manual_seed(0))


def image_folder(path: str | Path, size: int = 224, limit: int | None = None) -> Splits:
    """An ImageFolder data set with ``train/`` and ``val/`` sub-folders (ImageNette layout), for training."""
    root = _root(path, ("train", "val"))
    train = _read_folder(root, "train", size)
    val = _read_folder(root, "val", size)
    if train.classes != val.classes:  # type: ignore[attr-defined]
        raise InvalidInputError(f"--data {root}: train/ has classes {train.classes} but val/ has {val.classes}")  # type: ignore[attr-defined]
    classes = list(train.classes)  # type: ignore[attr-defined]
    generator = torch.Generator().manual_seed(0)
    train, val = _sample(train, limit, generator), _sample(val, limit, generator)
    return Splits(train, val, classes, f"image folder {root}")
