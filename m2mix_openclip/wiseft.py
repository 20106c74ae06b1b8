"""``m2mix-wiseft``: weight-space interpolation between a zero-shot CLIP and fine-tuned ones
(WiSE-FT, Wortsman et al. 2022), scored zero-shot in distribution and under distribution shift.

    m2mix-wiseft --model ViT-B-32 --pretrained openai \\
        --finetuned logs/clip/checkpoints/epoch_10.pt logs/m2mix/checkpoints/epoch_10.pt --labels clip m2mix \\
        --id imagenet=imagenet/val --ood v2=imagenetv2 --ood r=imagenet-r --ood sketch=sketch \\
        --classnames pairs/classnames.txt --templates templates.txt --class-folders pairs/class_folders.tsv \\
        --out wiseft/

For each fine-tuned model and each alpha of --alphas (default 0, 0.1, ..., 1) the model's weights
are theta(alpha) = (1 - alpha) theta_zeroshot + alpha theta_finetuned: every floating-point tensor,
logit_scale included; tensors that are not floats (integer buffers) are the fine-tuned model's.
Each weighting is scored by the package's one zero-shot classification (the class-prompt
classifier of the interpolated model's own text tower, CLIP's prompt ensemble): top-1, top-5 and
the ECE of the softmax confidence at the interpolated logit_scale, on every --id and --ood set.
A set is a CSV (an image and an integer label column), webdataset shards with .cls members, or an
ImageFolder tree; a tree whose folders cover only some of the classes (ImageNet-R, -A, ObjectNet)
is scored over its own classes (docs/classification.md). Alpha 0 is the zero-shot model, scored
once for every curve.

Prints the top-1 table and the best alpha of each model by in-distribution and by shifted
accuracy. With --out OUT, also writes OUT/wiseft.png (mean shifted top-1 against in-distribution
top-1, one curve per fine-tuned model) and OUT/wiseft.json (a list of records {"model", "alpha",
"set", "split", "top1", "top5", "ece"}; top5 is null below 5 classes), each whole or not at all,
the JSON last.
Checkpoints load with weights_only=True. Errors end in one line (exit 2); --debug shows the traceback.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from .atomic import write_atomically
from .datasets import LabelledSet, load_labelled_set, parse_class_folders, parse_class_names, parse_templates
from .integration.zeroshot_hook import named_set
from .models import interpolate_state_dicts, load_model
from .plots import plot_weight_interpolation
from .report import short_unique_names
from .results import close_run
from .zeroshot import labelled_set_metrics, set_metric_key

__all__ = ["DEFAULT_ALPHAS", "RECORD_KEYS", "interpolation_records", "best_alphas", "format_wiseft_table",
           "build_parser", "run_wiseft", "main"]

DEFAULT_ALPHAS = tuple(i / 10 for i in range(11))
RECORD_KEYS = ("model", "alpha", "set", "split", "top1", "top5", "ece")
FIGURE = "wiseft.png"
ZERO_SHOT = "zero-shot"


def _cpu_copy(state: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in state.items()}


def _set_scores(model, preprocess, tokenizer, sets: Sequence[Tuple[str, LabelledSet]], class_names, templates,
                batch_size, device, workers) -> Dict[str, Dict[str, Optional[float]]]:
    """set name -> {"top1", "top5" (None below 5 classes), "ece"}, by the one zero-shot implementation."""
    scores = labelled_set_metrics(model, preprocess, tokenizer, [s for _, s in sets], class_names, templates,
                                  batch_size, device, workers=workers)
    return {s.name: {k: scores.get(set_metric_key(s.name, k)) for k in ("top1", "top5", "ece")} for _, s in sets}


@torch.no_grad()
def interpolation_records(model, preprocess, tokenizer, finetuned: Dict[str, Dict[str, torch.Tensor]],
                          alphas: Sequence[float], sets: Sequence[Tuple[str, LabelledSet]],
                          class_names: Sequence[str], templates: Sequence[str], batch_size: int = 256,
                          device="cpu", progress: bool = True, save: Optional[str] = None,
                          workers: int = 0) -> List[dict]:
    """The flat records of every fine-tuned model, alpha and set.

    Args:
        model: the zero-shot model (with ``preprocess`` and ``tokenizer``); its weights are
            theta_zeroshot, and it is reloaded with each interpolation (left at the last one).
        finetuned: label -> the fine-tuned model's state dict.
        sets: (split, labelled set) pairs, split "id" or "ood".
        save: a folder to write each interpolated state dict to (``LABEL-alphaA.pt``), or None.
        workers: DataLoader processes that decode the images (0: this process).
    Returns:
        ``{"model", "alpha", "set", "split", "top1", "top5", "ece"}`` per model, alpha and set, in
        that order; alpha 0 (the zero-shot model) is scored once and recorded for every model.
    """
    from tqdm import tqdm
    model.eval()
    zero_shot = _cpu_copy(model.state_dict())
    runs = len(finetuned) * sum(1 for a in alphas if a != 0) + (0 in alphas)
    bar = tqdm(total=runs, desc="m2mix-wiseft", unit="model", disable=not progress, leave=False)
    zero_shot_scores = None
    if 0 in alphas:
        zero_shot_scores = _set_scores(model, preprocess, tokenizer, sets, class_names, templates, batch_size, device,
                                       workers)
        bar.update()
    records = []
    for label, theta in finetuned.items():
        for alpha in alphas:
            if alpha == 0:
                scores = zero_shot_scores
                merged = zero_shot
            else:
                bar.set_postfix_str(f"{label}, alpha {alpha:g}")
                merged = interpolate_state_dicts(zero_shot, theta, alpha)
                model.load_state_dict(merged)
                scores = _set_scores(model, preprocess, tokenizer, sets, class_names, templates, batch_size,
                                     device, workers)
                bar.update()
            if save is not None:
                path = os.path.join(save, f"{re.sub(r'[^A-Za-z0-9_.-]+', '_', label)}-alpha{alpha:.2f}.pt")
                write_atomically(path, lambda f, state=merged: torch.save(state, f))
            for split, labelled in sets:
                records.append({"model": label, "alpha": alpha, "set": labelled.name, "split": split,
                                **scores[labelled.name]})
    bar.close()
    return records


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def curve_points(records: Sequence[dict]) -> Dict[str, List[Tuple[float, float, float]]]:
    """model -> (alpha, mean in-distribution top-1, mean shifted top-1) per alpha, in alpha order."""
    out: Dict[str, Dict[float, Dict[str, List[float]]]] = {}
    for r in records:
        out.setdefault(r["model"], {}).setdefault(r["alpha"], {"id": [], "ood": []})[r["split"]].append(r["top1"])
    return {model: [(alpha, _mean(s["id"]), _mean(s["ood"])) for alpha, s in sorted(by_alpha.items())]
            for model, by_alpha in out.items()}


def best_alphas(records: Sequence[dict]) -> Dict[str, Dict[str, float]]:
    """model -> {"id": the alpha of the highest mean in-distribution top-1, "ood": of the highest
    mean shifted top-1}; a tie goes to the smaller alpha (the one nearer the zero-shot model)."""
    best = {}
    for model, points in curve_points(records).items():
        best[model] = {split: max(points, key=lambda p, i=i: (p[i], -p[0]))[0]
                       for split, i in (("id", 1), ("ood", 2))}
    return best


def format_wiseft_table(records: Sequence[dict], sets: Sequence[Tuple[str, LabelledSet]],
                        num_classes: int) -> str:
    """The top-1 table (the zero-shot row, then each model's alphas above 0), the sets and how
    many classes each is scored over, and each model's best alphas."""
    id_names = [s.name for split, s in sets if split == "id"]
    ood_names = [s.name for split, s in sets if split == "ood"]
    lines = [f"in-distribution: {', '.join(id_names)}; shifted: {', '.join(ood_names)}"]
    for split, s in sets:
        classes = (f"{s.num_classes} of {num_classes} classes (its folders)" if s.num_classes is not None
                   else f"{num_classes} classes")
        lines.append(f"  {s.name} ({split}): {len(s.images)} images, {classes}, {s.source}")
    points = curve_points(records)
    top1 = {(r["model"], r["alpha"], r["set"]): r["top1"] for r in records}
    columns = id_names + ood_names + ["in-dist. mean", "shifted mean"]
    model_width = max([len(ZERO_SHOT)] + [len(m) for m in points]) + 2
    widths = [max(8, len(c) + 2) for c in columns]
    lines += ["", "top-1"]
    lines.append(f"{'model':{model_width}s}{'alpha':>7s}" + "".join(f"{c:>{w}s}" for c, w in zip(columns, widths)))

    def row(name, model, alpha, id_mean, ood_mean):
        values = [top1[(model, alpha, n)] for n in id_names + ood_names] + [id_mean, ood_mean]
        return f"{name:{model_width}s}{alpha:7.2f}" + "".join(f"{v:{w}.4f}" for v, w in zip(values, widths))

    first = next(iter(points))
    if any(alpha == 0 for alpha, _, _ in points[first]):
        _, id_mean, ood_mean = next(p for p in points[first] if p[0] == 0)
        lines.append(row(ZERO_SHOT, first, 0.0, id_mean, ood_mean))
    for model, curve in points.items():
        lines += [row(model, model, alpha, i, o) for alpha, i, o in curve if alpha != 0]
    lines.append("")
    best = best_alphas(records)
    for split, words in (("id", "in-distribution"), ("ood", "shifted")):
        picks = []
        for model, choice in best.items():
            _, id_mean, ood_mean = next(p for p in points[model] if p[0] == choice[split])
            picks.append(f"{model} alpha {choice[split]:g} (in-distribution {id_mean:.4f}, shifted {ood_mean:.4f})")
        lines.append(f"best alpha by {words} top-1: " + "; ".join(picks))
    lines.append("(top-5 and ECE of every set and alpha: wiseft.json)")
    return "\n".join(lines)


def _alphas(text: str) -> float:
    try:
        alpha = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0.0 <= alpha <= 1.0:
        raise argparse.ArgumentTypeError(f"alpha {alpha:g} lies outside [0, 1] (0: zero-shot, 1: fine-tuned)")
    return alpha


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="m2mix-wiseft", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    models = parser.add_argument_group("models")
    models.add_argument("--model", required=True, help="OpenCLIP model name or local-dir:PATH.")
    models.add_argument("--pretrained", default=None, help="The zero-shot model's pretrained tag (in the local cache).")
    models.add_argument("--checkpoint", default=None,
                        help="The zero-shot model's checkpoint (training checkpoint or bare state dict).")
    models.add_argument("--finetuned", nargs="+", required=True, metavar="CKPT",
                        help="Fine-tuned checkpoints of the same --model, one curve each.")
    models.add_argument("--labels", nargs="+", default=None, metavar="NAME",
                        help="Names of the fine-tuned models, in order (default: short unique checkpoint names).")
    models.add_argument("--alphas", nargs="+", type=_alphas, default=list(DEFAULT_ALPHAS), metavar="A",
                        help="Weights of the fine-tuned model, in [0, 1] (default 0 0.1 ... 1, as WiSE-FT).")
    data = parser.add_argument_group("labelled sets")
    data.add_argument("--id", type=named_set, action="append", required=True, metavar="NAME=PATH",
                      help="An in-distribution set (repeatable: the figure uses their mean). A CSV, webdataset "
                           "shards with .cls members, or an ImageFolder tree.")
    data.add_argument("--ood", type=named_set, action="append", required=True, metavar="NAME=PATH",
                      help="A shifted set (repeatable: the figure uses their mean), in the same forms.")
    data.add_argument("--classnames", required=True, metavar="FILE_OR_LIST",
                      help="Class names: a file with one per line, or a comma list.")
    data.add_argument("--templates", default="a photo of a {c}.", metavar="FILE_OR_LIST",
                      help="Prompt templates with {c}: a file, one per line, or a ';' list. "
                           "Default: 'a photo of a {c}.'")
    data.add_argument("--class-folders", default=None, metavar="FILE",
                      help="How the folders of ImageFolder sets map to classes: FOLDER<TAB>CLASSES lines (0-based "
                           "indices joined by ';', or '-' to leave a folder out); m2mix-data --from writes one. "
                           "Without it a folder maps by its class name or index.")
    data.add_argument("--csv-img-key", default="filepath", help="CSV column of image paths (default filepath).")
    data.add_argument("--label-key", default="label", help="CSV column of integer labels (default label).")
    data.add_argument("--csv-separator", default="\t", help="CSV separator (default tab).")
    parser.add_argument("--batch-size", type=int, default=256, help="Images per forward pass (default 256).")
    parser.add_argument("--workers", type=int, default=0,
                        help="Processes that decode the images (default 0: this one; a GPU wants several).")
    parser.add_argument("--device", default=None, help="Default: cuda when available, else cpu.")
    parser.add_argument("--save-checkpoints", action="store_true",
                        help="Also write each interpolated model as a bare state dict, OUT/checkpoints/LABEL-alphaA.pt "
                             "(loadable by --checkpoint, or by m2mix-train --resume).")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    parser.add_argument("--out", default=None,
                        help="Output folder: wiseft.json, wiseft.png (without it, the table is printed only).")
    return parser


def _check_arguments(args) -> List[str]:
    """The fine-tuned models' labels; raises ValueError on arguments that cannot work together."""
    if args.checkpoint is None and args.pretrained is None:
        raise ValueError("the zero-shot model needs --pretrained TAG or --checkpoint FILE (without them OpenCLIP "
                         "gives random weights)")
    labels = args.labels if args.labels is not None else short_unique_names(args.finetuned)
    if len(labels) != len(args.finetuned):
        raise ValueError(f"--labels has {len(labels)} name(s) for {len(args.finetuned)} --finetuned checkpoint(s)")
    if len(set(labels)) != len(labels) or ZERO_SHOT in labels:
        raise ValueError(f"--labels must be unique and not {ZERO_SHOT!r}, got {labels}")
    names = [name for name, _ in args.id + args.ood]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"set names must be unique across --id and --ood; {twice} appear twice")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.workers < 0:
        raise ValueError(f"--workers must be 0 or more, got {args.workers}")
    if args.save_checkpoints and args.out is None:
        raise ValueError("--save-checkpoints writes into --out DIR/checkpoints: give --out")
    return labels


