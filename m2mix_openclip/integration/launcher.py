"""``m2mix-train``: OpenCLIP's own trainer, with ``--loss NAME`` and the plugin protocol.

No OpenCLIP file is modified. For the duration of the run, names that OpenCLIP's ``main``
bound at import are swapped for the module-level hooks below (each documented and tested on
its own); ``patches/`` gives OpenCLIP the same behaviour natively. The trainer package
(``open_clip_train``, or ``training`` before OpenCLIP 2.26) comes from ``openclip_compat``.

=========================================  ==================================================
swapped name                               hook
=========================================  ==================================================
``params.argparse``                        ``PluginArgumentParser``: ``--loss``, the chosen
                                           loss's flags, evaluation plugins, no abbreviations
``main.create_loss``                       ``RunHooks.create_loss``: the plugin's loss, its
                                           state restored on resume, watched for NaN/Inf
``main.get_latest_checkpoint``             ``RunHooks.get_latest_checkpoint``: ``--resume
                                           latest`` skips checkpoints that do not load
``main.pt_load``                           ``RunHooks.pt_load``: keeps a checkpoint's loss state;
                                           one line for a checkpoint that does not load
``main.torch`` (``torch.save``)            ``RunHooks.save_checkpoint``: the loss state in each
                                           checkpoint, written whole, never non-finite weights
``main.os`` (``remove``, ``replace``)      ``KeepingCheckpoints``: no checkpoint deleted after
                                           one that was not saved
``main.open``, ``train.open``              ``open_whole``: params.txt and results.jsonl
                                           written whole
``main.train_one_epoch``                   ``RunHooks.train_one_epoch``: ``set_epoch``,
                                           ``logged_scalars`` at OpenCLIP's logging steps, and
                                           the divergence stop (:mod:`.divergence`)
``main.get_data``                          ``RunHooks.get_data``: notes the evaluation transform;
                                           shards that form no batch stop the run
``train.get_clip_metrics``                 ``RunHooks.get_clip_metrics``: metric plugins
``train.zero_shot_eval``                   ``RunHooks.zero_shot_eval``: model-aware hooks
``data.CsvDataset``                        a missing or broken image names its file and line
``data.wds`` (``decode``)                  a shard sample that does not decode is named
``DistributedDataParallel``                ``DeviceAwareDDP``: gloo on the CPU
=========================================  ==================================================

A run that cannot go on ends in one line (``m2mix-train: error: ...``) and exit status 1: bad data
met while training (:mod:`.sample_errors`), a checkpoint that cannot be saved or loaded
(:mod:`.checkpoints`), a loss that turned NaN or Inf (:mod:`.divergence`). Ctrl-C ends it in one
line too (where it stopped, the newest checkpoint and the command that goes on; exit status 130),
and ``--resume`` of a run that has trained all its epochs says so (exit status 0).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import logging
import os
import shlex
import sys
import types
from typing import Dict, List, Optional, Set

import torch

from ..atomic import write_atomically
from . import openclip_compat, plugins, preflight
from .checkpoints import (
    CheckpointLoadError,
    checkpoint_problem,
    checkpoints_newest_first,
    latest_loadable,
    load_problem,
    remove_unfinished_saves,
)
from .divergence import ON_NONFINITE, DivergedError, NonfiniteWatch
from .quiet import RANDOM_INIT, dropped_log_messages, plain_progress, quiet_torch_loggers
from .sample_errors import (
    NoBatchError,
    UnreadableImageError,
    name_sample_errors,
    report_bad_samples,
    stop_passes_without_batch,
)
from .suggest import suggest_flags

__all__ = ["PluginArgumentParser", "RunHooks", "StepLogger", "DeviceAwareDDP", "KeepingCheckpoints", "open_whole",
           "log_loss_scalars", "add_run_arguments", "parse_args", "resume_command", "main", "RUN_ERRORS", "RunFinished"]

LEGACY_LOSS_STATE = "loss_state_epoch_{epoch}.pth"  # where m2mix-openclip 0.1.0 kept the loss state
RUN_GROUP = "m2mix-train: long runs"
INTERRUPTED = 130  # the shell's status of a command ended by SIGINT


class RunFinished(Exception):
    """``--resume`` of a checkpoint that has trained every epoch asked for: nothing to do (exit status 0)."""


# what ends a run in one line and exit status 1
RUN_ERRORS = (preflight.MissingImageError, UnreadableImageError, NoBatchError, CheckpointLoadError,
              plugins.CheckpointSaveError, plugins.NonFiniteCheckpointError, DivergedError)


# -- arguments -------------------------------------------------------------------------------------
def _record_options(container, into: Set[str]):
    """Makes ``container`` (a parser or argument group) add the option strings of every argument
    added through it, or through the groups it creates, to ``into``: argparse has no public list
    of a parser's options, but every ``add_argument`` returns its ``Action``."""
    add_argument = container.add_argument
    add_argument_group = container.add_argument_group
    add_mutually_exclusive_group = container.add_mutually_exclusive_group

    def recorded_argument(*args, **kwargs):
        action = add_argument(*args, **kwargs)
        into.update(action.option_strings)
        return action

    container.add_argument = recorded_argument
    container.add_argument_group = lambda *a, **k: _record_options(add_argument_group(*a, **k), into)
    container.add_mutually_exclusive_group = \
        lambda *a, **k: _record_options(add_mutually_exclusive_group(*a, **k), into)
    return container


