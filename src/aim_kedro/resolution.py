"""The resolution contract: no stage upscales what the stage before it wrote.

A pool's images pass through the basic filter (``curation.filters.min_shorter_side``), are
written into the subset at ``curation.subset.shorter_side`` and trained on at the preset's
``img_size``. Each size must be at most the one before it, so a run never feeds upscaled pixels
to a later stage without a word: an upscale fails before any work, naming the parameters; a
downscale is logged once. ``check_resolution`` runs from the run hook with the parameters of the
run's pipelines (the curation-internal part also in ``validate_curation_params``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from aim_kedro.aim.configs import PretrainingConfig
from aim_kedro.curation.config import block
from aim_kedro.curation.filters import FilterConfig
from aim_kedro.curation.subset import SubsetConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Stage:
    """A stage of the chain: the smallest shorter side (px) it hands on, and the parameters
    that set it."""

    name: str
    size: int
    parameters: str


def resolution_chain(parameters: Mapping[str, Any], blocks: Iterable[str]) -> list[Stage]:
    """The stages whose sizes the run's parameter blocks set, in data order."""
    blocks = set(blocks)
    chain: list[Stage] = []
    curation = parameters.get("curation") or {}
    if "curation" in blocks or "pretraining" in blocks:
        subset = block(SubsetConfig, curation.get("subset"))
        filters = block(FilterConfig, curation.get("filters"))
        if subset.only_if_bigger and filters.min_shorter_side < subset.shorter_side:
            chain.append(Stage("dfn_subset", int(filters.min_shorter_side),
                               "curation.filters.min_shorter_side (curation.subset.only_if_bigger "
                               "keeps smaller images as they are)"))
        else:
            chain.append(Stage("dfn_subset", int(subset.shorter_side), "curation.subset.shorter_side"))
    if "pretraining" in blocks and "pretraining" in parameters:
        train = PretrainingConfig.from_params(parameters["pretraining"]).train
        where = ("pretraining.train.model_overrides.img_size" if "img_size" in train.model_overrides
                 else f"pretraining.train.preset ({train.preset})")
        chain.append(Stage("pre-training", int(train.model_config().img_size), where))
    return chain


def check_chain(chain: list[Stage]) -> list[str]:
    """Raise ValueError at the first stage that is larger than the one before it (an upscale);
    return a line per downscale."""
    notes = []
    for before, after in zip(chain, chain[1:], strict=False):
        if after.size > before.size:
            raise ValueError(
                f"{after.parameters}: {after.name} at {after.size} px would upscale the "
                f"{before.size} px of {before.name} ({before.parameters}); make {after.name} at "
                f"most {before.size} px, or {before.name} at least {after.size} px"
            )
        if after.size < before.size:
            notes.append(f"{before.name} {before.size} px -> {after.name} {after.size} px "
                         f"(downscaled: {after.parameters})")
    return notes


def check_resolution(parameters: Mapping[str, Any], blocks: Iterable[str]) -> None:
    """The run hook's check: the contract over the parameter blocks the run reads; logs the
    downscales once."""
    for note in check_chain(resolution_chain(parameters, blocks)):
        logger.info("resolution: %s", note)


__all__ = ["Stage", "check_chain", "check_resolution", "resolution_chain"]
