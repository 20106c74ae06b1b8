"""Zero-shot classification, a task (floor 2; layers: see :mod:`m2mix_openclip.datasets`).

Class names and prompt templates make a classifier (CLIP's prompt ensembling,
:func:`~m2mix_openclip.encode.zero_shot_classifier`); images are scored against it by
:func:`~m2mix_openclip.metrics.zero_shot_scores` (top-1, top-5, ECE of the softmax confidence at
the model's ``logit_scale``). One scoring, two namings:

- the tools (``m2mix-analyze``, ``m2mix-demo``): :func:`zero_shot_metrics` gives
  ``zero_shot_accuracy`` and ``zero_shot_ece`` (:data:`TOOL_KEYS`);
- the ``--zeroshot-data`` hook: :func:`labelled_set_metrics` gives ``NAME-zeroshot-top1``,
  ``NAME-zeroshot-top5`` (from 5 classes) and ``NAME-zeroshot-ece`` per labelled set
  (:func:`set_metric_key`).

A labelled set is a CSV (an image-path column and an integer label column), webdataset shards
(an image member and a ``cls`` member per sample), a CLIP_benchmark classification folder or an
ImageFolder tree, read and checked by :func:`load_zero_shot_set` before any model runs. A
CLIP_benchmark folder brings its own class names and templates (``classnames.txt``,
``zeroshot_classification_templates.txt``), used unless others are given; every set is scored
with the classifier of its own names and templates. A set whose classes are a part of the class
list (``LabelledSet.class_groups``: an ImageFolder of ImageNet-R's 200 classes) is scored over its
own classes (:func:`~m2mix_openclip.metrics.restrict_to_class_groups`). The readers, the classifier
and the scores are re-exported here under their old names.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Mapping, Optional, Sequence, Tuple

import torch

from .datasets import (
    LabelledSet,
    clip_benchmark_set,
    is_clip_benchmark_root,
    load_labelled_set,
    parse_class_names,
    parse_templates,
)
from .encode import zero_shot_classifier, zero_shot_logits
from .metrics import restrict_to_class_groups, zero_shot_scores

__all__ = ["LabelledSet", "load_labelled_set", "parse_class_names", "parse_templates",
           "zero_shot_classifier", "zero_shot_logits", "zero_shot_scores", "zero_shot_metrics",
           "labelled_set_metrics", "set_metric_key", "SET_SCORES", "TOOL_KEYS",
           "DEFAULT_TEMPLATES", "load_zero_shot_set"]

SET_SCORES = ("top1", "top5", "ece")  # what zero_shot_scores gives (top5 from 5 classes on)
TOOL_KEYS = {"top1": "zero_shot_accuracy", "ece": "zero_shot_ece"}  # the tools' names of those scores
DEFAULT_TEMPLATES = ("a photo of a {c}.",)  # where neither a flag nor the set gives templates


def load_zero_shot_set(name: str, source: str, class_names: Optional[Sequence[str]] = None,
                       templates: Optional[Sequence[str]] = None, split: str = "test", img_key: str = "filepath",
                       label_key: str = "label", sep: str = "\t",
                       column_flags: Tuple[str, str] = ("--csv-img-key", "--zeroshot-label-key"),
                       names_flag: str = "--zeroshot-classnames",
                       class_folders: Optional[Mapping[str, Tuple[int, ...]]] = None) -> LabelledSet:
    """A labelled set (:func:`~m2mix_openclip.datasets.load_labelled_set`) with the class names and
    templates it is scored with: the given ones, else a CLIP_benchmark folder's own, else (templates)
    :data:`DEFAULT_TEMPLATES`. ``class_folders``: how an ImageFolder tree's folders map to the
    classes (:func:`~m2mix_openclip.datasets.parse_class_folders`).

    Raises:
        ValueError: ``zero-shot set 'NAME': `` and the problem, as ``load_labelled_set``, or no
            class names (a CSV or shards without ``names_flag``, a folder without ``classnames.txt``).
    """
    folder = None
    if is_clip_benchmark_root(source):
        try:
            folder = clip_benchmark_set(source, split)
        except (OSError, ValueError) as e:
            raise ValueError(f"zero-shot set {name!r}: {e}") from None
    if folder is not None and folder.task != "classification":
        load_labelled_set(name, source, 1, split=split)  # raises: a retrieval set has no labels
    names = list(class_names) if class_names is not None else (folder.class_names if folder else None)
    if names is None:
        where = (f"{source} has no classnames.txt" if folder
                 else f"{source} is not a CLIP_benchmark folder, which brings its own classnames.txt")
        raise ValueError(f"zero-shot set {name!r}: no class names ({where}); give {names_flag} (a file with "
                         "one name per line, or a comma list)")
    prompts = (list(templates) if templates is not None else
               (folder.templates if folder is not None and folder.templates else list(DEFAULT_TEMPLATES)))
    labelled = load_labelled_set(name, source, len(names), img_key, label_key, sep, column_flags, names,
                                 class_folders, split)
    labelled.class_names, labelled.templates = names, prompts
    return labelled


def zero_shot_metrics(image_features: torch.Tensor, classifier: torch.Tensor, labels: torch.Tensor,
                      logit_scale: float = 100.0) -> Dict[str, float]:
    """``zero_shot_accuracy`` and ``zero_shot_ece`` of (N, D) image features against a (C, D)
    classifier and (N,) labels (the same scores as the ``--zeroshot-data`` hook's)."""
    scores = zero_shot_scores(image_features.float() @ classifier.float().T, labels, logit_scale)
    return {name: scores[score] for score, name in TOOL_KEYS.items()}


def set_metric_key(set_name: str, score: str) -> str:
    """The hook's name of one score of one labelled set: ``NAME-zeroshot-SCORE``."""
    return f"{set_name}-zeroshot-{score}"


@torch.no_grad()
def labelled_set_metrics(model, preprocess, tokenizer, sets: Sequence[LabelledSet],
                         class_names: Optional[Sequence[str]] = None, templates: Optional[Sequence[str]] = None,
                         batch_size: int = 256, device="cpu", autocast=contextlib.nullcontext,
                         input_dtype=None, workers: int = 0) -> Dict[str, float]:
    """Zero-shot scores of every labelled set, named ``NAME-zeroshot-SCORE``, each with its own
    class names and templates (``class_names`` / ``templates`` where the set has none); one
    class-text classifier per distinct pair, built once; images go through the model in batches of
    ``batch_size`` under ``autocast()``, cast to ``input_dtype``, decoded by ``workers`` DataLoader
    processes (0: in this one). A set with ``class_groups`` is scored over its own classes. The
    model is used as it is (eval mode is the caller's)."""
    classifiers: Dict[Tuple[Tuple[str, ...], Tuple[str, ...]], torch.Tensor] = {}
    scale = float(model.logit_scale.exp())
    out: Dict[str, float] = {}
    for labelled in sets:
        names = labelled.class_names if labelled.class_names is not None else class_names
        prompts = labelled.templates if labelled.templates is not None else templates
        if names is None or prompts is None:
            raise ValueError(f"zero-shot set {labelled.name!r}: no class names or templates to score it with")
        key = (tuple(names), tuple(prompts))
        if key not in classifiers:
            classifiers[key] = zero_shot_classifier(model, tokenizer, names, prompts, device, autocast)
        classifier = classifiers[key]
        similarity = zero_shot_logits(model, preprocess, labelled.images, classifier, batch_size, device,
                                      autocast, input_dtype, workers)
        if labelled.class_groups is not None:
            similarity = restrict_to_class_groups(similarity, labelled.class_groups)
        for score, value in zero_shot_scores(similarity, labelled.labels, scale).items():
            out[set_metric_key(labelled.name, score)] = value
    return out
