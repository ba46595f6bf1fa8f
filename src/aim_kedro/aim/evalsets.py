"""Labelled image sets for probing: webdataset shards with a ``cls`` field, or ImageFolder trees.

A ``LabelledSet`` is a lazy, re-iterable handle that yields ``(key, image_bytes, label)`` one
image at a time, so a set the size of ImageNet-1k never sits in memory; only features do.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from aim_kedro.io.shards import ERROR_KEY, IMAGE_EXTENSIONS, ShardSet, image_bytes

logger = logging.getLogger(__name__)

LabelledItem = tuple[str, bytes, int]

FOLDER_IMAGE_SUFFIXES = tuple(f".{ext}" for ext in IMAGE_EXTENSIONS)


@dataclass
class LabelledSet:
    """A named, re-iterable source of ``(key, image_bytes, label)`` with its class names."""

    name: str
    source: str
    classes: list[str]
    _iterate: Callable[[], Iterator[LabelledItem]] = field(repr=False)
    size: int | None = None

    def __iter__(self) -> Iterator[LabelledItem]:
        return self._iterate()

    @property
    def num_classes(self) -> int:
        """Number of classes (the class index range is ``0 .. num_classes - 1``)."""
        return len(self.classes)

    def __len__(self) -> int:
        if self.size is None:
            self.size = sum(1 for _ in self)
        return self.size


def parse_cls(value: bytes | str | int) -> int:
    """The integer class index stored in a sample's ``cls`` member (text such as ``"7"``)."""
    if isinstance(value, int):
        return value
    text = value.decode("utf-8") if isinstance(value, bytes | bytearray) else str(value)
    return int(text.strip())


def iter_labelled_shards(shards: ShardSet) -> Iterator[LabelledItem]:
    """Yield ``(key, image_bytes, label)`` from shards whose samples carry an image and ``cls``.

    Damaged records and samples without an image or a ``cls`` are skipped with a warning.
    """
    skipped = 0
    for sample in shards:
        image = image_bytes(sample)
        if ERROR_KEY in sample or image is None or "cls" not in sample:
            skipped += 1
            continue
        yield str(sample["__key__"]), image[1], parse_cls(sample["cls"])
    if skipped:
        logger.warning(
            "%s: skipped %d samples without an image or a cls field", shards.path, skipped
        )


def from_shards(
    shards: ShardSet | str, name: str = "shards", num_classes: int | None = None
) -> LabelledSet:
    """A ``LabelledSet`` over a shard folder (or an open ``ShardSet``) with a ``cls`` field.

    The class count is ``num_classes`` when given, else one more than the largest label seen
    (one pass over the labels, images are not decoded).
    """
    shard_set = shards if isinstance(shards, ShardSet) else ShardSet.open(str(shards))
    size = None
    if num_classes is None:
        labels = [label for _, _, label in iter_labelled_shards(shard_set)]
        if not labels:
            raise ValueError(
                f"{name}: no sample with an image and a 'cls' field in {shard_set.path}"
            )
        num_classes = max(labels) + 1
        size = len(labels)
    return LabelledSet(
        name=name,
        source=shard_set.path,
        classes=[str(i) for i in range(num_classes)],
        _iterate=lambda: iter_labelled_shards(shard_set),
        size=size,
    )


def image_folder_classes(root: str) -> list[str]:
    """Class names of an ImageFolder tree: its sub-folders, sorted (index = position)."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(d.name for d in os.scandir(root) if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise ValueError(f"image folder {root} has no class sub-folders")
    return classes


def image_folder_files(root: str, classes: list[str]) -> list[tuple[str, int]]:
    """``(path, class index)`` of every image under ``root/<class>/`` for ``classes``, sorted."""
    files: list[tuple[str, int]] = []
    for index, name in enumerate(classes):
        class_dir = os.path.join(root, name)
        for dirpath, dirnames, filenames in os.walk(class_dir):
            dirnames.sort()
            for fname in sorted(filenames):
                if fname.lower().endswith(FOLDER_IMAGE_SUFFIXES):
                    files.append((os.path.join(dirpath, fname), index))
    return files


def from_image_folder(root: str, name: str = "image_folder") -> LabelledSet:
    """A ``LabelledSet`` over ``root/<class>/<image>`` (torchvision ImageFolder layout).

    Give a test split the training set's index with :func:`with_classes` (or :func:`labelled_pair`).
    """
    classes = image_folder_classes(root)
    files = image_folder_files(root, classes)
    if not files:
        raise ValueError(
            f"image folder {root} holds no images ({', '.join(FOLDER_IMAGE_SUFFIXES)})"
        )

    def iterate() -> Iterator[LabelledItem]:
        for path, label in files:
            with open(path, "rb") as f:
                yield os.path.relpath(path, root), f.read(), label

    return LabelledSet(name=name, source=root, classes=classes, _iterate=iterate, size=len(files))


def with_classes(labelled: LabelledSet, classes: list[str]) -> LabelledSet:
    """``labelled`` with its labels re-indexed into ``classes`` by class name (a test split
    whose folder lacks some of the training set's classes shares the training set's index)."""
    if labelled.classes == list(classes):
        return labelled
    missing = sorted(set(labelled.classes) - set(classes))
    if missing:
        raise ValueError(f"{labelled.source} has classes not in the training set: {missing}")
    index = [list(classes).index(name) for name in labelled.classes]

    def iterate() -> Iterator[LabelledItem]:
        for key, data, label in labelled:
            yield key, data, index[label]

    return LabelledSet(name=labelled.name, source=labelled.source, classes=list(classes),
                       _iterate=iterate, size=labelled.size)


def labelled_pair(
    train: LabelledSet | ShardSet | str,
    test: LabelledSet | ShardSet | str,
    num_classes: int | None = None,
) -> tuple[LabelledSet, LabelledSet]:
    """A train/test pair with one class index: labelled sets (e.g. ImageFolder trees) as they
    are, shard sets (or folders) with a ``cls`` field through :func:`from_shards`.

    Shards without ``num_classes`` have both splits' labels scanned once to count the classes;
    a labelled test set is re-indexed into the training set's classes by name.
    """
    if isinstance(train, LabelledSet) != isinstance(test, LabelledSet):
        raise ValueError(
            f"probe train and test sets are of different kinds ({type(train).__name__}, "
            f"{type(test).__name__}): point both entries at shards or both at image folders"
        )
    if isinstance(train, LabelledSet) and isinstance(test, LabelledSet):
        return train, with_classes(test, train.classes)
    train_set = from_shards(train, name="train", num_classes=num_classes)
    test_set = from_shards(test, name="test", num_classes=num_classes)
    if num_classes is None:
        count = max(train_set.num_classes, test_set.num_classes)
        train_set.classes = test_set.classes = [str(i) for i in range(count)]
    return train_set, test_set


def open_labelled_pair(
    kind: str,
    train: ShardSet | str,
    test: ShardSet | str,
    num_classes: int | None = None,
) -> tuple[LabelledSet, LabelledSet]:
    """Open a train/test pair of one ``kind`` (``shards`` or ``image_folder``) with shared classes."""
    if kind == "image_folder":
        return labelled_pair(from_image_folder(str(train), name="train"),
                             from_image_folder(str(test), name="test"))
    if kind == "shards":
        return labelled_pair(train, test, num_classes)
    raise ValueError(f"unknown labelled set kind {kind!r}: use 'shards' or 'image_folder'")
