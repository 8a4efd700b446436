"""Big objects and long work (issue 8): streams past 2 GiB in bounded memory, breaks mid-stream, long fits."""

import asyncio
import gc
import json
import random
import subprocess
import sys
import time

import pytest
import torch

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings
from fedzmq.client.transfers import LANDING_THREADS, STREAM_PIECE_BYTES, STREAM_WINDOW
from fedzmq.examples import digits
from fedzmq.launcher import DaemonProcess
from fedzmq.worker.handlers.tensors import byte_range

GIB = 1 << 30

CLIENT_SIDE = r"""
import asyncio, json, sys, torch
import fedzmq as fz
from fedzmq.worker.server import peak_rss_bytes

def rss():
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

async def main(address, nbytes):
    x = torch.arange(nbytes // 8, dtype=torch.int64)            # the object: more than 2**31 bytes
    baseline = rss()
    open("/proc/self/clear_refs", "w").write("5")                # reset the peak to what we hold now
    async with fz.connect(address) as worker:
        before = await worker.status()
        ptr = await worker.send(x)
        view = ptr.reshape(-1)                                   # an op on the worker (a view: no copy)
        back = await view.get()
        after = await worker.status()
        exact = bool(torch.equal(back, x))
        del back
    print(json.dumps({"exact": exact, "client_baseline": baseline, "client_peak": peak_rss_bytes(),
                      "daemon_before": before["rss_bytes"], "daemon_peak": after["peak_rss_bytes"]}))

asyncio.run(main(sys.argv[1], int(sys.argv[2])))
"""


@pytest.mark.timeout(600)
def test_tensor_over_two_gib_round_trips_bit_exact_in_bounded_memory(tmp_path):
    nbytes = (1 << 31) + (1 << 20)
    daemon = DaemonProcess("big", log_dir=tmp_path)
    daemon.start()
    try:
        result = subprocess.run([sys.executable, "-c", CLIENT_SIDE, daemon.address, str(nbytes)],
                                capture_output=True, text=True, timeout=540)
        assert result.returncode == 0, result.stderr[-3000:]
        report = json.loads(result.stdout.strip().splitlines()[-1])
    finally:
        assert daemon.stop() == 0, daemon.log_tail()
    assert report["exact"]
    in_flight = (STREAM_WINDOW + LANDING_THREADS) * STREAM_PIECE_BYTES  # the window, and pieces being copied
    slack = 300 << 20           # interpreter, ZeroMQ and kernel buffers
    client_extra = report["client_peak"] - report["client_baseline"]
    daemon_extra = report["daemon_peak"] - report["daemon_before"]
    print(f"\nclient: +{client_extra / GIB:.2f} GiB over its baseline; daemon: +{daemon_extra / GIB:.2f} GiB; "
          f"object {nbytes / GIB:.2f} GiB")
    assert client_extra <= nbytes + in_flight + slack  # the copy it got back, plus chunks in flight
    assert daemon_extra <= nbytes + in_flight + slack  # the copy it holds, plus chunks in flight


def _rss() -> int:
    with open("/proc/self/statm") as f:
        import os
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


@pytest.mark.timeout(300)
async def test_daemon_killed_mid_transfer_gives_a_clear_error_and_leaves_nothing_behind(fedzmq_daemons):
    [bob] = await fedzmq_daemons("bob")
    big = torch.ones(GIB // 4, dtype=torch.float32)  # 1 GiB
    gc.collect()
    baseline = _rss()

    async def kill_soon():
        await asyncio.sleep(0.3)
        bob.kill()

    killer = asyncio.create_task(kill_soon())
    with pytest.raises(fz.WorkerError) as info:
        ptr = await bob.worker.send(big)
        await ptr.get()
    await killer
    assert isinstance(info.value, (fz.WorkerDeadError, fz.RequestTimeout)), info.value
    assert "silent" in str(info.value) or "no reply" in str(info.value)

    worker = await bob.restart()
    status = await worker.status()
    assert status["objects"] == 0 and status["sessions"] == 1  # the new instance holds no partial object
    gc.collect()
    await asyncio.sleep(0.2)
    assert _rss() < baseline + (256 << 20), "the coordinator kept memory of the broken stream"


async def test_model_bigger_than_a_chunk_streams_both_ways(fedzmq_virtual_workers):
    from torch import nn

    limits = fz.Limits(chunk_bytes=1 << 16)
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits),
                                settings=ConnectionSettings(limits=limits)) as bob:
        model = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))  # 240 kB of weights
        remote = await bob.send(model)
        x = torch.randn(4, 300)
        assert torch.allclose(await remote(await bob.send(x)).get(), model(x), atol=1e-6)
        copy = nn.Sequential(nn.Linear(300, 200), nn.ReLU(), nn.Linear(200, 10))
        copy.load_state_dict(model.state_dict())
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        assert await bob.send(model) is remote  # updated in place by streamed writes
        got = await remote.get()
        fz.testing.assert_state_dicts_close(got, {k: v + 1 for k, v in copy.state_dict().items()}, atol=1e-6)


async def test_a_view_bigger_than_a_chunk_streams_out_bit_exact():
    """A transposed, strided view streams out piece by piece in row-major order; pieces do not line up
    with rows or elements (the worker copies each piece's range, not the whole view per piece)."""
    limits = fz.Limits(chunk_bytes=1 << 16)
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits),
                                settings=ConnectionSettings(limits=limits)) as bob:
        tensor = torch.randn(301, 207, dtype=torch.float64)  # 498 kB: eight 64 kB pieces
        remote = await bob.send(tensor)
        assert torch.equal(await remote.t().get(), tensor.t())
        assert torch.equal(await remote[:, ::3].transpose(0, 1).get(), tensor[:, ::3].transpose(0, 1))


