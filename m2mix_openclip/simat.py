"""SIMAT: text-driven image transformation by embedding arithmetic (Couairon et al. 2021,
github.com/facebookresearch/SIMAT), scored as the benchmark's ``eval.py`` scores it.

The benchmark's folder (``simat_db``) holds:

- ``images/images/{region_id}.png``: the image crops (written by the benchmark's
  ``prepare_dataset.py`` from Visual Genome);
- ``triplets.csv``: one row per image, ``region_id`` (index column) and ``dataset_id`` (its row
  in the image database and in the similarity matrix);
- ``transfos.csv``: one row per transformation query: the source image ``region_id``, the word
  ``value`` to replace by the word ``target``, ``target_ids`` (the caption that describes the
  transformed scene), ``norm2`` (for the weights) and ``is_test`` (the split);
- ``oscar_similarity_matrix.pt``: (images, captions) image-caption similarities from OSCAR, the
  benchmark's judge.

Protocol, for every transformation q of the split (``dev``: ``is_test`` false; ``test``: true):

    x_q   = normalize(f(image of region_id_q))           f: the model's image encoder
    d_q   = normalize(g(target_q)) - normalize(g(value_q))   g: the text encoder on the bare word
    r_q   = argmax_{i != source} <normalize(f(image i)), x_q + s d_q>   over the whole database
    hit_q = oscar[r_q, target_ids_q] > 0.5
    SIMAT(s) = 100 * sum_q w_q hit_q / sum_q w_q,   w_q = 1 / sqrt(norm2_q)

and the score reported is the best over the scales s tried. The benchmark's optional linear
adaptation heads are not applied: the model's own embeddings are scored.

Scales: :data:`DEFAULT_SCALES` is the m²-Mix reference implementation's list, 0.5, 1, 1.5, ..., 6
and 7 (13 scales; changdaeoh/multimodal-mixup, ``SIMAT_eval`` in ``main.py``, which logs the best
as ``max_simat``), so that ``simat_dev`` is comparable with the m²-Mix paper's SIMAT figures. The
benchmark's own ``eval.py`` (facebookresearch/SIMAT) scores the scales given as ``--lbds``, 1 alone
by default (its README runs ``--lbd 1 2``); ``--simat-scales 1`` gives that figure. Every scale
tried is reported as ``simat_dev@S`` beside the best, so the default list (which holds 1) shows
``simat_dev@1`` too.

A task (floor 2; layers: see :mod:`m2mix_openclip.datasets`): it reads the benchmark's own files
(:func:`load_simat`), embeds with :mod:`m2mix_openclip.encode` and scores with
:func:`simat_scores`. It differs from :func:`m2mix_openclip.retrieval.embedding_arithmetic`,
which counts a hit only when one given target image is retrieved, weighs queries equally and uses
one scale.
"""

from __future__ import annotations

import csv
import math
import os
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence

import torch

from .encode import encode_images, encode_texts

DEFAULT_SCALES = tuple(0.5 * k for k in range(1, 13)) + (7.0,)  # 0.5, 1.0, ..., 6.0, 7.0: the m²-Mix reference's
SUCCESS_THRESHOLD = 0.5  # the benchmark counts oscar similarity > 0.5 as a correct transformation


@dataclass
class SimatData:
    """The benchmark's files, read.

    Attributes:
        image_paths: image file of each dataset_id (row d is dataset_id d).
        transfos: one dict per transformation with ``source`` (dataset_id), ``value``, ``target``,
            ``target_caption`` (column of ``similarity``), ``weight`` (1/sqrt(norm2)), ``is_test``.
        similarity: (images, captions) float tensor, the benchmark's judge.
    """
    image_paths: List[str]
    transfos: List[dict]
    similarity: torch.Tensor

    def split(self, domain: str) -> List[dict]:
        if domain not in ("dev", "test"):
            raise ValueError(f"SIMAT domain must be 'dev' or 'test', got {domain!r}")
        return [t for t in self.transfos if t["is_test"] == (domain == "test")]

    @property
    def words(self) -> List[str]:
        return sorted({t["value"] for t in self.transfos} | {t["target"] for t in self.transfos})


def _bool(text: str, where: str) -> bool:
    if text.strip().lower() in ("true", "1"):
        return True
    if text.strip().lower() in ("false", "0"):
        return False
    raise ValueError(f"{where}: is_test must be True or False, got {text!r}")


def _read_rows(path: str, needed: Sequence[str]) -> List[dict]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"SIMAT file not found: {path} (the benchmark's simat_db folder holds it)")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    missing = [c for c in needed if rows and c not in rows[0]]
    if missing:
        raise ValueError(f"{path}: missing column(s) {missing} (columns: {list(rows[0])})")
    return rows


