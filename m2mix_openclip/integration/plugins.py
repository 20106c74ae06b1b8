"""The plugin protocol of OpenCLIP's trainer: losses and evaluation metrics from installed packages.

This module is the whole protocol, in one place. ``m2mix-train`` imports it (as
``m2mix_openclip.integration.plugins``), and OpenCLIP carrying one of m2mix-openclip's ``patches/``
holds it verbatim (``open_clip_train/plugins.py``, or ``training/plugins.py`` in 2.23-2.24). So it
imports only the standard library (``open_clip`` and ``torch`` inside the functions that need them)
and runs on Python 3.9 and later.

Registering
-----------
Any installed distribution adds plugins by declaring entry points, e.g. in its pyproject.toml::

    [project.entry-points."open_clip.losses"]
    my_loss = "my_package.plugin:MY_LOSS"           # a LossPlugin
    [project.entry-points."open_clip.eval_metrics"]
    my_metrics = "my_package.plugin:my_metrics"     # fn(image_features, text_features) -> dict[str, float]
    [project.entry-points."open_clip.eval_hooks"]
    my_hook = "my_package.plugin:MY_HOOK"           # an EvalHook

Installing the distribution is all it takes: ``--loss my_loss`` then works.

Losses: ``--loss NAME``
-----------------------
A loss plugin (:class:`LossPlugin`, or any callable with the same optional attributes) is
``build(args) -> loss`` from the trainer's parsed arguments, and may carry:

- ``add_arguments(group)``: adds its flags to the argument group it is given; called for the
  chosen loss only, and for every loss under ``--help``;
- ``validate(args) -> Optional[str]``: a message for flags that do not fit together, reported as
  an argparse error before anything is built;
- ``description``: one line, the title of its flags in ``--help``.

The trainer calls the built loss as ``loss(**model_out, output_dict=True)``; it returns a dict of
scalar tensors and the trainer adds up every value (diagnostics must not travel there). The loss
MAY also offer:

- ``set_epoch(epoch)``: called before each epoch, counted from 0;
- ``state_dict()`` / ``load_state_dict(state)``: a non-empty state (the generator of a loss that
  samples, say) is saved in each training checkpoint under ``"loss"`` and restored by ``--resume``;
- ``logged_scalars() -> dict[str, float]``: called on the logging rank at the trainer's logging
  steps only (the one place where the loss may read values off the device); logged as one console
  line, ``Train Epoch: E step S loss scalars: key=value ...``, and as ``train/<key>`` to
  tensorboard and wandb at that step.

``--loss clip`` (the default) is OpenCLIP's own ``create_loss`` (``ClipLoss``, or SigLIP, CoCa or
distillation as its flags say), unless a distribution registers the name ``clip``.

Evaluation
----------
An evaluation metric is ``fn(image_features, text_features) -> dict[str, float]`` on the whole
validation set's float32 features, at every evaluation that computes OpenCLIP's retrieval metrics.
``--eval-metrics NAME ...`` chooses them; by default every installed one that imports runs, and the
flag alone runs none.

An evaluation hook (:class:`EvalHook`) sees the model: ``run(model, tokenizer, preprocess, epoch,
args) -> dict[str, float]``, at every evaluation on the rank that evaluates, after OpenCLIP's
zero-shot evaluation (``preprocess``: the evaluation transform). Every installed hook that imports
runs; it may carry ``add_arguments(parser)`` (given the parser itself) and ``validate(args)`` as
losses do, and is expected to return nothing when its flags are not given.

Keys must not clash with those computed before (an error names the plugin and the keys); values
are passed through ``float()``.

Loading
-------
Listing names reads entry-point metadata only; a plugin is imported when it is used. One that
fails to import breaks nothing else: ``--help`` lists it with its error, choosing it (``--loss
NAME``, ``--eval-metrics NAME``) is an argparse error naming the plugin, its distribution and the
error, and a metric or hook that was not chosen by name is skipped with a warning. When two
distributions register one name a warning names both, once, and the first that
``importlib.metadata`` lists is used.

The trainer's side
------------------
A trainer implements the protocol by calling, from its parameter parsing, main loop and
training / evaluation functions (what ``patches/`` adds to OpenCLIP, and what ``m2mix-train``
wraps around an unpatched OpenCLIP):

- :func:`parse_args` in place of ``parser.parse_args(argv)`` (the parser built with
  ``allow_abbrev=False``, since a prefix of a plugin flag must never select another flag; or,
  with a parser of its own: :func:`add_arguments`, then ``parse_args``, then :func:`check_args`);
- :func:`create_loss` in place of ``open_clip.create_loss``, with a resumed checkpoint's ``"loss"``;
- :func:`set_epoch` before each epoch, and :func:`checkpoint_entries` into each checkpoint;
- :func:`loss_scalars` at each logging step, merged into the ``train/`` values it writes;
- :func:`eval_hooks` after the zero-shot evaluation, :func:`eval_metrics` beside the retrieval
  metrics of the validation features;
- :data:`preprocess_val`: set to the evaluation transform once the model is created, for the hooks;
- :func:`save_checkpoint` in place of ``torch.save`` of a training checkpoint: the file under a
  checkpoint's name is always whole (:func:`write_whole`), a failed save says why in one line
  (:class:`CheckpointSaveError`) and a model whose weights are not finite is never saved
  (:class:`NonFiniteCheckpointError`).
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Callable, Dict, List, Optional, Sequence, Tuple

__all__ = ["LOSS_GROUP", "EVAL_METRICS_GROUP", "EVAL_HOOKS_GROUP", "DEFAULT_LOSS", "LossPlugin", "EvalHook",
           "PluginError", "available", "duplicates", "load", "try_load", "available_losses", "available_eval_metrics",
           "available_eval_hooks", "get_loss", "get_eval_metric", "chosen_loss", "add_arguments", "check_args",
           "parse_args", "create_loss", "set_epoch", "loss_state_dict", "checkpoint_entries", "loss_scalars",
           "eval_metrics", "eval_hooks", "preprocess_val", "CheckpointSaveError", "NonFiniteCheckpointError",
           "write_whole", "save_checkpoint", "nonfinite_tensor"]

LOSS_GROUP = "open_clip.losses"
EVAL_METRICS_GROUP = "open_clip.eval_metrics"
EVAL_HOOKS_GROUP = "open_clip.eval_hooks"
DEFAULT_LOSS = "clip"
ARGUMENT_GROUP = "loss and evaluation plugins"

preprocess_val = None  # the evaluation transform, set by the trainer once the model exists (for hooks)


class PluginError(ValueError):
    """An unknown plugin name, or a plugin that cannot be loaded; the message names it."""


@dataclass(frozen=True)
class LossPlugin:
    """A loss the trainer builds by name (``--loss NAME``): ``build(args) -> loss``; see the module docstring."""

    build: Callable
    add_arguments: Optional[Callable] = None
    validate: Optional[Callable] = None
    description: str = ""

    def __call__(self, args):
        return self.build(args)


@dataclass(frozen=True)
class EvalHook:
    """A metric computed with the model at every evaluation: ``run(model, tokenizer, preprocess,
    epoch, args) -> dict[str, float]``; see the module docstring."""

    run: Callable
    add_arguments: Optional[Callable] = None
    validate: Optional[Callable] = None
    description: str = ""

    def __call__(self, model, tokenizer, preprocess, epoch, args) -> Dict[str, float]:
        return self.run(model, tokenizer, preprocess, epoch, args)


# -- the registry: entry points, loaded when used ---------------------------------------------------
def _distribution(ep) -> str:
    dist = getattr(ep, "dist", None)  # Python 3.10 on
    return f"{dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown distribution"


def _group(group: str):
    try:
        return entry_points(group=group)
    except TypeError:  # Python 3.9: a dict of groups
        return entry_points().get(group, ())


def _scan(group: str):
    """({name: the entry point used}, [(name, first distribution, second distribution)])."""
    found = {}
    clashes = []
    for ep in _group(group):
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


def _warn_once(message: str) -> None:
    if message not in _reported:
        _reported.add(message)
        logging.warning(message)


def load(group: str, name: str):
    """Imports the plugin registered as ``name``. :class:`PluginError` for an unknown name (listing
    the known ones) or an import failure (naming the plugin, its distribution and the error)."""
    found, _ = _scan(group)
    for line in duplicates(group):
        _warn_once(line)
    if name not in found:
        raise PluginError(f"unknown plugin {name!r}; registered in entry-point group {group!r}: "
                          f"{', '.join(sorted(found)) or 'none'}")
    ep = found[name]
    try:
        return ep.load()
    except Exception as e:  # a broken third-party plugin must not look like the trainer's own error
        raise PluginError(f"plugin {name!r} ({ep.value}, from {_distribution(ep)}) failed to import: "
                          f"{type(e).__name__}: {e}") from e


def try_load(group: str, name: str):
    """(plugin, None), or (None, the error message) for one that cannot be loaded."""
    try:
        return load(group, name), None
    except PluginError as e:
        return None, str(e)


def _openclip_create_loss(args):
    from open_clip import create_loss
    return create_loss(args)


OPENCLIP_LOSS = LossPlugin(build=_openclip_create_loss,
                           description="OpenCLIP's own loss (ClipLoss, or SigLIP/CoCa/distillation by its flags)")


def available_losses() -> List[str]:
    """Every ``--loss`` name: the registered ones, and ``clip``."""
    return sorted(set(available(LOSS_GROUP)) | {DEFAULT_LOSS})


def available_eval_metrics() -> List[str]:
    return available(EVAL_METRICS_GROUP)


def available_eval_hooks() -> List[str]:
    return available(EVAL_HOOKS_GROUP)


def get_loss(name: str):
    """The loss plugin called ``name``; ``clip`` is OpenCLIP's ``create_loss`` unless registered."""
    if name == DEFAULT_LOSS and DEFAULT_LOSS not in _scan(LOSS_GROUP)[0]:
        return OPENCLIP_LOSS
    plugin = load(LOSS_GROUP, name)
    if not callable(plugin):
        raise PluginError(f"loss plugin {name!r} is a {type(plugin).__name__}, not a LossPlugin or a callable")
    return plugin


