"""``python -m virtlease_lab.nemesis``: the long nemesis run (``make safety-long``)."""

import sys

from .harness import main

sys.exit(main())
