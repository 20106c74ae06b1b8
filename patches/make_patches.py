#!/usr/bin/env python3
"""Generates ``patches/open_clip_v*-loss-plugins.patch`` from the plugin protocol module and the
small trainer edits declared below, applied to OpenCLIP's pristine sources.

    python patches/make_patches.py            # rewrites both patches
    python patches/make_patches.py --check    # exit 1, naming the patch and the first differing
                                              # lines, where a committed patch is not what this generates
    python patches/make_patches.py --source ~/open_clip/src   # a clone (or an unpacked wheel) as the source

Each patch adds ``m2mix_openclip/integration/plugins.py`` verbatim as the trainer's ``plugins.py``
(the whole protocol) and makes the trainer call it: :data:`EDITS`, a few lines in ``main.py``,
``params.py`` and ``train.py``, each found by an anchor that must occur exactly once. Paths are
``a/src/<trainer package>/...`` (``git apply`` in a clone at the tag; ``patch -p2`` in the
site-packages of the installed wheel); the output has no timestamps, so it is the same on every
machine.

Sources of OpenCLIP release V, the first found: a ``--source DIR`` holding ``open_clip/version.py``
of V and the trainer package (a clone's ``src/``, an unpacked wheel, a site-packages); the folder
``.ci-matrix/V/open_clip`` that ``.ci/matrix`` installs; the ``open_clip_torch==V`` wheel in the
cache folder (``--cache``), fetched there with ``pip download --no-deps`` unless ``--offline``.
Files that a ``RECORD`` beside them describes (an installed or unpacked wheel) must match its hashes,
so a patched install is never taken for the pristine source.
"""

from __future__ import annotations

import argparse
import base64
import csv
import difflib
import hashlib
import io
import os
import re
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PATCHES_DIR = os.path.join(ROOT, "patches")
PROTOCOL_MODULE = os.path.join(ROOT, "m2mix_openclip", "integration", "plugins.py")
DEFAULT_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"),
                             "m2mix-openclip", "wheels")

# The releases a patch is made for, and their trainer package (``training`` before 2.26).
TRAINERS = {"3.3.0": "open_clip_train", "2.24.0": "training"}
TRAINER_FILES = ("main.py", "params.py", "train.py")


def patch_name(version: str) -> str:
    return f"open_clip_v{version}-loss-plugins.patch"


@dataclass(frozen=True)
class Edit:
    """In ``file``, the text ``anchor`` (exactly once) becomes ``replacement``. ``{plugins_import}``
    in the replacement is the file's own import form: ``from . import plugins`` where it imports
    its package's modules relatively, else ``from <package> import plugins``."""

    file: str
    anchor: str
    replacement: str
    why: str


