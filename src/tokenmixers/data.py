"""Datasets for training and evaluation, checked before training starts.

Four sources, chosen by the ``data`` setting:

* ``"fashion"``: the built-in Fashion-MNIST subset (Zalando Research, MIT licence; shipped in
  ``tokenmixers/datasets``, no download): 28x28 greyscale product photos of 10 classes, padded with
  black to 32x32 RGB images. ``train``: the first 500 images of each class of Fashion-MNIST's
  training split; ``val``: the first 500 of each class of its test split (5,000 images each).
* ``"digits"``: scikit-learn's 1,797 handwritten digits (8x8, shipped with scikit-learn, no
  download), upsampled to RGB images; a fixed split puts every fifth image of each class in
  ``val`` (1,433 train / 364 val).
* a folder with list files, the official layout: ``root/meta/{train,val}.txt`` with lines
  ``relative/path label`` and images under ``root/{train,val}/``.
* a folder with class folders (ImageNet layout): ``root/{train,val}/<class>/*.JPEG``.

Problems are reported before training with a :class:`DataError` naming the file or folder: a
missing root, an empty class folder, a list file naming missing images, labels out of range, fewer
images than one batch. An image that cannot be decoded during training is skipped with a warning
and counted (``ImageDataset.collate`` returns the count with every batch, so it survives worker
processes); the epoch summary reports it. Every image is read by :func:`open_rgb`: 16-bit images are
scaled to 8 bits, and images it cannot convert faithfully (floating-point ones) count as unreadable.
"""
from __future__ import annotations

import contextlib
import itertools
import math
import random
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Sequence, Union

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, DistributedSampler, Sampler

FASHION_FILE = Path(__file__).parent / "datasets" / "fashion_mnist.npz"
FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                   "Ankle boot")
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")


class DataError(ValueError):
    """A dataset that cannot be used; the message names the file or folder at fault."""


def open_rgb(source: Union[str, Path, Image.Image]) -> Image.Image:
    """An image file or PIL image as 8-bit RGB; 16-bit images scaled, not clipped; a :class:`DataError` otherwise."""
    with contextlib.ExitStack() as opened:  # closes the file if we open one, not an image passed in
        try:
            image = source if isinstance(source, Image.Image) else opened.enter_context(Image.open(source))
        except Image.DecompressionBombError as err:
            raise DataError(f"{source} is too large to read safely ({err}); downscale it, or raise "
                            "PIL.Image.MAX_IMAGE_PIXELS if you trust the file") from None
        name = getattr(image, "filename", "") or "the image"
        if image.mode == "F":  # PIL would clip to 0..255; the range of float data is unknown
            raise DataError(f"{name} is a 32-bit floating-point image, which cannot be read as 8-bit RGB "
                            "faithfully; save it as an 8- or 16-bit image")
        if image.mode == "I" or image.mode.startswith("I;16"):  # PIL's convert("RGB") clips these to 255
            values = np.asarray(image).astype(np.int64)
            if values.size and (values.min() < 0 or values.max() > 65535):
                raise DataError(f"{name} has integer values outside 0..65535 ({values.min()}..{values.max()}), "
                                "which cannot be read as 8-bit RGB faithfully; save it as an 8- or 16-bit image")
            return Image.fromarray(np.rint(values / 257).astype(np.uint8)).convert("RGB")
        return image.convert("RGB")


@dataclass
class Sample:
    """One image (a path, or an in-memory image) and its label."""

    source: Any
    label: int


