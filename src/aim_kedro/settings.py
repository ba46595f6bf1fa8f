"""Project settings: the OmegaConf config loader with base and local environments, and hooks."""

from kedro.config import OmegaConfigLoader

from aim_kedro.console import quiet
from aim_kedro.hooks import RunManifestHooks, ValidateBeforeRunHooks
from aim_kedro.tracking import MlflowTracking

# Imported when Kedro bootstraps the project, before it loads its plugins: no noise warnings,
# progress bars at a bounded rate in log files.
quiet()

HOOKS = (ValidateBeforeRunHooks(), RunManifestHooks(), MlflowTracking())

# kedro-mlflow (a dev extra) registers its hook in every session once installed; MlflowTracking
# replaces it and stays inert unless conf enables tracking for a pipeline of the run.
DISABLE_HOOKS_FOR_PLUGINS = ("kedro-mlflow", "kedro_mlflow")

CONFIG_LOADER_CLASS = OmegaConfigLoader
CONFIG_LOADER_ARGS = {
    "base_env": "base",
    "default_run_env": "local",
    # conf/local/parameters_<pipeline>.yml may override a few keys and keep the rest of base.
    "merge_strategy": {"parameters": "soft", "mlflow": "soft"},
}