def _loss_options(name: str) -> Set[str]:
    """The flags that loss plugin ``name`` adds (none where it cannot be imported)."""
    plugin, _ = plugins.try_load(plugins.LOSS_GROUP, name)
    add = getattr(plugin, "add_arguments", None)
    options: Set[str] = set()
    if add is not None:
        add(_record_options(argparse.ArgumentParser(add_help=False), options))
    return options


def add_run_arguments(parser) -> None:
    """The launcher's own flags (a patched OpenCLIP, run as it is, does not have them)."""
    group = parser.add_argument_group(RUN_GROUP)
    group.add_argument("--on-nonfinite", choices=ON_NONFINITE, default="stop",
                       help="When the loss is NaN or Inf at a step that no GradScaler skips (--precision fp32, bf16): "
                            "'stop' (default) at the next logging step, before the weights reach a checkpoint, or "
                            "'continue' as OpenCLIP does. Checkpoints whose weights are not finite are never saved.")


def _add_groups_first(parser: argparse.ArgumentParser, add_groups) -> None:
    """Calls ``add_groups(parser)`` and moves the argument groups it adds to the top of ``--help``
    (ours before OpenCLIP's ~190 lines). argparse has no public way to order groups: this is the
    one place that touches its private list of them."""
    groups = parser._action_groups
    before = len(groups)
    add_groups(parser)
    groups[:] = groups[before:] + groups[:before]


class PluginArgumentParser(argparse.ArgumentParser):
    """OpenCLIP's parser with the plugin protocol's flags and checks (:mod:`.plugins`), and with
    no abbreviations of long options (OpenCLIP would take ``--loss m2mix`` as ``--loss-dist-impl
    m2mix``). Its own: the plugin flags first in ``--help``, the pre-flight checks of the data,
    and one-line errors (no 60-line usage), with a did-you-mean for a mistyped flag and the loss
    that owns a flag given to another.
    """

    check_data = True  # the pre-flight checks of data files (parse_args(..., check_data=False) skips them)

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("prog", "m2mix-train")
        self.known_options: Set[str] = set()
        _record_options(self, self.known_options)
        super().__init__(*args, **kwargs)
        self._plugins_added = False
        self._loss_name = plugins.DEFAULT_LOSS

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        if not self._plugins_added:
            self._plugins_added = True
            self._loss_name = plugins.chosen_loss(argv)
            _add_groups_first(self, lambda parser: (plugins.add_arguments(parser, argv), add_run_arguments(parser)))
        parsed = super().parse_args(argv, namespace)
        plugins.check_args(self, parsed)
        try:
            if self.check_data:
                preflight.check_args(parsed, parsed.loss)
        except preflight.PreflightError as e:
            self.error(str(e))
        return parsed

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message = self._explain_unknown(message)
        self.exit(2, f"{self.prog}: error: {message}\n(run {self.prog} --help for every flag)\n")

    def _explain_unknown(self, message: str) -> str:
        """A flag of a loss that is not chosen says so; a flag of a newer OpenCLIP names the
        installed one and what to do; a typo gets the nearest flag."""
        flags = [token.split("=", 1)[0] for token in message.split(":", 1)[1].split()]
        for flag in flags:
            advice = openclip_compat.missing_flag_advice(flag)
            if advice is not None:
                return advice
        for name in plugins.available_losses():
            if name == self._loss_name:
                continue
            owned = _loss_options(name)
            for flag in flags:
                if flag in owned:
                    return f"{flag} belongs to --loss {name}, but --loss is {self._loss_name}"
        return suggest_flags(message, self.known_options) or message


