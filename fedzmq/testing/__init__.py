"""Helpers for testing federated code against real fedzmq workers (the pytest plugin lives in
``fedzmq.testing.plugin`` and is registered automatically when fedzmq is installed)."""

from .daemons import DaemonHandle
from .helpers import assert_state_dicts_close, state_dict_diff

__all__ = ["DaemonHandle", "assert_state_dicts_close", "state_dict_diff"]