class ImageDataset(Dataset):
    """Images with integer labels; undecodable images are skipped (see :meth:`collate`)."""

    def __init__(self, samples: list[Sample], classes: list[str], transform: Optional[Callable] = None, name: str = "") -> None:
        self.samples, self.classes, self.transform, self.name = samples, classes, transform, name
        self.seed: Optional[int] = None  # per-sample augmentation seeds (deterministic mode)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> Optional[tuple[torch.Tensor, int]]:
        sample = self.samples[index]
        try:
            image = open_rgb(sample.source)
        except (OSError, ValueError) as err:  # PIL.UnidentifiedImageError is an OSError, DataError a ValueError
            warnings.warn(f"skipping unreadable image {sample.source}: {err}", stacklevel=2)
            return None
        if self.transform is None:
            return image, sample.label
        if self.seed is None:
            return self.transform(image), sample.label
        # the augmentation of a sample depends only on (seed, epoch, index), whichever process draws
        # it; the global RNG states are put back so training randomness is not disturbed
        saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
        s = (self.seed * 1_000_003 + self.epoch * 10_007 + index) % 2**31
        random.seed(s)
        np.random.seed(s)
        torch.manual_seed(s)
        try:
            return self.transform(image), sample.label
        finally:
            random.setstate(saved[0])
            np.random.set_state(saved[1])
            torch.set_rng_state(saved[2])

    @staticmethod
    def collate(batch: Sequence[Optional[tuple[torch.Tensor, int]]]) -> tuple[torch.Tensor, torch.Tensor, int]:
        """Stack the readable samples; also return how many were skipped."""
        good = [b for b in batch if b is not None]
        skipped = len(batch) - len(good)
        if not good:
            return torch.empty(0), torch.empty(0, dtype=torch.long), skipped
        images, labels = zip(*good)
        return torch.stack(images), torch.tensor(labels, dtype=torch.long), skipped


# -- sources ----------------------------------------------------------------------------------------


def digits_samples(split: str, image_size: int = 32) -> tuple[list[Sample], list[str]]:
    """scikit-learn's digits as RGB images; every fifth image of each class is validation."""
    from sklearn.datasets import load_digits  # deferred: scikit-learn takes a second to import, only digits needs it

    digits = load_digits()
    samples = []
    seen = [0] * 10
    for pixels, label in zip(digits.images, digits.target):
        is_val = seen[label] % 5 == 0
        seen[label] += 1
        if is_val != (split == "val"):
            continue
        gray = Image.fromarray((pixels * (255.0 / 16.0)).astype(np.uint8), mode="L")
        samples.append(Sample(gray.resize((image_size, image_size), Image.BICUBIC).convert("RGB"), int(label)))
    return samples, [str(i) for i in range(10)]


def fashion_samples(split: str, image_size: int = 32) -> tuple[list[Sample], list[str]]:
    """The built-in Fashion-MNIST subset as RGB images, padded from 28x28 to 32x32 (then resized to
    ``image_size`` if that differs)."""
    if not FASHION_FILE.is_file():
        raise DataError(f"the built-in Fashion-MNIST subset {FASHION_FILE} is missing; reinstall tokenmixers or "
                        "rebuild it with scripts/build_fashion_subset.py")
    with np.load(FASHION_FILE) as arrays:
        images, labels = arrays[f"{split}_images"], arrays[f"{split}_labels"]
    samples = []
    for pixels, label in zip(images, labels):
        gray = Image.fromarray(np.pad(pixels, 2))
        if image_size != 32:
            gray = gray.resize((image_size, image_size), Image.BICUBIC)
        samples.append(Sample(gray.convert("RGB"), int(label)))
    return samples, list(FASHION_CLASSES)


BUILTIN_DATA = {"fashion": fashion_samples, "digits": digits_samples}


def list_file_samples(root: Path, split: str) -> tuple[list[Sample], list[str]]:
    """The official layout: ``root/meta/<split>.txt`` lines ``relative/path label``."""
    list_file = root / "meta" / f"{split}.txt"
    samples, missing = [], []
    for n, line in enumerate(list_file.read_text().splitlines(), 1):
        if not line.strip():
            continue
        parts = line.rsplit(maxsplit=1)
        if len(parts) != 2 or not parts[1].lstrip("-").isdigit():
            raise DataError(f"{list_file}:{n}: expected 'relative/path label', got {line!r}")
        path = root / split / parts[0]
        if not path.is_file():
            missing.append(str(path))
        samples.append(Sample(path, int(parts[1])))
    if missing:
        raise DataError(f"{list_file} names {len(missing)} image(s) that do not exist, e.g. {missing[:3]}")
    if not samples:
        raise DataError(f"{list_file} lists no images; it needs one line per image: 'relative/path label' (the path "
                        f"under {root / split})")
    num = max((s.label for s in samples), default=-1) + 1
    return samples, [str(i) for i in range(num)]


def folder_samples(root: Path, split: str) -> tuple[list[Sample], list[str]]:
    """The ImageNet layout: ``root/<split>/<class>/<image>``, classes sorted by name."""
    split_dir = root / split
    classes = sorted(d.name for d in split_dir.iterdir() if d.is_dir())
    if not classes:
        raise DataError(f"{split_dir} has no class folders (expected {split_dir}/<class>/<image>)")
    samples = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise DataError(f"class folder {split_dir / name} contains no images ({', '.join(IMAGE_EXTENSIONS)})")
        samples += [Sample(p, label) for p in files]
    return samples, classes


