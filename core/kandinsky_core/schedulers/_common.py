"""What every scheduler shares: float32 arithmetic helpers, noise schedules, config checking.

diffusers computes its schedules and per-step scalars in float32 torch tensors. numpy reproduces those
operations exactly for +, -, *, / and sqrt (all correctly rounded in both). For log, exp and expm1 torch's
CPU scalar path is within about an ulp of the correctly rounded value, which `_log`/`_exp`/`_expm1` get
by evaluating in float64 and rounding once. Constants are float32 scalars (`_ONE`, ...): numpy 1.x
promotes `np.float32 scalar <op> python float` to float64, while torch keeps float32.
"""

from __future__ import annotations

import math
import operator
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from ..errors import InvalidRequest

_ONE = np.float32(1.0)
_TWO = np.float32(2.0)
_HALF = np.float32(0.5)
_ZERO = np.float32(0.0)
_MIN_VARIANCE = np.float32(1e-20)


def _f32(array: Any) -> np.ndarray:
    return np.asarray(array, dtype=np.float32)


def _log(x: Any) -> Any:
    """float32 log, evaluated in float64 and rounded once.

    numpy's float32 log/exp loops are a few ulp off; torch's are within about an ulp of the correctly
    rounded result, so rounding the float64 result agrees with torch far more often.
    """
    with np.errstate(divide="ignore"):  # log(0) = -inf, as in torch (a zero final sigma)
        return np.log(np.asarray(x, dtype=np.float64)).astype(np.float32)[()]


def _exp(x: Any) -> Any:
    """float32 exp, evaluated in float64 and rounded once (see `_log`)."""
    return np.exp(np.asarray(x, dtype=np.float64)).astype(np.float32)[()]


def _expm1(x: Any) -> Any:
    """float32 expm1, evaluated in float64 and rounded once (see `_log`)."""
    return np.expm1(np.asarray(x, dtype=np.float64)).astype(np.float32)[()]


# --- noise schedules ------------------------------------------------------------------------------


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


def make_betas(owner: str, config: Mapping[str, Any], num_train_timesteps: int) -> np.ndarray:
    """The betas of `config`: trained_betas, or beta_schedule from beta_start/beta_end, then the optional
    zero-terminal-SNR rescale. Which schedules a class accepts is checked with its config."""
    n = num_train_timesteps
    if config["trained_betas"] is not None:
        betas = _f32(config["trained_betas"])
        if betas.shape != (n,):
            raise InvalidRequest(
                "scheduler_config.trained_betas",
                f"{owner}: trained_betas has shape {betas.shape}, expected ({n},) (num_train_timesteps={n})",
            )
    else:
        schedule = config["beta_schedule"]
        start, end = config["beta_start"], config["beta_end"]
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
    if config["rescale_betas_zero_snr"]:
        betas = _rescale_zero_terminal_snr(betas)
    return betas


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


def threshold_sample(sample: np.ndarray, ratio: float, max_value: float) -> np.ndarray:
    """Dynamic thresholding (Imagen, arXiv:2205.11487), per batch item, as diffusers does it."""
    flat = sample.reshape(sample.shape[0], -1)
    s = _torch_quantile_rows(np.abs(flat), ratio)
    s = np.minimum(np.maximum(s, _ONE), np.float32(max_value))[:, None]
    return (np.minimum(np.maximum(flat, -s), s) / s).reshape(sample.shape)


def broadcast_per_item(values: np.ndarray, ndim: int) -> np.ndarray:
    """Flatten per-timestep factors and give them trailing axes, as diffusers' add_noise does."""
    return values.reshape(-1, *((1,) * max(ndim - 1, 0)))


# --- config checking ------------------------------------------------------------------------------


