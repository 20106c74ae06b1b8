"""Run OpenCLIP 3.3.0's own trainer with ``--loss NAME`` and evaluation-metric plugins.

No OpenCLIP file is modified. For the duration of the run, names that
``open_clip_train.main`` bound at import are swapped for thin wrappers:

- ``argparse`` as seen by ``open_clip_train.params``: one parser holding OpenCLIP's flags,
  ``--loss``, ``--eval-metrics`` and every registered loss's own flags, with abbreviations
  off (OpenCLIP 3.3.0 would take ``--loss m2mix`` as ``--loss-dist-impl m2mix``);
- ``create_loss``: builds the loss named by ``--loss`` from the registry, restoring its state
  (the lambda generator) when resuming;
- ``train_one_epoch``: sets the loss's epoch, logs the mixing lambdas, saves the loss state
  beside the checkpoints after each epoch;
- ``pt_load``: notes which checkpoint (and epoch) a resume loads;
- ``open_clip_train.train.get_clip_metrics``: adds the evaluation-metric plugins' figures;
- ``torch.nn.parallel.DistributedDataParallel``: drops ``device_ids`` on the CPU, so several
  gloo processes can train with ``--device cpu``.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import sys
import types
from typing import List, Optional

import torch

from . import openclip_compat, registry

LOSS_STATE_TEMPLATE = "loss_state_epoch_{epoch}.pth"  # not *.pt: OpenCLIP's --resume latest globs *.pt


class _RunState:
    def __init__(self):
        self.eval_metrics: List[str] = []
        self.resume_path: Optional[str] = None
        self.resume_epoch: Optional[int] = None
        self.loss = None
        self.args: Optional[argparse.Namespace] = None


def add_plugin_arguments(parser: argparse.ArgumentParser) -> None:
    """Adds ``--loss``, ``--eval-metrics`` and each registered loss's own flags to ``parser``."""
    losses = registry.available_losses()
    group = parser.add_argument_group("loss and evaluation plugins (entry points)")
    group.add_argument("--loss", default="clip",
                       help=f"Training loss, by registered name: {', '.join(losses)}. Default: clip "
                            "(OpenCLIP's own choice, unchanged).")
    group.add_argument("--eval-metrics", nargs="*", default=None, metavar="NAME",
                       help="Extra metrics computed on the validation features at every evaluation, by "
                            f"registered name: {', '.join(registry.available_eval_metrics())}. Default: all; "
                            "give the flag with no name for none.")
    owners = {}
    for name in losses:
        plugin = registry.get_loss(name)
        add = getattr(plugin, "add_arguments", None)
        if add is None:
            continue
        before = set(parser._option_string_actions)
        add(parser.add_argument_group(f"--loss {name}: {getattr(plugin, 'description', '')}".rstrip(": ")))
        for option in set(parser._option_string_actions) - before:
            owners[option] = name
    parser._plugin_option_owners = owners


def check_plugin_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, argv) -> None:
    """argparse errors for an unknown loss or metric, a flag of another loss, or flags that
    the chosen loss rejects. Nothing given on the command line is silently ignored."""
    try:
        plugin = registry.get_loss(args.loss)
    except ValueError as e:
        parser.error(str(e))
    given = {token.split("=", 1)[0] for token in (argv or []) if token.startswith("--")}
    for option, owner in sorted(getattr(parser, "_plugin_option_owners", {}).items()):
        if option in given and owner != args.loss:
            parser.error(f"{option} belongs to --loss {owner}, but --loss is {args.loss}")
    validate = getattr(plugin, "validate", None)
    message = validate(args) if validate is not None else None
    if message:
        parser.error(message)
    if args.eval_metrics is None:
        args.eval_metrics = registry.available_eval_metrics()
    for name in args.eval_metrics:
        try:
            registry.get_eval_metric(name)
        except ValueError as e:
            parser.error(str(e))


