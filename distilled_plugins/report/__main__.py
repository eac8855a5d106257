"""``python -m distilled_plugins.report``: the stage's command line (see the package docstring)."""

import sys

from distilled_plugins.core import cli
from distilled_plugins.report import main

sys.exit(cli.run(main))
