"""numpy versions of the two diffusers schedulers Kandinsky 2.2 uses, step for step.

The client runs the diffusion loops itself and must not depend on torch, so `UnCLIPScheduler` (the
prior's) and `DDPMScheduler` (the decoder's) are re-implemented here from diffusers 0.42.1. They follow
diffusers' order of operations and its float32 arithmetic (betas, alphas, cumulative products and the
per-step scalars are float32), so a trajectory stays within about 1e-6 of the sample's magnitude of
diffusers' over 100 steps. Bit-exact equality is not attainable: torch's CPU `linspace` (linear betas)
and its MKL `sqrt` are not correctly rounded, and its `log`/`exp` can differ from the correctly
rounded value (which ours approximates by computing them in float64), so some values differ by an ulp.

Every random number comes from a `NoiseSource`, drawn where diffusers calls `randn_tensor` (only for
t > 0, with the shape of the possibly split model output), so replaying diffusers' draws reproduces
its trajectory.

Deliberate differences from diffusers, all refusals of inputs that diffusers mishandles:
- invalid config values raise `ValueError` naming the key when the scheduler is built, not in `step`;
- `UnCLIPScheduler.set_timesteps(1)` raises `ValueError`: diffusers divides by `num_inference_steps - 1`
  and raises `ZeroDivisionError`;
- `num_inference_steps` above `num_train_timesteps`, or giving a timestep outside the trained range,
  raises `ValueError` (diffusers repeats timesteps or fails with `IndexError` in `step`);
- DDPM `variance_type="fixed_large_log"` raises `ValueError`: diffusers takes the square root of a
  log-variance and returns NaN on every step with t > 0;
- learned variance types need a model output with twice the sample's channels (diffusers fails with
  a `TypeError` on `None` otherwise).
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from .noise import NoiseSource

__all__ = ["DDPMScheduler", "UnCLIPScheduler", "scheduler_from_config"]

# Constants as float32 scalars: numpy 1.x promotes `np.float32 scalar * python float` to float64, while
# diffusers does this arithmetic on float32 0-d tensors.
_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_MIN_VARIANCE = np.float32(1e-20)


def _f32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _log(x: Any) -> Any:
    """float32 log, evaluated in float64 and rounded once.

    numpy's float32 log/exp loops are a few ulp off; torch's are within about an ulp of the correctly
    rounded result, so rounding the float64 result agrees with torch far more often.
    """
    return np.log(np.asarray(x, dtype=np.float64)).astype(np.float32)


def _exp(x: Any) -> Any:
    """float32 exp, evaluated in float64 and rounded once (see `_log`)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)


def _alpha_bar_betas(num_train_timesteps: int, transform: str, max_beta: float = 0.999) -> np.ndarray:
    """diffusers' `betas_for_alpha_bar`: computed in Python floats, then rounded to float32."""
    if transform == "cosine":

        def alpha_bar(t: float) -> float:
            return math.cos((t + 0.008) / 1.008 * math.pi / 2) ** 2

    else:  # "laplace"

        def alpha_bar(t: float) -> float:
            lmb = -0.5 * math.copysign(1, 0.5 - t) * math.log(1 - 2 * math.fabs(0.5 - t) + 1e-6)
            snr = math.exp(lmb)
            return math.sqrt(snr / (1 + snr))

    betas = []
    for i in range(num_train_timesteps):
        t1 = i / num_train_timesteps
        t2 = (i + 1) / num_train_timesteps
        betas.append(min(1 - alpha_bar(t2) / alpha_bar(t1), max_beta))
    return _f32(betas)


def _linspace_f32(start: float, end: float, num: int) -> np.ndarray:
    """`torch.linspace(..., dtype=float32)`, correctly rounded (torch's own is off by <= 1 ulp)."""
    return np.linspace(float(np.float32(start)), float(np.float32(end)), num).astype(np.float32)


def _cumprod_f32(alphas: np.ndarray) -> np.ndarray:
    """torch's CPU `cumprod` accumulates float32 in double and rounds each partial product."""
    return np.cumprod(alphas, dtype=np.float64).astype(np.float32)


def _rescale_zero_terminal_snr(betas: np.ndarray) -> np.ndarray:
    """diffusers' `rescale_zero_terminal_snr` (arXiv:2305.08891, Algorithm 1), in float32."""
    alphas_bar_sqrt = np.sqrt(_cumprod_f32(_ONE - betas))
    first = alphas_bar_sqrt[0]
    last = alphas_bar_sqrt[-1]
    alphas_bar_sqrt = (alphas_bar_sqrt - last) * (first / (first - last))
    alphas_bar = alphas_bar_sqrt * alphas_bar_sqrt
    alphas = np.concatenate([alphas_bar[:1], alphas_bar[1:] / alphas_bar[:-1]])
    return _ONE - alphas


