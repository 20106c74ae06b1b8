"""Runs ``m2mix-train`` with a fault injected into the save of one checkpoint (tests/test_robust_runs.py).

    python tests/fault_injection.py FAULT EPOCH [m2mix-train arguments]

When the run saves the training checkpoint of epoch EPOCH, ``torch.save`` writes the first half
of it into the file it was given, and then, by FAULT:

- ``kill``: the process is killed outright (SIGKILL), as a cluster's scheduler or the OOM killer does;
- ``interrupt``: SIGINT arrives, as Ctrl-C sends it;
- ``full-disk``: the write fails with ``OSError(ENOSPC)``, as it does on a full disk.
"""

import errno
import io
import os
import signal
import sys
import time

import torch


def inject(fault: str, epoch: int) -> None:
    if fault == "interrupt":
        # Ctrl-C as at a terminal: a shell that started the tests in the background (nohup, &) had
        # them ignore SIGINT, which every child then inherits
        signal.signal(signal.SIGINT, signal.default_int_handler)
    real_save = torch.save
    injected = []

    def save(obj, f, *args, **kwargs):
        if injected or not (isinstance(obj, dict) and obj.get("epoch") == epoch and "state_dict" in obj):
            return real_save(obj, f, *args, **kwargs)
        injected.append(fault)  # once: what the save does next (measuring the size it needed) works
        whole = io.BytesIO()
        real_save(obj, whole)
        f.write(whole.getvalue()[: len(whole.getvalue()) // 2])
        f.flush()
        if fault == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        if fault == "interrupt":
            os.kill(os.getpid(), signal.SIGINT)
            # Python runs the handler where the interpreter next checks for signals (a loop's jump
            # back, a function's start), not at once: wait in such a loop for it
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline:
                time.sleep(0.001)
            raise AssertionError("SIGINT's handler raised nothing within 10 s")
        if fault == "full-disk":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        raise AssertionError(f"unknown fault {fault!r}")

    torch.save = save


if __name__ == "__main__":
    inject(sys.argv[1], int(sys.argv[2]))
    from m2mix_openclip.integration.launcher import main
    sys.exit(main(sys.argv[3:]))
