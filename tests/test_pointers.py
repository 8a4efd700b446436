"""Every command through the client API, on in-process workers (the daemon's own code over inproc)."""

import asyncio
import gc

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fedzmq as fz
from fedzmq.client.connection import ConnectionSettings



async def test_send_and_get_round_trip_a_tensor(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    x = torch.randn(3, 4)
    ptr = await bob.send(x)
    assert isinstance(ptr, fz.TensorPointer) and ptr.location is bob
    assert torch.equal(await ptr.get(), x)


async def test_get_on_inproc_does_not_alias_the_remote_value(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    x = torch.zeros(100_000)
    ptr = await bob.send(x)
    x += 1  # changing the local tensor after sending must not change the remote copy
    got = await ptr.get()
    assert got.sum().item() == 0
    got += 5
    assert (await ptr.get()).sum().item() == 0


async def test_operators_and_methods_are_pipelined_and_match_torch(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    a, b = torch.randn(4, 3), torch.randn(4, 3)
    pa, pb = await bob.send(a), await bob.send(b)
    cases = {
        "arith": (((pa + pb) * 2 - 1) / 3, ((a + b) * 2 - 1) / 3),
        "reverse": (1 - pa, 1 - a),
        "pow": ((pa - pb) ** 2, (a - b) ** 2),
        "neg_abs": (abs(-pa), abs(-a)),
        "matmul": (pa @ pb.t(), a @ b.t()),
        "sum_dim": (pa.sum(dim=1), a.sum(dim=1)),
        "mean": (pa.mean(), a.mean()),
        "amax": (pa.amax(dim=0), a.amax(dim=0)),
        "slice": (pa[1:3, 0], a[1:3, 0]),
        "ellipsis": (pa[..., -1], a[..., -1]),
        "reshape": (pa.reshape(2, 6).transpose(0, 1).flatten(), a.reshape(2, 6).transpose(0, 1).flatten()),
        "view_permute": (pa.view(2, 2, 3).permute(2, 0, 1), a.view(2, 2, 3).permute(2, 0, 1)),
        "squeeze": (pa.unsqueeze(0).squeeze(0), a),
        "compare": (pa > pb, a > b),
        "activations": (pa.relu() + pa.sigmoid() + pa.tanh() + pa.exp(), a.relu() + a.sigmoid() + a.tanh() + a.exp()),
        "softmax": (pa.softmax(dim=1) + pa.log_softmax(dim=1), a.softmax(dim=1) + a.log_softmax(dim=1)),
        "log": (pa.abs().log(), a.abs().log()),
        "clone_detach": (pa.clone().detach(), a),
    }
    for name, (pointer, expected) in cases.items():
        assert isinstance(pointer, fz.TensorPointer), name
        assert torch.allclose(await pointer.get(), expected), name


async def test_max_over_a_dim_returns_values_and_indices(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    a = torch.randn(5, 3)
    values, indices = (await bob.send(a)).max(dim=1)
    expected = a.max(dim=1)
    assert torch.equal(await values.get(), expected.values)
    assert torch.equal(await indices.get(), expected.indices)


async def test_cat_stack_and_losses(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    logits, labels = torch.randn(6, 4), torch.tensor([0, 1, 2, 3, 0, 1])
    pl, py = await bob.send(logits), await bob.send(labels)
    cat = bob.run_op("cat", [[pl, pl]], {"dim": 0})
    assert torch.equal(await cat.get(), torch.cat([logits, logits]))
    stack = bob.run_op("stack", [[pl, pl]], {})
    assert torch.equal(await stack.get(), torch.stack([logits, logits]))
    for name, expected in {
        "cross_entropy": F.cross_entropy(logits, labels),
        "nll_loss": F.nll_loss(logits.log_softmax(1), labels),
    }.items():
        arg = pl.log_softmax(dim=1) if name == "nll_loss" else pl
        assert torch.allclose(await bob.run_op(name, [arg, py], {}).get(), expected)
    probs, targets = torch.rand(5), torch.randint(0, 2, (5,)).float()
    pp, pt = await bob.send(probs), await bob.send(targets)
    assert torch.allclose(await bob.run_op("mse_loss", [pp, pt], {}).get(), F.mse_loss(probs, targets))
    assert torch.allclose(await bob.run_op("l1_loss", [pp, pt], {}).get(), F.l1_loss(probs, targets))
    assert torch.allclose(await bob.run_op("binary_cross_entropy", [pp, pt], {}).get(),
                          F.binary_cross_entropy(probs, targets))
    assert torch.allclose(await bob.run_op("binary_cross_entropy_with_logits", [pp, pt], {}).get(),
                          F.binary_cross_entropy_with_logits(probs, targets))


async def test_remote_shape_mismatch_raises_locally_with_remote_traceback(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    a = await bob.send(torch.ones(2, 3))
    bad = a @ a  # returns at once: the error shows when the value is awaited
    with pytest.raises(RuntimeError) as info:
        await bad
    error = info.value
    assert isinstance(error, fz.RemoteError)
    assert error.remote_type == "RuntimeError"
    assert "must have same reduction dim" in error.remote_message
    assert "Traceback" in error.remote_traceback and ", in op\n" in error.remote_traceback
    # a later use of the failed value reports the first failure, under its type
    with pytest.raises(RuntimeError, match="never made"):
        await (bad + 1).get()
    # and the session carries on
    assert torch.equal(await (a + 1).get(), torch.full((2, 3), 2.0))


async def test_unknown_object_and_unknown_op_are_specific_errors(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    with pytest.raises(fz.ObjectNotFound):
        await bob.request("get", {"obj": 424242})
    a = await bob.send(torch.ones(2))
    with pytest.raises(fz.UnknownCommand):
        await bob.run_op("system", [a], {})


async def test_a_request_the_worker_cannot_decode_is_a_protocol_error_from_the_remote(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    with pytest.raises(fz.ProtocolError) as info:
        await bob.request("read", {"obj": 1})  # missing offset and length: refused by the decoder
    assert isinstance(info.value, fz.RemoteError) and info.value.remote_type == "ProtocolError"
    assert "offset" in info.value.remote_message
    assert (await bob.ping())  # the session goes on


async def test_mixing_pointers_of_two_workers_fails_before_sending(fedzmq_virtual_workers):
    bob, alice = await fedzmq_virtual_workers("bob", "alice")
    a, b = await bob.send(torch.ones(2)), await alice.send(torch.ones(2))
    sent_before = bob.bytes_sent
    with pytest.raises(fz.WrongWorkerError, match="alice"):
        a + b
    assert bob.bytes_sent == sent_before


async def test_backward_computes_remote_gradients(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    model = nn.Linear(3, 1)
    x, y = torch.randn(4, 3), torch.randn(4, 1)
    remote = await bob.send(model)
    loss = ((remote(await bob.send(x)) - await bob.send(y)) ** 2).mean()
    await loss.backward()
    # gradients are on the worker; compare through an SGD step with lr=1 (new weight = w - grad)
    reference = nn.Linear(3, 1)
    reference.load_state_dict(model.state_dict())
    F.mse_loss(reference(x), y).backward()
    opt = fz.Optims([bob], optim=torch.optim.SGD(model.parameters(), lr=1.0)).get_optim(bob)
    await opt.step()
    await remote.get()
    with torch.no_grad():
        for p, r in zip(model.parameters(), reference.parameters()):
            assert torch.allclose(p, r - r.grad, atol=1e-6)


@pytest.mark.parametrize("name,kwargs", [
    ("SGD", {"lr": 0.1, "momentum": 0.9, "nesterov": True}),
    ("Adam", {"lr": 0.05, "betas": (0.8, 0.99), "weight_decay": 0.01}),
    ("AdamW", {"lr": 0.05, "amsgrad": True}),
    ("RMSprop", {"lr": 0.01, "alpha": 0.9, "centered": True}),
    ("Adagrad", {"lr": 0.1, "lr_decay": 0.01}),
])
async def test_remote_optimizers_match_local_ones_step_for_step(fedzmq_virtual_workers, name, kwargs):
    [bob] = await fedzmq_virtual_workers("bob")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    reference = nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 1))
    reference.load_state_dict(model.state_dict())
    cls = getattr(torch.optim, name)
    local_opt = cls(reference.parameters(), **kwargs)
    remote_opt = fz.Optims([bob], optim=cls(model.parameters(), **kwargs)).get_optim("bob")
    x, y = torch.randn(8, 3), torch.randn(8, 1)
    px, py = await bob.send(x), await bob.send(y)
    for _ in range(5):
        remote = await bob.send(model)
        await remote_opt.zero_grad()
        await ((remote(px) - py) ** 2).mean().backward()
        await remote_opt.step()
        await remote.get()
        local_opt.zero_grad()
        ((reference(x) - y) ** 2).mean().backward()
        local_opt.step()
    fz.testing.assert_state_dicts_close(model, reference, atol=1e-6)


async def test_sending_a_model_again_updates_the_remote_copy_in_place(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    model = nn.Linear(2, 1)
    first = await bob.send(model)
    with torch.no_grad():
        model.weight.fill_(3.0)
    second = await bob.send(model)
    assert second is first
    out = first(await bob.send(torch.ones(1, 2)))
    assert torch.allclose(await out.get(), torch.tensor([[6.0]]) + model.bias)


async def test_module_train_eval_mode_reaches_the_worker(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    model = nn.Sequential(nn.Dropout(0.5))
    remote = await bob.send(model)
    x = await bob.send(torch.ones(1000))
    await remote.eval()
    assert torch.equal(await remote(x).get(), torch.ones(1000))
    await remote.train()
    assert (await remote(x).get() == 0).any()


async def test_model_that_cannot_be_described_gets_a_clear_error(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")

    class Branchy(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return self.fc(x) if x.sum() > 0 else x

    with pytest.raises(fz.ModelDescriptionError, match="register"):
        await bob.send(Branchy())

    class UsesUnknownFunction(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(2, 2)

        def forward(self, x):
            return torch.cumsum(self.fc(x), 0)

    with pytest.raises(fz.ModelDescriptionError, match="cumsum"):
        await bob.send(UsesUnknownFunction())


class RegisteredNet(nn.Module):
    fedzmq_name = "registered-net"

    def __init__(self, width: int = 3):
        super().__init__()
        self.fedzmq_kwargs = {"width": width}
        self.fc = nn.Linear(2, width)

    def forward(self, x):
        return self.fc(x).cumsum(0)  # not describable: must be registered on the worker


async def test_registered_model_is_built_from_the_workers_own_class():
    model = RegisteredNet(width=4)
    x = torch.randn(3, 2)
    async with fz.VirtualWorker("bob", models={"registered-net": RegisteredNet}) as bob:
        remote = await bob.send(model)
        assert torch.allclose(await remote(await bob.send(x)).get(), model(x))
    async with fz.VirtualWorker("carol") as carol:
        with pytest.raises(fz.BadRequest, match="not registered"):
            await carol.send(model)


async def test_garbage_collected_pointers_are_deleted_remotely(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    baseline = (await bob.status())["objects"]
    x = await bob.send(torch.ones(10))
    pointers = [x + i for i in range(50)]
    await pointers[-1]
    assert (await bob.status())["objects"] == baseline + 51
    sent = bob._connection.bytes_sent
    del pointers, x
    gc.collect()
    await asyncio.sleep(0.1)  # deletes of collected pointers go out in one batch, a moment later
    assert bob._connection.bytes_sent - sent < 2000  # one small message, not 51
    await (await bob.send(torch.ones(1))).delete()  # a round trip through the session queue, after it
    assert (await bob.status())["objects"] == baseline


async def test_explicit_delete_frees_the_object(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    ptr = await bob.send(torch.ones(3))
    await ptr.delete()
    with pytest.raises(ValueError, match="deleted"):
        ptr + 1


async def test_status_reports_objects_bytes_and_sessions(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    await bob.send(torch.ones(1000, dtype=torch.float64))
    status = await bob.status()
    assert status["id"] == "bob" and status["protocol"] == 1
    assert status["sessions"] == 1 and status["objects"] == 1 and status["bytes"] >= 8000
    assert status["uptime"] >= 0


async def test_big_tensor_streams_in_chunks_both_ways():
    limits = fz.Limits(chunk_bytes=1 << 16)
    settings = ConnectionSettings(limits=limits)
    async with fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits), settings=settings) as bob:
        x = torch.randn(100_003)  # about 6 chunks, the last one partial
        ptr = await bob.send(x)
        assert torch.equal(await ptr.get(), x)
        assert torch.equal(await (ptr * 2).get(), x * 2)


async def test_sessions_are_isolated_from_each_other():
    async with fz.VirtualWorker("bob") as bob:
        mine = await bob.send(torch.ones(3))
        async with fz.connect(bob.address) as other:
            with pytest.raises(fz.ObjectNotFound):
                await other.request("get", {"obj": mine.id})
            await other.request("delete", {"objs": [mine.id]})
            assert (await other.status())["sessions"] == 2
        assert torch.equal(await mine.get(), torch.ones(3))


async def test_closing_a_session_frees_its_objects():
    async with fz.VirtualWorker("bob") as bob:
        other = await fz.connect(bob.address)
        await other.send(torch.ones(100))
        assert (await bob.status())["objects"] == 1
        await other.close()
        status = await bob.status()
        assert status["objects"] == 0 and status["sessions_closed"] == 1


async def test_idle_session_expires_and_frees_objects():
    # 3 s of silence, not 0.3: a loaded host that descheduled this process for 0.5 s between the send and
    # the first count freed the object before it was counted (h42)
    config = fz.WorkerConfig(session_timeout=3.0)
    async with fz.VirtualWorker("bob", config=config) as bob:
        silent = fz.RemoteWorker(bob.address, settings=ConnectionSettings(heartbeat_interval=30.0))
        await silent.connect()
        kept = await silent.send(torch.ones(100))  # held: a dropped pointer's delete would free it, not the expiry
        assert (await bob.status())["objects"] == 1
        async with asyncio.timeout(60):  # bob's own session heartbeats (every 1 s); the silent one does not
            while (status := await bob.status())["objects"]:
                await asyncio.sleep(0.1)
        assert status["sessions_expired"] >= 1
        del kept
        await silent.close_connection(say_goodbye=False)


async def test_pipelined_commands_of_a_session_run_in_order(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    x = await bob.send(torch.zeros(1))
    chain = x
    for _ in range(200):
        chain = chain + 1
    assert (await chain.get()).item() == 200.0


async def test_fit_with_a_remote_optimizer_keeps_its_state_across_calls():
    from fedzmq.worker.datasets import Dataset

    x = torch.randn(64, 3)
    y = (x[:, 0] > 0).long()
    async with fz.VirtualWorker("bob", datasets={"d": Dataset("d", x, y)}) as bob:
        torch.manual_seed(0)
        model = nn.Linear(3, 2)
        reference = nn.Linear(3, 2)
        reference.load_state_dict(model.state_dict())
        remote = await bob.send(model)
        opt = fz.Optims([bob], optim=torch.optim.Adam(model.parameters(), lr=0.05)).get_optim(bob)
        for _ in range(2):  # Adam's moments carry over from the first call to the second
            await remote.fit("d", optimizer=opt, steps=1, batch_size=64)
        await remote.get()
        local_opt = torch.optim.Adam(reference.parameters(), lr=0.05)
        for _ in range(2):
            local_opt.zero_grad()
            F.cross_entropy(reference(x), y).backward()
            local_opt.step()
        fz.testing.assert_state_dicts_close(model, reference, atol=1e-6)
