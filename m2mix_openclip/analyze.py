"""``m2mix-analyze``: embedding geometry, retrieval, zero-shot and calibration of any OpenCLIP
checkpoint on any CSV or webdataset image-caption data.

    m2mix-analyze --model ViT-B-32 --pretrained openai --data test.csv --out report/
    m2mix-analyze --model local-dir:DIR --checkpoint a.pt --compare b.pt c.pt --data 'shards-{000000..000003}.tar' \\
        --class-names zero,one,two,... --templates 'a photo of a {c}' --out report/

Writes OUT/analysis.json and figures (embeddings on the circle, cosine histograms, metric bars).
Checkpoints load with weights_only=True.
"""

from __future__ import annotations

import argparse
import json
import os

import torch

from .evaluation import class_text_features, encode, evaluate_features, load_model, load_pairs
from .plots import plot_cosine_histograms, plot_metric_bars, plot_sphere_projection


def _class_names(text):
    if text is None:
        return None
    if os.path.isfile(text):
        with open(text) as f:
            return [line.strip() for line in f if line.strip()]
    return [c.strip() for c in text.split(",") if c.strip()]


def analyze(args) -> dict:
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    pairs = load_pairs(args.data, args.csv_img_key, args.csv_caption_key, args.label_key, args.csv_separator)
    if args.limit:
        pairs = pairs[:args.limit]
    labels = None
    if all(p.get("label") is not None for p in pairs):
        labels = torch.tensor([p["label"] for p in pairs])
    class_names = _class_names(args.class_names)
    if class_names is not None and labels is None:
        raise SystemExit(f"--class-names needs a label for every sample (column {args.label_key!r} or .cls members)")
    if class_names is not None and int(labels.max()) >= len(class_names):
        raise SystemExit(f"labels go up to {int(labels.max())} but only {len(class_names)} class names were given")

    checkpoints = [args.checkpoint] + list(args.compare or [])
    table, features = {}, {}
    for ckpt in checkpoints:
        name = os.path.basename(ckpt) if ckpt else (args.pretrained or args.model)
        if name in table:
            name = ckpt
        model, preprocess, tokenizer = load_model(args.model, ckpt, args.pretrained, device)
        scale = model.logit_scale.exp().item()
        x, y = encode(model, preprocess, tokenizer, pairs, args.batch_size, device, desc=name)
        classifier = (class_text_features(model, tokenizer, class_names, args.templates, device)
                      if class_names is not None else None)
        table[name] = evaluate_features(x, y, labels, classifier, scale)
        features[name] = (x, y)
    os.makedirs(args.out, exist_ok=True)
    figures = {"sphere": os.path.join(args.out, "embeddings_on_circle.png"),
               "cosines": os.path.join(args.out, "cosine_histograms.png"),
               "metrics": os.path.join(args.out, "metrics.png")}
    plot_sphere_projection(features, figures["sphere"])
    plot_cosine_histograms(features, figures["cosines"])
    keys = ["image_to_text_R@1", "text_to_image_R@1", "modality_gap", "alignment", "uniformity_joint"]
    if class_names is not None:
        keys.insert(0, "zero_shot_accuracy")
    plot_metric_bars(table, keys, figures["metrics"])
    report = {"models": table, "data": args.data, "num_pairs": len(pairs), "figures": figures,
              "model": args.model}
    with open(os.path.join(args.out, "analysis.json"), "w") as f:
        json.dump(report, f, indent=2)
    names = list(table)
    print(f"{'metric':34s}" + "".join(f"{n[-18:]:>20s}" for n in names))
    for key in sorted(table[names[0]]):
        print(f"{key:34s}" + "".join(f"{table[n][key]:20.4f}" for n in names))
    print(f"\nwrote {os.path.join(args.out, 'analysis.json')} and {len(figures)} figures")
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(prog="m2mix-analyze", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="OpenCLIP model name or local-dir:PATH.")
    parser.add_argument("--checkpoint", default=None, help="Checkpoint to load (training or bare state dict).")
    parser.add_argument("--pretrained", default=None, help="A pretrained tag already in the local cache.")
    parser.add_argument("--compare", nargs="+", default=None, metavar="CKPT", help="More checkpoints, side by side.")
    parser.add_argument("--data", required=True, help="CSV file or webdataset shards (brace pattern or glob).")
    parser.add_argument("--csv-img-key", default="filepath")
    parser.add_argument("--csv-caption-key", default="title")
    parser.add_argument("--csv-separator", default="\t")
    parser.add_argument("--label-key", default="label", help="CSV column of integer class labels (optional).")
    parser.add_argument("--class-names", default=None, help="Comma-separated names, or a file with one per line.")
    parser.add_argument("--templates", nargs="+", default=["a photo of a {c}."],
                        help="Zero-shot prompt templates; {c} is the class name.")
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--limit", type=int, default=None, help="Use at most this many pairs.")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)
    if args.checkpoint is None and args.pretrained is None and args.compare:
        parser.error("--compare needs --checkpoint or --pretrained for the first model")
    try:
        analyze(args)
    except (FileNotFoundError, ValueError) as e:
        parser.exit(2, f"m2mix-analyze: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
