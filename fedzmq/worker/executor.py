"""The worker's one request pipeline: every queued command goes through the same steps.

    bind ─► release check ─► charges (sized before running) ─► handler (event loop or torch thread)
         ─► label what it wrote and made ─► store outputs ─► reply (errors sanitized when private)

The command table declares, per command, what it references, writes, derives, releases and charges
(``fedzmq.commands.Command``); this module applies those declarations, the same way for every command.
Handlers (``fedzmq.worker.handlers``) only do their own work on a ``Binding``: none of them checks a
label, a release or a quota.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from typing import Any, Sequence

import torch
from torch import nn

from ..budget import Budget, running_under
from ..codec import Request, check_message, encode_error, encode_reply
from ..commands import COMMANDS, Command
from ..errors import (BadRequest, FedzmqError, LimitExceeded, ProtocolError, RemoteError, compact_traceback,
                      error_payload)
from ..modeldesc import checks_values
from ..ops import value_checked
from ..torchmodes import default_modes
from .binding import Binding, Context, Made, bind, ref_ids
from .charges import CHARGES, CREATED_STATE_COPIES
from .fairpool import FairPool, FairTurn
from .cost import INLINE_NUMEL
from .handlers import HANDLERS
from .handlers.modules import load_into
from .handlers.tensors import graph_nodes
from .loads import metrics_label, relabel_loaded, withheld_loss
from .objects import (DependencyError, HostedModule, HostedOptimizer, costly_to_free, module_tensors,
                      optimizer_state, tensors_of)
from .policy import sanitized
from .randomness import GENERATOR_TURN, MAY_DRAW, OwnGenerator, generator_turn_on_the_loop, may_draw
from .session import Session
from .taint import Label, storage_key

log = logging.getLogger("fedzmq.worker")

#: a ``delete`` of more ids than this runs on a torch thread (freeing many objects takes a while)
INLINE_DELETES = 256
#: the autograd nodes charged for a forward that could not be sized (an owner's registered model that does
#: not run on the meta device)
UNSIZED_FORWARD_NODES = 256
#: a fit runs on the event loop, without the hop to a torch thread and back (which costs about as much
#: as a tiny fit), when its model has at most ``INLINE_FIT_NUMEL`` elements, it trains on at most
#: ``INLINE_FIT_ROWS`` rows (steps x batch size), and the same fit of the same model last took at most
#: ``INLINE_FIT_SECONDS`` of the process's CPU (measured, not predicted: a model's cost is the client's to
#: choose; all threads' CPU, so torch's intra-op threads count, and a loaded machine's waits do not).
#: ``INLINE_FIT_NUMEL``: 2^20 float32 elements (4 MiB) are about what loading a round's weights copies in
#: that 2 ms; past it the copy alone would use the budget, so such a model always trains on a torch thread
INLINE_FIT_NUMEL = 1 << 20
INLINE_FIT_ROWS = 64
INLINE_FIT_SECONDS = 0.002
#: a fit on the event loop that runs this long after all (its measurement no longer holds: denormal
#: weights loaded, say) is stopped with an error instead of holding the loop
INLINE_FIT_DEADLINE = 0.5

#: the context of a command that records no graph in place of ``Quota.charging_saved_tensors`` (it holds nothing,
#: so one serves all)
_NO_SAVED_TENSORS = contextlib.nullcontext()

CHARGE_NAMES = {"outputs": "its outputs",
                "forward": "the forward's intermediates (row by row, in an evaluation; and the backward's, in a fit)",
                "batch": "the batch it copies out of the dataset",
                "state": "the optimizer's state (and FedProx's anchor)", "stream": "the stream's buffer",
                "clients": "the clients' trained states", "secure": "the secure round's copies of the model",
                "copies": "the copies of entries it cannot adopt", "gradient": "the gradient's copy"}


class Executor:
    def __init__(self, context: Context, pool: FairPool, counters: dict[str, int],
                 own_generator: OwnGenerator | None = None) -> None:
        self.context = context
        self.pool = pool
        self.counters = counters
        #: an in-process worker's random state (``fedzmq.worker.randomness``); None in a daemon, whose
        #: process's default generator is its own
        self.own_generator = own_generator
        #: a daemon's commands that may draw wait here for their turn of its process's generator (one at a time
        #: holds ``GENERATOR_TURN`` on a torch thread; the lock stays for other workers embedded in the process)
        self.generator_turn = FairTurn()  # (taken by client keys in turn, as the torch threads are)
        missing = [name for name in COMMANDS if name not in HANDLERS]
        if missing:
            raise RuntimeError(f"no handler for commands {missing}")

    def control(self, session: Session, request: Request) -> list[Any]:
        """Answer a control command at once (ping, heartbeat, status): no queue, no torch work."""
        try:
            return encode_reply(request.id, HANDLERS[request.cmd](self.context, _unbound(session, request)))
        except Exception as exc:
            return encode_error(request.id, error_payload(exc, ""))

    async def execute(self, session: Session, request: Request) -> list[Any]:
        """Run one queued command; returns the reply's frames. A tensor in the reply is not copied: its
        frames are the tensor's own memory (the server holds the session's commands that may change
        memory until ZeroMQ has sent them: ``Command.changes_nothing``).

        An op sent with ``fetch`` is an op and then a ``get`` of its output, run as the two commands
        would run one after the other (the get bound, checked for release and answered as any get),
        in one reply: ``{"result": <the op's>, "value": <the get's>}``, or ``"error"`` in place of
        ``"value"`` when the get failed; the op's own failure is the reply's error, as for any op."""
        ok, outcome = await self._outcome(session, request)
        if not ok:
            return encode_error(request.id, outcome)
        if request.cmd == "op" and request.args.get("fetch") is True:
            get = fetch_of(request)
            if get is None:
                fetched, value = False, error_payload(BadRequest.new("fetch needs an op with one output"), "")
            else:
                fetched, value = await self._outcome(session, get)
            outcome = {"result": outcome, "value" if fetched else "error": value}
        frames = encode_reply(request.id, outcome)
        try:  # a reply the client would refuse to read could name no request: it would drop the connection
            check_message(frames, self.context.config.limits)
        except ProtocolError as exc:
            return encode_error(request.id, error_payload(LimitExceeded.new(
                f"the reply of {request.cmd} is more than one message carries: {exc}; ask for less at a time"), ""))
        return frames

    async def _outcome(self, session: Session, request: Request) -> tuple[bool, Any]:
        """Run one command: (True, its result) or (False, the error's payload)."""
        command = COMMANDS[request.cmd]
        binding: Binding | None = None
        session.budget = Budget(self.context.config.max_command_seconds)
        try:
            binding = bind(session, request, command, self.context)
            self._check_release(binding)
            self._check_failure_disclosed(binding)
            result = await self._run(binding)
            result = self._record(binding, result)
            if binding.extra.get("withhold_loss"):
                result = withheld_loss(result)
            return True, result
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            return False, self._failed(session, request, command, binding, exc)
        finally:
            session.budget = None

    # --- the steps ------------------------------------------------------------------------------------

    def _check_release(self, binding: Binding) -> None:
        if binding.command.reports_metrics:
            # a metric is a function of the weights it is computed with: one whose weights hold one row's
            # values, loaded from a pointer, reported them to 1e-5 through its loss; one trained under
            # secure aggregation and loaded with all else crafted, every weight in ten evaluations (two
            # red-team sessions' attacks). So the weights after the command's own load must be
            # releasable: a round's, loaded whole (now or before), are; what was trained here is not
            label = metrics_label(binding)
            if binding.command.name == "fit" and self.context.policy.require_secure_aggregation and \
                    binding.dataset is not None and not self.context.policy.releases(binding.data_label, "state",
                                                                                     False):
                # under secure aggregation a fit's loss over protected rows never leaves: the coordinator
                # chooses which rows a fit covers (batch size, steps, seed), and losses of overlapping row
                # sets differ by single rows' terms (a red team read whole rows from two fits of batch 16
                # and 17; with unnested sets it is a linear system of about one fit per row). Open rows too,
                # unless the terms release their aggregates (``--private-release aggregates``)
                binding.extra["withhold_loss"] = True
            elif binding.command.name == "fit" and label and not label & ~Label.SECURE:
                # only secure aggregation's label stands in the way (weights trained here, or an entry
                # streamed in pieces, never overwritten whole): the fit runs, as a round needs, its update
                # leaves masked as always, and its loss is withheld (``withheld_loss``)
                binding.extra["withhold_loss"] = True
            else:
                self.context.policy.check_release(label, "state", False, "the model's weights (or the state it "
                                                  "loads), which its metrics would tell,")
        releases = binding.command.releases
        if releases is None:
            return
        policy, taint = self.context.policy, binding.session.taint
        if releases == "masked":
            if "module" in binding.objects:
                policy.check_release(binding.label, "masked", False, "the model")
            return
        if releases == "after":
            if binding.args.get("reply_state"):
                policy.check_release(self.made_label(binding), "state", False, "the trained model")
            return
        obj_id = binding.request.args[releases]
        if isinstance(binding.objects[releases], HostedModule):
            policy.check_release(binding.label, "state", False, f"object {obj_id}")
        else:
            policy.check_release(binding.label, "value", obj_id in taint.released, f"object {obj_id}")

    def _check_failure_disclosed(self, binding: Binding) -> None:
        """Refuse, before it runs, a call that torch would check labelled values in (``Command.fails_on_values``):
        its failure or success would be one bit of them, and bits make values (a red team read rows'
        labels and pixels by bisection on whether ``table[row_value - lo]`` failed). Decided on labels, dtypes
        and the model's structure only, so the answer is the same whatever the values are."""
        where = binding.command.fails_on_values
        if where is None or not binding.label:
            return
        policy, taint = self.context.policy, binding.session.taint
        if where == "op":
            op = binding.args["op"]
            for param, tensor in value_checked(op, binding.args["args"], binding.args["kwargs"]):
                policy.check_failure_disclosed(taint.of_tensor(tensor), f"the {param!r} of {op}")
        elif checks_values(binding.objects["obj"].module):
            policy.check_failure_disclosed(binding.label, "the input (or the weights) of a model that indexes "
                                                          "with its values or checks them")

    async def _run(self, binding: Binding) -> Any:
        if self.context.delay:
            await asyncio.sleep(self.context.delay)
        command = binding.command
        if command.name in MAY_DRAW and may_draw(command, binding):  # (``fedzmq.worker.randomness``)
            binding.draws = True
            if self.own_generator is not None:  # on the event loop's thread, where the caller's coroutines
                async with generator_turn_on_the_loop():  # cannot draw while its state is swapped in (nor an
                    return self._call(binding, self._charge(binding))  # embedded daemon engine's torch thread)
            # a daemon's: on a torch thread, in the generator's turn (which the event loop must never wait for),
            # waited for here, before a thread is taken: a thread waiting for it had been a thread that no other
            # session's work could have (two of them held a daemon of two threads for a whole fit)
            # Holding it, it goes first in its key's queue: behind the key's other work (its other sessions'
            # fits, each to the limit), every other key's drawing command waited for all of it (red team h37)
            async with self.generator_turn.turn(turn_key(binding.session)):
                return await self.pool.run(turn_key(binding.session), self._charge_and_call, binding, first=True)
        if command.offload == "always" or (command.offload == "large" and self._large(binding)):
            return await self.pool.run(turn_key(binding.session), self._charge_and_call, binding)
        if command.name == "fit":  # measured fast; if that no longer holds, it stops soon, with an error
            binding.session.budget = Budget(min(self.context.config.max_command_seconds, INLINE_FIT_DEADLINE),
                                            "the limit for a fit on the event loop")
        reserve = self._charge(binding)  # small inputs: sizing them is cheap enough for the event loop
        if binding.cost is not None and binding.cost.numel > INLINE_NUMEL:  # a small op with a big output
            # charged here, before it waits for a thread: what it will make is reserved from now on (reserved
            # only on the thread, a send was taken in beside it meanwhile, red team h40), until it is stored
            with binding.session.quota.reserving(reserve):
                return await self.pool.run(turn_key(binding.session), self._call_on_thread, binding, 0)
        result = self._call(binding, reserve)
        if command.name == "fit":
            self.counters["inline_fits"] += 1
        return result

    def _large(self, binding: Binding) -> bool:
        if binding.command.name == "delete":  # freeing takes a while: many objects, or big ones
            objects = binding.session.table.objects
            return len(binding.args["objs"]) > INLINE_DELETES or \
                any(costly_to_free(objects.get(obj_id)) for obj_id in binding.args["objs"])
        if binding.command.name == "fit":  # a fit small enough for the loop still takes its turn behind its
            # key's work waiting for a thread (other sessions' sends and fits, sent before it): run at once, a
            # hosted client's refits went before its neighbours' first fits, again and again
            return not small_fit(binding) or self.pool.has_waiting(turn_key(binding.session))
        if binding.command.name == "optim_create":  # Adagrad fills its state when made; the others make none
            return binding.args.get("cls") in CREATED_STATE_COPIES
        if binding.command.name == "optim_zero_grad":  # zeroed in place, every gradient written
            groups = binding.objects["obj"].optimizer.param_groups
            return binding.args.get("set_to_none", True) is False and \
                sum(p.grad.numel() for g in groups for p in g["params"] if p.grad is not None) > INLINE_NUMEL
        if binding.command.name == "grad":  # a copy of the whole gradient
            gradient = binding.objects["obj"].grad
            return gradient is not None and gradient.numel() > INLINE_NUMEL
        if binding.command.name == "get":  # its memory is sent as it is, unless a view must be copied in order
            tensor = binding.objects["obj"]  # (one past a chunk is streamed: its reply says how, at once)
            chunk = binding.session.reply_chunk(self.context.config.limits.chunk_bytes)
            return not tensor.is_contiguous() and INLINE_NUMEL < tensor.numel() and \
                tensor.numel() * tensor.element_size() <= chunk
        return sum(t.numel() for t in binding.tensors) > INLINE_NUMEL

    def _charge_and_call(self, binding: Binding) -> Any:
        self._start_budget(binding)
        return self._call(binding, self._charge(binding))

    def _call_on_thread(self, binding: Binding, reserve: int) -> Any:
        self._start_budget(binding)
        return self._call(binding, reserve)

    @staticmethod
    def _start_budget(binding: Binding) -> None:
        """A command's seconds count from when a torch thread takes it (``Budget.start``); a session that
        ended while it waited has no budget any more, and ``_charge`` or the handler stops it."""
        budget = binding.session.budget
        if budget is not None:
            budget.start()

    def _charge(self, binding: Binding) -> int:
        """Size the command's declared charges and check they fit, before anything is made, beside the
        request's own bytes: its arguments stay in memory while it runs (a 15 MiB operand and the 15 MiB
        product reserved for it were taken in under a 16 MiB quota, h38). They stop counting here
        (``Quota.starting``): what the command keeps of them, it is charged."""
        try:
            return self._check_charges(binding)
        finally:
            binding.session.quota.starting = 0

    def _check_charges(self, binding: Binding) -> int:
        kinds = [kind for kind in binding.command.charges if kind != "graph"]
        if not kinds:
            return 0
        budget = binding.session.budget
        if budget is None:  # its session ended (and its command was given up) before a torch thread took it
            raise LimitExceeded.new("the command was stopped: its session ended")
        # under the command's time budget: sizing a forward runs its program on the meta device, and a
        # description of nested modules each calling its child 8 times made 8^8 calls (hours of a torch thread)
        with default_modes(), running_under(budget):
            parts = {kind: CHARGES[kind](self.context, binding) for kind in kinds}
        nbytes = sum(parts.values())
        quota = binding.session.quota
        if nbytes and nbytes > quota.room():  # the message is written only for a refusal
            what = binding.command.name + (f" ({binding.args['op']})" if binding.command.name == "op" else "")
            detail = "; ".join(f"{CHARGE_NAMES[kind]}: {n}" for kind, n in parts.items() if n)
            quota.check(nbytes, f"{what} ({detail})")
        return nbytes

    def _call(self, binding: Binding, reserve: int) -> Any:
        """Run the handler (on whichever thread), then label what it wrote. A fit of ``steps`` records
        what it cost on its module (``small_fit`` reads it): infinitely much if it failed."""
        if binding.command.name != "fit" or "steps" not in binding.args:
            return self._run_handler(binding, reserve)
        started, cost = time.process_time(), math.inf
        try:
            result = self._run_handler(binding, reserve)
            cost = time.process_time() - started
            return result
        finally:
            binding.objects["module"].last_fit = (fit_key(binding), cost)

    def _run_handler(self, binding: Binding, reserve: int) -> Any:
        """The handler, with what it will make (``reserve``, its checked charges) reserved from here to its end:
        reserved around the handler alone, a fit's charges were not while it loaded its weights (a second's
        copy), and its session's next request was taken in beside it, past the quota (red team h40)."""
        with binding.session.quota.reserving(reserve):
            return self._run_reserved(binding)

    def _run_reserved(self, binding: Binding) -> Any:
        session, command = binding.session, binding.command
        # What a command wrote is labelled even when it then fails (``finally``): a red team loaded rows into
        # a model, or trained it, or ran a forward that wrote rows into a buffer, and then made the command
        # fail (an overlapping source, a failing metric, one output id too many): what was written kept
        # the model's old label, and module_state gave it out. Only a load that completed lowers a label.
        assert session.budget is not None
        if command.writes in ("module", "optimizer") and session.kept.uncopied:  # entries a read has yet to fetch
            with running_under(session.budget):  # (beside what it will make, reserved)
                session.kept.keep_before_write(may_write(binding), self.context.config.max_command_seconds)
        if command.loads and "load" in binding.args:  # the client's weights first, as a module_load would:
            # a write like any other, labelled with what it copied (and the module): not the rows read later
            loading = _WriteWatch(binding) if binding.label else None
            try:
                with default_modes(), running_under(session.budget):
                    load_into(binding.objects["module"].module, binding.args["load"],
                              self.context.config.max_command_seconds)
            finally:
                if loading is not None:
                    session.taint.mark(loading.written(), binding.label)
            if loading is not None:
                relabel_loaded(binding)
        label = self.made_label(binding)
        # a backward's gradients are computed from what its graph saved, as it is now: labelled by them too
        # (``Quota.reading_saved_tensors``), whatever the root's label; nothing to find in an unlabelled session
        reads_saved = command.writes == "graph" and bool(session.taint)
        watch = _WriteWatch(binding) if command.writes and (label or reads_saved) else None
        # what autograd saves is charged where a graph may be recorded: not for an op on tensors that need no
        # gradient (the operands' ``requires_grad`` is part of the signature its cost is kept under)
        graph = "graph" in command.charges and (binding.cost is None or binding.cost.records_graph)
        unpacked: list[torch.Tensor] = []
        # (a backward records no graph and is charged nothing: one context serves both, as no-op for the others)
        saved = session.quota.charging_saved_tensors() if graph else \
            session.quota.reading_saved_tensors(unpacked) if reads_saved else _NO_SAVED_TENSORS
        try:
            with (default_modes(), running_under(session.budget),
                  session.quota.reserving(0, covers_saved=graph), saved):  # (its bytes: ``_run_handler``'s)
                try:
                    result = HANDLERS[command.name](self.context, binding) if not binding.draws else \
                        self._drawing(binding)
                finally:
                    if command.writes is not None:  # even a step that failed half-way may have made some state
                        self._recount_optimizers(binding)
        finally:
            if watch is not None:
                session.taint.mark(watch.written(), label | session.taint.of(unpacked))
        if watch is not None and command.name == "module_load":
            relabel_loaded(binding)
        return result

    def _drawing(self, binding: Binding) -> Any:
        """The handler of a command that may draw, holding an in-process worker's own random state or a daemon's
        turn of its process's generator (``fedzmq.worker.randomness``)."""
        if self.own_generator is not None:
            with self.own_generator:
                return HANDLERS[binding.command.name](self.context, binding)
        asked = time.monotonic()
        with GENERATOR_TURN:
            # its wait for the turn (another embedded worker's command, up to its own limit) is not its own
            # running: counted, it stopped an honest fit before its first step. Its sizing still counts (a
            # restart of its seconds here let a command run for twice its limit)
            if binding.session.budget is not None:
                binding.session.budget.extend(time.monotonic() - asked)
            return HANDLERS[binding.command.name](self.context, binding)

    @staticmethod
    def _recount_optimizers(binding: Binding) -> None:
        """An optimizer's state grows with its first steps: charge it anew after a command that stepped it."""
        for name, value in binding.objects.items():
            if isinstance(value, HostedOptimizer):
                binding.session.recount(binding.request.args[name])

    def made_label(self, binding: Binding) -> Label:
        """The label of what the command writes and makes (``Command.derives``)."""
        if binding.command.derives == "trained":
            return self.context.policy.trained | binding.label
        return binding.input_label

    def _record(self, binding: Binding, result: Any) -> Any:
        """Store what the handler made under the command's output ids, labelled."""
        if not isinstance(result, Made):
            return result
        session, args = binding.session, binding.request.args
        ids = args[binding.command.outputs[0]]
        ids = ids if isinstance(ids, list) else [ids]
        if len(result.values) != len(ids):
            raise RuntimeError(f"{binding.command.name} made {len(result.values)} objects for {len(ids)} ids")
        label = self.made_label(binding)
        values, result.values = result.values, []  # the thread's future still holds ``result``: not them
        inputs: set[int] | None = None  # found only for an output with a graph (not on the hot path)
        for obj_id, value in zip(ids, values):
            if isinstance(value, torch.Tensor) and value.grad_fn is not None:
                if inputs is None:
                    inputs = set(ref_ids(args))
                made = binding.cost.calls if binding.cost is not None else \
                    binding.extra.get("calls", UNSIZED_FORWARD_NODES)
                session.put(obj_id, value, made, inputs)
            else:
                session.put(obj_id, value)
            session.taint.mark(tensors_of(value), label)
            if binding.command.name == "op" and isinstance(value, torch.Tensor) and \
                    self.context.policy.released_when_made(args["op"], label, value.numel()):
                session.taint.released.add(obj_id)
        return result.result

    def _failed(self, session: Session, request: Request, command: Command, binding: Binding | None,
                exc: Exception) -> dict[str, Any]:
        self.counters["errors"] += 1
        if isinstance(exc, LimitExceeded):
            self.counters["limit_errors"] += 1
        private = binding.touches_private if binding is not None else command.reads_dataset
        if isinstance(exc, DependencyError):  # the first failure, as it was reported (sanitized if private)
            payload = {"type": exc.remote_type, "message": exc.remote_message,
                       "traceback": exc.root.get("traceback", "")}
        elif private:
            log.log(logging.DEBUG if isinstance(exc, RemoteError) else logging.WARNING,
                    "request %d (%s) of session %s failed on private data", request.id, request.cmd,
                    session.key.hex(), exc_info=exc)
            payload = sanitized(exc, request.id)
        else:
            # a refusal made on purpose says all in its message; other errors get where they happened
            unexpected = self.context.policy.tracebacks and not isinstance(exc, FedzmqError)
            text = compact_traceback(exc) if unexpected else ""
            payload = error_payload(exc, text)
        root = exc.root if isinstance(exc, DependencyError) else payload
        fail_outputs(session, request, root)
        return payload


def fetch_of(request: Request) -> Request | None:
    """The ``get`` an op sent with ``fetch`` runs after itself: of its one output (None: it has several)."""
    out = request.args["out"]
    return Request(request.id, "get", {"obj": out[0]}, client=request.client) if len(out) == 1 else None


def fail_outputs(session: Session, request: Request, error: dict[str, str]) -> None:
    """Mark the objects a command would have made as failed, so later uses report ``error``."""
    for name in COMMANDS[request.cmd].outputs:
        out = request.args.get(name)
        for obj_id in out if isinstance(out, list) else [out]:
            if type(obj_id) is int:
                session.table.fail(obj_id, error)


def _unbound(session: Session, request: Request) -> Binding:
    """A control command's binding: it references nothing."""
    return Binding(request, COMMANDS[request.cmd], session, request.args, {}, [], Label.PUBLIC)


class _WriteWatch:
    """What a command wrote, among the tensors its ``Command.writes`` says it may write: those whose
    storage is new or whose version counter moved (every in-place write bumps it, views share it), and the
    running statistics of a norm layer whose ``num_batches_tracked`` moved (``running_stats``)."""

    def __init__(self, binding: Binding) -> None:
        self.binding = binding
        self.kind = binding.command.writes
        self.leaves: list[torch.Tensor] = []
        if self.kind == "graph":  # collected now: backward frees the graph
            self.leaves = _graph_leaves(binding.objects["obj"])
        self.before = {storage_key(t.untyped_storage()): t._version for t in self._candidates()
                       if t.layout == torch.strided}

    def _candidates(self) -> list[torch.Tensor]:
        return may_write(self.binding, self.leaves)

    def _moved(self, tensor: torch.Tensor) -> bool:
        key = storage_key(tensor.untyped_storage()) if tensor.layout == torch.strided else None
        return key is None or self.before.get(key) != tensor._version

    def written(self) -> list[torch.Tensor]:
        """What the command wrote; never raises (it runs in the ``finally`` that labels a failed command's
        writes): a candidate it cannot tell about (no single storage) counts as written."""
        if self.kind in ("graph", "stream"):  # every leaf's gradient; the chunk's stream
            return self._candidates()
        written = [t for t in self._candidates() if self._moved(t)]
        if self.kind == "module":
            hosted = self.binding.objects.get("obj") or self.binding.objects["module"]
            written += [stat for tracker, stats in running_stats(hosted.module) if self._moved(tracker)
                        for stat in stats]
        return written


def running_stats(module: nn.Module) -> list[tuple[torch.Tensor, list[torch.Tensor]]]:
    """Each norm layer's ``num_batches_tracked`` with the running statistics a forward in training mode
    updates beside it. torch's batch-norm kernel writes ``running_mean`` and ``running_var`` without moving
    their version counters (``num_batches_tracked``, a Python ``add_``, moves its own), so a write watch
    that reads version counters only missed them: a red team (h25) read a row of open data exactly from a
    running mean under ``--private-release none``, and a batch's mean of protected rows under secure
    aggregation, once ``num_batches_tracked`` was loaded back whole."""
    found = []
    for sub in module.modules():  # (by their attributes: torch's norm layers share no public base class)
        tracker = getattr(sub, "num_batches_tracked", None)
        stats = [t for t in (getattr(sub, "running_mean", None), getattr(sub, "running_var", None))
                 if isinstance(t, torch.Tensor)]
        if isinstance(tracker, torch.Tensor) and stats:
            found.append((tracker, stats))
    return found


def may_write(binding: Binding, leaves: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """The tensors a command may write in place (``Command.writes``); for a backward, the gradients of
    ``leaves`` (``_graph_leaves``, found before it runs)."""
    objects, kind = binding.objects, binding.command.writes
    if kind == "module":
        hosted = objects.get("obj") or objects["module"]
        tensors = module_tensors(hosted.module)
        if isinstance(objects.get("optim"), HostedOptimizer):
            tensors += optimizer_state(objects["optim"].optimizer)
        return tensors
    if kind == "optimizer":
        optimizer = objects["obj"].optimizer
        params = [p for group in optimizer.param_groups for p in group["params"]]
        return params + [p.grad for p in params if p.grad is not None] + optimizer_state(optimizer)
    if kind == "stream":
        return [objects["obj"].tensor]
    return [leaf.grad for leaf in leaves if leaf.grad is not None]


def _graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaf tensors a backward from ``tensor`` accumulates gradients into."""
    leaves = [node.variable for node in graph_nodes(tensor)
              if isinstance(getattr(node, "variable", None), torch.Tensor)]
    if tensor.grad_fn is None and tensor.requires_grad:
        leaves.append(tensor)
    return leaves




def fit_key(binding: Binding) -> bytes:
    """What decides a fit's cost besides its model's weights: every argument but the weights loaded,
    the shuffle's seed and whether the state comes back. A digest of them (32 bytes): the key is kept on
    the model, for refused fits too, and their text was whatever the request held (an optimizer
    hyper-parameter no optimizer takes, 4 MB of NULs, kept as 16 MB of repr on each model, uncharged)."""
    return hashlib.sha256(repr(sorted((k, v) for k, v in binding.request.args.items()
                                      if k not in ("load", "seed", "reply_state", "module"))).encode()).digest()


def turn_key(session: Session) -> object:
    """Whose turn a session's torch work waits for (``FairPool``): its client key's, or without keys its
    connection's."""
    return session.user if session.user is not None else session.key


def small_fit(binding: Binding) -> bool:
    """A fit cheap enough for the event loop: a given number of steps (not epochs, whose length is the
    dataset's), one client, a small model, few rows, and the same fit measured fast last time. The
    first fit of a model always runs on a torch thread; one that turns slow (denormal weights, say)
    runs there again from the next fit on."""
    args = binding.args
    if "clients" in args or "epochs" in args or "steps" not in args:
        return False
    hosted = binding.objects["module"]
    if int(args["steps"]) * int(args["batch_size"]) > INLINE_FIT_ROWS or hosted.last_fit is None \
            or hosted.last_fit[1] > INLINE_FIT_SECONDS or hosted.last_fit[0] != fit_key(binding):
        return False
    if loads_out_of_order(args.get("load")):
        return False
    module = hosted.module
    return sum(t.numel() for t in module.parameters()) + sum(t.numel() for t in module.buffers()) <= INLINE_FIT_NUMEL


def loads_out_of_order(load: Any) -> bool:
    """Whether a fit's ``load`` copies a view of the session's tensors whose elements lie out of order: the
    key a fit is measured under leaves its weights out, and such a copy costs up to 107 ns an element, not
    the 1-2 of the weights a client sends (a red team's load of a buffer from a view permuted in 19 dims held
    the event loop 15 ms, 7x the bound, once per model measured fast)."""
    return isinstance(load, dict) and any(isinstance(t, torch.Tensor) and not t.is_contiguous() for t in load.values())


__all__ = ["Executor", "INLINE_FIT_DEADLINE", "INLINE_FIT_NUMEL", "INLINE_FIT_ROWS", "INLINE_FIT_SECONDS",
           "fail_outputs", "fetch_of", "fit_key", "loads_out_of_order", "small_fit"]
