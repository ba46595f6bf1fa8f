"""Test-wide settings: offline hub, no telemetry, deterministic and light torch."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("KEDRO_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402

# Tests use tiny tensors: one intra-op thread avoids oversubscribing a 2-core machine.
torch.set_num_threads(int(os.environ.get("AIM_KEDRO_TEST_THREADS", "1")))
