"""Learnability benchmark: the project's own stages must teach a small model a synthetic task it cannot guess.

Usage:
    .venv/bin/python bench/learnability.py --out /tmp/learnability [--train 1440 --held-out 64 --epochs 6]

The check itself is ``distilled_plugins/devtools/learnability.py`` (also used by the demo and tests/test_learnability.py).
Writes ``--out``/report.json (``before``, ``after``: pass@1 in %; ``held_out``, ``steps``, ``seconds``) and
``--out``/loss.png. Target on this 2-core machine: after >= 90, before <= 5, <= 300 s.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from distilled_plugins.devtools.learnability import main

if __name__ == "__main__":
    sys.exit(main())
