"""The divergence stop: a run whose loss turns NaN or Inf where nothing skips such steps stops.

Under ``--precision amp`` OpenCLIP's GradScaler skips the optimizer step of a non-finite loss.
In fp32, or bf16 without a scaler, nothing does: one NaN step makes every weight NaN, every later
checkpoint worthless, and the run goes on to its end. :class:`NonfiniteWatch` counts the loss
calls whose total is not finite on the device (a forward hook on the loss: any loss, OpenCLIP's
own included), and reads that count only at OpenCLIP's logging steps, on every rank together
(one all-reduce), so that all ranks stop at the same step or none does; the training step itself
never waits for the device.

``--on-nonfinite stop`` (the default) raises :class:`DivergedError` at the first logging step
that sees a new non-finite loss, before the weights reach a checkpoint; ``continue`` logs a
warning there and goes on, as OpenCLIP does (checkpoints of non-finite weights are still never
saved: :func:`.plugins.save_checkpoint`).
"""

from __future__ import annotations

import copy
import logging
from typing import Optional

import torch

__all__ = ["ON_NONFINITE", "DivergedError", "NonfiniteWatch"]

ON_NONFINITE = ("stop", "continue")
_NO_STEP = 2 ** 62  # "no non-finite step yet"; all-reduced as its negative, by MAX


class DivergedError(RuntimeError):
    """The loss was not finite at a step no GradScaler skipped; the message names the step and the causes."""


def _total(output) -> Optional[torch.Tensor]:
    if isinstance(output, dict):
        values = [v for v in output.values() if torch.is_tensor(v)]
    elif isinstance(output, (tuple, list)):
        values = [v for v in output if torch.is_tensor(v)]
    else:
        values = [output] if torch.is_tensor(output) else []
    return sum(v.detach().float().sum() for v in values) if values else None


class NonfiniteWatch:
    """Counts non-finite losses on the device and decides, at logging steps, on every rank alike.

    Args:
        stop: raise :class:`DivergedError` (True) or warn (False) at a check that sees a new one.
        describe: ``describe(first_step, new_count, stopping) -> str``, the message.
    """

    def __init__(self, stop: bool, describe):
        self.stop, self.describe = stop, describe
        self.step = 0  # the trainer's global step of the batch being trained, set before each batch
        self.seen = 0  # non-finite loss calls reported so far (all ranks)
        self._new: Optional[torch.Tensor] = None  # since the last check, on the device: [count, -first step]

    def attach(self, loss) -> bool:
        """Watches ``loss`` (an ``nn.Module``: a forward hook; other callables are not watched)."""
        if not isinstance(loss, torch.nn.Module):
            return False
        loss.register_forward_hook(self._observe)
        return True

    def _observe(self, module, args, output) -> None:
        total = _total(output)
        if total is None:
            return
        bad = (~torch.isfinite(total)).to(torch.int64)
        seen = torch.stack([bad, torch.where(bad.bool(), -self.step, -_NO_STEP)])
        if self._new is None or self._new.device != seen.device:
            self._new = seen
        else:
            self._new = torch.stack([self._new[0] + seen[0], torch.maximum(self._new[1], seen[1])])

    def check(self, device) -> None:
        """At a logging step, on every rank: reads (and all-reduces) what was seen since the last
        check; raises :class:`DivergedError` or warns where a loss was not finite."""
        new = self._new if self._new is not None else torch.tensor([0, -_NO_STEP], device=device)
        self._new = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            new = new.clone()
            torch.distributed.all_reduce(new, op=torch.distributed.ReduceOp.MAX)
        count, first = new.tolist()  # the one read of the device, at a logging step
        if count <= 0:
            return
        self.seen += count
        message = self.describe(-first, count, self.stop)
        if self.stop:
            raise DivergedError(message)
        logging.warning(message)

    def watched(self, data: dict, epoch: int, args) -> dict:
        """``data`` (OpenCLIP's ``get_data`` result) whose training batches tell this watch the step
        of each batch and check it after each of OpenCLIP's logging steps."""
        info = copy.copy(data["train"])
        info.dataloader = _CheckedBatches(info.dataloader, self, epoch, args)
        return dict(data, train=info)


class _CheckedBatches:
    """A training DataLoader that, between batches, knows which of OpenCLIP's optimizer steps has
    just ended and checks the watch after each logging step: OpenCLIP's own arithmetic (``step =
    num_batches_per_epoch * epoch + i // accum_freq``; a logging step every ``--log-every-n-steps``
    and the epoch's last), which runs on every rank where its logging runs on the first only."""

    def __init__(self, loader, watch: NonfiniteWatch, epoch: int, args):
        self._loader, self._watch, self._args = loader, watch, args
        self._accum = max(1, int(getattr(args, "accum_freq", 1)))
        self._steps = loader.num_batches // self._accum
        self._first_step = self._steps * epoch
        self._checked = -1  # the last local step checked

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self):
        return len(self._loader)

    def _ended(self, local_step: int) -> None:
        every = max(1, int(getattr(self._args, "log_every_n_steps", 1)))
        if local_step > self._checked and (local_step % every == 0 or local_step + 1 == self._steps):
            self._checked = local_step
            self._watch.check(torch.device(self._args.device))

    def __iter__(self):
        batches = 0
        for i, batch in enumerate(self._loader):
            if i and i % self._accum == 0:
                self._ended(i // self._accum - 1)
            self._watch.step = self._first_step + i // self._accum
            batches = i + 1
            yield batch
        if batches >= self._accum:
            self._ended(batches // self._accum - 1)
