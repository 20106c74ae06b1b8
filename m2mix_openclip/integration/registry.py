"""The plugin protocol, and one registry for it filled from Python entry points.

Any installed distribution can add to it by declaring, in its pyproject.toml::

    [project.entry-points."open_clip.losses"]
    my_loss = "my_package.plugin:MY_LOSS"           # a LossPlugin

    [project.entry-points."open_clip.eval_metrics"]
    my_metrics = "my_package.plugin:my_metrics"     # fn(image_features, text_features) -> dict[str, float]

    [project.entry-points."open_clip.eval_hooks"]
    my_hook = "my_package.plugin:MY_HOOK"           # an EvalHook (sees the model)

**A loss plugin** (``LossPlugin``) provides ``build(args) -> nn.Module`` from OpenCLIP's parsed
arguments, optionally ``add_arguments(parser)`` (its own flags, added when it is chosen and for
``--help``) and ``validate(args) -> Optional[str]`` (an argparse error for flags that do not fit).
The built loss is called as ``loss(**model_out, output_dict=True)`` and returns a dict of scalar
tensors, every one of which the trainer adds to the loss. It MAY also offer:

- ``set_epoch(epoch)``: called before each epoch (counted from 0);
- ``state_dict()`` / ``load_state_dict()``: its state (a lambda generator, say), saved in each
  OpenCLIP checkpoint under ``"loss"`` and restored by ``--resume``;
- ``logged_scalars() -> dict[str, float]``: called on rank 0 at OpenCLIP's logging steps only (it
  may read the device there and nowhere else); each value is logged as ``train/<key>`` to
  tensorboard and wandb and on one console line.

**An evaluation metric** is ``fn(image_features, text_features) -> dict[str, float]`` on the
validation features, added to every evaluation. **An evaluation hook** (``EvalHook``) sees the
model: ``run(model, tokenizer, preprocess, epoch, args) -> dict[str, float]`` at every OpenCLIP
evaluation on the rank that evaluates, with optional ``add_arguments`` and ``validate`` as for
losses. Keys must not clash with OpenCLIP's own (an error names the clash).

Listing names reads entry-point metadata only; a plugin is imported when it is used. One that
fails to import breaks nothing else: it is listed with its error, and choosing it raises an
error naming the plugin and its distribution. Two distributions registering one name is
reported (the first found is used, as ``importlib.metadata`` lists them).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib.metadata import EntryPoint, entry_points
from typing import Callable, Dict, List, Optional, Tuple

__all__ = ["LOSS_GROUP", "EVAL_METRICS_GROUP", "EVAL_HOOKS_GROUP", "LossPlugin", "EvalHook", "PluginError",
           "available", "load", "available_losses", "available_eval_metrics", "get_loss", "get_eval_metric",
           "duplicates"]

LOSS_GROUP = "open_clip.losses"
EVAL_METRICS_GROUP = "open_clip.eval_metrics"
EVAL_HOOKS_GROUP = "open_clip.eval_hooks"


class PluginError(ValueError):
    """An unknown plugin name, or a plugin that cannot be loaded; the message names it."""


@dataclass(frozen=True, kw_only=True)
class _PluginOptions:
    """What every plugin may offer beside its one callable: its flags, their check, a line of help."""

    add_arguments: Optional[Callable] = None
    validate: Optional[Callable] = None
    description: str = ""


@dataclass(frozen=True)
class LossPlugin(_PluginOptions):
    """A loss that OpenCLIP's trainer can build by name (``--loss NAME``); see the module docstring."""

    build: Callable

    def __call__(self, args):
        return self.build(args)


@dataclass(frozen=True)
class EvalHook(_PluginOptions):
    """A metric computed with the model at every evaluation; see the module docstring."""

    run: Callable

    def __call__(self, model, tokenizer, preprocess, epoch, args) -> Dict[str, float]:
        return self.run(model, tokenizer, preprocess, epoch, args)


def _distribution(ep: EntryPoint) -> str:
    dist = getattr(ep, "dist", None)
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"


def _scan(group: str) -> Tuple[Dict[str, EntryPoint], List[Tuple[str, str, str]]]:
    found: Dict[str, EntryPoint] = {}
    clashes = []
    for ep in entry_points(group=group):
        if ep.name in found:
            if _distribution(found[ep.name]) != _distribution(ep) or found[ep.name].value != ep.value:
                clashes.append((ep.name, _distribution(found[ep.name]), _distribution(ep)))
            continue
        found[ep.name] = ep
    return found, clashes


def available(group: str) -> List[str]:
    """Registered names in ``group``, sorted; reads metadata only, imports nothing."""
    return sorted(_scan(group)[0])


def duplicates(group: str) -> List[str]:
    """One line per name that two distributions register in ``group``."""
    return [f"{group} name {name!r} is registered by {first} and by {second}; {first} is used"
            for name, first, second in _scan(group)[1]]


_reported = set()


def load(group: str, name: str):
    """Imports the plugin registered as ``name``; an unknown name lists the known ones, and an import
    failure names the plugin, its distribution and the error."""
    found, _ = _scan(group)
    for line in duplicates(group):
        if line not in _reported:
            _reported.add(line)
            logging.warning(line)
    if name not in found:
        raise PluginError(f"unknown plugin {name!r}; registered in entry-point group {group!r}: "
                          f"{', '.join(sorted(found)) or 'none'}")
    ep = found[name]
    try:
        return ep.load()
    except Exception as e:  # a broken third-party plugin must not look like ours
        raise PluginError(f"plugin {name!r} ({ep.value}, from {_distribution(ep)}) failed to import: "
                          f"{type(e).__name__}: {e}") from e


def try_load(group: str, name: str):
    """(plugin, None), or (None, error message) for one that cannot be loaded."""
    try:
        return load(group, name), None
    except PluginError as e:
        return None, str(e)


def available_losses() -> List[str]:
    return available(LOSS_GROUP)


def available_eval_metrics() -> List[str]:
    return available(EVAL_METRICS_GROUP)


def get_loss(name: str) -> LossPlugin:
    """The loss plugin registered as ``name``."""
    plugin = load(LOSS_GROUP, name)
    if not callable(plugin):
        raise PluginError(f"loss plugin {name!r} is a {type(plugin).__name__}, not a LossPlugin or a callable")
    return plugin


def get_eval_metric(name: str) -> Callable:
    return load(EVAL_METRICS_GROUP, name)