def _argparse_shim(parser_class=None) -> types.ModuleType:
    shim = types.ModuleType("argparse")
    shim.__dict__.update(argparse.__dict__)
    shim.ArgumentParser = parser_class or PluginArgumentParser
    return shim


# -- logging at OpenCLIP's logging steps -------------------------------------------------------------
def log_loss_scalars(loss, epoch: int, step: int, args, tb_writer=None) -> Dict[str, float]:
    """Logs ``loss.logged_scalars()`` (:func:`.plugins.loss_scalars`: one console line) and writes
    them as ``train/<key>`` to tensorboard and wandb, as a patched OpenCLIP does; returns those values."""
    data = plugins.loss_scalars(loss, epoch, step)
    if data and tb_writer is not None:
        for name, value in data.items():
            tb_writer.add_scalar(name, value, step)
    if data and getattr(args, "wandb", False):
        import wandb
        wandb.log(data, step=step)
    return data


class StepLogger:
    """Stands in for OpenCLIP's ``tb_writer`` inside ``train_one_epoch``: forwards everything to
    the real writer (or nowhere, without ``--report-to tensorboard``), and at the first scalar of
    each of OpenCLIP's logging steps logs the loss's scalars at that step. So they follow
    OpenCLIP's own step arithmetic and ``--log-every-n-steps`` in every version."""

    def __init__(self, writer, loss, epoch: int, args):
        self._writer, self._loss, self._epoch, self._args = writer, loss, epoch, args
        self._last_step = None

    def add_scalar(self, name, value, step=None, *args, **kwargs):
        if self._writer is not None:
            self._writer.add_scalar(name, value, step, *args, **kwargs)
        if step is not None and step != self._last_step:
            self._last_step = step
            log_loss_scalars(self._loss, self._epoch, step, self._args, self._writer)

    def __getattr__(self, name):
        if self._writer is None:
            raise AttributeError(name)
        return getattr(self._writer, name)


class DeviceAwareDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that accepts OpenCLIP's ``device_ids=[cpu]`` (only GPUs take device_ids)."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class _TorchWithLossState:
    """``torch`` as OpenCLIP's main sees it: ``save`` of a training checkpoint to a path goes
    through :meth:`RunHooks.save_checkpoint`."""

    def __init__(self, hooks: "RunHooks"):
        self._hooks = hooks

    def save(self, obj, f, *args, **kwargs):
        obj = self._hooks.with_loss_state(obj)
        if args or kwargs or not isinstance(f, (str, os.PathLike)):
            return torch.save(obj, f, *args, **kwargs)
        return self._hooks.save_checkpoint(obj, os.fspath(f))

    def __getattr__(self, name):
        return getattr(torch, name)


