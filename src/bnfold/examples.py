"""Example inputs that exercise a model: photographs for image inputs, the user's own arrays or images otherwise.

Random Gaussian inputs saturate trained detectors (a sigmoid map near 0 everywhere) and hide or fake errors, so an
input shaped like a batch of RGB images (``N x 3 x H x W``, floating point) is filled with real photographs that
ship with bnfold (``data/photographs.npz``: scikit-image's ``astronaut`` and ``rocket`` sample images, both NASA
photographs in the public domain, resized to 256 x 256), scaled to the size asked for and normalised as vision
models expect (``(x / 255 - mean) / std`` with the ImageNet statistics). Every other input stays random.

Plain numpy (no torch): the ONNX backend uses it too. Reading a folder of images needs Pillow.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np

from .errors import InvalidInputError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

SIZES: tuple[int, ...] = (224, *range(256, 641, 32))
"""Sizes tried for the dynamic dimensions of an input, in order (224, then multiples of 32 up to 640), by the
caller, who keeps the first the original runs on."""

STRIP_HEIGHTS: tuple[int, ...] = (48, 32, 64, 16, 96, 128)
STRIP_WIDTH = 320
"""Then, for models that read strips of text (a recogniser wants 48 x W), each of these heights with this width."""

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp")


@lru_cache(maxsize=1)
def photographs() -> tuple[np.ndarray, ...]:
    """The photographs bnfold ships, as ``H x W x 3`` uint8 arrays."""
    with np.load(Path(__file__).parent / "data" / "photographs.npz") as archive:
        return tuple(archive[name] for name in sorted(archive.files))


def is_image_like(shape: Sequence[int | None]) -> bool:
    """Whether an input of this shape reads as a batch of RGB images: ``N x 3 x H x W`` (sizes may be unknown)."""
    return len(shape) == 4 and shape[1] == 3


def resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Bilinear resize of an ``H x W x C`` array (half-pixel centres, as ``align_corners=False``), in float64."""
    image = image.astype(np.float64)
    for axis, size in ((0, height), (1, width)):
        old = image.shape[axis]
        position = np.clip((np.arange(size) + 0.5) * old / size - 0.5, 0, old - 1)
        low = np.floor(position).astype(int)
        high = np.minimum(low + 1, old - 1)
        weight = (position - low).reshape((-1, 1, 1) if axis == 0 else (1, -1, 1))
        image = np.take(image, low, axis) * (1 - weight) + np.take(image, high, axis) * weight
    return image


def normalise(images: np.ndarray) -> np.ndarray:
    """``N x H x W x 3`` pixel values in 0..255 -> ``N x 3 x H x W``, scaled to 0..1 and normalised (ImageNet)."""
    mean = np.asarray(IMAGENET_MEAN).reshape(1, 3, 1, 1)
    std = np.asarray(IMAGENET_STD).reshape(1, 3, 1, 1)
    return (images.transpose(0, 3, 1, 2) / 255.0 - mean) / std


def photo_batch(shape: Sequence[int], dtype: np.dtype | type = np.float32) -> np.ndarray:
    """A batch of the shipped photographs of ``shape`` (``N x 3 x H x W``), cycling through them over ``N``."""
    batch, _, height, width = (int(d) for d in shape)
    photos = photographs()
    images = np.stack([resize(photos[i % len(photos)], height, width) for i in range(batch)])
    return normalise(images).astype(dtype)


def read_arrays(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of an ``.npz`` (by name) or ``.npy`` file (one array, named ``""``).

    Raises:
        InvalidInputError: the file is missing, not a numpy file, or holds pickled objects.
    """
    file = Path(path)
    if not file.is_file():
        raise InvalidInputError(f"--input {file}: no such file; give an .npz (arrays by input name) or .npy file")
    try:
        loaded = np.load(file, allow_pickle=False)
    except (ValueError, OSError, EOFError) as error:
        raise InvalidInputError(
            f"--input {file} is not a numpy .npz / .npy file of plain arrays ({error}); save it with numpy.savez"
        ) from error
    if isinstance(loaded, np.ndarray):
        return {"": loaded}
    with loaded:
        arrays = {name: loaded[name] for name in loaded.files}
    if not arrays:
        raise InvalidInputError(f"--input {file} holds no arrays")
    return arrays


def image_files(folder: str | os.PathLike[str], limit: int | None = None) -> list[Path]:
    """The image files under ``folder`` (recursively, sorted), at most ``limit``."""
    root = Path(folder)
    if not root.is_dir():
        raise InvalidInputError(f"--data {root}: no such directory; give a folder of images (.jpg, .png, ...)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise InvalidInputError(f"--data {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    return files[:limit] if limit is not None else files


def image_batches(
    folder: str | os.PathLike[str], shape: Sequence[int], dtype: np.dtype | type = np.float32, limit: int | None = 8
) -> list[np.ndarray]:
    """The images of ``folder`` as batches of ``shape`` (``N x 3 x H x W``), resized and normalised like the photos.

    At most ``limit`` images are read; the last batch is filled up by repeating its images.
    """
    if not is_image_like(shape):
        raise InvalidInputError(
            f"--data gives images, for an input of N x 3 x H x W; this model's input has shape {list(shape)}: "
            "pass --input FILE.npz with arrays of its shape instead"
        )
    try:
        from PIL import Image
    except ImportError as error:
        raise InvalidInputError("reading --data images needs Pillow: pip install 'bnfold[data]'") from error
    batch, _, height, width = (int(d) for d in shape)
    images = []
    for file in image_files(folder, limit):
        try:
            with Image.open(file) as image:
                images.append(resize(np.asarray(image.convert("RGB")), height, width))
        except OSError as error:
            raise InvalidInputError(f"--data: {file} is not a readable image ({error})") from error
    batches = []
    for start in range(0, len(images), batch):
        chunk = images[start:start + batch]
        chunk += [chunk[i % len(chunk)] for i in range(batch - len(chunk))]
        batches.append(normalise(np.stack(chunk)).astype(dtype))
    return batches
