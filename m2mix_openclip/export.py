"""``m2mix-export``: a checkpoint as an OpenCLIP model folder, for ``local-dir:`` loading anywhere.

    m2mix-export --model local-dir:demo-out/model --checkpoint logs/run/checkpoints/epoch_10.pt --out exported
    clip_benchmark eval --model local-dir:exported --dataset wds/digits --dataset_root digits-cb/digits
    python -c "import open_clip; open_clip.create_model_and_transforms('local-dir:exported')"

OpenCLIP (3.0 on), and so ``clip_benchmark eval``, ignore ``--pretrained`` for ``local-dir:``
models: only the weights inside the folder count. The folder holds ``open_clip_config.json`` (the
model's config and its preprocessing), the weights as ``open_clip_pytorch_model.bin`` (a plain
state dict), a Hugging Face tokenizer's files where the model has one, and
``m2mix_export.json`` (what it was made from). Any checkpoint the tools read goes in
(``--checkpoint``: a training checkpoint or a bare state dict, read with ``weights_only=True``;
``--pretrained TAG`` for a named model's cached weights). Before the folder appears it is loaded
back as ``local-dir:`` and checked: the weights equal the checkpoint's, the tokenizer gives the
same tokens, and no "initialized randomly" warning. It is written beside ``--out`` and moved into
place in one step: a folder whole and checked, or none. ``--out`` must not exist or be empty.
Errors end in one line (exit 2); ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
from typing import List, Optional

import torch

from .integration import openclip_compat
from .models import load_model

__all__ = ["export_model", "main"]

WEIGHTS_FILE = openclip_compat.LOCAL_DIR_WEIGHTS
CONFIG_FILE = "open_clip_config.json"
PROVENANCE_FILE = "m2mix_export.json"
PROBE_TEXTS = ["a photo of a cat.", "m\u00b2-Mix: 42 handwritten digits, Fl\u00fcgel & caf\u00e9"]


class _Warnings(logging.Handler):
    """Collects the warnings logged while a model loads."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages: List[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())


@contextlib.contextmanager
def _collected_warnings():
    handler = _Warnings()
    logging.root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        logging.root.removeHandler(handler)


def _check_out(out: str) -> None:
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"--out {out} exists and is not empty: choose a new folder (an export never writes "
                              "over another: OpenCLIP loads whichever weights file it finds there first)")
    if os.path.exists(out) and not os.path.isdir(out):
        raise FileExistsError(f"--out {out} is a file, not a folder")


def _verify(folder: str, model, tokenizer) -> None:
    """Loads ``folder`` as ``local-dir:`` (OpenCLIP's own loading from 3.0 on) and compares."""
    with _collected_warnings() as warnings:
        loaded, _, loaded_tokenizer = load_model(f"local-dir:{folder}")
    random_init = [w for w in warnings if "initialized randomly" in w or "no CLIP weights found" in w]
    if random_init:
        raise RuntimeError(f"the exported folder loads without its weights ({random_init[0]})")
    expected, got = model.state_dict(), loaded.state_dict()
    differ = sorted(k for k in expected if k not in got or not torch.equal(expected[k], got[k]))
    if differ or set(got) != set(expected):
        raise RuntimeError(f"the exported folder loads other weights than the checkpoint's ({len(differ)} tensors "
                           f"differ, first: {(differ or sorted(set(got) ^ set(expected)))[0]})")
    if not torch.equal(tokenizer(PROBE_TEXTS), loaded_tokenizer(PROBE_TEXTS)):
        raise RuntimeError("the exported folder's tokenizer gives other tokens than the model's "
                           f"({type(tokenizer).__name__}); this model's tokenizer cannot be carried in a local-dir: "
                           "folder by this OpenCLIP")


def export_model(model_name: str, out: str, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
                 verify: bool = True) -> dict:
    """Writes ``model_name`` with the weights of ``checkpoint`` (or ``pretrained``) as an OpenCLIP
    model folder at ``out``; returns what :data:`PROVENANCE_FILE` records.

    Raises:
        FileExistsError: ``out`` is a file or a folder that is not empty.
        FileNotFoundError, ValueError: the model or checkpoint cannot be loaded (:func:`load_model`).
        RuntimeError: the written folder does not load back to the same weights and tokens.
    """
    if checkpoint is None and pretrained is None:
        raise ValueError("give --checkpoint (a training checkpoint or state dict) or --pretrained TAG: "
                         "an export of random weights is of no use")
    out = os.path.abspath(out)
    _check_out(out)
    model, _, tokenizer = load_model(model_name, checkpoint, pretrained)
    config = {"model_cfg": openclip_compat.model_config(model_name),
              "preprocess_cfg": openclip_compat.model_preprocess_cfg(model)}
    provenance = {"model": model_name, "checkpoint": os.path.abspath(checkpoint) if checkpoint else None,
                  "pretrained": pretrained, "open_clip_torch": openclip_compat.openclip_version(),
                  "parameters": sum(p.numel() for p in model.state_dict().values()), "folder": out}
    parent = os.path.dirname(out)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(out)}.", suffix=".tmp", dir=parent)
    try:
        with open(os.path.join(staging, CONFIG_FILE), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, os.path.join(staging, WEIGHTS_FILE))
        if "hf_tokenizer_name" in config["model_cfg"].get("text_cfg", {}):
            # a local-dir: folder's Hugging Face tokenizer is read from the folder itself
            save = getattr(tokenizer, "save_pretrained", None)
            if save is None:
                raise RuntimeError(f"the model's tokenizer ({type(tokenizer).__name__}) cannot be saved in the folder")
            save(staging)
        with open(os.path.join(staging, PROVENANCE_FILE), "w", encoding="utf-8") as f:
            json.dump(provenance, f, indent=2)
        if verify:
            _verify(staging, model, tokenizer)
        os.chmod(staging, 0o755)  # mkdtemp makes it private
        if os.path.isdir(out):
            os.rmdir(out)  # empty (checked above): the rename below puts the whole folder in its place
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return provenance


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="m2mix-export", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    parser.add_argument("--model", required=True, help="OpenCLIP model name or local-dir:PATH (the architecture).")
    parser.add_argument("--checkpoint", default=None,
                        help="Checkpoint to export (OpenCLIP's epoch_N.pt, or a bare state dict).")
    parser.add_argument("--pretrained", default=None,
                        help="A pretrained tag already in the local cache (a named model's weights, and its "
                             "preprocessing); with --checkpoint, the checkpoint's weights replace them.")
    parser.add_argument("--out", required=True, help="The model folder to write (must not exist, or be empty).")
    parser.add_argument("--debug", action="store_true", help="Show the full traceback of an error.")
    args = parser.parse_args(argv)
    try:
        done = export_model(args.model, args.out, args.checkpoint, args.pretrained)
    except (OSError, ValueError, RuntimeError) as e:
        if args.debug:
            raise
        print(f"m2mix-export: error: {e}\n(run with --debug for the traceback)", file=sys.stderr)
        return 2
    folder = done["folder"]
    print(f"exported {done['parameters']:,} parameters of {args.model} "
          f"({args.checkpoint or args.pretrained}) to {folder}, checked by loading it back\n"
          f"  OpenCLIP:        open_clip.create_model_and_transforms('local-dir:{folder}')\n"
          f"  CLIP_benchmark:  clip_benchmark eval --model local-dir:{folder} --dataset wds/NAME "
          "--dataset_root ROOT\n"
          f"  m2mix-analyze:   m2mix-analyze --model local-dir:{folder} --data DATA --out report")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
