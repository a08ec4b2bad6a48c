"""`UnCLIPScheduler` (the prior's) and `DDPMScheduler` (the decoder's default), from diffusers 0.42.1."""

from __future__ import annotations

import operator
from collections.abc import Mapping
from typing import Any

import numpy as np

from ..noise import NoiseSource
from ._common import (
    _HALF,
    _MIN_VARIANCE,
    _ONE,
    _TWO,
    AlphaScheduler,
    InvalidRequest,
    Param,
    _alpha_bar_betas,
    _exp,
    _f32,
    _log,
    boolean,
    common_params,
    integer,
    invalid,
    number,
    one_of,
    threshold_sample,
)

_THRESHOLDING = {
    "thresholding": Param(False, boolean),
    "dynamic_thresholding_ratio": Param(0.995, number(0.0)),
    "sample_max_value": Param(1.0, number(0.0)),
}
_CLIPPING = {
    "clip_sample": Param(True, boolean),
    "clip_sample_range": Param(1.0, number(0.0)),
}


class UnCLIPScheduler(AlphaScheduler):
    """diffusers' `UnCLIPScheduler`: DDPM with a cosine schedule and betas recomputed for skipped steps.

    The Kandinsky 2.2 prior uses it with prediction_type="sample", clip_sample_range=10 and
    variance_type="fixed_small_log". `timesteps` run from num_train_timesteps - 1 down to 0. It is the only
    scheduler whose `step` takes `prev_timestep`, which diffusers' prior loops pass.
    """

    PARAMS = {
        "num_train_timesteps": Param(1000, integer(1)),
        "variance_type": Param("fixed_small_log", one_of("fixed_small_log", "learned_range")),
        **_CLIPPING,
        "prediction_type": Param("epsilon", one_of("epsilon", "sample")),
        "beta_schedule": Param("squaredcos_cap_v2", one_of("squaredcos_cap_v2")),
    }

    def _make_betas(self) -> np.ndarray:
        return _alpha_bar_betas(self.num_train_timesteps, "cosine")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Karlo spacing: round(i * (T - 1) / (n - 1)), so both ends (T - 1 and 0) are always visited.

        That spacing needs n >= 2 (diffusers raises ZeroDivisionError for n = 1).
        """
        field = "prior_num_inference_steps"
        if operator.index(num_inference_steps) == 1:
            raise InvalidRequest(
                field,
                "UnCLIPScheduler (the prior's scheduler) needs at least 2 steps: num_inference_steps=1 is "
                f"outside the valid range [2, {self.num_train_timesteps}]; its spacing divides by "
                "num_inference_steps - 1 (diffusers raises ZeroDivisionError)",
            )
        n = self._check_num_inference_steps(num_inference_steps, minimum=2, field=field)
        self.num_inference_steps = n
        step_ratio = (self.num_train_timesteps - 1) / (n - 1)
        self.timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)

    def step(
        self,
        model_output: np.ndarray,
        timestep: int,
        sample: np.ndarray,
        noise: NoiseSource,
        prev_timestep: int | None = None,
    ) -> np.ndarray:
        """One reverse step x_t -> x_{prev_timestep}; returns the new sample (float32).

        The Kandinsky prior passes the next entry of `timesteps` as `prev_timestep` (None on the last
        step, meaning t - 1); when it is not t - 1 the step's beta is recomputed from alphas_cumprod.
        Draws one `noise.randn(model_output.shape)` when t > 0.
        """
        t = self._check_timestep(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        learned = self.config["variance_type"] == "learned_range"
        model_output, predicted_variance = self._split_variance(model_output, sample, learned)

        # 1. alphas, betas
        prev_t = t - 1 if prev_timestep is None else operator.index(prev_timestep)
        if prev_t >= self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: prev_timestep {prev_t} is outside the trained range "
                f"[0, {self.num_train_timesteps - 1}] (or negative, meaning alpha_prod = 1)"
            )
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else _ONE
        beta_prod_t = _ONE - alpha_prod_t
        beta_prod_t_prev = _ONE - alpha_prod_t_prev
        if prev_t == t - 1:
            beta = self.betas[t]
            alpha = self.alphas[t]
        else:
            beta = _ONE - alpha_prod_t / alpha_prod_t_prev
            alpha = _ONE - beta

        # 2. predicted x_0 (DDPM paper eq. 15)
        if self.config["prediction_type"] == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        else:  # "sample"
            pred_original_sample = model_output

        # 3. clip x_0
        if self.config["clip_sample"]:
            limit = np.float32(self.config["clip_sample_range"])
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        # 4-5. posterior mean (DDPM paper eq. 7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * beta) / beta_prod_t
        current_sample_coeff = np.sqrt(alpha) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 6. noise
        if t > 0:
            variance_noise = _f32(noise.randn(model_output.shape))
            variance = beta_prod_t_prev / beta_prod_t * beta
            if learned:
                min_log = _log(variance)  # log(0) = -inf, as in torch
                max_log = _log(beta)
                frac = (predicted_variance + _ONE) / _TWO
                std = _exp(_HALF * (frac * max_log + (_ONE - frac) * min_log))
            else:  # "fixed_small_log"
                std = _exp(_HALF * _log(np.maximum(variance, _MIN_VARIANCE)))
            pred_prev_sample = pred_prev_sample + std * variance_noise
        return _f32(pred_prev_sample)


def _ddpm_variance_type(owner: str, key: str, value: Any) -> str:
    if value == "fixed_large_log":
        raise invalid(
            owner,
            key,
            "variance_type='fixed_large_log' is not supported: diffusers 0.42.1 takes the square root of its "
            "log-variance and returns NaN on every step; valid values: "
            + ", ".join(DDPMScheduler.VARIANCE_TYPES),
        )
    return one_of(*DDPMScheduler.VARIANCE_TYPES)(owner, key, value)


class DDPMScheduler(AlphaScheduler):
    """diffusers' `DDPMScheduler` (ancestral DDPM sampling), the Kandinsky 2.2 decoder's own.

    The released decoder config: linear betas 0.00085..0.012, epsilon prediction, "leading" spacing
    with steps_offset=1, no clipping. The only decoder scheduler that takes a learned variance
    (variance_type "learned"/"learned_range": the model output carries twice the sample's channels).
    """

    # "fixed_large_log" is left out on purpose: diffusers returns NaN for it (see the package docstring).
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
    PARAMS = {
        **common_params(
            beta_schedules=("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
        ),
        "variance_type": Param("fixed_small", _ddpm_variance_type),
        **_CLIPPING,
        "prediction_type": Param("epsilon", one_of("epsilon", "sample", "v_prediction")),
        **_THRESHOLDING,
    }

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Pick the inference timesteps with the configured `timestep_spacing` (see `_spaced_timesteps`)."""
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        self.timesteps = self._spaced_timesteps(n)
        self.num_inference_steps = n

    def previous_timestep(self, timestep: int) -> int:
        """The timestep that follows `timestep` in `timesteps` (-1 after the last; t - 1 before set_timesteps)."""
        t = operator.index(timestep)
        if self.num_inference_steps is None:
            return t - 1
        matches = np.flatnonzero(self.timesteps == t)
        if matches.size == 0:
            raise ValueError(f"DDPMScheduler: timestep {t} is not one of the scheduler's timesteps")
        index = int(matches[0])
        return -1 if index == len(self.timesteps) - 1 else int(self.timesteps[index + 1])

    def _variance(
        self, alpha_prod_t: np.float32, alpha_prod_t_prev: np.float32, predicted_variance: np.ndarray | None
    ) -> np.ndarray | np.float32:
        """diffusers' `_get_variance`: variance, std or log-variance depending on variance_type."""
        current_beta_t = _ONE - alpha_prod_t / alpha_prod_t_prev
        variance = (_ONE - alpha_prod_t_prev) / (_ONE - alpha_prod_t) * current_beta_t
        variance = np.maximum(variance, _MIN_VARIANCE)  # the log of it is taken below
        kind = self.config["variance_type"]
        if kind == "fixed_small":
            return variance
        if kind == "fixed_small_log":
            return _exp(_HALF * _log(variance))
        if kind == "fixed_large":
            return current_beta_t
        if kind == "learned":
            return predicted_variance
        # "learned_range"
        min_log = _log(variance)
        max_log = _log(current_beta_t)
        frac = (predicted_variance + _ONE) / _TWO
        return frac * max_log + (_ONE - frac) * min_log

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource
    ) -> np.ndarray:
        """One reverse step from `timestep` to the next entry of `timesteps`; returns the new sample.

        With a learned variance type the model output carries 2x the sample's channels. Draws one
        `noise.randn` of the (split) model output's shape when t > 0.
        """
        t = self._check_timestep(timestep)
        prev_t = self.previous_timestep(t)
        model_output, sample = _f32(model_output), _f32(sample)
        learned = self.config["variance_type"] in ("learned", "learned_range")
        model_output, predicted_variance = self._split_variance(model_output, sample, learned)

        # 1. alphas, betas
        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else _ONE
        beta_prod_t = _ONE - alpha_prod_t
        beta_prod_t_prev = _ONE - alpha_prod_t_prev
        current_alpha_t = alpha_prod_t / alpha_prod_t_prev
        current_beta_t = _ONE - current_alpha_t

        # 2. predicted x_0 (DDPM paper eq. 15; v-prediction: Imagen Video, section 2.4)
        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
        elif prediction == "sample":
            pred_original_sample = model_output
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output

        # 3. threshold or clip x_0
        if self.config["thresholding"]:
            pred_original_sample = threshold_sample(
                pred_original_sample,
                self.config["dynamic_thresholding_ratio"],
                self.config["sample_max_value"],
            )
        elif self.config["clip_sample"]:
            limit = np.float32(self.config["clip_sample_range"])
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        # 4-5. posterior mean (DDPM paper eq. 7)
        pred_original_sample_coeff = (np.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
        current_sample_coeff = np.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
        pred_prev_sample = pred_original_sample_coeff * pred_original_sample + current_sample_coeff * sample

        # 6. noise
        if t > 0:
            variance_noise = _f32(noise.randn(model_output.shape))
            variance = self._variance(alpha_prod_t, alpha_prod_t_prev, predicted_variance)
            kind = self.config["variance_type"]
            if kind == "fixed_small_log":  # _variance already returned the standard deviation
                std = variance
            elif kind == "learned_range":  # _variance returned the log-variance
                std = _exp(_HALF * variance)
            else:
                std = np.sqrt(variance)
            pred_prev_sample = pred_prev_sample + std * variance_noise
        return _f32(pred_prev_sample)


class DDIMScheduler(AlphaScheduler):
    """diffusers' `DDIMScheduler` (arXiv:2010.02502) with eta = 0, as the Kandinsky pipelines call it.

    Deterministic: no noise is drawn. The step goes from t to t - T // n (not to the next entry of
    `timesteps`, which differs from it under "linspace"/"trailing" spacing: diffusers does the same);
    below 0 it uses `final_alpha_cumprod` (1 with set_alpha_to_one, else alphas_cumprod[0]).
    """

    PARAMS = {
        **common_params(),
        **_CLIPPING,
        "set_alpha_to_one": Param(True, boolean),
        "prediction_type": Param("epsilon", one_of("epsilon", "sample", "v_prediction")),
        **_THRESHOLDING,
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        self.final_alpha_cumprod = _ONE if self.config["set_alpha_to_one"] else self.alphas_cumprod[0]

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The same spacings as DDPMScheduler (see `_spaced_timesteps`)."""
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        self.timesteps = self._spaced_timesteps(n)
        self.num_inference_steps = n

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """One DDIM step (eta = 0, so `noise` is never drawn from); returns the new sample."""
        if self.num_inference_steps is None:
            raise ValueError("DDIMScheduler: call set_timesteps before step (diffusers raises too)")
        t = self._check_timestep(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        self._check_shapes(model_output, sample)
        prev_t = t - self.num_train_timesteps // self.num_inference_steps

        alpha_prod_t = self.alphas_cumprod[t]
        alpha_prod_t_prev = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.final_alpha_cumprod
        beta_prod_t = _ONE - alpha_prod_t

        prediction = self.config["prediction_type"]
        if prediction == "epsilon":
            pred_original_sample = (sample - np.sqrt(beta_prod_t) * model_output) / np.sqrt(alpha_prod_t)
            pred_epsilon = model_output
        elif prediction == "sample":
            pred_original_sample = model_output
            pred_epsilon = (sample - np.sqrt(alpha_prod_t) * pred_original_sample) / np.sqrt(beta_prod_t)
        else:  # "v_prediction"
            pred_original_sample = np.sqrt(alpha_prod_t) * sample - np.sqrt(beta_prod_t) * model_output
            pred_epsilon = np.sqrt(alpha_prod_t) * model_output + np.sqrt(beta_prod_t) * sample

        if self.config["thresholding"]:
            pred_original_sample = threshold_sample(
                pred_original_sample,
                self.config["dynamic_thresholding_ratio"],
                self.config["sample_max_value"],
            )
        elif self.config["clip_sample"]:
            limit = np.float32(self.config["clip_sample_range"])
            pred_original_sample = np.clip(pred_original_sample, -limit, limit)

        # eta = 0: std_dev_t = 0, the direction pointing to x_t keeps all of sqrt(1 - alpha_bar_prev).
        pred_sample_direction = np.sqrt(_ONE - alpha_prod_t_prev) * pred_epsilon
        return _f32(np.sqrt(alpha_prod_t_prev) * pred_original_sample + pred_sample_direction)
