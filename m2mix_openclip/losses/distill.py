"""``M2MixDistillLoss``: OpenCLIP's ``DistillClipLoss`` plus the m²-Mix terms on the student."""

from __future__ import annotations

from typing import Optional

import torch
from open_clip.loss import DistillClipLoss

from .clip import SoftmaxMixingMixin

__all__ = ["M2MixDistillLoss"]


class M2MixDistillLoss(SoftmaxMixingMixin, DistillClipLoss):
    r"""Distillation from a teacher CLIP with geodesic multi-modal mixup on the student.

    .. math::
        \mathcal{L} = \mathcal{L}_{CLIP}(x, y) + \mathcal{L}_{distill}(x, y; x^T, y^T)
            + \sum_{t \in \{m^2, V, L, VL\}} w_t\, f(e)\, \mathcal{L}_t(x, y)

    The first two terms are ``DistillClipLoss``'s, unchanged: the student's contrastive loss
    and the cross-entropy of the student's logits against the teacher's softmax. The mixing
    terms :math:`\mathcal{L}_t` are those of :class:`~m2mix_openclip.losses.clip.M2MixLoss`,
    on the student's features :math:`x, y` only (the teacher runs without gradient).

    Args: those of ``M2MixLoss``: ``DistillClipLoss``'s own (``ClipLoss``'s), then ``options``,
    ``seed``, ``calls_per_step`` and the mixing options.

    With several processes the student's features are gathered once per call, as
    ``DistillClipLoss`` alone gathers them (its logits, :meth:`get_logits`, and the mixing terms
    share that batch); the teacher's are gathered by ``DistillClipLoss``, as with ``--loss clip``.

    ``forward`` returns ``{"contrastive_loss", "distill_loss", "m2mix_loss", ...}`` with
    ``output_dict=True``, else the tuple of those values in that order.
    """

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor,
                dist_image_features: torch.Tensor, dist_text_features: torch.Tensor,
                dist_logit_scale: torch.Tensor, output_dict: bool = False, mix_lambda: Optional[float] = None):
        new_step = self._begin_call(image_features, text_features, mix_lambda)
        with self._one_gather(image_features, text_features):  # the student's: DistillClipLoss's and ours
            losses = DistillClipLoss.forward(self, image_features, text_features, logit_scale, dist_image_features,
                                             dist_text_features, dist_logit_scale, output_dict=True)
            if self.enabled_terms:
                losses.update(self._mixing_terms(self._held_rows(), logit_scale, new_step, mix_lambda))
        self._count_nonfinite(sum(losses.values()), new_step)
        return losses if output_dict else tuple(losses.values())
