"""A model's state written in pieces is one write (docs/api.md, "fz.Limits"): an entry bigger than a chunk
is streamed by ``module_write`` commands before the command that loads the small ones. A refused load
raises the worker's refusal and changes nothing, whichever part of the state is wrong; a load or a send
cancelled part-way leaves the remote model as it was before or as it is after, never part of each. On
in-process workers and on daemons alike."""

import asyncio

import pytest
import torch
from torch import nn

import fedzmq as fz
from fedzmq.testing.datasets import write_dataset
from fedzmq.worker.datasets import Dataset

pytestmark = pytest.mark.timeout(120)

#: both sides' chunk: the first layer's 64x256 weight (64 KiB) and the second's 64x64 one stream in pieces
LIMITS = fz.Limits(chunk_bytes=4096)
SETTINGS = fz.ConnectionSettings(limits=LIMITS)
CHUNK_ARGS = ["--chunk-bytes", "4096"]


def _model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(256, 64), nn.Linear(64, 64))


def _filled(model: nn.Module, value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full_like(tensor, value) for name, tensor in model.state_dict().items()}


@pytest.fixture(params=["virtual", "daemon"])
async def bob(request, fedzmq_daemons, tmp_path):
    features, labels = torch.randn(32, 256), torch.randint(0, 64, (32,))
    if request.param == "virtual":
        async with fz.VirtualWorker("bob", settings=SETTINGS, config=fz.WorkerConfig(limits=LIMITS),
                                    datasets={"toy": Dataset("toy", features, labels)}) as worker:
            yield worker
    else:
        path = write_dataset(tmp_path / "toy.safetensors", features, labels)
        [handle] = await fedzmq_daemons("bob", settings=SETTINGS, args=[*CHUNK_ARGS, "--open-data", f"toy={path}"])
        yield handle.worker


REFUSED = {
    "an inline entry of another dtype": {"1.bias": torch.zeros(64, dtype=torch.float64)},
    "a streamed entry of another shape, as many bytes": {"0.weight": torch.zeros(256, 64)},
    "a streamed entry of another shape, fewer bytes": {"0.weight": torch.zeros(64, 128)},
    "a streamed entry of another dtype, as many bytes": {"0.weight": torch.ones(64, 256, dtype=torch.int32)},
    "a streamed entry of another dtype, more bytes": {"0.weight": torch.zeros(64, 256, dtype=torch.float64)},
    "a good streamed entry and an unknown name": {"0.weight": torch.zeros(64, 256), "nope": torch.zeros(3)},
    "a good streamed entry and a bad inline one": {"0.weight": torch.zeros(64, 256),
                                                  "1.bias": torch.zeros(3)},
}


@pytest.mark.parametrize("case", list(REFUSED))
async def test_a_refused_load_raises_and_changes_nothing(bob, case):
    """``await ptr.load(state)`` raised nothing when the worker refused the load (its future held the
    refusal), and the entries streamed before the load were written unchecked: bytes of another dtype
    reinterpreted, a bigger entry written in part, good streamed entries written beside a bad inline one.
    Every entry is now checked before any piece is written."""
    model = _model()
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    remote = await bob.send(model)
    with pytest.raises(fz.BadRequest):
        await remote.load(REFUSED[case])
    after = (await remote.get()).state_dict()
    changed = [name for name, tensor in after.items() if not torch.equal(tensor, before[name])]
    assert not changed, f"{case}: the refused load changed {changed}"


async def test_a_load_in_pieces_loads_every_entry(bob):
    model = _model()
    remote = await bob.send(model)
    await remote.load(_filled(model, 2.0))
    assert all(torch.equal(t, torch.full_like(t, 2.0)) for t in (await remote.get()).state_dict().values())


