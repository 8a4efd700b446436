"""h44: ``status()["freeing"]``, the reaper's count of hand-overs not all dropped yet, which the honest-client
checks of tests/test_adversarial_routes.py count answers against (instead of timing them)."""

import threading
import time

import pytest

from fedzmq.worker.reaper import Reaper

pytestmark = pytest.mark.timeout(30)


class _HeldOnFree:
    """An object whose freeing waits for the test's word: the reaper is seen mid-free, however fast the host."""

    def __init__(self, release: threading.Event, freed: threading.Event) -> None:
        self.release, self.freed = release, freed

    def __del__(self) -> None:
        self.release.wait(20)
        self.freed.set()


def test_the_reaper_counts_a_hand_over_until_its_last_object_is_dropped() -> None:
    reaper = Reaper("h44")
    release, freed = threading.Event(), threading.Event()
    try:
        reaper.free([_HeldOnFree(release, freed), object()])
        reaper.free([object()])  # queued behind the first
        assert reaper.waiting == 2
        release.set()
        assert freed.wait(20)
        while reaper.waiting:  # the rest is dropped next; the test's timeout bounds "never"
            time.sleep(0.01)
        reaper.free([])  # nothing handed over: nothing counted
        assert reaper.waiting == 0
    finally:
        release.set()
        reaper.close()
