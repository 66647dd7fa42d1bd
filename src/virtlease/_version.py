"""The release of virtlease: the one place it is written.

``pyproject.toml`` reads it (``[tool.setuptools.dynamic]``) for the wheel and the sdist,
``virtlease --version`` prints it, and ``make deb`` derives the Debian version from it.
"""

__version__ = "0.1.0"
