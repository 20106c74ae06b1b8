"""State shared by every loss of the m²-Mix family: the lambda generator, the epoch schedule,
one draw per optimizer step, the count of non-finite steps, and what the trainer logs.

The maths lives in :mod:`.terms`; this module holds what changes from step to step. Nothing
here synchronises with the device inside ``forward``: lambdas and pairings come from a CPU
``torch.Generator``, the non-finite count stays on the device until :meth:`logged_scalars`
(called by the trainer at its logging steps only) reads it.
"""

from __future__ import annotations

from dataclasses import fields, replace
from typing import Dict, List, Optional

import torch

from ..mixup import UNIT_NORM_TOLERANCE, sample_beta
from .options import MIX_PAIRINGS, MIX_SCHEDULES, MixOptions, mix_options, signature_with_options
from .terms import pair_partners

__all__ = ["MixingStateMixin", "MIX_SCHEDULES", "MIX_PAIRINGS"]


def _option_attribute(name: str) -> property:
    """``loss.<name>``: the option of ``loss.options``; setting it replaces ``loss.options`` by a
    copy checked as at construction."""

    def get(self):
        return getattr(self.options, name)

    def set_(self, value):
        options = replace(self.options, **{name: value})
        self._check_family_options(options)
        self.options = options

    return property(get, set_, doc=f"``options.{name}`` (see ``MixOptions``).")


