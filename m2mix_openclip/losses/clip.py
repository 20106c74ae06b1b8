"""``M2MixLoss``: OpenCLIP's ``ClipLoss`` plus geodesic multi-modal mixup, a drop-in for it.

Only ``open_clip.loss`` (the model-side library, not the trainer) is imported here:
``ClipLoss`` for its conventions (labels, label caching) and ``gather_features`` for
multi-process batches. The formulas are in :mod:`.terms`, the per-step state in :mod:`.mixing`.
"""

from __future__ import annotations

import contextlib
from typing import Dict, NamedTuple, Optional

import torch
from open_clip.loss import ClipLoss, gather_features

from ..mixup import compute_dtype, mix_unit_rows
from .mixing import MixingStateMixin
from .options import MixKeywords, MixOptions, Unpack
from .terms import clip_contrastive_term, clip_logits, m2mix_softmax_term, mix_target_rows, unimodal_mix_term

__all__ = ["M2MixLoss", "SoftmaxMixingMixin", "BatchRows"]


class BatchRows(NamedTuple):
    """What one process sees of the global batch: ``R`` anchor rows, ``G`` columns."""

    image_rows: torch.Tensor  # (R, D)
    text_rows: torch.Tensor  # (R, D)
    all_image: torch.Tensor  # (G, D)
    all_text: torch.Tensor  # (G, D)
    labels: torch.Tensor  # (R,) column of each anchor's own pair
    start: int  # first global row of this process's anchors
    local_rows: bool  # anchors are this process's rows only (local_loss with several processes)