PLUGINS_IMPORT = "{plugins_import}\n"
EDITS = [
    # main.py: the loss comes from the protocol, with the resumed loss state; set_epoch; the loss
    # state in each checkpoint, each written whole; the evaluation transform for hooks.
    Edit("main.py",
         "from open_clip import create_model_and_transforms, trace_model, get_tokenizer, create_loss\n",
         "from open_clip import create_model_and_transforms, trace_model, get_tokenizer\n" + PLUGINS_IMPORT,
         "the protocol module; create_loss now comes from it"),
    Edit("main.py",
         "    if args.distill:\n"
         "        # FIXME: currently assumes the model you're distilling from has the same tokenizer & transforms.\n",
         "    plugins.preprocess_val = preprocess_val  # for evaluation hooks that see the model\n"
         "    if args.distill:\n"
         "        # FIXME: currently assumes the model you're distilling from has the same tokenizer & transforms.\n",
         "the evaluation transform, for hooks"),
    Edit("main.py",
         "        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device], **ddp_args)\n",
         "        # DistributedDataParallel takes device_ids for accelerators only (gloo on CPU has none).\n"
         "        device_ids = [device] if device.type != 'cpu' else None\n"
         "        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **ddp_args)\n",
         "DDP on the CPU"),
    Edit("main.py",
         "            dist_model = torch.nn.parallel.DistributedDataParallel(dist_model, device_ids=[device], "
         "**ddp_args)\n",
         "            dist_model = torch.nn.parallel.DistributedDataParallel(dist_model, device_ids=device_ids, "
         "**ddp_args)\n",
         "DDP on the CPU, for the distillation teacher"),
    Edit("main.py",
         "    start_epoch = 0\n",
         "    start_epoch = 0\n"
         "    loss_state = None\n",
         "the loss state of a resumed checkpoint"),
    Edit("main.py",
         "            logging.info(f\"=> resuming checkpoint '{args.resume}' (epoch {start_epoch})\")\n",
         "            loss_state = checkpoint.get('loss')\n"
         "            logging.info(f\"=> resuming checkpoint '{args.resume}' (epoch {start_epoch})\")\n",
         "the loss state of a resumed checkpoint"),
    Edit("main.py",
         "            # loading a bare (model only) checkpoint for fine-tune or evaluation\n",
         "            # loading a bare (model only) checkpoint for fine-tune or evaluation\n"
         "            if args.distributed and not args.horovod and not next(iter(checkpoint)).startswith('module.'):\n"
         "                # the model is wrapped in DistributedDataParallel by now\n"
         "                checkpoint = {f'module.{k}': v for k, v in checkpoint.items()}\n",
         "fine-tuning from a bare state dict under DDP"),
    Edit("main.py",
         "    loss = create_loss(args)\n",
         "    loss = plugins.create_loss(args, loss_state)\n",
         "--loss NAME, with the resumed loss state"),
    Edit("main.py",
         "        train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, "
         "tb_writer=writer)\n",
         "        plugins.set_epoch(loss, epoch)\n"
         "        train_one_epoch(model, data, loss, epoch, optimizer, scaler, scheduler, dist_model, args, "
         "tb_writer=writer)\n",
         "set_epoch"),
    Edit("main.py",
         "                checkpoint_dict[\"scaler\"] = scaler.state_dict()\n",
         "                checkpoint_dict[\"scaler\"] = scaler.state_dict()\n"
         "            checkpoint_dict.update(plugins.checkpoint_entries(loss))\n",
         "the loss state in each checkpoint"),
    Edit("main.py",
         "                torch.save(\n"
         "                    checkpoint_dict,\n",
         "                plugins.save_checkpoint(\n"
         "                    checkpoint_dict,\n",
         "checkpoints written whole, never with non-finite weights"),
    Edit("main.py",
         "                torch.save(checkpoint_dict, tmp_save_path)\n",
         "                plugins.save_checkpoint(checkpoint_dict, tmp_save_path)\n",
         "epoch_latest.pt written whole, never with non-finite weights"),
    # params.py: the plugin flags and checks; no abbreviations.
    Edit("params.py",
         "import ast\n",
         "import ast\n\n" + PLUGINS_IMPORT,
         "the protocol module"),
    Edit("params.py",
         "    parser = argparse.ArgumentParser()\n",
         "    # No abbreviations: a prefix of a plugin's flag must never select another flag\n"
         "    # (\"--loss m2mix\" would be taken as \"--loss-dist-impl m2mix\").\n"
         "    parser = argparse.ArgumentParser(allow_abbrev=False)\n",
         "no abbreviations"),
    Edit("params.py",
         "    args = parser.parse_args(args)\n",
         "    args = plugins.parse_args(parser, args)\n",
         "--loss, the plugin flags and their checks"),
    # train.py: the loss's scalars at the logging steps; evaluation hooks and metrics.
    Edit("train.py",
         "from open_clip import get_input_dtype, CLIP, CustomTextCLIP\n",
         "from open_clip import get_input_dtype, CLIP, CustomTextCLIP\n" + PLUGINS_IMPORT,
         "the protocol module"),
    Edit("train.py",
         "            log_data = {\"train/\" + name: val for name, val in log_data.items()}\n",
         "            log_data = {\"train/\" + name: val for name, val in log_data.items()}\n"
         "            log_data.update(plugins.loss_scalars(loss, epoch, step))\n",
         "the loss's logged_scalars"),
    Edit("train.py",
         "    metrics.update(zero_shot_metrics)\n",
         "    metrics.update(zero_shot_metrics)\n"
         "    metrics.update(plugins.eval_hooks(model, tokenizer, plugins.preprocess_val, epoch, args, "
         "existing=metrics))\n",
         "evaluation hooks"),
    Edit("train.py",
         "                logit_scale=logit_scale.cpu(),\n"
         "            )\n",
         "                logit_scale=logit_scale.cpu(),\n"
         "            )\n"
         "            val_metrics.update(plugins.eval_metrics(\n"
         "                args, torch.cat(all_image_features), torch.cat(all_text_features), existing=val_metrics))\n",
         "evaluation metrics"),
]


class PatchError(Exception):
    """A source, anchor or patch that does not fit; the message says which and what to do."""