def get_eval_metric(name: str) -> Callable:
    return load(EVAL_METRICS_GROUP, name)


def _loadable(group: str, names: Sequence[str]) -> List[Tuple[str, object]]:
    """(name, plugin) for each of ``names`` that imports; each that does not is skipped with a warning."""
    loaded = []
    for name in names:
        plugin, error = try_load(group, name)
        if plugin is None:
            _warn_once(f"skipped: {error}")
        else:
            loaded.append((name, plugin))
    return loaded


# -- arguments ----------------------------------------------------------------------------------------
def chosen_loss(argv: Sequence[str]) -> str:
    """The value of ``--loss`` in a command line (``--loss NAME`` or ``--loss=NAME``), else ``clip``."""
    for i, token in enumerate(argv):
        if token == "--loss" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--loss="):
            return token.split("=", 1)[1]
    return DEFAULT_LOSS


def add_arguments(parser, argv: Sequence[str]) -> None:
    """Adds ``--loss``, ``--eval-metrics``, the evaluation hooks' flags and the chosen loss's flags
    (every loss's under ``--help``) to ``parser``. A plugin that cannot be imported gets a group
    in ``--help`` that says so, with its error."""
    losses = available_losses()
    group = parser.add_argument_group(ARGUMENT_GROUP)
    group.add_argument("--loss", default=DEFAULT_LOSS,
                       help=f"Training loss, by registered name: {', '.join(losses)}. Default: {DEFAULT_LOSS} "
                            "(OpenCLIP's own choice, unchanged).")
    group.add_argument("--eval-metrics", nargs="*", default=None, metavar="NAME",
                       help="Metrics of the validation features added to every evaluation, by registered name: "
                            f"{', '.join(available_eval_metrics()) or 'none installed'}. Default: all; the flag "
                            "alone for none.")
    for name in available_eval_hooks():
        hook, error = try_load(EVAL_HOOKS_GROUP, name)
        if hook is None:
            parser.add_argument_group(f"evaluation hook {name}", description=f"unavailable: {error}")
        elif getattr(hook, "add_arguments", None) is not None:
            hook.add_arguments(parser)
    wants_help = any(token in ("-h", "--help") for token in argv)
    chosen = chosen_loss(argv)
    for name in losses if wants_help else [chosen] if chosen in losses else []:
        try:
            plugin = get_loss(name)
        except PluginError as e:
            parser.add_argument_group(f"--loss {name}", description=f"unavailable: {e}")
            continue
        add = getattr(plugin, "add_arguments", None)
        if add is not None:
            add(parser.add_argument_group(f"--loss {name}: {getattr(plugin, 'description', '')}".rstrip(": ")))


