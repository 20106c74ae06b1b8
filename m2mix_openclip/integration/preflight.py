"""Checks of a training command before OpenCLIP builds the model.

Each failure is one line that names the file or flag and the fix; ``m2mix-train`` prints it
and exits with 2, without a traceback. Data is read by :mod:`m2mix_openclip.datasets`, as
evaluation and the zero-shot hook read it (the same CSV columns check, the same image-path rule:
relative to the current directory, as OpenCLIP's ``CsvDataset`` opens images), and, where
OpenCLIP's reader decides, by OpenCLIP's own means: every CSV row through pandas as its
``CsvDataset`` reads them, shard names through its ``expand_urls``. What only training finds (a
row's image that is missing or broken, a shard sample that does not decode) is reported by
:mod:`.sample_errors`.
"""

from __future__ import annotations

import contextvars
import csv
import glob
import importlib.util
import io
import os
from typing import List, Optional, Tuple

from ..datasets import (
    IMAGE_EXTENSIONS,
    MissingImageError,
    iter_shard_members,
    read_csv_rows,
    resolve_image,
    shard_patterns,
)
from . import openclip_compat
from .checkpoints import checkpoint_problem, checkpoints_newest_first

__all__ = ["PreflightError", "MissingImageError", "check_args", "brace_pattern", "csv_row_lines", "one_line",
           "DATA_CHECKS"]

# False while a command line is parsed as a recipe for another machine (launcher.parse_args with
# check_data=False): the data checks here and the evaluation hooks' reading of their sets are skipped.
DATA_CHECKS: contextvars.ContextVar[bool] = contextvars.ContextVar("m2mix_data_checks", default=True)

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
    """The CSV as OpenCLIP's ``CsvDataset`` will read it: the columns it needs and the first image
    by the package's one path rule (:func:`m2mix_openclip.datasets.resolve_image`; only the first:
    training CSVs can hold millions of rows), and every byte and row as OpenCLIP reads them: UTF-8
    (:func:`_not_utf8`), through pandas (:func:`_check_csv_rows`)."""
    try:
        data = None
        if os.path.isfile(path):
            with open(path, "rb") as f:
                data = f.read()
            problem = _not_utf8(path, data)
            if problem is not None:
                raise ValueError(problem)
        [(line, row)] = read_csv_rows(path, {args.csv_img_key: "--csv-img-key",
                                             args.csv_caption_key: "--csv-caption-key"}, args.csv_separator, limit=1)
        resolve_image(row[args.csv_img_key], path, line)
        _check_csv_rows(path, data, args)
    except (OSError, ValueError) as e:
        raise PreflightError(f"{flag} {e}") from None


def _not_utf8(path: str, data: bytes) -> Optional[str]:
    """Where ``data`` (the file's bytes) is not UTF-8, as OpenCLIP's pandas reader decodes it."""
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        return (f"{path} line {line}: byte 0x{data[e.start]:02x} at column {column} is not UTF-8, which OpenCLIP's "
                "trainer reads CSV files as: save the file as UTF-8 (e.g. iconv -f latin1 -t utf-8)")
    return None


def csv_row_lines(path: str, sep: str, rows: int, data: Optional[bytes] = None) -> List[int]:
    """The line of the CSV at ``path`` on which each of its first ``rows`` rows ends (``data``: the
    file's bytes, where read already): row i on line i + 2, unless blank lines (which pandas skips
    too) or quoted line breaks move them."""
    if data is None:
        with open(path, "rb") as f:
            data = f.read()
    lines = data.count(b"\n") + (0 if data.endswith(b"\n") else 1)
    text = data.decode("utf-8-sig")
    if lines == rows + 1 and "\n\n" not in text and "\n\r\n" not in text:
        return list(range(2, rows + 2))
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=sep)
    next(reader, None)
    return [reader.line_num for row in reader if row][:rows]


