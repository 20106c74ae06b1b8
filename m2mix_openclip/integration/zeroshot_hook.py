"""The ``zeroshot`` evaluation hook: zero-shot accuracy and calibration on the user's own
labelled (shifted) sets at every OpenCLIP evaluation.

    m2mix-train ... --val-data test.csv \\
        --zeroshot-data clean=test.csv --zeroshot-data rot=test-rotate.csv \\
        --zeroshot-classnames names.txt --zeroshot-templates "a photo of the number {c}"

    m2mix-train ... --zeroshot-data imagenet=wds/imagenet1k --zeroshot-data sketch=wds/imagenet_sketch

gives ``clean-zeroshot-top1``, ``clean-zeroshot-top5`` (at least 5 classes),
``clean-zeroshot-ece``, ``rot-zeroshot-top1``, ... in the console, ``results.jsonl``,
tensorboard and wandb, beside OpenCLIP's own figures. A set is a CSV, webdataset shards, a
CLIP_benchmark webdataset folder (``ROOT/test/*.tar``, ``--zeroshot-split`` for another split) with its
own ``classnames.txt`` and ``zeroshot_classification_templates.txt``, used unless
``--zeroshot-classnames`` / ``--zeroshot-templates`` are given, or an ImageFolder tree, whose folders
map to classes by ``--zeroshot-class-folders``, by class name or by index; a tree of some of the
classes (ImageNet-R, ObjectNet) is scored over those classes (:mod:`m2mix_openclip.datasets`). Each
set is scored with its own class names and templates. The sets are read and checked when the
arguments are parsed, before the model is built; the class-text classifier is built once per
evaluation, images go through the model in batches of ``--batch-size``, under the run's
``--precision``. The reading, scoring and naming are :mod:`m2mix_openclip.zeroshot`'s, whose
scores ``m2mix-analyze`` and ``m2mix-demo`` print as ``zero_shot_accuracy`` / ``zero_shot_ece``.
"""

from __future__ import annotations

import re
from typing import Dict, Optional, Tuple

import torch

from ..datasets import is_clip_benchmark_root, parse_class_folders
from ..zeroshot import (
    DEFAULT_TEMPLATES,
    LabelledSet,
    labelled_set_metrics,
    load_zero_shot_set,
    parse_class_names,
    parse_templates,
)
from . import openclip_compat, preflight
from .registry import EvalHook

_NAME = re.compile(r"^[A-Za-z0-9_.]+$")
_loaded: Dict[Tuple[str, str], LabelledSet] = {}  # kept out of args: OpenCLIP writes args to params.txt


def named_set(text: str) -> Tuple[str, str]:
    """``NAME=PATH`` of a labelled set, as an argparse type (``--zeroshot-data``, ``m2mix-wiseft --id/--ood``);
    the name becomes part of metric keys, so it holds only letters, digits, ``_`` and ``.``."""
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise ValueError(f"expected NAME=PATH (e.g. rot=test-rotate.csv), got {text!r}")
    if not _NAME.match(name):
        raise ValueError(f"set name {name!r} may hold only letters, digits, '_' and '.'")
    return name, path


named_set.__name__ = "NAME=PATH"  # argparse shows this name in its type errors


def add_arguments(parser) -> None:
    group = parser.add_argument_group("zero-shot robustness at every evaluation (m2mix-openclip)")
    group.add_argument("--zeroshot-data", type=named_set, action="append", default=None, metavar="NAME=PATH",
                       help="A labelled set classified zero-shot at every evaluation: a CSV with an image column "
                            "(--csv-img-key) and a label column (--zeroshot-label-key), webdataset shards with "
                            ".cls members (brace patterns allowed), a CLIP_benchmark webdataset folder "
                            "(ROOT/test/*.tar, classnames.txt, zeroshot_classification_templates.txt), or an "
                            "ImageFolder tree (a folder per class). Repeatable; gives NAME-zeroshot-top1, "
                            "NAME-zeroshot-top5 and NAME-zeroshot-ece.")
    group.add_argument("--zeroshot-classnames", default=None, metavar="FILE_OR_LIST",
                       help="Class names for --zeroshot-data: a file with one per line, or a comma list. "
                            "Default: a CLIP_benchmark folder's classnames.txt (needed for CSV and shard sets).")
    group.add_argument("--zeroshot-templates", default=None, metavar="FILE_OR_LIST",
                       help="Prompt templates with {c} for the class name: a file, one per line, or a "
                            "';'-separated list. Default: a CLIP_benchmark folder's "
                            f"zeroshot_classification_templates.txt, else {DEFAULT_TEMPLATES[0]!r}.")
    group.add_argument("--zeroshot-split", default="test", metavar="SPLIT",
                       help="The split read from CLIP_benchmark folders (ROOT/SPLIT/*.tar). Default: test.")
    group.add_argument("--zeroshot-label-key", default="label",
                       help="CSV column of integer labels in --zeroshot-data sets. Default: label.")
    group.add_argument("--zeroshot-class-folders", default=None, metavar="FILE",
                       help="How the folders of ImageFolder sets map to classes: lines FOLDER<TAB>CLASSES (0-based "
                            "class indices joined by ';', or '-' to leave the folder out), e.g. ImageNet's wnids; "
                            "m2mix-data --from writes one. Without it a folder maps by its class name or index. A "
                            "set whose folders cover only some classes is scored over those classes.")