class KeepingCheckpoints:
    """``os`` as OpenCLIP's main sees it. After a checkpoint that was not saved (its weights were
    not finite, under ``--on-nonfinite continue``) it keeps what OpenCLIP would now remove: the
    previous checkpoint (``--delete-previous-checkpoint``) stays, and the file that was never
    written is not moved into ``epoch_latest.pt`` (``--save-most-recent``)."""

    def __init__(self, hooks: "RunHooks"):
        self._hooks = hooks

    def remove(self, path, *args, **kwargs):
        if self._hooks.refused_save is not None:
            logging.warning(f"kept {path}: {os.path.basename(self._hooks.refused_save)} was not saved after it")
            return None
        return os.remove(path, *args, **kwargs)

    def replace(self, source, target, *args, **kwargs):
        refused = self._hooks.refused_save
        if refused is not None and os.path.abspath(source) == os.path.abspath(refused):
            return None
        return os.replace(source, target, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(os, name)


class _WholeTextFile(io.StringIO):
    """A text file that reaches the disk whole when closed (see :func:`open_whole`)."""

    def __init__(self, path: str, initial: str, encoding: str):
        super().__init__()
        self.write(initial)
        self._path, self._encoding = path, encoding

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.close()
        else:  # an error while writing: the file keeps what it held
            super().close()
        return False

    def close(self):
        if not self.closed:
            data = self.getvalue().encode(self._encoding)
            super().close()
            write_atomically(self._path, lambda f: f.write(data))


def open_whole(file, mode="r", *args, **kwargs):
    """``open`` as OpenCLIP's main and train see it: a text file they write (``"w"``: params.txt)
    or append to (``"a"``, ``"a+"``: results.jsonl) reaches the disk whole when closed, through a
    temporary file renamed into place (the old content and the new), so a run killed meanwhile
    leaves the file as it was; every other use is the built-in ``open``."""
    if mode not in ("w", "a", "a+") or args or not isinstance(file, (str, os.PathLike)):
        return open(file, mode, *args, **kwargs)
    path, encoding = os.fspath(file), kwargs.get("encoding") or "utf-8"
    initial = ""
    if mode != "w" and os.path.exists(path):
        with open(path, encoding=encoding) as f:
            initial = f.read()
    return _WholeTextFile(path, initial, encoding)


class RunHooks:
    """The launcher's hooks for one run, each a method taking what OpenCLIP passes to the name it
    replaces. State: the parsed args, the loss, a resumed checkpoint's loss state, the
    evaluation transform."""

    def __init__(self, originals: Dict[str, object]):
        self.originals = originals
        self.args: Optional[argparse.Namespace] = None
        self.loss = None
        self.resume_path: Optional[str] = None
        self.resume_epoch: Optional[int] = None
        self.resumed_loss_state = None
        self.preprocess_val = None
        self.evaluation_passes_tokenizer = openclip_compat.evaluation_passes_tokenizer()
        self.watch: Optional[NonfiniteWatch] = None
        self.refused_save: Optional[str] = None  # the checkpoint last refused for non-finite weights
        self._preloaded = None  # (path, checkpoint) that --resume latest has loaded already
        self.epoch: Optional[int] = None  # the epoch being trained

    def parse_args(self, argv):
        self.args = self.originals["parse_args"](argv)  # the namespace OpenCLIP fills in as it goes
        return self.args

    @property
    def first_rank(self) -> bool:
        return int(getattr(self.args, "rank", 0) or 0) == 0

    def get_latest_checkpoint(self, path, remote):
        """``--resume latest``: OpenCLIP's choice where it loads, else the newest checkpoint that
        does (each one skipped gets a warning); the temporary files of unfinished saves go."""
        newest = self.originals["get_latest_checkpoint"](path, remote=remote)
        if remote:
            return newest
        remove_unfinished_saves(path)
        sort_key = self.originals["main_module"].natural_key
        candidates = checkpoints_newest_first(path, newest, sort_key)
        chosen, checkpoint = latest_loadable(candidates, lambda p: self._openclip_load(p, map_location="cpu"), path)
        if chosen is not None:
            self._preloaded = (chosen, checkpoint)  # main loads it next: once is enough
        return chosen

    def _openclip_load(self, path, *args, **kwargs):
        """OpenCLIP's ``pt_load``, which also reads the numpy learning rates that its trainers
        before 2.30 store in their checkpoints (torch's safe loading refuses them otherwise)."""
        with openclip_compat.numpy_scalars_allowed():
            return self.originals["pt_load"](path, *args, **kwargs)

    def _load(self, path, *args, **kwargs):
        if self._preloaded is not None and self._preloaded[0] == path:
            checkpoint, self._preloaded = self._preloaded[1], None
            return checkpoint
        try:
            return self._openclip_load(path, *args, **kwargs)
        except FileNotFoundError:
            raise CheckpointLoadError(f"--resume {path}: file not found") from None
        except Exception as e:
            problem = checkpoint_problem(path) if os.path.isfile(path) else None
            raise CheckpointLoadError(f"--resume {path}: it {problem or f'cannot be loaded ({load_problem(e)})'}") \
                from None

    def pt_load(self, path, *args, **kwargs):
        checkpoint = self._load(path, *args, **kwargs)
        if isinstance(checkpoint, dict) and "epoch" in checkpoint:
            self.resume_path, self.resume_epoch = path, int(checkpoint["epoch"])
            self.resumed_loss_state = checkpoint.get("loss")
            trains = self.args is not None and (self.args.train_data or self.args.dataset_type == "synthetic")
            if trains and self.resume_epoch >= self.args.epochs:
                raise RunFinished(
                    f"{path} has trained {self.resume_epoch} epoch(s) and --epochs is {self.args.epochs}: nothing to "
                    f"train; raise --epochs above {self.resume_epoch} to train on")
        elif isinstance(checkpoint, dict) and checkpoint and self.args is not None \
                and getattr(self.args, "distributed", False) and not getattr(self.args, "horovod", False):
            # OpenCLIP loads a bare (model-only) state dict into the DDP-wrapped model, whose keys
            # start with "module.": fine-tuning from one on several processes would fail.
            if not next(iter(checkpoint)).startswith("module."):
                checkpoint = {f"module.{k}": v for k, v in checkpoint.items()}
        return checkpoint

    def create_loss(self, args):
        state = self.resumed_loss_state
        loss = plugins.create_loss(args, state)
        if self.resume_path is not None and plugins.loss_state_dict(loss) is not None:
            legacy = os.path.join(os.path.dirname(self.resume_path), LEGACY_LOSS_STATE.format(epoch=self.resume_epoch))
            if state is None and os.path.exists(legacy):  # only a loss with a state reads 0.1.0's file
                state = torch.load(legacy, map_location="cpu", weights_only=True)["state_dict"]
                loss.load_state_dict(state)
            if state is None:
                logging.warning(f"resuming from {self.resume_path} without a loss state in it: the loss state "
                                "(mixing-lambda generator) restarts from its seed")
            else:
                logging.info(f"=> restored loss state from {self.resume_path}")
        self.loss = loss
        logging.info(f"Loss: --loss {args.loss} -> {type(loss).__name__}")
        watch = NonfiniteWatch(getattr(args, "on_nonfinite", "stop") == "stop",
                               functools.partial(self.divergence_message, args))
        self.watch = watch if watch.attach(loss) else None
        return loss

    def divergence_message(self, args, first_step: int, count: int, stopping: bool) -> str:
        """The line of a non-finite loss at ``first_step`` (``count`` loss values since the last check)."""
        seen = f"the loss was not finite (NaN or Inf) at step {first_step}" + (
            f" ({count} such losses since the previous logging step)" if count > 1 else "")
        if not stopping:
            return (f"{seen}: going on (--on-nonfinite continue); checkpoints whose weights are not finite are not "
                    "saved")
        folder = getattr(args, "checkpoint_path", None)
        sort_key = self.originals["main_module"].natural_key
        saved = checkpoints_newest_first(folder, None, sort_key) if folder else []
        newest = f"the newest checkpoint is {os.path.basename(saved[0])}" if saved else "no checkpoint was saved"
        causes = [f"a learning rate too high (--lr {args.lr})"]
        if getattr(args, "m2mix_temperature", None) is not None:
            causes.append(f"a loss temperature too low (--m2mix-temperature {args.m2mix_temperature})")
        return (f"{seen}, and under --precision {args.precision} no GradScaler skips such steps: the run stops here, "
                f"before its weights reach a checkpoint ({newest}). Usual causes: {', '.join(causes)}, or bad data; "
                "change them and --resume latest, or pass --on-nonfinite continue to go on as OpenCLIP does")

    def save_checkpoint(self, checkpoint, path: str) -> None:
        """:func:`.plugins.save_checkpoint`; under ``--on-nonfinite continue`` a checkpoint of
        non-finite weights is refused with a warning (and :class:`KeepingCheckpoints` keeps the
        previous one), else the refusal ends the run."""
        try:
            plugins.save_checkpoint(checkpoint, path)
        except plugins.NonFiniteCheckpointError as e:
            if getattr(self.args, "on_nonfinite", "stop") == "stop":
                raise
            logging.warning(str(e))
            self.refused_save = path
        else:
            self.refused_save = None

    def with_loss_state(self, obj):
        """A training checkpoint (a dict with ``epoch`` and ``state_dict``) gains ``"loss"``."""
        if isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj:
            obj = dict(obj, **plugins.checkpoint_entries(self.loss))
        return obj

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None):
        self.epoch = epoch
        plugins.set_epoch(loss, epoch)
        writer = StepLogger(tb_writer, loss, epoch, args) if hasattr(loss, "logged_scalars") else tb_writer
        if self.watch is not None and scaler is None and "train" in data:  # no GradScaler skips NaN steps
            data = self.watch.watched(data, epoch, args)
        return self.originals["train_one_epoch"](model, data, loss, epoch, optimizer, scaler, scheduler,
                                                 dist_model, args, tb_writer=writer)

    def get_data(self, args, preprocess_fns, *rest, **kwargs):
        self.preprocess_val = preprocess_fns[1]
        data = self.originals["get_data"](args, preprocess_fns, *rest, **kwargs)
        if "train" in data:
            buffered = self.originals["data_module"]._SAMPLE_SHUFFLE_INITIAL  # samples its shuffle holds first
            stop_passes_without_batch(data["train"], f"--train-data {args.train_data}", args.batch_size, buffered)
        return data

    def get_clip_metrics(self, image_features, text_features, logit_scale):
        metrics = self.originals["get_clip_metrics"](image_features=image_features, text_features=text_features,
                                                     logit_scale=logit_scale)
        metrics.update(plugins.eval_metrics(self.args, image_features, text_features, existing=metrics))
        return metrics

    def where_stopped(self) -> str:
        """Where the run is, and its newest checkpoint, for a run stopped from outside."""
        if self.epoch is None:
            where = "before training began"
        else:
            step = f", step {self.watch.step}" if self.watch is not None else ""
            where = f"in epoch {self.epoch}{step}"
        folder = getattr(self.args, "checkpoint_path", None)
        saved = checkpoints_newest_first(folder, None, self.originals["main_module"].natural_key) if folder else []
        return f"{where}; " + (f"the newest checkpoint is {saved[0]}" if saved else "no checkpoint was saved")

    def zero_shot_eval(self, model, data, epoch, args, tokenizer=None):
        if self.evaluation_passes_tokenizer:
            metrics = self.originals["zero_shot_eval"](model, data, epoch, args, tokenizer=tokenizer)
        else:
            metrics = self.originals["zero_shot_eval"](model, data, epoch, args)
        if tokenizer is None:  # a trainer that evaluates without the run's tokenizer: the hooks get the model's
            import open_clip
            tokenizer = open_clip.get_tokenizer(args.model)
        metrics.update(plugins.eval_hooks(model, tokenizer, self.preprocess_val, epoch, args, existing=metrics))
        return metrics


