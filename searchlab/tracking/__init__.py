"""Tracking: every MLflow write of searchlab (runs, params, metrics, tags, artifacts, models) through `Tracker`."""

from searchlab.tracking.config_text import config_yaml
from searchlab.tracking.mlflow import ROLE_TRIAL, Tracker, save_model

__all__ = ["ROLE_TRIAL", "Tracker", "config_yaml", "save_model"]
