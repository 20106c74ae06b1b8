"""Helpers that run OpenCLIP's real trainer in a subprocess (tiny model, CPU, fp32)."""

import json
import os
import re
import subprocess
import sys

from m2mix_openclip.demo import write_local_model

GEOMETRY_KEYS = {"alignment", "uniformity_image", "uniformity_text", "uniformity_joint",
                 "relative_alignment", "modality_gap", "positive_cosine", "negative_cosine"}


def write_tiny_model(folder):
    return write_local_model(folder)


def write_model_with_weights(folder, config):
    """``local-dir:folder`` with ``config`` and random weights in ``open_clip_pytorch_model.bin``,
    CoCa's text decoder initialised (``openclip_compat.initialise_text_decoders``: OpenCLIP leaves
    its projection as uninitialised memory, which made CoCa runs fail at random)."""
    import open_clip
    import torch

    from m2mix_openclip.integration import openclip_compat
    model = write_local_model(folder, config)
    created = open_clip.create_model(openclip_compat.model_name(model))
    openclip_compat.initialise_text_decoders(created)
    torch.save(created.state_dict(), os.path.join(folder, "open_clip_pytorch_model.bin"))
    return model


def common_args(model, logs, name, epochs=2, batch=16):
    return ["--model", model, "--precision", "fp32", "--batch-size", str(batch), "--epochs", str(epochs),
            "--lr", "1e-3", "--warmup", "1", "--workers", "0", "--device", "cpu", "--logs", str(logs),
            "--name", name, "--seed", "0", "--log-every-n-steps", "1", "--report-to", ""]


def csv_args(data):
    return ["--train-data", data["pretrain"]["csv"], "--val-data", data["test"]["csv"],
            "--csv-img-key", "filepath", "--csv-caption-key", "title"]


def run(cmd, env_extra=None, timeout=600, check=True):
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.update(env_extra or {})
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"command failed ({proc.returncode}): {' '.join(cmd)}\n"
                             f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


def launcher(*args, **kwargs):
    return run([sys.executable, "-m", "m2mix_openclip.train", *args], **kwargs)


def read_log(logs, name):
    with open(os.path.join(logs, name, "out.log")) as f:
        return f.read()


def results(logs, name):
    with open(os.path.join(logs, name, "checkpoints", "results.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def logged_losses(text, key="Contrastive_loss"):
    """The current (not averaged) value of a loss at every logged step."""
    return [float(v) for v in re.findall(rf"{key}: ([0-9.eE+-]+) \(", text)]


def logged_scalars(text):
    """The loss's scalars at every logging step, as the launcher and the patch log them."""
    return [dict((k, float(v)) for k, v in re.findall(r"(\w+)=([0-9.eE+-]+)", line))
            for line in re.findall(r"loss scalars: (.*)", text)]


def logged_lambdas(text):
    return [s["m2mix_lambda"] for s in logged_scalars(text)]