def build_dataset(data: str, split: str, transform: Optional[Callable] = None, image_size: int = 32) -> ImageDataset:
    """The ``split`` of a data source (see module docstring), checked for problems."""
    if data in BUILTIN_DATA:
        samples, classes = BUILTIN_DATA[data](split, image_size)
    else:
        if data is None:
            raise DataError("no data given: set data=<folder> (class folders or meta/*.txt list files), data=fashion "
                            "or data=digits")
        root = Path(data).expanduser()
        if not root.is_dir():
            raise DataError(f"data folder {root} does not exist")
        if (root / "meta" / f"{split}.txt").is_file():
            samples, classes = list_file_samples(root, split)
        elif (root / split).is_dir():
            samples, classes = folder_samples(root, split)
        else:
            raise DataError(
                f"{root} has neither {root / 'meta' / (split + '.txt')} (list-file layout) nor a {root / split} "
                "folder of class folders (ImageNet layout)"
            )
        if not samples:
            raise DataError(f"the {split} split of {root} is empty")
    return ImageDataset(samples, classes, transform, name=f"{data}:{split}")


def check_labels(dataset: ImageDataset, num_classes: int) -> None:
    """Every label must be in ``[0, num_classes)``."""
    bad = [s for s in dataset.samples if not 0 <= s.label < num_classes]
    if bad:
        raise DataError(
            f"{dataset.name}: {len(bad)} label(s) outside [0, {num_classes}), e.g. {bad[0].label} for {bad[0].source}; "
            "set num_classes or fix the labels"
        )


# -- samplers ---------------------------------------------------------------------------------------


class EpochSampler(DistributedSampler):
    """torch's ``DistributedSampler`` (shuffled by seed + epoch, tail dropped) that can start mid-epoch.

    Process r takes every world-th sample of a common permutation starting at r, so the samples of
    one global step are the same whatever the number of processes. ``start`` skips the samples an
    interrupted run already consumed.

    With ``groups`` (one group id per sample, e.g. landscape / portrait) every global batch of
    ``block`` samples comes from one group, as mmdetection's ``GroupSampler`` batches images of one
    aspect: each group is shuffled and cut into blocks (its last block filled up with its own
    samples, repeated), and the blocks are shuffled.
    """

    def __init__(self, dataset: Dataset, rank: int = 0, world: int = 1, seed: int = 0, shuffle: bool = True,
                 groups: Optional[Sequence[int]] = None, block: int = 1) -> None:
        super().__init__(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed, drop_last=True)
        self.start = 0
        self.groups, self.block = (list(groups) if groups is not None else None), block
        if self.groups is not None:
            sizes = Counter(self.groups).values()
            self.num_samples = sum(math.ceil(n / block) * block for n in sizes) // world

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """Select the epoch's order and the first sample (per process) to yield."""
        super().set_epoch(epoch)
        self.start = start

    def __len__(self) -> int:
        return self.num_samples - self.start

    def grouped_order(self) -> list[int]:
        """The epoch's permutation of whole single-group blocks."""
        g = torch.Generator().manual_seed(self.seed + self.epoch)
        blocks = []
        for group in sorted(set(self.groups)):  # type: ignore[arg-type]
            members = [i for i, x in enumerate(self.groups) if x == group]  # type: ignore[arg-type]
            order = [members[j] for j in torch.randperm(len(members), generator=g).tolist()]
            order += (order * (self.block // len(order) + 1))[: -len(order) % self.block]
            blocks += [order[k: k + self.block] for k in range(0, len(order), self.block)]
        return [i for b in torch.randperm(len(blocks), generator=g).tolist() for i in blocks[b]]

    def __iter__(self) -> Iterator[int]:
        if self.groups is None:
            return itertools.islice(super().__iter__(), self.start, None)
        return itertools.islice(iter(self.grouped_order()[self.rank::self.num_replicas]), self.start, None)


class ShardSampler(Sampler[int]):
    """Evaluation sharding: process r gets indices r, r + world, ...; every sample exactly once."""

    def __init__(self, size: int, rank: int = 0, world: int = 1) -> None:
        self.indices = list(range(rank, size, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)
