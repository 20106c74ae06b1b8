"""``m2mix-demo --out DIR``: what m²-Mix does to a CLIP model, on bundled real data, on a laptop.

1. Writes scikit-learn's 1,797 handwritten digit scans as captioned image pairs (CSV), with
   pretrain / finetune / test splits and rotated, blurred and noisy copies of the test split.
2. Pre-trains a tiny CLIP with the standard loss (the stand-in for a pre-trained CLIP).
3. Fine-tunes two copies on the finetune split through OpenCLIP's trainer, ``--loss clip`` and
   ``--loss m2mix``, with the same seed.
4. Evaluates the three models on the test split (retrieval R@1/5/10, label precision, zero-shot
   accuracy, calibration, alignment, uniformity, modality gap) and zero-shot accuracy on the
   shifted copies; prints them side by side, writes DIR/results.json and figures.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time

import torch

from .atomic import write_atomically, write_json
from .data import CLASS_NAMES, SHIFTS, ZERO_SHOT_TEMPLATES, write_dataset
from .datasets import load_pairs
from .encode import class_text_features, encode
from .evaluation import evaluate_features
from .integration import openclip_compat
from .models import load_model, read_checkpoint
from .progress import progress
from .results import finish_run
from .zeroshot import zero_shot_metrics

TINY_MODEL = {
    "model_cfg": {
        "embed_dim": 64,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 64, "heads": 2, "layers": 2},
    },
    "preprocess_cfg": {},
}


def write_local_model(folder: str, config: dict = TINY_MODEL) -> str:
    """Writes an OpenCLIP ``open_clip_config.json`` into ``folder``; returns ``local-dir:folder``.

    The text context length is raised to what the installed tokenizer gives where the tokenizer
    ignores the model's own (OpenCLIP 2.20 always gives 77 tokens). Before OpenCLIP 3.0, which
    has no ``local-dir:``, the launcher and ``models.load_model`` register the folder's config
    in-process (``openclip_compat.model_name``)."""
    text_cfg = config["model_cfg"]["text_cfg"]
    context = openclip_compat.tokenizer_context_length(text_cfg["context_length"])
    if context != text_cfg["context_length"]:
        config = {**config, "model_cfg": {**config["model_cfg"], "text_cfg": {**text_cfg, "context_length": context}}}
    os.makedirs(folder, exist_ok=True)
    write_json(os.path.join(folder, "open_clip_config.json"), config)  # whole or not at all
    return f"local-dir:{folder}"


# the bars of metrics.png: label-level figures (many scans share a caption's meaning, so
# exact-pair retrieval says little here), robustness, then the geometry
FIGURE_KEYS = ["zero_shot_accuracy", "zero_shot_accuracy_rotate", "image_to_text_label_precision@1",
               "modality_gap", "alignment", "uniformity_joint"]


def _train(name, args, out, model_name, epochs, extra, log):
    """Runs OpenCLIP's trainer through the launcher; returns the last checkpoint's path."""
    device, device_env = openclip_compat.device_arguments(args.device)  # no --device before OpenCLIP 2.28
    cmd = [sys.executable, "-m", "m2mix_openclip.train", "--epochs", str(epochs),
           "--model", model_name, "--precision", "fp32", *device,
           "--workers", "0", "--logs", os.path.join(out, "logs"), "--name", name, "--seed", str(args.seed),
           "--report-to", "", "--log-every-n-steps", "5", "--save-frequency", "0",
           "--csv-img-key", "filepath", "--csv-caption-key", "title", *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1", **device_env)
    with open(log, "a") as f:
        f.write("$ " + " ".join(cmd) + "\n")
        f.flush()
        status = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    if status != 0:
        raise RuntimeError(f"training step {name!r} failed (exit {status}); see {log}")
    return os.path.join(out, "logs", name, "checkpoints", f"epoch_{epochs}.pt")


def _bare_state(checkpoint, path):
    """A model-only state dict: OpenCLIP then fine-tunes from it with a fresh optimizer at epoch 0.
    Written whole or not at all: a killed demo leaves no truncated file for ``--resume``."""
    state = read_checkpoint(checkpoint)
    write_atomically(path, lambda f: torch.save(state, f))
    return path


def run_demo(args) -> dict:
    out = os.path.abspath(args.out)
    if os.path.exists(os.path.join(out, "logs")):
        raise FileExistsError(f"{out} already holds a demo run (logs/); choose a new --out or remove it")
    model_name = write_local_model(os.path.join(out, "model"))
    log = os.path.join(out, "training.log")
    start = time.time()

    stages = progress(5, "m2mix-demo", unit="stages")
    stages.set_postfix_str("writing data")
    data = write_dataset(os.path.join(out, "data"), limit=args.limit, shard_size=256)
    stages.update()

    common = ["--batch-size", str(args.batch_size), "--val-data", data["test"]["csv"]]
    stages.set_postfix_str("pre-training (standard CLIP loss)")
    pre = _train("pretrain", args, out, model_name, args.pretrain_epochs, common + [
        "--train-data", data["pretrain"]["csv"], "--lr", "1e-3", "--warmup", "20", "--loss", "clip"], log)
    base = _bare_state(pre, os.path.join(out, "pretrained.pt"))
    stages.update()

    finetune = common + ["--train-data", data["finetune"]["csv"], "--lr", str(args.lr), "--wd", "0.2",
                         "--warmup", "5", "--resume", base]
    checkpoints = {"pretrained": base}
    stages.set_postfix_str("fine-tuning with --loss clip")
    checkpoints["finetuned clip"] = _train("finetune-clip", args, out, model_name, args.finetune_epochs,
                                           finetune + ["--loss", "clip"], log)
    stages.update()
    stages.set_postfix_str("fine-tuning with --loss m2mix")
    m2mix_flags = ["--loss", "m2mix", "--m2mix-weight", str(args.m2mix_weight)]
    checkpoints["finetuned m2mix"] = _train("finetune-m2mix", args, out, model_name, args.finetune_epochs,
                                            finetune + m2mix_flags, log)
    stages.update()

    stages.set_postfix_str("evaluating")
    test = load_pairs(data["test"]["csv"])
    labels = torch.tensor([p["label"] for p in test])
    shifted = {s: load_pairs(data[f"test-{s}"]["csv"]) for s in SHIFTS}
    table, features = {}, {}
    for name, ckpt in checkpoints.items():
        model, preprocess, tokenizer = load_model(model_name, ckpt, device=args.device)
        scale = model.logit_scale.exp().item()
        x, y = encode(model, preprocess, tokenizer, test, device=args.device, desc=f"{name}: test")
        classifier = class_text_features(model, tokenizer, CLASS_NAMES, ZERO_SHOT_TEMPLATES, args.device)
        row = evaluate_features(x, y, labels, classifier, scale)
        for shift, pairs in shifted.items():
            xs, _ = encode(model, preprocess, tokenizer, pairs, device=args.device, desc=f"{name}: {shift}")
            row[f"zero_shot_accuracy_{shift}"] = zero_shot_metrics(xs, classifier, labels, scale)["zero_shot_accuracy"]
        table[name], features[name] = row, (x, y)
    stages.update()
    stages.close()

    fast = ("--fast: a smoke test of the pipeline (96 samples, 2 epochs): these numbers say nothing about "
            "m²-Mix, accuracy can sit below chance; run without --fast for the real demo.")
    return finish_run(out, "results.json", table, features, FIGURE_KEYS,
                      figure_title="m2mix-demo: the test split of the digit scans",
                      fields={"settings": dict(vars(args)), "data": {k: v["num_samples"] for k, v in data.items()},
                              "training_log": log},
                      notes=[fast] if getattr(args, "fast", False) else [], started=start)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="m2mix-demo", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, help="Output folder (must not hold an earlier run).")
    parser.add_argument("--fast", action="store_true",
                        help="A smoke test of the pipeline (for tests and CI); its numbers mean nothing.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--pretrain-epochs", type=int, default=30)
    parser.add_argument("--finetune-epochs", type=int, default=10)
    parser.add_argument("--lr", type=float, default=1e-4, help="Fine-tuning learning rate.")
    parser.add_argument("--m2mix-weight", type=float, default=0.1,
                        help="m²-Mix weight. Default 0.1, the top of the reference's sweep (its mmmix 0.05), "
                             "so that 10 short epochs show the effect; the loss's own default is 0.02.")
    parser.add_argument("--limit", type=int, default=None, help="At most this many samples per split.")
    args = parser.parse_args(argv)
    if args.fast:
        args.limit = args.limit or 96
        args.pretrain_epochs, args.finetune_epochs, args.batch_size = 2, 2, 32
    try:  # a supported OpenCLIP whose trainer can run on --device, before any work
        openclip_compat.device_arguments(args.device)
    except openclip_compat.UnsupportedOpenCLIP as e:
        parser.exit(2, f"m2mix-demo: error: {e}\n")
    try:
        run_demo(args)
    except FileExistsError as e:
        parser.exit(2, f"m2mix-demo: error: {e}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
