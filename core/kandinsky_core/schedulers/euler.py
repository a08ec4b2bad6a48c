"""`EulerDiscreteScheduler` and `EulerAncestralDiscreteScheduler` (Karras et al., arXiv:2206.00364,
Algorithm 2 with s_churn = 0, and its ancestral variant), from diffusers 0.42.1.

Both work in sigma space: the sample is x0 + sigma * noise, so the initial latents are scaled by
`init_noise_sigma` (sigma_max, or sqrt(sigma_max^2 + 1) under "leading" spacing, which the Kandinsky
2.2 config uses) and the model must be given `scale_model_input(sample, t)` = sample / sqrt(sigma^2 + 1).
diffusers' timesteps for these classes are float32; `timesteps` here is their int64 value, which is
exact because only configurations with whole-number timesteps are accepted (the served UNet takes an
int64 timestep): use_karras_sigmas, and "linspace" spacing at step counts where it gives fractions, are
refused with the reason.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from ..errors import InvalidRequest
from ..noise import NoiseSource
from ._common import _ONE, Param, _f32, boolean, common_params, invalid, number, one_of, optional
from ._sigmas import SigmaScheduler

_FRACTIONAL = (
    "gives fractional timesteps, which the served UNet cannot take (its timestep input is int64) and "
    "diffusers would pass to its UNet as they are"
)


def _no_karras(owner: str, key: str, value: Any) -> bool:
    if boolean(owner, key, value):
        raise invalid(
            owner,
            key,
            f"use_karras_sigmas=true is not supported for {owner}: it {_FRACTIONAL}; valid values: false "
            "(DPMSolverMultistepScheduler and UniPCMultistepScheduler round Karras timesteps and take it)",
        )
    return False


class _Euler(SigmaScheduler):
    """Timesteps, sigmas, input scaling and `add_noise` of the two Euler schedulers."""

    def set_timesteps(self, num_inference_steps: int) -> None:
        """n timesteps with their sigmas (interpolated from the trained ones) and a final sigma."""
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        cfg, total = self.config, self.num_train_timesteps
        spacing = cfg["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, total - 1, n, dtype=np.float32)[::-1].copy()
        elif spacing == "leading":
            step_ratio = total // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.float32)
            timesteps += cfg["steps_offset"]
        else:  # "trailing"
            step_ratio = total / n
            timesteps = np.arange(total, 0, -step_ratio).round().copy().astype(np.float32)
            timesteps -= 1
        whole = timesteps.astype(np.int64)
        if not np.array_equal(whole, timesteps):
            fraction = timesteps[np.flatnonzero(whole != timesteps)[0]]
            raise InvalidRequest(
                "scheduler_config.timestep_spacing",
                f"{type(self).__name__}: timestep_spacing={spacing!r} with num_inference_steps={n} {_FRACTIONAL} "
                f"(e.g. {float(fraction):.4g}); use 'leading' or 'trailing', or a step count n with n - 1 "
                f"dividing {total - 1}",
            )
        self._check_timesteps_in_range(whole, n)
        train_sigmas = self._train_sigmas()
        sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        last = self._final_sigma()
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = whole
        self._schedule = timesteps.astype(np.float64)
        self.num_inference_steps = n
        self._reset()

    def _final_sigma(self) -> Any:
        return 0.0

    @property
    def init_noise_sigma(self) -> np.float32:  # type: ignore[override]
        """The initial latents' scale: the largest sigma (sqrt(sigma^2 + 1) of it under "leading" spacing)."""
        max_sigma = self.sigmas.max() if self.sigmas.size else np.flip(self._train_sigmas()).max()
        if self.config["timestep_spacing"] in ("linspace", "trailing"):
            return np.float32(max_sigma)
        return np.sqrt(max_sigma * max_sigma + _ONE)

    def scale_model_input(self, sample: np.ndarray, timestep: int) -> np.ndarray:
        """sample / sqrt(sigma^2 + 1): what the model must be given (fixes the step index on first use)."""
        if self._step_index is None:
            self._init_step_index(timestep)
        sigma = self.sigmas[self._step_index]
        return _f32(_f32(sample) / np.sqrt(sigma * sigma + _ONE))

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """x0 + sigma * noise, at the sigma of each timestep (see `_sigmas`)."""
        original_samples = _f32(original_samples)
        sigma = self._noise_sigmas(timesteps, original_samples.ndim)
        return original_samples + _f32(noise) * sigma

    def _pred_original(self, model_output: np.ndarray, sample: np.ndarray, sigma: np.float32) -> np.ndarray:
        if self.config["prediction_type"] == "epsilon":
            return sample - sigma * model_output
        if self.config["prediction_type"] == "v_prediction":
            return model_output * (-sigma / np.sqrt(sigma * sigma + _ONE)) + (sample / (sigma * sigma + _ONE))
        return model_output  # "sample" (EulerDiscreteScheduler only)


