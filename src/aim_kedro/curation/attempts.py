"""Index rows for every sample attempted, not only those a shard holds.

img2dataset's parquet sidecar lists each sample it tried, the failed downloads and resizes
included; a shard that stays unreadable still has its sidecar's list (or is one row). These
rows join the index with their reason and img2dataset's message, so the funnel starts at what
was attempted and nothing is silently missing. The sidecar's ``url`` and additional columns
(``--save_additional_columns``, DataComp's metadata) are joined onto every row of the shard.
"""

from __future__ import annotations

import logging
from typing import Any

import polars as pl

from aim_kedro.curation.reasons import (
    CORRUPT,
    FAILED_DOWNLOAD,
    FAILED_RESIZE,
    NOT_IN_UID_LIST,
    UNREADABLE_SHARD,
)
from aim_kedro.io.sidecars import SUCCESS, Sidecar
from aim_kedro.io.uids import UidList, declared_uid, default_uid

logger = logging.getLogger(__name__)

STATUS_REASONS = {"failed_to_download": FAILED_DOWNLOAD, "failed_to_resize": FAILED_RESIZE}


def uid_list_reason(uid: str, uid_list: UidList | None) -> tuple[str, str] | None:
    """``(not_in_uid_list, detail)`` when a uid list is given and ``uid`` is not in it."""
    if uid_list is None or uid in uid_list:
        return None
    return NOT_IN_UID_LIST, f"uid {uid} is not in {uid_list.source}"


def _extras(sidecar: Sidecar, schema: dict[str, pl.DataType]) -> pl.DataFrame | None:
    """key, the sidecar's url (as ``_sidecar_url``) and its extra columns, one row per key."""
    side = sidecar.table
    if side is None:
        return None
    clashes = [c for c in sidecar.extra_columns if c in schema]
    if clashes:
        logger.warning("sidecar %s: columns %s clash with index columns and are not carried",
                       sidecar.parquet, clashes)
    columns = [c for c in sidecar.extra_columns if c not in schema]
    picked = [pl.col("key")] + [pl.col(c) for c in columns]
    if "url" in side.columns:
        picked.append(pl.col("url").cast(pl.String).alias("_sidecar_url"))
    return side.select(picked).unique("key", keep="first", maintain_order=True)


def _with_extras(rows: pl.DataFrame, extras: pl.DataFrame | None) -> pl.DataFrame:
    if extras is None:
        return rows
    joined = rows.join(extras, on="key", how="left", maintain_order="left")
    if "_sidecar_url" in joined.columns:
        joined = joined.with_columns(pl.coalesce("url", "_sidecar_url").alias("url")).drop(
            "_sidecar_url"
        )
    return joined


def _listed_row(side_row: dict[str, Any], shard: str, schema: dict[str, pl.DataType]) -> dict[str, Any]:
    key = str(side_row["key"])
    uid = declared_uid({"uid": side_row.get("uid")}) or default_uid(shard, key)
    row: dict[str, Any] = {name: None for name in schema}
    caption = side_row.get("caption")
    row.update(uid=uid, shard=shard, key=key, caption=caption if isinstance(caption, str) else None)
    return row


def listed_reason(side_row: dict[str, Any], parquet: str | None) -> tuple[str, str]:
    """The reason of a sidecar row whose sample the shard does not hold: img2dataset's failure
    (its error message as detail), else the shard lost a sample it listed."""
    status = side_row.get("status")
    message = side_row.get("error_message") or ""
    if status in STATUS_REASONS:
        return STATUS_REASONS[status], str(message) or str(status)
    if status in (SUCCESS, None):
        return CORRUPT, f"listed in {parquet} (status {status}) but not in the shard"
    return FAILED_DOWNLOAD, f"img2dataset status {status}" + (f": {message}" if message else "")


def with_attempts(
    rows: pl.DataFrame,
    sidecar: Sidecar,
    shard: str,
    schema: dict[str, pl.DataType],
    uid_list: UidList | None = None,
) -> pl.DataFrame:
    """The index rows of a shard (``schema``), plus one row per sidecar sample the shard does
    not hold (failed downloads and resizes, samples lost), all with the sidecar's url and
    extra columns. Logs a warning when the stats count another number of attempts."""
    side = sidecar.table
    if side is None:
        return rows
    held = set(rows["key"].to_list())
    listed = []
    for side_row in side.filter(~pl.col("key").is_in(list(held))).unique(
        "key", keep="first", maintain_order=True
    ).iter_rows(named=True):
        row = _listed_row(side_row, shard, schema)
        reason, detail = uid_list_reason(row["uid"], uid_list) or listed_reason(side_row, sidecar.parquet)
        row.update(reject_reason=reason, reject_detail=detail)
        listed.append(row)
    frame = pl.concat([rows, pl.DataFrame(listed, schema=schema, orient="row")], how="vertical")
    attempted = sidecar.stats_attempted()
    if attempted is not None and attempted != frame.height:
        logger.warning("shard %s: its stats count %d attempted samples, the shard and its parquet "
                       "%d", shard, attempted, frame.height)
    return _with_extras(frame, _extras(sidecar, schema))


def unreadable_rows(
    shard: str,
    cause: str,
    sidecar: Sidecar | None,
    schema: dict[str, pl.DataType],
    uid_list: UidList | None = None,
) -> pl.DataFrame:
    """Rows of a shard that stayed unreadable: one per sample its sidecar lists (their own
    failure first, e.g. a failed download), else one row for the shard; reason
    ``unreadable_shard`` with ``cause``."""
    detail = f"shard {shard} unreadable: {cause}"
    side = sidecar.table if sidecar is not None else None
    if side is None or side.height == 0:
        key = f"{shard}#unreadable"
        row = {name: None for name in schema}
        row.update(uid=default_uid(shard, key), shard=shard, key=key,
                   reject_reason=UNREADABLE_SHARD, reject_detail=detail)
        return pl.DataFrame([row], schema=schema, orient="row")
    listed = []
    for side_row in side.unique("key", keep="first", maintain_order=True).iter_rows(named=True):
        row = _listed_row(side_row, shard, schema)
        found = uid_list_reason(row["uid"], uid_list)
        if found is None and side_row.get("status") in STATUS_REASONS:
            found = listed_reason(side_row, sidecar.parquet if sidecar else None)
        reason, why = found or (UNREADABLE_SHARD, detail)
        row.update(reject_reason=reason, reject_detail=why)
        listed.append(row)
    assert sidecar is not None
    return _with_extras(pl.DataFrame(listed, schema=schema, orient="row"), _extras(sidecar, schema))


__all__ = ["listed_reason", "uid_list_reason", "unreadable_rows", "with_attempts"]
