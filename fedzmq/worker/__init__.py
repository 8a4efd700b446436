"""The worker: the daemon that holds a data owner's objects and runs allowlisted commands on them."""

from .config import WorkerConfig
from .server import Worker

__all__ = ["Worker", "WorkerConfig"]