def check_args(parser, args) -> None:
    """The checks after parsing, reported through ``parser.error``: the loss imports and its
    ``validate`` passes, the chosen evaluation metrics exist and import (``args.eval_metrics``
    defaults to every one that imports), and every evaluation hook's ``validate`` passes."""
    try:
        plugin = get_loss(args.loss)
    except PluginError as e:
        parser.error(str(e))
    validate = getattr(plugin, "validate", None)
    message = validate(args) if validate is not None else None
    if message:
        parser.error(message)
    if args.eval_metrics is None:
        args.eval_metrics = [name for name, _ in _loadable(EVAL_METRICS_GROUP, available_eval_metrics())]
    for name in args.eval_metrics:
        try:
            get_eval_metric(name)
        except PluginError as e:
            parser.error(str(e))
    for _, hook in _loadable(EVAL_HOOKS_GROUP, available_eval_hooks()):
        validate = getattr(hook, "validate", None)
        message = validate(args) if validate is not None else None
        if message:
            parser.error(message)


def parse_args(parser, argv: Optional[Sequence[str]] = None):
    """``parser.parse_args(argv)`` with the plugin flags and checks (:func:`add_arguments`,
    :func:`check_args`); ``argv`` None reads ``sys.argv``."""
    argv = sys.argv[1:] if argv is None else list(argv)
    add_arguments(parser, argv)
    args = parser.parse_args(argv)
    check_args(parser, args)
    return args


