"""Pool samples that leak an image of an evaluation set.

Evaluation sets are webdataset shards (``probe_test``) or labelled sets such as an ImageFolder
tree (anything that yields ``(key, image_bytes, label)`` and has a ``name``). ``eval_index``
hashes their images exactly as the pool index hashes pool samples, embeds them when a rule
compares embeddings and describes them with the copy detector; ``eval_matches`` finds, for
every pool row, the test image it copies: equal bytes or pixels, near pHashes (or crops) with
agreeing colours, close embeddings, or (copy detection) a descriptor candidate or a pHash match
whose colours disagree that ``verify`` confirms. ``dedup.deduplicate`` rejects those rows
``eval_leak`` before it clusters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from PIL import Image

from aim_kedro.curation.index import (
    HASH_SCHEMA,
    IndexConfig,
    image_hashes,
)
from aim_kedro.curation.matching import (
    HashArrays,
    colour_agrees,
    cosine_pairs,
    hash_candidates,
    knn_pairs,
)
from aim_kedro.curation.reasons import EVAL_LEAK
from aim_kedro.curation.verify import ImageLoader, VerifyStats, verify_candidates
from aim_kedro.io.decode import DecodeError, decode_image
from aim_kedro.io.shards import Sample, ShardSet, image_bytes, sample_json

if TYPE_CHECKING:
    from aim_kedro.curation.copydetect import Describer
    from aim_kedro.curation.dedup import DedupConfig
    from aim_kedro.curation.scoring import ClipScorer


EVAL_SCHEMA: dict[str, pl.DataType] = {"eval_id": pl.String(), **HASH_SCHEMA}

EvalSource = ShardSet | Iterable[Any]
"""An evaluation set: shards, or a labelled set yielding ``(key, image_bytes, label)``."""


def eval_items(source: EvalSource, name: str | None = None) -> Iterator[tuple[str, bytes | None]]:
    """``(eval_id, image bytes or None)`` of every image of an evaluation set, in order: a
    shard sample's ``json.eval_id`` (else ``<shard>/<key>``), a labelled set's ``<name>/<key>``
    (``name`` or the set's own ``name``)."""
    if isinstance(source, ShardSet):
        for path in source.shards:
            for position, sample in enumerate(source.iter_shard(path)):
                meta = sample_json(sample)
                shard = sample.get("__shard__") or path.rstrip("/").rsplit("/", 1)[-1]
                eval_id = meta.get("eval_id") or f"{shard}/{sample.get('__key__', position)}"
                found = image_bytes(sample)
                yield str(eval_id), (found[1] if found is not None else None)
        return
    label = name or getattr(source, "name", "eval")
    for item in source:
        yield f"{label}/{item[0]}", item[1]


def eval_records(
    samples: Iterable[Sample], cfg: IndexConfig
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Hash rows of test samples (as ``EVAL_SCHEMA``) and their decoded images, hashed exactly
    as the pool index hashes pool samples."""
    for position, sample in enumerate(samples):
        meta = sample_json(sample)
        eval_id = meta.get("eval_id") or f"{sample.get('__shard__')}/{sample.get('__key__', position)}"
        found = image_bytes(sample)
        yield _hash_row(str(eval_id), found[1] if found is not None else None, cfg)


def _hash_row(eval_id: str, data: bytes | None, cfg: IndexConfig) -> tuple[dict[str, Any], Image.Image | None]:
    row: dict[str, Any] = {name: None for name in EVAL_SCHEMA}
    row["eval_id"] = eval_id
    if data is None:
        return row, None
    row["sha256_bytes"] = hashlib.sha256(data).hexdigest()
    try:
        image = decode_image(data, cfg.max_image_pixels)
    except DecodeError:
        return row, None
    row.update(image_hashes(image, cfg))
    return row, image


@dataclass
class EvalIndex:
    """The evaluation images: hash rows (``EVAL_SCHEMA``), and in row order their image
    embeddings and copy descriptors (zero rows for undecodable images) when asked for."""

    table: pl.DataFrame
    embeddings: np.ndarray | None = None
    descriptors: np.ndarray | None = None


def _sets(sets: EvalSource | Mapping[str, EvalSource]) -> list[tuple[str | None, EvalSource]]:
    if isinstance(sets, Mapping):
        return list(sets.items())
    return [(None, sets)]


def eval_index(
    sets: EvalSource | Mapping[str, EvalSource],
    cfg: IndexConfig,
    scorer: ClipScorer | None = None,
    describer: Describer | None = None,
    batch: int = 256,
) -> EvalIndex:
    """Hash every image of one evaluation set or of several (a mapping name -> set, in order)
    and, with a ``scorer``, embed it, with a ``describer``, describe it, ``batch`` at a time."""
    rows: list[dict[str, Any]] = []
    embeddings: list[np.ndarray] = []
    descriptors: list[np.ndarray] = []

    def flush(images: list[Image.Image | None]) -> None:
        present = [i for i, im in enumerate(images) if im is not None]
        decoded = [images[i] for i in present]
        for model, out, dim in ((scorer, embeddings, getattr(scorer, "embed_dim", 0)),
                                (describer, descriptors, getattr(describer, "dim", 0))):
            if model is None:
                continue
            full = np.zeros((len(images), dim), dtype=np.float16)
            if decoded:
                full[present] = (model.embed_images(decoded) if model is scorer
                                 else model.describe(decoded))
            out.append(full)

    for name, source in _sets(sets):
        images: list[Image.Image | None] = []
        for eval_id, data in eval_items(source, name):
            row, image = _hash_row(eval_id, data, cfg)
            rows.append(row)
            images.append(image)
            if len(images) == batch:
                flush(images)
                images = []
        if images:
            flush(images)
    table = pl.DataFrame(rows, schema=EVAL_SCHEMA, orient="row") if rows else pl.DataFrame(
        schema=EVAL_SCHEMA
    )
    return EvalIndex(
        table,
        np.concatenate(embeddings) if embeddings else None,
        np.concatenate(descriptors) if descriptors else None,
    )


def eval_loader(sets: EvalSource | Mapping[str, EvalSource], cfg: IndexConfig) -> ImageLoader:
    """An ``ImageLoader`` of evaluation rows (positions in ``eval_index``'s table): one pass
    over the sets per call, decoding only the wanted rows."""

    def load(rows: Sequence[int]) -> Iterator[tuple[int, Image.Image | None]]:
        wanted = set(int(r) for r in rows)
        if not wanted:
            return
        position = 0
        for name, source in _sets(sets):
            for _, data in eval_items(source, name):
                if position in wanted:
                    image = None
                    if data is not None:
                        try:
                            image = decode_image(data, cfg.max_image_pixels)
                        except DecodeError:
                            image = None
                    yield position, image
                    wanted.discard(position)
                    if not wanted:
                        return
                position += 1

    return load


@dataclass(frozen=True)
class CopyInputs:
    """What copy detection compares besides the evaluation descriptors: the pool's descriptors
    (row order) and ``images`` (an ``ImageLoader`` of pool rows), and ``eval_images`` (an
    ``ImageLoader`` of ``eval_index`` positions)."""

    descriptors: np.ndarray | None = None
    images: ImageLoader | None = None
    eval_images: ImageLoader | None = None


def eval_matches(
    pool: pl.DataFrame,
    pool_embeddings: np.ndarray | None,
    evals: EvalIndex,
    cfg: DedupConfig,
    copy: CopyInputs | None = None,
    stats: dict[str, Any] | None = None,
    pool_hashes: HashArrays | None = None,
) -> tuple[list[str | None], list[str | None]]:
    """For every pool row, the eval_id it leaks into ``evals`` (or None) and how it matched.
    With ``cfg.eval_copy_detection``, pool rows that no cheap rule matched are verified against
    their descriptor candidates among the test images (and pHash matches whose colours
    disagree), from ``copy``; ``stats`` (when given) receives what that stage did.
    ``pool_hashes``: the ``HashArrays`` of the pool's rows that have a phash, when the caller
    already holds them (built here otherwise)."""
    copy = copy or CopyInputs()
    eval_table, eval_embeddings, eval_descriptors = evals.table, evals.embeddings, evals.descriptors
    descriptors, images, eval_images = copy.descriptors, copy.images, copy.eval_images
    n = pool.height
    found: list[str | None] = [None] * n
    how: list[str | None] = [None] * n
    if eval_table.height == 0 or n == 0:
        return found, how
    eval_ids = eval_table["eval_id"].to_list()

    def mark(rows: Iterable[int], cols: Iterable[int], why: str) -> None:
        for r, c in zip(rows, cols, strict=True):
            if found[r] is None:
                found[r] = eval_ids[c]
                how[r] = why

    if cfg.eval_exact:
        for column in ("sha256_bytes", "sha256_pixels"):
            # a join, not a dict of the pool's hashes: the last test image with that hash
            tests = (eval_table.select(pl.col(column).alias("value")).with_row_index("col")
                     .drop_nulls("value").unique("value", keep="last"))
            hits = pool.select(pl.col(column).alias("value")).with_row_index("row").join(
                tests, on="value", how="inner", maintain_order="left")
            mark(hits["row"].to_list(), hits["col"].to_list(), f"same {column}")
    rows_valid = np.flatnonzero(pool["phash"].is_not_null().to_numpy())
    eval_valid = np.flatnonzero(eval_table["phash"].is_not_null().to_numpy())
    misses = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if (cfg.eval_phash_radius is not None or cfg.eval_crop_phash_radius is not None) and len(
        rows_valid
    ) and len(eval_valid):
        a = pool_hashes if pool_hashes is not None else HashArrays.from_table(
            pool.filter(pl.col("phash").is_not_null()))
        b = HashArrays.from_table(eval_table[eval_valid.tolist()])
        i, j = hash_candidates(a, cfg.eval_phash_radius, cfg.eval_crop_phash_radius, b)
        agree = colour_agrees(a, i, j, cfg.eval_max_color_distance, b)
        mark(rows_valid[i[agree]], eval_valid[j[agree]], "perceptual hash")
        misses = (rows_valid[i[~agree]], eval_valid[j[~agree]])
    if (
        cfg.eval_embedding_threshold is not None
        and pool_embeddings is not None
        and eval_embeddings is not None
        and len(rows_valid)
    ):
        i, j, sim = cosine_pairs(
            pool_embeddings[rows_valid], cfg.eval_embedding_threshold, eval_embeddings
        )
        order = np.argsort(-sim, kind="stable")
        mark(
            rows_valid[i[order]],
            j[order],
            f"embedding cosine >= {cfg.eval_embedding_threshold:g}",
        )
    if cfg.eval_copy_detection and len(rows_valid) and len(eval_valid):
        if descriptors is None or eval_descriptors is None or images is None or eval_images is None:
            raise ValueError(
                "curation.dedup.eval_copy_detection needs the pool's and the evaluation images' "
                "descriptors and images; pass them, or set eval_copy_detection: false"
            )
        i, j, sim = knn_pairs(descriptors[rows_valid], cfg.candidates, eval_descriptors[eval_valid])
        ci = np.concatenate([misses[0], rows_valid[i]])
        cj = np.concatenate([misses[1], eval_valid[j]])
        order = np.argsort(-np.concatenate([np.full(len(misses[0]), 2.0), sim]), kind="stable")
        verify = VerifyStats()
        for r, c, verdict in verify_candidates(
            ci[order], cj[order], images, eval_images, cfg.verify,
            joined=lambda r, _c: found[r] is not None, stats=verify,
        ):
            if verdict.copy:
                mark([r], [c], f"copy detection: {verdict.kind}")
        if stats is not None:
            stats.update(candidate_pairs=int(len(i)), colour_misses=int(len(misses[0])),
                         **verify.as_dict())
    return found, how


__all__ = [
    "EVAL_LEAK",
    "EVAL_SCHEMA",
    "CopyInputs",
    "EvalIndex",
    "EvalSource",
    "eval_index",
    "eval_items",
    "eval_loader",
    "eval_matches",
    "eval_records",
]
