"""A model's state read in pieces is one read (docs/api.md, "fz.Limits"): an entry bigger than a chunk is
fetched by ``module_read`` commands after the reply that reports it, so a command on the same model sent
meanwhile (another coroutine's load, fit or optimizer step) must not show through. Concurrent code gives
what the same code run in order gives, on in-process workers and on daemons alike."""

import asyncio
import contextlib
import gc

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.client.pointer_ops import RELEASE_DELAY
from fedzmq.codec import Ref
from fedzmq.modeldesc import describe
from fedzmq.worker.datasets import Dataset
from fedzmq.worker.kept import KEPT_READ_BYTES, MAX_KEPT_READS

pytestmark = pytest.mark.timeout(120)

#: both sides' chunk: the model's 64x64 weight (16 KiB) streams in four pieces
LIMITS = fz.Limits(chunk_bytes=4096)
SETTINGS = fz.ConnectionSettings(limits=LIMITS)
CHUNK_ARGS = ["--chunk-bytes", "4096"]


def _model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 3))


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.fixture(params=["virtual", "daemon"])
async def bob(request, fedzmq_daemons):
    if request.param == "virtual":
        async with fz.VirtualWorker("bob", settings=SETTINGS, config=fz.WorkerConfig(limits=LIMITS),
                                    datasets={"toy": Dataset("toy", torch.randn(32, 64),
                                                             torch.randint(0, 3, (32,)))}) as worker:
            yield worker
    else:
        [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
        yield handle.worker


async def test_a_state_read_in_pieces_is_not_changed_by_a_load_sent_meanwhile(bob):
    model = _model()
    remote = await bob.send(model)
    before = _snapshot(model)
    changed = {k: v + 1 for k, v in before.items()}

    async def load() -> None:
        await remote.load(changed)

    await asyncio.gather(remote.get(), load())  # the get first: it reads the state before the load
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name}: the read saw the load sent after it"
    assert torch.equal((await remote.get()).state_dict()["0.weight"], changed["0.weight"])  # and then the load ran


async def test_a_state_read_in_pieces_is_not_changed_by_an_optimizer_step_sent_meanwhile(bob):
    model = _model()
    remote = await bob.send(model)
    x = await bob.send(torch.randn(8, 64))
    opt = fz.Optims([bob], optim=torch.optim.SGD(model.parameters(), lr=0.5)).get_optim(bob)
    await (remote(x) ** 2).sum().backward()
    await opt.step()  # the remote optimizer exists: the next step goes out at once
    before = _snapshot(await remote.get())

    await asyncio.gather(remote.get(), opt.step())
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, before[name]), f"{name}: the read saw the step sent after it"
    after = (await remote.get()).state_dict()
    assert not torch.equal(after["0.weight"], before["0.weight"])  # the step ran, after the read


async def test_a_read_sent_while_a_load_is_being_sent_sees_all_of_it(bob):
    """A load of a model with an entry past one chunk is several commands (the entry's pieces, then the
    load of the rest): a read sent while they go out came between them and saw the new weight with the
    old biases. It waits for the load, as the same code run in order reads after it."""
    model = _model()
    remote = await bob.send(model)
    changed = {k: v + 1 for k, v in _snapshot(model).items()}

    async def load() -> None:
        await remote.load(changed)

    _, got = await asyncio.gather(load(), _read_state(bob, remote))  # the load first
    for name, tensor in changed.items():
        assert torch.equal(got[name], tensor.reshape(-1)), f"{name}: the read came between the load's commands"