class SoftmaxMixingMixin(MixingStateMixin):
    """The mixing terms of the softmax families (CLIP, CoCa, distillation): their weights and
    temperatures, the batch rows a process owns, and the m²-Mix / V-Mix / L-Mix / VL-Mix terms
    on those rows. Put it before an OpenCLIP ``ClipLoss`` subclass in the bases (it uses that
    class's ``local_loss``, ``gather_with_grad``, ``rank``, ``world_size`` and
    ``get_ground_truth``); see :class:`M2MixLoss` for the terms and arguments."""

    def __init__(self, local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 options: Optional[MixOptions] = None, seed: int = 0, calls_per_step: int = 1,
                 **mixing: Unpack[MixKeywords]):
        """``ClipLoss``'s arguments, then the mixing options (see ``M2MixLoss``)."""
        super().__init__(local_loss=local_loss, gather_with_grad=gather_with_grad, cache_labels=cache_labels,
                         rank=rank, world_size=world_size, use_horovod=use_horovod)
        self._init_mixing(options, mixing, seed, calls_per_step)

    def _batch_rows(self, image_features: torch.Tensor, text_features: torch.Tensor) -> BatchRows:
        """The global batch (gathered as ``ClipLoss`` gathers it) and the rows this process anchors."""
        if self.world_size > 1:
            all_image, all_text = gather_features(
                image_features, text_features,
                local_loss=self.local_loss, gather_with_grad=self.gather_with_grad,
                rank=self.rank, world_size=self.world_size, use_horovod=self.use_horovod,
            )
        else:
            all_image, all_text = image_features, text_features
        # Anchors are the rows of the logit matrices: local rows with local_loss, else global.
        local_rows = self.world_size > 1 and self.local_loss
        image_rows, text_rows = (image_features, text_features) if local_rows else (all_image, all_text)
        num_rows = image_rows.shape[0]
        return BatchRows(
            image_rows=image_rows, text_rows=text_rows, all_image=all_image, all_text=all_text,
            labels=self.get_ground_truth(image_features.device, num_rows),  # (R,) global column of each pair
            start=self.rank * num_rows if local_rows else 0,  # this rank's rows of a (G, G) matrix
            local_rows=local_rows,
        )

    # -- one gather per step -----------------------------------------------------------------------
    _held = None  # [image_features, text_features, their BatchRows once gathered] during a forward call

    @contextlib.contextmanager
    def _one_gather(self, image_features: torch.Tensor, text_features: torch.Tensor):
        """While OpenCLIP's own ``forward`` runs inside: its :meth:`get_logits` for these features
        and the mixing terms (:meth:`_held_rows`) share one gather of the global batch, made at
        the first of them that needs it. Nothing is held after the call."""
        self._held = [image_features, text_features, None]
        try:
            yield
        finally:
            self._held = None

    def _held_rows(self) -> BatchRows:
        held = self._held
        if held[2] is None:
            held[2] = self._batch_rows(held[0], held[1])
        return held[2]

    def get_logits(self, image_features, text_features, logit_scale, logit_bias=None):
        """``ClipLoss.get_logits``; for the features of the current call (in :meth:`_one_gather`),
        from the batch gathered once for the call, so that OpenCLIP's contrastive (and
        distillation) terms and the mixing terms make one all-gather between them. Other
        features (a distillation teacher's) go to OpenCLIP's own."""
        held = self._held
        if self.world_size == 1 or held is None or held[0] is not image_features or held[1] is not text_features:
            passed = {} if logit_bias is None else {"logit_bias": logit_bias}
            return super().get_logits(image_features, text_features, logit_scale, **passed)
        rows = self._held_rows()
        return clip_logits(rows.image_rows, rows.text_rows, rows.all_image, rows.all_text, logit_scale, logit_bias,
                           rows_are_global=not rows.local_rows)

    def _mixing_terms(self, rows: BatchRows, logit_scale, new_step: bool,
                      mix_lambda: Optional[float]) -> Dict[str, torch.Tensor]:
        """``{"<term>_loss": weight * schedule * term}`` for every enabled mixing term."""
        losses = {}
        if not self.enabled_terms:
            return losses
        image_rows, text_rows, all_image, all_text = rows.image_rows, rows.text_rows, rows.all_image, rows.all_text
        device, num_rows, num_global = all_image.device, image_rows.shape[0], all_image.shape[0]
        self._check_unit_rows_once(all_image, all_text)
        factor = self.schedule_factor

        if self.m2mix_weight > 0:
            lam = self._step_lambda("m2mix", self.m2mix_alpha, mix_lambda, new_step)
            # (G, D) hard negatives, kept in float32 for the term (see m2mix_softmax_term)
            mixed = mix_unit_rows(all_image, all_text, lam, out_dtype=compute_dtype(all_image.dtype))
            scale = logit_scale if self.m2mix_temperature is None else 1.0 / self.m2mix_temperature
            losses["m2mix_loss"] = self.m2mix_weight * factor * m2mix_softmax_term(
                image_rows, text_rows, mixed, scale, rows.labels)

        uni_scale = logit_scale if self.unimix_temperature is None else 1.0 / self.unimix_temperature
        for name, mix_image, mix_text in (("vmix", True, False), ("lmix", False, True), ("vlmix", True, True)):
            weight = getattr(self, f"{name}_weight")
            if weight <= 0:
                continue
            lam = self._step_lambda(name, self.unimix_alpha, mix_lambda, new_step)
            pair = self._step_pairing(name, num_global, new_step)  # (G,) on the CPU, an involution
            pair_d = pair.to(device, non_blocking=True)
            own_partners = pair_d[rows.start:rows.start + num_rows]
            # Columns mix the global batch; rows mix this rank's anchors (which carry the gradient
            # with local_loss) with their partners from the global batch.
            image_cols = mix_unit_rows(all_image, all_image[pair_d], lam) if mix_image else all_image
            text_cols = mix_unit_rows(all_text, all_text[pair_d], lam) if mix_text else all_text
            if rows.local_rows:
                image_anchor = mix_unit_rows(image_rows, all_image[own_partners], lam) if mix_image else image_rows
                text_anchor = mix_unit_rows(text_rows, all_text[own_partners], lam) if mix_text else text_rows
            else:
                image_anchor, text_anchor = image_cols, text_cols
            if name == "vlmix":  # i and pair(i) are both positives, each counting fully, as the reference
                mixed_rows, _ = mix_target_rows(pair, rows.start, num_rows, 0.5, all_image.dtype, device)
                targets_image, targets_text = 2 * mixed_rows, 2 * mixed_rows
            else:
                mixed_rows, plain_rows = mix_target_rows(pair, rows.start, num_rows, lam, all_image.dtype, device)
                # V-Mix: mixed images against plain captions (and back); L-Mix: the other way round.
                targets_image, targets_text = (mixed_rows, plain_rows) if mix_image else (plain_rows, mixed_rows)
            losses[f"{name}_loss"] = weight * factor * unimodal_mix_term(
                image_anchor, text_anchor, image_cols, text_cols, targets_image, targets_text, uni_scale)
        return losses


