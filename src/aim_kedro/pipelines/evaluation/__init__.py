"""The ``evaluation`` pipeline: frozen-trunk features, attentive and linear probes, loss vs accuracy."""

from .pipeline import create_pipeline

__all__ = ["create_pipeline"]