def load_simat(folder: str) -> SimatData:
    """Reads a SIMAT database folder (``simat_db``) in the benchmark's layout.

    Raises:
        FileNotFoundError: a file or an image is missing. ValueError: a malformed file.
    """
    triplets = _read_rows(os.path.join(folder, "triplets.csv"), ["region_id", "dataset_id"])
    region_to_dataset = {int(r["region_id"]): int(r["dataset_id"]) for r in triplets}
    ids = sorted(region_to_dataset.values())
    if ids != list(range(len(ids))):
        raise ValueError(f"{folder}/triplets.csv: dataset_id must number the images 0..{len(ids) - 1}")
    image_dir = os.path.join(folder, "images", "images")
    if not os.path.isdir(image_dir):
        image_dir = os.path.join(folder, "images")
    image_paths = [""] * len(ids)
    for region, dataset_id in region_to_dataset.items():
        image_paths[dataset_id] = os.path.join(image_dir, f"{region}.png")
    missing = [p for p in image_paths if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} SIMAT image(s) missing, e.g. {missing[0]} "
                                "(run the benchmark's prepare_dataset.py with Visual Genome first)")
    transfo_path = os.path.join(folder, "transfos.csv")
    transfos = []
    for line, r in enumerate(_read_rows(transfo_path, ["region_id", "value", "target", "target_ids", "norm2",
                                                       "is_test"]), 2):
        region = int(r["region_id"])
        if region not in region_to_dataset:
            raise ValueError(f"{transfo_path}:{line}: region_id {region} is not in triplets.csv")
        transfos.append({"source": region_to_dataset[region], "value": r["value"], "target": r["target"],
                         "target_caption": int(r["target_ids"]), "weight": 1.0 / math.sqrt(float(r["norm2"])),
                         "is_test": _bool(r["is_test"], f"{transfo_path}:{line}")})
    sim_path = os.path.join(folder, "oscar_similarity_matrix.pt")
    if not os.path.isfile(sim_path):
        raise FileNotFoundError(f"SIMAT file not found: {sim_path} (the benchmark ships it in simat_db)")
    similarity = torch.as_tensor(torch.load(sim_path, map_location="cpu", weights_only=True)).float()
    if similarity.dim() != 2 or similarity.shape[0] != len(image_paths):
        raise ValueError(f"{sim_path}: expected an (images={len(image_paths)}, captions) matrix, "
                         f"got shape {tuple(similarity.shape)}")
    worst = max((t["target_caption"] for t in transfos), default=-1)
    if worst >= similarity.shape[1]:
        raise ValueError(f"{transfo_path}: target_ids up to {worst}, but the similarity matrix has "
                         f"{similarity.shape[1]} captions")
    return SimatData(image_paths, transfos, similarity)


@torch.no_grad()
def simat_scores(image_features: torch.Tensor, word_features: Dict[str, torch.Tensor], data: SimatData,
                 domain: str = "dev", scales: Sequence[float] = DEFAULT_SCALES) -> Dict[float, float]:
    """SIMAT score (0-100) at each scale, from embeddings (see the module docstring).

    Args:
        image_features: (images, D), row d the image of dataset_id d (normalised here).
        word_features: word -> (D,) text embedding of the bare word (normalised here).
    Returns:
        {scale: score}.
    """
    transfos = data.split(domain)
    if not transfos:
        raise ValueError(f"SIMAT has no {domain} transformation in this database")
    db = torch.nn.functional.normalize(image_features.float(), dim=-1)  # (N, D)
    words = {w: torch.nn.functional.normalize(v.float(), dim=-1) for w, v in word_features.items()}
    source = torch.tensor([t["source"] for t in transfos])
    delta = torch.stack([words[t["target"]] - words[t["value"]] for t in transfos])  # (Q, D)
    target_caption = torch.tensor([t["target_caption"] for t in transfos])
    weight = torch.tensor([t["weight"] for t in transfos], dtype=torch.float64)
    out = {}
    for scale in scales:
        scores = (db[source] + scale * delta) @ db.T  # (Q, N)
        scores[torch.arange(len(transfos)), source] = -float("inf")  # the nearest image other than the source
        retrieved = scores.argmax(1)
        hit = (data.similarity[retrieved, target_caption] > SUCCESS_THRESHOLD).double()
        out[float(scale)] = 100.0 * float((weight * hit).sum() / weight.sum())
    return out


def simat_evaluate(model, preprocess, tokenizer, folder: str, domain: str = "dev",
                   scales: Sequence[float] = DEFAULT_SCALES, batch_size: int = 256, device: str = "cpu",
                   progress: bool = True, data: Optional[SimatData] = None) -> Dict[str, float]:
    """Embeds the SIMAT database and its words with an OpenCLIP model and scores it.

    Returns:
        ``simat_{domain}`` (the best score over ``scales``), ``simat_{domain}_scale`` (where it is
        reached) and ``simat_{domain}@{scale}`` for each scale.
    """
    data = data if data is not None else load_simat(folder)
    images = encode_images(model, preprocess, data.image_paths, batch_size, device, "SIMAT images", progress)
    words = data.words
    texts = encode_texts(model, tokenizer, words, batch_size, device, "SIMAT words", progress)
    per_scale = simat_scores(images, dict(zip(words, texts)), data, domain, scales)
    best = max(per_scale, key=lambda s: per_scale[s])
    out = {f"simat_{domain}": per_scale[best], f"simat_{domain}_scale": best}
    out.update({f"simat_{domain}@{s:g}": v for s, v in per_scale.items()})
    return out
