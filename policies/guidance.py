"""Real-time chunking's guided inpainting for diffusion samplers (Black et al., "Real-Time Execution
of Action Chunking Flow Policies", 2025), written for :mod:`dreamrt.policies.schedulers`.

When a chunk is requested while the previous one still runs, its first d actions will be
executed from the previous chunk before it arrives, and the actions after them should join
the previous plan smoothly. RTC samples the new chunk as an inpainting problem: at every
sampler step it

1. runs the denoiser on the current sample x_t and forms the clean estimate x0_hat(x_t);
2. weighs the error to the previous chunk with the soft mask W (1 on the frozen prefix,
   decaying to 0 at H - s, see :func:`dreamrt.runtime.chunking.soft_mask`):
   ``e = W * (Y - x0_hat)``;
3. back-propagates e through the denoiser: the vector-Jacobian product
   ``g = (d x0_hat / d x_t)^T e`` (one backward pass, no Jacobian is formed);
4. moves the clean estimate along g with a clipped guidance weight and lets the sampler
   take its usual step from the guided estimate.

The paper states step 4 for flow matching: ``v' = v + min(beta, (1 - tau) / (tau r^2)) g``
with ``r^2 = (1 - tau)^2 / (tau^2 + (1 - tau)^2)``. Writing a variance-preserving diffusion
sample ``x_t = a x0 + s eps`` (a = sqrt(alpha_bar_t), s = sqrt(1 - alpha_bar_t)) as a flow
sample at ``tau = a / (a + s)`` gives the same update as

    x0_guided = x0_hat + s * min(beta, 1 / (a * s)) * g

which this module applies (for epsilon prediction it is ``eps' = eps - a * w * g``). The
weight is large in the middle of sampling and clipped to ``beta`` (the paper uses 5;
5-10 work) at both ends, where the unclipped weight diverges.

Dimensions: B batch, H chunk length, A action dim.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

from dreamrt.errors import UserError
from dreamrt.policies.schedulers import Denoiser, TimestepSampler


def guided_sample(
    denoise: Denoiser,
    sampler: TimestepSampler,
    x_T: Tensor,
    prefix: Tensor,
    weights: Tensor,
    *,
    max_guidance: float = 5.0,
    noise: Sequence[Tensor] | Tensor | None = None,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Sample like ``sampler.sample(denoise, x_T, ...)`` while inpainting towards ``prefix`` with ``weights``.

    ``x_T`` (B, H, A) is the start noise; ``prefix`` (H, A) or (B, H, A) is the previous
    chunk in the sampler's (normalised) units; ``weights`` (H,) or (B, H) is the soft mask.
    ``denoise(x_t, t)`` must be differentiable with respect to x_t: gradients are enabled
    here even inside ``torch.inference_mode`` callers, but tensors the denoiser closes over
    must not be inference tensors that autograd would save (build them outside inference
    mode, or ``.clone()`` them). With all weights 0 this is exactly ``sampler.sample``.
    """
    if not (math.isfinite(max_guidance) and max_guidance >= 0):
        raise UserError(f"max_guidance={max_guidance!r}; expected a finite weight >= 0 (RTC uses 5).")
    if x_T.ndim != 3:
        raise UserError(f"guided_sample needs x_T of shape (B, H, A), got {tuple(x_T.shape)}.")
    b, h, a_dim = x_T.shape
    prefix = torch.as_tensor(prefix, dtype=x_T.dtype, device=x_T.device)
    weights = torch.as_tensor(weights, dtype=x_T.dtype, device=x_T.device)
    if prefix.shape not in ((h, a_dim), (b, h, a_dim)):
        raise UserError(f"prefix must be (H, A) = {(h, a_dim)} or (B, H, A), got {tuple(prefix.shape)}.")
    if weights.shape not in ((h,), (b, h)):
        raise UserError(f"weights must be (H,) = ({h},) or (B, H), got {tuple(weights.shape)}.")
    prefix = prefix.expand(b, h, a_dim)
    w = weights.expand(b, h)[..., None]  # (B, H, 1)
    if noise is not None and len(noise) != sampler.num_steps:
        raise UserError(f"guided_sample got {len(noise)} step noises for {sampler.num_steps} sampler steps.")
    if not torch.any(w != 0):
        return sampler.sample(denoise, x_T, noise=noise, generator=generator)
    x = x_T
    for i, t in enumerate(sampler.timesteps):
        ab = sampler.schedule.alpha_bar(t)
        a, s = math.sqrt(ab), math.sqrt(1.0 - ab)
        with torch.inference_mode(False), torch.enable_grad():
            x_in = x.detach().clone().requires_grad_(True)
            # The unclipped clean estimate: clipping would zero the gradient where it bites.
            x0 = sampler.x0_estimate(denoise(x_in, t), t, x_in)
            error = w * (prefix - x0.detach())  # (B, H, A)
            (vjp,) = torch.autograd.grad(x0, x_in, grad_outputs=error)
        weight = min(max_guidance, 1.0 / max(a * s, 1e-12))
        x0_guided = x0.detach() + s * weight * vjp
        step_noise = None if noise is None else noise[i]
        x = sampler.step_from_x0(x0_guided, t, x, step_noise, generator)
    return x
