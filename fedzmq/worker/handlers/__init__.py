"""One handler per command of ``fedzmq.commands.COMMANDS``: what a worker does with a bound request.

Handlers are plain functions of ``(context, binding)`` that do their command's own work and return the
reply's result, or ``Made`` with the objects they made. Everything a command's table entry declares
(lookups, labels, releases, charges) is applied by ``fedzmq.worker.executor`` before and after them.
"""

from __future__ import annotations

from typing import Any, Callable

from ..binding import Binding, Context
from . import control, data, modules, optim, tensors

Handler = Callable[[Context, Binding], Any]

HANDLERS: dict[str, Handler] = {
    "ping": control.ping, "heartbeat": control.heartbeat, "status": control.status, "close": control.close,
    "clients": control.clients,
    "debug_delay": control.debug_delay,
    "store": tensors.store, "get": tensors.get, "info": tensors.info, "delete": tensors.delete,
    "alloc": tensors.alloc, "write": tensors.write, "read": tensors.read, "op": tensors.op,
    "backward": tensors.backward, "grad": tensors.grad,
    "module_put": modules.module_put, "module_load": modules.module_load, "module_call": modules.module_call,
    "module_state": modules.module_state, "module_write": modules.module_write, "module_read": modules.module_read,
    "module_mode": modules.module_mode,
    "optim_create": optim.optim_create, "optim_zero_grad": optim.optim_zero_grad, "optim_step": optim.optim_step,
    "datasets": data.datasets, "dataset_tensor": data.dataset_tensor, "fit": data.fit, "evaluate": data.evaluate,
    "secagg": data.secagg,
}

__all__ = ["HANDLERS", "Handler"]