class EulerDiscreteScheduler(_Euler):
    """diffusers' `EulerDiscreteScheduler` with s_churn = 0 (what the pipelines use): deterministic."""

    PARAMS = {
        **common_params(timestep_spacing="linspace"),
        "prediction_type": Param("epsilon", one_of("epsilon", "sample", "original_sample", "v_prediction")),
        "interpolation_type": Param(
            "linear", one_of("linear", note=" ('log_linear' is not implemented here)")
        ),
        "use_karras_sigmas": Param(False, _no_karras),
        "use_exponential_sigmas": Param(False, one_of(False, note=f" (it {_FRACTIONAL})")),
        "use_beta_sigmas": Param(False, one_of(False, note=f" (it {_FRACTIONAL})")),
        "sigma_min": Param(None, optional(number(0.0))),
        "sigma_max": Param(None, optional(number(0.0))),
        "timestep_type": Param("discrete", one_of("discrete", "continuous")),
        "final_sigmas_type": Param("zero", one_of("zero", "sigma_min")),
    }

    def _check_config(self) -> None:
        if self.config["timestep_type"] == "continuous" and self.config["prediction_type"] == "v_prediction":
            raise invalid(
                type(self).__name__,
                "timestep_type",
                f"timestep_type='continuous' with v_prediction {_FRACTIONAL} (0.25 log sigma); valid values: discrete",
            )

    def _final_sigma(self) -> Any:
        return self._sigma_min_last() if self.config["final_sigmas_type"] == "sigma_min" else 0.0

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """One Euler step from sigma to the next sigma; `noise` is never drawn from (s_churn = 0)."""
        index = self._begin_step(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        self._check_shapes(model_output, sample)
        sigma = self.sigmas[index]
        sigma_hat = sigma  # sigma * (gamma + 1) with gamma = 0
        pred_original_sample = self._pred_original(model_output, sample, sigma)
        derivative = (sample - pred_original_sample) / sigma_hat
        dt = self.sigmas[index + 1] - sigma_hat
        self._step_index = index + 1
        return _f32(sample + derivative * dt)


class EulerAncestralDiscreteScheduler(_Euler):
    """diffusers' `EulerAncestralDiscreteScheduler`: an Euler step to sigma_down plus fresh noise of
    scale sigma_up. Draws one `noise.randn(model_output.shape)` on every step, the last one included
    (where sigma_up is 0), as diffusers does."""

    PARAMS = {
        **common_params(timestep_spacing="linspace"),
        "prediction_type": Param(
            "epsilon", one_of("epsilon", "v_prediction", note=" ('sample' is not implemented in diffusers)")
        ),
    }

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource
    ) -> np.ndarray:
        """One ancestral Euler step; returns the new sample."""
        index = self._begin_step(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        self._check_shapes(model_output, sample)
        sigma = self.sigmas[index]
        pred_original_sample = self._pred_original(model_output, sample, sigma)
        sigma_from, sigma_to = self.sigmas[index], self.sigmas[index + 1]
        sigma_up = np.sqrt(
            sigma_to * sigma_to * (sigma_from * sigma_from - sigma_to * sigma_to) / (sigma_from * sigma_from)
        )
        sigma_down = np.sqrt(sigma_to * sigma_to - sigma_up * sigma_up)
        derivative = (sample - pred_original_sample) / sigma
        dt = sigma_down - sigma
        prev_sample = sample + derivative * dt
        prev_sample = prev_sample + _f32(noise.randn(model_output.shape)) * sigma_up
        self._step_index = index + 1
        return _f32(prev_sample)
