"""Nodes that build the embedded sample: a raw image-text pool with planted faults, and probe sets.

The pool imitates an img2dataset download: mostly clean pairs, plus wrong captions, exact and
near duplicates, faces, corrupt records and leaks of the evaluation test set, in known numbers
recorded in ``sample_truth`` so that every curation stage can measure itself.
"""

from __future__ import annotations

import hashlib
import logging
import time
from typing import Any

import numpy as np
import polars as pl
from PIL import Image

from aim_kedro.common.config import check_keys
from aim_kedro.io.shards import Sample, ShardSet, sample_json
from aim_kedro.pipelines.sample.faults import near_duplicate, wrong_caption
from aim_kedro.pipelines.sample.sources import (
    DIGIT_WORDS,
    FACE_SOURCES,
    PHOTO_SOURCES,
    Rendered,
    decode,
    digit_caption,
    digits,
    encode,
    lfw_faces,
    render_digit,
    render_face_photo,
    render_pasted_face,
    render_photo,
)

logger = logging.getLogger(__name__)

KINDS = ("clean", "wrong_caption", "exact_duplicate", "near_duplicate", "face", "corrupt", "eval_leak")
CORRUPT_VARIANTS = ("truncated_jpeg", "zero_byte", "not_image", "no_caption")
NEAR_VARIANTS = ("resized", "cropped", "jpeg", "color_shift")
LEAK_VARIANTS = ("exact", "reencoded", "resized")
IMAGE_SIZES = (64, 256)  # below 64 px faces are missed; 224 px is the highres environment's
COUNT_KEYS = (
    "clean_digits",
    "clean_photos",
    "wrong_caption",
    "exact_duplicate",
    "near_duplicate",
    "face",
    "corrupt",
    "eval_leak",
)
TOP_KEYS = ("seed", "image_size", "probe_test_fraction", "counts", "trusted")
TRUSTED_KEYS = ("digit_renders", "photos", "faces")


