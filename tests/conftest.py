"""Test-wide settings: offline hub, no telemetry, deterministic and light torch."""

import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

# Tests use tiny tensors: one intra-op thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(int(os.environ.get("AIM_KEDRO_TEST_THREADS", "1")))


PROJECT = Path(__file__).resolve().parents[1]
# The published AIM v1 format and golden model (shared/reference of the workspace): next to the
# checkout, at /work/shared, or where AIM_KEDRO_REFERENCE points.
REFERENCE = next(
    (path for path in (Path(os.environ.get("AIM_KEDRO_REFERENCE", PROJECT.parent / "shared" /
                                           "reference")), Path("/work/shared/reference"))
     if path.is_dir()),
    PROJECT.parent / "shared" / "reference",
)
DATA_LAYERS = ("01_raw", "02_intermediate", "03_primary", "04_feature", "05_model_input",
               "06_models", "07_model_output", "08_reporting")


def copy_project(root: Path) -> Path:
    """conf/ (without local), pyproject.toml, .telemetry and an empty data/ tree at ``root``:
    enough for a KedroSession, since the package itself is installed (editable) in the venv."""
    root.mkdir(parents=True)
    shutil.copytree(PROJECT / "conf", root / "conf", ignore=shutil.ignore_patterns("local"))
    (root / "conf" / "local").mkdir()
    shutil.copy(PROJECT / "pyproject.toml", root / "pyproject.toml")
    shutil.copy(PROJECT / ".telemetry", root / ".telemetry")
    (root / "src").mkdir()
    (root / "logs").mkdir()
    for layer in DATA_LAYERS:
        (root / "data" / layer).mkdir(parents=True)
    return root


@pytest.fixture(scope="session")
def make_project_copy() -> Callable[[Path], Path]:
    """The one way tests build a temporary copy of the project."""
    return copy_project


# --- pre-training on tiny shards: a tiny TrainConfig and shards a tiny model can learn --------


