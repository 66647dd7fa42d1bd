"""The nemesis suite's harness: hosts under faults, a storage model, a misbehaving caller and a
checker (tests/safety/README.md).  ``python -m virtlease_lab.nemesis --help`` runs it alone;
``tests/safety/test_nemesis.py`` runs the short seeded version."""
