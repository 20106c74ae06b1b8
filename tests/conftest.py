import os

# Two torch processes with 2 OpenMP threads each spin against each other on 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)
