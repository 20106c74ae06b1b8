"""Embedding: images, texts, the zero-shot class-text classifier, zero-shot logits.

Floor 1 of evaluation (see :mod:`m2mix_openclip.datasets` for the layers): a model and read data
in, unit-norm float32 features out, on the CPU. Progress shows as a bar on a terminal and as plain
lines elsewhere (:mod:`m2mix_openclip.progress`). Images go through the model in batches of
``batch_size`` under ``autocast()`` (and cast to ``input_dtype``), as OpenCLIP evaluates under
the run's ``--precision``; the features are normalised in float32.
"""

from __future__ import annotations

import contextlib
from typing import Sequence

import torch
import torch.nn.functional as F

from .datasets import group_by_image, open_image
from .progress import progress as progress_display

__all__ = ["encode_images", "encode_texts", "encode", "encode_grouped", "zero_shot_classifier",
           "class_text_features", "zero_shot_logits"]


class _Preprocessed(torch.utils.data.Dataset):
    """Images (paths or encoded bytes) decoded and preprocessed, one by one, in a DataLoader worker."""

    def __init__(self, images: Sequence, preprocess):
        self.images, self.preprocess = images, preprocess

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return self.preprocess(open_image(self.images[index]))


def _pixel_batches(images: Sequence, preprocess, batch_size: int, workers: int):
    """(B, 3, H, W) batches of the preprocessed images, in order; decoded by ``workers`` processes
    (0: in this one)."""
    if workers <= 0:
        for start in range(0, len(images), batch_size):
            yield torch.stack([preprocess(open_image(im)) for im in images[start:start + batch_size]])
        return
    yield from torch.utils.data.DataLoader(_Preprocessed(images, preprocess), batch_size=batch_size, shuffle=False,
                                           num_workers=workers)


@torch.no_grad()
def encode_images(model, preprocess, images: Sequence, batch_size: int = 256, device="cpu", desc: str = "images",
                  progress: bool = True, autocast=contextlib.nullcontext, input_dtype=None,
                  workers: int = 0) -> torch.Tensor:
    """Unit-norm (N, D) float32 embeddings of images (paths or encoded bytes), on the CPU; images are
    decoded by ``workers`` DataLoader processes (0: in this process)."""
    out = []
    with progress_display(len(images), desc, "images", leave=False, enabled=progress) as shown:
        for pixels in _pixel_batches(images, preprocess, batch_size, workers):
            with autocast():
                features = model.encode_image(pixels.to(device=device, dtype=input_dtype))
            out.append(F.normalize(features.float(), dim=-1).cpu())
            shown.update(len(pixels))
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, device="cpu",
                 desc: str = "captions", progress: bool = True) -> torch.Tensor:
    """Unit-norm (N, D) float32 embeddings of texts, on the CPU."""
    out = []
    with progress_display(len(texts), desc, "texts", leave=False, enabled=progress) as shown:
        for start in range(0, len(texts), batch_size):
            batch = list(texts[start:start + batch_size])
            out.append(F.normalize(model.encode_text(tokenizer(batch).to(device)).float(), dim=-1).cpu())
            shown.update(len(batch))
    return torch.cat(out)


def encode(model, preprocess, tokenizer, pairs: Sequence[dict], batch_size: int = 256, device="cpu",
           desc: str = "embedding", progress: bool = True):
    """Unit-norm (image_features, text_features), each (N, D), one row per pair (an image shown by
    several pairs is embedded for each)."""
    x = encode_images(model, preprocess, [p["image"] for p in pairs], batch_size, device, f"{desc}: images", progress)
    y = encode_texts(model, tokenizer, [p["caption"] for p in pairs], batch_size, device, f"{desc}: captions",
                     progress)
    return x, y


def encode_grouped(model, preprocess, tokenizer, pairs: Sequence[dict], batch_size: int = 256,
                   device="cpu", desc: str = "embedding", progress: bool = True):
    """Each unique image (:func:`~m2mix_openclip.datasets.group_by_image`) embedded once, every
    caption embedded.

    Returns:
        image_features (I, D), text_features (T, D), caption_image (T,): the image row of each caption.
    """
    first_rows, caption_image = group_by_image(pairs)
    x = encode_images(model, preprocess, [pairs[r]["image"] for r in first_rows], batch_size, device,
                      f"{desc}: images", progress)
    y = encode_texts(model, tokenizer, [p["caption"] for p in pairs], batch_size, device, f"{desc}: captions",
                     progress)
    return x, y, caption_image


@torch.no_grad()
def zero_shot_classifier(model, tokenizer, class_names: Sequence[str], templates: Sequence[str],
                         device="cpu", autocast=contextlib.nullcontext, fill=None) -> torch.Tensor:
    """(C, D) float32 classifier on ``device``: per class, the normalised mean of its normalised
    prompt embeddings (CLIP's prompt ensembling). Templates use ``{c}`` for the class name;
    ``fill(template, index, name)`` may fill them otherwise."""
    fill = fill or (lambda template, index, name: template.replace("{c}", name))
    weights = []
    for index, name in enumerate(class_names):
        prompts = [fill(t, index, name) for t in templates]
        with autocast():
            emb = model.encode_text(tokenizer(prompts).to(device))
        weights.append(F.normalize(F.normalize(emb.float(), dim=-1).mean(0), dim=-1))
    return torch.stack(weights)


def class_text_features(model, tokenizer, class_names: Sequence[str], templates: Sequence[str], device="cpu"):
    """(C, D) zero-shot classifier on the CPU (:func:`zero_shot_classifier`); templates may name
    the class as ``{c}`` or ``{name}``, and its index as ``{digit}``."""
    return zero_shot_classifier(model, tokenizer, class_names, templates, device,
                                fill=lambda t, i, name: t.format(name=name, digit=i, c=name)).cpu()


def zero_shot_logits(model, preprocess, images: Sequence, classifier: torch.Tensor, batch_size: int = 256,
                     device="cpu", autocast=contextlib.nullcontext, input_dtype=None, workers: int = 0) -> torch.Tensor:
    """(N, C) float32 cosine similarities of each image to each class (rows of ``classifier``), on the CPU."""
    features = encode_images(model, preprocess, images, batch_size, device, progress=False, autocast=autocast,
                             input_dtype=input_dtype, workers=workers)
    return features @ classifier.float().cpu().T
