"""``python -m ensemble``: see ``ensemble.cli``."""

import os
import sys

from ensemble.cli import main

try:
    code = main()
    sys.stdout.flush()
except BrokenPipeError:  # the reader of the output left (`... | head`): stop quietly
    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
    code = 1
sys.exit(code)
