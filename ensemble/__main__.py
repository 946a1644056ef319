"""``python -m ensemble``: see ``ensemble.cli``."""

import sys

from ensemble.cli import main

sys.exit(main())
