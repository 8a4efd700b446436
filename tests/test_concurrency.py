"""Coroutines interleave on one thread, and torch's grad mode (like inference mode and autocast) is per
thread: no fedzmq code may hold such a mode across an ``await``. Concurrent pointer code must give
exactly the results of the same code run one worker after the other, and leave the modes as it found
them, on in-process workers and on real daemons alike."""

import asyncio
import time
from typing import Any

import pytest
import torch
from torch import nn, optim

import fedzmq as fz
from fedzmq.worker.datasets import Dataset

WORKERS = ("bob", "alice", "carol")


def _models(count: int) -> list[nn.Module]:
    torch.manual_seed(0)
    template = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
    models = []
    for _ in range(count):
        model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 1))
        model.load_state_dict(template.state_dict())
        models.append(model)
    return models


def _data(index: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(index)
    return torch.randn(16, 4, generator=generator), torch.randn(16, 1, generator=generator)


async def _train_on(worker: fz.RemoteWorker, model: nn.Module, index: int, iterations: int = 4) -> list[float]:
    """The seed's loop on one worker: send, zero_grad, forward, backward, step, get."""
    x, y = _data(index)
    x_ptr, y_ptr = await worker.send(x), await worker.send(y)
    opt = fz.Optims([worker], optim=optim.Adam(model.parameters(), lr=0.05)).get_optim(worker)
    losses = []
    for _ in range(iterations):
        model_ptr = await worker.send(model)
        await opt.zero_grad()
        loss = ((model_ptr(x_ptr) - y_ptr) ** 2).mean()
        await loss.backward()
        await opt.step()
        await model_ptr.get()
        losses.append((await loss.get()).item())
    return losses


async def _concurrent_equals_sequential(workers: list[fz.RemoteWorker]) -> None:
    sequential_models = _models(len(workers))
    sequential = [await _train_on(w, m, i) for i, (w, m) in enumerate(zip(workers, sequential_models))]
    assert torch.is_grad_enabled()

    concurrent_models = _models(len(workers))
    concurrent = await asyncio.gather(*(_train_on(w, m, i)
                                        for i, (w, m) in enumerate(zip(workers, concurrent_models))))
    assert torch.is_grad_enabled(), "concurrent pointer training turned grad mode off"
    assert concurrent == sequential
    for a, b in zip(concurrent_models, sequential_models):
        for (name, p), q in zip(a.state_dict().items(), b.state_dict().values()):
            assert torch.equal(p, q), name
    # and grad mode still works for unrelated local code afterwards
    w = torch.ones(2, requires_grad=True)
    (w * 3).sum().backward()
    assert torch.equal(w.grad, torch.full((2,), 3.0))


async def _concurrent_gets_keep_grad_mode(workers: list[fz.RemoteWorker]) -> None:
    models = _models(len(workers))
    pointers = [await w.send(m) for w, m in zip(workers, models)]
    for model in models:  # the local copies now differ from the remote ones
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    for _ in range(5):
        got = await asyncio.gather(*(p.get() for p in pointers))
        assert torch.is_grad_enabled(), "concurrent ModulePointer.get left grad mode off"
        assert all(g is m for g, m in zip(got, models))
    expected = _models(1)[0].state_dict()
    for model in models:
        for name, value in model.state_dict().items():
            assert torch.equal(value, expected[name]), name
        assert all(p.requires_grad and p.grad is None for p in model.parameters())


async def test_concurrent_module_gets_keep_grad_mode_on_virtual_workers(fedzmq_virtual_workers):
    await _concurrent_gets_keep_grad_mode(await fedzmq_virtual_workers(*WORKERS))


async def test_concurrent_module_gets_keep_grad_mode_on_daemons(fedzmq_daemons):
    await _concurrent_gets_keep_grad_mode([h.worker for h in await fedzmq_daemons(*WORKERS)])


async def test_concurrent_pointer_training_equals_sequential_on_virtual_workers(fedzmq_virtual_workers):
    await _concurrent_equals_sequential(await fedzmq_virtual_workers(*WORKERS))


async def test_concurrent_pointer_training_equals_sequential_on_daemons(fedzmq_daemons):
    await _concurrent_equals_sequential([h.worker for h in await fedzmq_daemons(*WORKERS)])


@pytest.mark.parametrize("mode", ["no_grad", "inference_mode"])
async def test_an_in_process_worker_computes_as_a_daemon_whatever_the_callers_torch_mode(
        fedzmq_virtual_workers, mode):
    """The in-process worker runs small commands on the caller's thread: it must not inherit a grad or
    inference mode the caller set there (a daemon never sees it)."""
    [bob] = await fedzmq_virtual_workers("bob")
    w = await bob.send(torch.ones(3, requires_grad=True))
    x = await bob.send(torch.arange(3.0))
    context = torch.no_grad() if mode == "no_grad" else torch.inference_mode()
    context.__enter__()  # a caller that turned the mode off for its whole thread
    try:
        loss = (w * x).sum()
        await loss  # the op ran while the caller's mode was in force
    finally:
        context.__exit__(None, None, None)
    assert (await loss.get()).requires_grad  # computed with grad mode on, as on a daemon
    await loss.backward()  # so it has a graph to run backward through


def _toy_dataset() -> dict[str, Dataset]:
    g = torch.Generator().manual_seed(3)
    x = torch.randn(64, 5, generator=g)
    return {"toy": Dataset("toy", x, x[:, :2].argmax(1))}


async def _every_kind_of_command(worker: fz.RemoteWorker) -> dict[str, Any]:
    """Send a model, forward, backward, fit with weights loaded in the same trip, evaluate, get."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 2))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    remote = await worker.send(model)
    out = remote(await worker.send(torch.linspace(-1, 1, 15).reshape(3, 5)))
    loss = (out * out).mean()
    await loss.backward()
    result: dict[str, Any] = {"out": await out.get(), "loss": await loss.get()}
    fitted = await remote.fit("toy", steps=3, batch_size=8, optimizer={"cls": "SGD", "lr": 0.5}, load=start)
    result["fit_loss"], result["eval"] = fitted["loss"], (await remote.evaluate("toy"))["loss"]
    await remote.get()
    result["state"] = [v.clone() for v in model.state_dict().values()]
    return result


@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", ["no_grad", "inference_mode", "autocast"])
async def test_an_in_process_worker_runs_every_command_as_a_daemon_whatever_mode_its_caller_holds(mode):
    """Beyond ops: the worker decoded a request's tensors under the caller's inference mode, and a model
    sent then could not take them as its weights (found by a session attacking these promises)."""
    config = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")
    async with fz.VirtualWorker("ref", config=config, datasets=_toy_dataset()) as ref:
        expected = await _every_kind_of_command(ref)
    context = {"no_grad": torch.no_grad(), "inference_mode": torch.inference_mode(),
               "autocast": torch.autocast("cpu", dtype=torch.bfloat16)}[mode]
    async with fz.VirtualWorker("bob", config=config, datasets=_toy_dataset()) as bob:
        context.__enter__()  # held across awaits, for the whole thread: what fedzmq must not inherit
        try:
            got = await _every_kind_of_command(bob)
        finally:
            context.__exit__(None, None, None)
    for key, value in expected.items():
        if key == "state":
            assert all(torch.equal(a, b) for a, b in zip(value, got[key]))
        elif isinstance(value, torch.Tensor):
            assert value.dtype == got[key].dtype and torch.equal(value, got[key]), key
        else:
            assert value == got[key], key


@pytest.mark.timeout(120)
async def test_models_built_by_an_in_process_worker_are_float32_whatever_a_neighbour_sets(fedzmq_virtual_workers):
    """torch keeps the default dtype per process: a coroutine that sets float64 for a moment (never
    across an await) changes it for an in-process worker's torch threads too. Models it builds from a
    description name their dtype; before, one built meanwhile came out float64 and refused its float32
    weights. (Ops that promote to the default dtype still see it: docs/api.md, VirtualWorker.)"""
    [bob] = await fedzmq_virtual_workers("bob")
    stop = asyncio.Event()

    async def float64_neighbour() -> None:
        while not stop.is_set():
            torch.set_default_dtype(torch.float64)
            try:
                started = time.perf_counter()
                while time.perf_counter() - started < 0.004:
                    torch.ones(32, 32) @ torch.ones(32, 32)
            finally:
                torch.set_default_dtype(torch.float32)
            await asyncio.sleep(0)

    neighbour = asyncio.ensure_future(float64_neighbour())
    try:
        for _ in range(30):
            model = nn.Linear(3, 2)
            remote = await bob.send(model)
            await remote.get()
            assert model.weight.dtype == torch.float32
    finally:
        stop.set()
        await neighbour


def _round_workers(prefix: str) -> list[fz.VirtualWorker]:
    config = fz.WorkerConfig(min_batch_size=1, min_metric_rows=1, shuffle_secret="fixed")
    workers = []
    for i in range(3):
        generator = torch.Generator().manual_seed(i)
        x = torch.randn(24, 4, generator=generator)
        workers.append(fz.VirtualWorker(f"{prefix}{i}", config=config, datasets={"d": Dataset("d", x, x[:, :3].argmax(1))}))
    return workers


async def _three_rounds(strategy: Any, prefix: str, first_round_mode: Any) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    workers = _round_workers(prefix)
    federation = fz.Federation(workers, model, fz.FitConfig("d", "cross_entropy", batch_size=8, steps=2,
                                                            optimizer={"cls": "SGD", "lr": 0.1}), strategy)
    try:
        for number in range(3):
            if number == 0 and first_round_mode is not None:
                with first_round_mode:  # the caller's mode, held around the await of a whole round
                    await federation.run_round()
            else:
                await federation.run_round()
    finally:
        await federation.close()
        for worker in workers:
            await worker.close()
    return [v.clone() for v in model.state_dict().values()]


@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["FedAvg", "FedAvgM", "FedAdam", "SecAgg"])
async def test_a_round_under_the_callers_inference_mode_leaves_later_rounds_as_they_would_be(strategy):
    """The state a strategy keeps between rounds (FedAvg's recycled sums, FedAvgM's momentum, FedAdam's
    moments, a secure round's) was made under whatever mode the event loop's thread had: a round awaited
    inside ``torch.inference_mode()`` made inference tensors, and every later round, run with no mode at
    all, failed ("Inplace update to inference tensor outside InferenceMode"; found by a session attacking
    these promises). The coordinator's own torch work runs in the default modes, like a worker's."""
    def make() -> Any:
        return {"FedAvg": fz.FedAvg, "FedAvgM": lambda: fz.FedAvgM(server_momentum=0.9), "FedAdam": fz.FedAdam,
                "SecAgg": lambda: fz.SecAgg(fz.FedAvg())}[strategy]()

    expected = await _three_rounds(make(), "plain", None)
    for mode in (torch.inference_mode(), torch.no_grad()):
        got = await _three_rounds(make(), "moded", mode)
        assert all(torch.equal(a, b) for a, b in zip(expected, got)), mode


@pytest.mark.timeout(60)
async def test_a_value_received_while_a_neighbour_holds_inference_mode_is_an_ordinary_tensor(fedzmq_daemons):
    """Replies are decoded by the connection's receive task, in whatever modes the event loop's thread had
    at that moment: a value fetched while another coroutine held ``torch.inference_mode()`` across an
    await came back an inference tensor, which cannot be changed in place or saved for a backward pass
    outside that mode (a cold review's find). Replies are decoded in the default modes."""
    [bob] = await fedzmq_daemons("bob")
    values = await bob.worker.send(torch.arange(4.0))
    stop = asyncio.Event()

    async def neighbour() -> None:
        while not stop.is_set():
            with torch.inference_mode():  # held across an await: what fedzmq must not inherit
                await asyncio.sleep(0)

    running = asyncio.ensure_future(neighbour())
    try:
        for _ in range(50):
            got = await values.get()
            assert not got.is_inference()
            got.add_(1)  # an inference tensor refuses this outside inference mode
    finally:
        stop.set()
        await running


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["virtual", "daemon"])
async def test_a_streamed_value_received_under_inference_mode_is_an_ordinary_tensor(fedzmq_daemons, where):
    """A value bigger than a chunk comes back in pieces, copied on threads into a tensor the client makes
    first: made in the caller's coroutine, it was an inference tensor while a neighbour held (or the
    caller itself awaited inside) ``torch.inference_mode()``, and the copies, outside that mode, failed
    (a session breaking the concurrency promise found it). It is made in the default modes."""
    limits = fz.Limits(chunk_bytes=4096)
    if where == "virtual":
        worker = fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits), settings=fz.ConnectionSettings(
            limits=limits))
    else:
        [handle] = await fedzmq_daemons("bob", settings=fz.ConnectionSettings(limits=limits),
                                        args=["--chunk-bytes", "4096"])
        worker = handle.worker
    expected = torch.arange(5000, dtype=torch.float32)  # 20,000 bytes: five pieces
    try:
        values = await worker.send(expected)
        with torch.inference_mode():
            got = await values.get()
        assert torch.equal(got, expected) and not got.is_inference()
        got.add_(1)
    finally:
        if where == "virtual":
            await worker.close()


@pytest.mark.timeout(120)
async def test_a_tensor_changed_while_it_is_sent_arrives_whole(fedzmq_daemons):
    """A big tensor's bytes leave uncopied, read by ZeroMQ after the send is under way: another coroutine's
    in-place change between two awaits of the send made the daemon store a mixture, with values neither
    version held (0.5: half the bytes of 1.0, half of 0.0). Run in order, the send gives all 0 or all 1."""
    [bob] = await fedzmq_daemons("bob")
    for pause in range(12):
        tensor = torch.zeros(4 << 20)  # 16 MiB: one message, sent uncopied

        async def change() -> None:
            for _ in range(pause):
                await asyncio.sleep(0)
            tensor.add_(1)

        pointer, _ = await asyncio.gather(bob.worker.send(tensor), change())
        values = set((await pointer.get()).unique().tolist())
        assert values in ({0.0}, {1.0}), f"changed after {pause} passes: the daemon stored {sorted(values)}"
