"""Zero-shot classification of labelled image sets: loading, checking, classifying, scoring.

A labelled set is a CSV (an image-path column and an integer label column) or webdataset
shards (an image member, ``png``/``jpg``/``jpeg``/``webp``, and a ``cls`` member per sample;
brace patterns and globs allowed). Every check happens in :func:`load_labelled_set`, before any
model runs, and names the set; nothing is skipped silently.
"""

from __future__ import annotations

import contextlib
import csv
import glob
import os
import tarfile
from dataclasses import dataclass
from typing import Dict, List, Sequence, Union

import torch
import torch.nn.functional as F

__all__ = ["LabelledSet", "load_labelled_set", "parse_class_names", "parse_templates",
           "zero_shot_classifier", "zero_shot_logits", "zero_shot_scores"]

IMAGE_EXTENSIONS = ("png", "jpg", "jpeg", "webp")


@dataclass
class LabelledSet:
    """Images (paths or encoded bytes) with integer labels in [0, num_classes)."""
    name: str
    source: str
    images: List[Union[str, bytes]]
    labels: torch.Tensor  # (N,) int64


def _items(text: str, separator: str) -> List[str]:
    """Non-empty stripped lines of a file, or the parts of ``text`` split at ``separator``."""
    if os.path.isfile(text):
        with open(text) as f:
            return [line.strip() for line in f if line.strip()]
    return [part.strip() for part in text.split(separator) if part.strip()]


def parse_class_names(text: str) -> List[str]:
    """Class names from a file (one per line) or a comma-separated list."""
    names = _items(text, ",")
    if not names:
        raise ValueError(f"no class names in {text!r} (give a file with one name per line, or a comma list)")
    return names


def parse_templates(text: str) -> List[str]:
    """Prompt templates from a file (one per line) or a ``;``-separated list; each needs ``{c}``."""
    templates = _items(text, ";")
    if not templates:
        raise ValueError(f"no templates in {text!r}")
    missing = [t for t in templates if "{c}" not in t]
    if missing:
        raise ValueError(f"every zero-shot template needs {{c}} for the class name; {missing} lack it "
                         "(e.g. 'a photo of the number {c}')")
    return templates


def _from_csv(path: str, img_key: str, label_key: str, sep: str):
    with open(path, newline="") as f:
        reader = csv.DictReader(f, delimiter=sep)
        columns = reader.fieldnames or []
        if img_key not in columns or label_key not in columns:
            raise ValueError(f"columns {columns} (separator {sep!r}) lack {img_key!r} or {label_key!r}; "
                             "set --csv-img-key / --zeroshot-label-key / --csv-separator")
        rows = list(reader)
    images, labels = [], []
    base = os.path.dirname(os.path.abspath(path))
    for number, row in enumerate(rows, start=2):  # line 1 is the header
        image = row[img_key]
        if not os.path.isabs(image) and not os.path.exists(image):
            image = os.path.join(base, image)
        if not os.path.isfile(image):
            raise ValueError(f"line {number}: image {row[img_key]!r} not found")
        try:
            labels.append(int(row[label_key]))
        except ValueError:
            raise ValueError(f"line {number}: label {row[label_key]!r} is not an integer") from None
        images.append(image)
    return images, labels


def _from_shards(pattern: str):
    import braceexpand
    paths = [p for expanded in braceexpand.braceexpand(pattern) for p in sorted(glob.glob(expanded))]
    if not paths:
        raise ValueError("no file matches it")
    samples: Dict[str, dict] = {}
    for path in paths:
        try:
            with tarfile.open(path) as tar:
                for member in tar.getmembers():
                    if not member.isfile() or "." not in member.name:
                        continue
                    key, ext = member.name.rsplit(".", 1)
                    if ext in IMAGE_EXTENSIONS or ext == "cls":
                        samples.setdefault(f"{path}:{key}", {})[ext] = tar.extractfile(member).read()
        except tarfile.TarError as e:
            raise ValueError(f"{path} is not a readable tar shard: {e}") from None
    images, labels = [], []
    for key, sample in samples.items():
        image = next((sample[e] for e in IMAGE_EXTENSIONS if e in sample), None)
        if image is None or "cls" not in sample:
            raise ValueError(f"sample {key} lacks an image ({'/'.join(IMAGE_EXTENSIONS)}) or a .cls label")
        try:
            labels.append(int(sample["cls"].decode().strip()))
        except ValueError:
            raise ValueError(f"sample {key}: .cls {sample['cls'][:20]!r} is not an integer") from None
        images.append(image)
    return images, labels


