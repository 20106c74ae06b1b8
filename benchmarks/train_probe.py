"""Runs ``m2mix-train`` in this process and writes what ``bench_train.py`` measures of it.

    python benchmarks/train_probe.py OUT.json WARMUP -- <m2mix-train flags>

After each optimizer step (a global hook of ``torch.optim``) it notes the time (on CUDA after
``torch.cuda.synchronize()``) and, once the first WARMUP steps are done, the peak memory since
then: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``), a cruder figure that also counts the
allocator's and the data loader's pages. On the CPU it also times the loss itself in each step
(``LossTimer``). OUT.json: ``{"status", "step_end_times", "step_end_cpu_times" (the process's CPU
time), "loss_cpu_seconds" (per step, CPU only), "base_bytes"
(in use when the peak was reset, between two steps: weights, gradients, optimizer state),
"peak_bytes", "device"}``.
"""

import json
import sys
import time

import torch
from torch.optim.optimizer import register_optimizer_step_post_hook


def _status_kib(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status (the CPU memory figure needs Linux)")


class StepProbe:
    def __init__(self, warmup, cuda):
        self.warmup, self.cuda = warmup, cuda
        self.times, self.cpu_times, self.base, self.peak = [], [], None, None

    def after_step(self, *_):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
        self.cpu_times.append(time.process_time())
        if len(self.times) == self.warmup:
            if self.cuda:
                torch.cuda.reset_peak_memory_stats()
                self.base = torch.cuda.memory_allocated()
            else:
                with open("/proc/self/clear_refs", "w") as f:
                    f.write("5")  # the peak resident set starts again from the current one
                self.base = _status_kib("VmRSS") * 1024
        elif len(self.times) > self.warmup:
            # read at every step: what runs after the last step (a checkpoint) is not the step
            self.peak = torch.cuda.max_memory_allocated() if self.cuda else _status_kib("VmHWM") * 1024


class LossTimer:
    """On the CPU (no device to wait for): the process CPU time of the loss in each step, its
    forward (module hooks) plus its backward (from the first gradient reaching one of its outputs
    to the last reaching its image or caption features). Attaches itself to the first module of
    OpenCLIP's or this package's losses that runs."""

    def __init__(self):
        self.per_step, self._spent, self._backward, self._start = [], 0.0, [], None
        self._handle = torch.nn.modules.module.register_module_forward_pre_hook(self._find)

    def _find(self, module, _):
        if type(module).__module__.startswith(("open_clip.loss", "m2mix_openclip.losses")):
            self._handle.remove()
            module.register_forward_pre_hook(self._before, with_kwargs=True)
            module.register_forward_hook(self._after, with_kwargs=True)

    def _mark_backward(self, grad):
        self._backward.append(time.process_time())
        return grad

    def _before(self, module, args, kwargs):
        self._start = time.process_time()
        for key in ("image_features", "text_features"):
            feature = kwargs.get(key)
            if isinstance(feature, torch.Tensor) and feature.requires_grad:
                feature.register_hook(self._mark_backward)

    def _after(self, module, args, kwargs, output):
        if self._start is None:  # the call that found the loss (a warm-up step)
            return
        self._spent += time.process_time() - self._start
        values = output.values() if isinstance(output, dict) else output if isinstance(output, tuple) else [output]
        for value in values:
            if isinstance(value, torch.Tensor) and value.requires_grad:
                value.register_hook(self._mark_backward)

    def end_step(self):
        backward = max(self._backward) - min(self._backward) if self._backward else 0.0
        self.per_step.append(self._spent + backward)
        self._spent, self._backward = 0.0, []


def main(out_path, warmup, argv):
    from m2mix_openclip.integration.launcher import main as train

    cuda = "cuda" in argv[argv.index("--device") + 1] if "--device" in argv else torch.cuda.is_available()
    probe = StepProbe(warmup, cuda)
    register_optimizer_step_post_hook(probe.after_step)
    timer = None if cuda else LossTimer()
    if timer is not None:
        register_optimizer_step_post_hook(lambda *_: timer.end_step())
    status = train(argv)
    with open(out_path, "w") as f:
        json.dump({"status": status, "step_end_times": probe.times, "step_end_cpu_times": probe.cpu_times,
                   "loss_cpu_seconds": timer.per_step if timer else None, "base_bytes": probe.base,
                   "peak_bytes": probe.peak, "device": "cuda" if cuda else "cpu"}, f)
    return status


if __name__ == "__main__":
    separator = sys.argv.index("--")
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[separator + 1:]))
