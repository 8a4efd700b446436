"""Breaks found by h26: ordinary user code of the public API (``import fedzmq as fz``) against the asyncio
promises of README.md and docs/api.md: thread-local torch state never spans an ``await``, concurrent code
gives exactly what the same code gives run sequentially (on ``VirtualWorker``s and daemons alike), and
cancellation leaves nothing dangling on either side."""

import asyncio
import gc

import pytest
import torch
from torch import nn

import fedzmq as fz

#: how long a check waits for the daemon to notice what the client did (a poll, not a timing assertion): it returns
#: as soon as the count is reached, so only a count never reached waits this long; 5 s failed a noticing that a
#: busy host made late
SETTLE_SECONDS = 30.0


def zeroed(model: nn.Module) -> nn.Module:
    """``model`` with every parameter 0 (the state sent first; a later state of ones tells the two apart)."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(0.0)
    return model


def ones_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A state of ``model``'s entries, every value 1."""
    return {name: torch.full_like(value, 1.0) for name, value in model.state_dict().items()}


async def _sessions_settle_to(observer: fz.RemoteWorker, expected: int) -> int:
    """The daemon's session count once it reaches ``expected``, or what it is after ``SETTLE_SECONDS``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        gc.collect()
        sessions = (await observer.status())["sessions"]
        if sessions == expected or loop.time() > deadline:
            return sessions
        await asyncio.sleep(0.1)


@pytest.mark.timeout(120)
async def test_a_connect_cancelled_at_any_pass_leaves_no_session_on_the_daemon(fedzmq_daemons):
    """``fz.connect`` under a deadline (``asyncio.wait_for``, a ``TaskGroup`` cancelled), cancelled after its
    ping left: the client closes its socket without a goodbye (``close_connection(say_goodbye=False)``), so the
    daemon keeps the session it opened for that ping until ``--session-timeout`` (60 s) or an eviction. Each
    one counts against ``--max-sessions`` and, with keys, ``--max-sessions-per-key`` (32): a retry loop of
    short connect deadlines locks its own key out for a minute. docs/api.md: cancellation leaves nothing
    dangling on either side."""
    [bob] = await fedzmq_daemons("bob")
    baseline = (await bob.worker.status())["sessions"]
    outcomes = []
    # every pass up to 30, then further apart until a connect outruns its cancel (a loaded host answers late)
    for passes in [*range(30), *(30 << k for k in range(9))]:
        if passes >= 30 and "connected" in outcomes:
            break
        task = asyncio.ensure_future(fz.connect(bob.address))
        for _ in range(passes):
            await asyncio.sleep(0)
        task.cancel()
        [result] = await asyncio.gather(task, return_exceptions=True)
        if isinstance(result, fz.RemoteWorker):
            await result.close()
            outcomes.append("connected")
        else:
            assert isinstance(result, asyncio.CancelledError), result
            outcomes.append("cancelled")
    assert "cancelled" in outcomes and "connected" in outcomes, outcomes  # the sweep crossed the ping's reply
    left = await _sessions_settle_to(bob.worker, baseline)
    assert left == baseline, f"{left - baseline} cancelled connects left their sessions on the daemon ({outcomes})"


def _dropout_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Dropout(0.5))


async def _seeded_draws(worker: fz.RemoteWorker) -> list[torch.Tensor]:
    """A user's seeded local randomness (data augmentation, say) around awaits of the worker."""
    torch.manual_seed(1234)
    draws = []
    for _ in range(4):
        draws.append(torch.randn(4))
        await (await worker.send(draws[-1])).get()
    return draws


async def _dropout_forwards(worker: fz.RemoteWorker, remote: fz.ModulePointer, x: fz.TensorPointer) -> None:
    """A neighbour's remote forwards through a dropout layer in train mode: computed on the worker."""
    for _ in range(4):
        await remote(x).get()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["daemon", "virtual"])