# -- training -------------------------------------------------------------------------------------------
def loss_state_dict(loss) -> Optional[dict]:
    """The loss's ``state_dict()``, or None where it has none or it is empty."""
    state_dict = getattr(loss, "state_dict", None)
    state = state_dict() if callable(state_dict) else None
    return state if state else None


def create_loss(args, loss_state: Optional[dict] = None):
    """The loss ``args.loss`` names, built from ``args``; ``loss_state`` (a resumed checkpoint's
    ``"loss"``) restored into it where it keeps a state."""
    loss = get_loss(args.loss)(args)
    if loss_state is not None and loss_state_dict(loss) is not None:
        loss.load_state_dict(loss_state)
    return loss


def set_epoch(loss, epoch: int) -> None:
    """Tells the loss which epoch (from 0) begins, where it wants to know."""
    if hasattr(loss, "set_epoch"):
        loss.set_epoch(epoch)


def checkpoint_entries(loss) -> dict:
    """What a training checkpoint gains: ``{"loss": state}``, or nothing for a loss without state."""
    state = loss_state_dict(loss)
    return {} if state is None else {"loss": state}


def loss_scalars(loss, epoch: int, step: int) -> Dict[str, float]:
    """At a logging step: the loss's ``logged_scalars()`` on one console line, returned as the
    ``train/<key>`` values for tensorboard and wandb (empty for a loss without them)."""
    logged = getattr(loss, "logged_scalars", None)
    scalars = logged() if logged is not None else {}
    if not scalars:
        return {}
    logging.info(f"Train Epoch: {epoch} step {step} loss scalars: "
                 + " ".join(f"{key}={value:.4g}" for key, value in scalars.items()))
    return {f"train/{key}": float(value) for key, value in scalars.items()}


# -- evaluation -----------------------------------------------------------------------------------------
def _merge(metrics: dict, extra: dict, source: str) -> None:
    clash = set(extra) & set(metrics)
    if clash:
        raise ValueError(f"{source} returned keys that already exist: {sorted(clash)}")
    metrics.update({key: float(value) for key, value in extra.items()})


def eval_metrics(args, image_features, text_features, existing=()) -> Dict[str, float]:
    """The chosen evaluation metrics (``args.eval_metrics``) of the validation features, as float32;
    a key that one of them shares with ``existing`` or with another raises ``ValueError``."""
    metrics = dict.fromkeys(existing)
    for name in getattr(args, "eval_metrics", None) or []:
        extra = get_eval_metric(name)(image_features.float(), text_features.float())
        _merge(metrics, extra, f"eval metric {name!r}")
    return {key: value for key, value in metrics.items() if key not in existing}


def eval_hooks(model, tokenizer, preprocess, epoch: int, args, existing=()) -> Dict[str, float]:
    """Every evaluation hook that imports, run on the model; key clashes as for :func:`eval_metrics`."""
    metrics = dict.fromkeys(existing)
    for name, hook in _loadable(EVAL_HOOKS_GROUP, available_eval_hooks()):
        _merge(metrics, hook(model, tokenizer, preprocess, epoch, args), f"evaluation hook {name!r}")
    return {key: value for key, value in metrics.items() if key not in existing}


# -- checkpoints --------------------------------------------------------------------------------------
class CheckpointSaveError(OSError):
    """A checkpoint could not be written (a full disk, a quota, permissions); the message is one line
    naming the cause, the folder and the size the checkpoint needed. Nothing was left under its name."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


class NonFiniteCheckpointError(ValueError):
    """A checkpoint's model weights hold NaN or Inf (a diverged run); it was not saved."""


