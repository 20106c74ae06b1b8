"""``python -m m2mix_openclip.train`` (console script ``m2mix-train``): OpenCLIP's trainer with ``--loss``.

Takes every training flag of the installed OpenCLIP (2.20-3.x) unchanged, plus ``--loss NAME``, ``--eval-metrics`` and
the chosen loss's own flags (``--help`` lists them all).
"""

import sys

from .integration.launcher import main

if __name__ == "__main__":
    sys.exit(main())
