"""Federated training: the round scheduler, strategies, metrics and checkpoints."""

from .fedbuff import FedBuff
from .federation import Federation, RoundFailed
from .metrics import RoundMetrics
from .protocols import AveragingRound, FitConfig, RoundContext, RoundOutcome, RoundProtocol, CyclicRound
from .strategies import (
    STRATEGIES, Aggregator, Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
    Krum, Cyclic, Strategy, make_strategy,
)

__all__ = ["Aggregator", "AveragingRound", "RoundContext", "RoundOutcome", "RoundProtocol", "CyclicRound",
           "Bulyan", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedBuff", "FedMedian", "FedProx",
           "FedTrimmedAvg", "FedYogi", "Federation", "FitConfig", "Krum", "RoundFailed", "RoundMetrics", "STRATEGIES",
           "Cyclic", "Strategy", "make_strategy"]
