"""Work a command did, or memory it kept, before the quota or the time limit saw it: escapes an eleventh
red team found in the worker daemon (6 Dec 2026), each written as the attack against a real daemon. A
command's work and memory are sized before it runs (docs/security.md, "One quota sum"); these were not,
or were kept where no quota charged them."""


import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.codec import Ref
from fedzmq.modeldesc import describe
from test_adversarial import protected_args, put_module

pytestmark = pytest.mark.timeout(120)


async def test_a_secure_steps_masking_is_sized_before_it_runs(fedzmq_daemons):
    """``masked_input`` clips, noises, quantizes and masks the whole model (``secagg.encoding.encode`` and a
    PRG mask per peer), and its budget was checked only between peers: a 32M-parameter model ran 1.39 s
    under a 0.25 s limit, holding a torch thread. The step's work is now sized before it runs: refused at
    once, with the sizing's words, well within the limit."""
    from fedzmq.secagg import SecAggClient, SecAggConfig

    limit, elements = 0.5, 48 << 20  # a float32 buffer of 192 MiB: about 2 s of masking with DP noise here
    # 192 MiB each way on a loaded host kept the daemon silent past the kit's 2 s of heartbeats (h40 saw
    # WorkerDeadError): this client waits 10 s
    patient = fz.ConnectionSettings(heartbeat_interval=0.5, heartbeat_liveness=20, connect_timeout=30.0)
    [host] = await fedzmq_daemons("owner", args=["--max-command-seconds", str(limit),
                                                 "--max-session-bytes", str(4 << 30)], settings=patient)
    worker = host.worker
    spec = {"kind": "container", "children": [], "params": [], "buffers": [["b", [elements], "float32"]]}
    model = await put_module(worker, spec, {"b": torch.randn(elements, generator=torch.Generator().manual_seed(0))})
    config = SecAggConfig(client_ids=(0, 1, 2), threshold=2, vector_length=elements, clip=1.0, noise_multiplier=1.0)
    peers = {i: SecAggClient(i, config) for i in (1, 2)}  # the coordinator plays the other two clients
    advertised = {0: await worker.secagg("advertise", 0, config.to_wire(), module=model, client=0)}
    advertised |= {i: peer.advertise() for i, peer in peers.items()}
    keys = {"v": 2, "type": "secagg.keys",
            "keys": [[j, bytes(a["c_pk"]), bytes(a["s_pk"])] for j, a in sorted(advertised.items())]}
    shares = {0: await worker.secagg("share_keys", 0, keys)} | {i: p.share_keys(keys) for i, p in peers.items()}
    sealed = {(m["from"], j): ct for m in shares.values() for j, ct in m["shares"]}
    routed = {"v": 2, "type": "secagg.routed", "to": 0, "u1": [0, 1, 2], "shares": [[j, sealed[j, 0]] for j in (1, 2)]}
    # refused by its sizing, before it runs (before: "ran longer than", after 2 s of masking)
    with pytest.raises(fz.LimitExceeded, match="would take about"):
        await worker.secagg("masked_input", 0, routed, module=model)


def test_a_maskings_long_loops_reach_the_checkpoint_at_every_block():
    """Beside the sizing (which rests on constants measured on one machine), a masking stops where it runs
    long: ``encode`` and each PRG mask call the client's checkpoint (the worker's ``budget.check``) every
    block, not only between peers, where a 32M-value masking first reached it after 1.2 s. A step stopped
    there leaves the client as it was, so it can be asked again."""
    from fedzmq.secagg import SecAggClient, SecAggConfig
    from fedzmq.secagg.server import SecAggServer

    class Stopped(Exception):
        pass

    calls, allowed = [], [10 ** 9]

    def checkpoint() -> None:
        calls.append(None)
        if len(calls) > allowed[0]:
            raise Stopped

    length = 1 << 20  # 16 blocks of the encoding and of each of the three masks
    config = SecAggConfig(client_ids=(0, 1, 2), threshold=2, vector_length=length, clip=1.0, noise_multiplier=1.0)
    clients = {0: SecAggClient(0, config, checkpoint=checkpoint), 1: SecAggClient(1, config),
               2: SecAggClient(2, config)}
    server = SecAggServer(config)
    for client in clients.values():
        server.add_advertise(client.advertise())
    server.end_advertise()
    for i, client in clients.items():
        server.add_shares(client.share_keys(server.keys_for(i)))
    routed = server.end_shares()
    update = torch.randn(length, generator=torch.Generator().manual_seed(0))
    calls.clear()
    allowed[0] = 8  # past the 6 calls between peers (two shares, two seeds, two masks): inside the long loops
    with pytest.raises(Stopped):
        clients[0].masked_input(update, 1.0, routed[0])
    assert clients[0].stage == "shared"
    allowed[0], calls[:] = 10 ** 9, []
    clients[0].masked_input(update, 1.0, routed[0])
    assert clients[0].stage == "masked" and len(calls) >= 4 * 16