async def test_two_loads_and_a_read_sent_at_once_give_what_they_give_in_order(fedzmq_daemons):
    """Two loads and a read of one model sent from three coroutines: the read sees the loads sent before
    it, whole, as in order."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    model = _model()
    remote = await bob.send(model)
    first = {k: torch.full_like(v, 1.0) for k, v in model.state_dict().items()}
    second = {k: torch.full_like(v, 2.0) for k, v in model.state_dict().items()}

    async def load(state) -> None:
        await remote.load(state)

    _, _, got = await asyncio.gather(load(first), load(second), _read_state(bob, remote))
    for name, tensor in got.items():
        assert torch.equal(tensor, second[name].reshape(-1)), f"{name}: not the second load's"


async def _read_state(worker, remote) -> dict[str, torch.Tensor]:
    """The remote model's state as whole flat tensors, from the pieces a read brings."""
    pieces: dict[str, list[torch.Tensor]] = {}
    async for name, start, values in worker.module_slices(remote):
        assert start == sum(p.numel() for p in pieces.get(name, []))
        pieces.setdefault(name, []).append(values.clone())
    return {name: torch.cat(parts) for name, parts in pieces.items()}


async def test_reads_racing_optimizer_steps_see_what_the_same_code_run_in_order_sees(bob):
    """A dozen coroutines read a model and step its optimizer: every read equals the read at the same
    place of the same code run one call after the other."""

    async def run(concurrently: bool) -> list[dict[str, torch.Tensor]]:
        model = _model()
        remote = await bob.send(model)
        x = await bob.send(torch.randn(8, 64, generator=torch.Generator().manual_seed(1)))
        opt = fz.Optims([bob], optim=torch.optim.SGD(model.parameters(), lr=0.01)).get_optim(bob)
        await (remote(x) ** 2).sum().backward()
        await opt.step()

        async def read() -> dict[str, torch.Tensor]:
            return await _read_state(bob, remote)

        async def step() -> None:
            await opt.step()

        jobs = [job for _ in range(4) for job in (read, step, read)]
        if concurrently:
            results = await asyncio.gather(*(job() for job in jobs))
        else:
            results = [await job() for job in jobs]
        return [r for r in results if r is not None]

    in_order, concurrent = await run(False), await run(True)
    assert len(in_order) == len(concurrent) == 8
    for n, (expected, got) in enumerate(zip(in_order, concurrent)):
        for name in expected:
            assert torch.equal(expected[name], got[name]), f"read {n}, {name}: not what the code run in order read"


