"""Tests of the lockd agent (protocol, server, client); a package so its conftest does not shadow tests/conftest.py."""