def _show(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    return str(value)


def _same(a: Any, b: Any) -> bool:
    """Equality that does not confuse True with 1, 1.0 with 1 or None with anything."""
    flags = (bool, np.bool_)
    if a is None or b is None:
        return a is None and b is None
    if isinstance(a, flags) or isinstance(b, flags):
        return isinstance(a, flags) and isinstance(b, flags) and bool(a) == bool(b)
    if isinstance(a, str) or isinstance(b, str):
        return isinstance(a, str) and isinstance(b, str) and a == b
    if isinstance(a, (int, np.integer)) and isinstance(b, (int, np.integer)):
        return int(a) == int(b)
    return False


def invalid(owner: str, key: str, message: str) -> InvalidRequest:
    return InvalidRequest(f"scheduler_config.{key}", f"{owner}: {message}")


Check = Callable[[str, str, Any], Any]


def one_of(*valid: Any, note: str = "") -> Check:
    def check(owner: str, key: str, value: Any) -> Any:
        for candidate in valid:
            if _same(value, candidate):
                return candidate
        raise invalid(
            owner,
            key,
            f"{key}={value!r} is not supported; valid values: {', '.join(_show(v) for v in valid)}{note}",
        )

    return check


def boolean(owner: str, key: str, value: Any) -> bool:
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    raise invalid(owner, key, f"{key}={value!r} is not a boolean; valid values: true, false")


def integer(low: int | None = None, high: int | None = None) -> Check:
    def check(owner: str, key: str, value: Any) -> int:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            raise invalid(owner, key, f"{key} must be an integer, got {value!r}")
        value = int(value)
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f"[{low if low is not None else '-inf'}, {high if high is not None else 'inf'}]"
            raise invalid(owner, key, f"{key}={value} is outside the valid range {bounds}")
        return value

    return check


def number(low: float | None = None) -> Check:
    def check(owner: str, key: str, value: Any) -> float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, float, np.integer, np.floating)
        ):
            raise invalid(owner, key, f"{key} must be a number, got {value!r}")
        if math.isnan(value) or (low is not None and value < low):
            raise invalid(owner, key, f"{key}={value!r} is outside the valid range [{low}, inf)")
        return value

    return check


def optional(inner: Check) -> Check:
    def check(owner: str, key: str, value: Any) -> Any:
        return None if value is None else inner(owner, key, value)

    return check


def number_list(owner: str, key: str, value: Any) -> Any:
    if value is None:
        return None
    if isinstance(value, np.ndarray):
        value = value.tolist()
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise invalid(owner, key, f"{key} must be null or a list of numbers, got {type(value).__name__}")
    for item in value:
        number()(owner, key, item)
    return list(value)


def integer_list(owner: str, key: str, value: Any) -> list[int]:
    if not isinstance(value, Sequence) or isinstance(value, str):
        raise invalid(owner, key, f"{key} must be a list of integers, got {value!r}")
    return [integer()(owner, key, item) for item in value]


@dataclass(frozen=True)
class Param:
    """One constructor argument of a diffusers scheduler: its default and how a given value is checked
    (the check returns the value stored in `config`, e.g. diffusers' own remapping of legacy names)."""

    default: Any
    check: Check


def common_params(
    *,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedules: Sequence[str] = ("linear", "scaled_linear", "squaredcos_cap_v2"),
    timestep_spacing: str = "leading",
) -> dict[str, Param]:
    """The noise-schedule arguments every diffusers scheduler here takes (with its own defaults)."""
    return {
        "num_train_timesteps": Param(1000, integer(1)),
        "beta_start": Param(beta_start, number()),
        "beta_end": Param(beta_end, number()),
        "beta_schedule": Param("linear", one_of(*beta_schedules)),
        "trained_betas": Param(None, number_list),
        "timestep_spacing": Param(timestep_spacing, one_of("leading", "trailing", "linspace")),
        "steps_offset": Param(0, integer(0)),
        "rescale_betas_zero_snr": Param(False, boolean),
    }