async def test_a_write_that_cannot_keep_the_read_state_fails_whole_and_the_read_completes(fedzmq_daemons):
    """Keeping the unread entries costs the session their bytes: without room, the write is refused before
    it changes anything, and the read still gets the state it asked for."""
    quota = 200_000
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=[*CHUNK_ARGS, "--max-session-bytes", str(quota)])
    bob = handle.worker
    model = _model()
    remote = await bob.send(model)
    before = await _read_state(bob, remote)
    held = (await bob.status())["bytes"]
    elements = (quota - held - 12_000) // 4  # leaves less room than the 16 KiB weight
    column, row = await bob.send(torch.zeros(100, 1)), await bob.send(torch.zeros(1, elements // 100))
    filler = column + row  # made there: an upload would need room for its pieces in flight
    await filler

    async def read() -> dict[str, torch.Tensor]:
        return await _read_state(bob, remote)

    async def load() -> None:
        await remote.load({k: v + 1 for k, v in model.state_dict().items()})

    got, refused = await asyncio.gather(read(), load(), return_exceptions=True)
    assert isinstance(refused, fz.LimitExceeded), refused
    assert "read in progress" in str(refused)
    for name in before:
        assert torch.equal(got[name], before[name])
    after = await _read_state(bob, remote)
    for name in before:
        assert torch.equal(after[name], before[name]), f"{name}: the refused load wrote"
    del filler, column, row


async def test_unread_streams_are_charged_and_a_deleted_model_frees_them(fedzmq_daemons):
    """A client that asks for states and never reads them holds their bookkeeping and the copies a write
    made, all charged (the reads of one entry share one copy); deleting the model lets them go, and a late
    read is refused."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    model = _model()
    remote = await bob.send(model)
    held = (await bob.status())["bytes"]
    for _ in range(1500):
        state = await bob.request("module_state", {"obj": remote.id})
    assert (await bob.status())["bytes"] == held + 1500 * KEPT_READ_BYTES  # reported, not copied
    weight = model.state_dict()["0.weight"]
    await remote.load({k: v + 1 for k, v in model.state_dict().items()})
    copies = (await bob.status())["bytes"] - held - 1500 * KEPT_READ_BYTES
    assert copies == weight.numel() * 4  # the 1,500 kept reads of the weight share one copy
    info = state["0.weight"]
    read = {"obj": remote.id, "name": "0.weight", "offset": 0, "length": 4096, "stream": info.stream}
    first = await bob.request("module_read", read)
    assert torch.equal(first.view(torch.float32), weight.reshape(-1)[:1024])  # as it was before the load
    await bob.request("delete", {"objs": [remote.id]})
    remote.mark_deleted()
    assert (await bob.status())["bytes"] == 0
    with pytest.raises((fz.ObjectNotFound, fz.BadRequest)):
        await bob.request("module_read", read)


async def test_a_read_given_up_part_way_keeps_nothing(fedzmq_daemons):
    """A client that stops reading a state part-way (an error, a cancelled round) says so: a later write
    copies nothing for it."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    model = _model()
    remote = await bob.send(model)
    held = (await bob.status())["bytes"]
    async with contextlib.aclosing(bob.module_slices(remote)) as pieces:
        async for name, _start, _values in pieces:
            if name == "0.weight":
                break  # after its first piece
    await remote.load({k: v + 1 for k, v in model.state_dict().items()})
    assert (await bob.status())["bytes"] == held


async def test_a_fitted_state_dropped_unread_keeps_nothing():
    """A fit's reply whose pieces are never iterated (a round cancelled after the fit, say): its streamed
    entries are given up when it is dropped, so a later write copies nothing for it."""
    data = {"toy": Dataset("toy", torch.randn(32, 64), torch.randint(0, 3, (32,)))}
    async with fz.VirtualWorker("bob", settings=SETTINGS, config=fz.WorkerConfig(limits=LIMITS),
                                datasets=data) as bob:
        model = _model()
        remote = await bob.send(model)
        held = (await bob.status())["bytes"]
        update = await remote.fit_and_fetch("toy", steps=1, batch_size=16)
        assert update.metrics["steps"] == 1
        del update
        gc.collect()  # (its give-up goes out on the loop's next pass: before the load)
        await remote.load({k: v + 1 for k, v in model.state_dict().items()})
        assert (await bob.status())["bytes"] == held  # no copy, and no read kept


# --- a red team's attacks on the kept reads themselves ----------------------------------------------------


async def test_kept_reads_hold_no_copy_of_their_entry_names(fedzmq_daemons):
    """``state_dict`` makes an entry's name anew on every call: a kept read that held it kept 1,024 copies
    of a 1.5 MiB name per session, uncharged (1.5 GiB of daemon memory, ``status()["bytes"]`` unmoved)."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    name = "n" * (1 << 20)
    weight = await bob.send(torch.zeros(1025))  # 4,100 bytes: past one chunk, so the entry streams
    spec = {"kind": "container", "params": [], "buffers": [],
            "children": [["c", {"kind": "container", "children": [], "params": [[name, [1025], True]], "buffers": []}]]}
    model = bob.new_id()
    await bob.request("module_put", {"out": model, "spec": spec, "state": {"c." + name: Ref(weight.id)}})
    weight.mark_deleted()  # the model adopted it
    before = (await bob.status())["rss_bytes"]
    for _ in range(40):
        states = await asyncio.gather(*(bob.request("module_state", {"obj": model}) for _ in range(8)))
        assert states[-1]["c." + name].stream is not None
        del states
    grown = (await bob.status())["rss_bytes"] - before
    assert grown < 100 << 20, f"the daemon grew by {grown >> 20} MiB for 320 kept reads"


async def test_keeping_many_small_entries_is_sized_and_stays_within_the_time_limit(fedzmq_daemons):
    """A model of 3,000 tiny entries, its state reported unread, then a write of one entry: the keep listed
    the model's entries once per kept read (with 2,000 entries, 3.3 s under a 0.5 s limit, the torch thread
    held from every session; the work grows as the square of the entries: 10-25 s with these 3,000). Listed
    once, the write is answered (or refused for the time its copies would take) well inside ten times the
    limit, a bound only a host stalled for seconds could reach; no clock is read here besides it."""
    limit = 0.5
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS,
                                    args=[*CHUNK_ARGS, "--max-command-seconds", str(limit), "--threads", "1"])
    bob = handle.worker
    net = nn.Sequential(nn.Linear(1024, 1, bias=False), *[nn.BatchNorm1d(1) for _ in range(600)])
    remote = await bob.send(net)  # (each entry its own object: a module_put naming one in two is refused)
    model = remote.id
    reported = await bob.request("module_state", {"obj": model})  # entry 0 fills the inline budget
    assert sum(not isinstance(v, torch.Tensor) for v in reported.values()) == 3000  # the rest kept
    try:
        await asyncio.wait_for(bob.request("module_load", {"obj": model, "state": {"1.weight": torch.ones(1)}}),
                               10 * limit)
    except fz.LimitExceeded:
        pass  # refused for the time its copies would take: as good


async def test_copies_for_kept_reads_are_checked_beside_what_the_command_will_make(fedzmq_daemons):
    """A forward that writes (module_call) reserves room for its output; the kept copies were checked
    against the same room before the reservation was entered, and both ran: output and copy held past the
    quota until the output's store was refused."""
    mib = 1 << 20
    quota = 9 * mib
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=[*CHUNK_ARGS, "--max-session-bytes", str(quota)])
    bob = handle.worker
    frozen = nn.Linear(1024, 256, bias=False).requires_grad_(False)  # 1 MiB, no autograd graph
    weight = await bob.send(frozen.weight.detach())
    model = bob.new_id()
    await bob.request("module_put", {"out": model, "spec": describe(frozen), "state": {"weight": Ref(weight.id)}})
    weight.mark_deleted()
    x = await bob.send(torch.zeros(1024, 1024))  # 4 MiB in, 1 MiB out
    held = (await bob.status())["bytes"]
    room = quota - held
    pad = (room - int(1.5 * mib)) // 4  # leave room for the output or the copy, not both
    column, row = await bob.send(torch.zeros(64, 1)), await bob.send(torch.zeros(1, pad // 64))
    filler = column + row
    await filler
    info = (await bob.request("module_state", {"obj": model}))["weight"]
    assert info.stream is not None
    held = (await bob.status())["bytes"]
    with pytest.raises(fz.LimitExceeded) as refused:
        await bob.request("module_call", {"obj": model, "args": [Ref(x.id)], "kwargs": {}, "out": [bob.new_id()]})
    assert "keeping" in str(refused.value)  # refused before the forward ran
    assert (await bob.status())["bytes"] == held
    del filler, column, row


async def test_concurrent_reads_of_a_model_of_thousands_of_streamed_entries_all_complete(bob):
    """A reply can report more entries than a fixed count of kept reads allowed (1,024: a model of 600
    small layers past one chunk evicted its own first entries), and three reads at once of it must
    each complete, as three in a row do."""
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(600)])
    remote = await bob.send(model)
    expected = {k: v.reshape(-1) for k, v in model.state_dict().items()}
    reads = await asyncio.gather(*(_read_state(bob, remote) for _ in range(3)))
    for got in reads:
        assert got.keys() == expected.keys()
        for name in expected:
            assert torch.equal(got[name], expected[name]), name


