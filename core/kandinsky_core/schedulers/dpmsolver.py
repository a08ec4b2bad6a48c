"""`DPMSolverMultistepScheduler` (DPM-Solver++, arXiv:2211.01095), from diffusers 0.42.1."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..noise import NoiseSource
from ._common import (
    _HALF,
    _ONE,
    Param,
    _exp,
    _f32,
    _log,
    boolean,
    common_params,
    invalid,
    number,
    one_of,
    threshold_sample,
)
from ._sigmas import VPSigmaScheduler, spaced_timesteps

_TWO = np.float32(2.0)
_MINUS_TWO = np.float32(-2.0)


def _algorithm_type(owner: str, key: str, value: Any) -> str:
    if value in ("dpmsolver", "sde-dpmsolver", "deis"):
        # diffusers deprecates the first two and, for "deis" (which it maps to dpmsolver++), raises with
        # the default final_sigmas_type="zero": all three need final_sigmas_type="sigma_min" there.
        raise invalid(
            owner,
            key,
            f"algorithm_type={value!r} is not supported (diffusers deprecates 'dpmsolver' and 'sde-dpmsolver', and "
            "rejects all three with the default final_sigmas_type='zero'); valid values: dpmsolver++, "
            "sde-dpmsolver++",
        )
    return one_of("dpmsolver++", "sde-dpmsolver++")(owner, key, value)


def _solver_type(owner: str, key: str, value: Any) -> str:
    if value in ("logrho", "bh1", "bh2"):  # other solvers' names: diffusers maps them to midpoint
        return "midpoint"
    return one_of("midpoint", "heun")(owner, key, value)


def _variance_type(owner: str, key: str, value: Any) -> Any:
    if value in ("learned", "learned_range"):
        raise invalid(
            owner,
            key,
            f"variance_type={value!r} is not supported: diffusers' DPMSolverMultistepScheduler keeps the first 3 "
            "channels of a learned-variance output (an RGB-image assumption) and fails on 4-channel latents; "
            "only DDPMScheduler takes a learned variance; valid values: null, fixed_small, fixed_small_log, "
            "fixed_large",
        )
    # diffusers does not check this key; only the learned types change anything.
    return one_of(None, "fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log")(owner, key, value)


class DPMSolverMultistepScheduler(VPSigmaScheduler):
    """DPM-Solver++ (algorithm_type "dpmsolver++", or its SDE variant "sde-dpmsolver++"), orders 1 and 2.

    Multistep: each step keeps the converted model output (the x0 prediction) for the next, so the object
    carries state through one loop. Final step as diffusers: first order when final_sigmas_type is "zero"
    (the last sigma is 0), or with euler_at_final, or with lower_order_final below 15 steps (which also
    makes the step before it second order at most). "sde-dpmsolver++" draws one `noise.randn` of the
    sample's shape per step, the last one included.
    """

    PARAMS = {
        **common_params(timestep_spacing="linspace"),
        "solver_order": Param(2, one_of(1, 2, note=" (3 is not implemented here)")),
        "prediction_type": Param("epsilon", one_of("epsilon", "sample", "v_prediction")),
        "thresholding": Param(False, boolean),
        "dynamic_thresholding_ratio": Param(0.995, number(0.0)),
        "sample_max_value": Param(1.0, number(0.0)),
        "algorithm_type": Param("dpmsolver++", _algorithm_type),
        "solver_type": Param("midpoint", _solver_type),
        "lower_order_final": Param(True, boolean),
        "euler_at_final": Param(False, boolean),
        "use_karras_sigmas": Param(False, boolean),
        "use_exponential_sigmas": Param(False, boolean),
        "use_beta_sigmas": Param(False, boolean),
        "use_lu_lambdas": Param(False, boolean),
        "use_flow_sigmas": Param(False, boolean),
        "flow_shift": Param(1.0, number()),
        "final_sigmas_type": Param("zero", one_of("zero", "sigma_min")),
        "lambda_min_clipped": Param(-float("inf"), number()),
        "variance_type": Param(None, _variance_type),
        "use_dynamic_shifting": Param(False, one_of(False)),
        "time_shift_type": Param("exponential", one_of("exponential")),
    }

    def _check_config(self) -> None:
        self._check_sigma_options(
            ("use_exponential_sigmas", "use_beta_sigmas", "use_lu_lambdas", "use_flow_sigmas")
        )

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self.model_outputs: list[np.ndarray | None] = [None] * self.config["solver_order"]
        self.lower_order_nums = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The timesteps (with their sigmas) of one loop; resets the multistep state."""
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        cfg, total = self.config, self.num_train_timesteps
        # lambda_min_clipped: leave out the timesteps whose log-SNR is below it (searchsorted on the
        # ascending flipped lambdas, as diffusers does).
        alpha_t = np.sqrt(self.alphas_cumprod)
        sigma_t = np.sqrt(_ONE - self.alphas_cumprod)
        lambdas = _log(alpha_t) - _log(sigma_t)
        clipped_idx = int(np.searchsorted(lambdas[::-1], np.float32(cfg["lambda_min_clipped"]), side="left"))
        last_timestep = total - clipped_idx
        timesteps = spaced_timesteps(cfg["timestep_spacing"], last_timestep, total, n, cfg["steps_offset"])

        train_sigmas = self._train_sigmas()
        if cfg["use_karras_sigmas"]:
            log_sigmas = np.log(train_sigmas)  # numpy's float32 log, as in diffusers
            sigmas = self._karras(np.flip(train_sigmas).copy(), n)
            timesteps = np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas])
            if cfg["beta_schedule"] != "squaredcos_cap_v2":
                timesteps = timesteps.round()
            timesteps = timesteps.astype(np.int64)  # torch's .to(int64) truncates, as astype does
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
        last = self._sigma_min_last() if cfg["final_sigmas_type"] == "sigma_min" else 0.0
        self._check_timesteps_in_range(timesteps, n)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps
        self._schedule = timesteps.astype(np.float64)
        self.num_inference_steps = len(timesteps)
        self.model_outputs = [None] * cfg["solver_order"]
        self.lower_order_nums = 0
        self._reset()

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray, index: int) -> np.ndarray:
        """The x0 prediction DPM-Solver++ works with."""
        prediction = self.config["prediction_type"]
        if prediction == "sample":
            x0_pred = model_output
        else:
            alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
            if prediction == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            else:  # "v_prediction"
                x0_pred = alpha_t * sample - sigma_t * model_output
        if self.config["thresholding"]:
            x0_pred = threshold_sample(
                x0_pred, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
            )
        return x0_pred

    def _lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        """alpha, sigma and log-SNR lambda = log(alpha) - log(sigma) at sigmas[index]."""
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        return alpha, sigma, _log(alpha) - _log(sigma)

    def _first_order(
        self, x0: np.ndarray, sample: np.ndarray, index: int, noise: np.ndarray | None
    ) -> np.ndarray:
        """DPM-Solver++(1) (= DDIM in x0 form), or its SDE variant."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s, lambda_s = self._lambda(index)
        h = lambda_t - lambda_s
        if noise is None:
            return (sigma_t / sigma_s) * sample - (alpha_t * (_exp(-h) - _ONE)) * x0
        return (
            (sigma_t / sigma_s * _exp(-h)) * sample
            + (alpha_t * (_ONE - _exp(_MINUS_TWO * h))) * x0
            + sigma_t * np.sqrt(_ONE - _exp(_MINUS_TWO * h)) * noise
        )

    def _second_order(self, sample: np.ndarray, index: int, noise: np.ndarray | None) -> np.ndarray:
        """Multistep DPM-Solver++(2M) from the last two x0 predictions (midpoint or heun form)."""
        alpha_t, sigma_t, lambda_t = self._lambda(index + 1)
        _, sigma_s0, lambda_s0 = self._lambda(index)
        _, _, lambda_s1 = self._lambda(index - 1)
        m0, m1 = self.model_outputs[-1], self.model_outputs[-2]
        h, h_0 = lambda_t - lambda_s0, lambda_s0 - lambda_s1
        with np.errstate(divide="ignore", invalid="ignore"):  # h = 0 when Karras' last sigma repeats
            r0 = h_0 / h
            inv_r0 = _ONE / r0
        d0, d1 = m0, inv_r0 * (m0 - m1)
        midpoint = self.config["solver_type"] == "midpoint"
        if noise is None:
            coeff = alpha_t * (_exp(-h) - _ONE)
            x_t = (sigma_t / sigma_s0) * sample - coeff * d0
            if midpoint:
                return x_t - _HALF * coeff * d1
            return x_t + (alpha_t * ((_exp(-h) - _ONE) / h + _ONE)) * d1
        coeff = alpha_t * (_ONE - _exp(_MINUS_TWO * h))
        x_t = (sigma_t / sigma_s0 * _exp(-h)) * sample + coeff * d0
        if midpoint:
            x_t = x_t + _HALF * coeff * d1
        else:
            x_t = x_t + (alpha_t * ((_ONE - _exp(_MINUS_TWO * h)) / (_MINUS_TWO * h) + _ONE)) * d1
        return x_t + sigma_t * np.sqrt(_ONE - _exp(_MINUS_TWO * h)) * noise

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """One DPM-Solver++ step from `timestep` to the next sigma; returns the new sample."""
        index = self._begin_step(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        self._check_shapes(model_output, sample)
        cfg, count = self.config, len(self.timesteps)
        lower_order_final = index == count - 1 and (
            cfg["euler_at_final"]
            or (cfg["lower_order_final"] and count < 15)
            or cfg["final_sigmas_type"] == "zero"
        )
        # (diffusers' lower_order_second, the step before the last, only lowers order 3 to 2.)

        x0 = self._convert_model_output(model_output, sample, index)
        self.model_outputs = [*self.model_outputs[1:], x0]
        draw = None
        if cfg["algorithm_type"] == "sde-dpmsolver++":
            if noise is None:
                raise ValueError(
                    "DPMSolverMultistepScheduler: algorithm_type 'sde-dpmsolver++' needs a noise source"
                )
            draw = _f32(noise.randn(x0.shape))

        if cfg["solver_order"] == 1 or self.lower_order_nums < 1 or lower_order_final:
            prev_sample = self._first_order(x0, sample, index, draw)
        else:  # solver_order 2
            prev_sample = self._second_order(sample, index, draw)
        if self.lower_order_nums < cfg["solver_order"]:
            self.lower_order_nums += 1
        self._step_index = index + 1
        return _f32(prev_sample)
