"""``m2mix-analyze``: embedding geometry, retrieval, zero-shot and calibration of any OpenCLIP
checkpoint on any CSV or webdataset image-caption data.

    m2mix-analyze --model ViT-B-32 --pretrained openai --data test.csv --out report/
    m2mix-analyze --model local-dir:DIR --checkpoint a.pt --compare b.pt c.pt --labels base clip m2mix \\
        --data 'shards-{000000..000003}.tar' --class-names zero,one,two,... --templates 'a photo of a {c}' \\
        --out report/
    m2mix-analyze --model ViT-B-32 --checkpoint epoch_10.pt --data wds_imagenet1k/ --out report/

A folder is read as CLIP_benchmark's webdataset layout (ROOT/test/*.tar, --split for another), with
its own classnames.txt and zeroshot_classification_templates.txt unless --class-names / --templates
are given; a retrieval folder (dataset_type.txt) with several captions per image in each .txt.

Retrieval groups the captions of one image (same CSV path, same shard bytes, or --image-id-key):
image-to-text R@K counts any of the image's captions, and each image is embedded once.
Writes OUT/analysis.json and figures (embeddings on the circle, cosine histograms, metric bars), each
whole or not at all. Relative image paths in a CSV are read from the current directory, as
OpenCLIP's trainer reads them.
Checkpoints load with weights_only=True. Errors end in one line (exit 2); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import List, Sequence

import torch

from .datasets import (
    clip_benchmark_set,
    load_clip_benchmark_pairs,
    load_pairs,
    parse_class_names,
)
from .encode import class_text_features, encode_grouped
from .evaluation import evaluate_features
from .models import load_model
from .report import short_unique_names
from .results import finish_run
from .simat import DEFAULT_SCALES, load_simat, simat_evaluate
from .zeroshot import DEFAULT_TEMPLATES


def model_labels(args) -> List[str]:
    """The column names: ``--labels`` as given, else short unique names of the checkpoints."""
    checkpoints = [args.checkpoint] + list(args.compare or [])
    if args.labels is not None:
        if len(args.labels) != len(checkpoints):
            raise ValueError(f"--labels has {len(args.labels)} name(s) for {len(checkpoints)} model(s) "
                             "(the --checkpoint or --pretrained model, then each --compare checkpoint)")
        if len(set(args.labels)) != len(args.labels):
            raise ValueError(f"--labels must be unique, got {args.labels}")
        return list(args.labels)
    named = [c for c in checkpoints if c]
    short = iter(short_unique_names(named)) if named else iter(())
    # a model without a checkpoint: its pretrained tag, or the model's name (a local-dir: folder's last part)
    model = args.model.split(":", 1)[1] if args.model.startswith("local-dir:") else args.model
    default = args.pretrained or os.path.basename(os.path.normpath(model))
    return [next(short) if c else default for c in checkpoints]


def figure_keys(has_labels: bool, has_class_names: bool) -> List[str]:
    """The metrics of ``metrics.png``: zero-shot accuracy given class names; label precision@1
    where the data has labels (exact-pair retrieval misleads where many images share a caption's
    meaning), else the grouped R@1; then the geometry."""
    keys = ["zero_shot_accuracy"] if has_class_names else []
    keys += (["image_to_text_label_precision@1", "text_to_image_label_precision@1"] if has_labels
             else ["image_to_text_R@1", "text_to_image_R@1"])
    return keys + ["modality_gap", "alignment", "uniformity_joint"]


def analyze(args) -> dict:
    """Evaluates every model of ``args``; raises ValueError / FileNotFoundError on bad input."""
    started = time.time()
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    names = model_labels(args)
    class_names = parse_class_names(args.class_names) if args.class_names is not None else None
    templates = _templates(args.templates) if args.templates is not None else None
    source, heading = {}, []
    if os.path.isdir(args.data):  # the one folder form of --data: CLIP_benchmark's
        if args.image_id_key is not None:
            raise ValueError("--image-id-key does not apply to a CLIP_benchmark folder: its samples are its images "
                             "(a retrieval sample's captions are the lines of its .txt)")
        folder = clip_benchmark_set(args.data, args.split)
        source = {"layout": "clip_benchmark", "task": folder.task, "split": folder.split,
                  "class_names": "flag" if class_names is not None else (
                      "classnames.txt" if folder.class_names is not None else None),
                  "templates": "flag" if templates is not None else (
                      "zeroshot_classification_templates.txt" if folder.templates else "default")}
        if folder.task == "classification":
            class_names = class_names if class_names is not None else folder.class_names
            templates = templates if templates is not None else (folder.templates or list(DEFAULT_TEMPLATES))
        pairs = load_clip_benchmark_pairs(folder, class_names, templates, limit=args.limit or None)
        heading.append(f"CLIP_benchmark {folder.task} set {args.data} (split {folder.split}): " + (
            "captions from each image's .txt" if folder.task == "retrieval" else
            f"class names from {source['class_names']}, templates from {source['templates']}"))
    else:
        pairs = load_pairs(args.data, args.csv_img_key, args.csv_caption_key, args.label_key, args.csv_separator,
                           image_id_key=args.image_id_key, limit=args.limit or None)
    templates = templates or list(DEFAULT_TEMPLATES)
    labels = None
    if all(p.get("label") is not None for p in pairs):
        labels = torch.tensor([p["label"] for p in pairs])
    if class_names is not None and labels is None:
        raise ValueError(f"--class-names needs a label for every sample (column {args.label_key!r} or .cls members)")
    if class_names is not None and int(labels.max()) >= len(class_names):
        raise ValueError(f"labels go up to {int(labels.max())} but only {len(class_names)} class names were given")

    simat = load_simat(args.simat_db) if args.simat_db else None  # checked before any model is built
    checkpoints = [args.checkpoint] + list(args.compare or [])
    table, features = {}, {}
    num_images = None
    for name, ckpt in zip(names, checkpoints):
        model, preprocess, tokenizer = load_model(args.model, ckpt, args.pretrained, device)
        scale = model.logit_scale.exp().item()
        x, y, caption_image = encode_grouped(model, preprocess, tokenizer, pairs, args.batch_size, device, desc=name)
        num_images = x.shape[0]
        classifier = (class_text_features(model, tokenizer, class_names, templates, device)
                      if class_names is not None else None)
        table[name] = evaluate_features(x, y, labels, classifier, scale, caption_image=caption_image)
        if simat is not None:
            table[name].update(simat_evaluate(model, preprocess, tokenizer, args.simat_db, args.simat_domain,
                                              args.simat_scales, args.batch_size, device, data=simat))
        features[name] = (x[caption_image], y)  # per pair, for the figures
    return finish_run(
        args.out, "analysis.json", table, features, figure_keys(labels is not None, class_names is not None),
        figure_title=f"{args.data} ({len(pairs)} captions of {num_images} images)",
        fields={"data": args.data, **({"data_source": source} if source else {}), "num_pairs": len(pairs),
                "num_images": num_images, **({"class_names": class_names, "templates": templates}
                                             if class_names is not None else {}),
                "retrieval_protocol": "grouped by image: i2t hit if any of the image's captions is within K; "
                                      "exact ties counted at their expected value under a random order; "
                                      "geometry and label precision per pair",
                "checkpoints": dict(zip(names, checkpoints)), "model": args.model},
        heading=heading + [f"{len(pairs)} captions of {num_images} images"], started=started)


def _templates(values: Sequence[str]) -> List[str]:
    """--templates: the lines of the one file given, or the templates as given; each names the
    class (``{c}`` or ``{name}``, or its index ``{digit}``)."""
    if len(values) == 1 and os.path.isfile(values[0]):
        with open(values[0], encoding="utf-8") as f:
            values = [line.strip() for line in f if line.strip()]
    unnamed = [v for v in values if not any(field in v for field in ("{c}", "{name}", "{digit}"))]
    if not values or unnamed:
        raise ValueError(f"every --templates template needs {{c}} for the class name; {unnamed or values} lack it "
                         "(e.g. 'a photo of a {c}.'), or give one file with a template per line")
    return list(values)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2mix-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="OpenCLIP model name or local-dir:PATH.")
    parser.add_argument("--checkpoint", default=None, help="Checkpoint to load (training or bare state dict).")
    parser.add_argument("--pretrained", default=None, help="A pretrained tag already in the local cache.")
    parser.add_argument("--compare", nargs="+", default=None, metavar="CKPT", help="More checkpoints, side by side.")
    parser.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                        help="Column names for the models, in order (default: short unique checkpoint names).")
    parser.add_argument("--data", required=True,
                        help="CSV file, webdataset shards (brace pattern or glob), or a CLIP_benchmark webdataset "
                             "folder (ROOT/SPLIT/*.tar with classnames.txt and "
                             "zeroshot_classification_templates.txt, or dataset_type.txt for retrieval).")
    parser.add_argument("--split", default="test", help="The split of a CLIP_benchmark folder (default: test).")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--image-id-key", default=None,
                        help="CSV column (or shard member extension) naming each row's image, to group its "
                             "captions (default: the image path in a CSV, the image bytes in shards).")
    parser.add_argument("--label-key", default="label", help="CSV column of integer class labels (optional).")
    parser.add_argument("--class-names", default=None,
                        help="Comma-separated names, or a file with one per line (default: a CLIP_benchmark "
                             "folder's classnames.txt).")
    parser.add_argument("--templates", nargs="+", default=None,
                        help="Zero-shot prompt templates ({c} is the class name), or one file with a template per "
                             "line (default: a CLIP_benchmark folder's zeroshot_classification_templates.txt, else "
                             f"{DEFAULT_TEMPLATES[0]!r}).")
    parser.add_argument("--simat-db", default=None, metavar="DIR",
                        help="Also score SIMAT (embedding arithmetic) on the benchmark's simat_db folder.")
    parser.add_argument("--simat-domain", default="dev", choices=["dev", "test"], help="SIMAT split (default dev).")
    parser.add_argument("--simat-scales", type=float, nargs="+", default=list(DEFAULT_SCALES), metavar="S",
                        help="SIMAT scales tried; the best is reported (default 0.5, 1.0, ..., 6.0, 7.0, as the m²-Mix "
                             "reference; 1 alone is the benchmark's eval.py default).")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="Use at most this many pairs.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    parser.add_argument("--out", required=True)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.pretrained is None and args.compare:
        parser.error("--compare needs --checkpoint or --pretrained for the first model")
    try:
        analyze(args)
    except (OSError, ValueError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"m2mix-analyze: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