def validate(args) -> Optional[str]:
    """Reads and checks every set before training; an error message naming the set, or None."""
    sets = getattr(args, "zeroshot_data", None)
    if not sets:
        return None
    names = [name for name, _ in sets]
    duplicate = sorted({n for n in names if names.count(n) > 1})
    if duplicate:
        return f"--zeroshot-data names must be unique; {duplicate} appear twice"
    if not (getattr(args, "val_data", None) or getattr(args, "imagenet_val", None)
            or getattr(args, "imagenet_v2", None)):
        return ("--zeroshot-data is measured at OpenCLIP's evaluations, which run only with --val-data "
                "(or --imagenet-val); add --val-data")
    if args.zeroshot_classnames is None:
        lacking = [path for _, path in sets if not is_clip_benchmark_root(path)]
        if lacking:
            return (f"--zeroshot-data {lacking[0]} needs --zeroshot-classnames (a file with one name per line, or a "
                    "comma list); only CLIP_benchmark folders bring their own classnames.txt")
    if not preflight.DATA_CHECKS.get():  # a recipe parsed for another machine: the sets are read there
        return None
    try:
        folders = _class_folders(args)
    except (OSError, ValueError) as e:
        return f"--zeroshot-class-folders: {e}"
    try:
        for name, path in sets:
            _loaded[(name, path)] = _read_set(args, name, path, folders)
    except ValueError as e:
        return f"--zeroshot-data: {e}"
    return None


def _class_folders(args):
    """The --zeroshot-class-folders map, checked against --zeroshot-classnames, or None."""
    path = getattr(args, "zeroshot_class_folders", None)
    if path is None:
        return None
    if getattr(args, "zeroshot_classnames", None) is None:
        raise ValueError("it maps folders to indices of the class list: give --zeroshot-classnames too")
    return parse_class_folders(path, len(parse_class_names(args.zeroshot_classnames)))


def _read_set(args, name: str, path: str, folders=None) -> LabelledSet:
    """One --zeroshot-data set with the class names and templates the flags give, else its folder's."""
    names = getattr(args, "zeroshot_classnames", None)
    templates = getattr(args, "zeroshot_templates", None)
    return load_zero_shot_set(
        name, path, parse_class_names(names) if names is not None else None,
        parse_templates(templates) if templates is not None else None, getattr(args, "zeroshot_split", "test"),
        img_key=args.csv_img_key, label_key=args.zeroshot_label_key, sep=args.csv_separator, class_folders=folders)


def zeroshot_metrics(model, tokenizer, preprocess, epoch: int, args) -> Dict[str, float]:
    """The hook: ``NAME-zeroshot-top1`` / ``-top5`` / ``-ece`` for every ``--zeroshot-data`` set
    (:func:`m2mix_openclip.zeroshot.labelled_set_metrics`)."""
    sets = getattr(args, "zeroshot_data", None)
    if not sets:
        return {}
    model = getattr(model, "module", model)  # DistributedDataParallel
    device = torch.device(args.device)
    autocast, input_dtype = openclip_compat.evaluation_precision(args.precision, device)
    labelled = [_loaded.get((name, path)) for name, path in sets]
    if any(s is None for s in labelled):  # not read by validate (a caller that skipped it)
        folders = _class_folders(args)
        labelled = [s or _read_set(args, name, path, folders) for s, (name, path) in zip(labelled, sets)]
    was_training = model.training
    model.eval()
    try:
        return labelled_set_metrics(model, preprocess, tokenizer, labelled, batch_size=args.batch_size,
                                    device=device, autocast=autocast, input_dtype=input_dtype)
    finally:
        model.train(was_training)


ZEROSHOT_HOOK = EvalHook(run=zeroshot_metrics, add_arguments=add_arguments, validate=validate,
                         description="zero-shot top-1/top-5/ECE on --zeroshot-data sets")
