"""Helpers for testing federated code against real fedzmq workers (the pytest plugin lives in
``fedzmq.testing.plugin`` and is registered automatically when fedzmq is installed; see docs/testing.md)."""

from .daemons import DaemonHandle
from .datasets import DigitsShards, digits_shards, toy_dataset, toy_shards, write_dataset
from .helpers import assert_state_dicts_close, state_dict_diff

__all__ = ["DaemonHandle", "DigitsShards", "assert_state_dicts_close", "digits_shards", "state_dict_diff",
           "toy_dataset", "toy_shards", "write_dataset"]
