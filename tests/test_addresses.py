"""Addresses (issue 15, item 5): a wrong or unresolvable address fails at once with ``fz.AddressError``, which
says what is wrong and what a right address looks like, instead of a raw ZMQError or a full connect timeout."""

import asyncio

import pytest
import torch

import fedzmq as fz
from fedzmq.client.addresses import check_address

#: a connect timeout far above the test's own bound: failing inside the bound means failing at once
PATIENT = fz.ConnectionSettings(connect_timeout=60.0)

WRONG = {
    "127.0.0.1:5555": "no transport",  # the case: no scheme
    "http://127.0.0.1:5555": "transport",
    "tcp://127.0.0.1": "port",
    "tcp://127.0.0.1:": "port",
    "tcp://127.0.0.1:port": "port",
    "tcp://127.0.0.1:70000": "port",
    "tcp://127.0.0.1:0": "port",
    "tcp://:5555": "host",
    "tcp://*:5555": "host",  # a bind address, not one to connect to
    "tcp://[::1:5555": "host",
    "tcp://bad host:5555": "host",
    "tcp://-x:5555": "host",
    "ipc://": "path",
    "inproc://": "name",
    "": "no transport",
}


def test_address_error_is_a_fedzmq_value_error():
    assert issubclass(fz.AddressError, fz.FedzmqError) and issubclass(fz.AddressError, ValueError)


@pytest.mark.parametrize("address,what", sorted(WRONG.items()))
async def test_a_malformed_address_fails_at_once_saying_what_is_wrong(address, what):
    async with asyncio.timeout(3):
        with pytest.raises(fz.AddressError) as info:
            await fz.connect(address, settings=PATIENT)
    message = str(info.value)
    why, _, forms = message.partition("; a right address looks like")
    assert what in why
    assert repr(address) in why  # names the address it refuses
    for example in ("tcp://host:port", "ipc://path", "inproc://name"):  # and what a right one looks like
        assert example in forms


def test_a_missing_scheme_suggests_the_tcp_address():
    with pytest.raises(fz.AddressError, match="'tcp://127.0.0.1:5555'"):
        check_address("127.0.0.1:5555")


@pytest.mark.parametrize("address", ["tcp://127.0.0.1:5555", "tcp://localhost:1", "tcp://[::1]:65535",
                                     "tcp://worker-3.example.org:6000", "tcp://fl_worker_1:6000",
                                     "tcp://127.0.0.1:0;127.0.0.1:6000", "ipc:///tmp/fedzmq.sock", "inproc://bob"])
def test_right_addresses_pass_the_check(address):
    assert check_address(address) == address


async def test_an_unresolvable_host_fails_at_once():
    async with asyncio.timeout(3):
        with pytest.raises(fz.AddressError, match="no-such-host.invalid") as info:
            await fz.connect("tcp://no-such-host.invalid:5555", settings=PATIENT)
    assert "resolve" in str(info.value)


async def test_every_way_to_name_an_address_checks_it():
    async with asyncio.timeout(3):
        with pytest.raises(fz.AddressError):
            fz.RemoteWorker("127.0.0.1:5555")
        with pytest.raises(fz.AddressError):
            async with fz.connect("localhost:5555", settings=PATIENT):
                pass
        with pytest.raises(fz.AddressError):
            await fz.connect_clients("127.0.0.1:5555", settings=PATIENT)
        with pytest.raises(fz.AddressError, match="resolve"):
            async with fz.RemoteWorker("tcp://no-such-host.invalid:5555", settings=PATIENT):
                pass
        with pytest.raises(fz.AddressError, match="resolve"):
            await fz.connect_clients("tcp://no-such-host.invalid:5555", settings=PATIENT)
        with pytest.raises(fz.AddressError, match="resolve"):
            await fz.RemoteWorker("tcp://no-such-host.invalid:5555", settings=PATIENT).connect()


async def test_a_hostname_address_reaches_a_real_daemon(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    port = bob.address.rsplit(":", 1)[1]
    async with fz.connect(f"tcp://localhost:{port}") as worker:
        assert worker.id == "bob"
        assert torch.equal(await (await worker.send(torch.ones(2))).get(), torch.ones(2))


@pytest.mark.parametrize("address,what", [("127.0.0.1:5555", "no transport"),
                                          ("tcp://no-such-host.invalid:5555", "resolve")])
def test_the_cli_reports_a_wrong_worker_address_in_one_line(address, what, tmp_path, capsys):
    from fedzmq.cli import main

    rc = main(["train", "--worker", address, "--dataset", "toy", "--in-features", "4", "--classes", "2",
               "--out", str(tmp_path / "run")])
    err = capsys.readouterr().err
    assert rc == 2
    assert what in err and "Traceback" not in err
