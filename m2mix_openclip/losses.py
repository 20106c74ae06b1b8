"""The m²-Mix loss family as a drop-in for OpenCLIP's ``ClipLoss``.

Only ``open_clip.loss`` (the model-side library, not the trainer) is imported here:
``ClipLoss`` for its conventions (labels, label caching) and ``gather_features`` for
multi-process batches.
"""

from __future__ import annotations

import math
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss, gather_features

from .mixup import UNIT_NORM_TOLERANCE, mix_unit_rows, sample_beta

__all__ = ["M2MixLoss", "MIX_SCHEDULES", "MIX_PAIRINGS"]

MIX_SCHEDULES = ("inverse-epoch", "constant")
MIX_PAIRINGS = ("reverse", "random")


def _soft_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # targets rows are weights over columns; they sum to 1 (2 for VL-Mix, as the reference)
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
        dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
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


def _check_weight(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return value


def _check_alpha(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0 (the Beta(a, a) parameter), got {value!r}")
    return value


class M2MixLoss(ClipLoss):
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

    Uni-modal variants (logits scaled by the model's ``logit_scale``; sample i paired
    with sample N-1-i of the global batch, or a random permutation):

    - V-Mix: mixed images ``slerp(x_i, x_pair(i))`` against texts, soft targets lam on i, 1-lam on pair(i);
    - L-Mix: images against mixed texts, the same targets;
    - VL-Mix: mixed images against mixed texts (one lam), i and pair(i) both positives.

    Every mixing term is multiplied by its weight and by the schedule: ``1 / (epoch + 1)``
    for ``"inverse-epoch"`` (set the epoch with :meth:`set_epoch`, counted from 0) or 1
    for ``"constant"``.

    Lambda (and the random pairing) come from a ``torch.Generator`` owned by the loss and
    seeded by ``seed``, so every rank draws the same values at the same step. Its state is
    part of ``state_dict()`` (as ``_extra_state``), for resuming.

    Attributes:
        m2mix_weight: weight of the m²-Mix term (0 turns it off). Default 0.02.
        m2mix_alpha: Beta parameter for the m²-Mix lambda. Default 0.5.
        m2mix_temperature: temperature of the m²-Mix logits; ``None`` uses the model's
            learned ``logit_scale``. Default 0.07.
        vmix_weight, lmix_weight, vlmix_weight: weights of the uni-modal terms (default 0, off).
        unimix_alpha: Beta parameter for the uni-modal lambdas. Default 0.5.
        mix_pairing: ``"reverse"`` (i with N-1-i, the reference) or ``"random"``.
        mix_schedule: ``"inverse-epoch"`` or ``"constant"``.
        last_lambdas: the lambda each enabled term used in the last call.

    Raises:
        ValueError: at construction, for an alpha <= 0, a negative weight, a temperature
            <= 0, an unknown schedule or pairing; in ``forward``, for fewer than 2 pairs
            in the (global) batch, mismatched shapes or non-finite features.

    Example::

        >>> loss = M2MixLoss(m2mix_weight=0.02, seed=0)
        >>> x = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> y = torch.nn.functional.normalize(torch.randn(8, 16), dim=1)
        >>> terms = loss(x, y, logit_scale=torch.tensor(100.0), output_dict=True)
        >>> sorted(terms)
        ['contrastive_loss', 'm2mix_loss']
    """

    TERMS = ("m2mix", "vmix", "lmix", "vlmix")

    def __init__(
            self,
            local_loss: bool = False,
            gather_with_grad: bool = False,
            cache_labels: bool = False,
            rank: int = 0,
            world_size: int = 1,
            use_horovod: bool = False,
            m2mix_weight: float = 0.02,
            m2mix_alpha: float = 0.5,
            m2mix_temperature: Optional[float] = 0.07,
            vmix_weight: float = 0.0,
            lmix_weight: float = 0.0,
            vlmix_weight: float = 0.0,
            unimix_alpha: float = 0.5,
            mix_pairing: str = "reverse",
            mix_schedule: str = "inverse-epoch",
            seed: int = 0,
    ):
        super().__init__(
            local_loss=local_loss,
            gather_with_grad=gather_with_grad,
            cache_labels=cache_labels,
            rank=rank,
            world_size=world_size,
            use_horovod=use_horovod,
        )
        self.m2mix_weight = _check_weight("m2mix_weight", m2mix_weight)
        self.vmix_weight = _check_weight("vmix_weight", vmix_weight)
        self.lmix_weight = _check_weight("lmix_weight", lmix_weight)
        self.vlmix_weight = _check_weight("vlmix_weight", vlmix_weight)
        self.m2mix_alpha = _check_alpha("m2mix_alpha", m2mix_alpha)
        self.unimix_alpha = _check_alpha("unimix_alpha", unimix_alpha)
        if m2mix_temperature is not None:
            m2mix_temperature = float(m2mix_temperature)
            if not math.isfinite(m2mix_temperature) or m2mix_temperature <= 0:
                raise ValueError(
                    f"m2mix_temperature must be > 0 (or None for the model's logit_scale), "
                    f"got {m2mix_temperature!r}"
                )
        self.m2mix_temperature = m2mix_temperature
        if mix_schedule not in MIX_SCHEDULES:
            raise ValueError(f"unknown mix_schedule {mix_schedule!r}; choose one of {list(MIX_SCHEDULES)}")
        self.mix_schedule = mix_schedule
        if mix_pairing not in MIX_PAIRINGS:
            raise ValueError(f"unknown mix_pairing {mix_pairing!r}; choose one of {list(MIX_PAIRINGS)}")
        self.mix_pairing = mix_pairing
        self.seed = int(seed)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.epoch = 0
        self.last_lambdas: Dict[str, float] = {}

    # -- state -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (counted from 0) that the ``inverse-epoch`` schedule uses."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)

    @property
    def schedule_factor(self) -> float:
        return 1.0 / (self.epoch + 1) if self.mix_schedule == "inverse-epoch" else 1.0

    @property
    def enabled_terms(self):
        return [t for t in self.TERMS if getattr(self, f"{t}_weight") > 0]

    def get_extra_state(self):
        return {"generator_state": self.generator.get_state(), "epoch": self.epoch, "seed": self.seed}

    def set_extra_state(self, state):
        self.generator.set_state(state["generator_state"])
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])

    # -- helpers ---------------------------------------------------------------
    def _draw_lambda(self, alpha: float, pinned: Optional[float]) -> float:
        return float(pinned) if pinned is not None else sample_beta(alpha, alpha, self.generator)

    def _pairing(self, n: int, device) -> torch.Tensor:
        if self.mix_pairing == "reverse":
            return torch.arange(n - 1, -1, -1, device=device)
        return torch.randperm(n, generator=self.generator).to(device)

    @staticmethod
    def _pair_targets(pair: torch.Tensor, lam: float, dtype, device) -> torch.Tensor:
        """(G, G) soft targets: lam on i, 1 - lam on pair(i) (summed where they coincide)."""
        n = pair.shape[0]
        eye = torch.eye(n, dtype=dtype, device=device)
        return lam * eye + (1 - lam) * eye[pair]

    def _check_inputs(self, image_features: torch.Tensor, text_features: torch.Tensor) -> None:
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features and text_features must both be (batch, dim) with the same shape, "
                f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        if image_features.shape[0] * self.world_size < 2:
            raise ValueError(
                "M2MixLoss needs at least 2 image-text pairs in the (global) batch to form negatives, "
                f"got {image_features.shape[0] * self.world_size}; increase --batch-size"
            )
        if not self.enabled_terms:
            return
        # One device sync for both checks (the mixing below relies on them).
        nonfinite, nonunit = torch.stack([
            ~(torch.isfinite(image_features).all() & torch.isfinite(text_features).all()),
            ((image_features.detach().float().norm(dim=1) - 1).abs() > UNIT_NORM_TOLERANCE).any()
            | ((text_features.detach().float().norm(dim=1) - 1).abs() > UNIT_NORM_TOLERANCE).any(),
        ]).tolist()
        if nonfinite:
            raise ValueError(
                "image_features or text_features contain NaN or Inf; the model diverged or its "
                "input is broken (try a lower learning rate or --precision fp32)"
            )
        if nonunit:
            raise ValueError(
                "geodesic mixing needs unit-norm features (a CLIP model's outputs are); "
                "normalise them first, e.g. torch.nn.functional.normalize(x, dim=-1)"
            )

    # -- forward ---------------------------------------------------------------
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
                f"M2MixLoss.forward got unexpected arguments {sorted(kwargs)}; it takes the "
                "outputs of a CLIP model (distillation and CoCa outputs are not supported)"
            )
        if mix_lambda is not None and not (0.0 <= float(mix_lambda) <= 1.0):
            raise ValueError(f"mix_lambda must lie in [0, 1], got {mix_lambda!r}")
        self._check_inputs(image_features, text_features)
        device = image_features.device

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

        # Contrastive term: ClipLoss's value. Where every rank holds the global rows (one process,
        # or several without local_loss) one product serves both directions, as ClipLoss itself
        # does across processes; in one process ClipLoss computes y @ x.T separately, which
        # differs only by float rounding and costs a third of ClipLoss's time.
        if local_rows:
            logits_per_image = logit_scale * image_rows @ all_text.T
            logits_per_text = logit_scale * text_rows @ all_image.T
        else:
            logits_per_image = logit_scale * all_image @ all_text.T
            logits_per_text = logits_per_image.T
        if logit_bias is not None:
            logits_per_image = logits_per_image + logit_bias
            logits_per_text = logits_per_text + logit_bias
        labels = self.get_ground_truth(device, logits_per_image.shape[0])  # (R,) global column index
        losses = {
            "contrastive_loss": (
                F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)
            ) / 2
        }

        factor = self.schedule_factor
        self.last_lambdas = {}
        rows = slice(int(labels[0]), int(labels[0]) + labels.shape[0])  # this rank's rows of a (G, G) matrix
        num_global = all_image.shape[0]

        if self.m2mix_weight > 0:
            lam = self._draw_lambda(self.m2mix_alpha, mix_lambda)
            self.last_lambdas["m2mix"] = lam
            mixed = mix_unit_rows(all_image, all_text, lam)  # (G, D) hard negatives
            scale = logit_scale if self.m2mix_temperature is None else 1.0 / self.m2mix_temperature
            own = labels.shape[0]
            # Both directions in one (2R, G) product: rows 0..R-1 anchored on images, R..2R-1 on
            # texts. Scaling the (2R, D) anchors rather than the logits saves a pass over B x B.
            anchors = scale * torch.cat([image_rows, text_rows])  # (2R, D)
            positive = (anchors[:own] * text_rows).sum(dim=1)  # (R,): <x_i, y_i> / tau
            logits = anchors @ mixed.T  # (2R, G)
            # <x_i, y_i> replaces <x_i, m_i> (and <y_i, m_i>) on this rank's diagonal; the mean
            # over 2R rows is the average of the two directions, as in ClipLoss.
            term = _CrossEntropyWithPositive.apply(logits, positive.repeat(2), labels.repeat(2))
            losses["m2mix_loss"] = self.m2mix_weight * factor * term

        for name, mix_image, mix_text in (("vmix", True, False), ("lmix", False, True), ("vlmix", True, True)):
            weight = getattr(self, f"{name}_weight")
            if weight <= 0:
                continue
            lam = self._draw_lambda(self.unimix_alpha, mix_lambda)
            self.last_lambdas[name] = lam
            pair = self._pairing(num_global, device)  # (G,) partner of each global sample
            # Columns mix the global batch; rows mix this rank's anchors (which carry the
            # gradient with local_loss) with their partners from the global batch.
            image_cols = mix_unit_rows(all_image, all_image[pair], lam) if mix_image else all_image
            text_cols = mix_unit_rows(all_text, all_text[pair], lam) if mix_text else all_text
            if local_rows:
                image_anchor = mix_unit_rows(image_rows, all_image[pair[rows]], lam) if mix_image else image_rows
                text_anchor = mix_unit_rows(text_rows, all_text[pair[rows]], lam) if mix_text else text_rows
            else:
                image_anchor, text_anchor = image_cols, text_cols
            if name == "vlmix":  # both i and pair(i) are positives, as the reference
                targets = self._pair_targets(pair, 0.5, all_image.dtype, device) * 2
            else:
                targets = self._pair_targets(pair, lam, all_image.dtype, device)
            logits_i = logit_scale * image_anchor @ text_cols.T  # (R, G)
            logits_t = logit_scale * text_anchor @ image_cols.T  # (R, G)
            term = (_soft_cross_entropy(logits_i, targets[rows])
                    + _soft_cross_entropy(logits_t, targets.T[rows])) / 2
            losses[f"{name}_loss"] = weight * factor * term

        if output_dict:
            return losses
        return sum(losses.values())