# -- sources ------------------------------------------------------------------------------------------
@dataclass
class Source:
    """OpenCLIP release ``version``'s files, read by their path inside the wheel (``open_clip/...``)."""

    version: str
    where: str
    read: Callable[[str], bytes]


def _record_hashes(record_text: str) -> Dict[str, str]:
    return {row[0]: row[1] for row in csv.reader(io.StringIO(record_text)) if len(row) >= 2 and row[1]}


def _check_record(path: str, data: bytes, hashes: Dict[str, str], where: str) -> None:
    expected = hashes.get(path)
    if expected is None:
        return
    algorithm, _, digest = expected.partition("=")
    actual = base64.urlsafe_b64encode(hashlib.new(algorithm, data).digest()).rstrip(b"=").decode()
    if actual != digest:
        raise PatchError(f"{where}/{path} differs from its wheel's RECORD (a patched install?); give the "
                         "pristine release with --source, or leave it to the wheel download")


def _version_in(text: str) -> Optional[str]:
    match = re.search(r"__version__\s*=\s*['\"]([^'\"]+)['\"]", text)
    return match.group(1) if match else None


def folder_source(folder: str) -> Source:
    """A clone's ``src/``, an unpacked wheel or a site-packages: ``open_clip/version.py`` tells the release."""
    version_file = os.path.join(folder, "open_clip", "version.py")
    if not os.path.isfile(version_file):
        raise PatchError(f"--source {folder}: no open_clip/version.py there (give a clone's src/ folder, "
                         "an unpacked wheel or a site-packages)")
    with open(version_file, encoding="utf-8") as f:
        version = _version_in(f.read())
    hashes: Dict[str, str] = {}
    if version is not None:
        record = os.path.join(folder, f"open_clip_torch-{version}.dist-info", "RECORD")
        if os.path.isfile(record):
            with open(record, encoding="utf-8") as f:
                hashes = _record_hashes(f.read())

    def read(path: str) -> bytes:
        with open(os.path.join(folder, path), "rb") as f:
            data = f.read()
        _check_record(path, data, hashes, folder)
        return data

    return Source(version or "?", folder, read)


def wheel_source(wheel: str) -> Source:
    archive = zipfile.ZipFile(wheel)
    version = _version_in(archive.read("open_clip/version.py").decode("utf-8"))
    return Source(version or "?", wheel, archive.read)


def _wheel_in(cache: str, version: str) -> Optional[str]:
    path = os.path.join(cache, f"open_clip_torch-{version}-py3-none-any.whl")
    return path if os.path.isfile(path) else None


def find_source(version: str, given: Dict[str, Source], cache: str, offline: bool) -> Source:
    if version in given:
        return given[version]
    leg = os.path.join(ROOT, ".ci-matrix", version, "open_clip")
    if os.path.isfile(os.path.join(leg, "open_clip", "version.py")):
        source = folder_source(leg)
        if source.version == version:
            return source
    wheel = _wheel_in(cache, version)
    if wheel is None and not offline:
        os.makedirs(cache, exist_ok=True)
        command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                   "--dest", cache, f"open_clip_torch=={version}"]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            raise PatchError(f"pip download of open_clip_torch=={version} failed: "
                             f"{(done.stderr.strip().splitlines() or ['?'])[-1]}")
        wheel = _wheel_in(cache, version)
    if wheel is None:
        raise PatchError(f"no source of OpenCLIP {version}: give --source DIR (a clone's src/ at v{version}), "
                         f"or run without --offline to download the wheel into {cache}")
    return wheel_source(wheel)


# -- the patch -----------------------------------------------------------------------------------------
def _plugins_import(package: str, text: str) -> str:
    relative = re.search(r"^from \.\w* import ", text, flags=re.MULTILINE) is not None
    return "from . import plugins" if relative else f"from {package} import plugins"


def apply_edits(package: str, file: str, text: str, edits: List[Edit]) -> str:
    """``text`` with each edit of ``file`` made; an anchor found zero or several times is an error."""
    out = text
    for edit in (e for e in edits if e.file == file):
        count = min(text.count(edit.anchor), out.count(edit.anchor))
        if count != 1:
            first = edit.anchor.strip().splitlines()[0]
            raise PatchError(f"{package}/{file}: the anchor of the edit for {edit.why} ({first!r}) occurs {count} "
                             "times in the source, not once; update EDITS in patches/make_patches.py")
        out = out.replace(edit.anchor, edit.replacement.replace("{plugins_import}", _plugins_import(package, text)), 1)
    return out


