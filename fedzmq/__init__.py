"""fedzmq: federated learning for PyTorch over ZeroMQ.

    import fedzmq as fz
    bob = await fz.connect("tcp://127.0.0.1:5555")      # or fz.VirtualWorker("bob")
    x = await bob.send(torch.ones(3))                    # a TensorPointer
    y = (x * 2).sum()                                    # pipelined, no round trip yet
    print(await y.get())
"""

from .__about__ import __version__
from .client.connection import ConnectionSettings
from .client.optims import Optims, RemoteOptimizer
from .client.pointers import Broadcast, DatasetPointer, FitUpdate, ModulePointer, Pointer, TensorPointer
from .client.worker import RemoteWorker, VirtualWorker, connect, connect_clients
from .codec import Limits
from .errors import (
    AddressError, BadRequest, CheckpointMismatch, FedzmqError, HandshakeFailed, HandshakeRefused, HeldBytesExceeded,
    LimitExceeded, ModelDescriptionError, ObjectNotFound, PermissionDenied, ProtocolError, RemoteError,
    RemoteProtocolError, RemoteWorkerClosedError, RequestTimeout, ShapeUnknown, UnknownCommand, WorkerClosedError,
    WorkerDeadError, WorkerError, WrongWorkerError,
)
from .federated import (
    Bulyan, Cyclic, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedBuff, Federation, FedMedian, FedProx, FedTrimmedAvg,
    FedYogi, FitConfig, Krum, RoundFailed, RoundMetrics, Strategy, make_strategy,
)
from .federated.secure import SecAgg
from .worker import Worker, WorkerConfig

__all__ = [
    # connecting and pointers
    "Broadcast", "ConnectionSettings", "DatasetPointer", "FitUpdate", "Limits", "ModulePointer", "Optims", "Pointer",
    "RemoteOptimizer", "RemoteWorker", "TensorPointer", "VirtualWorker", "Worker", "WorkerConfig", "connect",
    "connect_clients",
    # federated training
    "Bulyan", "Cyclic", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBuff", "FedMedian", "FedProx",
    "FedTrimmedAvg", "FedYogi", "Federation", "FitConfig", "Krum", "RoundFailed", "RoundMetrics", "SecAgg", "Strategy",
    "make_strategy",
    # errors
    "AddressError", "BadRequest", "CheckpointMismatch", "FedzmqError", "HandshakeFailed", "HandshakeRefused",
    "HeldBytesExceeded", "LimitExceeded", "ModelDescriptionError", "ObjectNotFound", "PermissionDenied",
    "ProtocolError", "RemoteError", "RemoteProtocolError", "RemoteWorkerClosedError", "RequestTimeout",
    "ShapeUnknown", "UnknownCommand", "WorkerClosedError", "WorkerDeadError", "WorkerError", "WrongWorkerError",
    "__version__",
]