def _torch_quantile_rows(values: np.ndarray, q: float) -> np.ndarray:
    """`torch.quantile(values, q, dim=1)` ("linear"), with torch's float32 rank and lerp.

    numpy's quantile computes the rank in float64 and lerps differently, which moves the result.
    """
    ordered = np.sort(values, axis=1)
    rank = np.float32(q) * np.float32(ordered.shape[1] - 1)
    below = int(rank)
    above = int(np.ceil(rank))
    weight = rank - np.float32(below)
    low, high = ordered[:, below], ordered[:, above]
    # torch's lerp: the form that is exact at the nearer end.
    small = abs(weight) < _HALF
    result = low + weight * (high - low) if small else high - (high - low) * (_ONE - weight)
    # torch returns NaN for a row holding a NaN.
    return np.where(np.isnan(values).any(axis=1), np.float32(np.nan), result)


def _choice(owner: str, config: Mapping[str, Any], key: str, valid: Sequence[str]) -> None:
    if config[key] not in valid:
        raise ValueError(f"{owner}: {key}={config[key]!r} is not supported; valid values: {', '.join(valid)}")


class _DiscreteScheduler:
    """What both schedulers share: config handling, the trained noise schedule and `add_noise`."""

    _DEFAULTS: dict[str, Any] = {}

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        name = type(self).__name__
        # Keys starting with "_" are diffusers metadata (_class_name, _diffusers_version, ...). Other
        # unknown keys belong to other schedulers; diffusers ignores them with a warning, so do we.
        unknown = sorted(k for k in config if not k.startswith("_") and k not in self._DEFAULTS)
        if unknown:
            warnings.warn(f"{name}: ignoring config keys not used by this scheduler: {unknown}", stacklevel=3)
        self.config: dict[str, Any] = {k: config.get(k, v) for k, v in self._DEFAULTS.items()}
        try:
            self.num_train_timesteps = operator.index(self.config["num_train_timesteps"])
        except TypeError:
            raise ValueError(
                f"{name}: num_train_timesteps must be an integer, got {self.config['num_train_timesteps']!r}"
            ) from None
        if self.num_train_timesteps < 1:
            raise ValueError(f"{name}: num_train_timesteps must be >= 1, got {self.num_train_timesteps}")

        self.betas = self._make_betas()
        self.alphas = _ONE - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        self.init_noise_sigma = 1.0  # the initial latents are plain standard-normal noise
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    def _make_betas(self) -> np.ndarray:
        raise NotImplementedError

    def _check_timestep(self, timestep: int) -> int:
        t = operator.index(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: timestep {t} is outside the trained range [0, {self.num_train_timesteps - 1}]"
            )
        return t

    def _check_num_inference_steps(self, num_inference_steps: int, minimum: int) -> int:
        n = operator.index(num_inference_steps)
        if not minimum <= n <= self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: num_inference_steps={n} is outside the valid range "
                f"[{minimum}, {self.num_train_timesteps}] (num_train_timesteps={self.num_train_timesteps})"
            )
        return n

    def _split_variance(
        self, model_output: np.ndarray, sample: np.ndarray, learned: bool
    ) -> tuple[np.ndarray, np.ndarray | None]:
        """Split a learned-variance output `[prediction, variance]` along channels, as diffusers does."""
        if not learned:
            return model_output, None
        channels = sample.shape[1]
        if model_output.ndim < 2 or model_output.shape[1] != 2 * channels:
            raise ValueError(
                f"{type(self).__name__}: variance_type={self.config['variance_type']!r} needs a model output "
                f"with 2 x {channels} channels (prediction, variance), got shape {model_output.shape}"
            )
        return model_output[:, :channels], model_output[:, channels:]

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """Forward diffusion q(x_t | x_0) for image-to-image starts; `noise` is an array here.

        `timesteps` is one per batch item (or a single one); like diffusers, the per-timestep factors are
        flattened and given trailing axes to broadcast against `original_samples`.
        """
        original_samples = _f32(original_samples)
        t = np.asarray(timesteps, dtype=np.int64)
        if t.size and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(
                f"{type(self).__name__}: add_noise timesteps must lie in [0, {self.num_train_timesteps - 1}]"
            )
        alphas_cumprod = self.alphas_cumprod[t].reshape(-1)
        trailing = (1,) * max(original_samples.ndim - 1, 0)
        sqrt_alpha_prod = np.sqrt(alphas_cumprod).reshape(-1, *trailing)
        sqrt_one_minus_alpha_prod = np.sqrt(_ONE - alphas_cumprod).reshape(-1, *trailing)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus_alpha_prod * _f32(noise)


