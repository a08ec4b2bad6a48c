"""Building schedulers the way diffusers' `from_config` does, and the pipelines' uses of them.

`scheduler_from_config(config, class_name, overrides)` is `Cls.from_config(config, **overrides)`:
- the class is `class_name`, or the config's `_class_name` when None;
- every key of the config that the class takes carries over (keys listed in `_use_default_values`,
  diffusers' record of keys nobody set, are skipped as diffusers skips them);
- the config's other keys are ignored by the class but kept in `scheduler.config`, as diffusers keeps
  them (its "hidden" keys): a DDPM config's `clip_sample` or `variance_type` stays visible there, and
  diffusers' pipelines read `scheduler.config.variance_type` to decide whether the UNet's learned
  variance channels go to `step`;
- overrides must be keys the class takes (diffusers silently drops others: refused here), and every
  value is checked; a bad one raises `InvalidRequest("scheduler_config.<key>", ...)` listing the valid
  values, an unsupported class `InvalidRequest("scheduler", ...)` listing the valid names.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ..errors import InvalidRequest
from ._common import Scheduler
from ._sigmas import SigmaScheduler
from .ddpm import DDIMScheduler, DDPMScheduler, UnCLIPScheduler
from .dpmsolver import DPMSolverMultistepScheduler
from .euler import EulerAncestralDiscreteScheduler, EulerDiscreteScheduler
from .unipc import UniPCMultistepScheduler

SCHEDULERS: dict[str, type[Scheduler]] = {
    cls.__name__: cls
    for cls in (
        UnCLIPScheduler,
        DDPMScheduler,
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        UniPCMultistepScheduler,
        EulerDiscreteScheduler,
        EulerAncestralDiscreteScheduler,
    )
}
# The decoder's schedulers, diffusers class names (the first is the released checkpoint's own).
DECODER_SCHEDULERS: tuple[str, ...] = (
    "DDPMScheduler",
    "DDIMScheduler",
    "DPMSolverMultistepScheduler",
    "UniPCMultistepScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
)
PRIOR_SCHEDULERS: tuple[str, ...] = ("UnCLIPScheduler",)
LEARNED_VARIANCE_TYPES = ("learned", "learned_range")
# Which schedulers take a learned-variance model output (2x the sample's channels) in `step`.
_TAKES_LEARNED_VARIANCE = ("DDPMScheduler", "UnCLIPScheduler")

_PRIOR_REASON = (
    "diffusers' prior pipelines (KandinskyV22PriorPipeline, KandinskyV22PriorEmb2EmbPipeline) pass "
    "prev_timestep= to scheduler.step(), which only UnCLIPScheduler takes (any other scheduler fails there "
    "with a TypeError), so the prior always runs UnCLIPScheduler"
)


def _class_for(name: Any, allowed: Sequence[str], field: str, what: str) -> type[Scheduler]:
    if name not in allowed:
        shown = "no class name (the config has no _class_name)" if name is None else repr(name)
        raise InvalidRequest(field, f"{shown} is not a supported {what}; valid names: {', '.join(allowed)}")
    return SCHEDULERS[name]


def scheduler_from_config(
    config: Mapping[str, Any],
    class_name: str | None = None,
    overrides: Mapping[str, Any] | None = None,
    *,
    allowed: Sequence[str] | None = None,
    field: str = "scheduler",
) -> Any:
    """`class_name.from_config(config, **overrides)` in numpy (see the module docstring).

    `config` is a checkpoint's scheduler_config.json (or a scheduler's `config`); `allowed` limits the
    classes (every supported one by default), `field` names the argument in errors.
    """
    allowed = tuple(SCHEDULERS) if allowed is None else tuple(allowed)
    name = class_name if class_name is not None else config.get("_class_name")
    cls = _class_for(name, allowed, field, "prior scheduler" if allowed == PRIOR_SCHEDULERS else "scheduler")
    skipped = set(config.get("_use_default_values") or ())
    given = {k: v for k, v in config.items() if not k.startswith("_") and k not in skipped}
    accepted = {k: v for k, v in given.items() if k in cls.PARAMS}
    hidden = {k: v for k, v in given.items() if k not in cls.PARAMS}
    for key, value in dict(overrides or {}).items():
        if key not in cls.PARAMS:
            raise InvalidRequest(
                f"scheduler_config.{key}",
                f"{key!r} is not a {name} setting; valid keys: {', '.join(sorted(cls.PARAMS))}",
            )
        accepted[key] = value
    scheduler = cls(accepted)
    scheduler.config.update(hidden)
    variance_type = scheduler.config.get("variance_type")
    if variance_type in LEARNED_VARIANCE_TYPES and name not in _TAKES_LEARNED_VARIANCE:
        raise InvalidRequest(
            field,
            f"{name} cannot run this checkpoint: its scheduler config sets variance_type={variance_type!r}, so "
            "the pipelines hand the UNet's learned-variance channels to scheduler.step(), which only "
            f"{' and '.join(_TAKES_LEARNED_VARIANCE)} take (diffusers fails with a shape error); valid names: "
            "DDPMScheduler",
        )
    return scheduler


def decoder_scheduler_from_config(
    config: Mapping[str, Any], class_name: str | None = None, overrides: Mapping[str, Any] | None = None
) -> Any:
    """The decoder's scheduler: one of `DECODER_SCHEDULERS` (the checkpoint's class by default)."""
    return scheduler_from_config(config, class_name, overrides, allowed=DECODER_SCHEDULERS, field="scheduler")


def check_prior_scheduler(class_name: str | None) -> None:
    """Refuse any prior scheduler but UnCLIPScheduler (None means the checkpoint's, which is UnCLIP)."""
    if class_name is not None and class_name not in PRIOR_SCHEDULERS:
        raise InvalidRequest(
            "prior_scheduler",
            f"{class_name!r} is not supported for the prior: {_PRIOR_REASON}; valid names: UnCLIPScheduler",
        )


def prior_scheduler_from_config(
    config: Mapping[str, Any], class_name: str | None = None, overrides: Mapping[str, Any] | None = None
) -> UnCLIPScheduler:
    """The prior's scheduler: UnCLIPScheduler only (see `check_prior_scheduler`)."""
    check_prior_scheduler(class_name)
    check_prior_scheduler(config.get("_class_name") if class_name is None else None)
    return scheduler_from_config(
        config, class_name, overrides, allowed=PRIOR_SCHEDULERS, field="prior_scheduler"
    )


def learned_variance(scheduler: Any) -> bool:
    """Whether `step` takes the UNet's full output (noise + learned variance channels).

    diffusers' Kandinsky 2.2 decoder pipelines test `scheduler.config.variance_type in ["learned",
    "learned_range"]` (a key the config may hold only as a key carried over from the checkpoint); when
    false they keep the first `latent_channels` channels. Only DDPMScheduler can answer true here.
    """
    return scheduler.config.get("variance_type") in LEARNED_VARIANCE_TYPES


def strength_timesteps(scheduler: Any, num_inference_steps: int, strength: float) -> tuple[np.ndarray, int]:
    """Image-to-image start: `set_timesteps(num_inference_steps)`, then diffusers' get_timesteps.

    What KandinskyV22Img2ImgPipeline (decoder) and KandinskyV22PriorEmb2EmbPipeline (prior, UnCLIP) do:
    keep the last min(int(n * strength), n) timesteps, `t_start = n - kept`; no multiplication by
    `scheduler.order` (1 for every class here anyway, so diffusers' SD-style `t_start * order` would give
    the same) and no `set_begin_index`: the sigma schedulers then find their first step index by
    looking `timesteps[0]` up in the full schedule (t_start, or the second of two equal Karras timesteps),
    and `add_noise(latents, noise, timesteps[:1])` looks up the same sigma. Returns (timesteps, steps run).

    Raises InvalidRequest("strength") when no step would run (diffusers fails on an empty schedule), or
    when the lookup of a repeated first timestep would run the loop past the schedule's end (diffusers
    fails with IndexError on the last step).
    """
    n = int(num_inference_steps)
    scheduler.set_timesteps(n)
    init_timestep = min(int(n * strength), n)
    t_start = max(n - init_timestep, 0)
    timesteps = scheduler.timesteps[t_start:].copy()
    steps = n - t_start
    if steps <= 0:
        raise InvalidRequest(
            "strength",
            f"strength={strength} with num_inference_steps={n} runs int({n} * {strength}) = 0 steps; "
            f"use a strength of at least {1 / n:.4g}",
        )
    if isinstance(scheduler, SigmaScheduler):
        first = scheduler.index_for_timestep(timesteps[0])
        if first + len(timesteps) > len(scheduler.timesteps):
            raise InvalidRequest(
                "strength",
                f"strength={strength} with num_inference_steps={n} starts at timestep {int(timesteps[0])}, which "
                f"{type(scheduler).__name__}'s schedule repeats: diffusers looks up its second occurrence and its "
                "loop then runs past the end of the schedule (IndexError); use another strength or step count",
            )
    return timesteps, steps


def inpaint_known_latents(
    scheduler: Any, image_latents: np.ndarray, noise: np.ndarray, timesteps: np.ndarray, step: int
) -> np.ndarray:
    """What KandinskyV22InpaintPipeline writes into the known region after loop step `step`.

    `add_noise(image_latents, noise, [timesteps[step + 1]])`: the image latents noised to the next
    timestep (clean after the last step). It works unchanged for every scheduler here: DDPM/DDIM noise
    with alphas_cumprod[t]; DPM-Solver++/UniPC (alpha_t x + sigma_t noise) and Euler (x + sigma noise) look
    the timestep up in their schedule (no begin index is ever set), which gives the sigma the next step
    starts from. `noise` must be the loop's initial standard-normal draw; diffusers passes the initial
    latents *after* scaling by init_noise_sigma, which only differs for the Euler schedulers (see
    docs/schedulers.md).
    """
    if step >= len(timesteps) - 1:
        return image_latents
    return scheduler.add_noise(image_latents, noise, timesteps[step + 1 : step + 2])
