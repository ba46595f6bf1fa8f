"""Kedro dataset naming the extra evaluation sets whose leaks curation removes, read-only."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from aim_kedro.aim.evalsets import LabelledSet, from_image_folder
from aim_kedro.datasets._input_only import InputOnlyDataset
from aim_kedro.io.shards import ShardSet

KINDS = ("shards", "image_folder")


class EvalSetsDataset(InputOnlyDataset):
    """``load()`` gives ``{name: ShardSet | LabelledSet}``: evaluation sets given as webdataset
    shards or ImageFolder trees, besides ``probe_test``, that ``deduplicate`` checks the pool
    against (their images get eval ids ``<name>/<key>``). Empty by default::

        eval_leak_sets:
          type: aim_kedro.datasets.EvalSetsDataset
          sets:
            imagenet_val: {kind: image_folder, path: /data/imagenet/val}
            coco_val: {kind: shards, path: s3://bucket/coco-val-shards}
    """

    SAVE_REFUSAL = "a read-only list of evaluation sets"

    def __init__(self, *, sets: Mapping[str, Mapping[str, Any]] | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self._sets = {str(name): dict(spec) for name, spec in (sets or {}).items()}
        for name, spec in self._sets.items():
            if spec.get("kind") not in KINDS or not spec.get("path"):
                raise ValueError(
                    f"eval_leak_sets.sets.{name} must be {{kind: shards | image_folder, path: "
                    f"...}}, got {spec}"
                )
        self.metadata = metadata

    def load(self) -> dict[str, ShardSet | LabelledSet]:
        """Each set opened lazily (a missing folder raises naming the set)."""
        out: dict[str, ShardSet | LabelledSet] = {}
        for name, spec in self._sets.items():
            path = str(spec["path"])
            try:
                out[name] = (from_image_folder(path, name=name) if spec["kind"] == "image_folder"
                             else ShardSet.open(path))
            except (FileNotFoundError, ValueError) as exc:
                raise type(exc)(f"eval_leak_sets.sets.{name}: {exc}") from exc
        return out

    def _exists(self) -> bool:
        return all(os.path.exists(str(spec["path"])) or "://" in str(spec["path"])
                   for spec in self._sets.values())

    def _describe(self) -> dict[str, Any]:
        return {"sets": self._sets}


__all__ = ["EvalSetsDataset"]
