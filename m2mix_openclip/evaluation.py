"""Evaluation of any OpenCLIP model on image-caption data: embeddings, retrieval, zero-shot,
calibration, embedding arithmetic, and checkpoint loading with clear errors.

Retrieval follows the standard multi-caption protocol (Karpathy test splits, CLIP_benchmark):
rows that show the same image (same CSV path, same shard bytes, or the same ``image_id`` column)
form one image, embedded once; image-to-text R@K counts a hit when ANY of the image's captions
ranks within K, text-to-image R@K when the caption's image does. With one caption per image this is
the usual exact-pair R@K. Embedding geometry and label precision stay per (image, caption) pair.

Every function raises exceptions (``ValueError``, ``FileNotFoundError``); only the command-line
entry points turn them into exit codes.
"""

from __future__ import annotations

import glob
import hashlib
import io
import os
import tarfile
from typing import Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from PIL import Image

from .metrics import embedding_geometry


# -- data -----------------------------------------------------------------------------------------
def load_pairs(data: str, img_key: str = "filepath", caption_key: str = "title", label_key: str = "label",
               sep: str = "\t", image_id_key: Optional[str] = None) -> List[dict]:
    """Image-caption pairs from a CSV file or webdataset shards (a path, a glob or a brace pattern
    such as ``shard-{000000..000003}.tar``).

    Each pair is a dict with ``image`` (path or bytes), ``caption``, ``label`` (int or None) and
    ``image_id`` (str), the image's identity used to group captions of one image:
    the ``image_id_key`` column (CSV) or member extension (shards, e.g. ``KEY.imgid``) when given,
    else the image path as written in the CSV, else the SHA-1 of the image bytes in shards.
    """
    if data.endswith(".csv") or data.endswith(".tsv"):
        from .data import read_csv
        rows = read_csv(data, img_key, caption_key, sep)
        if rows and image_id_key is not None and image_id_key not in rows[0]:
            raise ValueError(f"{data}: no column {image_id_key!r} for --image-id-key (columns: {list(rows[0])})")
        return [{"image": r[img_key], "caption": r[caption_key],
                 "label": int(r[label_key]) if r.get(label_key, "") != "" else None,
                 "image_id": str(r[image_id_key]) if image_id_key is not None else os.path.normpath(r[img_key])}
                for r in rows]
    import braceexpand
    paths = [p for pattern in braceexpand.braceexpand(data) for p in sorted(glob.glob(pattern))]
    if not paths:
        raise FileNotFoundError(f"no CSV or .tar shards match {data!r}")
    samples: Dict[str, dict] = {}
    for path in paths:
        with tarfile.open(path) as tar:
            for member in tar.getmembers():
                if not member.isfile():
                    continue
                key, ext = member.name.rsplit(".", 1)
                payload = tar.extractfile(member).read()
                sample = samples.setdefault(f"{path}:{key}", {"label": None})
                if ext in ("png", "jpg", "jpeg", "webp"):
                    sample["image"] = payload
                elif ext == "txt":
                    sample["caption"] = payload.decode()
                elif ext == "cls":
                    sample["label"] = int(payload.decode())
                elif image_id_key is not None and ext == image_id_key:
                    sample["image_id"] = payload.decode().strip()
    pairs = [s for s in samples.values() if "image" in s and "caption" in s]
    if not pairs:
        raise ValueError(f"{data!r}: shards hold no sample with both an image (png/jpg) and a txt caption")
    for key, s in samples.items():
        if "image" in s and "caption" in s and "image_id" not in s:
            if image_id_key is not None:
                raise ValueError(f"{key}: no .{image_id_key} member for --image-id-key {image_id_key!r}")
            s["image_id"] = hashlib.sha1(s["image"]).hexdigest()
    return pairs


def group_by_image(pairs: Sequence[dict]) -> Tuple[List[int], torch.Tensor]:
    """Groups pairs by ``image_id`` (pairs without one are their own image).

    Returns:
        first_rows: for each unique image g (in order of first appearance), the index of its
            first pair; caption_image: (T,) long, the unique image g of each pair t.
    """
    index: Dict[str, int] = {}
    first_rows, caption_image = [], []
    for t, pair in enumerate(pairs):
        key = pair.get("image_id")
        key = f"row:{t}" if key is None else f"id:{key}"
        if key not in index:
            index[key] = len(first_rows)
            first_rows.append(t)
        caption_image.append(index[key])
    return first_rows, torch.tensor(caption_image, dtype=torch.long)