def _smooth_image(rng, size: int) -> bytes:
    """A colour gradient with a bright square: structure a tiny model can learn to predict."""
    import io

    import numpy as np
    from PIL import Image

    yy, xx = np.mgrid[0:size, 0:size] / size
    a, b = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
    img = a * xx[..., None] + b * yy[..., None]
    x0, y0 = rng.integers(0, size // 2, 2)
    img[y0 : y0 + size // 3, x0 : x0 + size // 3] = rng.uniform(0, 1, 3)
    buf = io.BytesIO()
    Image.fromarray((img.clip(0, 1) * 255).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def write_tiny_shards(out_dir, n: int = 64, size: int = 20, per_shard: int = 16) -> list[str]:
    """Tiny shards in the curation stage's layout (png + txt + json with uid)."""
    import numpy as np

    from aim_kedro.io.shards import write_shards

    rng = np.random.default_rng(0)
    samples = (
        {"__key__": f"{i:06d}", "png": _smooth_image(rng, size), "txt": f"sample {i}",
         "json": {"uid": f"{i:032x}", "source": "test"}}
        for i in range(n)
    )
    return write_shards(samples, str(out_dir), samples_per_shard=per_shard)


def tiny_train_config(**overrides):
    """aim_tiny for 8 steps on the CPU, checkpoints every 2 steps, weights kept every 4."""
    from aim_kedro.aim.train import TrainConfig

    base = dict(preset="aim_tiny", batch_size=8, lr=3e-3, warmup_steps=2, total_steps=8,
                num_workers=0, shuffle_buffer=16, checkpoint_every=2, keep_every=4, val_every=4,
                val_batches=2, log_every=1, device="cpu", progress=False)
    return TrainConfig(**{**base, **overrides})


@pytest.fixture(name="tiny_shards")
def _tiny_shards() -> Callable[..., list[str]]:
    """``write_tiny_shards(out_dir, n=64, size=20, per_shard=16)``."""
    return write_tiny_shards


@pytest.fixture(name="tiny_train_config")
def _tiny_train_config() -> Callable[..., object]:
    """``tiny_train_config(**overrides)``."""
    return tiny_train_config


# --- the curation pipeline on a small pool of the test's own, with the real catalog types ----

TINY_FILTER_NETWORK = {
    "embed_dim": 16, "image_size": 32, "vision_width": 8, "vision_head_width": 64,
    "text_width": 32, "text_layers": 1, "text_heads": 2, "context_length": 16,
    "steps": 2, "batch_size": 8,
}


TINY_DESCRIPTOR = {"image_size": 32, "dim": 16, "widths": [8, 16], "steps": 3, "batch_size": 8}
"""A copy detector that trains in a second (curation.dedup.descriptor overrides)."""


def curation_params(**filters) -> dict:
    """conf/base's curation parameters with a tiny filter network and copy detector, no
    progress bars, and ``filters`` overrides (a copy: tests may change it)."""
    conf = yaml.safe_load((PROJECT / "conf/base/parameters_curation.yml").read_text())["curation"]
    conf.update(progress=False, filter_network=dict(TINY_FILTER_NETWORK))
    conf["dedup"]["descriptor"].update(TINY_DESCRIPTOR)
    conf["filters"].update(filters)
    return conf


def add_params(catalog, name: str, value) -> None:
    """``params:<name>`` and, for a mapping, every nested ``params:<name>.<key>`` entry, as a
    Kedro session adds parameters to its catalog (nodes take the blocks they use)."""
    catalog[f"params:{name}"] = value
    if isinstance(value, dict):
        for key, inner in value.items():
            add_params(catalog, f"{name}.{key}", inner)


def catalog_entries() -> dict:
    """The project's catalog entries as conf/base (+ local) define them."""
    from kedro.config import OmegaConfigLoader

    return OmegaConfigLoader(str(PROJECT / "conf"), base_env="base", default_run_env="local")[
        "catalog"
    ]


def curation_catalog(root: Path, inputs: dict[str, str], truth: str | None = None):
    """conf/base's curation catalog with every file under ``root``/data and the shard inputs
    (``raw_pool``, ``probe_test``, ``trusted_pairs``) at the given folders."""
    import polars as pl
    from kedro.io import DataCatalog

    from aim_kedro.pipelines.curation import create_pipeline

    entries = catalog_entries()
    conf: dict = {}
    for name in create_pipeline().all_outputs() | {"clip_score_cache"}:
        entry = dict(entries[name])
        entry["filepath"] = str(root / "data" / entry["filepath"])
        conf[name] = entry
    for name in ("raw_pool", "probe_test", "trusted_pairs"):
        conf[name] = {"type": "aim_kedro.datasets.WebDatasetShards", "filepath": inputs[name]}
    conf["eval_leak_sets"] = dict(entries["eval_leak_sets"])  # none besides probe_test
    catalog = DataCatalog.from_config(conf)
    catalog["sample_truth"] = pl.read_parquet(truth) if truth else None
    return catalog


def noise_png(seed: int, size: int = 64) -> bytes:
    """A smooth random picture (8 x 8 noise scaled up) as PNG bytes: distinct per seed."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize(
        (size, size), Image.Resampling.BICUBIC
    )
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return buffer.getvalue()


def scene_picture(seed: int, size: int = 256):
    """A detailed random RGB picture (coloured shapes and lines on a gradient: keypoints to
    match) as a PIL image, distinct per seed; for copy-detection tests."""
    import numpy as np
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0.3, 1, size)
    base = (ramp[None, :, None] + ramp[:, None, None]) / 2 * rng.integers(80, 200, 3)
    noisy = base + rng.normal(0, 6, (size, size, 3))
    canvas = Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(canvas)
    for _ in range(40):
        x0, y0 = (int(v) for v in rng.integers(0, size, 2))
        w, h = (int(v) for v in rng.integers(size // 16, size // 4, 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, 3))
        shape = int(rng.integers(0, 3))
        if shape == 0:
            draw.rectangle((x0, y0, x0 + w, y0 + h), fill=colour)
        elif shape == 1:
            draw.ellipse((x0, y0, x0 + w, y0 + h), fill=colour)
        else:
            draw.line((x0, y0, x0 + w, y0 + h), fill=colour, width=3)
    return canvas


def sigkill_when(proc: subprocess.Popen, ready: Callable[[], bool], timeout_s: float,
                 what: str) -> None:
    """Kill ``proc`` with SIGKILL as soon as ``ready()`` holds; fail if it ends first or if
    ``what`` has not happened within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    try:
        while not ready():
            assert proc.poll() is None, f"the child ended before it could be killed ({what})"
            if time.monotonic() > deadline:
                pytest.fail(f"{what} did not happen within {timeout_s:.0f} s")
            time.sleep(0.02)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()


def tiny_curation_inputs(root: Path) -> dict[str, str]:
    """A 24-sample raw pool in 4 shards (20 distinct pictures, an exact copy, a leak of a
    probe_test image, a broken image, a sample without caption), 4 probe_test images and 16
    trusted pairs, written as shard folders under ``root``; their paths by catalog name."""


    from aim_kedro.io.shards import write_shards

    png = noise_png
    probe = [
        {"__key__": f"p{i}", "png": png(100 + i), "cls": str(i),
         "json": {"eval_id": f"digits-{i:04d}", "label": i}}
        for i in range(4)
    ]
    pool = [
        {"__key__": f"k{i:03d}", "png": png(i), "txt": f"picture number {i}",
         "json": {"uid": f"uid{i:03d}", "source": "test"}}
        for i in range(20)
    ]
    pool.append({"__key__": "copy", "png": pool[3]["png"], "txt": "picture number 3",
                 "json": {"uid": "copy", "source": "test"}})
    pool.append({"__key__": "leak", "png": probe[1]["png"], "txt": "a leaked digit",
                 "json": {"uid": "leak", "source": "test"}})
    pool.append({"__key__": "broken", "png": b"not a png", "txt": "broken image",
                 "json": {"uid": "broken", "source": "test"}})
    pool.append({"__key__": "mute", "png": png(50), "json": {"uid": "mute"}})
    trusted = [
        {"__key__": f"t{i}", "png": png(200 + i), "txt": f"trusted picture {i}"}
        for i in range(16)
    ]
    paths = {}
    for name, samples, per_shard in (("raw_pool", pool, 6), ("probe_test", probe, 10),
                                     ("trusted_pairs", trusted, 10)):
        folder = root / name
        write_shards(samples, str(folder), samples_per_shard=per_shard)
        paths[name] = str(folder)
    return paths


# --- a tiny open_clip scorer (random weights) and test pictures, for the scoring tests ---------

CAPTIONS = ["a red square", "a photo of a cat", "two coins", "a blue circle", "digit seven"]


@pytest.fixture(scope="session")
def checkpoint() -> dict:
    """A filter-network checkpoint dict of a tiny CLIP with seeded random weights."""
    from aim_kedro.curation.filter_network import (
        FilterNetworkConfig,
        build_filter_model,
        open_clip_model_cfg,
        preprocess_cfg_for,
    )

    tiny = FilterNetworkConfig(
        embed_dim=32, image_size=32, vision_width=8, vision_head_width=32, text_width=32,
        text_layers=1, text_heads=2, context_length=8,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = build_filter_model(tiny)
    return {
        "config": {
            "model_name": "tiny-test-clip",
            "model_cfg": open_clip_model_cfg(tiny),
            "preprocess_cfg": preprocess_cfg_for(tiny.image_size),
        },
        "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
        "metadata": {},
    }


@pytest.fixture(scope="session")
def scorer(checkpoint: dict):
    """The tiny CLIP as a CPU ``ClipScorer`` (batches of 3)."""
    from aim_kedro.curation.clip_models import load_clip_model

    return load_clip_model("", checkpoint=checkpoint, device="cpu", batch_size=3)


@pytest.fixture(scope="session")
def images() -> list:
    """Five random pictures of different sizes and modes (RGB, L, RGBA)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    sizes = [(40, 40), (64, 48), (33, 80), (50, 50), (20, 30)]
    out = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    out[3] = out[3].convert("L")
    out[4] = out[4].convert("RGBA")
    return out


def png_bytes(image) -> bytes:
    """``image`` encoded as PNG."""
    import io

    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# --- the whole project through the CLI, on a copy, at small size -----------------------------

# The whole project in about a minute: what the CLI tests and notebooks need, not the sample's
# targets. Written to the copy's conf/local/parameters_small.yml, as a user would.
SMALL_RUN = {
    "sample": {
        "counts": {"clean_digits": 40, "clean_photos": 20, "wrong_caption": 6,
                   "exact_duplicate": 4, "near_duplicate": 4, "face": 12, "corrupt": 4,
                   "eval_leak": 3},
        "trusted": {"digit_renders": 0, "photos": 10, "faces": 6},
    },
    "curation": {"progress": False, "filter_network": TINY_FILTER_NETWORK,
                 "dedup": {"descriptor": TINY_DESCRIPTOR}},
    "pretraining": {
        "val_percent": 20.0,
        "train": {"preset": "aim_tiny", "batch_size": 16, "warmup_steps": 2, "total_steps": 12,
                  "checkpoint_every": 6, "keep_every": 6, "val_every": 6, "val_batches": 1,
                  "num_workers": 0, "progress": False},
    },
    "evaluation": {
        "probes": {"lrs": {"attentive": [1.0e-2], "linear": [3.0e-3]}, "epochs": 1,
                   "min_steps": 20, "low_shot": {"shots": 10, "seeds": [0]}},
        "loss_vs_accuracy": {"max_checkpoints": 3},
    },
    # A 2x2 grid of aim_tiny models for 8 steps: the scaling pipeline end to end in about a minute.
    "scaling": {"grid": "tiny", "grids": {"tiny": {
        "capacities": {"t16": {"preset": "aim_tiny", "model_overrides": {"embed_dim": 16}},
                       "t32": {"preset": "aim_tiny"}},
        "data_sizes": {"half": 0.5, "all": 1.0},
        "seeds": [0],
        "steps": 8,
        "pretraining": {"val_percent": 25.0, "train": {
            "batch_size": 8, "warmup_steps": 2, "val_every": 4, "val_batches": 2,
            "num_workers": 0, "progress": False}},
        "evaluation": {"probes": {"lrs": {"attentive": [1.0e-2], "linear": [3.0e-3]},
                                  "epochs": 1, "min_steps": 10,
                                  "low_shot": {"shots": 2, "seeds": [0]}}},
    }}},
}
# The published AIM v1 format: the reference's tiny model, probed by evaluation_ml_aim.
TINY_AIM_V1 = {"img_size": 32, "patch_size": 8, "embed_dim": 64, "num_blocks": 4, "num_heads": 4,
               "probe_layers": 2, "num_classes": 10}
CLI_TIMEOUT_S = 900


def kedro_cli(project: Path, *args: str, env: dict[str, str] | None = None,
              timeout: float = CLI_TIMEOUT_S, program: str = "kedro",
              **popen: object) -> subprocess.CompletedProcess:
    """``kedro <args>`` (or ``aim-kedro``) in ``project``, in a subprocess, as a user types it;
    stdout and stderr together in ``.stdout``."""
    command = [str(Path(sys.executable).parent / program), *args]
    environment = {**os.environ, "COLUMNS": "240", **(env or {})}
    return subprocess.run(command, cwd=project, env=environment, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout, check=False,
                          **popen)


def kedro_cli_all(project: Path, calls: list[tuple[tuple[str, ...], str]]) -> list:
    """``kedro_cli(project, *args, program=program)`` for each ``(args, program)``, one process
    per core at a time, results in the order given: for commands that only read the project
    or fail before any node runs."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        return list(pool.map(lambda call: kedro_cli(project, *call[0], program=call[1]), calls))


def small_project(root: Path) -> Path:
    """A project copy with SMALL_RUN in conf/local and the published AIM v1 tiny model as its
    ``ml_aim_checkpoint`` (with ``evaluation.trunk.config``)."""
    project = copy_project(root)
    params = {block: dict(values) for block, values in SMALL_RUN.items()}
    params["evaluation"] = {**params["evaluation"], "trunk": {"config": TINY_AIM_V1}}
    (project / "conf/local/parameters_small.yml").write_text(yaml.safe_dump(params))
    (project / "conf/local/catalog.yml").write_text(yaml.safe_dump({"ml_aim_checkpoint": {
        "type": "aim_kedro.datasets.StateDictDataset",
        "filepath": str(REFERENCE / "tiny_aim_v1.safetensors")}}))
    return project


def run_when_ready(project: Path, pipes: dict) -> dict[str, subprocess.CompletedProcess]:
    """``kedro run --pipelines NAME`` in ``project`` for every pipeline of ``pipes``, each once
    the pipelines that make its inputs are done, side by side (one per core) with the running
    ones that write none of its outputs, as two users of one project would start them. Inputs
    no pipeline of ``pipes`` makes are the catalog's own."""
    from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait

    outputs = {name: pipe.all_outputs() for name, pipe in pipes.items()}
    needs = {name: {other for other in pipes if other != name
                    and outputs[other] & (pipe.inputs() - outputs[name])}
             for name, pipe in pipes.items()}
    runs: dict[str, subprocess.CompletedProcess] = {}
    running: dict[Any, str] = {}
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        while len(runs) < len(pipes):
            busy = set().union(*(outputs[name] for name in running.values()))
            for name in sorted(pipes):
                ready = name not in runs and name not in running.values() and needs[name] <= set(runs)
                if ready and not outputs[name] & busy and len(running) < (os.cpu_count() or 1):
                    running[pool.submit(kedro_cli, project, "run", "--pipelines", name)] = name
                    busy |= outputs[name]
            assert running, f"pipelines {sorted(set(pipes) - set(runs))} need each other's outputs"
            done, _ = wait(running, return_when=FIRST_COMPLETED)
            for future in done:
                runs[running.pop(future)] = future.result()
    return runs


def project_pipelines(project: Path) -> dict:
    """The registered pipelines as ``project`` builds them (``__default__`` left out): the
    scaling pipeline's namespaces come from the grid in the project's own conf."""
    from kedro.framework.project import pipelines

    from aim_kedro.lineage import registered_pipelines

    here = Path.cwd()
    os.chdir(project)
    try:
        pipelines.configure(pipelines._pipelines_module)  # build again, from this conf
        return registered_pipelines()
    finally:
        os.chdir(here)
        pipelines.configure(pipelines._pipelines_module)


CLI_RUNS = "logs/cli-runs.json"  # each run's exit code and output, kept with the project


@pytest.fixture(scope="session")
def cli_project(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Every registered pipeline run with ``kedro run --pipelines NAME`` on a small project copy
    (``run_when_ready``: in data order, side by side where they write different entries):
    ``{"path": project, "runs": {name: CompletedProcess}}``.

    ``AIM_KEDRO_TEST_CLI_PROJECT=<folder>`` reuses a project that this fixture built before
    (it keeps the runs' output in ``logs/cli-runs.json``), to iterate on the CLI tests quickly.
    """
    import json

    from kedro.framework.startup import bootstrap_project

    from aim_kedro.lineage import registered_pipelines

    reuse = os.environ.get("AIM_KEDRO_TEST_CLI_PROJECT")
    if reuse and (Path(reuse) / CLI_RUNS).is_file():
        saved = json.loads((Path(reuse) / CLI_RUNS).read_text())
        runs = {name: subprocess.CompletedProcess(run["args"], run["returncode"], run["stdout"])
                for name, run in saved.items()}
        bootstrap_project(Path(reuse))
        return {"path": Path(reuse), "runs": runs, "pipelines": project_pipelines(Path(reuse))}
    project = small_project(tmp_path_factory.mktemp("cli") / "project")
    bootstrap_project(project)
    runs = run_when_ready(project, registered_pipelines())
    (project / CLI_RUNS).write_text(json.dumps(
        {name: {"args": run.args, "returncode": run.returncode, "stdout": run.stdout}
         for name, run in runs.items()}))
    return {"path": project, "runs": runs, "pipelines": project_pipelines(project)}
