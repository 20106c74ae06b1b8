"""``python -m m2mix_openclip.train`` (console script ``m2mix-train``): OpenCLIP's trainer with ``--loss``.

Takes every OpenCLIP 3.3.0 training flag unchanged, plus ``--loss NAME``, ``--eval-metrics`` and
the chosen loss's own flags (``--help`` lists them all).
"""

import sys

from .integration.launcher import main

if __name__ == "__main__":
    sys.exit(main())