def open_image(image):
    """An RGB PIL image from a path or from encoded bytes (a webdataset member)."""
    return Image.open(io.BytesIO(image) if isinstance(image, (bytes, bytearray)) else image).convert("RGB")


# -- models ---------------------------------------------------------------------------------------
def _state_dict_mismatch(model_state: dict, state: dict, limit: int = 5) -> str:
    """Missing keys, unexpected keys and shape mismatches, each with a count and the first names."""
    def listed(names):
        names = sorted(names)
        return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
    parts = []
    missing = set(model_state) - set(state)
    unexpected = set(state) - set(model_state)
    shapes = [f"{k} {tuple(state[k].shape)} vs model {tuple(model_state[k].shape)}"
              for k in sorted(set(state) & set(model_state))
              if hasattr(state[k], "shape") and tuple(state[k].shape) != tuple(model_state[k].shape)]
    if missing:
        parts.append(f"{len(missing)} missing key(s): {listed(missing)}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected key(s): {listed(unexpected)}")
    if shapes:
        parts.append(f"{len(shapes)} shape mismatch(es): " + "; ".join(shapes[:limit])
                     + (f"; ... ({len(shapes)} in all)" if len(shapes) > limit else ""))
    return "; ".join(parts)


def _read_checkpoint(checkpoint: str) -> dict:
    if not os.path.isfile(checkpoint):
        raise FileNotFoundError(f"checkpoint not found: {checkpoint}")
    from .integration.openclip_compat import numpy_scalars_allowed
    try:
        with numpy_scalars_allowed():  # the learning rates in checkpoints of OpenCLIP < 2.30
            state = torch.load(checkpoint, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated files, pickles with code, other formats
        raise ValueError(f"cannot read checkpoint {checkpoint} as a PyTorch state dict "
                         f"(weights_only=True): {type(e).__name__}: {e}") from e
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"checkpoint {checkpoint} holds {type(state).__name__}, not a state dict")
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in state.items()}


def load_model(model_name: str, checkpoint: Optional[str] = None, pretrained: Optional[str] = None,
               device: str = "cpu"):
    """(model, preprocess, tokenizer) for an OpenCLIP model, with a checkpoint loaded safely
    (``weights_only=True``). A training checkpoint (``state_dict`` key, ``module.`` prefixes)
    or a bare state dict both work.

    Raises:
        FileNotFoundError: the checkpoint does not exist.
        ValueError: an unreadable checkpoint, one that does not fit the model (the message lists
            missing, unexpected and mis-shaped keys), ``--pretrained`` with a ``local-dir:`` model,
            or pretrained weights that cannot be had (not cached and no network).
    """
    import open_clip

    from .integration.quiet import PRETRAINED_FAILURE, RANDOM_INIT, dropped_log_messages
    if model_name.startswith("local-dir:") and pretrained:
        raise ValueError("OpenCLIP ignores --pretrained for local-dir: models; pass --checkpoint instead")
    from .integration.openclip_compat import model_name as supported_model_name
    model_name = supported_model_name(model_name)  # local-dir: before OpenCLIP 3.0 too
    state = _read_checkpoint(checkpoint) if checkpoint is not None else None
    # held back: the random-init warning when the checkpoint's weights replace the random ones, and
    # OpenCLIP's ERROR line for a pretrained tag that cannot be had (the error below restates it)
    held_back = (RANDOM_INIT if state is not None else ()) + (PRETRAINED_FAILURE if pretrained else ())
    try:
        with dropped_log_messages(*held_back):
            model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=pretrained,
                                                                         device=device)
    except Exception as e:
        if not pretrained:
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        tags = open_clip.list_pretrained_tags_by_model(model_name)
        if tags and pretrained not in tags and not os.path.exists(pretrained):
            hint = f"the tags of {model_name!r}: {', '.join(tags)}"
        else:
            hint = ("offline? the weights must already be in the Hugging Face / OpenCLIP cache; "
                    "`open_clip.list_pretrained()` lists the models and tags")
        raise ValueError(f"cannot load --pretrained {pretrained!r} for --model {model_name!r}: "
                         f"{type(e).__name__}: {first} ({hint})") from e
    if state is not None:
        try:
            model.load_state_dict(state)
        except RuntimeError as e:
            details = _state_dict_mismatch(model.state_dict(), state) or str(e).strip()
            raise ValueError(f"checkpoint {checkpoint} does not fit model {model_name!r}: {details} "
                             f"(is --model the architecture it was trained with?)") from e
    model.eval()
    return model, preprocess, open_clip.get_tokenizer(model_name)


