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
``main.create_loss``                       ``RunHooks.create_loss``: the registry's loss, its
                                           state restored on resume
``main.pt_load``                           ``RunHooks.pt_load``: keeps a checkpoint's loss state
``main.torch`` (``torch.save``)            ``RunHooks.save``: the loss state in each checkpoint
``main.train_one_epoch``                   ``RunHooks.train_one_epoch``: ``set_epoch``, and
                                           ``logged_scalars`` at OpenCLIP's logging steps
``main.get_data``                          ``RunHooks.get_data``: notes the evaluation transform
``train.get_clip_metrics``                 ``RunHooks.get_clip_metrics``: metric plugins
``train.zero_shot_eval``                   ``RunHooks.zero_shot_eval``: model-aware hooks
``data.CsvDataset``                        a missing image names its file and line
``DistributedDataParallel``                ``DeviceAwareDDP``: gloo on the CPU
=========================================  ==================================================
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import os
import sys
import types
from typing import Dict, List, Optional

import torch

from . import openclip_compat, preflight, registry
from .quiet import quiet_torch_loggers
from .suggest import suggest_flags

__all__ = ["PluginArgumentParser", "RunHooks", "StepLogger", "DeviceAwareDDP", "log_loss_scalars",
           "parse_args", "main"]

LEGACY_LOSS_STATE = "loss_state_epoch_{epoch}.pth"  # where m2mix-openclip 0.1.0 kept the loss state


# -- arguments -------------------------------------------------------------------------------------
def _chosen_loss(argv: List[str]) -> str:
    for i, token in enumerate(argv):
        if token == "--loss" and i + 1 < len(argv):
            return argv[i + 1]
        if token.startswith("--loss="):
            return token.split("=", 1)[1]
    return "clip"


