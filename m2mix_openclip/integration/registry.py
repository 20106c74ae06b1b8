"""The plugin registry's names, kept for existing imports (``from
m2mix_openclip.integration.registry import LossPlugin``). The protocol, its one definition and
its specification, is :mod:`m2mix_openclip.integration.plugins`."""

from .plugins import (
    EVAL_HOOKS_GROUP,
    EVAL_METRICS_GROUP,
    LOSS_GROUP,
    EvalHook,
    LossPlugin,
    PluginError,
    available,
    available_eval_hooks,
    available_eval_metrics,
    available_losses,
    duplicates,
    get_eval_metric,
    get_loss,
    load,
    try_load,
)

__all__ = ["LOSS_GROUP", "EVAL_METRICS_GROUP", "EVAL_HOOKS_GROUP", "LossPlugin", "EvalHook", "PluginError",
           "available", "load", "try_load", "available_losses", "available_eval_metrics", "available_eval_hooks",
           "get_loss", "get_eval_metric", "duplicates"]