@torch.no_grad()
def encode_images(model, preprocess, images: Sequence, batch_size: int = 256, device: str = "cpu",
                  desc: str = "images", progress: bool = True) -> torch.Tensor:
    """Unit-norm (N, D) embeddings of images (paths or bytes), in batches with a progress bar."""
    from tqdm import tqdm
    out = []
    for start in tqdm(range(0, len(images), batch_size), desc=desc, disable=not progress, leave=False):
        pixels = torch.stack([preprocess(open_image(im)) for im in images[start:start + batch_size]]).to(device)
        out.append(F.normalize(model.encode_image(pixels).float(), dim=-1).cpu())
    return torch.cat(out)


@torch.no_grad()
def encode_texts(model, tokenizer, texts: Sequence[str], batch_size: int = 256, device: str = "cpu",
                 desc: str = "captions", progress: bool = True) -> torch.Tensor:
    """Unit-norm (N, D) embeddings of texts, in batches with a progress bar."""
    from tqdm import tqdm
    out = []
    for start in tqdm(range(0, len(texts), batch_size), desc=desc, disable=not progress, leave=False):
        tokens = tokenizer(list(texts[start:start + batch_size])).to(device)
        out.append(F.normalize(model.encode_text(tokens).float(), dim=-1).cpu())
    return torch.cat(out)


def encode(model, preprocess, tokenizer, pairs: Sequence[dict], batch_size: int = 256, device: str = "cpu",
           desc: str = "embedding", progress: bool = True):
    """Unit-norm (image_features, text_features), each (N, D), one row per pair (an image shown by
    several pairs is embedded for each)."""
    x = encode_images(model, preprocess, [p["image"] for p in pairs], batch_size, device, f"{desc}: images", progress)
    y = encode_texts(model, tokenizer, [p["caption"] for p in pairs], batch_size, device, f"{desc}: captions",
                     progress)
    return x, y