class UnCLIPScheduler(_DiscreteScheduler):
    """diffusers' `UnCLIPScheduler`: DDPM with a cosine schedule and betas recomputed for skipped steps.

    The Kandinsky 2.2 prior uses it with prediction_type="sample", clip_sample_range=10 and
    variance_type="fixed_small_log". `timesteps` run from num_train_timesteps - 1 down to 0.
    """

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "variance_type": "fixed_small_log",
        "clip_sample": True,
        "clip_sample_range": 1.0,
        "prediction_type": "epsilon",
        "beta_schedule": "squaredcos_cap_v2",
    }
    VARIANCE_TYPES = ("fixed_small_log", "learned_range")
    PREDICTION_TYPES = ("epsilon", "sample")
    BETA_SCHEDULES = ("squaredcos_cap_v2",)

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        name = type(self).__name__
        _choice(name, self.config, "variance_type", self.VARIANCE_TYPES)
        _choice(name, self.config, "prediction_type", self.PREDICTION_TYPES)

    def _make_betas(self) -> np.ndarray:
        _choice(type(self).__name__, self.config, "beta_schedule", self.BETA_SCHEDULES)
        return _alpha_bar_betas(self.num_train_timesteps, "cosine")

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Karlo spacing: round(i * (T - 1) / (n - 1)), so both ends (T - 1 and 0) are always visited.

        That spacing needs n >= 2 (diffusers raises ZeroDivisionError for n = 1).
        """
        if operator.index(num_inference_steps) == 1:
            raise ValueError(
                "UnCLIPScheduler (the prior's scheduler) needs at least 2 steps: num_inference_steps=1 is "
                f"outside the valid range [2, {self.num_train_timesteps}]; its spacing divides by "
                "num_inference_steps - 1 (diffusers raises ZeroDivisionError)"
            )
        n = self._check_num_inference_steps(num_inference_steps, minimum=2)
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
                with np.errstate(divide="ignore"):  # log(0) = -inf, as in torch
                    min_log = _log(variance)
                    max_log = _log(beta)
                frac = (predicted_variance + _ONE) / _TWO
                std = _exp(_HALF * (frac * max_log + (_ONE - frac) * min_log))
            else:  # "fixed_small_log"
                std = _exp(_HALF * _log(np.maximum(variance, _MIN_VARIANCE)))
            pred_prev_sample = pred_prev_sample + std * variance_noise
        return _f32(pred_prev_sample)


class DDPMScheduler(_DiscreteScheduler):
    """diffusers' `DDPMScheduler` (ancestral DDPM sampling), used by the Kandinsky 2.2 decoder.

    The released decoder config: linear betas 0.00085..0.012, epsilon prediction, "leading" spacing
    with steps_offset=1, no clipping.
    """

    _DEFAULTS = {
        "num_train_timesteps": 1000,
        "beta_start": 0.0001,
        "beta_end": 0.02,
        "beta_schedule": "linear",
        "trained_betas": None,
        "variance_type": "fixed_small",
        "clip_sample": True,
        "prediction_type": "epsilon",
        "thresholding": False,
        "dynamic_thresholding_ratio": 0.995,
        "clip_sample_range": 1.0,
        "sample_max_value": 1.0,
        "timestep_spacing": "leading",
        "steps_offset": 0,
        "rescale_betas_zero_snr": False,
    }
    BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2", "laplace", "sigmoid")
    # "fixed_large_log" is left out on purpose: diffusers returns NaN for it (see the module docstring).
    VARIANCE_TYPES = ("fixed_small", "fixed_small_log", "fixed_large", "learned", "learned_range")
    PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
    TIMESTEP_SPACINGS = ("leading", "trailing", "linspace")

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        name = type(self).__name__
        if self.config["variance_type"] == "fixed_large_log":
            raise ValueError(
                f"{name}: variance_type='fixed_large_log' is not supported: diffusers 0.42.1 takes the square "
                "root of its log-variance and returns NaN on every step; valid values: "
                + ", ".join(self.VARIANCE_TYPES)
            )
        _choice(name, self.config, "variance_type", self.VARIANCE_TYPES)
        _choice(name, self.config, "prediction_type", self.PREDICTION_TYPES)
        _choice(name, self.config, "timestep_spacing", self.TIMESTEP_SPACINGS)

    def _make_betas(self) -> np.ndarray:
        cfg, n = self.config, self.num_train_timesteps
        if cfg["trained_betas"] is not None:
            betas = _f32(cfg["trained_betas"])
            if betas.shape != (n,):
                raise ValueError(
                    f"DDPMScheduler: trained_betas has shape {betas.shape}, expected ({n},) "
                    f"(num_train_timesteps={n})"
                )
        else:
            _choice(type(self).__name__, cfg, "beta_schedule", self.BETA_SCHEDULES)
            schedule = cfg["beta_schedule"]
            start, end = cfg["beta_start"], cfg["beta_end"]
            if schedule == "linear":
                betas = _linspace_f32(start, end, n)
            elif schedule == "scaled_linear":  # latent-diffusion schedule
                root = _linspace_f32(start**0.5, end**0.5, n)
                betas = root * root
            elif schedule == "squaredcos_cap_v2":  # GLIDE cosine schedule
                betas = _alpha_bar_betas(n, "cosine")
            elif schedule == "laplace":
                betas = _alpha_bar_betas(n, "laplace")
            else:  # "sigmoid" (GeoDiff)
                sigmoid = _ONE / (_ONE + _exp(-_linspace_f32(-6, 6, n)))
                betas = sigmoid * np.float32(end - start) + np.float32(start)
        if cfg["rescale_betas_zero_snr"]:
            betas = _rescale_zero_terminal_snr(betas)
        return betas

    def set_timesteps(self, num_inference_steps: int) -> None:
        """Pick the inference timesteps with the configured `timestep_spacing`.

        "leading": multiples of T // n plus steps_offset; "trailing": counted down from T - 1;
        "linspace": n evenly spaced, rounded, from T - 1 to 0 (arXiv:2305.08891, Table 2).
        """
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        total = self.num_train_timesteps
        spacing = self.config["timestep_spacing"]
        if spacing == "linspace":
            timesteps = np.linspace(0, total - 1, n).round()[::-1].copy().astype(np.int64)
        elif spacing == "leading":
            step_ratio = total // n
            timesteps = (np.arange(0, n) * step_ratio).round()[::-1].copy().astype(np.int64)
            timesteps += int(self.config["steps_offset"])
        else:  # "trailing"
            step_ratio = total / n
            timesteps = np.round(np.arange(total, 0, -step_ratio)).astype(np.int64)
            timesteps -= 1
        if timesteps.max() >= total or timesteps.min() < 0:
            # diffusers accepts this and then fails with IndexError in step().
            raise ValueError(
                f"DDPMScheduler: num_inference_steps={n} with timestep_spacing={spacing!r} and "
                f"steps_offset={self.config['steps_offset']} gives timesteps outside [0, {total - 1}]"
            )
        self.num_inference_steps = n
        self.timesteps = timesteps

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

    def _threshold_sample(self, sample: np.ndarray) -> np.ndarray:
        """Dynamic thresholding (Imagen, arXiv:2205.11487), per batch item, as diffusers does it."""
        flat = sample.reshape(sample.shape[0], -1)
        s = _torch_quantile_rows(np.abs(flat), self.config["dynamic_thresholding_ratio"])
        s = np.minimum(np.maximum(s, _ONE), np.float32(self.config["sample_max_value"]))[:, None]
        return (np.minimum(np.maximum(flat, -s), s) / s).reshape(sample.shape)

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
        `noise.randn` of the sample's shape when t > 0.
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
            pred_original_sample = self._threshold_sample(pred_original_sample)
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


_SCHEDULERS: dict[str, Callable[[Mapping[str, Any]], UnCLIPScheduler | DDPMScheduler]] = {
    "UnCLIPScheduler": UnCLIPScheduler,
    "DDPMScheduler": DDPMScheduler,
}


def scheduler_from_config(config: Mapping[str, Any]) -> UnCLIPScheduler | DDPMScheduler:
    """Build the scheduler a checkpoint's `scheduler_config.json` names in `_class_name`."""
    name = config.get("_class_name")
    if name not in _SCHEDULERS:
        raise ValueError(
            f"_class_name={name!r} is not a supported scheduler; supported: {', '.join(_SCHEDULERS)}"
        )
    return _SCHEDULERS[name](config)
