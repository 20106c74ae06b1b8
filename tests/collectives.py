"""Counting the collectives a process runs.

As a library: ``with counted_collectives() as counts: ...`` counts every call of the
``torch.distributed`` functions that move data between processes, by name.

As a script, under ``torch.distributed.run``: ``collectives.py OUT_DIR RUNS.json`` runs OpenCLIP's
trainer (``m2mix_openclip.integration.launcher.main``) once for each ``[name, port, [flags ...]]``
of RUNS.json (``port``: a free one, for that run's rendezvous), one after the other in the same
processes, with every collective counted, one counter per optimizer step (a new one starts after
each ``optimizer.step()``), and writes ``OUT_DIR/rank<R>.json``:
``{name: {"status": exit status, "steps": [{collective: count}, ...]}}``. The last counter of a run
holds what ran after its last step. DDP's gradient all-reduce runs in C++, beneath these
functions, and is not counted (it is the same for every loss).
"""

import collections
import contextlib
import json
import os
import sys

import torch.distributed as dist

COLLECTIVES = ("all_gather", "all_gather_into_tensor", "all_gather_object", "all_reduce", "all_to_all",
               "all_to_all_single", "barrier", "batch_isend_irecv", "broadcast", "broadcast_object_list", "gather",
               "irecv", "isend", "recv", "reduce", "reduce_scatter", "reduce_scatter_tensor", "scatter", "send")


@contextlib.contextmanager
def counted_collectives(record=None):
    """Counts calls of :data:`COLLECTIVES` (as ``torch.distributed.<name>``, which OpenCLIP and
    ``torch.distributed.nn`` call, and inside ``torch.distributed``): yields a ``Counter`` by
    name, or calls ``record(name)`` at each call instead."""
    counts = collections.Counter()
    record = record or (lambda name: counts.update([name]))
    originals = {name: getattr(dist, name) for name in COLLECTIVES if hasattr(dist, name)}

    def counting(name, original):
        def wrapper(*args, **kwargs):
            record(name)
            return original(*args, **kwargs)
        return wrapper

    for name, original in originals.items():
        wrapper = counting(name, original)
        setattr(dist, name, wrapper)
        setattr(dist.distributed_c10d, name, wrapper)  # P2POp checks its op against these
    try:
        yield counts
    finally:
        for name, original in originals.items():
            setattr(dist, name, original)
            setattr(dist.distributed_c10d, name, original)


def _main(out_dir, runs):
    """Runs each ``(name, port, argv)`` of ``runs`` in turn in this process; between runs the process
    group is destroyed (the next run's OpenCLIP creates it again) and the log handlers that
    OpenCLIP added are removed."""
    import logging

    from torch.optim.optimizer import register_optimizer_step_post_hook

    from m2mix_openclip.integration.launcher import main

    steps = []
    register_optimizer_step_post_hook(lambda *_: steps.append(collections.Counter()))
    rank = int(os.environ.get("RANK", "0"))
    handlers = list(logging.root.handlers)
    results = {}
    for name, port, argv in runs:
        # A fresh rendezvous store per run: a process group made again on the same store would
        # read the previous group's addresses.
        os.environ.update(MASTER_PORT=str(port), TORCHELASTIC_USE_AGENT_STORE="False")
        steps[:] = [collections.Counter()]
        with counted_collectives(lambda op: steps[-1].update([op])):
            status = main(argv)
        results[name] = {"status": status, "steps": [dict(c) for c in steps]}
        if dist.is_initialized():
            dist.barrier()  # no process leaves the group while another still talks in it
            dist.destroy_process_group()
        for handler in set(logging.root.handlers) - set(handlers):
            logging.root.removeHandler(handler)
            handler.close()
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    return max(r["status"] for r in results.values())


if __name__ == "__main__":
    with open(sys.argv[2]) as spec:  # [[name, port, [m2mix-train flags ...]], ...]
        sys.exit(_main(sys.argv[1], json.load(spec)))
