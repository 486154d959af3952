"""Checkpoint benchmark entry point; the code lives in ``benchmarks/ckbench/``.

Same as ``python -m benchmarks.ckbench``. See benchmarks/README.md and ``--help``.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.ckbench.cli import main

if __name__ == "__main__":
    sys.exit(main())
