"""Everything decided before a store is touched: a config composed from conf/ and overrides, validated, its objectives,
the user's project and targets. Light: no torch, Lightning, MLflow or Optuna (searchlab.config.space, which needs
Optuna, is imported from its module)."""

from searchlab.config.compose import (
    Composer,
    compose_config,
    config_dir,
    format_override,
    has_key,
    metric_direction,
    parse_overrides,
    redact,
    user_config_dir,
    validate_config,
    validate_study,
)
from searchlab.config.objectives import (
    EPOCH_SECONDS,
    PARAMS,
    PRUNING_OFF,
    Objectives,
    first_value,
    format_value,
    metric_names,
    metric_setting,
)
from searchlab.config.project import environment, project
from searchlab.errors import ConfigError

__all__ = ["EPOCH_SECONDS", "PARAMS", "PRUNING_OFF", "Composer", "ConfigError", "Objectives", "compose_config",
           "config_dir", "environment", "first_value", "format_override", "format_value", "has_key",
           "metric_direction", "metric_names", "metric_setting", "parse_overrides", "project", "redact",
           "user_config_dir", "validate_config", "validate_study"]