def _lines(text: str, where: str) -> List[str]:
    if text and not text.endswith("\n"):
        raise PatchError(f"{where} does not end with a newline")
    return text.splitlines(keepends=True)


def file_diff(old: Optional[str], new: str, path: str) -> str:
    """A unified diff of one file with 3 lines of context; ``old`` None creates it."""
    old_name = "/dev/null" if old is None else f"a/{path}"
    hunks = difflib.unified_diff(_lines(old or "", old_name), _lines(new, path), old_name, f"b/{path}", n=3)
    return "".join(hunks)


def header(version: str, package: str) -> str:
    return (f"Plugin protocol for OpenCLIP's trainer (open_clip_torch {version}, package {package}): --loss NAME,\n"
            "loss and evaluation plugins from entry points. Generated by m2mix-openclip's patches/make_patches.py\n"
            "from m2mix_openclip/integration/plugins.py (added verbatim as plugins.py) and the trainer edits\n"
            "declared there; do not edit by hand.\n\n")


def make_patch(source: Source, package: str, protocol: str, edits: List[Edit] = EDITS) -> str:
    parts = [header(source.version, package)]
    files = sorted(TRAINER_FILES + ("plugins.py",))
    for file in files:
        path = f"src/{package}/{file}"
        if file == "plugins.py":
            parts.append(file_diff(None, protocol, path))
            continue
        original = source.read(f"{package}/{file}").decode("utf-8")
        parts.append(file_diff(original, apply_edits(package, file, original, edits), path))
    return "".join(parts)


def first_difference(committed: str, generated: str, name: str, context: int = 12) -> str:
    diff = list(difflib.unified_diff(committed.splitlines(keepends=True), generated.splitlines(keepends=True),
                                     f"{name} (committed)", f"{name} (generated)", n=2))
    shown = "".join(diff[:context])
    return shown + (f"... ({len(diff) - context} more lines of difference)\n" if len(diff) > context else "")


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="make_patches.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help="Write nothing; exit 1 where a committed patch differs from what would be generated.")
    parser.add_argument("--source", action="append", default=[], metavar="DIR",
                        help="OpenCLIP's pristine source: a clone's src/, an unpacked wheel or a site-packages "
                             "(repeatable; its open_clip/version.py says which patch it serves).")
    parser.add_argument("--version", action="append", choices=sorted(TRAINERS), default=None,
                        help="Only the patch of this release (repeatable). Default: every one.")
    parser.add_argument("--cache", default=DEFAULT_CACHE, help=f"Where wheels are downloaded. Default: {DEFAULT_CACHE}")
    parser.add_argument("--offline", action="store_true", help="Never download a wheel.")
    parser.add_argument("--patches-dir", default=PATCHES_DIR, help=argparse.SUPPRESS)  # tests check a copy
    args = parser.parse_args(argv)
    try:
        given = {}
        for folder in args.source:
            source = folder_source(folder)
            if source.version not in TRAINERS:
                raise PatchError(f"--source {folder} holds OpenCLIP {source.version}; patches are made from "
                                 f"{', '.join(sorted(TRAINERS))}")
            given[source.version] = source
        with open(PROTOCOL_MODULE, encoding="utf-8") as f:
            protocol = f.read()
        failed = []
        for version in args.version or sorted(TRAINERS):
            source = find_source(version, given, args.cache, args.offline)
            generated = make_patch(source, TRAINERS[version], protocol)
            path = os.path.join(args.patches_dir, patch_name(version))
            if not args.check:
                tmp = f"{path}.tmp"
                with open(tmp, "w", encoding="utf-8", newline="") as f:
                    f.write(generated)
                os.replace(tmp, path)
                print(f"wrote {os.path.relpath(path, ROOT)} (from {source.where})")
                continue
            committed = ""
            if os.path.isfile(path):
                with open(path, encoding="utf-8", newline="") as f:
                    committed = f.read()
            if committed != generated:
                failed.append(path)
                print(f"{path}: differs from what patches/make_patches.py generates from {source.where} "
                      "(run python patches/make_patches.py); first differences:\n"
                      + first_difference(committed, generated, patch_name(version)), file=sys.stderr)
            else:
                print(f"{patch_name(version)}: up to date (from {source.where})")
    except (PatchError, OSError, zipfile.BadZipFile) as e:
        print(f"make_patches.py: error: {e}", file=sys.stderr)
        return 2
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
