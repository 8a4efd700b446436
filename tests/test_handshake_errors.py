"""A connect whose ZeroMQ handshake fails says why at once, against real daemons.

A daemon that refuses the client's key, a server key that is not the daemon's, or keys on one side
only used to look like silence: ``connect`` waited its whole timeout (10 s by default) and then asked
whether the daemon was running. Each case now fails within a second or so with its own message; a
daemon that is not there still waits the timeout. The connects here use the default settings (a 10 s
connect timeout): a failure not told from silence would come as ``RequestTimeout`` after those 10 s, so
the tests assert the error's type and words, never a time.
"""

import asyncio
import collections
import os
import shutil
import signal
import socket
import time

import pytest
import zmq
import zmq.auth

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from fedzmq.launcher import DaemonProcess
from fedzmq.security import generate_keypair

@pytest.fixture
def strangers(tmp_path):
    """Key pairs no daemon knows: a client's ("mallory") and a server's ("other")."""
    return {"mallory": generate_keypair(tmp_path / "strangers", "mallory"),
            "other": generate_keypair(tmp_path / "strangers", "other")}


async def _failed_connect(address: str, **kwargs) -> Exception:
    """The error ``connect`` raises."""
    with pytest.raises(fz.WorkerError) as caught:
        await fz.connect(address, **kwargs)
    return caught.value


def _public_z85(key_file) -> str:
    return zmq.auth.load_certificate(str(key_file))[0].decode()


@pytest.mark.timeout(90)
async def test_a_client_key_the_daemon_does_not_allow_is_refused_at_once(fedzmq_daemons_module, strangers):
    [bob] = await fedzmq_daemons_module("bob", keys=True)
    error = await _failed_connect(bob.address, server_key=bob.server_key,
                                           client_key=strangers["mallory"][1])
    assert isinstance(error, fz.HandshakeRefused), repr(error)
    assert "refused this client key" in str(error) and "allowed-keys" in str(error)
    assert _public_z85(strangers["mallory"][0]) in str(error) and bob.address in str(error)


@pytest.fixture
def keyed_daemon(tmp_path):
    """A daemon of our own whose allowed-keys folder the test changes: ``(daemon, its public key file,
    its allowed-keys folder)``."""
    server = generate_keypair(tmp_path / "keys", "server")
    allowed = tmp_path / "allowed"
    allowed.mkdir()
    daemon = DaemonProcess("carol", extra_args=["--secret-key", str(server[1]), "--allowed-keys", str(allowed)],
                           log_dir=tmp_path)
    daemon.start()
    yield daemon, server[0], allowed
    assert daemon.stop() == 0, daemon.log_tail()


@pytest.mark.timeout(120)
async def test_a_revoked_client_key_is_refused_at_once(keyed_daemon, strangers):
    carol, server_key, allowed = keyed_daemon
    mallory = {"server_key": server_key, "client_key": strangers["mallory"][1]}
    shutil.copy(strangers["mallory"][0], allowed)
    carol.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(30):
        while True:  # until the daemon has read its folder again
            try:
                await (await fz.connect(carol.address, settings=ConnectionSettings(connect_timeout=2.0),
                                        **mallory)).close()
                break
            except fz.WorkerError:
                await asyncio.sleep(0.2)
    (allowed / strangers["mallory"][0].name).unlink()
    carol.process.send_signal(signal.SIGHUP)
    async with asyncio.timeout(60):
        while True:  # a connect before the reload still gets in
            try:
                await (await fz.connect(carol.address, **mallory)).close()
            except fz.HandshakeRefused as refused:
                error = refused
                break
            except fz.PermissionDenied as revoked:  # its handshake before the reload, its first request after
                assert "no longer allowed" in str(revoked), str(revoked)
            await asyncio.sleep(0.1)
    assert "refused this client key" in str(error) and _public_z85(strangers["mallory"][0]) in str(error)


@pytest.mark.timeout(90)
async def test_a_server_key_that_is_not_the_daemons_is_named(fedzmq_daemons_module, strangers):
    [bob] = await fedzmq_daemons_module("bob", keys=True)
    error = await _failed_connect(bob.address, server_key=strangers["other"][0], client_key=bob.client_key)
    assert isinstance(error, fz.HandshakeFailed) and not isinstance(error, fz.HandshakeRefused), repr(error)
    assert "server_key" in str(error) and bob.address in str(error), str(error)


@pytest.mark.timeout(90)
async def test_a_client_without_keys_is_told_the_daemon_uses_keys(fedzmq_daemons_module):
    [bob] = await fedzmq_daemons_module("bob", keys=True)
    error = await _failed_connect(bob.address)
    assert isinstance(error, fz.HandshakeFailed) and not isinstance(error, fz.HandshakeRefused), repr(error)
    assert "uses keys" in str(error) and "server_key" in str(error) and bob.address in str(error), str(error)