async def test_a_workers_dropout_leaves_the_callers_seeded_random_stream_alone(fedzmq_daemons, where):
    """A ``VirtualWorker`` is the daemon's code in this process, and its dropout draws from this process's
    global torch generator: a coroutine's seeded ``torch.randn`` around its awaits gives other numbers when a
    neighbour's remote forward ran on an in-process worker meanwhile (and the worker's dropout masks depend on
    what the client drew). On a daemon the same concurrent code gives what the sequential code gives.
    docs/api.md: concurrent code gives exactly the results of the same code run sequentially, on virtual
    workers and daemons alike."""
    if where == "daemon":
        [handle] = await fedzmq_daemons("bob")
        worker = handle.worker
    else:
        worker = fz.VirtualWorker("bob")
    try:
        remote = await worker.send(_dropout_model())
        x = await worker.send(torch.ones(8, 16))
        alone = await _seeded_draws(worker)
        await _dropout_forwards(worker, remote, x)
        together, _ = await asyncio.gather(_seeded_draws(worker), _dropout_forwards(worker, remote, x))
        assert all(torch.equal(a, b) for a, b in zip(alone, together)), \
            f"the seeded draws differ beside remote dropout on a {where} worker"
    finally:
        if where == "virtual":
            await worker.close()


SMALL_LIMITS = fz.Limits(chunk_bytes=4096)


def _two_big_layers(value: float) -> nn.Module:
    """Two 64x64 layers: each weight (16 KiB) goes in pieces over a 4 KiB chunk, the biases inline."""
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 64))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.fill_(value)
    return model


def _values(model: nn.Module) -> set[float]:
    return {float(v) for tensor in model.state_dict().values() for v in tensor.unique()}


async def _small_chunk_workers(fedzmq_daemons, where: str, count: int) -> tuple[list[fz.RemoteWorker], list]:
    """``count`` workers whose messages carry at most 4 KiB of tensor (so models stream), and what to close."""
    settings = fz.ConnectionSettings(limits=SMALL_LIMITS, connect_timeout=30.0)
    if where == "daemon":
        handles = await fedzmq_daemons(*[f"w{i}" for i in range(count)], settings=settings,
                                       args=["--chunk-bytes", "4096"])
        return [h.worker for h in handles], []
    workers = [fz.VirtualWorker(f"w{i}", settings=settings, config=fz.WorkerConfig(limits=SMALL_LIMITS))
               for i in range(count)]
    return workers, workers


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["virtual", "daemon"])
async def test_a_send_of_a_model_beside_a_get_of_it_is_not_torn(fedzmq_daemons, where):
    """``remote.get()`` lands the remote weights in the local model piece by piece, across awaits; a send of
    that model started meanwhile (another coroutine's ``worker.send(model)``, which reads the local tensors as
    it streams them) is not held back: it reads pieces the get has landed and pieces it has not, and the
    worker's model ends part old, part new ({0.0, 1.0}). In order, get then send gives all 1.0 and send then
    get all 0.0. docs/api.md: sends and gets of one model see all of a write or none; no command sees a torn
    model; concurrent code gives what the same code gives run sequentially."""
    [bob], closing = await _small_chunk_workers(fedzmq_daemons, where, 1)
    try:
        torn = []
        for passes in range(0, 12, 2):
            model = _two_big_layers(1.0)
            remote = await bob.send(model)   # the worker's copy: all 1.0
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(0.0)     # the local one: all 0.0
            getting = asyncio.ensure_future(remote.get())
            for _ in range(passes):
                await asyncio.sleep(0)
            await asyncio.gather(getting, bob.send(model))
            await remote.get()
            if _values(model) not in ({0.0}, {1.0}):
                torn.append((passes, sorted(_values(model))))
            await remote.delete()
        assert not torn, f"a send beside a get left the worker's model torn (passes, values): {torn}"
    finally:
        for worker in closing:
            await worker.close()


@pytest.mark.timeout(120)
async def test_a_send_to_one_worker_beside_a_get_from_another_is_not_torn(fedzmq_daemons):
    """The same race across two workers: the model fetched from bob (``bob_copy.get()``, landing in the local
    model piece by piece) while another coroutine sends that model to alice. In order alice gets bob's
    weights (get then send) or the local ones (send then get); concurrently she got a mixture."""
    (bob, alice), closing = await _small_chunk_workers(fedzmq_daemons, "virtual", 2)
    try:
        torn = []
        for passes in range(0, 12, 2):
            model = _two_big_layers(1.0)
            on_bob = await bob.send(model)
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.fill_(0.0)
            on_alice = await alice.send(model)
            getting = asyncio.ensure_future(on_bob.get())
            for _ in range(passes):
                await asyncio.sleep(0)
            await asyncio.gather(getting, alice.send(model))
            await on_alice.get()
            if _values(model) not in ({0.0}, {1.0}):
                torn.append((passes, sorted(_values(model))))
        assert not torn, f"a send to alice beside a get from bob left alice's model torn: {torn}"
    finally:
        for worker in closing:
            await worker.close()