def validate_sample_params(params: dict[str, Any]) -> dict[str, Any]:
    """Check the sample parameters before any image is made; return them unchanged."""
    check_keys(params, TOP_KEYS, "sample")
    check_keys(params.get("counts") or {}, COUNT_KEYS, "sample.counts")
    check_keys(params.get("trusted") or {}, TRUSTED_KEYS, "sample.trusted")
    size = params.get("image_size")
    low, high = IMAGE_SIZES
    if isinstance(size, bool) or not isinstance(size, int) or not low <= size <= high:
        raise ValueError(f"sample.image_size must be an int in [{low}, {high}] (faces must stay "
                         f"detectable; 224 for conf/highres), got {size!r}")
    fraction = params.get("probe_test_fraction")
    if not isinstance(fraction, float) or not 0.0 < fraction < 0.5:
        raise ValueError(f"sample.probe_test_fraction must be a float in (0, 0.5), got {fraction!r}")
    counts = params.get("counts", {})
    missing = [k for k in COUNT_KEYS if k not in counts]
    if missing:
        raise ValueError(f"sample.counts is missing {missing}; set each to a non-negative int")
    for key in COUNT_KEYS:
        if not isinstance(counts[key], int) or counts[key] < 0:
            raise ValueError(f"sample.counts.{key} must be a non-negative int, got {counts[key]!r}")
    if counts["face"] - 2 * min(20, counts["face"] // 12) > len(lfw_faces()):
        raise ValueError("sample.counts.face is larger than the faces that ship offline (140)")
    return params


def _uid(seed: int, *parts: object) -> str:
    return hashlib.sha256(":".join(str(p) for p in (seed, *parts)).encode()).hexdigest()[:32]


def split_digits(seed: int, test_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """A fixed stratified split of the 1,797 digits into train and test indices."""
    _, labels = digits()
    rng = np.random.default_rng([seed, 1])
    train, test = [], []
    for label in range(10):
        members = rng.permutation(np.flatnonzero(labels == label))
        n_test = int(round(len(members) * test_fraction))
        test.extend(members[:n_test].tolist())
        train.extend(members[n_test:].tolist())
    return np.array(sorted(train)), np.array(sorted(test))


def _probe_sample(index: int, seed: int, size: int) -> Sample:
    rendered = render_digit(index, size, np.random.default_rng([seed, 2, index]), jitter=False)
    label = int(rendered.label)
    return {
        "__key__": f"{index:06d}",
        "png": encode(rendered.image, "png"),
        "cls": str(label),
        "json": {"eval_id": f"digits-{index:04d}", "label": label, "class_name": DIGIT_WORDS[label]},
    }


def build_probe_sets(params: dict[str, Any]) -> tuple[list[Sample], list[Sample]]:
    """``probe_train`` and ``probe_test``: sklearn digits rendered in colour and centred (a clean
    benchmark, as evaluation sets are), in a fixed stratified split."""
    validate_sample_params(params)
    train, test = split_digits(params["seed"], params["probe_test_fraction"])
    size = params["image_size"]
    train_set = [_probe_sample(int(i), params["seed"], size) for i in train]
    test_set = [_probe_sample(int(i), params["seed"], size) for i in test]
    logger.info("probe sets: %d train and %d test digits at %d px", len(train_set), len(test_set), size)
    return train_set, test_set


def _pool_record(uid: str, key: str, image: bytes | None, ext: str, caption: str | None, source: str) -> Sample:
    record: Sample = {"__key__": key}
    if image is not None:
        record[ext] = image
    if caption is not None:
        record["txt"] = caption
    record["json"] = {"uid": uid, "source": source, "key": key, "status": "success"}
    return record


def _truth(uid: str, kind: str, variant: str | None = None, source_uid: str | None = None,
           eval_id: str | None = None, boxes: list | None = None, source: str = "") -> dict[str, Any]:
    return {
        "uid": uid,
        "kind": kind,
        "variant": variant,
        "source_uid": source_uid,
        "eval_id": eval_id,
        "face_boxes": [list(b) for b in (boxes or [])],
        "source": source,
    }


def build_raw_pool(
    probe_test: ShardSet, params: dict[str, Any]
) -> tuple[list[Sample], pl.DataFrame, list[Sample]]:
    """The raw pool, its ground truth and the trusted pairs (disjoint from the pool).

    Digits in the pool and the trusted pairs come from outside ``probe_test``; leaks are planted
    on purpose as copies of ``probe_test`` images, some re-encoded or resized.
    """
    validate_sample_params(params)
    start = time.perf_counter()
    seed, size, counts = params["seed"], params["image_size"], params["counts"]
    rng = np.random.default_rng([seed, 3])
    test_items = [(sample_json(s)["eval_id"], s["png"]) for s in probe_test]
    test_ids = {int(eval_id.split("-")[1]) for eval_id, _ in test_items}
    _, labels = digits()
    free_digits = rng.permutation([i for i in range(len(labels)) if i not in test_ids]).tolist()
    photo_names = list(PHOTO_SOURCES)

    records: list[tuple[Sample, dict[str, Any]]] = []
    clean: list[tuple[str, bytes, str, str]] = []  # uid, jpg bytes, caption, source

    def add(kind: str, image: bytes | None, caption: str | None, source: str, ext: str = "jpg",
            **truth: Any) -> str:
        uid = _uid(seed, "pool", len(records))
        records.append((_pool_record(uid, "", image, ext, caption, source), _truth(uid, kind, source=source, **truth)))
        return uid

    n_digit_needed = counts["clean_digits"] + counts["wrong_caption"] // 2 + counts["corrupt"]
    if n_digit_needed > len(free_digits):
        raise ValueError(f"sample.counts asks for {n_digit_needed} digits; only {len(free_digits)} lie outside probe_test")
    pool_digits, trusted_digits = free_digits[:n_digit_needed], free_digits[n_digit_needed:]
    digit_iter = iter(pool_digits)

    for _ in range(counts["clean_digits"]):
        r = render_digit(next(digit_iter), size, rng)
        data = encode(r.image)
        clean.append((add("clean", data, r.caption, r.source), data, r.caption, r.source))
    for i in range(counts["clean_photos"]):
        r = render_photo(photo_names[i % len(photo_names)], size, rng)
        data = encode(r.image)
        clean.append((add("clean", data, r.caption, r.source), data, r.caption, r.source))
    for i in range(counts["wrong_caption"]):
        if i % 2 == 0:
            r = render_digit(next(digit_iter), size, rng)
        else:
            r = render_photo(photo_names[int(rng.integers(len(photo_names)))], size, rng)
        add("wrong_caption", encode(r.image), wrong_caption(r, rng), r.source, variant=r.source.split(":")[0])
    for i in range(counts["exact_duplicate"]):
        uid, data, caption, source = clean[int(rng.integers(len(clean)))]
        if i % 2 == 0:
            add("exact_duplicate", data, caption, source, variant="byte_copy", source_uid=uid)
        else:
            png = encode(decode(data), "png")
            add("exact_duplicate", png, caption, source, ext="png", variant="reencoded", source_uid=uid)
    for i in range(counts["near_duplicate"]):
        uid, data, caption, source = clean[int(rng.integers(len(clean)))]
        variant = NEAR_VARIANTS[i % len(NEAR_VARIANTS)]
        add("near_duplicate", near_duplicate(decode(data), variant, rng), caption, source,
            variant=variant, source_uid=uid)
    face_plan = ["astronaut"] * min(20, counts["face"] // 12) + ["grace_hopper"] * min(20, counts["face"] // 12)
    face_plan += ["lfw"] * (counts["face"] - len(face_plan))
    lfw_order = iter(rng.permutation(len(lfw_faces())).tolist())
    for name in face_plan:
        if name in FACE_SOURCES:
            r = render_face_photo(name, size, rng)
        else:
            r = render_pasted_face(int(next(lfw_order)), size, rng)
        add("face", encode(r.image), r.caption, r.source, variant=name, boxes=r.face_boxes)
    for i in range(counts["corrupt"]):
        variant = CORRUPT_VARIANTS[i % len(CORRUPT_VARIANTS)]
        r = render_digit(next(digit_iter), size, rng)
        data = encode(r.image)
        if variant == "truncated_jpeg":
            add("corrupt", data[: int(len(data) * rng.uniform(0.3, 0.7))], r.caption, r.source, variant=variant)
        elif variant == "zero_byte":
            add("corrupt", b"", r.caption, r.source, variant=variant)
        elif variant == "not_image":
            add("corrupt", rng.bytes(int(rng.integers(500, 3000))), r.caption, r.source, variant=variant)
        else:
            add("corrupt", data, None, r.source, variant=variant)
    for i in range(counts["eval_leak"]):
        eval_id, png = test_items[int(rng.integers(len(test_items)))]
        variant = LEAK_VARIANTS[i % len(LEAK_VARIANTS)]
        label = int(eval_id.split("-")[1])
        caption = digit_caption(int(labels[label]), rng)
        if variant == "exact":
            add("eval_leak", png, caption, "sklearn_digits", ext="png", variant=variant, eval_id=eval_id)
        elif variant == "reencoded":
            add("eval_leak", encode(decode(png), "jpg", 95), caption, "sklearn_digits", variant=variant, eval_id=eval_id)
        else:
            new = int(size * rng.choice([0.75, 1.25]))
            resized = decode(png).resize((new, new), Image.Resampling.BICUBIC)
            add("eval_leak", encode(resized), caption, "sklearn_digits", variant=variant, eval_id=eval_id)

    order = rng.permutation(len(records))
    pool: list[Sample] = []
    truth_rows: list[dict[str, Any]] = []
    for position, index in enumerate(order):
        record, truth = records[int(index)]
        key = f"{position:09d}"
        record["__key__"] = key
        record["json"]["key"] = key
        pool.append(record)
        truth_rows.append({**truth, "key": key})
    truth_df = pl.DataFrame(
        truth_rows,
        schema={
            "uid": pl.Utf8, "kind": pl.Utf8, "variant": pl.Utf8, "source_uid": pl.Utf8,
            "eval_id": pl.Utf8, "face_boxes": pl.List(pl.List(pl.Int64)), "source": pl.Utf8, "key": pl.Utf8,
        },
    )
    trusted = build_trusted_pairs(trusted_digits, params, seed, size)
    logger.info(
        "sample pool: %d samples (%s), %d trusted pairs, in %.1f s",
        len(pool),
        ", ".join(f"{k} {v}" for k, v in truth_df.group_by("kind").len().sort("kind").iter_rows()),
        len(trusted),
        time.perf_counter() - start,
    )
    return pool, truth_df, trusted


def build_trusted_pairs(digit_indices: list[int], params: dict[str, Any], seed: int, size: int) -> list[Sample]:
    """Correctly captioned pairs, disjoint from the pool, to train the filtering network on."""
    rng = np.random.default_rng([seed, 4])
    trusted_params = params.get("trusted", {})
    renders = int(trusted_params.get("digit_renders", 2))
    n_photos = int(trusted_params.get("photos", 400))
    items: list[Rendered] = [render_digit(i, size, rng) for i in digit_indices for _ in range(renders)]
    names = list(PHOTO_SOURCES)
    items += [render_photo(names[i % len(names)], size, rng) for i in range(n_photos)]
    # Faces too, or the filtering network never learns their captions and cuts every face from
    # the subset: LFW faces pasted into other scenes at other places than in the pool.
    n_faces = int(trusted_params.get("faces", 100))
    items += [render_pasted_face(int(rng.integers(len(lfw_faces()))), size, rng) for _ in range(n_faces)]
    pairs = []
    for i in rng.permutation(len(items)):
        r = items[int(i)]
        uid = _uid(seed, "trusted", len(pairs))
        pairs.append(_pool_record(uid, f"{len(pairs):09d}", encode(r.image), "jpg", r.caption, r.source))
    return pairs
