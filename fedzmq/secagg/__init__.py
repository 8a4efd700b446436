"""Secure aggregation (Bonawitz et al., CCS 2017, semi-honest; SecAgg+ of Bell et al., CCS 2020, on a
sparse graph) and differential privacy for fedzmq.

Transport-free building blocks: the coordinator runs a ``SecAggServer`` and each worker a
``SecAggClient`` per round; they exchange the plain-data messages of ``fedzmq.secagg.messages``.
The coordinator learns the weighted mean of the survivors' clipped (and, with DP, noised) updates and
nothing about any individual update, even when clients drop out, as long as at least ``threshold``
clients remain at every step (with SecAgg+: of every client's neighbourhood). See docs/secagg.md.
"""

from .client import ClientStats, SecAggClient
from .config import SecAggConfig, default_threshold
from .dp import (
    AdaptiveClipping, PrivacyAccountant, clip_update, compute_epsilon, distributed_noise_std,
    effective_noise_multiplier, noise_multiplier_for_epsilon, split_noise_multiplier,
)
from .dpsgd import PrivateGradients, private_gradients
from .errors import SecAggAborted, SecAggError, SecAggProtocolError
from .graph import GraphParameters, NeighbourGraph, choose_parameters
from .server import SecAggResult, SecAggServer
from .simulation import run_round

__all__ = [
    "AdaptiveClipping", "ClientStats", "GraphParameters", "NeighbourGraph", "PrivacyAccountant", "PrivateGradients",
    "SecAggAborted", "SecAggClient", "SecAggConfig", "SecAggError", "SecAggProtocolError", "SecAggResult",
    "SecAggServer", "choose_parameters", "clip_update", "compute_epsilon", "default_threshold",
    "distributed_noise_std", "effective_noise_multiplier", "noise_multiplier_for_epsilon", "private_gradients",
    "run_round", "split_noise_multiplier",
]
