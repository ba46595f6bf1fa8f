"""Pre-training data: image transforms and a resumable, shuffled webdataset stream over shards.

The stream is deterministic: an epoch's shard order and shuffle buffer are seeded from
``(seed, epoch)``, and every sample's augmentation from its own position, so a loader restarted
from a saved :meth:`ResumableLoader.state_dict` yields exactly the batches the first run would
have yielded next. Shards are split over ranks and DataLoader workers (over samples when there
are fewer shards than readers); the training stream repeats epochs forever, so ranks never run
dry at different times. A sample whose image cannot be decoded is logged and skipped.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import random
from collections.abc import Callable, Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, TypeVar

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchvision import transforms

from aim_kedro.io.decode import decode_image
from aim_kedro.io.shards import ERROR_KEY, image_bytes, read_shard
from aim_kedro.io.uids import sample_uid

logger = logging.getLogger(__name__)

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SPLITS = ("all", "train", "val")

T = TypeVar("T")


def train_transform(img_size: int) -> Callable[[Image.Image], torch.Tensor]:
    """AIM's pre-training augmentation: RandomResizedCrop (scale 0.4-1, bicubic), flip, normalise."""
    return transforms.Compose(
        [
            transforms.RandomResizedCrop(
                img_size, scale=(0.4, 1.0), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.RandomHorizontalFlip(),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def eval_transform(img_size: int, crop_pct: float = 1.0) -> Callable[[Image.Image], torch.Tensor]:
    """Deterministic evaluation view: resize the shorter side to img_size / crop_pct, centre crop."""
    if not 0.0 < crop_pct <= 1.0:
        raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
    return transforms.Compose(
        [
            transforms.Resize(
                int(round(img_size / crop_pct)), interpolation=transforms.InterpolationMode.BICUBIC
            ),
            transforms.CenterCrop(img_size),
            transforms.ToTensor(),
            transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )


def _hash_int(*parts: Any) -> int:
    """A stable 63-bit integer from any printable parts (unlike ``hash``, same in every process)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _uniform(*parts: Any) -> float:
    """A stable uniform number in [0, 1) from the given parts (counter-based randomness)."""
    return _hash_int(*parts) / float(1 << 63)


def val_bucket(uid: str) -> float:
    """Where a uid falls in [0, 100): a hash, so the held-out split never depends on shard order."""
    digest = hashlib.sha256(uid.encode("utf-8")).digest()
    return (int.from_bytes(digest[:8], "little") % 10_000) / 100.0


def in_split(sample: dict[str, Any], split: str, val_percent: float) -> bool:
    """Whether a sample belongs to ``split`` ("all", "train" or "val") of a val_percent hold-out."""
    if split == "all":
        return True
    is_val = val_bucket(sample_uid(sample)) < val_percent
    return is_val if split == "val" else not is_val


def mix_sources(
    primary: Iterable[T], secondary: Iterable[T], p: float, seed: int, start: int = 0
) -> Iterator[T]:
    """Interleave two streams: item i comes from ``secondary`` with probability ``p``.

    Choice i depends only on ``(seed, i)``, so a mix resumed with ``start=i`` continues the same
    sequence of choices. Stops when the chosen stream is exhausted.
    """
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"mixing probability p must be in [0, 1], got {p}")
    first, second = iter(primary), iter(secondary)
    for i in itertools.count(start):
        source = second if _uniform(seed, "mix", i) < p else first
        try:
            yield next(source)
        except StopIteration:
            return


@dataclass
class ShardSource:
    """Where samples come from: shard URLs, which uid-hash split, and an optional mixed-in source.

    ``split="train"`` keeps samples whose uid bucket is >= ``val_percent``, ``"val"`` the rest.
    ``secondary`` (e.g. ImageNet shards for DFN-2B+) is drawn with probability ``secondary_p``.
    """

    shards: list[str]
    split: str = "all"
    val_percent: float = 0.0
    secondary: ShardSource | None = None
    secondary_p: float = 0.0

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {self.split!r}")
        if not 0.0 <= self.val_percent < 100.0:
            raise ValueError(f"val_percent must be in [0, 100), got {self.val_percent}")
        if not 0.0 <= self.secondary_p <= 1.0:
            raise ValueError(f"secondary_p must be in [0, 1], got {self.secondary_p}")
        self.shards = [str(s) for s in self.shards]

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-able form (for the torchrun config file)."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ShardSource:
        """Inverse of :meth:`to_dict`."""
        data = dict(data)
        if data.get("secondary") is not None:
            data["secondary"] = cls.from_dict(data["secondary"])
        return cls(**data)


def split_sources(
    shards: list[str],
    val_percent: float,
    secondary_shards: list[str] | None = None,
    secondary_p: float = 0.0,
) -> tuple[ShardSource, ShardSource | None]:
    """The train source (with the optional mix) and the held-out val source of one shard set."""
    secondary = ShardSource(list(secondary_shards)) if secondary_shards else None
    train = ShardSource(
        list(shards), "train" if val_percent > 0 else "all", val_percent, secondary,
        secondary_p if secondary else 0.0,
    )
    val = ShardSource(list(shards), "val", val_percent) if val_percent > 0 else None
    return train, val


def read_samples(shards: Iterable[str]) -> Iterator[dict[str, Any]]:
    """The samples of ``shards`` in order, through the project's one shard reader; a damaged
    record (a truncated tar, a repeated key) is logged and skipped."""
    for shard in shards:
        for sample in read_shard(shard):
            if ERROR_KEY in sample:
                logger.warning("skipping %s in %s: %s", sample["__key__"], shard, sample[ERROR_KEY])
                continue
            yield sample


def shuffled(data: Iterable[T], bufsize: int, initial: int, seed: int) -> Iterator[T]:
    """A shuffle buffer over a stream, the same sequence as webdataset 1.0.2's ``shuffle``
    (``filters._shuffle`` + ``pick``) with ``random.Random(seed)``: the buffer fills two items
    per step until ``bufsize``, yields from ``min(initial, bufsize)`` on, a random pick swapped
    with the last."""
    rng = random.Random(seed)
    stream = iter(data)
    initial = min(initial, bufsize)
    buf: list[T] = []

    def pick() -> T:
        k = rng.randint(0, len(buf) - 1)
        sample = buf[k]
        buf[k] = buf[-1]
        buf.pop()
        return sample

    for sample in stream:
        buf.append(sample)
        if len(buf) < bufsize:
            try:
                buf.append(next(stream))
            except StopIteration:
                pass
        if len(buf) >= initial:
            yield pick()
    while buf:
        yield pick()


def _epoch_samples(
    source: ShardSource, epoch: int, seed: int, slot: int, num_slots: int, shuffle_buffer: int
) -> Iterator[dict[str, Any]]:
    """The raw samples that reader ``slot`` of ``num_slots`` sees in one epoch, shuffled if asked."""
    shards = sorted(source.shards)
    if shuffle_buffer > 0:
        random.Random(_hash_int(seed, "shards", epoch)).shuffle(shards)
    by_shard = len(shards) >= num_slots
    mine = shards[slot::num_slots] if by_shard else shards
    stream: Iterator[dict[str, Any]] = (
        s for s in read_samples(mine) if in_split(s, source.split, source.val_percent)
    )
    if not by_shard:
        stream = itertools.islice(stream, slot, None, num_slots)
    if shuffle_buffer > 0:
        stream = shuffled(stream, shuffle_buffer, shuffle_buffer,
                          _hash_int(seed, "buffer", epoch, slot))
    return stream


def _positioned(
    source: ShardSource,
    name: str,
    seed: int,
    slot: int,
    num_slots: int,
    shuffle_buffer: int,
    start: tuple[int, int],
    repeat: bool,
) -> Iterator[tuple[dict[str, Any], str, int, int]]:
    """Samples tagged ``(sample, name, epoch, position after it)``, from a saved (epoch, position)."""
    epoch, pos = start
    while True:
        count = pos
        samples = _epoch_samples(source, epoch, seed, slot, num_slots, shuffle_buffer)
        for sample in itertools.islice(samples, pos, None):
            count += 1
            yield sample, name, epoch, count
        if count == 0 and repeat:
            raise RuntimeError(
                f"reader {slot} of {num_slots} got no samples from {len(source.shards)} shard(s) "
                f"(split={source.split!r}): use fewer num_workers/GPUs or more data"
            )
        if not repeat:
            return
        epoch, pos = epoch + 1, 0


class ShardStream(IterableDataset):
    """Batches of decoded, augmented images from a :class:`ShardSource`, with a resume state.

    Each yielded item is ``{"images": Tensor[B, 3, H, W], "worker": int, "state": dict}`` where
    ``state`` is the reader's position after this batch. ``train=True`` shuffles and repeats
    epochs forever; ``train=False`` reads one epoch in order and keeps the last partial batch.
    """

    def __init__(
        self,
        source: ShardSource,
        transform: Callable[[Image.Image], torch.Tensor],
        batch_size: int,
        *,
        seed: int = 0,
        train: bool = True,
        shuffle_buffer: int = 1000,
        rank: int = 0,
        world_size: int = 1,
        start: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.source = source
        self.transform = transform
        self.batch_size = batch_size
        self.seed = seed
        self.train = train
        self.shuffle_buffer = shuffle_buffer if train else 0
        self.rank = rank
        self.world_size = world_size
        self.start = start or {}

    def _tagged(self, slot: int, num_slots: int, state: dict[str, Any]) -> Iterator[tuple]:
        def stream(source: ShardSource, name: str) -> Iterator[tuple]:
            return _positioned(
                source, name, self.seed, slot, num_slots, self.shuffle_buffer,
                tuple(state.get(name, (0, 0))), repeat=self.train,
            )

        primary = stream(self.source, "primary")
        if self.source.secondary is None or self.source.secondary_p <= 0:
            return primary
        secondary = stream(self.source.secondary, "secondary")
        seed = _hash_int(self.seed, "mix-slot", slot)
        return mix_sources(primary, secondary, self.source.secondary_p, seed, state.get("mix", 0))

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        num_workers, physical = (info.num_workers, info.id) if info else (1, 0)
        logical = (physical + int(self.start.get("offset", 0))) % num_workers
        slot, num_slots = self.rank * num_workers + logical, self.world_size * num_workers
        state: dict[str, Any] = dict(self.start.get("workers", {}).get(str(logical), {}))
        mixing = self.source.secondary is not None and self.source.secondary_p > 0
        images: list[torch.Tensor] = []
        skipped = 0
        for sample, name, epoch, pos in self._tagged(slot, num_slots, state):
            state[name] = [epoch, pos]
            if mixing:
                state["mix"] = state.get("mix", 0) + 1
            image = self._decode(sample, name, epoch, slot, pos)
            if image is None:
                skipped += 1
                continue
            images.append(image)
            if len(images) == self.batch_size:
                yield {"images": torch.stack(images), "worker": logical, "state": dict(state)}
                images = []
        if images:
            yield {"images": torch.stack(images), "worker": logical, "state": dict(state)}
        if skipped:
            logger.info("reader %d/%d skipped %d undecodable samples", slot, num_slots, skipped)

    def _decode(self, sample: dict, name: str, epoch: int, slot: int, pos: int) -> torch.Tensor | None:
        found = image_bytes(sample)
        where = f"{sample.get('__key__')} in {sample.get('__shard__')}"
        if found is None:
            logger.warning("skipping sample %s: no image member", where)
            return None
        try:
            img = decode_image(found[1])
        except Exception as exc:  # noqa: BLE001 - any decoder error must skip, never stop training
            logger.warning("skipping sample %s: cannot decode %s image (%s)", where, found[0], exc)
            return None
        if not self.train:
            return self.transform(img)
        with torch.random.fork_rng(devices=[]):
            torch.random.default_generator.manual_seed(
                _hash_int(self.seed, name, epoch, slot, pos)
            )
            return self.transform(img)


@dataclass
class ResumableLoader:
    """An endless iterator of training image batches that knows how far it got.

    ``state_dict()`` after n batches, passed back as ``start``, makes a new loader yield batch
    n+1 onwards exactly (same ``num_workers``, ranks and source). With another ``num_workers``
    the stream restarts at the next unseen epoch instead, with a warning.
    """

    source: ShardSource
    img_size: int
    batch_size: int
    seed: int = 0
    num_workers: int = 0
    shuffle_buffer: int = 1000
    rank: int = 0
    world_size: int = 1
    start: dict[str, Any] | None = None
    pin_memory: bool = False
    batches: int = field(default=0, init=False)
    workers: dict[str, dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        start = dict(self.start or {})
        if start and int(start.get("num_workers", 0)) != max(self.num_workers, 1):
            epochs = [
                int(pos[0]) for w in start.get("workers", {}).values()
                for key, pos in w.items() if key in ("primary", "secondary")
            ]
            next_epoch = max(epochs, default=-1) + 1
            logger.warning(
                "data position saved with num_workers=%s, now %s: restarting at epoch %d",
                start.get("num_workers"), self.num_workers, next_epoch,
            )
            start = {
                "batches": int(start.get("batches", 0)),
                "workers": {
                    str(w): {"primary": [next_epoch, 0], "secondary": [next_epoch, 0]}
                    for w in range(max(self.num_workers, 1))
                },
            }
        self.batches = int(start.get("batches", 0))
        self.workers = {k: dict(v) for k, v in start.get("workers", {}).items()}

    def state_dict(self) -> dict[str, Any]:
        """The position to resume from: batches consumed and each reader's (epoch, position)."""
        return {
            "batches": self.batches,
            "num_workers": max(self.num_workers, 1),
            "workers": {k: dict(v) for k, v in self.workers.items()},
        }

    def __iter__(self) -> Iterator[torch.Tensor]:
        readers = max(self.num_workers, 1)
        dataset = ShardStream(
            self.source,
            train_transform(self.img_size),
            self.batch_size,
            seed=self.seed,
            train=True,
            shuffle_buffer=self.shuffle_buffer,
            rank=self.rank,
            world_size=self.world_size,
            start={"offset": self.batches % readers, "workers": self.workers},
        )
        loader = DataLoader(
            dataset,
            batch_size=None,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=False,
            generator=torch.Generator(),
            prefetch_factor=2 if self.num_workers > 0 else None,
        )
        for item in loader:
            self.workers[str(item["worker"])] = item["state"]
            self.batches += 1
            yield item["images"]


def eval_batches(
    source: ShardSource,
    img_size: int,
    batch_size: int,
    max_batches: int | None = None,
    *,
    rank: int = 0,
    world_size: int = 1,
) -> Iterator[torch.Tensor]:
    """The held-out images in a fixed order (eval transform), ``max_batches`` batches at most."""
    stream = ShardStream(
        source, eval_transform(img_size), batch_size, train=False, rank=rank, world_size=world_size
    )
    for i, item in enumerate(stream):
        if max_batches is not None and i >= max_batches:
            return
        yield item["images"]
