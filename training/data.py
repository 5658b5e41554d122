"""Karpathy-split datasets (``dataset_flickr30k.json``, ``dataset_coco.json``, the generated world) and transforms.

A Karpathy JSON holds ``images[]`` with ``filename``, ``split`` (``train``/``val``/``test``/``restval``) and
``sentences[].raw``; MSCOCO entries also carry ``filepath`` (``train2014``/``val2014``), which is joined to the
image root when present. ``restval`` counts as training data, as in the authors' setup.
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from torch.utils.data import Dataset

from model.errors import HATError
from model.preprocess import IMAGENET_MEAN, IMAGENET_STD, load_image, preprocess_image

SPLIT_ALIASES = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}


class DatasetError(HATError, ValueError):
    """A dataset file that cannot be read or has no usable entries."""


@dataclass(frozen=True)
class Entry:
    """One image and its captions."""

    path: Path
    captions: tuple[str, ...]


def read_karpathy(json_path: str | Path, image_root: str | Path, split: str) -> list[Entry]:
    """Entries of ``split`` (``train`` includes ``restval``) in file order."""
    json_path, image_root = Path(json_path), Path(image_root)
    if split not in SPLIT_ALIASES:
        raise DatasetError(f"split must be one of {sorted(SPLIT_ALIASES)}, got {split!r}")
    try:
        data = json.loads(json_path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DatasetError(f"cannot read {json_path}: {exc}") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise DatasetError(f"{json_path} is not a Karpathy split file (no 'images' list)")
    entries = []
    for index, item in enumerate(data["images"]):
        if item.get("split") not in SPLIT_ALIASES[split]:
            continue
        try:
            captions = tuple(s["raw"] for s in item["sentences"])
            path = image_root / item.get("filepath", "") / item["filename"]
        except (KeyError, TypeError) as exc:
            raise DatasetError(f"{json_path}: image entry {index} lacks {exc}") from exc
        entries.append(Entry(path, captions))
    if not entries:
        raise DatasetError(f"{json_path} has no images in split {split!r}")
    return entries


class TrainTransform:
    """The authors' train transform: RandomResizedCrop + horizontal flip, then ImageNet normalisation.

    ``flip=False`` and a narrower ``scale`` suit worlds whose captions state left/right and whose objects
    must stay in view (the demo preset).
    """

    def __init__(self, image_size: int, scale: tuple[float, float] = (0.08, 1.0), flip: bool = True) -> None:
        from torchvision import transforms as T

        steps = [T.RandomResizedCrop(image_size, scale=scale, interpolation=T.InterpolationMode.BICUBIC)]
        if flip:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
        self.transform = T.Compose(steps)

    def __call__(self, image) -> torch.Tensor:
        return self.transform(image)


class EvalTransform:
    """The authors' eval transform (:func:`model.preprocess_image`)."""

    def __init__(self, image_size: int) -> None:
        self.image_size = image_size

    def __call__(self, image) -> torch.Tensor:
        return preprocess_image(image, self.image_size)


class ImageDataset(Dataset):
    """Images of a split through a transform: ``dataset[i]`` -> ``(pixels [3, S, S], i)``."""

    def __init__(self, entries: list[Entry], transform) -> None:
        self.entries = entries
        self.transform = transform

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.transform(load_image(self.entries[index].path)), index


def caption_table(entries: list[Entry]) -> tuple[list[str], torch.Tensor]:
    """All captions in order and, for each, the index of its image: (texts, ``[N_captions]`` long)."""
    texts, owner = [], []
    for index, entry in enumerate(entries):
        texts.extend(entry.captions)
        owner.extend([index] * len(entry.captions))
    return texts, torch.tensor(owner, dtype=torch.long)


def pick_captions(entries: list[Entry], rng: random.Random) -> list[int]:
    """For an epoch: one random caption per image, as an index into :func:`caption_table`'s list.

    Sampling per image (not per caption) keeps every batch free of duplicate images, whose captions
    would otherwise be counted as negatives of each other by the hardest-negative loss.
    """
    picks, offset = [], 0
    for entry in entries:
        picks.append(offset + rng.randrange(len(entry.captions)))
        offset += len(entry.captions)
    return picks
