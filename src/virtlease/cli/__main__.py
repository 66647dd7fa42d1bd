"""``python -m virtlease.cli``: the same as the ``virtlease`` console script.

See docs/DESIGN.md §2 (Layers).
"""

from . import main

main()