class Echo(nn.Module):
    """A forward that returns its own weight ``times`` times."""

    def __init__(self, numel: int, times: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(numel))
        self.times = times

    def forward(self, x):
        return (self.w,) * self.times


async def test_a_forwards_copies_of_its_parameters_are_sized_before_they_are_made(fedzmq_daemons):
    """``module_call`` copies each output that is one of the model's parameters (a stored tensor must not
    change under its pointer when a step changes the weight in place), after the forward was sized on the
    meta device, where returning a parameter makes nothing: a 32 MiB weight returned 64 times made 2 GiB
    under a 256 MiB quota before the quota saw them. The copies are now sized with the forward."""
    quota, numel, times = 64 << 20, 2 << 20, 64  # an 8 MiB weight, 512 MiB of copies
    [host] = await fedzmq_daemons("owner", args=["--max-session-bytes", str(quota)])
    worker = host.worker
    x = await worker.send(torch.zeros(1))
    model = await put_module(worker, describe(Echo(numel, times)), {"w": torch.zeros(numel)})
    before = await worker.status()
    with pytest.raises(fz.LimitExceeded, match="quota"):
        await worker.request("module_call", {"obj": model, "args": [Ref(x.id)], "kwargs": {},
                                             "out": [worker.new_id() for _ in range(times)]})
    grown = (await worker.status())["peak_rss_bytes"] - max(before["peak_rss_bytes"], before["rss_bytes"])
    assert grown < quota, f"a refused forward made {grown >> 20} MiB"  # (before: 512 MiB)
    # within the quota such a forward runs as before: each output its own copy, not the weight
    twice = await put_module(worker, describe(Echo(numel, 2)), {"w": torch.zeros(numel)})
    outs = [worker.new_id(), worker.new_id()]
    await worker.request("module_call", {"obj": twice, "args": [Ref(x.id)], "kwargs": {}, "out": outs})
    assert (await worker.status())["bytes"] - before["bytes"] >= 3 * 4 * numel  # the weight and two copies


async def test_a_refused_fit_keeps_nothing_of_its_request(fedzmq_daemons, secret_rows):
    """A fit of given steps records what decides its cost on its model (``small_fit``: whether the next
    such fit may run on the event loop), in a ``finally``, even when its handler refuses it. That record
    was the repr of its arguments: an optimizer hyper-parameter SGD does not take, 4 MB of NULs, kept
    16 MB on each model, uncharged (24 models: 451 MiB under a 16 MiB quota). It is now a digest."""
    _, _, path = secret_rows
    quota, models, pad = 16 << 20, 24, (4 << 20) - 4096
    [host] = await fedzmq_daemons("owner", args=protected_args(path, "--max-session-bytes", str(quota)))
    worker = host.worker
    spec = describe(nn.Linear(8, 10))
    state = {"weight": torch.zeros(10, 8), "bias": torch.zeros(10)}
    before = await worker.status()
    for _ in range(models):
        model = await put_module(worker, spec, state)
        with pytest.raises(fz.BadRequest, match="pad"):
            await worker.request("fit", {"module": model, "dataset": "rows", "loss": "cross_entropy",
                                         "batch_size": 16, "steps": 1,
                                         "optimizer": {"cls": "SGD", "lr": 0.1, "pad": "\0" * pad}})
    grown = (await worker.status())["rss_bytes"] - before["rss_bytes"]
    # (before: 16 MB a model, 451 MiB. Handling 24 requests of 4 MB leaves 35-75 MiB in malloc's arenas,
    # however many more follow; with a 10-byte pad, 4 MiB)
    assert grown < 8 * quota, f"{models} refused fits grew the daemon by {grown >> 20} MiB"