def encode_grouped(model, preprocess, tokenizer, pairs: Sequence[dict], batch_size: int = 256,
                   device: str = "cpu", desc: str = "embedding", progress: bool = True):
    """Each unique image (``group_by_image``) embedded once, every caption embedded.

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
def class_text_features(model, tokenizer, class_names: Sequence[str], templates: Sequence[str], device="cpu"):
    """(C, D) zero-shot classifier (``zeroshot.zero_shot_classifier``); templates may name the
    class as ``{c}`` or ``{name}``, and its index as ``{digit}``."""
    from .zeroshot import zero_shot_classifier
    return zero_shot_classifier(model, tokenizer, class_names, templates, device,
                                fill=lambda t, i, name: t.format(name=name, digit=i, c=name)).cpu()


# -- metrics --------------------------------------------------------------------------------------
def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    """ECE: sum over equal-width confidence bins of (bin share) * |accuracy - mean confidence|."""
    confidence, correct = confidence.double(), correct.double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    ece = 0.0
    for lo, hi in zip(edges[:-1], edges[1:]):
        inside = (confidence > lo) & (confidence <= hi) if lo > 0 else (confidence >= lo) & (confidence <= hi)
        if inside.any():
            ece += inside.double().mean().item() * abs(correct[inside].mean().item() - confidence[inside].mean().item())
    return ece


def _ranks_in_blocks(queries, candidates, positive_index, logit_scale, chunk_size):
    """For each query q, with s_q = candidates @ q:
    rank_q = #{c : s_qc > best_positive_q} (candidates scored strictly above the best positive, so
    ties count in the query's favour), top1_q = argmax_c s_qc and
    confidence_q = max_c softmax(logit_scale * s_q)_c.

    ``positive_index`` (Q, P) long holds each query's positive candidates (a row may repeat one);
    their best score is read from the same block of scores, so a positive ties with itself exactly.
    Rows go in blocks of ``chunk_size`` queries (default: about 2**22 scores, 16 MiB), so memory
    is O(chunk x C) (two float32 blocks, reused) plus a (D, C) copy of the candidates:
    no Q x C matrix, no sort.
    """
    num_candidates = candidates.shape[0]
    rows = max(1, chunk_size if chunk_size is not None else (1 << 22) // max(1, num_candidates))
    # (D, C) contiguous: a transposed view made the BLAS call grow memory with every block here
    candidates_t = candidates.float().T.contiguous()
    # two (rows, C) float32 buffers reused by every block: no allocation that grows with C inside
    # the loop (fresh per-block tensors let the C allocator's heap grow block after block)
    buffer = torch.empty(min(rows, queries.shape[0]), num_candidates)
    above = torch.empty_like(buffer)
    ranks, tops, confidences = [], [], []
    for start in range(0, queries.shape[0], rows):
        block = queries[start:start + rows].float()
        b = block.shape[0]
        scores = torch.matmul(block, candidates_t, out=buffer[:b])  # (b, C)
        best = scores.gather(1, positive_index[start:start + rows]).amax(1, keepdim=True)  # (b, 1)
        # counts as float32 sums of 0/1: exact up to 2**24 candidates
        ranks.append(torch.gt(scores, best, out=above[:b]).sum(1).long())
        top_score, top = scores.max(1)
        tops.append(top)
        # max softmax = 1 / sum_c exp(scale (s_c - s_max)), computed in place in the buffer
        confidences.append(1.0 / scores.sub_(top_score[:, None]).mul_(logit_scale).exp_().sum(1))
    return torch.cat(ranks), torch.cat(tops), torch.cat(confidences)


@torch.no_grad()
def grouped_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, caption_image: torch.Tensor,
                      logit_scale: float = 100.0, labels: Optional[torch.Tensor] = None, ks=(1, 5, 10),
                      chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Multi-caption retrieval (Karpathy / CLIP_benchmark protocol), in bounded memory.

    With s = image_features @ text_features.T and P(i) = {t : caption_image[t] = i}:

    - ``image_to_text_R@K`` = mean over images i of [#{t : s_it > max_{p in P(i)} s_ip} < K]: a hit
      when ANY of the image's captions ranks within K;
    - ``text_to_image_R@K`` = mean over captions t of [#{i : s_it > s_{caption_image[t], t}} < K];
    - ``*_label_precision@1`` (when ``labels``, one per caption, are given): the top-1 candidate
      shares the query's label, averaged per (image, caption) pair (an image counts once for each
      of its captions);
    - ``*_ece``: ECE of the top-1 softmax confidence, ``max_c softmax(logit_scale * s_q)_c`` over
      all candidates, against "the top-1 candidate is a positive" (any of the image's captions;
      the caption's image), over unique images (image_to_text) or captions (text_to_image).

    Args:
        image_features: (I, D), one row per unique image; text_features: (T, D).
        caption_image: (T,) long, the image row of each caption; every image needs a caption.
        chunk_size: query rows per block (default: about 2**22 scores per block).
    Raises:
        ValueError: shapes disagree, an image has no caption, or one image's captions carry
            different labels.
    """
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    caption_image = torch.as_tensor(caption_image, dtype=torch.long)
    if caption_image.shape != (num_texts,):
        raise ValueError(f"caption_image has shape {tuple(caption_image.shape)}, expected ({num_texts},)")
    if num_texts and (caption_image.min() < 0 or caption_image.max() >= num_images):
        raise ValueError(f"caption_image holds rows outside 0..{num_images - 1}")
    captions_per_image = torch.bincount(caption_image, minlength=num_images)
    if (captions_per_image == 0).any():
        raise ValueError(f"{int((captions_per_image == 0).sum())} image(s) have no caption "
                         f"(first: row {int((captions_per_image == 0).nonzero()[0])})")
    out: Dict[str, float] = {}

    # captions of each image as rows of a (I, most captions) index, padded with the first caption
    order = torch.argsort(caption_image, stable=True)
    starts = torch.cumsum(captions_per_image, 0) - captions_per_image
    slot = torch.arange(num_texts) - starts[caption_image[order]]
    image_captions = order[starts][:, None].repeat(1, int(captions_per_image.max()))
    image_captions[caption_image[order], slot] = order
    i2t = _ranks_in_blocks(image_features, text_features, image_captions, logit_scale, chunk_size)
    t2i = _ranks_in_blocks(text_features, image_features, caption_image[:, None], logit_scale, chunk_size)
    image_labels = None
    if labels is not None:
        labels = torch.as_tensor(labels)
        image_labels = torch.empty(num_images, dtype=labels.dtype).scatter_(0, caption_image, labels)
        clash = image_labels[caption_image] != labels
        if clash.any():
            t = int(clash.nonzero()[0])
            raise ValueError(f"image row {int(caption_image[t])} has captions with different labels "
                             f"({int(image_labels[caption_image[t]])} and {int(labels[t])}); "
                             "check the image identity (--image-id-key) or the label column")
    for name, (rank, top, confidence), correct_top in (
            ("image_to_text", i2t, lambda top: caption_image[top] == torch.arange(num_images)),
            ("text_to_image", t2i, lambda top: top == caption_image)):
        for k in ks:
            out[f"{name}_R@{k}"] = (rank < k).float().mean().item()
        if labels is not None:
            if name == "image_to_text":  # per pair: each image weighs as many captions as it has
                hit = (labels[top] == image_labels).double()
                out[f"{name}_label_precision@1"] = ((hit * captions_per_image).sum() / num_texts).item()
            else:
                out[f"{name}_label_precision@1"] = (image_labels[top] == labels).float().mean().item()
        out[f"{name}_ece"] = expected_calibration_error(confidence, correct_top(top))
    return out


