r"""``M2MixSigLipLoss``: OpenCLIP's ``SigLipLoss`` plus geodesic mixes as extra sigmoid negatives.

Only ``open_clip.loss`` is imported: ``SigLipLoss`` for its pairwise term (``_loss``) and the
neighbour-exchange functions that carry chunks between processes with their gradients. Which
releases have ``SigLipLoss`` (and its ``dist_impl``) is the adapter's to say
(:mod:`m2mix_openclip.integration.openclip_compat`).
"""

from __future__ import annotations

import math
from typing import Iterator, Optional, Tuple

import torch
import torch.distributed.nn  # noqa: F401  (all_reduce / all_gather with gradients)
from open_clip.loss import SigLipLoss, neighbour_exchange_bidir_with_grad, neighbour_exchange_with_grad

from ..integration import openclip_compat
from ..mixup import compute_dtype, no_autocast, slerp_coefficients
from .mixing import MixingStateMixin
from .options import SIGLIP_UNIMODAL_REASON, MixKeywords, MixOptions, Unpack, siglip_unimodal_error
from .terms import m2mix_sigmoid_term, siglip_with_sigmoid_m2mix

__all__ = ["M2MixSigLipLoss", "SIGLIP_UNIMODAL_REASON", "DIST_IMPLS"]

DIST_IMPLS = ("bidir", "shift", "reduce", "gather")  # the exchanges SigLipLoss names by its dist_impl