@pytest.mark.timeout(90)
async def test_a_client_with_keys_is_told_the_daemon_uses_none(fedzmq_daemons_module, strangers):
    [dave] = await fedzmq_daemons_module("dave")
    error = await _failed_connect(dave.address, server_key=strangers["other"][0],
                                           client_key=strangers["mallory"][1])
    assert isinstance(error, fz.HandshakeFailed) and not isinstance(error, fz.HandshakeRefused), repr(error)
    assert "does not use keys" in str(error) and dave.address in str(error), str(error)


@pytest.mark.timeout(60)
async def test_no_daemon_still_waits_the_connect_timeout_and_says_what_to_check():
    with socket.socket() as probe:  # a port nothing listens on: held bound (not listening) while the client tries
        probe.bind(("127.0.0.1", 0))  # it, so that no daemon another test starts meanwhile can be given it (h43)
        address = f"tcp://127.0.0.1:{probe.getsockname()[1]}"
        error = await _failed_connect(address, settings=ConnectionSettings(connect_timeout=1.0))
    assert not isinstance(error, fz.HandshakeFailed), repr(error)
    assert isinstance(error, fz.RequestTimeout), repr(error)
    assert "Nothing answered at" in str(error) and "is the daemon running" in str(error), str(error)


# --- nothing left behind ---------------------------------------------------------------------------------

def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


async def _fds_after_close(baseline: int) -> int:
    """The open file descriptors once they are back to ``baseline``, or after 30 s (libzmq closes a
    socket's descriptors on its own thread, a moment after ``close``: on a busy host, seconds later; only a
    leak waits the whole 30 s)."""
    deadline = time.monotonic() + 30.0
    while _open_fds() > baseline and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    return _open_fds()


def _tasks_for(address: str) -> collections.Counter:
    """The running tasks of connections to ``address``, by name."""
    return collections.Counter(t.get_name() for t in asyncio.all_tasks()
                               if t.get_name().endswith(address) and not t.done())


@pytest.mark.timeout(120)
async def test_connects_that_fail_succeed_or_are_cancelled_leave_no_task_or_socket_behind(
        fedzmq_daemons_module, strangers):
    [bob] = await fedzmq_daemons_module("bob", keys=True)
    allowed = {"server_key": bob.server_key, "client_key": bob.client_key}
    attempts = {"allowed": allowed, "refused": {**allowed, "client_key": strangers["mallory"][1]},
                "wrong server key": {**allowed, "server_key": strangers["other"][0]}, "no keys": {}}
    await (await fz.connect(bob.address, **allowed)).close()  # the context's threads and sockets, made once
    tasks, fds = _tasks_for(bob.address), await _fds_after_close(_open_fds())
    for _ in range(3):
        for name, keys in attempts.items():
            if name == "allowed":
                worker = await fz.connect(bob.address, **keys)
                # while connected, the connection runs its receive and heartbeat tasks and nothing else
                assert sorted((_tasks_for(bob.address) - tasks).elements()) == [
                    f"fedzmq-heartbeat-{bob.address}", f"fedzmq-recv-{bob.address}"]
                assert (await worker.ping())["id"] == "bob"
                await worker.close()
            else:
                await _failed_connect(bob.address, **keys)
            for delay in (0, 0.001, 0.01, 0.05):  # cancelled before, while and after the handshake
                connecting = asyncio.ensure_future(fz.connect(bob.address, **keys))
                await asyncio.sleep(delay)
                connecting.cancel()
                result = (await asyncio.gather(connecting, return_exceptions=True))[0]
                if isinstance(result, fz.RemoteWorker):  # connected before the cancel came
                    await result.close()
            assert _tasks_for(bob.address) == tasks, name
    assert await _fds_after_close(fds) <= fds


def test_a_failed_handshake_is_logged_in_words():
    """The daemon's log said "handshake failed from b'tcp://127.0.0.1:5761' (event 32768, 400)": the
    endpoint is pyzmq's bytes (and the daemon's own address, not the client's), the event a bare number."""
    from fedzmq.worker.server import describe_endpoint, describe_event

    assert describe_endpoint(b"tcp://127.0.0.1:5761") == "tcp://127.0.0.1:5761"
    assert describe_event(zmq.EVENT_HANDSHAKE_FAILED_AUTH) == "HANDSHAKE_FAILED_AUTH"
    assert describe_event(12345678) == "12345678"


@pytest.mark.timeout(30)
async def test_a_daemons_secret_key_file_given_as_server_key_is_refused(tmp_path):
    """A coordinator that passed the daemon's ``.key_secret`` as ``server_key`` connected as if nothing
    were wrong: it works (the file holds the public key too), so the slip that copied a daemon's
    secret to the coordinator's machine went unnoticed. It is refused before any socket is made."""
    from fedzmq.security import SecurityError

    daemon_public, daemon_secret = generate_keypair(tmp_path, "bob")
    _, client_secret = generate_keypair(tmp_path, "coordinator")
    with pytest.raises(SecurityError, match=r"bob\.key_secret.*secret.*bob's public \.key"):
        await fz.connect("tcp://127.0.0.1:9", server_key=daemon_secret, client_key=client_secret)
