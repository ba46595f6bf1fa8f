"""The pre-training run directory: resume state, kept steps and the result, all written atomically.

``last.pt`` holds model, optimizer, step, every rank's RNG states and data position, and the
history (nanoGPT's checkpoint = model + optimizer + step + RNG); the one before it stays as
``previous.pt``, so a truncated or corrupt ``last.pt`` falls back to it with a warning naming the
file (never a crash, never a silent fresh start); ``intermediate/step_XXXXXXXX.
safetensors`` the weights kept every ``keep_every`` steps (loss vs accuracy reads them);
``result.json`` what a finished run produced, so a torchrun launcher can read it back.
"""

from __future__ import annotations

import json
import logging
import os
import random
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

logger = logging.getLogger(__name__)

LAST = "last.pt"
PREVIOUS = "previous.pt"
RESULT = "result.json"
INTERMEDIATE = "intermediate"
RESUME_KNOBS = ("batch_size", "grad_accum_steps", "seed", "total_steps", "lr", "lr_scaling",
               "warmup_steps", "warmup_fraction", "warmup_start_lr")


@dataclass
class TrainResult:
    """What a run produced: history rows, final weights, model config, summary, kept steps."""

    history: list[dict[str, Any]]
    state_dict: dict[str, torch.Tensor]
    config: dict[str, Any]
    metadata: dict[str, Any]
    intermediate: dict[int, str]


class RunDir:
    """Handle on one run directory (it may not exist yet: a fresh run starts it)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"RunDir({str(self.path)!r})"

    def __fspath__(self) -> str:
        return str(self.path)

    @property
    def last(self) -> Path:
        """The resume checkpoint."""
        return self.path / LAST

    @property
    def previous(self) -> Path:
        """The resume checkpoint before ``last`` (the fallback when ``last`` is unreadable)."""
        return self.path / PREVIOUS

    @property
    def result(self) -> Path:
        """The finished run's summary."""
        return self.path / RESULT

    def step_file(self, step: int) -> Path:
        """Where the weights kept at ``step`` live."""
        return self.path / INTERMEDIATE / f"step_{step:08d}.safetensors"

    def kept_steps(self) -> dict[int, str]:
        """``{step: path}`` of every kept step, in step order."""
        return {
            int(p.stem.split("_")[1]): str(p)
            for p in sorted((self.path / INTERMEDIATE).glob("step_*.safetensors"))
        }

    def last_step(self) -> int | None:
        """The step a resume would start from (``last.pt``, else ``previous.pt``, read
        memory-mapped), or None when neither is readable."""
        for path in (self.last, self.previous):
            try:
                return int(_read(path, mmap=True)["step"])
            except Exception:  # noqa: BLE001 - missing or unreadable: try the next one
                continue
        return None

    def prepare(self) -> None:
        """Create the folder (and the kept-steps folder)."""
        (self.path / INTERMEDIATE).mkdir(parents=True, exist_ok=True)

    def clear(self) -> None:
        """Remove a previous run's resume state and kept steps (a run not resuming starts clean)."""
        for path in [self.last, self.previous, self.result, *map(Path, self.kept_steps().values())]:
            path.unlink(missing_ok=True)

    def summary(self) -> dict[str, Any]:
        """What the folder holds: the resume step, the kept steps and whether a run finished."""
        finished = None
        if self.result.exists():
            finished = json.loads(self.result.read_text())["metadata"].get("steps")
        return {"path": str(self.path), "last_step": self.last_step(),
                "kept_steps": sorted(self.kept_steps()), "finished_steps": finished}


def as_run_dir(run_dir: str | Path | RunDir) -> RunDir:
    """A ``RunDir`` for a path (or the handle itself)."""
    return run_dir if isinstance(run_dir, RunDir) else RunDir(run_dir)


def atomic_safetensors(state_dict: dict[str, torch.Tensor], path: Path) -> None:
    """Write weights as safetensors to a temporary file, then rename."""
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous().clone() for k, v in state_dict.items()}, str(tmp))
    os.replace(tmp, path)


def rng_state(prefix_gen: torch.Generator, data_position: dict[str, Any]) -> dict[str, Any]:
    """This rank's random states (python, numpy, torch, cuda, prefix draws) and data position."""
    return {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "prefix": prefix_gen.get_state(),
        "data": data_position,
    }


def set_rng_state(state: dict[str, Any], prefix_gen: torch.Generator) -> None:
    """Restore what :func:`rng_state` saved (the data position is the loader's to restore)."""
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    prefix_gen.set_state(state["prefix"])


def _read(path: Path, mmap: bool = False) -> dict[str, Any]:
    """A resume checkpoint; raises when it is missing, truncated or corrupt."""
    if not zipfile.is_zipfile(path):  # torch.save's zip: a truncated file has no central directory
        raise ValueError("not a complete torch checkpoint (truncated?)")
    ckpt = torch.load(path, map_location="cpu", weights_only=False, mmap=mmap)
    int(ckpt["step"])
    return ckpt


