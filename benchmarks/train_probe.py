"""Runs ``m2mix-train`` in this process and writes what ``bench_train.py`` measures of it.

    python benchmarks/train_probe.py OUT.json WARMUP -- <m2mix-train flags>

After each optimizer step (a global hook of ``torch.optim``) it notes the time (on CUDA after
``torch.cuda.synchronize()``) and, once the first WARMUP steps are done, the peak memory since
then: ``torch.cuda.max_memory_allocated`` on CUDA; on the CPU the process's peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs``), a cruder figure that also counts the
allocator's and the data loader's pages. OUT.json: ``{"status", "step_end_times", "base_bytes"
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
        self.times, self.base, self.peak = [], None, None

    def after_step(self, *_):
        if self.cuda:
            torch.cuda.synchronize()
        self.times.append(time.perf_counter())
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


def main(out_path, warmup, argv):
    from m2mix_openclip.integration.launcher import main as train

    cuda = "cuda" in argv[argv.index("--device") + 1] if "--device" in argv else torch.cuda.is_available()
    probe = StepProbe(warmup, cuda)
    register_optimizer_step_post_hook(probe.after_step)
    status = train(argv)
    with open(out_path, "w") as f:
        json.dump({"status": status, "step_end_times": probe.times, "base_bytes": probe.base,
                   "peak_bytes": probe.peak, "device": "cuda" if cuda else "cpu"}, f)
    return status


if __name__ == "__main__":
    separator = sys.argv.index("--")
    sys.exit(main(sys.argv[1], int(sys.argv[2]), sys.argv[separator + 1:]))
