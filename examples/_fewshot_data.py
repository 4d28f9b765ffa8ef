"""Few-shot episodes from scikit-learn's handwritten digits (8x8, 10 digits, 1797 images, offline).

The class pool follows Omniglot practice: every digit rotated by 0, 90, 180 and 270 degrees is a
class of its own. Digits 0, 1 and 8 look (almost) the same upside down, so for them only the 0 and
90 degree rotations are kept (a 1-nearest-neighbour classifier tells "1" from "1 rotated by 180"
only 79% of the time, "8" 82%, "0" 89%; every other pair of classes is separated at >= 95%).

The split is by digit, so no meta-test digit is seen during meta-training in any orientation:

* meta-train: digits 0-5 -> 2 + 2 + 4 * 4 = 20 classes
* meta-test:  digits 6-9 -> 4 + 4 + 2 + 4 = 14 classes

An N-way K-shot episode draws N classes of a split, K support and Q query images per class, and
labels the classes 0..N-1 in random order.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

ROTATIONS = (0, 1, 2, 3)  # multiples of 90 degrees
SYMMETRIC_DIGITS = (0, 1, 8)  # nearly invariant under a 180-degree rotation: keep rotations 0 and 1 only
SPLIT_DIGITS = {"train": (0, 1, 2, 3, 4, 5), "test": (6, 7, 8, 9)}


@dataclass
class ClassPool:
    """The images of one split, grouped by class.

    Attributes:
        split: ``"train"`` or ``"test"``.
        images: one tensor ``[n_c, 1, 8, 8]`` per class (pixel values in [0, 1]).
        names: ``"digit@degrees"`` per class, e.g. ``"6@90"``.
    """

    split: str
    images: list
    names: list

    @property
    def num_classes(self) -> int:
        return len(self.images)

    @property
    def min_class_size(self) -> int:
        return min(int(x.shape[0]) for x in self.images)


def load_class_pool(split: str) -> ClassPool:
    """The meta-train (``"train"``) or meta-test (``"test"``) classes of the rotated-digits pool.

    Args:
        split: ``"train"`` (digits 0-5, 20 classes) or ``"test"`` (digits 6-9, 14 classes).

    Returns:
        A ``ClassPool``.

    Example:
        >>> pool = load_class_pool("test")
        >>> pool.num_classes, pool.names[:3]
        (14, ['6@0', '6@90', '6@180'])
    """
    if split not in SPLIT_DIGITS:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = digits.images.astype(np.float32) / 16.0  # [1797, 8, 8]
    targets = digits.target
    out, names = [], []
    for digit in SPLIT_DIGITS[split]:
        base = images[targets == digit]  # [n, 8, 8]
        rotations = ROTATIONS[:2] if digit in SYMMETRIC_DIGITS else ROTATIONS
        for r in rotations:
            rotated = np.ascontiguousarray(np.rot90(base, r, axes=(1, 2)))
            out.append(torch.from_numpy(rotated).unsqueeze(1))  # [n, 1, 8, 8]
            names.append(f"{digit}@{90 * r}")
    return ClassPool(split, out, names)


def check_episode_shape(pool: ClassPool, n_way: int, k_shot: int, n_query: int) -> None:
    """Raise ``ValueError`` (naming the argument) if episodes of this shape cannot be drawn from ``pool``."""
    for name, value, low in (("n_way", n_way, 2), ("k_shot", k_shot, 1), ("n_query", n_query, 1)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < low:
            raise ValueError(f"{name} must be >= {low}, got {value}")
    if n_way > pool.num_classes:
        raise ValueError(f"n_way={n_way} exceeds the {pool.num_classes} classes of the meta-{pool.split} split "
                         f"(rotated digits {SPLIT_DIGITS[pool.split]})")
    if k_shot + n_query > pool.min_class_size:
        raise ValueError(f"k_shot + n_query = {k_shot + n_query} exceeds the smallest class of the meta-{pool.split} "
                         f"split ({pool.min_class_size} images)")


def sample_episodes(pool: ClassPool, num_tasks: int, n_way: int, k_shot: int, n_query: int,
                    generator: torch.Generator) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """Draw ``num_tasks`` N-way K-shot episodes, stacked over tasks.

    Args:
        pool: the classes to draw from.
        num_tasks: T.
        n_way, k_shot, n_query: N, K and Q (query images per class).
        generator: the random source (fixed seed -> the same episodes).

    Returns:
        ``(xs [T, N*K, 1, 8, 8], ys [T, N*K])``, ``(xq [T, N*Q, 1, 8, 8], yq [T, N*Q])``; labels are
        int64 in 0..N-1, grouped by class (K, then Q, consecutive images per label).
    """
    check_episode_shape(pool, n_way, k_shot, n_query)
    if not isinstance(num_tasks, int) or num_tasks < 1:
        raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    xs, xq = [], []
    for _ in range(num_tasks):
        classes = torch.randperm(pool.num_classes, generator=generator)[:n_way]  # label i <- classes[i]
        sup, qry = [], []
        for c in classes.tolist():
            imgs = pool.images[c]
            pick = torch.randperm(imgs.shape[0], generator=generator)[:k_shot + n_query]
            sup.append(imgs[pick[:k_shot]])
            qry.append(imgs[pick[k_shot:]])
        xs.append(torch.cat(sup))
        xq.append(torch.cat(qry))
    ys = torch.arange(n_way).repeat_interleave(k_shot).expand(num_tasks, -1).contiguous()
    yq = torch.arange(n_way).repeat_interleave(n_query).expand(num_tasks, -1).contiguous()
    return (torch.stack(xs), ys), (torch.stack(xq), yq)
