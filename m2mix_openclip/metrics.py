"""The maths of evaluation, floor 0: pure tensor functions, no model, no files.

(Layers: see :mod:`m2mix_openclip.datasets`; retrieval ranks are in :mod:`m2mix_openclip.retrieval`.)

Embedding geometry of paired image and text features: alignment and uniformity follow Wang and
Isola (ICML 2020); the modality gap follows Liang et al. (NeurIPS 2022). Everything is computed in
row chunks: memory is O(chunk * N), never an N x N x D tensor nor a full N x N matrix.

Calibration (:func:`expected_calibration_error`, the ``*_ece`` figures of every tool and of the
zero-shot hook): the top-1 confidence against "the top-1 prediction is right", in 15 equal-width
bins. Bins are closed on the right, (lo, hi], the first one [0, 1/15], as in the textbook
definition (Guo et al. 2017): every confidence lies in exactly one of the 15 bins, 1.0 in the last.
torchmetrics (``MulticlassCalibrationError``, ``calibration_error``; binning rewritten in 2023,
PR #1648; checked against 1.9.0) differs in two ways: its bins are closed on the left, [lo, hi), and a
confidence of exactly 1.0 (a saturated softmax, common in float32) falls into a 16th bin of its own
(torchmetrics issue #3510). Where no confidence is exactly 1.0 or on an inner edge, the two agree
to float32 rounding. Otherwise the split top bin can only raise torchmetrics' figure, by
``2 min(s1 (1 - a1), s2 (a2 - c2))`` (s1, a1: share and accuracy of the confidences at 1.0; s2, a2,
c2: share, accuracy and mean confidence of the rest of [14/15, 1), counted only when a2 > c2),
always below 1/8: one wrong answer at 1.0 and one right at 0.95 give 0.475 here, 0.525 there; one
wrong at 1.0 and 15 right at 0.934 give 0.0006 here, 0.124 there. To reproduce a torchmetrics
figure exactly, use torchmetrics.

Zero-shot scores (:func:`zero_shot_scores`): top-1 and top-5 accuracy (top-5 from 5 classes on),
and the ECE of the softmax confidence at the model's ``logit_scale``. A set whose classes are a
part of the class list (ImageNet-R, -A, ObjectNet against ImageNet's 1000) is scored over its own
classes (:func:`restrict_to_class_groups`, WiSE-FT's projection of the logits): top-1, top-5 and
the softmax are over those classes only.

Ties (:func:`hit_probability`), the one rule of every top-K figure here and in
:mod:`m2mix_openclip.retrieval`: candidates that score exactly the same are put in a uniformly random
order, and a score is the expected value of the hit over that order, not the hit of one arbitrary
order. A tie is never credited to the query: a label tied with one other class counts 1/2 at top-1.
Without ties this is the plain top-K hit, the same as CLIP_benchmark's ``topk``-based figures; with
ties, CLIP_benchmark's figures follow ``torch.topk``'s order of the tied candidates, and the mean of
its figure over every order of the candidates equals ours (``tests/test_clip_benchmark.py``).
"""

from __future__ import annotations

import math
from typing import Dict

import torch
import torch.nn.functional as F

__all__ = ["embedding_geometry", "alignment", "uniformity", "expected_calibration_error", "hit_probability",
           "zero_shot_scores", "restrict_to_class_groups"]

# Elements of one (chunk, N) block: 8 M floats = 32 MB, a few such buffers live at once.
_BLOCK_ELEMENTS = 8 * 1024 * 1024


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    r"""Wang and Isola's alignment: :math:`\mathbb{E}_i \lVert x_i - y_i \rVert^\alpha`."""
    return (x - y).norm(dim=1).pow(alpha).mean()


