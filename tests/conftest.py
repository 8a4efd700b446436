"""fedzmq's own suite uses fedzmq's pytest plugin (fedzmq.testing.plugin), loaded by its entry point.

Every test is bounded by pytest-timeout (``timeout`` in pyproject.toml). The example user project
lives in docs/testing.md; tests/test_docs_testing.py runs it."""