def read_resume(run: RunDir) -> tuple[dict[str, Any], Path] | None:
    """The newest readable resume checkpoint and its path: ``last.pt``, else ``previous.pt``
    with a warning naming the unreadable file; None when there is neither.

    Raises ValueError when resume files exist but none can be read: a fresh start would throw
    the run away, so that is the user's call (``train.resume: false``).
    """
    unreadable = []
    for path in (run.last, run.previous):
        if not path.exists():
            continue
        try:
            ckpt = _read(path)
        except Exception as exc:  # noqa: BLE001 - truncated zip, bad pickle, missing keys
            unreadable.append(f"{path} ({type(exc).__name__}: {exc})")
            logger.warning("resume checkpoint %s is unreadable (%s: %s)", path, type(exc).__name__,
                           exc)
            continue
        if unreadable:
            logger.warning("resuming from %s (step %d) instead: %s is truncated or corrupt",
                           path, int(ckpt["step"]), unreadable[0].split(" (")[0])
        return ckpt, path
    if unreadable:
        raise ValueError(
            f"no readable resume checkpoint in {run.path}: {'; '.join(unreadable)}. Set "
            "pretraining.train.resume: false to start over, or point the pretraining_run entry "
            "at a fresh folder"
        )
    return None


def load_resume(
    run: RunDir, total_steps: int, model_config: dict[str, Any], train_config: dict[str, Any]
) -> dict[str, Any] | None:
    """The resume checkpoint (``last.pt``, or ``previous.pt`` when ``last.pt`` is unreadable),
    after checking it belongs to the same model; None when there is none or it holds a finished
    run (which starts over). Changed batch/lr knobs are warned about. ``resumed_from`` in the
    result names the file."""
    found = read_resume(run)
    if found is None:
        return None
    ckpt, path = found
    ckpt["resumed_from"] = str(path)
    if int(ckpt["step"]) >= total_steps:
        logger.info("%s holds a finished run (step %d): starting a new run", path, int(ckpt["step"]))
        return None
    saved = ckpt["model_config"]
    if saved != model_config:
        raise ValueError(
            f"{path} was written for another model ({saved}); set resume: false to start over, "
            "or point the pretraining_run entry at a fresh folder"
        )
    old = ckpt["train_config"]
    for key in RESUME_KNOBS:
        if old.get(key) != train_config.get(key):
            logger.warning("resuming with %s=%s (checkpoint had %s)", key, train_config.get(key),
                           old.get(key))
    return ckpt


def save_last(run: RunDir, **state: Any) -> None:
    """Write the resume checkpoint (model, optimizer, step, history, ranks, configs); the one it
    replaces becomes ``previous.pt`` (unless it was truncated: then ``previous.pt`` stays)."""
    tmp = run.last.with_name(LAST + ".tmp")
    torch.save(state, tmp)
    if run.last.exists():
        if zipfile.is_zipfile(run.last):
            os.replace(run.last, run.previous)
        else:
            logger.warning("%s was truncated: replacing it, %s stays the fallback", run.last,
                           run.previous)
    os.replace(tmp, run.last)


def run_result(
    run: RunDir, history: list[dict[str, Any]], state_dict: dict[str, torch.Tensor],
    model_config: dict[str, Any], step: int, batch_size: int, seconds: float, world_size: int,
) -> TrainResult:
    """The TrainResult of a run that ended at ``step``, its summary read off the history."""
    trained = [r for r in history if r["train_loss"] is not None]
    validated = [r for r in history if r["val_loss"] is not None]
    metadata = {
        "steps": step,
        "final_train_loss": trained[-1]["train_loss"] if trained else None,
        "final_val_loss": validated[-1]["val_loss"] if validated else None,
        "first_val_loss": validated[0]["val_loss"] if validated else None,
        "images_seen": step * batch_size,
        "run_dir": str(run.path),
        "seconds_this_run": seconds,
        "world_size": world_size,
    }
    return TrainResult(history, state_dict, model_config, metadata, run.kept_steps())


def write_result(run: RunDir, result: TrainResult, train_config: dict[str, Any]) -> None:
    """Write ``result.json`` (history, model config, metadata, training config)."""
    payload = {"history": result.history, "config": result.config, "metadata": result.metadata,
               "train_config": train_config}
    tmp = run.result.with_name(RESULT + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, run.result)


def load_result(run_dir: str | Path | RunDir) -> TrainResult:
    """Read the TrainResult a (torchrun) run left in ``run_dir``: result.json + last.pt weights."""
    run = as_run_dir(run_dir)
    payload = json.loads(run.result.read_text())
    found = read_resume(run)
    steps = payload["metadata"].get("steps")
    if found is None or int(found[0]["step"]) != steps:
        raise ValueError(f"{run.path} holds no readable checkpoint of the finished run's step "
                         f"{steps} (result.json); its training has to run again")
    return TrainResult(payload["history"], found[0]["model"], payload["config"],
                       payload["metadata"], run.kept_steps())


def load_step(run_dir: str | Path | RunDir, step: int) -> dict[str, torch.Tensor]:
    """The weights kept at ``step``."""
    return load_file(str(as_run_dir(run_dir).step_file(step)))
