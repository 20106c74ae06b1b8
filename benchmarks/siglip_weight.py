"""Evidence for ``--m2mix-weight``'s default with ``--siglip``: the m²-Mix term's share of the gradient.

    python benchmarks/siglip_weight.py [--work-dir DIR] [--epochs 30] [--finetune]

On the bundled digit scans, a tiny CLIP and a tiny SigLIP (the same towers, ``init_logit_bias``
-10) are pre-trained with OpenCLIP's own loss (``--loss clip``, and ``--siglip``). Every pair is
then embedded by each model, random (as initialised) and pre-trained (the state m²-Mix fine-tunes
from), and for batches of G pairs drawn from them the script prints the *share* of the m²-Mix
term in the gradient on the pairs' features:

    share = || d m2mix_loss / d(x, y) || / || d contrastive_loss / d(x, y) ||

for the softmax term at its default (weight 0.02, temperature 0.07, the model's logit scale) and
for the sigmoid term at the old default (weight 0.02, a mean over the mixed negatives) and at
the --siglip default, weight 0.02 x (G - 1) (the mixes weighed as SigLIP weighs its negatives).
Medians over batches and over lambdas at the deciles of Beta(0.5, 0.5).

``--finetune`` also fine-tunes each pre-trained model on the finetune split with ``--loss clip``
and ``--loss m2mix`` (the default weight; SigLIP also with the old 0.02) and prints the modality
gap and zero-shot accuracy on the test split: the effect the default has in a short fine-tune.
"""

import argparse
import copy
import math
import os
import statistics
import subprocess
import sys
import tempfile

import torch
import torch.nn.functional as F

from m2mix_openclip import M2MixLoss, M2MixSigLipLoss
from m2mix_openclip.data import CLASS_NAMES, ZERO_SHOT_TEMPLATES, write_dataset
from m2mix_openclip.demo import TINY_MODEL, write_local_model
from m2mix_openclip.evaluation import class_text_features, encode, load_model, load_pairs, zero_shot_metrics
from m2mix_openclip.losses.options import siglip_default_weight
from m2mix_openclip.metrics import embedding_geometry

SIGLIP_MODEL = copy.deepcopy(TINY_MODEL)
SIGLIP_MODEL["model_cfg"]["init_logit_bias"] = -10
LAMBDAS = [math.sin(math.pi * q / 2) ** 2 for q in (0.1, 0.3, 0.5, 0.7, 0.9)]  # deciles of Beta(0.5, 0.5)


def train(work, name, model, csv, epochs, lr, extra, resume=None):
    """OpenCLIP's trainer through m2mix-train; returns the last checkpoint (reused when present)."""
    checkpoint = os.path.join(work, "logs", name, "checkpoints", f"epoch_{epochs}.pt")
    if os.path.exists(checkpoint):
        return checkpoint
    cmd = [sys.executable, "-m", "m2mix_openclip.train", "--model", model, "--train-data", csv,
           "--csv-img-key", "filepath", "--csv-caption-key", "title", "--batch-size", "64", "--epochs", str(epochs),
           "--lr", str(lr), "--warmup", "20", "--wd", "0.2", "--workers", "0", "--device", "cpu", "--precision",
           "fp32", "--logs", os.path.join(work, "logs"), "--name", name, "--seed", "0", "--report-to", "",
           "--save-frequency", "0", "--log-every-n-steps", "50", *extra]
    if resume:
        cmd += ["--resume", resume]
    subprocess.run(cmd, check=True, capture_output=True)
    return checkpoint


def bare_state(checkpoint):
    """A model-only state dict beside the checkpoint: OpenCLIP fine-tunes from it at epoch 0."""
    path = checkpoint + ".model.pt"
    if not os.path.exists(path):
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
        torch.save({k.removeprefix("module."): v for k, v in state.items()}, path)
    return path


def gradient_norms(loss_fn, x, y, scalars, lam):
    """{term: || d term / d(x, y) ||} through F.normalize, as a CLIP model's features arrive."""
    raw_x, raw_y = x.clone().requires_grad_(), y.clone().requires_grad_()
    terms = loss_fn(F.normalize(raw_x, dim=1), F.normalize(raw_y, dim=1), *scalars, output_dict=True, mix_lambda=lam)
    norms = {}
    for name, value in terms.items():
        gx, gy = torch.autograd.grad(value, [raw_x, raw_y], retain_graph=True)
        norms[name] = torch.cat([gx, gy]).norm().item()
    return norms


