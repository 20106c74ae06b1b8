"""Retrieval ranks, floor 0 of evaluation: pure tensor functions, no model, no files.

(Layers: see :mod:`m2mix_openclip.datasets`.)

Retrieval follows the standard multi-caption protocol (Karpathy test splits, CLIP_benchmark):
captions of one image (``caption_image``) share that image's row; image-to-text R@K counts a hit
when ANY of the image's captions ranks within K, text-to-image R@K when the caption's image does.
With one caption per image this is the usual exact-pair R@K. A rank counts the candidates scored
strictly above the best positive (ties count in the query's favour), computed in row blocks of
bounded memory. The retrieval ECE is :func:`m2mix_openclip.metrics.expected_calibration_error` of
the top-1 softmax probability (over all candidates, at ``logit_scale``) against "the top-1
candidate is a positive".
"""

from __future__ import annotations

from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .metrics import expected_calibration_error

__all__ = ["grouped_retrieval", "retrieval_metrics", "embedding_arithmetic"]


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