def retrieval_metrics(image_features, text_features, logit_scale: float = 100.0,
                      labels: Optional[torch.Tensor] = None, ks=(1, 5, 10),
                      caption_image: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """R@K both ways, label-level precision@1 and ECE (see :func:`grouped_retrieval`).

    Without ``caption_image`` every row is its own image (exact-pair retrieval: ``image_features``
    and ``text_features`` both (N, D)); with it, ``image_features`` holds the unique images.
    """
    if caption_image is None:
        if image_features.shape[0] != text_features.shape[0]:
            raise ValueError(f"{image_features.shape[0]} images and {text_features.shape[0]} captions: "
                             "pass caption_image to group captions by image")
        caption_image = torch.arange(text_features.shape[0])
    return grouped_retrieval(image_features, text_features, caption_image, logit_scale, labels, ks)


def zero_shot_metrics(image_features, classifier, labels, logit_scale: float = 100.0) -> Dict[str, float]:
    """Zero-shot top-1 accuracy and the ECE of its softmax confidence (``zeroshot.zero_shot_scores``,
    the code the training-time ``--zeroshot-data`` hook uses)."""
    from .zeroshot import zero_shot_scores
    scores = zero_shot_scores(image_features.float() @ classifier.float().T, labels, logit_scale)
    return {"zero_shot_accuracy": scores["top1"], "zero_shot_ece": scores["ece"]}


def embedding_arithmetic(query_images, source_texts, target_texts, gallery, target_index,
                         query_index=None, scale: float = 1.0) -> Dict[str, float]:
    """Exact-target retrieval by embedding arithmetic: retrieve the target image with
    ``x + s (t_target - t_source)`` and count a hit only when it is the one given target row.

    This is NOT the SIMAT score (see :mod:`m2mix_openclip.simat`): SIMAT takes the nearest image
    other than the source, judges it by the similarity of that image to the target caption in the
    similarity matrix it ships (success when > 0.5, so any image that shows the transformed scene
    counts), weights transformations by 1/sqrt(norm2), and reports the best over several scales.
    Here only the given target row counts, every query weighs the same, and one scale is used:
    a stricter, label-free check for data without SIMAT's files.

    Args:
        query_images: (Q, D) image embeddings; source_texts, target_texts: (Q, D) text embeddings.
        gallery: (G, D) image embeddings to retrieve from; target_index: (Q,) the right gallery row.
        query_index: (Q,) the query's own gallery row, never counted as a hit (as SIMAT does).
    Returns:
        ``arithmetic_R@1`` and ``arithmetic_R@5``.
    """
    queries = F.normalize(query_images + scale * (target_texts - source_texts), dim=-1)
    sims = queries @ F.normalize(gallery, dim=-1).T  # (Q, G)
    if query_index is not None:
        sims[torch.arange(len(queries)), query_index] = -float("inf")
    order = sims.argsort(dim=1, descending=True)
    rank = (order == target_index[:, None]).float().argmax(dim=1)
    return {"arithmetic_R@1": (rank < 1).float().mean().item(), "arithmetic_R@5": (rank < 5).float().mean().item()}


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
