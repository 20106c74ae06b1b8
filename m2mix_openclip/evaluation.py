"""Evaluation of image-caption features, a task (floor 2): geometry, retrieval and zero-shot
figures in one table row.

Layers (see :mod:`m2mix_openclip.datasets`): reading data (:mod:`~m2mix_openclip.datasets`),
loading models (:mod:`~m2mix_openclip.models`) and embedding (:mod:`~m2mix_openclip.encode`)
below; the maths (:mod:`~m2mix_openclip.metrics`, :mod:`~m2mix_openclip.retrieval`) at the bottom;
the tools (``m2mix-analyze``, ``m2mix-demo``) above. The names that used to live here are
re-exported, so ``from m2mix_openclip.evaluation import load_model, load_pairs, encode, ...`` keeps
working.

Retrieval follows the standard multi-caption protocol (Karpathy test splits, CLIP_benchmark):
rows that show the same image (same CSV path, same shard bytes, or the same ``image_id`` column)
form one image, embedded once; image-to-text R@K counts a hit when ANY of the image's captions
ranks within K, text-to-image R@K when the caption's image does. With one caption per image this is
the usual exact-pair R@K. Embedding geometry and label precision stay per (image, caption) pair.
ECE: 15 equal-width bins, (lo, hi] (how that differs from torchmetrics: :mod:`m2mix_openclip.metrics`).

Every function raises exceptions (``ValueError``, ``FileNotFoundError``); only the command-line
entry points turn them into exit codes.
"""

from __future__ import annotations

from typing import Optional

import torch

from .datasets import group_by_image, load_pairs, open_image
from .encode import class_text_features, encode, encode_grouped, encode_images, encode_texts
from .metrics import embedding_geometry, expected_calibration_error
from .models import load_model, read_checkpoint
from .retrieval import embedding_arithmetic, grouped_retrieval, retrieval_metrics
from .zeroshot import zero_shot_metrics

__all__ = ["evaluate_features",
           # re-exported from the modules they moved to
           "load_pairs", "group_by_image", "open_image", "load_model", "read_checkpoint", "encode", "encode_images",
           "encode_texts", "encode_grouped", "class_text_features", "embedding_geometry",
           "expected_calibration_error", "grouped_retrieval", "retrieval_metrics", "embedding_arithmetic",
           "zero_shot_metrics"]


def evaluate_features(image_features, text_features, labels=None, classifier=None, logit_scale=100.0,
                      caption_image: Optional[torch.Tensor] = None):
    """Geometry, retrieval and (given a classifier and labels) zero-shot metrics.

    Without ``caption_image`` rows are pairs (N images, N captions). With it, ``image_features``
    (I, D) holds unique images and ``labels`` one label per caption: retrieval is grouped
    (:func:`grouped_retrieval`), embedding geometry is computed per pair on
    ``(image_features[caption_image], text_features)``, and zero-shot accuracy over unique images.
    """
    if caption_image is None:
        pair_images, image_labels = image_features, labels
    else:
        caption_image = torch.as_tensor(caption_image, dtype=torch.long)
        pair_images = image_features[caption_image]
        image_labels = None
        if labels is not None:
            first = torch.full((image_features.shape[0],), len(caption_image), dtype=torch.long)
            first = first.scatter_reduce(0, caption_image, torch.arange(len(caption_image)), "amin")
            image_labels = torch.as_tensor(labels)[first]
    out = dict(embedding_geometry(pair_images, text_features))
    out.update(retrieval_metrics(image_features, text_features, logit_scale, labels, caption_image=caption_image))
    if classifier is not None and image_labels is not None:
        out.update(zero_shot_metrics(image_features, classifier, image_labels, logit_scale))
    return out