class _RecordingWriter:
    """The file ``torch.save`` writes through, keeping the ``OSError`` of a failed write: torch
    reports it as a ``RuntimeError`` ("unexpected pos ...") that no longer says what happened."""

    def __init__(self, file=None):
        self.file, self.size, self.error = file, 0, None

    def write(self, data) -> int:
        try:
            written = len(data) if self.file is None else self.file.write(data)
        except OSError as e:
            self.error = e
            raise
        self.size += len(data)
        return written

    def flush(self) -> None:
        if self.file is not None:
            self.file.flush()


def _megabytes(size: int) -> str:
    return f"{size / 1e6:.1f} MB"


def nonfinite_tensor(state_dict) -> Optional[str]:
    """The name of the first floating-point tensor of ``state_dict`` that holds NaN or Inf, or None.
    One device synchronisation per device the tensors are on. (Each tensor's minimum and maximum:
    NaN carries through both, Inf reaches one; a pass with no tensor-sized temporary.)"""
    import torch
    names = [name for name, value in state_dict.items()
             if torch.is_tensor(value) and value.is_floating_point() and value.numel()]
    finite = {}
    for device in {state_dict[name].device for name in names}:
        on_device = [name for name in names if state_dict[name].device == device]
        ends = torch.stack([torch.stack(state_dict[name].aminmax()).float() for name in on_device])
        finite.update(zip(on_device, torch.isfinite(ends).all(dim=1).cpu().tolist()))
    return next((name for name in names if not finite[name]), None)


def _save_failure(error: OSError, path: str, checkpoint) -> str:
    folder, name = os.path.dirname(os.path.abspath(path)), os.path.basename(path)
    reason = error.strerror or str(error)
    if error.errno in (errno.ENOSPC, errno.EDQUOT):
        import torch
        needed = _RecordingWriter()
        try:
            torch.save(checkpoint, needed)  # only on this error path: the size it needed
            size = f"{name} needs {_megabytes(needed.size)}, {_megabytes(shutil.disk_usage(folder).free)} free"
        except Exception as e:  # the error says what it can without the size
            size = f"saving {name}; its size is unknown: {type(e).__name__}"
        return (f"{reason}: {folder} ({size}); nothing was written under that name and the earlier checkpoints "
                "are as they were")
    return (f"{reason}: {folder} (saving {name}); nothing was written under that name and the earlier "
            "checkpoints are as they were")


def write_whole(path: str, write: Callable) -> None:
    """Calls ``write(f)`` on a new binary file in ``path``'s folder, hidden under a temporary name
    (``.NAME.<random>.tmp``, which no ``*.pt`` pattern matches; its mode that of a file ``open``
    creates), flushes it to the disk and renames it to ``path`` in one step: a file under ``path`` is
    always whole. Whatever stops the write (an error, a full disk, Ctrl-C) leaves the file that was
    under ``path`` before, if any, and removes the temporary file (a process killed outright leaves
    it behind, under its hidden name); the error is raised."""
    folder = os.path.dirname(os.path.abspath(path))
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)
    while True:
        temporary = os.path.join(folder, f".{os.path.basename(path)}.{os.urandom(4).hex()}.tmp")
        try:
            handle = os.open(temporary, flags, 0o666)
            break
        except FileExistsError:
            continue
    try:
        with os.fdopen(handle, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.unlink(temporary)
        raise
    try:  # the rename itself reaches the disk
        directory = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(directory)
    except OSError:
        pass
    finally:
        os.close(directory)


def save_checkpoint(checkpoint, path: str) -> None:
    """``torch.save(checkpoint, path)`` written whole or not at all (:func:`write_whole`).

    Raises:
        NonFiniteCheckpointError: ``checkpoint["state_dict"]`` holds NaN or Inf (nothing written).
        CheckpointSaveError: the write failed; one line with the cause, the folder and, for a full
            disk or quota, the size needed and the space free.
    """
    import torch
    state_dict = checkpoint.get("state_dict") if isinstance(checkpoint, dict) else None
    bad = nonfinite_tensor(state_dict) if isinstance(state_dict, dict) else None
    if bad is not None:
        raise NonFiniteCheckpointError(
            f"{os.path.basename(path)} not saved: the model's weights are not finite (NaN or Inf in {bad}); the run "
            "has diverged (a learning rate too high, a loss temperature too low?); the earlier checkpoints are kept")
    writer = _RecordingWriter()

    def write(f):
        writer.file = f
        torch.save(checkpoint, writer)

    try:
        write_whole(path, write)
    except BaseException as e:
        error = writer.error or (e if isinstance(e, OSError) else None)
        if error is None:
            raise
        raise CheckpointSaveError(error.errno, _save_failure(error, path, checkpoint)) from None
