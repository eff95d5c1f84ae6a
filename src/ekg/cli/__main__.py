"""``python -m ekg.cli``: the ``ekg`` command."""

import sys

from . import main

sys.exit(main())