class PluginArgumentParser(argparse.ArgumentParser):
    """OpenCLIP's parser, plus the plugin flags, with no abbreviations of long options (OpenCLIP
    would take ``--loss m2mix`` as ``--loss-dist-impl m2mix``).

    Only the chosen loss is imported and adds its flags (every loss for ``--help``, where one
    that cannot be imported is listed with its error). After parsing: the loss's ``validate``,
    the evaluation plugins' names and checks, and the pre-flight checks of the data. Errors are
    one line (no 60-line usage), with a did-you-mean for a mistyped flag.
    """

    check_data = True  # the pre-flight checks of data files (parse_args(..., check_data=False) skips them)

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("prog", "m2mix-train")
        super().__init__(*args, **kwargs)
        self._plugins_added = False
        self._loss_name = "clip"

    def _add_plugin_arguments(self, argv: List[str]) -> None:
        self._plugins_added = True
        wants_help = any(t in ("-h", "--help") for t in argv)
        self._loss_name = _chosen_loss(argv)
        group = self.add_argument_group("loss and evaluation plugins (m2mix-openclip)")
        losses = registry.available_losses()
        group.add_argument("--loss", default="clip",
                           help=f"Training loss, by registered name: {', '.join(losses)}. Default: clip "
                                "(OpenCLIP's own choice, unchanged).")
        group.add_argument("--eval-metrics", nargs="*", default=None, metavar="NAME",
                           help="Metrics of the validation features added to every evaluation, by registered "
                                f"name: {', '.join(registry.available_eval_metrics())}. Default: all; the flag "
                                "alone for none.")
        for name in registry.available(registry.EVAL_HOOKS_GROUP):
            hook, error = registry.try_load(registry.EVAL_HOOKS_GROUP, name)
            if hook is None:
                self.add_argument_group(f"evaluation hook {name}", description=f"unavailable: {error}")
            elif getattr(hook, "add_arguments", None) is not None:
                hook.add_arguments(self)
        for name in (losses if wants_help else [self._loss_name] if self._loss_name in losses else []):
            plugin, error = registry.try_load(registry.LOSS_GROUP, name)
            if plugin is None:
                self.add_argument_group(f"--loss {name}", description=f"unavailable: {error}")
                continue
            add = getattr(plugin, "add_arguments", None)
            if add is not None:
                add(self.add_argument_group(f"--loss {name}: {getattr(plugin, 'description', '')}".rstrip(": ")))
        # Our groups first in --help, OpenCLIP's ~190 lines after them.
        ours = self._action_groups[2:]
        self._action_groups[:] = ours + self._action_groups[:2]

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        if not self._plugins_added:
            self._add_plugin_arguments(argv)
        parsed = super().parse_args(argv, namespace)
        self._check(parsed)
        return parsed

    def _check(self, args) -> None:
        try:
            plugin = registry.get_loss(args.loss)
        except registry.PluginError as e:
            self.error(str(e))
        validate = getattr(plugin, "validate", None)
        message = validate(args) if validate is not None else None
        if message:
            self.error(message)
        if args.eval_metrics is None:
            args.eval_metrics = registry.available_eval_metrics()
        for name in args.eval_metrics:
            try:
                registry.get_eval_metric(name)
            except registry.PluginError as e:
                self.error(str(e))
        for name in registry.available(registry.EVAL_HOOKS_GROUP):
            hook, _ = registry.try_load(registry.EVAL_HOOKS_GROUP, name)
            message = getattr(hook, "validate", None) and hook.validate(args)
            if message:
                self.error(message)
        try:
            if self.check_data:
                preflight.check_args(args, args.loss)
        except preflight.PreflightError as e:
            self.error(str(e))

    def error(self, message):
        if message.startswith("unrecognized arguments"):
            message = self._explain_unknown(message)
        self.exit(2, f"{self.prog}: error: {message}\n(run {self.prog} --help for every flag)\n")

    def _explain_unknown(self, message: str) -> str:
        """A flag of a loss that is not chosen says so; a typo gets the nearest flag."""
        for name in registry.available_losses():
            if name == self._loss_name:
                continue
            plugin, _ = registry.try_load(registry.LOSS_GROUP, name)
            add = getattr(plugin, "add_arguments", None)
            if add is None:
                continue
            probe = argparse.ArgumentParser(add_help=False)
            add(probe)
            for token in message.split(":", 1)[1].split():
                if token.split("=", 1)[0] in probe._option_string_actions:
                    return f"{token.split('=', 1)[0]} belongs to --loss {name}, but --loss is {self._loss_name}"
        return suggest_flags(message, self._option_string_actions) or message


def _argparse_shim(parser_class=None) -> types.ModuleType:
    shim = types.ModuleType("argparse")
    shim.__dict__.update(argparse.__dict__)
    shim.ArgumentParser = parser_class or PluginArgumentParser
    return shim


# -- logging at OpenCLIP's logging steps -------------------------------------------------------------
def log_loss_scalars(loss, epoch: int, step: int, args, tb_writer=None) -> Dict[str, float]:
    """Logs ``loss.logged_scalars()`` as ``train/<key>``: one console line, tensorboard, wandb."""
    scalars = loss.logged_scalars() if hasattr(loss, "logged_scalars") else {}
    if not scalars:
        return {}
    logging.info(f"Train Epoch: {epoch} step {step} loss scalars: "
                 + " ".join(f"{k}={v:.4g}" for k, v in scalars.items()))
    data = {f"train/{k}": float(v) for k, v in scalars.items()}
    if tb_writer is not None:
        for name, value in data.items():
            tb_writer.add_scalar(name, value, step)
    if getattr(args, "wandb", False):
        import wandb
        wandb.log(data, step=step)
    return scalars


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


def _has_state(loss) -> bool:
    return isinstance(loss, torch.nn.Module) and len(loss.state_dict()) > 0