_ABSENT = object()


@contextlib.contextmanager
def _swapped(*triples):
    """Sets each ``(object, name, value)`` for the duration; a name the object did not have (a
    module's built-in ``open``) is removed again."""
    saved = [(obj, name, getattr(obj, name, _ABSENT)) for obj, name, _ in triples]
    try:
        for obj, name, value in triples:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            if value is _ABSENT:
                delattr(obj, name)
            else:
                setattr(obj, name, value)


def parse_args(argv: List[str], check_data: bool = True) -> argparse.Namespace:
    """Parses a training command line exactly as ``main`` would, without training; with
    ``check_data=False`` the data files need not exist (recipes for another machine): neither
    the pre-flight checks nor the evaluation hooks' sets (``--zeroshot-data``) read them."""
    oc_params = openclip_compat.require_trainer().params
    parser_class = type("RecipeArgumentParser", (PluginArgumentParser,), {"check_data": check_data})
    token = preflight.DATA_CHECKS.set(check_data)
    try:
        with _swapped((oc_params, "argparse", _argparse_shim(parser_class))):
            return oc_params.parse_args(openclip_compat.translate_model_argument(argv))
    finally:
        preflight.DATA_CHECKS.reset(token)


def resume_command(argv: List[str]) -> str:
    """The command that continues a stopped run: ``argv`` with ``--resume latest`` for its ``--resume``."""
    kept, skip = [], False
    for token in argv:
        if skip:
            skip = False
        elif token == "--resume":
            skip = True
        elif not token.startswith("--resume="):
            kept.append(token)
    return shlex.join(["m2mix-train", *kept, "--resume", "latest"])


