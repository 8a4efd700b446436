"""Remote errors read well (issue 15, item 10): the type once, then the worker's words, naming the pointer the
error is about instead of a bare object number; the local classes still match the remote types."""

import traceback

import pytest
import torch

import fedzmq as fz
from fedzmq.worker.datasets import Dataset


def headline(error: BaseException) -> str:
    """The line Python prints for an uncaught exception (``module.Type: text``), without the remote traceback."""
    return traceback.format_exception_only(type(error), error)[0].splitlines()[0]


def open_toy() -> Dataset:
    return Dataset("toy", torch.randn(8, 4), torch.arange(8) % 2, policy="open")


async def check_refused_get_names_the_pointer(worker: fz.RemoteWorker, features: fz.TensorPointer) -> None:
    with pytest.raises(fz.PermissionDenied) as info:
        await features.get()
    error = info.value
    line = headline(error)
    assert line.count("PermissionDenied") == 1, line
    assert line.startswith("fedzmq.errors.PermissionDenied: ")
    assert f"object {features.id}" not in str(error)
    assert features.describe() in line
    assert f"on {worker.id!r}" in features.describe()
    assert isinstance(error, PermissionError) and error.remote_type == "PermissionDenied"


async def test_a_refused_get_names_the_pointer_on_an_in_process_worker(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob", datasets={"bob": {"toy": open_toy()}})
    [ds] = await bob.datasets()
    await check_refused_get_names_the_pointer(bob, (await ds.features())[0:2])


async def test_a_refused_get_names_the_pointer_on_a_daemon(fedzmq_daemons, fedzmq_digits):
    shards = fedzmq_digits("bob")
    [bob] = await fedzmq_daemons("bob", args={"bob": ["--open-data", f"digits={shards.paths['bob']}"]})
    [ds] = await bob.worker.datasets()
    await check_refused_get_names_the_pointer(bob.worker, (await ds.features()) * 2)


async def test_remote_types_keep_their_classes_and_read_once(fedzmq_virtual_workers):
    [bob] = await fedzmq_virtual_workers("bob")
    a = await bob.send(torch.ones(2, 3))
    bad = a @ a
    with pytest.raises(RuntimeError) as info:  # a remote RuntimeError is still a RuntimeError
        await bad
    line = headline(info.value)
    assert line.startswith("fedzmq.errors.RemoteRuntimeError: ") and line.count("RuntimeError") == 1, line
    assert "must have same reduction dim" in line
    assert "Remote traceback" in str(info.value)  # the worker's traceback still follows
    # a later use of the failed value names the pointer that was never made
    with pytest.raises(RuntimeError) as info:
        await (bad + 1)
    assert bad.describe() in str(info.value) and f"object {bad.id} " not in str(info.value)
    # an unknown object is still a KeyError
    gone = await bob.send(torch.zeros(1))
    await gone.delete()
    with pytest.raises(KeyError) as missing:
        await bob.request("get", {"obj": gone.id})
    assert isinstance(missing.value, fz.ObjectNotFound)
    assert headline(missing.value).count("ObjectNotFound") == 1
    # a type this client does not know keeps its name in the text
    unknown = fz.errors.remote_error("OutOfMemoryError", "CUDA out of memory")
    assert type(unknown) is fz.RemoteError and str(unknown) == "OutOfMemoryError: CUDA out of memory"


async def test_a_refusal_carries_no_traceback_and_an_error_a_short_one(fedzmq_virtual_workers):
    """A peer chooses which errors a daemon makes. Python's full traceback text (each frame's source line
    read and parsed) cost the daemon several times the failed command: in a flood of requests for objects
    that do not exist, most of the daemon's time. A refusal fedzmq makes on purpose now carries no
    traceback (its message says what went wrong); another error carries file, line and function per
    frame, without source lines."""
    [bob] = await fedzmq_virtual_workers("bob")
    with pytest.raises(fz.ObjectNotFound) as missing:
        await bob.request("get", {"obj": 987_654})
    assert missing.value.remote_traceback == ""
    a = await bob.send(torch.ones(2, 3))
    with pytest.raises(RuntimeError) as bad:
        await (a @ a)
    text = bad.value.remote_traceback
    assert text.startswith("Traceback (most recent call last):"), text
    assert 'File "' in text and ", line " in text and ", in " in text
    assert "must have same reduction dim" in text.splitlines()[-1]
    assert "^^^" not in text  # no source lines, so no carets under them


def test_a_workers_traceback_keeps_causes_collapses_recursion_and_survives_a_failing_message():
    from fedzmq.errors import compact_traceback, error_payload

    def deep(n):
        return deep(n + 1)

    with pytest.raises(RecursionError) as recursion:
        deep(0)
    text = compact_traceback(recursion.value)
    assert "more times]" in text and len(text.splitlines()) < 20

    try:
        try:
            {}["k"]
        except KeyError as exc:
            raise ValueError("wrapped") from exc
    except ValueError as exc:
        chained = compact_traceback(exc)
    assert chained.index("KeyError") < chained.index("direct cause") < chained.index("ValueError: wrapped")

    class Unprintable(Exception):
        def __str__(self):
            raise RuntimeError("no")

    try:
        raise Unprintable()
    except Unprintable as exc:
        assert error_payload(exc, compact_traceback(exc))["message"] == "<exception str() failed>"
