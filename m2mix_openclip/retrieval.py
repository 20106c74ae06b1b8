"""Retrieval ranks, floor 0 of evaluation: pure tensor functions, no model, no files.

(Layers: see :mod:`m2mix_openclip.datasets`.)

Retrieval follows the standard multi-caption protocol (Karpathy test splits, CLIP_benchmark):
captions of one image (``caption_image``) share that image's row; image-to-text R@K counts a hit
when ANY of the image's captions ranks within K, text-to-image R@K when the caption's image does.
With one caption per image this is the usual exact-pair R@K, computed in row blocks of bounded
memory.

Ties: candidates that score exactly the same are ordered at random and every figure is its
expected value over that order (:func:`m2mix_openclip.metrics.hit_probability`), in both
directions and for label precision and ECE alike: a caption that repeats (the same text for many
images) ties with its copies, and the query gets the share of them a random order would give it,
never all of them. Without ties the figures equal CLIP_benchmark's (``topk``); with ties,
CLIP_benchmark follows ``torch.topk``'s order of the tied candidates, and its figure averaged over
every order of the candidates equals ours (``tests/test_clip_benchmark.py``). The retrieval ECE is
:func:`m2mix_openclip.metrics.expected_calibration_error` of the top-1 softmax probability (over all
candidates, at ``logit_scale``) against the chance that the top-1 candidate is a positive.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional

import torch
import torch.nn.functional as F

from .metrics import expected_calibration_error, hit_probability

__all__ = ["grouped_retrieval", "retrieval_metrics", "embedding_arithmetic"]


@dataclass
class _Ranks:
    """Per query: ``above`` (candidates strictly above the best positive), ``tied_positives`` and
    ``tied_negatives`` (scoring exactly the best positive's score), ``top1_positive`` (the chance
    that the top-1 candidate is a positive under a random order of ties), ``confidence`` (the
    top-1 softmax probability) and ``top1_label`` (the chance that the top-1 candidate carries the
    query's label; None without labels)."""
    above: torch.Tensor
    tied_positives: torch.Tensor
    tied_negatives: torch.Tensor
    top1_positive: torch.Tensor
    confidence: torch.Tensor
    top1_label: Optional[torch.Tensor]

    def hits(self, k: int) -> torch.Tensor:
        return hit_probability(self.above, self.tied_positives, self.tied_negatives, k)


def _ranks_in_blocks(queries, candidates, positive_index, positive_valid, logit_scale, chunk_size,
                     query_labels=None, candidate_labels=None) -> _Ranks:
    """Ranks of every query's best positive among all candidates, ties counted apart.

    With s_q = candidates @ q and b_q = max over the query's positives of s_q:
    above_q = #{c : s_qc > b_q}, tied_q = #{c : s_qc = b_q}, of which tied_positives_q are
    positives; the top-1 is a positive with chance tied_positives_q / tied_q when above_q = 0;
    confidence_q = max_c softmax(logit_scale * s_q)_c.

    ``positive_index`` (Q, P) long holds each query's positive candidates, ``positive_valid``
    (Q, P) bool which of those slots are real (rows with fewer positives are padded); their scores
    are read from the same block of scores, so a positive ties with itself and its copies exactly.
    Rows go in blocks of ``chunk_size`` queries (default: about 2**22 scores, 16 MiB), so memory
    is O(chunk x C) (two float32 blocks, reused) plus a (D, C) copy of the candidates: no Q x C
    matrix, no sort.
    """
    num_candidates = candidates.shape[0]
    rows = max(1, chunk_size if chunk_size is not None else (1 << 22) // max(1, num_candidates))
    # (D, C) contiguous: a transposed view made the BLAS call grow memory with every block here
    candidates_t = candidates.float().T.contiguous()
    # buffers reused by every block: no allocation that grows with C inside the loop (fresh
    # per-block tensors let the C allocator's heap grow block after block)
    buffer = torch.empty(min(rows, queries.shape[0]), num_candidates)
    indicator = torch.empty_like(buffer)  # 0/1 as float32, summed in place of a fresh (b, C) copy
    parts = {name: [] for name in ("above", "tied", "tied_positives", "top1_positive", "confidence", "top1_label")}
    for start in range(0, queries.shape[0], rows):
        block = queries[start:start + rows].float()
        b = block.shape[0]
        scores = torch.matmul(block, candidates_t, out=buffer[:b])  # (b, C)
        positive_scores = scores.gather(1, positive_index[start:start + rows])  # (b, P)
        valid = positive_valid[start:start + rows]
        best = positive_scores.masked_fill(~valid, -float("inf")).amax(1, keepdim=True)  # (b, 1)
        # counts as float32 sums of 0/1: exact up to 2**24 candidates
        above = torch.gt(scores, best, out=indicator[:b]).sum(1)
        tied = torch.eq(scores, best, out=indicator[:b]).sum(1)
        tied_positives = ((positive_scores == best) & valid).sum(1)
        top_score, top = scores.max(1, keepdim=True)
        if query_labels is not None:
            labels_here = query_labels[start:start + rows]
            share = (candidate_labels[top[:, 0]] == labels_here).double()
            top_count = torch.eq(scores, top_score, out=indicator[:b]).sum(1)
            tied_rows = (top_count > 1).nonzero()[:, 0]  # ties at the top: the share of them with the label
            if len(tied_rows):
                at_top = scores[tied_rows] == top_score[tied_rows]
                same = at_top & (candidate_labels[None, :] == labels_here[tied_rows, None])
                share[tied_rows] = same.sum(1).double() / top_count[tied_rows].double()
            parts["top1_label"].append(share)
        parts["above"].append(above.long())
        parts["tied"].append(tied.long())
        parts["tied_positives"].append(tied_positives)
        parts["top1_positive"].append(torch.where(above == 0, tied_positives.double() / tied.double(),
                                                  torch.zeros((), dtype=torch.float64)))
        # max softmax = 1 / sum_c exp(scale (s_c - s_max)), computed in place in the buffer
        parts["confidence"].append(1.0 / scores.sub_(top_score).mul_(logit_scale).exp_().sum(1))
    above, tied, tied_positives = (torch.cat(parts[n]) for n in ("above", "tied", "tied_positives"))
    return _Ranks(above, tied_positives, tied - tied_positives, torch.cat(parts["top1_positive"]),
                  torch.cat(parts["confidence"]), torch.cat(parts["top1_label"]) if query_labels is not None else None)


@torch.no_grad()
def grouped_retrieval(image_features: torch.Tensor, text_features: torch.Tensor, caption_image: torch.Tensor,
                      logit_scale: float = 100.0, labels: Optional[torch.Tensor] = None, ks=(1, 5, 10),
                      chunk_size: Optional[int] = None) -> Dict[str, float]:
    """Multi-caption retrieval (Karpathy / CLIP_benchmark protocol), in bounded memory.

    With s = image_features @ text_features.T and P(i) = {t : caption_image[t] = i}:

    - ``image_to_text_R@K``: mean over images i of the chance that one of P(i) ranks within K,
      candidates tied with the image's best caption put in a random order
      (:func:`~m2mix_openclip.metrics.hit_probability`); without ties,
      [#{t : s_it > max_{p in P(i)} s_ip} < K];
    - ``text_to_image_R@K``: the same over captions t, with the caption's image as the one positive;
    - ``*_label_precision@1`` (when ``labels``, one per caption, are given): the share of the
      candidates tied at the top score that carry the query's label (the top-1's label when there is
      no tie), averaged per (image, caption) pair (an image counts once for each of its captions);
    - ``*_ece``: ECE of the top-1 softmax confidence, ``max_c softmax(logit_scale * s_q)_c`` over
      all candidates, against the chance that the top-1 candidate is a positive (any of the image's
      captions; the caption's image), over unique images (image_to_text) or captions (text_to_image).

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
    most = int(captions_per_image.max())
    image_captions = order[starts][:, None].repeat(1, most)
    image_captions[caption_image[order], slot] = order
    caption_valid = torch.arange(most)[None, :] < captions_per_image[:, None]
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
    i2t = _ranks_in_blocks(image_features, text_features, image_captions, caption_valid, logit_scale, chunk_size,
                           image_labels, labels)
    t2i = _ranks_in_blocks(text_features, image_features, caption_image[:, None],
                           torch.ones(num_texts, 1, dtype=torch.bool), logit_scale, chunk_size, labels, image_labels)
    for name, ranks in (("image_to_text", i2t), ("text_to_image", t2i)):
        for k in ks:
            out[f"{name}_R@{k}"] = ranks.hits(k).mean().item()
        if labels is not None:
            if name == "image_to_text":  # per pair: each image weighs as many captions as it has
                out[f"{name}_label_precision@1"] = ((ranks.top1_label * captions_per_image).sum() / num_texts).item()
            else:
                out[f"{name}_label_precision@1"] = ranks.top1_label.mean().item()
        out[f"{name}_ece"] = expected_calibration_error(ranks.confidence, ranks.top1_positive)
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
