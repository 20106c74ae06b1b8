"""``M2MixCoCaLoss``: OpenCLIP's ``CoCaLoss`` (contrastive + captioning) plus the m²-Mix terms."""

from __future__ import annotations

from typing import Optional

import torch
from open_clip.loss import CoCaLoss

from .clip import SoftmaxMixingMixin
from .options import MixKeywords, MixOptions, Unpack

__all__ = ["M2MixCoCaLoss"]


class M2MixCoCaLoss(SoftmaxMixingMixin, CoCaLoss):
    r"""CoCa's loss with geodesic multi-modal mixup on its contrastive part.

    .. math::
        \mathcal{L} = w_c\,\mathcal{L}_{CLIP} + w_{cap}\,\mathcal{L}_{caption}
            + \sum_{t \in \{m^2, V, L, VL\}} w_t\, f(e)\, \mathcal{L}_t

    The first two terms are ``CoCaLoss``'s, unchanged (``clip_loss_weight`` :math:`w_c` is
    ``--coca-contrastive-loss-weight``, ``caption_loss_weight`` :math:`w_{cap}` is
    ``--coca-caption-loss-weight``); the mixing terms :math:`\mathcal{L}_t` are those of
    :class:`~m2mix_openclip.losses.clip.M2MixLoss` on the image and caption embeddings (the
    contrastive latents), with their own weights :math:`w_t` (not multiplied by :math:`w_c`)
    and the schedule :math:`f(e)`.

    Args: ``CoCaLoss``'s own (``caption_loss_weight``, ``clip_loss_weight``, ``pad_id``,
    ``local_loss``, ``gather_with_grad``, ``cache_labels``, ``rank``, ``world_size``,
    ``use_horovod``), then those of ``M2MixLoss`` after its ``use_horovod``: ``options``,
    ``seed``, ``calls_per_step`` and the mixing options (``m2mix_weight``, ...).

    With several processes the features are gathered once per call, as ``CoCaLoss`` alone gathers
    them: its contrastive logits (:meth:`get_logits`) and the mixing terms share that batch.

    ``forward`` takes a CoCa model's outputs and returns ``{"contrastive_loss", "caption_loss",
    "m2mix_loss", ...}`` (one key per enabled mixing term) with ``output_dict=True``, else the
    tuple of those values in that order. No host sync; non-finite features give a non-finite
    loss, as in ``CoCaLoss``.
    """

    def __init__(self, caption_loss_weight: float, clip_loss_weight: float, pad_id: int = 0,
                 local_loss: bool = False, gather_with_grad: bool = False, cache_labels: bool = False,
                 rank: int = 0, world_size: int = 1, use_horovod: bool = False, *,
                 options: Optional[MixOptions] = None, seed: int = 0, calls_per_step: int = 1,
                 **mixing: Unpack[MixKeywords]):
        # CoCaLoss's own, past SoftmaxMixingMixin's __init__ (which takes ClipLoss's arguments)
        CoCaLoss.__init__(self, caption_loss_weight=caption_loss_weight, clip_loss_weight=clip_loss_weight,
                          pad_id=pad_id, local_loss=local_loss, gather_with_grad=gather_with_grad,
                          cache_labels=cache_labels, rank=rank, world_size=world_size, use_horovod=use_horovod)
        self._init_mixing(options, mixing, seed, calls_per_step)

    def forward(self, image_features: torch.Tensor, text_features: torch.Tensor, logits: torch.Tensor,
                labels: torch.Tensor, logit_scale: torch.Tensor, output_dict: bool = False,
                mix_lambda: Optional[float] = None):
        new_step = self._begin_call(image_features, text_features, mix_lambda)
        with self._one_gather(image_features, text_features):  # CoCaLoss's contrastive part and ours share it
            losses = CoCaLoss.forward(self, image_features, text_features, logits, labels, logit_scale,
                                      output_dict=True)
            if self.enabled_terms:
                losses.update(self._mixing_terms(self._held_rows(), logit_scale, new_step, mix_lambda))
        self._count_nonfinite(sum(losses.values()), new_step)
        return losses if output_dict else tuple(losses.values())
