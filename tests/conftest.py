"""fedzmq's own suite uses fedzmq's pytest plugin (fedzmq.testing.plugin), loaded by its entry point.

Every test is bounded by pytest-timeout (``timeout`` in pyproject.toml)."""

# an example user project, run on its own by tests/test_plugin.py in a subprocess (it must need no conftest)
collect_ignore = ["user_project"]
