"""``python -m moebits SUB ...``: see :mod:`moebits.cli`."""

import sys

from moebits.cli import main

sys.exit(main())