@pytest.mark.parametrize("how", ["load", "send", "fit"])
async def test_a_write_cancelled_part_way_leaves_no_torn_model(bob, how):
    """Cancelled while its big entries were being streamed, a load, a send of a model the worker has, or a
    fit that loads weights left the remote model part old, part new, and later commands used it. Now a
    write stops at once when cancelled, and one that stopped after its first piece discards the remote
    model: its pointer's commands fail with ``ObjectNotFound``, and the next send of the model sends it
    whole. Whatever the cancel point, no command ever sees a torn model."""
    outcomes = set()
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008):
        model = _model()
        model.load_state_dict(_filled(model, 0.0))
        remote = await bob.send(model)
        new = _filled(model, 1.0)
        if how == "load":
            task = asyncio.ensure_future(remote.load(new))
        elif how == "send":
            model.load_state_dict(new)
            task = asyncio.ensure_future(bob.send(model))
        else:
            task = asyncio.ensure_future(remote.fit("toy", steps=1, batch_size=16, load=new,
                                                    optimizer={"cls": "SGD", "lr": 0.0}))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
            outcomes.add("done")
        except asyncio.CancelledError:
            outcomes.add("discarded" if remote.deleted else "cancelled")
        if remote.deleted:
            with pytest.raises(fz.ObjectNotFound):
                await remote.get()
            model.load_state_dict(new)
            remote = await bob.send(model)  # sent anew, whole
            assert not remote.deleted
        state = (await remote.get()).state_dict()
        values = {float(v) for tensor in state.values() for v in tensor.unique()}
        assert values in ({0.0}, {1.0}), f"{how} cancelled after {delay} s left the model torn: {values}"
        await remote.delete()
    assert "discarded" in outcomes, f"no cancel came after the first piece: {outcomes}"


async def test_a_model_read_cancelled_part_way_is_whole_or_not_at_all(bob):
    """``ModulePointer.get`` lands each piece straight in the local model (no second copy of it): cancelled
    between two pieces, it left the local model part old, part new. Once a piece has landed it finishes."""
    seen = set()
    for delay in (0.0, 0.0005, 0.001, 0.002, 0.004, 0.008):
        model = _model()
        model.load_state_dict(_filled(model, 0.0))
        remote = await bob.send(model)
        model.load_state_dict(_filled(model, 7.0))
        task = asyncio.ensure_future(remote.get())
        await asyncio.sleep(delay)
        task.cancel()
        try:
            await task
            seen.add("done")
        except asyncio.CancelledError:
            seen.add("cancelled")
        values = {float(v) for tensor in model.state_dict().values() for v in tensor.unique()}
        assert values in ({0.0}, {7.0}), f"get cancelled after {delay} s left the local model torn: {values}"
        await remote.delete()
    assert "cancelled" in seen


async def test_a_fit_over_clients_refused_on_the_client_writes_nothing(bob):
    """``fit_clients`` checked its keywords, its local model and its number of clients after it had
    streamed the load's big entries: a mistyped keyword left the model part new (a cold review's find).
    They are checked before anything is sent."""
    model = _model()
    model.load_state_dict(_filled(model, 0.0))
    remote = await bob.send(model)
    with pytest.raises(TypeError, match="unexpected"):
        await remote.fit_clients(["c0"], "toy", combine=True, load=_filled(model, 1.0), batch_sise=16)
    assert not remote.deleted
    values = {float(v) for tensor in (await remote.get()).state_dict().values() for v in tensor.unique()}
    assert values == {0.0}


async def test_a_load_whose_outcome_task_is_cancelled_before_it_ran_leaves_no_coroutine_unawaited():
    """``start_load`` returns a task for the load's outcome; cancelled before its first step (``load``
    cancelled right after sending, as a cancellation sweep found), the reply's wait it was handed was
    never awaited: "coroutine 'RemoteWorker.wait_reply' was never awaited". It makes that wait itself."""
    import gc
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        async with fz.VirtualWorker("w") as worker:
            remote = await worker.send(nn.Linear(2, 2))
            outcome = await remote.start_load(nn.Linear(2, 2).state_dict())
            outcome.cancel()
            await asyncio.wait([outcome])
            assert outcome.cancelled()
            del outcome
        gc.collect()
    assert not [w for w in caught if "never awaited" in str(w.message)], [str(w.message) for w in caught]
