"""aim_kedro: the AIM recipe (curation, autoregressive pre-training, probes) as one Kedro project."""

__version__ = "0.1.0"
