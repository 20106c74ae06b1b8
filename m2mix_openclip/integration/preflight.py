"""Checks of a training command before OpenCLIP builds the model, and clear errors during it.

Each failure is one line that names the file or flag and the fix; ``m2mix-train`` prints it
and exits with 2, without a traceback. What can only be found while training (an image that a
CSV row names but that is missing) raises :class:`MissingImageError` with the file and line.
Data is read by :mod:`m2mix_openclip.datasets`, as evaluation and the zero-shot hook read it:
the same CSV columns check, the same image-path rule (relative to the current directory, as
OpenCLIP's ``CsvDataset`` opens images) and the same error for a missing image.
"""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
from typing import Optional

from ..datasets import MissingImageError, missing_image_error, read_csv_rows, resolve_image, shard_patterns
from . import openclip_compat

__all__ = ["PreflightError", "MissingImageError", "check_args", "report_missing_images", "one_line"]

CONTRASTIVE_LOSSES = ("clip", "m2mix")


class PreflightError(ValueError):
    """A training command that cannot work; the message is one line naming the flag and the fix."""


def _is_remote(path: str) -> bool:
    return "://" in path or path.startswith("pipe:")


def _dataset_kind(path: str, dataset_type: str) -> str:
    if dataset_type != "auto":
        return dataset_type
    ext = path.rsplit(".", 1)[-1]
    return {"csv": "csv", "tsv": "csv", "tar": "webdataset"}.get(ext, "unknown")


def _check_csv(flag: str, path: str, args) -> None:
    """The header and the first row, read as OpenCLIP's ``CsvDataset`` will read every row: the
    columns it needs, and the first image by the package's one path rule
    (:func:`m2mix_openclip.datasets.resolve_image`). Only one row: training CSVs can hold millions."""
    try:
        [(line, row)] = read_csv_rows(path, {args.csv_img_key: "--csv-img-key",
                                             args.csv_caption_key: "--csv-caption-key"}, args.csv_separator, limit=1)
        resolve_image(row[args.csv_img_key], path, line)
    except (OSError, ValueError) as e:
        raise PreflightError(f"{flag} {e}") from None


def _check_shards(flag: str, spec: str) -> None:
    for source in spec.split("::"):  # OpenCLIP's separator for several sources
        if _is_remote(source):
            continue
        paths = shard_patterns(source)
        missing = [p for p in paths if not glob.glob(p)]
        if missing:
            example = missing[0]
            raise PreflightError(
                f"{flag} {source}: {len(missing)} of {len(paths)} shard(s) not found, e.g. {example}"
                + ("" if "{" in source or len(paths) > 1
                   else "; use a brace pattern such as 'shard-{000000..000009}.tar'"))


def _check_data(flag: str, spec: Optional[str], args) -> None:
    if not spec or args.dataset_type == "synthetic" or _is_remote(spec):
        return
    kind = _dataset_kind(spec.split("::")[0], args.dataset_type)
    if kind == "csv":
        _check_csv(flag, spec, args)
    elif kind == "webdataset":
        _check_shards(flag, spec)
    else:
        raise PreflightError(
            f"{flag} {spec}: cannot tell the dataset type from the extension; name a .csv/.tsv file or .tar "
            "shards, or pass --dataset-type csv|webdataset")


def _trainer_module(name: str):
    """A module of the installed OpenCLIP trainer (``open_clip_train`` or ``training``), or None."""
    try:
        return importlib.import_module(f"{openclip_compat.require_trainer().package}.{name}")
    except (ImportError, openclip_compat.UnsupportedOpenCLIP):
        return None


def _world_info():
    """(local rank, global rank, world size) from the launcher's environment, read by OpenCLIP's
    own ``world_info_from_env`` (torchrun, SLURM, MPI), as its trainer will read them."""
    distributed = _trainer_module("distributed")
    if distributed is not None:
        return distributed.world_info_from_env()
    return 0, 0, 1


def _world_size() -> int:
    return _world_info()[2]


def _latest_checkpoint(folder: str, save_most_recent: bool) -> Optional[str]:
    """The checkpoint OpenCLIP's ``--resume latest`` would take (its own rule, where it has one)."""
    if save_most_recent:  # OpenCLIP then reads only epoch_latest.pt
        path = os.path.join(folder, "epoch_latest.pt")
        return path if os.path.exists(path) else None
    main = _trainer_module("main")
    if main is not None:
        return main.get_latest_checkpoint(folder, remote=False)
    found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.pt")))
    return found[-1] if found else None


