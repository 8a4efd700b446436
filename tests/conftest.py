"""fedzmq's own suite uses fedzmq's pytest plugin (fedzmq.testing.plugin), loaded by its entry point.

Every test is bounded by pytest-timeout (``timeout`` in pyproject.toml)."""
