"""Work a command did, or memory it kept, before the quota or the time limit saw it: escapes an eleventh
red team found in the worker daemon (6 Dec 2026), each written as the attack against a real daemon. A
command's work and memory are sized before it runs (docs/security.md, "One quota sum"); these were not,
or were kept where no quota charged them."""

import time

import pytest
import torch

import fedzmq as fz
from test_adversarial import put_module

pytestmark = pytest.mark.timeout(120)


async def test_a_secure_steps_masking_is_sized_before_it_runs(fedzmq_daemons):
    """``masked_input`` clips, noises, quantizes and masks the whole model (``secagg.encoding.encode`` and a
    PRG mask per peer), and its budget was checked only between peers: a 32M-parameter model ran 1.39 s
    under a 0.25 s limit, holding a torch thread. The step's work is now sized before it runs: refused at
    once, with the sizing's words, well within the limit."""
    from fedzmq.secagg import SecAggClient, SecAggConfig

    limit, elements = 0.5, 48 << 20  # a float32 buffer of 192 MiB: about 2 s of masking with DP noise here
    [host] = await fedzmq_daemons("owner", args=["--max-command-seconds", str(limit),
                                                 "--max-session-bytes", str(4 << 30)])
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
    started = time.monotonic()
    with pytest.raises(fz.LimitExceeded, match="would take about"):  # (before: "ran longer than", after 2 s)
        await worker.secagg("masked_input", 0, routed, module=model)
    assert time.monotonic() - started < 3 * limit