class _TorchWithLossState:
    """``torch`` as OpenCLIP's main sees it, whose ``save`` adds the loss state to checkpoints."""

    def __init__(self, hooks: "RunHooks"):
        self._hooks = hooks

    def save(self, obj, *args, **kwargs):
        return torch.save(self._hooks.with_loss_state(obj), *args, **kwargs)

    def __getattr__(self, name):
        return getattr(torch, name)


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

    def parse_args(self, argv):
        self.args = self.originals["parse_args"](argv)  # the namespace OpenCLIP fills in as it goes
        return self.args

    def pt_load(self, path, *args, **kwargs):
        checkpoint = self.originals["pt_load"](path, *args, **kwargs)
        if isinstance(checkpoint, dict) and "epoch" in checkpoint:
            self.resume_path, self.resume_epoch = path, int(checkpoint["epoch"])
            self.resumed_loss_state = checkpoint.get("loss")
        elif isinstance(checkpoint, dict) and checkpoint and self.args is not None \
                and getattr(self.args, "distributed", False) and not getattr(self.args, "horovod", False):
            # OpenCLIP loads a bare (model-only) state dict into the DDP-wrapped model, whose keys
            # start with "module.": fine-tuning from one on several processes would fail.
            if not next(iter(checkpoint)).startswith("module."):
                checkpoint = {f"module.{k}": v for k, v in checkpoint.items()}
        return checkpoint

    def create_loss(self, args):
        loss = registry.get_loss(args.loss)(args)
        if self.resume_path is not None and _has_state(loss):
            state = self.resumed_loss_state
            legacy = os.path.join(os.path.dirname(self.resume_path), LEGACY_LOSS_STATE.format(epoch=self.resume_epoch))
            if state is None and os.path.exists(legacy):
                state = torch.load(legacy, map_location="cpu", weights_only=True)["state_dict"]
            if state is None:
                logging.warning(f"resuming from {self.resume_path} without a loss state in it: the loss state "
                                "(mixing-lambda generator) restarts from its seed")
            else:
                loss.load_state_dict(state)
                logging.info(f"=> restored loss state from {self.resume_path}")
        self.loss = loss
        logging.info(f"Loss: --loss {args.loss} -> {type(loss).__name__}")
        return loss

    def with_loss_state(self, obj):
        """A training checkpoint (a dict with ``epoch`` and ``state_dict``) gains ``"loss"``."""
        if isinstance(obj, dict) and "epoch" in obj and "state_dict" in obj and _has_state(self.loss):
            obj = dict(obj, loss=self.loss.state_dict())
        return obj

    def train_one_epoch(self, model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args,
                        tb_writer=None):
        if hasattr(loss, "set_epoch"):
            loss.set_epoch(epoch)
        writer = StepLogger(tb_writer, loss, epoch, args) if hasattr(loss, "logged_scalars") else tb_writer
        return self.originals["train_one_epoch"](model, data, loss, epoch, optimizer, scaler, scheduler,
                                                 dist_model, args, tb_writer=writer)

    def get_data(self, args, preprocess_fns, *rest, **kwargs):
        self.preprocess_val = preprocess_fns[1]
        return self.originals["get_data"](args, preprocess_fns, *rest, **kwargs)

    def get_clip_metrics(self, image_features, text_features, logit_scale):
        metrics = self.originals["get_clip_metrics"](image_features=image_features, text_features=text_features,
                                                     logit_scale=logit_scale)
        for name in getattr(self.args, "eval_metrics", None) or []:
            extra = registry.get_eval_metric(name)(image_features.float(), text_features.float())
            _merge(metrics, extra, f"eval metric {name!r}")
        return metrics

    def zero_shot_eval(self, model, data, epoch, args, tokenizer=None):
        # OpenCLIP 2.20's evaluate passes no tokenizer, and its zero_shot_eval takes none
        metrics = self.originals["zero_shot_eval"](model, data, epoch, args,
                                                   **({} if tokenizer is None else {"tokenizer": tokenizer}))
        if tokenizer is None:
            import open_clip
            tokenizer = open_clip.get_tokenizer(args.model)
        for name in registry.available(registry.EVAL_HOOKS_GROUP):
            hook = registry.load(registry.EVAL_HOOKS_GROUP, name)
            _merge(metrics, hook(model, tokenizer, self.preprocess_val, epoch, args), f"evaluation hook {name!r}")
        return metrics