class PluginArgumentParser(argparse.ArgumentParser):
    """OpenCLIP's parser with the plugin flags, and no abbreviations of long options."""

    def __init__(self, *args, **kwargs):
        kwargs["allow_abbrev"] = False
        kwargs.setdefault("prog", "m2mix-train")
        super().__init__(*args, **kwargs)
        add_plugin_arguments(self)

    def parse_args(self, args=None, namespace=None):
        argv = sys.argv[1:] if args is None else list(args)
        parsed = super().parse_args(argv, namespace)
        check_plugin_arguments(self, parsed, argv)
        return parsed


class DeviceAwareDDP(torch.nn.parallel.DistributedDataParallel):
    """DistributedDataParallel that accepts OpenCLIP's ``device_ids=[cpu]`` (only GPUs take device_ids)."""

    def __init__(self, module, device_ids=None, *args, **kwargs):
        if device_ids is not None and all(torch.device(d).type == "cpu" for d in device_ids):
            device_ids = None
        super().__init__(module, device_ids, *args, **kwargs)


class LambdaLogger:
    """Calls the loss, and logs its mixing lambdas at OpenCLIP's logging steps (console,
    tensorboard, wandb) as ``train/<term>_lambda``. Lambdas never enter the loss dict, whose
    every value the trainer adds to the loss."""

    def __init__(self, loss, epoch, num_batches_per_epoch, args, tb_writer=None):
        self.loss, self.epoch, self.args, self.tb_writer = loss, epoch, args, tb_writer
        self.num_batches = num_batches_per_epoch
        self.calls = 0

    def __call__(self, *args, **kwargs):
        out = self.loss(*args, **kwargs)
        self.calls += 1
        accum = self.args.accum_freq
        if self.calls % accum == 0 and self.args.rank == 0:
            i_accum = self.calls // accum - 1
            if i_accum % self.args.log_every_n_steps == 0 or i_accum + 1 == self.num_batches:
                self._log(self.num_batches * self.epoch + i_accum)
        return out

    def _log(self, step):
        lambdas = getattr(self.loss, "last_lambdas", {})
        if not lambdas:
            return
        logging.info(f"Train Epoch: {self.epoch} step {step} mixing lambda: "
                     + " ".join(f"{k}={v:.4f}" for k, v in lambdas.items())
                     + f" (schedule factor {getattr(self.loss, 'schedule_factor', 1.0):.4f})")
        data = {f"train/{k}_lambda": v for k, v in lambdas.items()}
        if self.tb_writer is not None:
            for name, value in data.items():
                self.tb_writer.add_scalar(name, value, step)
        if getattr(self.args, "wandb", False):
            import wandb
            wandb.log(data, step=step)


def _wrapped_in_ddp(args) -> bool:
    return args is not None and getattr(args, "distributed", False) and not getattr(args, "horovod", False)


def _has_state(loss) -> bool:
    return isinstance(loss, torch.nn.Module) and len(loss.state_dict()) > 0


def _save_loss_state(loss, args, completed_epoch: int) -> None:
    path = os.path.join(args.checkpoint_path, LOSS_STATE_TEMPLATE.format(epoch=completed_epoch))
    tmp = path + ".tmp"
    torch.save({"epoch": completed_epoch, "loss": args.loss, "state_dict": loss.state_dict()}, tmp)
    os.replace(tmp, path)  # never leave a half-written file under the final name


def _restore_loss_state(loss, run: _RunState) -> None:
    directory = os.path.dirname(run.resume_path)
    path = os.path.join(directory, LOSS_STATE_TEMPLATE.format(epoch=run.resume_epoch))
    if not os.path.exists(path):
        logging.warning(
            f"resuming from {run.resume_path} (epoch {run.resume_epoch}) without {os.path.basename(path)} "
            f"beside it: the loss state (mixing-lambda generator) restarts from its seed"
        )
        return
    state = torch.load(path, map_location="cpu", weights_only=True)
    loss.load_state_dict(state["state_dict"])
    logging.info(f"=> restored loss state from {path}")


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