def main(argv: Optional[List[str]] = None) -> int:
    """``m2mix-train [OpenCLIP flags] --loss NAME [loss flags]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    given = list(argv)
    try:  # the trainer of any supported OpenCLIP (open_clip_train, or training before 2.26)
        trainer = openclip_compat.require_trainer()
        argv = openclip_compat.translate_model_argument(argv)  # local-dir: before OpenCLIP 3.0 too
    except (openclip_compat.UnsupportedOpenCLIP, OSError, ValueError) as e:
        print(f"m2mix-train: error: {e}", file=sys.stderr)
        return 2
    oc_main, oc_params, oc_train = trainer.main, trainer.params, trainer.train
    oc_zero_shot = importlib.import_module(f"{trainer.package}.zero_shot")
    if trainer.plugins_patch_applied:
        # OpenCLIP carries one of patches/: it has --loss, the plugin groups, loss-state
        # checkpoints and CPU DDP itself. Run it as it is.
        try:
            with plain_progress(oc_zero_shot):
                status = oc_main.main(argv)
        except KeyboardInterrupt:
            print(f"m2mix-train: stopped by Ctrl-C. To go on: {resume_command(given)}", file=sys.stderr)
            return INTERRUPTED
        finally:
            quiet_torch_loggers()
        return 1 if status == -1 else 0
    oc_data = importlib.import_module(f"{trainer.package}.data")

    names = ("parse_args", "create_loss", "train_one_epoch", "pt_load", "get_data", "get_latest_checkpoint")
    originals = {name: getattr(oc_main, name) for name in names}
    originals.update(get_clip_metrics=oc_train.get_clip_metrics, zero_shot_eval=oc_train.zero_shot_eval,
                     main_module=oc_main, data_module=oc_data)
    hooks = RunHooks(originals)
    resuming = lambda: hooks.args is not None and hooks.args.resume is not None  # noqa: E731
    try:
        with _swapped(
            (oc_params, "argparse", _argparse_shim()),
            *[(oc_main, name, getattr(hooks, name)) for name in names],
            (oc_main, "torch", _TorchWithLossState(hooks)),
            (oc_main, "os", KeepingCheckpoints(hooks)),
            (oc_main, "open", open_whole),
            (oc_train, "open", open_whole),
            (oc_train, "get_clip_metrics", hooks.get_clip_metrics),
            (oc_train, "zero_shot_eval", hooks.zero_shot_eval),
            (torch.nn.parallel, "DistributedDataParallel", DeviceAwareDDP),
        ), report_bad_samples(oc_data.CsvDataset), name_sample_errors(oc_data), plain_progress(oc_zero_shot), \
                dropped_log_messages(*RANDOM_INIT, when=resuming):  # the checkpoint's weights come next
            status = oc_main.main(argv)
    except RunFinished as e:
        if hooks.first_rank:
            logging.info(str(e))
            print(f"m2mix-train: {e}", file=sys.stderr)
        return 0
    except KeyboardInterrupt:
        if hooks.first_rank:
            message = f"stopped by Ctrl-C {hooks.where_stopped()}. To go on: {resume_command(given)}"
            logging.warning(message)
            print(f"m2mix-train: {message}", file=sys.stderr)
        return INTERRUPTED
    except RUN_ERRORS as e:
        if isinstance(e, DivergedError) and not hooks.first_rank:
            return 1  # every rank stops at the same step; the first says why
        message = preflight.one_line(e)
        logging.error(message)
        print(f"m2mix-train: error: {message}", file=sys.stderr)
        return 1
    finally:
        quiet_torch_loggers()  # no TorchDynamo / FakeTensor statistics after the run's last line
    # OpenCLIP returns -1 (and the interpreter would exit 0) for "Experiment already exists" and
    # other refusals: make them visible to shells and schedulers.
    return 1 if status == -1 else 0