class M2MixSigLipLoss(MixingStateMixin, SigLipLoss):
    r"""SigLIP's sigmoid loss plus geodesic multi-modal mixup as extra negatives.

    With image features :math:`x_i`, caption features :math:`y_i` (unit vectors), global batch
    size :math:`G`, :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)` drawn once per optimizer
    step and :math:`m_j = \mathrm{slerp}(x_j, y_j, \lambda)`:

    .. math::
        \mathcal{L} = \underbrace{\frac{1}{G}\sum_{i,j}
                -\log\sigma\big(z_{ij}(t\langle x_i, y_j\rangle + b)\big)}_{\texttt{SigLipLoss}}
          + w\, f(e)\, \frac{1}{2G(G-1)} \sum_i \sum_{j \ne i}
            \Big[-\log\sigma\big(-(s\langle x_i, m_j\rangle + \beta)\big)
                 - \log\sigma\big(-(s\langle y_i, m_j\rangle + \beta)\big)\Big]

    with :math:`z_{ij} = 1` for :math:`i = j`, else :math:`-1`; :math:`t, b` the model's
    learned ``logit_scale`` and ``logit_bias``; :math:`w` = ``m2mix_weight`` and :math:`f(e)`
    the schedule (``1 / (epoch + 1)`` or 1). A pair's own mix lies on the arc between its image
    and caption, so it is no negative of either (``j != i``).

    Scale and bias of the mixed negatives: ``m2mix_temperature=None`` uses the model's
    learned :math:`s = t`, :math:`\beta = b`; a number :math:`\tau` fixes :math:`s = 1/\tau`
    and :math:`\beta` = ``m2mix_bias``, by default :math:`-1/\tau` (SigLIP's initial ratio
    :math:`b = -t`, :math:`t = 10, b = -10`: the logit is :math:`s(\langle a, m\rangle - 1)`,
    at most 0, so each negative's loss lies in :math:`(0, \log 2]`).

    Normalisation: SigLIP divides by the number of anchors, so its value is a sum over
    :math:`G` columns per anchor and grows with the batch unless the learned bias shrinks
    every negative. The m²-Mix term divides by the number of anchor-negative pairs,
    :math:`2G(G-1)`: it is the mean loss of one (anchor, mixed negative) pair, the same size
    at any batch, and each anchor's gradient is an average over its negatives (a convex
    combination, as in the softmax term). Times :math:`G-1` it is SigLIP's normalisation (each
    anchor's sum over its negatives, averaged over the anchors, images and captions alike):
    ``--siglip --loss m2mix`` takes :math:`w = 0.02\,(G-1)` when ``--m2mix-weight`` is left out
    (:func:`~m2mix_openclip.losses.options.siglip_default_weight`), which gives the term the
    share of the gradient that the softmax families' default 0.02 gives theirs; in Python the
    default stays 0.02, a mean over pairs, which is nearly inert beside SigLIP's sum.

    Cost: this process's own block of both terms comes from three (B, B) products, SigLIP's
    :math:`XY^\top` and the Gram matrices :math:`XX^\top`, :math:`YY^\top`, the mixes being
    :math:`m_j = \alpha_j x_j + \beta_j y_j` (:func:`~.terms.siglip_with_sigmoid_m2mix`), and
    four in the backward pass: seven (B, B, D) products where SigLIP alone makes three, and
    where the two terms computed apart (SigLIP's ``_loss`` and the mixes' own products) make nine;
    in exchange, more (B, B) element-wise passes, and SigLIP's block in float32 under autocast.
    Setting ``reuse_products = False`` (on the class or an instance) computes the terms apart,
    with the same values: the cheaper choice where a product costs little beside a pass (a GPU
    with TF32 or bf16 may be one; ``benchmarks/bench_core.py`` measures both).

    Several processes: as ``SigLipLoss``, each process anchors its own :math:`B = G/W` images
    (and captions) and divides by its own :math:`B` (and :math:`2B(G-1)`), so the mean of the
    process values is the value above and DDP's gradient averaging gives its gradient. Each
    process mixes its own pairs; the mixes travel with the caption chunks (one tensor of
    :math:`2B` rows) through the exchange that ``dist_impl`` names (``bidir``, ``shift``,
    ``reduce``, ``gather``), with gradients, so no extra communication round is added.

    The uni-modal V/L/VL-Mix terms are not defined for this loss (see
    ``SIGLIP_UNIMODAL_REASON``): their weights must be 0.

    Args: ``SigLipLoss``'s own (``cache_labels``, ``rank``, ``world_size``, ``dist_impl``: one of
    ``DIST_IMPLS``, default ``"bidir"``, on every release, as the exchange here is this class's
    own), ``m2mix_bias`` (``None``: see above), then ``options``, ``seed``, ``calls_per_step``
    and the mixing options as in ``M2MixLoss``: ``m2mix_weight`` (default 0.02; see above for
    the command line's), ``m2mix_alpha``
    (0.5), ``m2mix_temperature`` (0.07; ``None`` for the model's scale and bias),
    ``mix_schedule`` (and the uni-modal ones, accepted for a common signature, weights 0).
    ``ValueError`` (the same text as every family's, from ``MixOptions``) names a bad option.

    ``forward(image_features, text_features, logit_scale, logit_bias, output_dict=False,
    mix_lambda=None)`` returns ``{"contrastive_loss", "m2mix_loss"}`` with ``output_dict``,
    else their sum. No host sync, nothing raised on data: NaN features give a non-finite loss.

    Example::

        >>> loss = M2MixSigLipLoss(m2mix_weight=1.0, seed=0)
        >>> x = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> y = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> sorted(loss(x, y, torch.tensor(10.0), torch.tensor(-10.0), output_dict=True))
        ['contrastive_loss', 'm2mix_loss']
    """

    reuse_products = True  # this process's block of both terms from SigLIP's products (see "Cost" above)

    def __init__(self, cache_labels: bool = False, rank: int = 0, world_size: int = 1,
                 dist_impl: Optional[str] = None, m2mix_bias: Optional[float] = None, *,
                 options: Optional[MixOptions] = None, seed: int = 0, calls_per_step: int = 1,
                 **mixing: Unpack[MixKeywords]):
        if dist_impl is not None and dist_impl not in DIST_IMPLS:
            raise ValueError(f"unknown dist_impl {dist_impl!r}; choose one of {list(DIST_IMPLS)}")
        if m2mix_bias is not None:
            m2mix_bias = float(m2mix_bias)
            if not math.isfinite(m2mix_bias):
                raise ValueError(f"m2mix_bias must be a finite number, got {m2mix_bias!r}")
        passed = {"dist_impl": dist_impl} if openclip_compat.siglip_loss_takes_dist_impl() else {}
        super().__init__(cache_labels=cache_labels, rank=rank, world_size=world_size, **passed)
        self.dist_impl = dist_impl or "bidir"  # SigLipLoss's own default, where it takes none
        self.m2mix_bias = m2mix_bias
        self._init_mixing(options, mixing, seed, calls_per_step)

    def _check_family_options(self, options: MixOptions) -> None:
        unimodal = siglip_unimodal_error(options, as_flags=False)
        if unimodal:
            raise ValueError(unimodal)
        if self.m2mix_bias is not None and options.m2mix_temperature is None:
            raise ValueError("m2mix_bias fixes the bias of a fixed m2mix_temperature; with "
                             "m2mix_temperature=None the model's logit_bias is used: drop m2mix_bias")

    def _mix_scale_and_bias(self, logit_scale, logit_bias):
        if self.m2mix_temperature is None:
            return logit_scale, logit_bias
        scale = 1.0 / self.m2mix_temperature
        return scale, (-scale if self.m2mix_bias is None else self.m2mix_bias)

    def _chunks_of_other_ranks(self, payload: torch.Tensor) -> Iterator[Tuple[torch.Tensor, float]]:
        """``(chunk, factor)``: every other process's ``payload`` (with gradients), in the order
        that ``SigLipLoss`` visits them for its ``dist_impl``; the caller multiplies what it
        computes from a chunk by ``factor``. ``reduce`` and ``gather`` also yield this process's
        own chunk with factor 0, as ``SigLipLoss`` does: every process must use every
        collective's output, so that every process runs every collective of the backward pass."""
        world, rank = self.world_size, self.rank
        right, left = (rank + 1) % world, (rank - 1 + world) % world
        if self.dist_impl == "bidir":
            to_left = to_right = payload
            rounds, remainder = divmod(world - 1, 2)
            for _ in range(rounds):
                from_right, from_left = neighbour_exchange_bidir_with_grad(left, right, to_left, to_right)
                yield from_right, 1.0
                yield from_left, 1.0
                to_left, to_right = from_right, from_left
            if remainder:
                yield neighbour_exchange_with_grad(left, right, to_right), 1.0
        elif self.dist_impl == "shift":
            to_right = payload
            for _ in range(world - 1):
                to_right = neighbour_exchange_with_grad(left, right, to_right)
                yield to_right, 1.0
        elif self.dist_impl == "reduce":
            for i in range(world):
                chunk = torch.distributed.nn.all_reduce(payload * (rank == i), torch.distributed.ReduceOp.SUM)
                yield chunk, float(i != rank)
        elif self.dist_impl == "gather":
            for i, chunk in enumerate(torch.distributed.nn.all_gather(payload)):
                yield chunk, float(i != rank)
        else:
            raise ValueError(f"unknown dist_impl {self.dist_impl!r}")

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: torch.Tensor,
            output_dict: bool = False,
            mix_lambda: Optional[float] = None,
    ):
        mixing = self.m2mix_weight > 0
        new_step = self._begin_call(image_features, text_features, mix_lambda, needs_negatives=mixing)
        num_rows = image_features.shape[0]
        payload = text_features  # what travels to the other processes: (B, D), or (2B, D) with the mixes
        if mixing:
            normaliser = 2 * num_rows * (num_rows * self.world_size - 1)
            self._check_unit_rows_once(image_features, text_features, agree_across_ranks=self.world_size > 1)
            lam = self._step_lambda("m2mix", self.m2mix_alpha, mix_lambda, new_step)
            scale, bias = self._mix_scale_and_bias(logit_scale, logit_bias)
            dtype = compute_dtype(image_features.dtype)
            with no_autocast(image_features.device):
                # The mixes as alpha_j x_j + beta_j y_j, in float32.
                image, text = image_features.to(dtype), text_features.to(dtype)
                alpha, beta = slerp_coefficients(image, text, lam)  # (B,) each
                if self.world_size > 1 or not self.reuse_products:
                    mixed = alpha[:, None] * image + beta[:, None] * text  # (B, D)
                if self.reuse_products:  # this process's block of both terms from SigLIP's own products
                    contrastive, mix = siglip_with_sigmoid_m2mix(image, text, alpha, beta, logit_scale, logit_bias,
                                                                 scale, bias, normaliser)
            if not self.reuse_products:
                contrastive = self._loss(image_features, text_features, logit_scale, logit_bias)
                mix = m2mix_sigmoid_term(image_features, text_features, mixed, scale, bias, True, normaliser)
            if self.world_size > 1:
                payload_dtype = torch.promote_types(text_features.dtype, mixed.dtype)
                payload = torch.cat([text_features.to(payload_dtype), mixed.to(payload_dtype)])
        else:
            contrastive = self._loss(image_features, text_features, logit_scale, logit_bias)
        if self.world_size > 1:
            for chunk, factor in self._chunks_of_other_ranks(payload):
                text_chunk = chunk[:num_rows].to(text_features.dtype)
                contrastive = contrastive + factor * self._loss(
                    image_features, text_chunk, logit_scale, logit_bias, negative_only=True)
                if mixing:
                    mix = mix + factor * m2mix_sigmoid_term(
                        image_features, text_features, chunk[num_rows:], scale, bias, False, normaliser)

        losses = {"contrastive_loss": contrastive}
        if mixing:
            losses["m2mix_loss"] = self.m2mix_weight * self.schedule_factor * mix
        total = sum(losses.values())
        self._count_nonfinite(total, new_step)
        return losses if output_dict else total
