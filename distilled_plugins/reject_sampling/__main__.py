"""``python -m distilled_plugins.reject_sampling``: the stage's command line (see the package docstring)."""

import sys

from distilled_plugins.core import cli
from distilled_plugins.reject_sampling import main

sys.exit(cli.run(main))