def _check_csv_rows(path: str, data: bytes, args) -> None:
    """Every row, read by pandas exactly as OpenCLIP's ``CsvDataset`` reads it: a line pandas
    cannot split, and rows whose image or caption pandas reads as missing (an empty field, a row
    shorter than the header, or a text such as ``NA`` that pandas takes for a missing value; OpenCLIP
    would train on the text "nan"), are refused with their line numbers. ``data``: the file's
    bytes, UTF-8 already checked."""
    import pandas as pd
    try:
        frame = pd.read_csv(path, sep=args.csv_separator)
    except (ValueError, pd.errors.ParserError) as e:
        raise ValueError(f"{path}: pandas, which OpenCLIP's trainer reads CSV files with, cannot read it: "
                         f"{str(e).strip().splitlines()[-1]}") from None
    for column, flag, what in ((args.csv_caption_key, "--csv-caption-key", "caption"),
                               (args.csv_img_key, "--csv-img-key", "image path")):
        empty = [int(i) for i in frame.index[frame[column].isna()]]
        if empty:
            lines = csv_row_lines(path, args.csv_separator, len(frame), data)
            shown = ", ".join(str(lines[i]) for i in empty[:5]) + (f" and {len(empty) - 5} more" if len(empty) > 5
                                                                   else "")
            raise ValueError(
                f"{path}: {len(empty)} row(s) have no {what} ({flag} {column}: an empty field, a row shorter than "
                f"the header, or a text pandas reads as missing such as 'NA'), on line(s) {shown}; OpenCLIP would "
                f"train on them as the text 'nan': fill them in or remove those rows")


def _expand_shards(spec: str) -> List[str]:
    """The shard names OpenCLIP's loader reads for ``spec``, by its own ``expand_urls`` (``::``
    lists, brace patterns, ``${WDS_...}`` variables; a glob stays a literal name)."""
    data = _trainer_module("data")
    if data is not None:
        return list(data.expand_urls(spec)[0])
    return [pattern for source in spec.split("::") for pattern in shard_patterns(source)]


def _numbered_runs(numbers: List[str]) -> str:
    """``{a..b}`` (or ``{{a..b},c}`` for several runs) of equally wide decimal strings, sorted."""
    runs: List[List[int]] = []
    for number in sorted(set(numbers)):
        value = int(number)
        if runs and value == runs[-1][1] + 1:
            runs[-1][1] = value
        else:
            runs.append([value, value])
    width = len(numbers[0])
    parts = [f"{lo:0{width}d}" if lo == hi else f"{{{lo:0{width}d}..{hi:0{width}d}}}" for lo, hi in runs]
    if len(parts) == 1:
        return parts[0] if parts[0].startswith("{") else f"{{{parts[0]}}}"
    return "{" + ",".join(parts) + "}"


def brace_pattern(files: List[str], longest: int = 300) -> Optional[str]:
    """A brace pattern that OpenCLIP expands to exactly ``files`` (e.g. ``s-{000000..000003}.tar``),
    or None where none short enough exists."""
    files = sorted(set(files))
    if len(files) == 1:
        return files[0]
    prefix = os.path.commonprefix(files)
    suffix = os.path.commonprefix([f[len(prefix):][::-1] for f in files])[::-1]
    prefix = prefix.rstrip("0123456789")  # a number is never split between the prefix and the part that varies
    suffix = suffix[len(suffix) - len(suffix.lstrip("0123456789")):]
    middles = [f[len(prefix):len(f) - len(suffix)] for f in files]
    if all(m.isdigit() for m in middles) and len({len(m) for m in middles}) == 1:
        varying = _numbered_runs(middles)
    elif all(m and not set(m) & set("{},") for m in middles):
        varying = "{" + ",".join(middles) + "}"
    else:
        return None
    pattern = f"{prefix}{varying}{suffix}"
    return pattern if len(pattern) <= longest else None


def _glob_error(flag: str, spec: str, url: str, matches: List[str]) -> PreflightError:
    pattern = brace_pattern(matches)
    fix = (f"use {flag} '{spec.replace(url, pattern)}'" if pattern is not None
           else "name them with a brace pattern such as 'shard-{000000..000009}.tar', or join them with '::'")
    return PreflightError(
        f"{flag} {spec}: OpenCLIP reads shard names literally and expands only brace patterns and '::' lists, so it "
        f"would find no file {url!r} and wait for data forever; the glob matches {len(matches)} file(s) here: {fix}")


def _shard_problem(path: str) -> Optional[str]:
    """Why the shard at ``path`` cannot be read as a tar (its first member header), or None."""
    if os.path.getsize(path) == 0:
        return "is empty (0 bytes)"
    try:
        if next(iter_shard_members(path, extensions=()), None) is None:
            return "is a tar with no member"
    except (ValueError, OSError) as e:
        return f"is not a readable tar ({str(e).split(': ', 1)[-1]})"
    return None


