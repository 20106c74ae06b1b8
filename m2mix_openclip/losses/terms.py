r"""The terms of the m²-Mix loss family, as pure functions: tensors in, a scalar out.

Each function is one formula (written in its docstring); the loss classes hold the state
(weights, lambda generator, epoch) and the wiring (gathering across processes, which rows a
rank owns). Nothing here synchronises with the device or raises on data: non-finite inputs
give a non-finite result, as in OpenCLIP's own losses.

Notation: ``R`` rows (anchors) held by this process, ``G`` columns (the global batch), ``D``
the embedding dimension; ``x`` images, ``y`` captions, unit vectors.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F

from ..mixup import compute_dtype, no_autocast

__all__ = [
    "soft_cross_entropy",
    "cross_entropy_with_positive",
    "clip_logits",
    "clip_contrastive_term",
    "m2mix_softmax_term",
    "m2mix_sigmoid_term",
    "siglip_with_sigmoid_m2mix",
    "mix_target_rows",
    "unimodal_mix_term",
    "pair_partners",
]

Scale = Union[float, torch.Tensor]


def soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    r"""Mean over rows of :math:`-\sum_j t_{ij} \log \mathrm{softmax}(l_i)_j`.

    ``targets`` rows are weights over the columns; they sum to 1 (2 for VL-Mix, whose two
    positives each count fully, as in the reference implementation).
    """
    return -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()


class _CrossEntropyWithPositive(torch.autograd.Function):
    """Mean over rows of cross-entropy, where ``logits[i, target[i]]`` is replaced by ``positive[i]``.

    Equal to ``F.cross_entropy(logits.scatter(1, target[:, None], positive[:, None]), target)``,
    with fewer (M, G) buffers and passes: the softmax is kept from the forward pass, and the
    gradient is made from it in one pass, with no scatter copy or one-hot buffer.
    """

    @staticmethod
    def forward(ctx, logits, positive, target):
        rows = torch.arange(logits.shape[0], device=logits.device)
        dtype = compute_dtype(logits.dtype)
        work = logits.detach().to(dtype, copy=True)  # (M, G)
        pos = positive.detach().to(dtype)
        work[rows, target] = pos
        lse = torch.logsumexp(work, dim=1)  # (M,)
        loss = (lse - pos).mean()
        work.sub_(lse[:, None]).exp_()  # softmax, in place
        ctx.save_for_backward(work, target)
        ctx.dtypes = (logits.dtype, positive.dtype)
        return loss.to(logits.dtype)

    @staticmethod
    def backward(ctx, grad_loss):
        softmax, target = ctx.saved_tensors
        rows = torch.arange(softmax.shape[0], device=softmax.device)
        scale = grad_loss.to(softmax.dtype) / softmax.shape[0]
        grad = softmax * scale  # d loss / d logits = softmax / M (the saved softmax stays intact)
        grad_positive = grad[rows, target] - scale  # (softmax - 1) / M at the replaced entries
        grad[rows, target] = 0.0  # the replaced logits do not reach the loss
        return grad.to(ctx.dtypes[0]), grad_positive.to(ctx.dtypes[1]), None


def cross_entropy_with_positive(logits: torch.Tensor, positive: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""Mean over rows ``i`` of :math:`\log\big(e^{p_i} + \sum_{j \ne t_i} e^{l_{ij}}\big) - p_i`.

    Cross-entropy against column ``target[i]`` whose logit is ``positive[i]`` instead of
    ``logits[i, target[i]]``. Args: logits (M, G), positive (M,), target (M,) column indices.
    """
    return _CrossEntropyWithPositive.apply(logits, positive, target)


