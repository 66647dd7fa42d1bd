"""``python -m virtlease.cli``: the same as the ``virtlease`` console script."""

from . import main

main()