async def _tasks_settle_to(expected: set[asyncio.Task]) -> set[str]:
    """The names of the tasks beyond ``expected`` once they are gone, or after ``SETTLE_SECONDS``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + SETTLE_SECONDS
    while True:
        extra = {t.get_name() for t in asyncio.all_tasks() - expected - {asyncio.current_task()} if not t.done()}
        if not extra or loop.time() > deadline:
            return extra
        await asyncio.sleep(0.05)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["virtual", "daemon"])
async def test_a_close_whose_deadline_is_already_spent_still_closes(fedzmq_daemons, where):
    """``await asyncio.wait_for(worker.close(), timeout=remaining)`` with the remaining time at 0 (a shutdown
    budget spent), or a ``TaskGroup``'s close task cancelled in the pass that made it: the close coroutine is
    cancelled before its first step, so nothing of it runs. The worker stays open, its heartbeat task keeps
    the daemon's session and objects alive for ever (an in-process worker keeps serving). docs/api.md: a
    close cut short by a deadline or ``cancel()`` still closes; ``connect`` was made to handle exactly this
    case (cancelled before it ran)."""
    before = set(asyncio.all_tasks())
    if where == "daemon":
        [bob] = await fedzmq_daemons("bob")
        before = set(asyncio.all_tasks())
        baseline = (await bob.worker.status())["sessions"]
        worker: fz.RemoteWorker = await fz.connect(bob.address)
    else:
        worker = fz.VirtualWorker("v")
    await worker.send(torch.ones(4))
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(worker.close(), timeout=0)
    try:
        assert not await _tasks_settle_to(before), "its connection's tasks still run"
        assert worker.closed, "a close cancelled before it ran left the worker open"
        if where == "daemon":
            assert await _sessions_settle_to(bob.worker, baseline) == baseline, "its session stays on the daemon"
    finally:
        await worker.close()


@pytest.mark.timeout(120)
@pytest.mark.parametrize("where", ["virtual", "daemon"])
async def test_a_state_changed_after_start_load_returned_is_not_what_the_worker_loads(fedzmq_daemons, where):
    """``await remote.start_load(state)`` "sends the load and returns a task for its outcome at once": the
    call that sends has returned, so the caller may reuse its tensors (as it may an op's arguments). But an
    entry that goes inline (under ``chunk_bytes``) and of 64 KiB or more leaves uncopied: ZeroMQ reads its
    memory after the call returned, and a daemon loaded the changed values, or a mixture ({1.0, 2.0});
    an in-process worker (whose frames are copied) loads what was passed. In order: all 1.0."""
    if where == "daemon":
        [handle] = await fedzmq_daemons("bob")
        worker = handle.worker
    else:
        worker = fz.VirtualWorker("bob")
    try:
        changed = []
        for trial in range(6):
            model = zeroed(nn.Linear(1024, 1024))  # a 4 MiB weight: inline, and sent without a copy
            remote = await worker.send(model)
            new = ones_state(model)
            outcome = await remote.start_load(new)
            for tensor in new.values():
                tensor.fill_(2.0)  # after the call that sends returned
            await outcome
            await remote.get()
            if _values(model) != {1.0}:
                changed.append((trial, sorted(_values(model))))
            await remote.delete()
        assert not changed, f"the worker loaded values changed after start_load returned: {changed}"
    finally:
        if where == "virtual":
            await worker.close()


@pytest.mark.timeout(120)
async def test_a_send_of_a_model_cancelled_after_it_left_leaves_no_torn_model_when_training_goes_on(fedzmq_daemons):
    """A send of a model the worker has is a load of its state; an entry under ``chunk_bytes`` and of 64 KiB
    or more goes inline and uncopied. Cancelled once the load left (``wait_for`` around the send), the call
    returns while ZeroMQ may still read the local tensors; local training goes on (the model changes in
    place), and the worker's copy ends part the state sent, part the later one ({1.0, 2.0}), its pointer
    whole. docs/api.md: a write that stops part-way is discarded; no command ever sees a torn model."""
    [handle] = await fedzmq_daemons("bob")
    bob = handle.worker
    torn = []
    for passes in range(10):
        model = zeroed(nn.Linear(1024, 1024))  # a 4 MiB weight: inline, and sent without a copy
        remote = await bob.send(model)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.fill_(1.0)
        sending = asyncio.ensure_future(bob.send(model))
        for _ in range(passes):
            await asyncio.sleep(0)
        sending.cancel()
        await asyncio.gather(sending, return_exceptions=True)
        with torch.no_grad():  # local training goes on
            for parameter in model.parameters():
                parameter.fill_(2.0)
        if remote.deleted:  # discarded: the next send sends it anew, whole
            continue
        await remote.get()
        if _values(model) not in ({0.0}, {1.0}):
            torn.append((passes, sorted(_values(model))))
        await remote.delete()
    assert not torn, f"a cancelled send left the worker's model torn (passes, values): {torn}"


@pytest.mark.timeout(120)
async def test_an_evaluate_that_loads_cancelled_after_it_left_loads_the_state_as_it_was_passed(
        fedzmq_daemons, tmp_path):
    """``remote.evaluate(ds, load=state)`` (and ``fit``'s ``load=``) sends ``state``'s entries under a chunk
    inline and uncopied; cancelled once the request left, the call returns, and a caller that then changes
    ``state`` in place (reusing its buffers) had the worker load part the state passed, part the changed one
    ({1.0, 2.0}) and keep it, its pointer whole. As an op's arguments are, a plain state is taken as it was
    when the call was made."""
    from fedzmq.testing import write_dataset

    x = torch.randn(64, 1024, generator=torch.Generator().manual_seed(0))
    path = write_dataset(tmp_path / "toy.safetensors", x, (x[:, 0] > 0).long())
    [handle] = await fedzmq_daemons("bob", datasets={"bob": {"toy": path}})
    bob = handle.worker
    torn = []
    for passes in range(10):
        model = zeroed(nn.Linear(1024, 64))  # a 256 KiB weight: inline, and sent without a copy
        remote = await bob.send(model)
        state = ones_state(model)
        evaluating = asyncio.ensure_future(remote.evaluate("toy", load=state))
        for _ in range(passes):
            await asyncio.sleep(0)
        evaluating.cancel()
        await asyncio.gather(evaluating, return_exceptions=True)
        for tensor in state.values():
            tensor.fill_(2.0)  # the caller reuses its buffers
        if remote.deleted:
            continue
        await remote.get()
        if _values(model) not in ({0.0}, {1.0}):
            torn.append((passes, sorted(_values(model))))
        await remote.delete()
    assert not torn, f"a cancelled evaluate(load=) left the worker's model torn (passes, values): {torn}"


async def _meta_device_neighbour(stop: asyncio.Event) -> None:
    """A coroutine building a big model without memory, ``with torch.device("meta"):`` held across its awaits:
    the thread's default device is meta whenever another coroutine runs meanwhile."""
    while not stop.is_set():
        with torch.device("meta"):
            await asyncio.sleep(0)


@pytest.mark.timeout(60)
@pytest.mark.parametrize("where", ["virtual", "daemon"])
async def test_a_neighbours_default_device_does_not_reach_fedzmqs_own_tensors(fedzmq_daemons, where):
    """``with torch.device("meta"):`` is thread-local torch state like grad mode: a neighbour holding it across
    an await made fedzmq's own tensors meta ones. A streamed ``get`` (the client allocates the destination)
    raised "can't convert meta device type tensor to numpy"; an in-process worker's commands (run on the
    caller's thread) failed "outside their handler". ``default_modes`` left the default device alone.
    The user's own tensors are made before the neighbour starts."""
    limits = fz.Limits(chunk_bytes=4096)
    if where == "daemon":
        [handle] = await fedzmq_daemons("bob", settings=fz.ConnectionSettings(limits=limits),
                                        args=["--chunk-bytes", "4096"])
        worker = handle.worker
    else:
        worker = fz.VirtualWorker("bob", config=fz.WorkerConfig(limits=limits),
                                  settings=fz.ConnectionSettings(limits=limits))
    values, model = torch.arange(5000.0), nn.Linear(64, 64)  # 20,000 bytes: a streamed get
    expected = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    stop = asyncio.Event()
    neighbour = asyncio.ensure_future(_meta_device_neighbour(stop))
    try:
        pointer = await worker.send(values)
        assert torch.equal(await pointer.get(), values)
        assert torch.equal(await (pointer * 2).get(), values * 2)
        remote = await worker.send(model)
        await remote.get()
        assert all(torch.equal(model.state_dict()[name], value) for name, value in expected.items())
    finally:
        stop.set()
        await neighbour
        if where == "virtual":
            await worker.close()