class MixingStateMixin:
    """Mixin for an ``nn.Module`` loss of the m²-Mix family (put it before the OpenCLIP loss
    class in the bases, whose ``world_size`` it reads).

    A family's ``__init__`` ends with ``*, options=None, seed=0, calls_per_step=1,
    **mixing: Unpack[MixKeywords]`` and calls :meth:`_init_mixing` after the OpenCLIP class's
    ``__init__``; its ``help()`` and ``inspect.signature`` then show every mixing option (see
    :meth:`__init_subclass__`). Each option reads as an attribute (``loss.m2mix_weight``), and
    :attr:`enabled_terms` lists the terms with a weight > 0. In ``forward``, call
    :meth:`_begin_call` once, then :meth:`_step_lambda` / :meth:`_step_pairing` per term, and
    :meth:`_count_nonfinite` with the total.

    The plugin protocol's optional methods are here: :meth:`set_epoch`, ``state_dict()`` (the
    generator, epoch, draws of the current step and the non-finite count, as ``_extra_state``)
    and :meth:`logged_scalars`.
    """

    options: MixOptions

    def __init_subclass__(cls, **kwargs):
        """A family's ``__init__`` shows ``**mixing`` as the options it stands for.

        The package's own classes must type ``**mixing`` as ``Unpack[MixKeywords]`` (a
        ``TypeError`` where the class is defined). A user's subclass is never refused: a plain
        ``**kwargs``, or annotations that do not resolve, keep Python's own signature."""
        super().__init_subclass__(**kwargs)
        init = cls.__dict__.get("__init__")
        if init is None:
            return
        if cls.__module__.startswith("m2mix_openclip."):
            init.__signature__ = signature_with_options(init)
            return
        try:
            init.__signature__ = signature_with_options(init)
        except Exception:  # a user's annotations that do not resolve only cost the spelled-out help()
            pass

    def _init_mixing(self, options: Optional[MixOptions], mixing: dict, seed: int, calls_per_step: int) -> None:
        """Stores ``options`` with the ``mixing`` keywords in place of its fields (``MixOptions``
        checks them; a ``TypeError`` names an unknown keyword), the seeded lambda generator and the
        step counter for ``calls_per_step`` calls per optimizer step."""
        options = mix_options(f"{type(self).__name__}()", options, **mixing)
        self._check_family_options(options)
        if int(calls_per_step) != calls_per_step or calls_per_step < 1:
            raise ValueError(f"calls_per_step must be an integer >= 1 (--accum-freq), got {calls_per_step!r}")
        self.options = options
        self.seed = int(seed)
        self.calls_per_step = int(calls_per_step)
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)
        self.epoch = 0
        self._phase = 0  # calls made in the current optimizer step, modulo calls_per_step
        self._step_lambdas: Dict[str, float] = {}
        self._step_pairings: Dict[str, torch.Tensor] = {}
        self._nonfinite_steps: Optional[torch.Tensor] = None  # on the device, read only when logged
        self._nonfinite_restored = 0
        self._inputs_checked = False
        self.last_lambdas: Dict[str, float] = {}
        self.last_pairings: Dict[str, torch.Tensor] = {}

    def _check_family_options(self, options: MixOptions) -> None:
        """Raises ``ValueError`` for valid options that this family cannot use (SigLIP: the
        uni-modal terms); every family can use every option by default."""

    @property
    def enabled_terms(self) -> List[str]:
        """The mixing terms with a weight > 0 (``MixOptions.enabled_terms``)."""
        return self.options.enabled_terms

    # -- the plugin protocol -----------------------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Sets the epoch (counted from 0) that the ``inverse-epoch`` schedule uses; a new epoch
        also starts a new optimizer step."""
        if int(epoch) != epoch or epoch < 0:
            raise ValueError(f"epoch must be an integer >= 0, got {epoch!r}")
        self.epoch = int(epoch)
        self._phase = 0

    @property
    def schedule_factor(self) -> float:
        return 1.0 / (self.epoch + 1) if self.mix_schedule == "inverse-epoch" else 1.0

    @property
    def nonfinite_steps(self) -> int:
        """Optimizer steps whose loss was NaN or Inf (reads the device: call it at logging steps)."""
        counted = 0 if self._nonfinite_steps is None else int(self._nonfinite_steps.item())
        return self._nonfinite_restored + counted

    def logged_scalars(self) -> Dict[str, float]:
        """What the trainer logs at its logging steps (as ``train/<key>``): each enabled term's
        lambda of the last step, the schedule factor, and the running count of non-finite steps
        (which a GradScaler skips). The one place that reads the device."""
        scalars = {f"{term}_lambda": lam for term, lam in self.last_lambdas.items()}
        scalars["mix_schedule_factor"] = self.schedule_factor
        scalars["nonfinite_steps"] = float(self.nonfinite_steps)
        return scalars

    def get_extra_state(self):
        meta = self._nonfinite_steps is not None and self._nonfinite_steps.device.type == "meta"
        return {
            "generator_state": self.generator.get_state(), "epoch": self.epoch, "seed": self.seed,
            "phase": self._phase, "step_lambdas": dict(self._step_lambdas),
            "step_pairings": {k: v.clone() for k, v in self._step_pairings.items()},
            "nonfinite_steps": self._nonfinite_restored if meta else self.nonfinite_steps,
        }

    def set_extra_state(self, state):
        self.generator.set_state(state["generator_state"])
        self.epoch = int(state["epoch"])
        self.seed = int(state["seed"])
        # Keys added after 0.1.0 (older loss states resume at a step boundary, counting from 0).
        self._phase = int(state.get("phase", 0))
        self._step_lambdas = dict(state.get("step_lambdas", {}))
        self._step_pairings = dict(state.get("step_pairings", {}))
        self._nonfinite_restored = int(state.get("nonfinite_steps", 0))
        self._nonfinite_steps = None

    # -- per call ------------------------------------------------------------------------------
    def _begin_call(self, image_features: torch.Tensor, text_features: torch.Tensor, mix_lambda: Optional[float],
                    needs_negatives: bool = True) -> bool:
        """Checks what is known on the host, at no device sync: ``mix_lambda`` in [0, 1],
        ``(batch, dim)`` features of one shape and, where ``needs_negatives``, at least 2 pairs in
        the global batch. Then counts the call; True when it starts a new optimizer step (with
        --accum-freq N the loss is called N times per step, each with the whole accumulated batch)."""
        if mix_lambda is not None and not (0.0 <= float(mix_lambda) <= 1.0):
            raise ValueError(f"mix_lambda must be a float in [0, 1], got {mix_lambda!r}")
        if image_features.dim() != 2 or image_features.shape != text_features.shape:
            raise ValueError(
                f"image_features and text_features must both be (batch, dim) with the same shape, "
                f"got {tuple(image_features.shape)} and {tuple(text_features.shape)}"
            )
        num_global = image_features.shape[0] * self.world_size
        if needs_negatives and num_global < 2:
            raise ValueError(
                f"{type(self).__name__} needs at least 2 image-text pairs in the (global) batch to form "
                f"negatives, got {num_global}; increase --batch-size"
            )
        new_step = self._phase == 0
        self._phase = (self._phase + 1) % self.calls_per_step
        if new_step:
            self.last_lambdas = {}
            self.last_pairings = {}
        return new_step

    def _step_lambda(self, term: str, alpha: float, pinned: Optional[float], new_step: bool) -> float:
        """The term's lambda for this optimizer step: drawn at its first call, reused after."""
        if pinned is not None:
            lam = float(pinned)
        elif new_step or term not in self._step_lambdas:
            lam = sample_beta(alpha, alpha, self.generator)
            self._step_lambdas[term] = lam
        else:
            lam = self._step_lambdas[term]
        self.last_lambdas[term] = lam
        return lam

    def _step_pairing(self, term: str, num: int, new_step: bool) -> torch.Tensor:
        """(num,) partners on the CPU for this optimizer step (see ``terms.pair_partners``)."""
        pair = self._step_pairings.get(term)
        if new_step or pair is None or pair.shape[0] != num:
            pair = pair_partners(num, self.mix_pairing, self.generator)
            self._step_pairings[term] = pair
        self.last_pairings[term] = pair
        return pair

    def _count_nonfinite(self, total: torch.Tensor, new_step: bool) -> None:
        """Adds 1 on the device when this step's loss is not finite; no sync."""
        if not new_step:
            return
        flag = (~torch.isfinite(total.detach())).to(torch.int64)
        if self._nonfinite_steps is None or self._nonfinite_steps.device != flag.device:
            self._nonfinite_steps = flag
        else:
            self._nonfinite_steps = self._nonfinite_steps + flag

    def _check_unit_rows_once(self, *features: torch.Tensor, agree_across_ranks: bool = False) -> None:
        """At the first call only: geodesic mixing needs unit vectors; unnormalised features are
        a wiring mistake, reported before training goes on. Called on the gathered global batch,
        so every rank reaches the same verdict (no rank raises alone); a loss that never gathers
        (SigLIP) passes ``agree_across_ranks`` to share the verdict by an all-reduce. Non-finite rows are left
        to behave as in ClipLoss (a non-finite loss), and meta tensors carry no data to check."""
        if self._inputs_checked:
            return
        self._inputs_checked = True
        if any(f.device.type == "meta" for f in features):
            return
        off = torch.stack([
            ((f.detach().float().norm(dim=1) - 1).abs().nan_to_num(0.0, 0.0, 0.0) > UNIT_NORM_TOLERANCE).any()
            for f in features
        ]).any()
        if agree_across_ranks and torch.distributed.is_available() and torch.distributed.is_initialized():
            off = off.to(torch.int32)
            torch.distributed.all_reduce(off, op=torch.distributed.ReduceOp.MAX)
        if bool(off):  # the one device sync, at the first call
            raise ValueError(
                "geodesic mixing needs unit-norm features (a CLIP model's outputs are); "
                "normalise them first, e.g. torch.nn.functional.normalize(x, dim=-1)"
            )


for _field in fields(MixOptions):
    setattr(MixingStateMixin, _field.name, _option_attribute(_field.name))
del _field
