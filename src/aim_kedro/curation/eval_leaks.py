"""Pool samples that leak an image of the evaluation test set.

``eval_index`` hashes the test images exactly as the pool index hashes pool samples (and embeds
them when a rule compares embeddings); ``eval_matches`` finds, for every pool row, the test
image it copies: equal bytes or pixels, near pHashes (or crops) with agreeing colours, or
close embeddings. ``dedup.deduplicate`` rejects those rows ``eval_leak`` before it clusters.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
from PIL import Image

from aim_kedro.curation.index import (
    HASH_SCHEMA,
    IndexConfig,
    color_grid,
    crop_hashes,
    perceptual_hash,
    pixel_sha256,
)
from aim_kedro.curation.matching import HashArrays, cosine_pairs, hash_pairs
from aim_kedro.curation.reasons import EVAL_LEAK
from aim_kedro.io.decode import DecodeError, decode_image
from aim_kedro.io.shards import Sample, ShardSet, image_bytes, sample_json

if TYPE_CHECKING:
    from aim_kedro.curation.dedup import DedupConfig
    from aim_kedro.curation.scoring import ClipScorer


EVAL_SCHEMA: dict[str, pl.DataType] = {"eval_id": pl.String(), **HASH_SCHEMA}


def eval_records(
    samples: Iterable[Sample], cfg: IndexConfig
) -> Iterator[tuple[dict[str, Any], Image.Image | None]]:
    """Hash rows of test samples (as ``EVAL_SCHEMA``) and their decoded images, hashed exactly
    as the pool index hashes pool samples."""
    for position, sample in enumerate(samples):
        meta = sample_json(sample)
        eval_id = meta.get("eval_id") or f"{sample.get('__shard__')}/{sample.get('__key__', position)}"
        row: dict[str, Any] = {name: None for name in EVAL_SCHEMA}
        row["eval_id"] = str(eval_id)
        found = image_bytes(sample)
        if found is None:
            yield row, None
            continue
        row["sha256_bytes"] = hashlib.sha256(found[1]).hexdigest()
        try:
            image = decode_image(found[1], cfg.max_image_pixels)
        except DecodeError:
            yield row, None
            continue
        row.update(
            sha256_pixels=pixel_sha256(image),
            phash=perceptual_hash(image),
            phash_crops=crop_hashes(image, cfg.crop_fractions),
            color_grid=color_grid(image, cfg.color_grid_size),
        )
        yield row, image


def eval_index(
    probe_test: ShardSet, cfg: IndexConfig, scorer: ClipScorer | None = None
) -> tuple[pl.DataFrame, np.ndarray | None]:
    """Hashes of every evaluation test image (as ``EVAL_SCHEMA``) and, with a ``scorer``, their
    image embeddings (float16, zero rows for undecodable images), shard by shard."""
    rows: list[dict[str, Any]] = []
    embeddings: list[np.ndarray] = []
    for path in probe_test.shards:
        images = []
        for row, image in eval_records(probe_test.iter_shard(path), cfg):
            rows.append(row)
            images.append(image)
        if scorer is not None:
            present = [im for im in images if im is not None]
            emb = scorer.embed_images(present) if present else np.zeros((0, scorer.embed_dim))
            full = np.zeros((len(images), scorer.embed_dim), dtype=np.float16)
            full[[i for i, im in enumerate(images) if im is not None]] = emb
            embeddings.append(full)
    table = pl.DataFrame(rows, schema=EVAL_SCHEMA, orient="row") if rows else pl.DataFrame(
        schema=EVAL_SCHEMA
    )
    return table, (np.concatenate(embeddings) if embeddings else None)


def eval_matches(
    pool: pl.DataFrame,
    pool_embeddings: np.ndarray | None,
    eval_table: pl.DataFrame,
    eval_embeddings: np.ndarray | None,
    cfg: DedupConfig,
) -> tuple[list[str | None], list[str | None]]:
    """For every pool row, the eval_id it leaks (or None) and how it matched."""
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
            lookup = {v: k for k, v in enumerate(eval_table[column].to_list()) if v is not None}
            pairs = [(r, lookup[v]) for r, v in enumerate(pool[column].to_list()) if v in lookup]
            mark((p[0] for p in pairs), (p[1] for p in pairs), f"same {column}")
    rows_valid = np.flatnonzero(pool["phash"].is_not_null().to_numpy())
    eval_valid = np.flatnonzero(eval_table["phash"].is_not_null().to_numpy())
    if (cfg.eval_phash_radius is not None or cfg.eval_crop_phash_radius is not None) and len(
        rows_valid
    ) and len(eval_valid):
        a = HashArrays.from_table(pool[rows_valid.tolist()])
        b = HashArrays.from_table(eval_table[eval_valid.tolist()])
        i, j = hash_pairs(
            a, cfg.eval_phash_radius, cfg.eval_crop_phash_radius, cfg.eval_max_color_distance, b
        )
        mark(rows_valid[i], eval_valid[j], "perceptual hash")
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
    return found, how


__all__ = ["EVAL_LEAK", "EVAL_SCHEMA", "eval_index", "eval_matches", "eval_records"]