def test_byte_range_matches_the_contiguous_bytes_of_any_view():
    """The worker's ``read`` of a byte range (``byte_range``) against the bytes of ``contiguous()``, for
    views of random shapes, strides and dtypes and random ranges. A piece of a view is a copy of the
    range alone: it was a slice of a copy of the whole rows it spans (up to three times the range), and
    a reply's frame keeps its storage alive while charged its own bytes (a red team's 12 unread 10 MiB
    reads of a transposed 30 MiB tensor held 120 MiB more than charged, under a 32 MiB quota)."""
    rng = random.Random(0)
    for _ in range(400):
        dims = [rng.randint(0 if rng.random() < 0.05 else 1, 6) for _ in range(rng.randint(1, 4))]
        tensor = (torch.randn(dims) * 100).to(rng.choice([torch.float32, torch.uint8, torch.float64, torch.int16]))
        if tensor.dim() > 1 and rng.random() < 0.7:
            tensor = tensor.transpose(0, -1)
        if tensor.shape[-1] > 1 and rng.random() < 0.3:
            tensor = tensor[..., ::2]
        expected = bytes(tensor.numpy().tobytes())  # C order, like contiguous()
        for _ in range(8):
            offset = rng.randint(0, len(expected))
            length = rng.randint(0, len(expected) - offset)
            piece = byte_range(tensor, offset, length)
            assert bytes(piece.numpy()) == expected[offset:offset + length]
            if not tensor.is_contiguous():  # a copy of the range: no more memory than it (and two elements)
                assert piece.untyped_storage().nbytes() <= length + 2 * tensor.element_size()


async def test_streams_move_pieces_of_at_most_stream_piece_bytes():
    """A tensor over one message streams in STREAM_PIECE_BYTES pieces (not in chunk_bytes ones), so the
    receiver's allocator can reuse the pieces' memory: 40 MiB is alloc + 3 writes, get + 3 reads."""
    limits = fz.Limits(chunk_bytes=32 << 20)
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits)) as bob:
        tensor = torch.arange((40 << 20) // 4, dtype=torch.float32)
        before = (await bob.status())["requests"]
        ptr = await bob.send(tensor)
        sent = (await bob.status())["requests"]
        back = await ptr.get()
        got = (await bob.status())["requests"]
        assert torch.equal(back, tensor)
        pieces = -(-tensor.numel() * 4 // STREAM_PIECE_BYTES)
        assert (sent - before - 1, got - sent - 1) == (1 + pieces, 1 + pieces)  # (-1: the status call itself)


def _long_fit_args():
    return {"optimizer": {"cls": "SGD", "lr": 0.01}, "epochs": 400, "batch_size": 16}


# two fits of 400 epochs: 37 s in a full run beside two CPU hogs, past 120 s (the suite's bound) when run
# alone at load 15 (h42); a bound on liveness, not a speed claim
@pytest.mark.timeout(600)
async def test_fit_longer_than_idle_timeout_and_heartbeats_succeeds(fedzmq_daemons, tmp_path):
    split = digits.prepare(tmp_path, ["bob"], alpha=1.0)
    [bob] = await fedzmq_daemons("bob", datasets={"bob": {"digits": str(split.shards["bob"])}},
                                 args=["--session-timeout", "1.5"])
    # this client's heartbeats are rarer than the daemon's idle timeout: only "a command is running"
    # keeps its session (and its model) alive during the fit (1.5 s, not 0.5: a loaded host's stall
    # between two of the test's commands freed the model, h39)
    settings = ConnectionSettings(heartbeat_interval=5.0, heartbeat_liveness=30)
    async with fz.connect(bob.address, settings=settings) as worker:
        model = digits.make_model()
        remote = await worker.send(model)
        started = time.monotonic()
        metrics = await remote.fit("digits", **_long_fit_args())
        took = time.monotonic() - started
        # a precondition, not a speed claim: a slow host only makes it truer
        assert took > 2.0, f"the fit took {took:.1f}s: too short to test anything"
        assert metrics["steps"] > 1000
        await remote.get()  # the model is still there
    # and with fast heartbeats the daemon answers them all through the fit: never declared dead (2 s of
    # silence, the kit's before h42: a fit that held the daemon's loop would outlast it; 0.5 s was a loaded host's
    # descheduling, h39)
    fast = ConnectionSettings(heartbeat_interval=0.25, heartbeat_liveness=8)
    async with fz.connect(bob.address, settings=fast) as worker:
        model = digits.make_model()
        remote = await worker.send(model)
        await remote.fit("digits", **_long_fit_args())
        assert worker.alive


async def test_daemon_stopped_mid_fit_is_declared_dead_within_missed_heartbeats(fedzmq_daemons, tmp_path):
    split = digits.prepare(tmp_path, ["bob"], alpha=1.0)
    [bob] = await fedzmq_daemons("bob", datasets={"bob": {"digits": str(split.shards["bob"])}})
    settings = ConnectionSettings(heartbeat_interval=0.2, heartbeat_liveness=5)  # dead after 1 s of silence
    async with fz.connect(bob.address, settings=settings) as worker:
        model = digits.make_model()
        remote = await worker.send(model)
        fit = asyncio.ensure_future(remote.fit("digits", **_long_fit_args()))
        await asyncio.sleep(0.5)
        assert not fit.done()
        bob.stop()
        # declared dead after 1 s of silence (liveness x interval): never declared fails by TimeoutError at 30 s;
        # no clock assert, so a busy host that notices it late does not fail the test
        with pytest.raises(fz.WorkerDeadError):
            await asyncio.wait_for(fit, 30)
        bob.cont()