class M2MixLoss(SoftmaxMixingMixin, ClipLoss):
    r"""CLIP's contrastive loss plus geodesic multi-modal mixup (m²-Mix) and its uni-modal variants.

    From Oh et al., "Geodesic Multi-Modal Mixup for Robust Fine-Tuning", NeurIPS 2023
    (arXiv 2203.03897). With image features :math:`x_i` and caption features :math:`y_i`
    (unit vectors), the m²-Mix term mixes each image with its own caption on the sphere,
    :math:`m_j = \mathrm{slerp}(x_j, y_j, \lambda)`, :math:`\lambda \sim \mathrm{Beta}(\alpha, \alpha)`,
    and uses the mixed vectors as hard negatives:

    - image-anchored logits: :math:`\langle x_i, y_i\rangle` on the diagonal, :math:`\langle x_i, m_j\rangle` off it;
    - text-anchored logits: :math:`\langle y_i, x_i\rangle` on the diagonal, :math:`\langle y_i, m_j\rangle` off it;

    both divided by ``m2mix_temperature``, cross-entropy against the diagonal, the two
    directions averaged as in ``ClipLoss``. The reference implementation sums the two
    directions, so its ``mmmix = w`` is ``m2mix_weight = 2 w`` here.

    Uni-modal variants (logits scaled by ``1 / unimix_temperature``, by default the model's
    learned ``logit_scale``; sample i paired with sample N-1-i of the global batch, or with a
    random perfect matching):

    - V-Mix: mixed images ``slerp(x_i, x_pair(i))`` against texts, soft targets lam on i, 1-lam on pair(i);
    - L-Mix: images against mixed texts, soft targets lam on i, 1-lam on the mix that holds i;
    - VL-Mix: mixed images against mixed texts (one lam), i and pair(i) both positives.

    Every mixing term is multiplied by its weight and by the schedule: ``1 / (epoch + 1)``
    for ``"inverse-epoch"`` (set the epoch with :meth:`set_epoch`, counted from 0) or 1
    for ``"constant"``.

    Lambda (and the random pairing) come from a ``torch.Generator`` owned by the loss and
    seeded by ``seed``, so every rank draws the same values at the same step: one draw per
    optimizer step, reused by the ``calls_per_step`` calls that OpenCLIP makes per step with
    ``--accum-freq``. The generator is part of ``state_dict()`` (as ``_extra_state``), for
    resuming.

    The training step makes no device-to-host transfer and never raises on data: NaN or Inf
    features give a non-finite loss and gradients, as in ``ClipLoss`` (a GradScaler then
    skips the step), and every rank reaches every collective. Such steps are counted on the
    device and reported by :meth:`logged_scalars` at the trainer's logging steps.

    Args:
        local_loss, gather_with_grad, cache_labels, rank, world_size, use_horovod: ``ClipLoss``'s,
            in its order.
        options: a :class:`~m2mix_openclip.losses.options.MixOptions`; the mixing keywords below
            replace its fields (without it, they replace the defaults).
        seed: seed of the lambda generator (the same on every rank). Default 0.
        calls_per_step: calls of ``forward`` per optimizer step (OpenCLIP's ``--accum-freq``). Default 1.
        m2mix_weight: weight of the m²-Mix term (0 turns it off). Default 0.02.
        m2mix_alpha: Beta parameter for the m²-Mix lambda. Default 0.5.
        m2mix_temperature: temperature of the m²-Mix logits; ``None`` uses the model's
            learned ``logit_scale``. Default 0.07 (the reference's tau2).
        vmix_weight, lmix_weight, vlmix_weight: weights of the uni-modal terms (default 0, off).
        unimix_alpha: Beta parameter for the uni-modal lambdas. Default 0.5.
        unimix_temperature: temperature of the uni-modal logits; ``None`` (default) uses the
            model's ``logit_scale``; the reference fixes 0.01.
        mix_pairing: ``"reverse"`` (i with N-1-i, the reference) or ``"random"``.
        mix_schedule: ``"inverse-epoch"`` or ``"constant"``.

    Attributes:
        options: the ``MixOptions`` in use; each of its fields also reads (and, checked again,
            sets) as an attribute of the loss, e.g. ``loss.m2mix_weight``.
        enabled_terms: the mixing terms with a weight > 0, e.g. ``["m2mix"]``.
        last_lambdas: the lambda each enabled term used in the last call.
        last_pairings: the (G,) partners each uni-modal term used in the last call (CPU).

    Raises:
        ValueError: at construction, for an option that ``MixOptions`` refuses (an alpha <= 0, a
            negative or non-finite weight, a temperature <= 0, an unknown schedule or pairing)
            or a ``calls_per_step`` < 1; in ``forward``, for fewer than 2 pairs in the (global)
            batch, mismatched shapes or a ``mix_lambda`` outside [0, 1] (all known without
            reading the device), and, at the first call only, for features that are not unit
            vectors.
        TypeError: at construction, for a keyword that is no option.

    Example::

        >>> loss = M2MixLoss(m2mix_weight=0.02, seed=0)
        >>> x = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> y = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> terms = loss(x, y, logit_scale=torch.tensor(100.0), output_dict=True)
        >>> sorted(terms)
        ['contrastive_loss', 'm2mix_loss']
        >>> from m2mix_openclip.losses.options import MixOptions
        >>> M2MixLoss(options=MixOptions(vmix_weight=0.1), seed=0).enabled_terms
        ['m2mix', 'vmix']
    """

    def forward(
            self,
            image_features: torch.Tensor,
            text_features: torch.Tensor,
            logit_scale: torch.Tensor,
            logit_bias: Optional[torch.Tensor] = None,
            output_dict: bool = False,
            mix_lambda: Optional[float] = None,
            **kwargs,
    ):
        if kwargs:
            raise TypeError(
                f"M2MixLoss.forward got unexpected arguments {sorted(kwargs)}; it takes the outputs of a "
                "CLIP model (use M2MixCoCaLoss for CoCa and M2MixDistillLoss for distillation)"
            )
        new_step = self._begin_call(image_features, text_features, mix_lambda)
        rows = self._batch_rows(image_features, text_features)
        losses = {"contrastive_loss": clip_contrastive_term(
            rows.image_rows, rows.text_rows, rows.all_image, rows.all_text, logit_scale, rows.labels, logit_bias,
            rows_are_global=not rows.local_rows)}
        losses.update(self._mixing_terms(rows, logit_scale, new_step, mix_lambda))
        total = sum(losses.values())
        self._count_nonfinite(total, new_step)
        if output_dict:
            return losses
        return total