def _check_experiment(args) -> None:
    """OpenCLIP refuses a ``--name`` whose log file exists, unless ``--resume latest``, with a
    message that does not name the folder and no exit status; say which run it is and how to go
    on. The same file, on the same process, as OpenCLIP: ``logs/NAME/out.log`` on global rank 0,
    or ``out-RANK`` on each node's local rank 0 with ``--log-local`` (another rank would find the
    log that rank 0 of this very run has just created)."""
    name, logs = getattr(args, "name", None), getattr(args, "logs", None)
    if not name or not logs or getattr(args, "resume", None) == "latest":
        return
    local_rank, rank, _ = _world_info()
    log_local = getattr(args, "log_local", False)
    if (local_rank if log_local else rank) != 0:
        return
    folder = os.path.join(logs, name)
    log_file = os.path.join(folder, f"out-{rank}" if log_local else "out.log")
    if not os.path.exists(log_file):
        return
    latest = _latest_checkpoint(os.path.join(folder, "checkpoints"), getattr(args, "save_most_recent", False))
    if latest:
        held = f"--resume latest continues from {os.path.basename(latest)}"
    else:
        held = (f"no checkpoint to resume from: a run that failed or stopped before its first save? read "
                f"{log_file}; --resume latest starts again in the same folder")
    raise PreflightError(
        f"--name {name}: {folder} already holds a run ({held}); or choose another --name, or remove "
        f"{folder} to start over")


# --report-to target -> (module OpenCLIP imports, what to install)
REPORTERS = {"tensorboard": ("tensorboard", "pip install 'm2mix-openclip[tensorboard]' (or pip install tensorboard)"),
             "wandb": ("wandb", "pip install wandb")}


def _importable(module: str) -> bool:
    if module == "tensorboard":  # what OpenCLIP imports; it fails for a tensorboard torch cannot use
        try:
            importlib.import_module("torch.utils.tensorboard")
        except ImportError:
            return False
        return True
    return importlib.util.find_spec(module) is not None


def _check_reporters(args) -> None:
    """OpenCLIP asserts "Please install tensorboard." only after it has built the model (and
    only where it saves logs: not with ``--logs none``)."""
    logs = getattr(args, "logs", None)
    saves_logs = bool(logs) and logs.lower() != "none"
    targets = [t.strip() for t in (getattr(args, "report_to", "") or "").split(",") if t.strip()]
    for name, (module, install) in REPORTERS.items():
        if name == "tensorboard" and not saves_logs:
            continue
        if (name in targets or "all" in targets) and not _importable(module):
            raise PreflightError(f"--report-to {name} needs the {module} package, which is not installed: {install}")


def check_args(args, loss_name: Optional[str] = None) -> None:
    """Raises :class:`PreflightError` for data that cannot be read, a batch too small to train on,
    a ``--report-to`` whose package is missing, or a ``--name`` whose log folder holds a run."""
    _check_experiment(args)
    _check_reporters(args)
    _check_data("--train-data", getattr(args, "train_data", None), args)
    _check_data("--val-data", getattr(args, "val_data", None), args)
    loss_name = loss_name or getattr(args, "loss", "clip")
    if getattr(args, "train_data", None) and loss_name in CONTRASTIVE_LOSSES:
        global_batch = args.batch_size * _world_size()
        if global_batch < 2:
            raise PreflightError(
                f"--batch-size {args.batch_size} on {_world_size()} process(es) gives a global batch of "
                f"{global_batch} pair(s); a contrastive loss needs at least 2 to have a negative: raise --batch-size")


@contextlib.contextmanager
def report_missing_images(dataset_class):
    """Within the context, ``dataset_class`` (OpenCLIP's ``CsvDataset``) remembers its file and
    raises :class:`MissingImageError` naming the file, line and image for a missing image."""
    original_init, original_getitem = dataset_class.__init__, dataset_class.__getitem__

    def __init__(self, input_filename, *args, **kwargs):
        original_init(self, input_filename, *args, **kwargs)
        self._m2mix_source = input_filename

    def __getitem__(self, idx):
        try:
            return original_getitem(self, idx)
        except FileNotFoundError:
            source = getattr(self, "_m2mix_source", "the CSV")
            raise missing_image_error(source, idx + 2, str(self.images[idx])) from None

    dataset_class.__init__, dataset_class.__getitem__ = __init__, __getitem__
    try:
        yield
    finally:
        dataset_class.__init__, dataset_class.__getitem__ = original_init, original_getitem


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line: DataLoader workers re-raise an error with the
    worker's traceback text in its message, whose last line is the original error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    name = type(error).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last
