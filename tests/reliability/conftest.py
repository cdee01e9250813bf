"""Reliability suites run against the session-wide app (`serve_app` in tests/conftest.py):
one Ray cluster per pytest session, shared with the integration and browser suites.

Every module is marked `integration` (they need Ray); the full-size versions are also `slow`.
"""
