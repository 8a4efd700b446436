"""Federated training: the round scheduler, strategies, metrics and checkpoints."""

from .federation import Federation, RoundFailed
from .metrics import RoundMetrics
from .protocols import AveragingRound, FitConfig, RoundContext, RoundOutcome, RoundProtocol, SequentialRound
from .strategies import (
    STRATEGIES, Aggregator, Bulyan, FedAdagrad, FedAdam, FedAvg, FedAvgM, FedMedian, FedProx, FedTrimmedAvg, FedYogi,
    Krum, Sequential, Strategy, make_strategy,
)

__all__ = ["Aggregator", "AveragingRound", "RoundContext", "RoundOutcome", "RoundProtocol", "SequentialRound",
           "Bulyan", "FedAdagrad", "FedAdam", "FedAvg", "FedAvgM", "FedMedian", "FedProx",
           "FedTrimmedAvg", "FedYogi", "Federation", "FitConfig", "Krum", "RoundFailed", "RoundMetrics", "STRATEGIES",
           "Sequential", "Strategy", "make_strategy"]