class Scheduler:
    """Base of every scheduler here: the config, the trained noise schedule, the common interface.

    Interface (all float32 numpy, every random number drawn from the `noise` source):
    `set_timesteps(n)`, `timesteps` (int64), `init_noise_sigma`, `order`, `scale_model_input(sample, t)`,
    `step(model_output, t, sample, noise) -> prev_sample`, `add_noise(original, noise, timesteps)`,
    `config` (what diffusers' `scheduler.config` holds, without its "_"-prefixed metadata).

    A scheduler object serves ONE denoising loop: `set_timesteps` starts a loop; the multistep and Euler
    schedulers then keep state between `step` calls (the step index, the previous model outputs) exactly
    as diffusers does. Build a new one (or call `set_timesteps` again) for every generation, and never
    share one between concurrent loops.
    """

    PARAMS: ClassVar[Mapping[str, Param]] = {}
    order: ClassVar[int] = 1  # diffusers' `order` class attribute (1 for every class here)

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        config = dict(config or {})
        name = type(self).__name__
        # Keys starting with "_" are diffusers metadata (_class_name, _diffusers_version, ...). Other
        # unknown keys belong to other schedulers; diffusers ignores them, so do we (with a warning here;
        # `scheduler_from_config` carries them over silently, as diffusers' from_config does).
        unknown = sorted(k for k in config if not k.startswith("_") and k not in self.PARAMS)
        if unknown:
            warnings.warn(f"{name}: ignoring config keys not used by this scheduler: {unknown}", stacklevel=3)
        self.config: dict[str, Any] = {}
        for key, param in self.PARAMS.items():
            if key in config:
                self.config[key] = param.check(name, key, config[key])
            else:
                default = param.default
                self.config[key] = list(default) if isinstance(default, list) else default
        self.num_train_timesteps = self.config["num_train_timesteps"]
        self._check_config()
        self.betas = self._make_betas()
        self.alphas = _ONE - self.betas
        self.alphas_cumprod = _cumprod_f32(self.alphas)
        self.num_inference_steps: int | None = None
        self.timesteps = np.arange(self.num_train_timesteps, dtype=np.int64)[::-1].copy()

    init_noise_sigma: Any = 1.0  # the initial latents are plain standard-normal noise

    def _make_betas(self) -> np.ndarray:
        return make_betas(type(self).__name__, self.config, self.num_train_timesteps)

    def _check_config(self) -> None:
        """Cross-key checks of one class (raise `invalid(...)`)."""

    def _check_timestep(self, timestep: int) -> int:
        t = operator.index(timestep)
        if not 0 <= t < self.num_train_timesteps:
            raise ValueError(
                f"{type(self).__name__}: timestep {t} is outside the trained range [0, {self.num_train_timesteps - 1}]"
            )
        return t

    def _check_num_inference_steps(
        self, num_inference_steps: int, minimum: int, field: str = "num_inference_steps"
    ) -> int:
        n = operator.index(num_inference_steps)
        if not minimum <= n <= self.num_train_timesteps:
            raise InvalidRequest(
                field,
                f"{type(self).__name__}: num_inference_steps={n} is outside the valid range "
                f"[{minimum}, {self.num_train_timesteps}] (num_train_timesteps={self.num_train_timesteps})",
            )
        return n

    def scale_model_input(self, sample: np.ndarray, timestep: int) -> np.ndarray:
        """The model's input at `timestep`: the sample itself (diffusers' identity) unless overridden."""
        return sample

    def _spaced_timesteps(self, n: int) -> np.ndarray:
        """DDPM/DDIM spacing of n timesteps: "leading" (multiples of T // n plus steps_offset),
        "trailing" (counted down from T - 1) or "linspace" (n evenly spaced, rounded; arXiv:2305.08891)."""
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
        self._check_timesteps_in_range(timesteps, n)
        return timesteps

    def _check_timesteps_in_range(self, timesteps: np.ndarray, n: int) -> None:
        total = self.num_train_timesteps
        if timesteps.size and (timesteps.max() >= total or timesteps.min() < 0):
            # diffusers accepts this and then fails with IndexError in step().
            raise InvalidRequest(
                "num_inference_steps",
                f"{type(self).__name__}: num_inference_steps={n} with timestep_spacing="
                f"{self.config['timestep_spacing']!r} and steps_offset={self.config['steps_offset']} gives "
                f"timesteps outside [0, {total - 1}]",
            )

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

    def _check_shapes(self, model_output: np.ndarray, sample: np.ndarray) -> None:
        if model_output.shape != sample.shape:
            raise ValueError(
                f"{type(self).__name__}: model_output has shape {model_output.shape}, the sample {sample.shape} "
                "(only DDPMScheduler takes a learned-variance output with twice the channels)"
            )


class AlphaScheduler(Scheduler):
    """DDPM-family `add_noise`: sqrt(alpha_bar_t) x0 + sqrt(1 - alpha_bar_t) noise at each timestep."""

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
        alphas_cumprod = self.alphas_cumprod[t]
        sqrt_alpha_prod = broadcast_per_item(np.sqrt(alphas_cumprod), original_samples.ndim)
        sqrt_one_minus = broadcast_per_item(np.sqrt(_ONE - alphas_cumprod), original_samples.ndim)
        return sqrt_alpha_prod * original_samples + sqrt_one_minus * _f32(noise)
