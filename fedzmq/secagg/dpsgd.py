"""Local DP-SGD (Abadi et al., CCS 2016) for a worker's own training: per-sample gradients with
``torch.func`` (``vmap`` over ``grad``), each clipped to L2 norm ``clip``, summed, plus Gaussian noise
N(0, (noise_multiplier * clip)**2), divided by the batch size.

This protects each *sample* of the worker's data against whoever sees the trained model (record-level DP);
secure aggregation with distributed noise protects each *client* (user-level DP). Account for it with
``PrivacyAccountant(noise_multiplier, sampling_rate=batch_size / dataset_size, delta)`` stepped once per
batch; the amplification assumes Poisson-sampled batches (shuffled fixed-size batches are the usual,
slightly optimistic, approximation).

Limits: the model must be functional under ``vmap``: no BatchNorm in training mode (use GroupNorm or
LayerNorm), no in-place updates of buffers during the forward pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.func import functional_call, grad, vmap

from .crypto import CsprngStream
from .dp import gaussian_noise


class PrivateGradients(NamedTuple):
    grads: dict[str, torch.Tensor]  #: the noisy mean gradient, per trainable parameter name
    per_sample_norms: torch.Tensor  #: the norms before clipping, shape (batch,)


def private_gradients(
    model: torch.nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    inputs: torch.Tensor,
    targets: torch.Tensor,
    *,
    clip: float,
    noise_multiplier: float,
    stream: CsprngStream | None = None,
    apply: bool = True,
) -> PrivateGradients:
    """One DP-SGD gradient: ``(sum_i clip(g_i) + N(0, (noise_multiplier*clip)**2 I)) / batch``.

    ``loss_fn(outputs, targets)`` must reduce to a scalar (``mean`` or ``sum``, applied to a batch of one).
    With ``apply`` the result is written into each parameter's ``.grad``, ready for ``optimizer.step()``.
    ``stream`` fixes the noise (tests only); by default it comes from ``os.urandom``.
    """
    if not (math.isfinite(clip) and clip > 0):
        raise ValueError("clip must be a positive finite number")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a finite number >= 0")
    batch = inputs.shape[0]
    if batch == 0 or targets.shape[0] != batch:
        raise ValueError("inputs and targets must hold the same, nonzero, number of samples")
    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}

    def sample_loss(p: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = functional_call(model, (p, buffers), (x.unsqueeze(0),))
        return loss_fn(out, y.unsqueeze(0))

    per_sample = vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, inputs, targets)
    sq = torch.zeros(batch, dtype=torch.float64)
    for g in per_sample.values():
        sq += g.detach().reshape(batch, -1).to(torch.float64).pow(2).sum(dim=1)
    norms = sq.sqrt()
    factors = (clip / norms.clamp_min(1e-12)).clamp(max=1.0)
    stream = stream or CsprngStream()
    std = noise_multiplier * clip
    grads: dict[str, torch.Tensor] = {}
    for name, g in per_sample.items():
        total = torch.einsum("b,b...->...", factors.to(g.dtype), g)
        if std > 0:
            total = total + gaussian_noise(total.shape, std, stream=stream, dtype=total.dtype)
        grads[name] = total / batch
    if apply:
        named = dict(model.named_parameters())
        for name, value in grads.items():
            named[name].grad = value.clone()
    return PrivateGradients(grads, norms.to(torch.float32))