def shares(family, x, y, scale, bias, batch, draws):
    """Median m²-Mix gradient shares over ``draws`` random batches of ``batch`` pairs and LAMBDAS."""
    g = torch.Generator().manual_seed(batch)
    found = {}
    for _ in range(draws):
        rows = torch.randperm(x.shape[0], generator=g)[:batch]
        for lam in LAMBDAS:
            if family == "clip":
                weights = {"softmax default (0.02)": 0.02}
            else:
                weights = {"sigmoid, old default (0.02)": 0.02,
                           "sigmoid, --siglip default (0.02 (G-1))": siglip_default_weight(batch)}
            for label, weight in weights.items():
                if family == "clip":
                    loss_fn, scalars = M2MixLoss(m2mix_weight=weight, mix_schedule="constant"), (scale,)
                else:
                    loss_fn = M2MixSigLipLoss(m2mix_weight=weight, mix_schedule="constant")
                    scalars = (scale, bias)
                norms = gradient_norms(loss_fn, x[rows], y[rows], scalars, lam)
                found.setdefault(label, []).append(norms["m2mix_loss"] / norms["contrastive_loss"])
    return {label: statistics.median(v) for label, v in found.items()}


def embed(model_name, checkpoint, pairs):
    model, preprocess, tokenizer = load_model(model_name, checkpoint)
    x, y = encode(model, preprocess, tokenizer, pairs, progress=False)
    scale = model.logit_scale.exp().detach()
    bias = model.logit_bias.detach() if getattr(model, "logit_bias", None) is not None else None
    return x, y, scale, bias, (model, tokenizer)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", default=None, help="Keeps data, models and checkpoints (reused when run again).")
    p.add_argument("--epochs", type=int, default=30, help="Pre-training epochs (the demo's 30).")
    p.add_argument("--batches", type=int, nargs="+", default=[64, 128, 256, 512, 1024])
    p.add_argument("--draws", type=int, default=3, help="Random batches per size.")
    p.add_argument("--finetune", action="store_true", help="Also fine-tune and compare modality gap and accuracy.")
    p.add_argument("--finetune-epochs", type=int, default=10)
    args = p.parse_args()
    torch.manual_seed(0)
    work = args.work_dir or tempfile.mkdtemp(prefix="m2mix-siglip-weight-")
    data = write_dataset(os.path.join(work, "data"), shifts=())
    models = {"clip": write_local_model(os.path.join(work, "clip")),
              "siglip": write_local_model(os.path.join(work, "siglip"), SIGLIP_MODEL)}
    pretrained = {family: train(work, f"pretrain-{family}", models[family], data["pretrain"]["csv"], args.epochs,
                                1e-3, ["--loss", "clip"] + (["--siglip"] if family == "siglip" else []))
                  for family in models}
    everything = sum((load_pairs(data[s]["csv"]) for s in ("pretrain", "finetune", "test")), [])
    print(f"m²-Mix term's share of the gradient on the pairs ({len(everything)} digit scans, "
          f"{args.draws} batches x {len(LAMBDAS)} lambdas per size; medians)")
    print("| model | state | term | " + " | ".join(f"G = {b}" for b in args.batches) + " |")
    print("|---|---|---|" + "---|" * len(args.batches))
    for family in models:
        for state, checkpoint in (("random", None), ("pre-trained", pretrained[family])):
            x, y, scale, bias, _ = embed(models[family], checkpoint, everything)
            geometry = embedding_geometry(x, y)
            found = [shares(family, x, y, scale, bias, b, args.draws) for b in args.batches]
            for label in found[0]:
                print(f"| {family} (scale {scale.item():.1f}" + ("" if bias is None else f", bias {bias.item():.1f}")
                      + f", gap {geometry['modality_gap']:.2f}) | {state} | {label} | "
                      + " | ".join(f"{f[label]:.2g}" for f in found) + " |", flush=True)
    if not args.finetune:
        return
    print(f"\nFine-tuning {args.finetune_epochs} epochs from the pre-trained models (finetune split, batch 64); "
          "test split")
    print("| model | loss | modality gap | zero-shot accuracy |")
    print("|---|---|---|---|")
    test = load_pairs(data["test"]["csv"])
    labels = torch.tensor([pair["label"] for pair in test])
    runs = [("clip", "clip", []), ("clip", "m2mix", []), ("siglip", "clip", ["--siglip"]),
            ("siglip", "m2mix", ["--siglip"]), ("siglip", "m2mix 0.02", ["--siglip", "--m2mix-weight", "0.02"])]
    for family, loss, extra in runs:
        name = f"finetune-{family}-{loss.replace(' ', '-')}"
        checkpoint = train(work, name, models[family], data["finetune"]["csv"], args.finetune_epochs, 1e-4,
                           ["--loss", loss.split()[0], *extra], resume=bare_state(pretrained[family]))
        x, y, scale, _, (model, tokenizer) = embed(models[family], checkpoint, test)
        classifier = class_text_features(model, tokenizer, CLASS_NAMES, ZERO_SHOT_TEMPLATES)
        accuracy = zero_shot_metrics(x, classifier, labels, scale.item())["zero_shot_accuracy"]
        print(f"| {family} | {loss} | {embedding_geometry(x, y)['modality_gap']:.4f} | {accuracy:.4f} |", flush=True)


if __name__ == "__main__":
    main()
