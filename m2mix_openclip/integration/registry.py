"""One registry for losses and evaluation metrics, filled from Python entry points.

Any installed distribution can add to it by declaring, in its pyproject.toml::

    [project.entry-points."open_clip.losses"]
    my_loss = "my_package.plugin:MY_LOSS"           # a LossPlugin (or any object with build/add_arguments)

    [project.entry-points."open_clip.eval_metrics"]
    my_metrics = "my_package.plugin:my_metrics"     # fn(image_features, text_features) -> dict[str, float]
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Dict, Optional

LOSS_GROUP = "open_clip.losses"
EVAL_METRICS_GROUP = "open_clip.eval_metrics"


@dataclass(frozen=True)
class LossPlugin:
    """A loss that OpenCLIP's trainer can build by name (``--loss NAME``).

    Attributes:
        build: ``build(args) -> nn.Module`` from OpenCLIP's parsed arguments. The module is
            called as ``loss(**model_out, output_dict=True)`` and must return a dict of
            scalar tensors, every one of which the trainer adds to the loss.
        add_arguments: ``add_arguments(parser_or_group)`` adds the loss's own flags.
        validate: ``validate(args) -> Optional[str]``, an error message for flags that do not
            fit together (reported as an argparse error), or None.
        description: one line for ``--help``.
    """

    build: Callable
    add_arguments: Optional[Callable] = None
    validate: Optional[Callable] = None
    description: str = ""

    def __call__(self, args):
        return self.build(args)


def _load(group: str) -> Dict[str, object]:
    found = {}
    for ep in entry_points(group=group):
        if ep.name in found:
            continue  # the first installed distribution wins, as importlib.metadata lists them
        found[ep.name] = ep
    return found


def available_losses():
    """Names of every registered loss, sorted."""
    return sorted(_load(LOSS_GROUP))


def available_eval_metrics():
    """Names of every registered evaluation-metric function, sorted."""
    return sorted(_load(EVAL_METRICS_GROUP))


def _resolve(group: str, name: str, kind: str, kinds: str):
    eps = _load(group)
    if name not in eps:
        raise ValueError(
            f"unknown {kind} {name!r}; registered {kinds} (entry-point group {group!r}): "
            f"{', '.join(sorted(eps)) or 'none'}"
        )
    return eps[name]


def get_loss(name: str) -> LossPlugin:
    """The loss plugin registered as ``name``; an unknown name lists the known ones."""
    entry_point = _resolve(LOSS_GROUP, name, "loss", "losses")
    plugin = entry_point.load()
    if not callable(plugin):
        raise TypeError(f"loss entry point {name!r} ({entry_point.value}) is not callable")
    return plugin


def get_eval_metric(name: str) -> Callable:
    """The evaluation-metric function registered as ``name``; an unknown name lists the known ones."""
    return _resolve(EVAL_METRICS_GROUP, name, "eval metric", "metrics").load()
