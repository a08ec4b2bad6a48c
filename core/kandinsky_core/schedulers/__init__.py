"""numpy versions of the diffusers schedulers the client's diffusion loops use, step for step.

The client runs the loops itself and must not depend on torch, so these re-implement diffusers 0.42.1:
`UnCLIPScheduler` (the prior's) and the decoder's `DECODER_SCHEDULERS`: `DDPMScheduler` (the released
checkpoint's), `DDIMScheduler`, `DPMSolverMultistepScheduler`, `UniPCMultistepScheduler`,
`EulerDiscreteScheduler`, `EulerAncestralDiscreteScheduler`. They follow diffusers' order of operations
and its float32 arithmetic, so a trajectory stays within about 1e-6 of the sample's magnitude of
diffusers' (docs/schedulers.md has the measured figures). Bit-exact equality is not attainable: torch's
CPU `linspace` (linear betas) is not correctly rounded, and its `log`/`exp` can differ from the correctly
rounded value (which ours approximates by computing them in float64), so some values differ by an ulp.

Every scheduler has the same interface (see `_common.Scheduler`): `set_timesteps(n)`, `timesteps`
(int64), `init_noise_sigma`, `order`, `scale_model_input(sample, t)`, `step(model_output, t, sample,
noise)`, `add_noise(original, noise, timesteps)`, `config`. UnCLIP's `step` also takes `prev_timestep`.
A scheduler object serves ONE loop: the multistep and Euler ones keep state between steps as diffusers
does (step index, previous model outputs); `set_timesteps` starts over.

Every random number comes from a `NoiseSource`, drawn where diffusers calls `randn_tensor` (DDPM and
UnCLIP for t > 0, Euler ancestral and sde-dpmsolver++ on every step), with the shape diffusers uses,
so replaying diffusers' draws reproduces its trajectory.

A decoder loop (the Kandinsky pipelines' order):

    scheduler = decoder_scheduler_from_config(checkpoint_config, class_name, overrides)
    scheduler.set_timesteps(n)                       # or: timesteps, _ = strength_timesteps(scheduler, n, strength)
    latents = noise.randn(shape) * scheduler.init_noise_sigma        # img2img: scheduler.add_noise(...)
    for t in timesteps:
        x = scheduler.scale_model_input(latents, t)  # identity except for the Euler schedulers
        out = guided_unet(x, t)                      # keep all channels only if learned_variance(scheduler)
        latents = scheduler.step(out, t, latents, noise)

Deliberate differences from diffusers, all refusals of inputs that diffusers mishandles or that the
served models cannot take (each raises `InvalidRequest` naming the field, or ValueError for misuse):
- invalid config values are refused when the scheduler is built, not in `step`;
- `UnCLIPScheduler.set_timesteps(1)` is refused: diffusers divides by `num_inference_steps - 1`;
- `num_inference_steps` above `num_train_timesteps`, timesteps outside the trained range, or a timestep
  that is not in the schedule are refused (diffusers repeats timesteps, fails with IndexError, or - for
  the multistep schedulers - silently uses the last sigma);
- DDPM `variance_type="fixed_large_log"` is refused: diffusers returns NaN on every step with t > 0;
- learned variance types need a model output with twice the sample's channels, and only DDPMScheduler
  (and UnCLIP) take them: other classes built from a learned-variance config are refused (diffusers'
  DPM-Solver keeps 3 channels, the others fail on the channel count);
- UniPC configurations for which diffusers returns NaN/inf at the last step are refused;
- Euler configurations that give fractional timesteps (use_karras_sigmas, "linspace" spacing for most
  step counts) are refused: the served UNet takes int64 timesteps;
- unsupported options (DPM-Solver order 3, exponential/beta/flow/lu sigmas, dynamic shifting, UniPC's
  `solver_p`) are refused rather than approximated.
"""

from __future__ import annotations

from ..noise import NoiseSource
from ._common import Scheduler
from .ddpm import DDIMScheduler, DDPMScheduler, UnCLIPScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .factory import (
    DECODER_SCHEDULERS,
    PRIOR_SCHEDULERS,
    SCHEDULERS,
    check_prior_scheduler,
    decoder_scheduler_from_config,
    inpaint_known_latents,
    learned_variance,
    prior_scheduler_from_config,
    scheduler_from_config,
    strength_timesteps,
)
from .unipc import UniPCMultistepScheduler

__all__ = [
    "DDIMScheduler",
    "DDPMScheduler",
    "DECODER_SCHEDULERS",
    "DPMSolverMultistepScheduler",
    "EulerAncestralDiscreteScheduler",
    "EulerDiscreteScheduler",
    "NoiseSource",
    "PRIOR_SCHEDULERS",
    "SCHEDULERS",
    "Scheduler",
    "UnCLIPScheduler",
    "UniPCMultistepScheduler",
    "check_prior_scheduler",
    "decoder_scheduler_from_config",
    "inpaint_known_latents",
    "learned_variance",
    "prior_scheduler_from_config",
    "scheduler_from_config",
    "strength_timesteps",
]
