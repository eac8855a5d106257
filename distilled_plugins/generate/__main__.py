"""``python -m distilled_plugins.generate``: the stage's command line (see the package docstring)."""

import sys

from distilled_plugins.core import cli
from distilled_plugins.generate import main

sys.exit(cli.run(main))
