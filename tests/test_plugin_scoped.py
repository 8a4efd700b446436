"""Daemons that live across tests (fedzmq_daemons_module, fedzmq_daemons_session): the same process for
the next test that asks for it, with what the previous test did undone. The scenarios depend on the
order of their tests, so they run as a project of their own in a pytest subprocess, in strict mode."""

import pytest

from pytest_runs import run_pytest, wait_gone

SHARED = '''
"""What the test modules of this project remember between tests: pids and addresses."""
seen = {}
'''

MODULE_SCOPED = '''
import asyncio
import os
import signal
import time

import pytest
import torch

from fedzmq.testing import toy_shards
from shared import seen


@pytest.mark.asyncio
async def test_1_leaves_an_object_a_slow_daemon_and_a_stopped_one(fedzmq_daemons_module):
    bob, alice = await fedzmq_daemons_module("bob", "alice")
    seen.update(bob=bob.pid, alice=alice.pid, bob_address=bob.address, module_a_bob=bob.pid)
    await bob.worker.send(torch.ones(3))
    await bob.slow(3600)  # left slowed for an hour: the next test would wait that long if it were not undone
    alice.stop()


@pytest.mark.asyncio
async def test_2_gets_the_same_processes_reset(fedzmq_daemons_module):
    bob, alice = await fedzmq_daemons_module("bob", "alice")
    assert (bob.pid, alice.pid) == (seen["bob"], seen["alice"])
    status = await bob.worker.status()
    assert status["sessions"] == 1 and status["objects"] == 0  # a new session; the old one was closed
    # no longer slowed: still slowed, each command waits an hour and the 60 s below fails the test (a bound
    # sixty times what two commands take, so a busy host cannot fail it; no clock assert)
    sent = await asyncio.wait_for(bob.worker.send(torch.ones(2)), 60)
    assert torch.equal(await asyncio.wait_for(sent.get(), 60), torch.ones(2))
    assert (await alice.worker.ping(timeout=2))["id"] == "alice"  # continued
    bob.kill()


@pytest.mark.asyncio
async def test_3_gets_the_killed_daemon_restarted_at_its_address(fedzmq_daemons_module):
    [bob] = await fedzmq_daemons_module("bob")
    assert bob.pid != seen["bob"] and bob.address == seen["bob_address"]
    seen["bob"] = bob.pid
    os.kill(bob.pid, signal.SIGKILL)  # a crash the test did not ask for: this test errors at teardown
    bob.process.process.wait(10)


@pytest.mark.asyncio
async def test_4_gets_the_crashed_daemon_restarted(fedzmq_daemons_module):
    [bob] = await fedzmq_daemons_module("bob")
    assert bob.pid != seen["bob"] and (await bob.worker.ping())["id"] == "bob"
    seen["bob"] = bob.pid


@pytest.mark.asyncio
async def test_5_leaves_a_daemon_its_client_declared_dead(fedzmq_daemons_module):
    [alice] = await fedzmq_daemons_module("alice")
    assert alice.pid == seen["alice"]
    await alice.worker.send(torch.ones(3))
    alice.stop()
    async with asyncio.timeout(50):  # ten times the kit's 5 s of silence
        while alice.worker.alive:  # its session cannot be closed now: the daemon is started afresh
            await asyncio.sleep(0.05)


@pytest.mark.asyncio
async def test_6_gets_it_started_afresh(fedzmq_daemons_module):
    [alice] = await fedzmq_daemons_module("alice")
    assert alice.pid != seen["alice"]
    assert (await alice.worker.status())["objects"] == 0


@pytest.mark.asyncio
async def test_7_asks_for_other_flags_and_gets_another_daemon(fedzmq_daemons_module, tmp_path):
    [bob] = await fedzmq_daemons_module("bob", datasets=toy_shards(tmp_path, ["bob"]))
    assert bob.pid != seen["bob"]
    assert [d.name for d in await bob.worker.datasets()] == ["toy"]


@pytest.mark.asyncio
async def test_8_session_scoped_daemon(fedzmq_daemons_session):
    [carol] = await fedzmq_daemons_session("carol")
    seen["carol"] = carol.pid
'''

OTHER_MODULE = '''
import pytest

from shared import seen


@pytest.mark.asyncio
async def test_module_scope_ends_with_its_module_and_session_scope_does_not(fedzmq_daemons_module,
                                                                            fedzmq_daemons_session):
    [bob] = await fedzmq_daemons_module("bob")
    [carol] = await fedzmq_daemons_session("carol")
    assert bob.pid != seen["module_a_bob"]  # another module: another pool
    assert carol.pid == seen["carol"]  # the session's pool: the same process
    with open("pids", "w") as f:
        f.write(" ".join(str(pid) for pid in (bob.pid, carol.pid)))
'''


@pytest.mark.timeout(300)  # ten tests in a subprocess: about a minute, more on a loaded machine
def test_module_and_session_scoped_daemons_are_reused_and_reset_between_tests(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    (project / "shared.py").write_text(SHARED)
    (project / "test_a_module_scope.py").write_text(MODULE_SCOPED)
    (project / "test_b_other_module.py").write_text(OTHER_MODULE)
    result, output = run_pytest(project, "-o", "asyncio_mode=strict", "-o", "asyncio_default_fixture_loop_scope=function",
                                "-p", "no:randomly", "-W", "error", "-rA", timeout=240)
    assert "9 passed, 1 error" in output, output
    assert result.returncode == 1, output
    assert "ERROR at teardown of test_3_gets_the_killed_daemon_restarted_at_its_address" in output, output
    assert "daemon bob exited with code -9" in output, output
    # Nothing else, and nothing at the modules' ends. The short summary repeats the error on one line,
    # cut to the terminal's width or not depending on COLUMNS, so it is left out of the count.
    reports = [line for line in output.splitlines() if "exited with code" in line and not line.startswith("ERROR ")]
    assert len(reports) == 1, output
    assert "left running" not in output, output
    pids = [int(pid) for pid in (project / "pids").read_text().split()]
    assert wait_gone(pids, 5) == []  # the pools stopped their daemons at the end of their scope