def _rows_per_block(n_cols: int, block_elements: int) -> int:
    return max(1, block_elements // max(1, n_cols))


def _exponent(rows: torch.Tensor, cols: torch.Tensor, sq_rows: torch.Tensor, sq_cols: torch.Tensor,
              t: float) -> torch.Tensor:
    """(c, M) block of -t ||r_i - c_j||^2 = 2t <r_i, c_j> - t|r_i|^2 - t|c_j|^2, in two passes."""
    block = torch.addmm((-t * sq_cols)[None, :], rows, cols.T, alpha=2 * t)
    return block.sub_((t * sq_rows)[:, None])


def _pair_logsumexp(u: torch.Tensor, t: float, block_elements: int) -> torch.Tensor:
    r"""log sum over pairs i < j of exp(-t ||u_i - u_j||^2), in upper-triangle row chunks."""
    n = u.shape[0]
    sq_norm = (u * u).sum(dim=1)
    parts = []
    rows = _rows_per_block(n, block_elements)
    for start in range(0, n - 1, rows):
        stop = min(start + rows, n)
        c = stop - start
        # (c, n - start): rows [start, stop) against every point from `start` on
        e = _exponent(u[start:stop], u[start:], sq_norm[start:stop], sq_norm[start:], t)
        # Only the leading (c, c) block holds pairs j <= i, to mask; the rest are all j > i.
        square = e[:, :c].masked_fill(~torch.ones(c, c, dtype=torch.bool, device=u.device).triu(1), -math.inf)
        parts.append(torch.logsumexp(square.flatten(), dim=0))
        if stop < n:
            parts.append(torch.logsumexp(torch.logsumexp(e[:, c:], dim=1), dim=0))
    return torch.logsumexp(torch.stack(parts).double(), dim=0)


def uniformity(u: torch.Tensor, t: float = 2.0, block_elements: int = _BLOCK_ELEMENTS) -> torch.Tensor:
    r"""Wang and Isola's uniformity: :math:`\log \mathbb{E}_{i<j} e^{-t \lVert u_i - u_j \rVert^2}`.

    The same value as ``torch.pdist(u).pow(2).mul(-t).exp().mean().log()``, computed in
    chunks with a stable log-sum-exp, so N = 25,000 fits in tens of MB.
    """
    n = u.shape[0]
    if n < 2:
        raise ValueError(f"uniformity needs at least 2 points, got {n}")
    return _pair_logsumexp(u.float(), t, block_elements) - math.log(n * (n - 1) / 2)


@torch.no_grad()
def embedding_geometry(
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        normalize: bool = True,
        t: float = 2.0,
        block_elements: int = _BLOCK_ELEMENTS,
) -> Dict[str, float]:
    r"""Alignment, uniformity and modality-gap figures of N paired embeddings.

    With :math:`x_i` the image and :math:`y_i` the text embedding of pair i (unit vectors):

    - ``alignment``: :math:`\frac1N\sum_i \lVert x_i - y_i\rVert^2` (lower is better aligned);
    - ``uniformity_image``, ``uniformity_text``: :math:`\log \frac{2}{N(N-1)}\sum_{i<j} e^{-t\lVert u_i - u_j\rVert^2}`
      within one modality (t = 2; lower is more uniform);
    - ``uniformity_joint``: the same over the 2N points of both modalities together;
    - ``relative_alignment``:
      :math:`\frac1N\sum_i \big(\lVert y_i - x_i\rVert^2 - \min_{j\ne i}\lVert y_i - x_j\rVert^2\big)`
      (negative when each caption is nearer its own image than any other);
    - ``modality_gap``: :math:`\lVert \bar x - \bar y \rVert` (Liang et al. 2022);
    - ``positive_cosine``: mean :math:`\langle x_i, y_i\rangle`; ``negative_cosine``: mean over
      :math:`i \ne j` of :math:`\langle x_i, y_j\rangle`.

    Args:
        image_features, text_features: (N, D) tensors, row i of each forming pair i.
        normalize: L2-normalise rows first (the metrics are defined on the sphere).
        t: the uniformity temperature (Wang and Isola use 2).
        block_elements: the largest (rows x N) block computed at once; bounds memory.

    Returns:
        A dict of Python floats with the keys above.

    Raises:
        ValueError: shapes differ or are not 2-D, N < 2, or values are not finite.
    """
    x, y = image_features, text_features
    if x.dim() != 2 or x.shape != y.shape:
        raise ValueError(
            f"embedding_geometry: image and text features must be (N, D) of the same shape, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"embedding_geometry needs at least 2 pairs, got {n}")
    x, y = x.float(), y.float()
    if not bool(torch.isfinite(x).all() & torch.isfinite(y).all()):
        raise ValueError("embedding_geometry: features contain NaN or Inf")
    if normalize:
        x, y = F.normalize(x, dim=1), F.normalize(y, dim=1)

    lse_image = _pair_logsumexp(x, t, block_elements)
    lse_text = _pair_logsumexp(y, t, block_elements)

    # Cross-modal blocks: every (y_i, x_j) pair once, for the joint uniformity and the
    # relative alignment.
    sq_x, sq_y = (x * x).sum(dim=1), (y * y).sum(dim=1)
    cross_parts, relative_sum = [], 0.0
    rows = _rows_per_block(n, block_elements)
    for start in range(0, n, rows):
        stop = min(start + rows, n)
        e = _exponent(y[start:stop], x, sq_y[start:stop], sq_x, t)  # (c, N): -t ||y_i - x_j||^2
        cross_parts.append(torch.logsumexp(torch.logsumexp(e, dim=1), dim=0))
        local = torch.arange(stop - start, device=x.device)
        positive = e[local, start + local].clone()
        e[local, start + local] = -math.inf
        # ||y_i - x_i||^2 - min_{j != i} ||y_i - x_j||^2, from the exponents
        relative_sum += ((e.max(dim=1).values - positive) / t).double().sum().item()
    lse_cross = torch.logsumexp(torch.stack(cross_parts).double(), dim=0)
    lse_joint = torch.logsumexp(torch.stack([lse_image, lse_text, lse_cross]), dim=0)
    log_pairs = math.log(n * (n - 1) / 2)

    sum_x, sum_y = x.double().sum(dim=0), y.double().sum(dim=0)
    positive_sum = (x.double() * y.double()).sum()
    return {
        "alignment": alignment(x, y).item(),
        "uniformity_image": (lse_image - log_pairs).item(),
        "uniformity_text": (lse_text - log_pairs).item(),
        "uniformity_joint": (lse_joint - math.log(n * (2 * n - 1))).item(),
        "relative_alignment": relative_sum / n,
        "modality_gap": ((sum_x - sum_y) / n).norm().item(),
        "positive_cosine": (positive_sum / n).item(),
        "negative_cosine": ((sum_x @ sum_y - positive_sum) / (n * (n - 1))).item(),
    }


def expected_calibration_error(confidence: torch.Tensor, correct: torch.Tensor, bins: int = 15) -> float:
    r"""ECE: :math:`\sum_b \frac{|B_b|}{N} \, |\mathrm{acc}(B_b) - \mathrm{conf}(B_b)|
    = \frac1N \sum_b |\sum_{i \in B_b} (\mathrm{correct}_i - \mathrm{confidence}_i)|`
    over ``bins`` equal-width bins B_b = (b/bins, (b+1)/bins], the first one closed, [0, 1/bins]
    (see the module docstring for how torchmetrics bins differently).

    Args:
        confidence: (N,) floats in [0, 1]; correct: (N,) bools, 0/1, or the probability of being
            right (a top-1 tied between candidates, :func:`hit_probability`).
    Returns:
        The ECE as a Python float; 0.0 for N = 0; NaN when a confidence is NaN (a diverged
        model's evaluation reports it rather than stopping the run).
    Raises:
        ValueError: a confidence outside [0, 1], shapes that differ, or ``bins`` < 1.
    """
    if not isinstance(bins, int) or bins < 1:
        raise ValueError(f"bins must be a whole number >= 1, got {bins!r}")
    confidence, correct = confidence.detach().double().flatten().cpu(), correct.detach().double().flatten().cpu()
    if confidence.shape != correct.shape:
        raise ValueError(f"confidence has {confidence.numel()} values, correct {correct.numel()}")
    if confidence.numel() == 0:
        return 0.0
    if bool(confidence.isnan().any()):
        return float("nan")
    if bool((confidence < 0).any() | (confidence > 1).any()):
        low, high = float(confidence.min()), float(confidence.max())
        raise ValueError(f"confidences must lie in [0, 1]; got {low:.6g}..{high:.6g}")
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.float64)
    # bucketize (right=False) gives b with edges[b-1] < x <= edges[b]: bin b-1 = (lo, hi]; 0 joins the first bin
    index = (torch.bucketize(confidence, edges) - 1).clamp_(min=0)
    gap = torch.zeros(bins, dtype=torch.float64).index_add_(0, index, correct - confidence)
    return (gap.abs().sum() / confidence.numel()).item()


def hit_probability(above: torch.Tensor, tied_positives: torch.Tensor, tied_negatives: torch.Tensor,
                    k: int) -> torch.Tensor:
    r"""The chance that a positive ranks within the top ``k`` when tied candidates are put in a
    uniformly random order.

    A query's candidates in score order: ``above`` candidates score strictly more than its best
    positive (all negatives), then a tie group of ``tied_positives`` positives (m >= 1) and
    ``tied_negatives`` negatives (n) scoring exactly that. With r = k - above places left, a hit
    is certain when r > n, impossible when r <= 0, and else
    :math:`1 - \binom{n}{r} / \binom{n + m}{r} = 1 - \prod_{i<r} \frac{n - i}{n + m - i}`
    (the first r of the group all negatives). Without ties (m = 1, n = 0) this is ``above < k``.

    Args:
        above, tied_positives, tied_negatives: (Q,) integer counts per query.
    Returns:
        (Q,) float64 probabilities.
    """
    above, m, n = (torch.as_tensor(t).to(torch.float64) for t in (above, tied_positives, tied_negatives))
    places = k - above
    miss = torch.ones_like(above)
    for i in range(k):  # k is small (1, 5, 10): one (Q,) product per place
        factor = (n - i).clamp(min=0) / (n + m - i).clamp(min=1)
        miss = torch.where(places > i, miss * factor, miss)
    return torch.where(places > 0, 1.0 - miss, torch.zeros_like(miss))


def zero_shot_scores(similarity: torch.Tensor, labels: torch.Tensor, logit_scale: float,
                     bins: int = 15) -> Dict[str, float]:
    """Zero-shot scores of an (N, C) image-class similarity matrix against (N,) labels:
    ``top1``, ``top5`` (where there are at least 5 classes) and ``ece`` (the
    :func:`expected_calibration_error` of the top-1 softmax confidence at ``logit_scale``, against
    the chance that the top-1 class is the label).

    A class scoring exactly as the label shares the places with it at random
    (:func:`hit_probability`): the label tied with one other class at the top counts 1/2 at top-1."""
    similarity = similarity.float()
    labels = torch.as_tensor(labels, dtype=torch.long, device=similarity.device)
    label_score = similarity.gather(1, labels[:, None])  # (N, 1)
    above = (similarity > label_score).sum(1)
    tied = (similarity == label_score).sum(1) - 1  # other classes scoring exactly as the label
    one = torch.ones_like(above)
    top1 = hit_probability(above, one, tied, 1)
    scores = {"top1": top1.mean().item()}
    if similarity.shape[1] >= 5:
        scores["top5"] = hit_probability(above, one, tied, 5).mean().item()
    confidence = (logit_scale * similarity).softmax(dim=1).max(dim=1).values
    scores["ece"] = expected_calibration_error(confidence, top1, bins)
    return scores


def restrict_to_class_groups(similarity: torch.Tensor, class_groups) -> torch.Tensor:
    r"""(N, G) scores of a set with its own classes: column g is
    :math:`\max_{c \in \mathrm{class\_groups}[g]} s_{:, c}` of the (N, C) similarity to the whole class
    list. With one class a group this keeps the set's columns (the mask of ImageNet-R and -A in
    WiSE-FT's evaluation); with several (ObjectNet's classes, each one or more ImageNet classes)
    it takes the best of them, as WiSE-FT does.

    Raises:
        ValueError: an empty group, or a class index outside ``0..C - 1``.
    """
    groups = [tuple(g) for g in class_groups]
    if not groups or any(len(g) == 0 for g in groups):
        raise ValueError("every class group needs at least one class")
    num_classes = similarity.shape[1]
    if any(c < 0 or c >= num_classes for g in groups for c in g):
        raise ValueError(f"class groups name classes outside 0..{num_classes - 1}")
    width = max(len(g) for g in groups)
    # (G, width) indices, short groups padded with their own first class (max is unchanged)
    index = torch.tensor([list(g) + [g[0]] * (width - len(g)) for g in groups], device=similarity.device)
    return similarity[:, index].amax(dim=2)