def clip_logits(image_rows: torch.Tensor, text_rows: torch.Tensor, all_image: torch.Tensor, all_text: torch.Tensor,
                logit_scale: Scale, logit_bias: Optional[torch.Tensor] = None,
                rows_are_global: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""OpenCLIP's ``ClipLoss`` logits from a gathered batch: :math:`s\,X_r Y^\top + b` and
    :math:`s\,Y_r X^\top + b`, (R, G) each.

    Where the rows are the whole global batch (``rows_are_global``) one (G, G) product serves
    both directions, the second being the first's transpose, as ``ClipLoss`` does across
    processes without ``local_loss``; else the R anchors of this process against the G columns.
    """
    if rows_are_global:
        logits_per_image = logit_scale * all_image @ all_text.T  # (G, G)
        logits_per_text = logits_per_image.T
    else:
        logits_per_image = logit_scale * image_rows @ all_text.T  # (R, G)
        logits_per_text = logit_scale * text_rows @ all_image.T  # (R, G)
    if logit_bias is not None:  # out of place: the two may share storage
        logits_per_image = logits_per_image + logit_bias
        logits_per_text = logits_per_text + logit_bias
    return logits_per_image, logits_per_text


def clip_contrastive_term(image_rows: torch.Tensor, text_rows: torch.Tensor,
                          all_image: torch.Tensor, all_text: torch.Tensor,
                          logit_scale: Scale, labels: torch.Tensor,
                          logit_bias: Optional[torch.Tensor] = None, rows_are_global: bool = True) -> torch.Tensor:
    r"""OpenCLIP's ``ClipLoss`` value:
    :math:`\tfrac12\big[\mathrm{CE}(s\,X_r Y^\top + b, \ell) + \mathrm{CE}(s\,Y_r X^\top + b, \ell)\big]`,
    on the logits of :func:`clip_logits`. In one process ``ClipLoss`` computes ``y @ x.T``
    separately, which differs only by float rounding.
    """
    logits_per_image, logits_per_text = clip_logits(image_rows, text_rows, all_image, all_text, logit_scale,
                                                    logit_bias, rows_are_global)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def m2mix_softmax_term(image_rows: torch.Tensor, text_rows: torch.Tensor, mixed: torch.Tensor,
                       scale: Scale, labels: torch.Tensor) -> torch.Tensor:
    r"""The m²-Mix term: geodesic mixes of the other pairs as hard negatives.

    With :math:`m_j = \mathrm{slerp}(x_j, y_j, \lambda)` and :math:`s = 1/\tau`,

    .. math::
        \mathcal{L} = \frac{1}{2R}\sum_{i} \Big[
            -\log\frac{e^{s\langle x_i, y_i\rangle}}
                      {e^{s\langle x_i, y_i\rangle} + \sum_{j\ne i} e^{s\langle x_i, m_j\rangle}}
            -\log\frac{e^{s\langle y_i, x_i\rangle}}
                      {e^{s\langle y_i, x_i\rangle} + \sum_{j\ne i} e^{s\langle y_i, m_j\rangle}}
        \Big]

    (the reference implementation sums the two directions; the mean here matches ``ClipLoss``).
    Computed in float32 (float64 for float64 inputs) with autocast off, so that the positive
    :math:`\langle x_i, y_i\rangle` and the negatives :math:`\langle x_i, m_j\rangle` have the
    same precision: under bf16 autocast a bf16 matmul for the negatives beside a float32
    positive would bias the term.

    Args:
        image_rows, text_rows: (R, D) anchors owned by this process.
        mixed: (G, D) the mixes of the global batch.
        scale: 1 / temperature, a float or a scalar tensor (the model's ``logit_scale``).
        labels: (R,) the column of each anchor's own pair in the global batch.
    """
    dtype = compute_dtype(image_rows.dtype)
    with no_autocast(image_rows.device):
        if isinstance(scale, torch.Tensor):
            scale = scale.to(dtype)
        # Both directions in one (2R, G) product: rows 0..R-1 anchored on images, R..2R-1 on
        # texts. Scaling the (2R, D) anchors rather than the logits saves a pass over R x G.
        anchors = scale * torch.cat([image_rows, text_rows]).to(dtype)  # (2R, D)
        own = image_rows.shape[0]
        positive = (anchors[:own] * text_rows.to(dtype)).sum(dim=1)  # (R,): s <x_i, y_i>
        logits = anchors @ mixed.to(dtype).T  # (2R, G)
        return cross_entropy_with_positive(logits, positive.repeat(2), labels.repeat(2))


def m2mix_sigmoid_term(image_rows: torch.Tensor, text_rows: torch.Tensor, mixed: torch.Tensor,
                       scale: Scale, bias: Scale, exclude_own: bool, normaliser: float) -> torch.Tensor:
    r"""The sigmoid m²-Mix term: geodesic mixes as extra negatives of SigLIP's pairwise loss.

    With :math:`m_j = \mathrm{slerp}(x_j, y_j, \lambda)` (``mixed``), scale :math:`s` and bias
    :math:`b`, every anchor (image :math:`x_i` and caption :math:`y_i`) meets every mix as a
    negative of the binary sigmoid loss, :math:`-\log\sigma(-z) = \mathrm{softplus}(z)`:

    .. math::
        \mathcal{L} = \frac{1}{n} \sum_{i} \sum_{j \in J(i)}
            \Big[ -\log\sigma\big(-(s\langle x_i, m_j\rangle + b)\big)
                   -\log\sigma\big(-(s\langle y_i, m_j\rangle + b)\big) \Big]

    where :math:`J(i)` is every column, except column ``i`` when ``exclude_own`` (the mixes are
    this process's own pairs, row i's own pair being column i: a pair's own mix is no
    negative). The caller picks :math:`n` (``normaliser``); ``M2MixSigLipLoss`` uses
    :math:`2B(G-1)`, the number of anchor-negative pairs of its ``B`` image and ``B`` caption
    anchors in a global batch of ``G``, so the term is a mean and does not grow with the batch.
    Computed in float32 (float64 for float64 inputs) with autocast off, as ``m2mix_softmax_term``.

    Args:
        image_rows, text_rows: (R, D) anchors.
        mixed: (C, D) mixes (C = R when ``exclude_own``).
        scale, bias: floats or scalar tensors (the model's ``logit_scale``, ``logit_bias``).
    """
    dtype = compute_dtype(image_rows.dtype)
    with no_autocast(image_rows.device):
        if isinstance(scale, torch.Tensor):
            scale = scale.to(dtype)
        if isinstance(bias, torch.Tensor):
            bias = bias.to(dtype)
        anchors = scale * torch.cat([image_rows, text_rows]).to(dtype)  # (2R, D), scaled once
        mixed = mixed.to(dtype)
        total = _SoftplusOfLogitsSum.apply(anchors, mixed, bias)
        if exclude_own:  # the own pair's mix is not a negative: take its 2R logits back out
            own = (anchors * mixed.repeat(2, 1)).sum(dim=1)  # (2R,): s <x_i, m_i>, s <y_i, m_i>
            total = total - F.softplus(own + bias).sum()
        return total / normaliser


def siglip_with_sigmoid_m2mix(image: torch.Tensor, text: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor,
                              scale: Scale, bias: Scale, mix_scale: Scale, mix_bias: Scale,
                              mix_normaliser: float) -> Tuple[torch.Tensor, torch.Tensor]:
    r"""SigLIP's value on one process's own block and the sigmoid m²-Mix term on it, from three
    products instead of five.

    With :math:`S = XY^\top`, :math:`P = XX^\top`, :math:`Q = YY^\top` and the mixes written as
    :math:`m_j = \alpha_j x_j + \beta_j y_j` (:func:`~m2mix_openclip.mixup.slerp_coefficients`),
    :math:`\langle x_i, m_j\rangle = \alpha_j P_{ij} + \beta_j S_{ij}` and
    :math:`\langle y_i, m_j\rangle = \alpha_j S_{ji} + \beta_j Q_{ij}`. Returns

    .. math::
        \Big(\tfrac{1}{B}\big[\textstyle\sum_{ij}\mathrm{softplus}(tS_{ij} + b) - \sum_i (tS_{ii} + b)\big],\;
        \tfrac{1}{n}\sum_i\sum_{j\ne i}\big[\mathrm{softplus}(s\langle x_i, m_j\rangle + \beta)
            + \mathrm{softplus}(s\langle y_i, m_j\rangle + \beta)\big]\Big)

    the first equal to ``SigLipLoss._loss`` (:math:`-\log\sigma(z_{ij} l_{ij})`, summed, over
    :math:`B`; :math:`\mathrm{softplus}(-l) = \mathrm{softplus}(l) - l` on the diagonal), the
    second to :func:`m2mix_sigmoid_term` with ``exclude_own`` (:math:`n` = ``mix_normaliser``).
    The backward pass groups every (B, B) gradient by the matrix it multiplies: four products
    (SigLIP alone needs two), against six for the two losses computed apart; the gradients that
    reach :math:`\alpha, \beta` are (B,) reductions. Computed in float32 (float64 for float64)
    with autocast off, as the other mixing terms.

    Args:
        image, text: (B, D) unit rows, this process's pairs.
        alpha, beta: (B,) slerp coefficients of the pairs' mixes (gradients flow to them).
        scale, bias: SigLIP's learned ``logit_scale`` and ``logit_bias``.
        mix_scale, mix_bias: those of the mixed negatives (floats, or the same tensors).
        mix_normaliser: :math:`n`, e.g. ``2B(G-1)``.
    """
    dtype = compute_dtype(image.dtype)
    with no_autocast(image.device):
        def cast(value):
            return value.to(dtype) if isinstance(value, torch.Tensor) else float(value)

        return _SiglipWithSigmoidMix.apply(image.to(dtype), text.to(dtype), alpha.to(dtype), beta.to(dtype),
                                           cast(scale), cast(bias), cast(mix_scale), cast(mix_bias),
                                           float(mix_normaliser))


class _SiglipWithSigmoidMix(torch.autograd.Function):
    """See :func:`siglip_with_sigmoid_m2mix`. The forward pass keeps three (B, B) matrices for
    the backward pass, the derivatives by SigLIP's logits Z, the x-anchored mix logits A and the
    transposed y-anchored ones C^T (so that every (B, B) pass reads rows, never columns);
    everything that reaches the (B,) and scalar inputs is reduced in the forward pass."""

    @staticmethod
    def forward(ctx, image, text, alpha, beta, scale, bias, mix_scale, mix_bias, mix_normaliser):
        num = image.shape[0]
        products = image @ text.T  # S (B, B)
        image_gram = image @ image.T  # P
        text_gram = text @ text.T  # Q (symmetric)
        s_alpha, s_beta = alpha * mix_scale, beta * mix_scale  # (B,)
        ctx.tensor_scalars = tuple(isinstance(v, torch.Tensor) for v in (scale, bias, mix_scale, mix_bias))
        if not isinstance(mix_bias, torch.Tensor):  # a fill on the device, not a copy from the host
            mix_bias = image.new_full((), mix_bias)

        # A_ij = s <x_i, m_j> + beta_m = s (alpha_j P_ij + beta_j S_ij) + beta_m; own mix (j = i) excluded
        mix_image = torch.addcmul(mix_bias, image_gram, s_alpha[None, :]).addcmul_(products, s_beta[None, :])
        mix_image.diagonal().fill_(-math.inf)
        # C^T_ji = s <y_i, m_j> + beta_m = s (alpha_j S_ji + beta_j Q_ji) + beta_m
        mix_text_t = torch.addcmul(mix_bias, text_gram, s_beta[:, None]).addcmul_(products, s_alpha[:, None])
        mix_text_t.diagonal().fill_(-math.inf)
        mix_value = (F.softplus(mix_image).sum() + F.softplus(mix_text_t).sum()) / mix_normaliser
        grad_a = mix_image.sigmoid_()  # n dL_mix/dA (0 on the diagonal); 1/n is applied in backward
        grad_ct = mix_text_t.sigmoid_()  # n dL_mix/dC^T
        # n dL_mix/dalpha_j / s = sum_i dA_ij P_ij + dC_ij S_ji; beta alike: reductions over the anchors
        d_alpha = image_gram.mul_(grad_a).sum(dim=0) + (grad_ct * products).sum(dim=1)
        d_beta = (grad_a * products).sum(dim=0) + text_gram.mul_(grad_ct).sum(dim=1)
        del image_gram, text_gram

        logits = products * scale
        logits.add_(bias)  # Z = t S + b
        siglip_value = (F.softplus(logits).sum() - logits.diagonal().sum()) / num
        grad_z = logits.sigmoid_()  # B dL_siglip/dZ = sigmoid(Z) - I; 1/B is applied in backward
        grad_z.diagonal().sub_(1.0)
        d_scale = torch.dot(grad_z.reshape(-1), products.reshape(-1)) / num  # dL_siglip/dt
        del products

        ctx.save_for_backward(image, text, alpha, beta, grad_z, grad_a, grad_ct, d_alpha, d_beta, d_scale)
        ctx.constants = (num, mix_normaliser, scale, mix_scale)
        return siglip_value, mix_value

    @staticmethod
    def backward(ctx, grad_siglip, grad_mix):
        image, text, alpha, beta, grad_z, grad_a, grad_ct, d_alpha, d_beta, d_scale = ctx.saved_tensors
        num, mix_normaliser, scale, mix_scale = ctx.constants
        mix_factor = grad_mix / mix_normaliser  # the (B, B) derivatives were kept without 1/n
        grad_image = grad_text = None
        if ctx.needs_input_grad[0] or ctx.needs_input_grad[1]:
            s_alpha, s_beta = alpha * (mix_scale * mix_factor), beta * (mix_scale * mix_factor)
            # dL/dS = t dL/dZ + s (dL/dA diag(beta) + diag(alpha) dL/dC^T)
            grad_products = torch.addcmul(grad_z * ((grad_siglip / num) * scale), grad_a, s_beta[None, :])
            grad_products.addcmul_(grad_ct, s_alpha[:, None])
            grad_image = grad_products @ text  # (B, D)
            grad_text = grad_products.T @ image
            del grad_products
            # dL/dP = s dL/dA diag(alpha); P = X X^T is symmetric: dL/dX += (G + G^T) X
            gram_grad = grad_a * s_alpha[None, :]
            grad_image.addmm_(gram_grad.add_(gram_grad.T.contiguous()), image)
            gram_grad = grad_ct * s_beta[:, None]  # dL/dQ^T = diag(beta) dL/dC^T, Q symmetric
            grad_text.addmm_(gram_grad.add_(gram_grad.T.contiguous()), text)
            del gram_grad
        grad_alpha = d_alpha * (mix_scale * mix_factor) if ctx.needs_input_grad[2] else None
        grad_beta = d_beta * (mix_scale * mix_factor) if ctx.needs_input_grad[3] else None
        scale_t, bias_t, mix_scale_t, mix_bias_t = ctx.tensor_scalars
        grad_scale = grad_siglip * d_scale if scale_t else None
        grad_bias = grad_siglip * grad_z.sum() / num if bias_t else None
        grad_mix_scale = mix_factor * (alpha * d_alpha + beta * d_beta).sum() if mix_scale_t else None
        grad_mix_bias = mix_factor * (grad_a.sum() + grad_ct.sum()) if mix_bias_t else None
        return (grad_image, grad_text, grad_alpha, grad_beta, grad_scale, grad_bias, grad_mix_scale, grad_mix_bias,
                None)


class _SoftplusOfLogitsSum(torch.autograd.Function):
    """``softplus(anchors @ mixed.T + bias).sum()`` with one (M, C) buffer: the forward pass
    turns the logits into ``sigmoid(logits)`` in place, which is the gradient of the sum with
    respect to them; the backward pass makes the two products from it."""

    @staticmethod
    def forward(ctx, anchors, mixed, bias):
        work = anchors @ mixed.T  # (M, C)
        work.add_(bias)
        total = F.softplus(work).sum()  # torch's softplus goes linear above 20: off by < 2e-9 there
        work.sigmoid_()
        ctx.save_for_backward(anchors, mixed, work)
        ctx.bias_shape = bias.shape if isinstance(bias, torch.Tensor) else None
        return total

    @staticmethod
    def backward(ctx, grad_total):
        anchors, mixed, sig = ctx.saved_tensors  # d softplus(z) / dz = sigmoid(z), (M, C)
        # The scalar grad_total scales the (M, D) and (C, D) products, not the (M, C) matrix.
        grad_anchors = (sig @ mixed) * grad_total if ctx.needs_input_grad[0] else None
        grad_mixed = (sig.T @ anchors) * grad_total if ctx.needs_input_grad[1] else None
        grad_bias = None if ctx.bias_shape is None else (sig.sum() * grad_total).reshape(ctx.bias_shape)
        return grad_anchors, grad_mixed, grad_bias


def pair_partners(num: int, kind: str, generator: torch.Generator) -> torch.Tensor:
    """(num,) partner of each sample for the uni-modal mixes; always an involution.

    ``"reverse"``: i with num-1-i (the reference). ``"random"``: a uniformly random perfect
    matching drawn from ``generator`` (every sample paired with a partner that is paired back;
    with an odd ``num`` one sample is its own partner and its mix is itself). Being an
    involution, each mixed image i and mixed caption pair(i) hold the same two samples, which
    is what makes VL-Mix's two positives well-defined.
    """
    if kind == "reverse":
        return torch.arange(num - 1, -1, -1)
    if kind != "random":
        raise ValueError(f"unknown pairing {kind!r}; choose 'reverse' or 'random'")
    order = torch.randperm(num, generator=generator)
    half = num // 2
    first, second = order[:half], order[half:2 * half]
    pair = torch.arange(num)  # a leftover sample (odd num) stays its own partner
    pair[first] = second
    pair[second] = first
    return pair


def mix_target_rows(pair: torch.Tensor, start: int, count: int, lam: float, dtype, device):
    r"""Rows ``start .. start+count-1`` of the soft targets of mixed samples against plain ones,
    :math:`P = \lambda I + (1-\lambda)\Pi` with :math:`\Pi_{i,\mathrm{pair}(i)} = 1`, and of :math:`P^\top`.

    Row i of :math:`P` says what the mix :math:`\mathrm{slerp}(u_i, u_{\mathrm{pair}(i)}, \lambda)`
    holds (the targets of a mixed anchor against plain columns); row j of :math:`P^\top` says
    which mixes hold plain sample j: itself with :math:`\lambda`, and the mix i with
    :math:`\mathrm{pair}(i) = j`, i.e. :math:`i = \mathrm{pair}^{-1}(j)`, with :math:`1-\lambda`
    (the targets of a plain anchor against mixed columns). Correct for any permutation; the two
    agree for an involution. Only (count, G) buffers, never (G, G).

    Args:
        pair: (G,) partner of each global sample, a permutation, on the CPU.
    Returns:
        (P_rows, PT_rows), each (count, G) on ``device``.
    """
    num = pair.shape[0]
    inverse = torch.empty_like(pair)
    inverse[pair] = torch.arange(num)
    # Only the (count,) partners travel to the device (a small copy, no sync); the rows are built there.
    own = torch.arange(start, start + count)
    own_d = own.to(device, non_blocking=True)
    index = torch.arange(count, device=device)

    def rows(partner):
        out = torch.zeros(count, num, dtype=dtype, device=device)
        out[index, own_d] = lam
        # accumulate: a sample paired with itself gets lam + (1 - lam)
        out.index_put_((index, partner[own].to(device, non_blocking=True)),
                       torch.full((count,), 1 - lam, dtype=dtype, device=device), accumulate=True)
        return out

    return rows(pair), rows(inverse)


def unimodal_mix_term(image_anchor: torch.Tensor, text_anchor: torch.Tensor,
                      image_cols: torch.Tensor, text_cols: torch.Tensor,
                      targets_image_rows: torch.Tensor, targets_text_rows: torch.Tensor,
                      scale: Scale) -> torch.Tensor:
    r"""V-Mix, L-Mix or VL-Mix: the CLIP loss with soft targets,
    :math:`\tfrac12\big[\mathrm{CE}_{soft}(s\,X_a T^\top, P_x) + \mathrm{CE}_{soft}(s\,T_a X^\top, P_t)\big]`,
    where some of the images and/or captions are mixes within their modality.

    Args:
        image_anchor, text_anchor: (R, D) this process's anchors (mixed where the term mixes them).
        image_cols, text_cols: (G, D) the global batch (mixed likewise).
        targets_image_rows, targets_text_rows: (R, G) soft targets of the two directions.
        scale: 1 / temperature.
    """
    logits_i = scale * image_anchor @ text_cols.T  # (R, G)
    logits_t = scale * text_anchor @ image_cols.T  # (R, G)
    return (soft_cross_entropy(logits_i, targets_image_rows) + soft_cross_entropy(logits_t, targets_text_rows)) / 2