def _merge(metrics: dict, extra: dict, source: str) -> None:
    clash = set(extra) & set(metrics)
    if clash:
        raise ValueError(f"{source} returned keys that already exist: {sorted(clash)}")
    metrics.update({key: float(value) for key, value in extra.items()})


@contextlib.contextmanager
def _swapped(*triples):
    saved = [(obj, name, getattr(obj, name)) for obj, name, _ in triples]
    try:
        for obj, name, value in triples:
            setattr(obj, name, value)
        yield
    finally:
        for obj, name, value in reversed(saved):
            setattr(obj, name, value)


def parse_args(argv: List[str], check_data: bool = True) -> argparse.Namespace:
    """Parses a training command line exactly as ``main`` would, without training; with
    ``check_data=False`` the data files need not exist (recipes for another machine)."""
    oc_params = openclip_compat.require_trainer().params
    parser_class = type("RecipeArgumentParser", (PluginArgumentParser,), {"check_data": check_data})
    with _swapped((oc_params, "argparse", _argparse_shim(parser_class))):
        return oc_params.parse_args(openclip_compat.translate_model_argument(argv))


def main(argv: Optional[List[str]] = None) -> int:
    """``m2mix-train [OpenCLIP flags] --loss NAME [loss flags]``; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:  # the trainer of any supported OpenCLIP (open_clip_train, or training before 2.26)
        trainer = openclip_compat.require_trainer()
        argv = openclip_compat.translate_model_argument(argv)  # local-dir: before OpenCLIP 3.0 too
    except (openclip_compat.UnsupportedOpenCLIP, OSError, ValueError) as e:
        print(f"m2mix-train: error: {e}", file=sys.stderr)
        return 2
    oc_main, oc_params, oc_train = trainer.main, trainer.params, trainer.train
    if trainer.plugins_patch_applied:
        # OpenCLIP carries one of patches/: it has --loss, the plugin groups, loss-state
        # checkpoints and CPU DDP itself. Run it as it is.
        status = oc_main.main(argv)
        return 1 if status == -1 else 0
    oc_data = importlib.import_module(f"{trainer.package}.data")

    names = ("parse_args", "create_loss", "train_one_epoch", "pt_load", "get_data")
    originals = {name: getattr(oc_main, name) for name in names}
    originals.update(get_clip_metrics=oc_train.get_clip_metrics, zero_shot_eval=oc_train.zero_shot_eval)
    hooks = RunHooks(originals)
    try:
        with _swapped(
            (oc_params, "argparse", _argparse_shim()),
            *[(oc_main, name, getattr(hooks, name)) for name in names],
            (oc_main, "torch", _TorchWithLossState(hooks)),
            (oc_train, "get_clip_metrics", hooks.get_clip_metrics),
            (oc_train, "zero_shot_eval", hooks.zero_shot_eval),
            (torch.nn.parallel, "DistributedDataParallel", DeviceAwareDDP),
        ), preflight.report_missing_images(oc_data.CsvDataset):
            status = oc_main.main(argv)
    except preflight.MissingImageError as e:
        logging.error(preflight.one_line(e))
        print(f"m2mix-train: error: {preflight.one_line(e)}", file=sys.stderr)
        return 1
    finally:
        quiet_torch_loggers()  # no TorchDynamo / FakeTensor statistics after the run's last line
    # OpenCLIP returns -1 (and the interpreter would exit 0) for "Experiment already exists" and
    # other refusals: make them visible to shells and schedulers.
    return 1 if status == -1 else 0