async def test_a_state_read_its_caller_stopped_waiting_for_keeps_nothing(fedzmq_daemons):
    """A read that timed out, or was cancelled, while its request waited behind slow work: its reply comes
    after nobody waits for it, and the reads it reports are given up then (a round's straggler left a
    copy of the model's big entries per round, charged until the session ended)."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    model = _model()
    remote = await bob.send(model)
    a = await bob.send(torch.randn(384, 384))

    async def slow_work() -> None:  # queued ahead of the read, in the same session
        product = a
        for _ in range(30):
            product = (product @ a) / 384
        await product

    for stop in ("timeout", "cancel"):
        work = asyncio.ensure_future(slow_work())
        await asyncio.sleep(0)  # its ops have left
        if stop == "timeout":
            with pytest.raises(fz.RequestTimeout):
                await remote.get(timeout=0.01)
        else:
            read = asyncio.ensure_future(remote.get())
            await asyncio.sleep(0.01)
            read.cancel()
            await asyncio.gather(read, return_exceptions=True)
        await work
        # its pointers' batched delete (due RELEASE_DELAY after they were collected, with the work) leaves
        # before the commands below, so it does not land between the two counts (it did, on a loaded host)
        await asyncio.sleep(2 * RELEASE_DELAY)
        for _ in range(2):  # commands of the session's own queue: the first's reply comes after the read's, and
            await bob.request("datasets", {})  # the second after the give-up that reply set off
        before = (await bob.status())["bytes"]
        await remote.load({k: v + 1 for k, v in model.state_dict().items()})
        assert (await bob.status())["bytes"] == before, f"after a {stop}: a kept read was left and copied"


async def test_a_session_keeps_a_bounded_number_of_reads_and_a_delete_ends_them(fedzmq_daemons):
    """A client that asks for states and reads none: past MAX_KEPT_READS its state requests are refused,
    clearly, and deleting the model ends every read (the quota alone allowed 33 million, whose ending on
    a delete or at the session's end took seconds)."""
    [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=CHUNK_ARGS)
    bob = handle.worker
    torch.manual_seed(0)
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(600)])
    remote = await bob.send(model)
    held = (await bob.status())["bytes"]
    reported = 0
    with pytest.raises(fz.LimitExceeded) as refused:
        for _ in range(MAX_KEPT_READS):
            state = await bob.request("module_state", {"obj": remote.id})
            reported += sum(not isinstance(v, torch.Tensor) for v in state.values())
    assert "at most" in str(refused.value)
    assert MAX_KEPT_READS - 1200 < reported <= MAX_KEPT_READS
    assert (await bob.status())["bytes"] == held + reported * KEPT_READ_BYTES
    other = await bob.send(_model())
    await bob.request("module_state", {"obj": other.id})  # one read of another model, left unread
    await bob.request("delete", {"objs": [remote.id]})
    remote.mark_deleted()
    # the model and its reads are gone, but the tables that held them are as big while a read is left
    assert (await bob.status())["bytes"] >= reported * KEPT_READ_BYTES
    await bob.request("delete", {"objs": [other.id]})
    other.mark_deleted()
    assert (await bob.status())["bytes"] == 0


def test_entries_a_command_made_are_held_in_place_of_its_reservation_not_beside_it():
    """A fit over hosted clients reserves room for the sums it makes; reporting them as kept reads must
    not charge them a second time beside that reservation (a session at a tight quota would lose the round's
    training to a refusal after it ran), and once the reservation ends they stay charged until read."""
    from fedzmq.worker.kept import KeptReads
    from fedzmq.worker.quota import Quota

    sums = torch.zeros(4096, dtype=torch.float64)  # 32 KiB
    quota = Quota(sums.numel() * 8 + KEPT_READ_BYTES)
    kept = KeptReads(quota)
    with quota.reserving(sums.numel() * 8):
        [token] = kept.report_made(1, nn.Linear(2, 2), [(0, sums)])
    assert quota.held >= sums.numel() * 8
    kept.end(token)
    assert quota.held < sums.numel() * 8
