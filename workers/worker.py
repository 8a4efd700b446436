"""Entry point for running a worker daemon from a checkout: ``python workers/worker.py --config workers/bob.toml``.

Installed, the same daemon is the ``fedzmq-worker`` command (or ``python -m fedzmq.worker``)."""

import sys

from fedzmq.worker.daemon import main

if __name__ == "__main__":
    sys.exit(main())