def load_labelled_set(name: str, source: str, num_classes: int, img_key: str = "filepath",
                      label_key: str = "label", sep: str = "\t") -> LabelledSet:
    """Reads and checks a labelled set; a ``ValueError`` names the set and the problem."""
    try:
        if source.endswith((".csv", ".tsv")):
            if not os.path.isfile(source):
                raise ValueError("file not found")
            images, labels = _from_csv(source, img_key, label_key, sep)
        else:
            images, labels = _from_shards(source)
        if not images:
            raise ValueError("it holds no sample")
        labels_t = torch.tensor(labels, dtype=torch.int64)
        if int(labels_t.min()) < 0 or int(labels_t.max()) >= num_classes:
            raise ValueError(f"labels range over {int(labels_t.min())}..{int(labels_t.max())}, but the class "
                             f"list has {num_classes} names (labels must lie in 0..{num_classes - 1})")
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"zero-shot set {name!r} ({source}): {e}") from None
    return LabelledSet(name, source, images, labels_t)


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                         device="cpu", autocast=contextlib.nullcontext, fill=None) -> torch.Tensor:
    """(C, D) float32 classifier: per class, the normalised mean of its normalised prompt embeddings
    (CLIP's prompt ensembling). Templates use ``{c}`` for the class name; ``fill(template, index,
    name)`` may fill them otherwise."""
    fill = fill or (lambda template, index, name: template.replace("{c}", name))
    weights = []
    for index, name in enumerate(class_names):
        prompts = [fill(t, index, name) for t in templates]
        with autocast():
            emb = model.encode_text(tokenizer(prompts).to(device))
        weights.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(weights)


@torch.no_grad()
def zero_shot_logits(model, preprocess, images: Sequence, classifier: torch.Tensor, batch_size: int = 256,
                     device="cpu", autocast=contextlib.nullcontext, input_dtype=None) -> torch.Tensor:
    """(N, C) float32 cosine similarities of each image to each class, images embedded in batches."""
    from .evaluation import open_image  # one way to read a path or encoded bytes
    out = []
    for start in range(0, len(images), batch_size):
        pixels = torch.stack([preprocess(open_image(im)) for im in images[start:start + batch_size]])
        pixels = pixels.to(device=device, dtype=input_dtype)
        with autocast():
            features = model.encode_image(pixels)
        out.append(F.normalize(features.float(), dim=-1) @ classifier.to(device).T)
    return torch.cat(out).cpu()


def zero_shot_scores(similarity: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                     bins: int = 15) -> Dict[str, float]:
    """``top1``, ``top5`` (where there are at least 5 classes) and ``ece`` (expected calibration
    error of the top-1 softmax confidence at the model's ``logit_scale``, equal-width bins)."""
    from .evaluation import expected_calibration_error
    similarity = similarity.float()
    probs = (logit_scale * similarity).softmax(dim=1)
    confidence, prediction = probs.max(dim=1)
    correct = prediction == labels
    scores = {"top1": correct.float().mean().item()}
    if similarity.shape[1] >= 5:
        top5 = similarity.topk(5, dim=1).indices
        scores["top5"] = (top5 == labels[:, None]).any(dim=1).float().mean().item()
    scores["ece"] = expected_calibration_error(confidence, correct, bins)
    return scores