def _first_sample_problem(path: str) -> Optional[str]:
    """None when the shard holds a sample (members with one key next to each other, as webdataset
    groups them for OpenCLIP) with an image and a ``txt`` caption, the samples OpenCLIP trains on;
    else what it holds."""
    extensions = set()
    key, members = None, set()
    try:
        for prefix, extension, _ in iter_shard_members(path, extensions=()):
            if prefix != key:
                key, members = prefix, set()
            members.add(extension)
            extensions.add(extension)
            if "txt" in members and members & set(IMAGE_EXTENSIONS):
                return None
    except (ValueError, OSError) as e:
        return f"is not a readable tar ({str(e).split(': ', 1)[-1]})"
    found = ", ".join(f".{e}" for e in sorted(extensions)) or "none"
    return (f"holds no sample with an image ({'/'.join(IMAGE_EXTENSIONS)}) and a txt caption next to each other "
            f"(member extensions found: {found}), so OpenCLIP would find nothing to train on")


def _check_shards(flag: str, spec: str) -> None:
    """Every shard OpenCLIP will read exists, is a readable non-empty tar, and the first holds a
    sample: otherwise OpenCLIP's loader skips each with a warning and, finding no sample, repeats
    its pass over the shards forever."""
    urls = _expand_shards(spec)
    local = [url for url in urls if not _is_remote(url)]
    missing = [url for url in local if not os.path.isfile(url)]
    for url in missing:
        if glob.has_magic(url):
            matches = glob.glob(url)
            if matches:
                raise _glob_error(flag, spec, url, matches)
    if missing:
        hint = "" if "{" in spec or len(urls) > 1 else "; use a brace pattern such as 'shard-{000000..000009}.tar'"
        raise PreflightError(
            f"{flag} {spec}: {len(missing)} of {len(urls)} shard(s) not found, e.g. {missing[0]}{hint}")
    bad = [(url, problem) for url in local for problem in [_shard_problem(url)] if problem is not None]
    if bad:
        named = "; ".join(f"{url} {problem}" for url, problem in bad[:3])
        more = f"; and {len(bad) - 3} more" if len(bad) > 3 else ""
        raise PreflightError(f"{flag} {spec}: {len(bad)} of {len(urls)} shard(s) cannot be read: {named}{more}; "
                             "remove them from the pattern or re-create them")
    if local:
        problem = _first_sample_problem(local[0])
        if problem is not None:
            raise PreflightError(f"{flag} {spec}: {local[0]} {problem}")


def _check_data(flag: str, spec: Optional[str], args) -> None:
    if not spec or args.dataset_type == "synthetic" or _is_remote(spec):
        return
    kind = _dataset_kind(spec.split("::")[0], args.dataset_type)
    by_extension = _dataset_kind(spec.split("::")[0], "auto")
    if by_extension not in (kind, "unknown"):  # --dataset-type is the type of --train-data and --val-data alike
        raise PreflightError(
            f"{flag} {spec}: --dataset-type {args.dataset_type} reads it as {kind}, but its extension says "
            f"{by_extension}; leave --dataset-type out (OpenCLIP then tells each file's type by its extension)")
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


def _latest_checkpoint(folder: str, save_most_recent: bool) -> Tuple[Optional[str], List[str]]:
    """The checkpoint ``--resume latest`` would take (OpenCLIP's own rule, where it has one, and
    the launcher's: skipping files that are not whole checkpoints), and those it would skip, each
    as "NAME why"."""
    if save_most_recent:  # OpenCLIP then reads only epoch_latest.pt
        path = os.path.join(folder, "epoch_latest.pt")
        return (path if os.path.exists(path) else None), []
    main = _trainer_module("main")
    newest = main.get_latest_checkpoint(folder, remote=False) if main is not None else None
    skipped = []
    for path in checkpoints_newest_first(folder, newest, main.natural_key if main is not None else str):
        problem = checkpoint_problem(path)
        if problem is None:
            return path, skipped
        skipped.append(f"{os.path.basename(path)} {problem}")
    return None, skipped


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
    latest, skipped = _latest_checkpoint(os.path.join(folder, "checkpoints"), getattr(args, "save_most_recent", False))
    if latest:
        held = f"--resume latest continues from {os.path.basename(latest)}"
        if skipped:
            held += f", skipping {'; '.join(skipped)}"
    elif skipped:
        held = f"no checkpoint that loads: {'; '.join(skipped)}; remove them to start again in the same folder"
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


def one_line(error: BaseException) -> str:
    """The message of ``error`` as one line: DataLoader workers re-raise an error with the
    worker's traceback text in its message, whose last line is the original error."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    last = lines[-1]
    name = type(error).__name__ + ": "
    return last.split(name, 1)[1] if name in last else last
