"""fedzmq's pytest plugin (fedzmq.testing.plugin): fault injection on real daemons, the factories and
their teardown, the helpers and dataset makers, and what a run reports about a failed test, an unclean
exit and a leaked torch mode. Daemons that live across tests: test_plugin_scoped.py; daemons that
outlive the run, leftover reports, interrupts: test_plugin_lifecycle.py; the docs' example project:
test_docs_testing.py."""

import asyncio
import signal
import time

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.examples.seed import toy_data
from fedzmq.testing import assert_state_dicts_close, state_dict_diff, toy_dataset, toy_shards
from fedzmq.worker.datasets import load_dataset
from fedzmq.testing.plugin import TEST_SETTINGS

from pytest_runs import run_pytest

DEAD_AFTER = TEST_SETTINGS.heartbeat_interval * TEST_SETTINGS.heartbeat_liveness  # 5 s


async def _until(condition, timeout):
    """Seconds until ``condition()`` held (polling), or fail after ``timeout``."""
    started = time.monotonic()
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.02)
    return time.monotonic() - started


# --- fault injection on real daemons -------------------------------------------------------------

async def test_killed_daemon_is_reported_dead_within_the_heartbeat_timeout(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    assert bob.running and bob.worker.alive
    bob.kill()
    killed = time.monotonic()
    assert not bob.running and bob.process.process.returncode == -signal.SIGKILL
    pending = asyncio.ensure_future(bob.worker.send(torch.ones(3)))  # nobody will answer it
    # declared dead by missed heartbeats: one never declared fails by TimeoutError at ten times the heartbeat
    # timeout (a busy host may notice it late, which is no failure; speed is the benchmarks')
    with pytest.raises(fz.WorkerDeadError):
        await asyncio.wait_for(pending, 10 * DEAD_AFTER)
    # ... and not at once (a lower bound a slow host only makes truer)
    assert time.monotonic() - killed >= DEAD_AFTER / 2
    assert not bob.worker.alive
    with pytest.raises(fz.WorkerDeadError):  # later requests fail at once
        await bob.worker.ping(timeout=5)


async def test_stopped_daemon_times_out_is_declared_dead_and_answers_after_cont(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    kept = await bob.worker.send(torch.arange(3.0))
    instance = bob.worker.instance
    bob.stop()
    with pytest.raises(fz.RequestTimeout):  # the deadline passes before the heartbeat timeout
        await bob.worker.ping(timeout=0.3)
    assert bob.running and bob.stopped
    # it stays silent: declared dead (never declared fails at ten times the heartbeat timeout; no clock assert)
    await _until(lambda: not bob.worker.alive, 10 * DEAD_AFTER)

    bob.cont()
    answer = await bob.wait_answering(timeout=10)
    assert bob.worker.alive and not bob.stopped
    assert answer["instance"] == instance  # the same process carried on...
    assert torch.equal(await kept.get(), torch.arange(3.0))  # ...with the objects it held


async def test_restarted_daemon_serves_again_at_the_same_address(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    address, instance, pid = bob.address, bob.worker.instance, bob.pid
    old = await bob.worker.send(torch.ones(2))
    bob.kill()
    worker = await bob.restart()
    assert worker is bob.worker  # the same client object reconnected by itself
    assert bob.address == address == bob.worker.address
    assert bob.running and bob.pid != pid
    assert bob.worker.instance != instance
    assert (await bob.worker.ping())["instance"] == bob.worker.instance
    with pytest.raises(fz.ObjectNotFound):  # what the old process held is gone
        await old.get()
    assert torch.equal(await (await bob.worker.send(torch.ones(2) * 3)).get(), torch.ones(2) * 3)

    # a running daemon restarts too (clean stop, then start); teardown checks its clean exit
    second = bob.worker.instance
    await bob.restart()
    assert bob.address == address and bob.worker.instance not in (instance, second)


async def test_slow_daemon_delays_commands_but_answers_pings_at_once(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    x = await bob.worker.send(torch.ones(3))  # gets of x make no new objects (nor deletes) to queue
    await bob.slow(2.0)
    with pytest.raises(fz.RequestTimeout):
        await x.get(timeout=0.3)
    started = time.monotonic()
    getting = asyncio.ensure_future(x.get())  # queued behind the timed-out get
    await asyncio.sleep(0.1)
    assert (await bob.worker.ping())["id"] == "bob"
    assert not getting.done(), "the ping was answered after the slowed get"  # at once: an order, not a clock
    assert torch.equal(await getting, torch.ones(3))
    assert time.monotonic() - started >= 2.0  # it was slowed (a lower bound a slow host only makes truer)
    assert bob.worker.alive  # slow is not dead: heartbeats were answered all along

    await bob.slow(3600)
    await bob.slow(0)  # undoes it: still an hour's delay, the get fails at 60 s (no clock assert)
    assert torch.equal(await asyncio.wait_for(x.get(), 60), torch.ones(3))


# --- the factories and their teardown ------------------------------------------------------------

@pytest.fixture
def checked_after_teardown():
    """Set up before the fedzmq fixtures a test asks for after it, so torn down after them: checks
    that everything they made was closed or stopped cleanly."""
    made = {"workers": [], "daemons": []}
    yield made
    for worker in made["workers"]:
        assert worker._connection.closed, f"{worker!r} was left open"
    for handle in made["daemons"]:
        assert not handle.running, f"{handle!r} was left running"
        assert handle.process.process.returncode == 0, f"{handle!r} exited with {handle.process.process.returncode}"


async def test_virtual_workers_by_name_and_by_count_with_datasets(checked_after_teardown, fedzmq_virtual_workers,
                                                                  tmp_path):
    bob, alice = await fedzmq_virtual_workers("bob", "alice",
                                              datasets={"bob": {"toy": toy_dataset(tmp_path / "toy.safetensors")}})
    counted = await fedzmq_virtual_workers(2)
    checked_after_teardown["workers"] += [bob, alice, *counted]
    assert [w.id for w in (bob, alice, *counted)] == ["bob", "alice", "worker0", "worker1"]
    assert [d.name for d in await bob.datasets()] == ["toy"] and await alice.datasets() == []
    with pytest.raises(ValueError, match="already"):
        await fedzmq_virtual_workers("bob")


async def test_daemons_by_count_with_toy_and_digit_shards(checked_after_teardown, fedzmq_daemons, fedzmq_digits,
                                                         tmp_path):
    digits = fedzmq_digits(2, alpha=0.5, seed=3)
    toy = toy_shards(tmp_path, 2)
    both = {w: {**digits[w], **toy[w]} for w in ("worker0", "worker1")}
    handles = await fedzmq_daemons(2, datasets=both)
    checked_after_teardown["daemons"] += handles
    assert [h.id for h in handles] == ["worker0", "worker1"]
    for handle in handles:
        assert handle.address.startswith("tcp://127.0.0.1:")
        found = {d.name: d for d in await handle.worker.datasets()}
        assert found["digits"].samples == sum(digits.sizes[handle.id])
        assert found["digits"].feature_shape == (64,) and found["digits"].num_classes == 10
        assert found["toy"].samples == 2
    remote = await handles[1].worker.send(nn.Linear(2, 1))
    result = await remote.fit("toy", loss="mse_loss", optimizer={"cls": "SGD", "lr": 0.1}, epochs=2)
    assert result["num_examples"] == 2  # worker1 holds the seed's rows 2 and 3
    assert len(digits.test[1]) == 359 and digits.train[0].shape[1] == 64


def _daemon_supports_keys():
    from fedzmq.worker.daemon import build_parser

    return "--secret-key" in build_parser().format_help()


@pytest.mark.skipif(not _daemon_supports_keys(), reason="this fedzmq-worker has no --secret-key")
async def test_daemons_with_keys_refuse_clients_without_them(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob", keys=True)
    assert (await bob.worker.status())["encrypted"] is True
    with pytest.raises(fz.HandshakeFailed, match="uses keys"):  # the handshake never completes, and says why
        await fz.connect(bob.address)
    async with fz.connect(bob.address, settings=TEST_SETTINGS, **bob.connection_keys()) as other:
        assert (await other.ping())["id"] == "bob"


# --- helpers ---------------------------------------------------------------------------------------

def test_state_dict_diff_says_which_tensors_differ_where_and_by_how_much():
    torch.manual_seed(0)
    a, b = nn.Linear(3, 2), nn.Linear(3, 2)
    b.load_state_dict(a.state_dict())
    assert state_dict_diff(a, b) == []
    assert_state_dicts_close(a, b, atol=0)
    with torch.no_grad():
        b.weight[1, 2] += 0.5
    [line] = state_dict_diff(a, b)
    before, after = a.weight[1, 2].item(), b.weight[1, 2].item()
    assert line == f"weight: 1 of 6 elements differ; max |diff| 0.5 at [1, 2] ({before:.6g} vs {after:.6g})"
    assert_state_dicts_close(a, b, atol=0.6)  # within a looser tolerance
    assert_state_dicts_close(a, b, atol=0, rtol=0.5 / abs(after) + 1e-6)  # or a relative one
    with pytest.raises(AssertionError) as raised:
        assert_state_dicts_close(a, b, atol=1e-3)
    assert str(raised.value) == f"state dicts differ (atol=0.001, rtol=0, NaN equals nothing):\n  {line}"
    frames = [entry.frame for entry in raised.traceback]
    assert frames[-1].f_locals.get("__tracebackhide__") is True  # pytest shows the caller's line instead


def test_state_dict_diff_lists_in_a_stable_order_with_missing_keys_shapes_and_other_values():
    first = {"z": torch.zeros(2), "a": torch.zeros(2, 2), "only1": torch.zeros(1), "m": torch.zeros(3), "step": 3}
    second = {"only2": torch.zeros(1), "m": torch.zeros(3, dtype=torch.float64), "a": torch.zeros(2, 3),
              "z": torch.ones(2), "step": 4, "only3": 1}
    expected = ["z: 2 of 2 elements differ; max |diff| 1 at [0] (0 vs 1)",  # the first of equal differences
                "a: shape/dtype (2, 2) torch.float32 vs (2, 3) torch.float32", "only1: only in the first",
                "m: shape/dtype (3,) torch.float32 vs (3,) torch.float64", "step: 3 vs 4",
                "only2: only in the second", "only3: only in the second"]
    assert state_dict_diff(first, second) == expected
    assert state_dict_diff(first, second) == expected  # the same every time: no set order


def test_nan_matches_nothing_unless_equal_nan_and_counts_as_the_largest_difference():
    nan, inf = float("nan"), float("inf")
    a = {"w": torch.tensor([[1.0, nan], [inf, 5.0]])}
    same = {"w": torch.tensor([[1.0, nan], [inf, 5.0]])}
    assert state_dict_diff(a, same) == ["w: 1 of 4 elements differ; max |diff| nan at [0, 1] (nan vs nan)"]
    assert state_dict_diff(a, same, equal_nan=True) == []  # NaN matches NaN at the same place; inf matches inf
    assert_state_dicts_close(a, same, equal_nan=True)
    other = {"w": torch.tensor([[1.0, 2.0], [-inf, 9.0]])}
    assert state_dict_diff(a, other, equal_nan=True) == [  # NaN ranks above any number, even an infinite one
        "w: 3 of 4 elements differ; max |diff| nan at [0, 1] (nan vs 2)"]
    with pytest.raises(AssertionError, match=r"\(atol=1e-06, rtol=0, NaN equals NaN\):\n  w: 3 of 4"):
        assert_state_dicts_close(a, other, equal_nan=True)


def test_toy_shards_split_the_seed_data_as_the_seed_does(tmp_path):
    data, target = toy_data()
    shards = toy_shards(tmp_path, ("bob", "alice"))
    assert list(shards) == ["bob", "alice"] and all(list(s) == ["toy"] for s in shards.values())
    for worker, rows in (("bob", slice(0, 2)), ("alice", slice(2, 4))):
        loaded = load_dataset("toy", shards[worker]["toy"])
        assert torch.equal(loaded.features, data[rows].detach()) and torch.equal(loaded.labels, target[rows].detach())
    assert [len(load_dataset("t", s["toy"])) for s in toy_shards(tmp_path / "three", 3).values()] == [1, 2, 1]
    with pytest.raises(ValueError, match="distinct"):
        toy_shards(tmp_path, ("bob", "bob"))


# --- pytest runs in subprocesses: a user's project, and what the plugin reports -----------------

FAILING_TESTS = '''
import os
import shutil
import signal

import pytest
import torch


@pytest.mark.asyncio
async def test_fails(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    await bob.worker.send(torch.ones(3))
    assert False, "deliberate failure"


@pytest.mark.asyncio
async def test_daemon_crashes(fedzmq_daemons):
    [carol] = await fedzmq_daemons("carol")
    os.kill(carol.pid, signal.SIGKILL)  # not carol.kill(): a crash the test did not ask for
    carol.process.process.wait(10)


@pytest.mark.asyncio
async def test_passes(fedzmq_daemons):
    [dave] = await fedzmq_daemons("dave")
    dave.kill()  # asked for: its exit code is not held against it
'''


def test_failed_test_prints_daemon_logs_and_an_unclean_exit_fails_teardown(tmp_path):
    (tmp_path / "test_failing.py").write_text(FAILING_TESTS)
    result, output = run_pytest(tmp_path, "-o", "asyncio_mode=strict", "-rA")
    assert result.returncode == 1, output
    assert "1 failed, 2 passed, 1 error" in output, output
    assert "ERROR at teardown of test_daemon_crashes" in output, output
    assert "daemon carol exited with code -9" in output, output
    for worker in ("bob", "carol"):  # the log tails of the daemons of the failed test and of the crash
        assert f"----- log of daemon {worker} (" in output and f"worker {worker} serving on" in output, output
    assert "log of daemon dave" not in output, output
    assert "left running" not in output, output


LEAKING_MODE_TESTS = '''
import asyncio

import pytest
import torch


async def _get_under_no_grad():
    with torch.no_grad():  # the bug the check is for: a mode held across an await
        await asyncio.sleep(0)


@pytest.mark.asyncio
async def test_leaks_grad_mode():
    first = asyncio.ensure_future(_get_under_no_grad())
    second = asyncio.ensure_future(_get_under_no_grad())
    await asyncio.gather(first, second)  # the blocks exit out of order: grad mode stays off


def test_runs_after_the_leak_with_grad_mode_on():
    assert torch.is_grad_enabled()
'''


def test_a_test_that_leaks_grad_mode_fails_by_name_and_the_next_starts_clean(tmp_path):
    (tmp_path / "test_modes.py").write_text(LEAKING_MODE_TESTS)
    result, output = run_pytest(tmp_path, "-o", "asyncio_mode=strict", "-p", "no:randomly")
    assert result.returncode == 1, output
    assert "1 failed, 1 passed" in output, output
    assert "test_modes.py::test_leaks_grad_mode left torch's thread modes changed after its call" in output, output
    assert "grad_enabled: True -> False" in output, output