def _argparse_shim():
    shim = types.ModuleType("argparse")
    shim.__dict__.update(argparse.__dict__)
    shim.ArgumentParser = PluginArgumentParser
    return shim


def parse_args(argv: List[str]) -> argparse.Namespace:
    """Parses a training command line exactly as ``main`` would, without training."""
    oc_params = openclip_compat.require_trainer().params
    with _swapped((oc_params, "argparse", _argparse_shim())):
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

    run = _RunState()
    original_parse_args = oc_params.parse_args
    original_train_one_epoch = oc_main.train_one_epoch
    original_pt_load = oc_main.pt_load
    original_get_clip_metrics = oc_train.get_clip_metrics

    argparse_shim = _argparse_shim()

    def parse_args(args):
        parsed = original_parse_args(args)
        run.eval_metrics = list(parsed.eval_metrics)
        run.args = parsed  # the namespace OpenCLIP fills in (distributed, rank, ...) as it goes
        return parsed

    def pt_load(path, *args, **kwargs):
        checkpoint = original_pt_load(path, *args, **kwargs)
        if isinstance(checkpoint, dict) and "epoch" in checkpoint:
            run.resume_path, run.resume_epoch = path, int(checkpoint["epoch"])
        elif isinstance(checkpoint, dict) and checkpoint and _wrapped_in_ddp(run.args):
            # OpenCLIP 3.3.0 loads a bare (model-only) state dict into the DDP-wrapped model,
            # whose keys start with "module.": fine-tuning from one on several processes fails.
            if not next(iter(checkpoint)).startswith("module."):
                checkpoint = {f"module.{k}": v for k, v in checkpoint.items()}
        return checkpoint

    def create_loss(args):
        loss = registry.get_loss(args.loss)(args)
        if run.resume_path is not None and _has_state(loss):
            _restore_loss_state(loss, run)
        run.loss = loss
        logging.info(f"Loss: --loss {args.loss} -> {type(loss).__name__}")
        return loss

    def train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, tb_writer=None):
        if hasattr(loss, "set_epoch"):
            loss.set_epoch(epoch)
        num_batches = data["train"].dataloader.num_batches // args.accum_freq
        logged = LambdaLogger(loss, epoch, num_batches, args, tb_writer) if hasattr(loss, "last_lambdas") else loss
        original_train_one_epoch(model, data, logged, epoch, optimizer, scaler, scheduler, dist_model, args,
                                 tb_writer=tb_writer)
        if args.save_logs and _has_state(loss):
            _save_loss_state(loss, args, epoch + 1)

    def get_clip_metrics(image_features, text_features, logit_scale):
        metrics = original_get_clip_metrics(image_features=image_features, text_features=text_features,
                                            logit_scale=logit_scale)
        for name in run.eval_metrics:
            extra = registry.get_eval_metric(name)(image_features.float(), text_features.float())
            clash = set(extra) & set(metrics)
            if clash:
                raise ValueError(f"eval metric {name!r} returned keys that already exist: {sorted(clash)}")
            metrics.update({key: float(value) for key, value in extra.items()})
        return metrics

    with _swapped(
        (oc_params, "argparse", argparse_shim),
        (oc_main, "parse_args", parse_args),
        (oc_main, "create_loss", create_loss),
        (oc_main, "train_one_epoch", train_one_epoch),
        (oc_main, "pt_load", pt_load),
        (oc_train, "get_clip_metrics", get_clip_metrics),
        (torch.nn.parallel, "DistributedDataParallel", DeviceAwareDDP),
    ):
        status = oc_main.main(argv)
    # OpenCLIP returns -1 (and the interpreter would exit 0) for "Experiment already exists" and
    # other refusals: make them visible to shells and schedulers.
    return 1 if status == -1 else 0