def run_wiseft(args) -> List[dict]:
    """Checks every input, evaluates every interpolation, writes the figure and the JSON, prints
    the table; returns the records. Raises ValueError / FileNotFoundError on bad input."""
    started = time.time()
    labels = _check_arguments(args)
    alphas = sorted(set(args.alphas))
    class_names = parse_class_names(args.classnames)
    templates = parse_templates(args.templates)
    folders = parse_class_folders(args.class_folders, len(class_names)) if args.class_folders else None
    sets = [(split, load_labelled_set(name, path, len(class_names), args.csv_img_key, args.label_key,
                                      args.csv_separator, ("--csv-img-key", "--label-key"), class_names, folders))
            for split, named in (("id", args.id), ("ood", args.ood)) for name, path in named]
    for path in args.finetuned:  # before any model is built: a typo costs nothing
        if not os.path.isfile(path):
            raise FileNotFoundError(f"--finetuned checkpoint not found: {path}")
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model, preprocess, tokenizer = load_model(args.model, args.checkpoint, args.pretrained, device)
    finetuned = {}
    for label, path in zip(labels, args.finetuned):
        # load_model checks that the checkpoint fits --model (naming missing, unexpected, mis-shaped keys)
        finetuned[label] = _cpu_copy(load_model(args.model, path, device="cpu")[0].state_dict())
    save = None
    if args.save_checkpoints:
        save = os.path.join(args.out, "checkpoints")
        os.makedirs(save, exist_ok=True)
    records = interpolation_records(model, preprocess, tokenizer, finetuned, alphas, sets, class_names, templates,
                                    args.batch_size, device, save=save, workers=args.workers)
    table = format_wiseft_table(records, sets, len(class_names))
    if args.out is None:
        print(f"{table}\n\n(--out DIR writes wiseft.json and the figure)\ntook {time.time() - started:.0f} s")
        return records
    os.makedirs(args.out, exist_ok=True)
    result = os.path.join(args.out, "wiseft.json")
    if os.path.exists(result):  # an earlier run's JSON beside this run's figure would claim it complete
        os.unlink(result)
    figure = os.path.join(args.out, FIGURE)
    id_names = ", ".join(s.name for split, s in sets if split == "id")
    ood_names = ", ".join(s.name for split, s in sets if split == "ood")
    plot_weight_interpolation(curve_points(records), figure, id_names, ood_names, best_alphas(records))
    close_run(result, records, table, [figure], started)
    return records


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        run_wiseft(args)
    except (OSError, ValueError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"m2mix-wiseft: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
