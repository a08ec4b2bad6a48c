"""`UniPCMultistepScheduler` (UniPC, arXiv:2302.04867), from diffusers 0.42.1."""

from __future__ import annotations

from typing import Any

import numpy as np

from ..noise import NoiseSource
from ._common import (
    _HALF,
    _ONE,
    Param,
    _expm1,
    _f32,
    _log,
    boolean,
    common_params,
    integer_list,
    invalid,
    number,
    one_of,
    optional,
    threshold_sample,
)
from ._sigmas import VPSigmaScheduler, spaced_timesteps


def _solver_type(owner: str, key: str, value: Any) -> str:
    if value in ("midpoint", "heun", "logrho"):  # DPM-Solver's names: diffusers maps them to bh2
        return "bh2"
    return one_of("bh1", "bh2")(owner, key, value)


def _solver_p(owner: str, key: str, value: Any) -> None:
    if value is not None:
        raise invalid(
            owner, key, "solver_p (another scheduler as predictor) is not supported; valid values: null"
        )
    return None


class UniPCMultistepScheduler(VPSigmaScheduler):
    """UniPC: a multistep predictor (UniP) and, from the second step on, a corrector (UniC) that refines
    the sample the previous step produced with the new model output. Orders 1 and 2, B(h) = "bh1" or
    "bh2", predict_x0 on (data prediction) or off. Deterministic: `noise` is never drawn from.

    Multistep state (the model-output history, the last sample, the order used) lives in the object, so
    it serves one loop. `step` takes no generator in diffusers, which is why diffusers' Kandinsky 2.2
    pipelines (which pass `generator=`) fail with this scheduler; it is checked against the class itself.
    """

    PARAMS = {
        **common_params(timestep_spacing="linspace"),
        "solver_order": Param(2, one_of(1, 2, note=" (3 and above are not implemented here)")),
        "prediction_type": Param("epsilon", one_of("epsilon", "sample", "v_prediction")),
        "thresholding": Param(False, boolean),
        "dynamic_thresholding_ratio": Param(0.995, number(0.0)),
        "sample_max_value": Param(1.0, number(0.0)),
        "predict_x0": Param(True, boolean),
        "solver_type": Param("bh2", _solver_type),
        "lower_order_final": Param(True, boolean),
        "disable_corrector": Param([], integer_list),
        "solver_p": Param(None, _solver_p),
        "use_karras_sigmas": Param(False, boolean),
        "use_exponential_sigmas": Param(False, boolean),
        "use_beta_sigmas": Param(False, boolean),
        "use_flow_sigmas": Param(False, boolean),
        "flow_shift": Param(1.0, number()),
        "final_sigmas_type": Param("zero", one_of("zero", "sigma_min")),
        "use_dynamic_shifting": Param(False, one_of(False)),
        "time_shift_type": Param("exponential", one_of("exponential")),
        "sigma_min": Param(None, optional(number(0.0))),
        "sigma_max": Param(None, optional(number(0.0))),
        "shift_terminal": Param(None, one_of(None)),
    }

    def _check_config(self) -> None:
        self._check_sigma_options(("use_exponential_sigmas", "use_beta_sigmas", "use_flow_sigmas"))
        cfg, name = self.config, type(self).__name__
        if cfg["final_sigmas_type"] == "zero":
            # With a zero last sigma, log-SNR is infinite at the last step: diffusers' formulas then give
            # NaN (bh1: B(h) = h = -inf times a zero residual; predict_x0=False: 0 * inf) or inf (a
            # second-order last step divides by r_k = 0). Refused rather than returned.
            if cfg["solver_type"] == "bh1":
                raise invalid(
                    name,
                    "solver_type",
                    "solver_type='bh1' with final_sigmas_type='zero' is not supported: diffusers returns NaN at "
                    "the last step; use solver_type 'bh2' or final_sigmas_type 'sigma_min'",
                )
            if not cfg["predict_x0"]:
                raise invalid(
                    name,
                    "predict_x0",
                    "predict_x0=false with final_sigmas_type='zero' is not supported: diffusers returns NaN at "
                    "the last step; use predict_x0 true or final_sigmas_type 'sigma_min'",
                )
            if not cfg["lower_order_final"] and cfg["solver_order"] > 1:
                raise invalid(
                    name,
                    "lower_order_final",
                    "lower_order_final=false with final_sigmas_type='zero' and solver_order 2 is not supported: "
                    "diffusers' last step divides by zero (inf/NaN); valid values: true",
                )

    def __init__(self, config: Any = None) -> None:
        super().__init__(config)
        self._reset_state()

    def _reset_state(self) -> None:
        order = self.config["solver_order"]
        self.model_outputs: list[np.ndarray | None] = [None] * order
        self.timestep_list: list[int | None] = [None] * order
        self.lower_order_nums = 0
        self.last_sample: np.ndarray | None = None
        self.this_order = 0

    def set_timesteps(self, num_inference_steps: int) -> None:
        """The timesteps (with their sigmas) of one loop; resets the multistep state."""
        n = self._check_num_inference_steps(num_inference_steps, minimum=1)
        cfg, total = self.config, self.num_train_timesteps
        timesteps = spaced_timesteps(cfg["timestep_spacing"], total, total, n, cfg["steps_offset"])

        train_sigmas = self._train_sigmas()
        if cfg["use_karras_sigmas"]:
            log_sigmas = np.log(train_sigmas)  # numpy's float32 log, as in diffusers
            sigmas = self._karras(np.flip(train_sigmas).copy(), n)
            timesteps = np.array([self._sigma_to_t(sigma, log_sigmas) for sigma in sigmas]).round()
            timesteps = timesteps.astype(np.int64)
            last = sigmas[-1] if cfg["final_sigmas_type"] == "sigma_min" else 0
        else:
            sigmas = np.interp(timesteps, np.arange(0, len(train_sigmas)), train_sigmas)
            last = self._sigma_min_last() if cfg["final_sigmas_type"] == "sigma_min" else 0
        self._check_timesteps_in_range(timesteps, n)
        self.sigmas = np.concatenate([sigmas, [last]]).astype(np.float32)
        self.timesteps = timesteps
        self._schedule = timesteps.astype(np.float64)
        self.num_inference_steps = len(timesteps)
        self._reset_state()
        self._reset()

    def _convert_model_output(self, model_output: np.ndarray, sample: np.ndarray, index: int) -> np.ndarray:
        """x0 prediction (predict_x0) or noise prediction, from the model output at sigmas[index]."""
        alpha_t, sigma_t = self._alpha_sigma(self.sigmas[index])
        prediction = self.config["prediction_type"]
        if self.config["predict_x0"]:
            if prediction == "epsilon":
                x0_pred = (sample - sigma_t * model_output) / alpha_t
            elif prediction == "sample":
                x0_pred = model_output
            else:  # "v_prediction"
                x0_pred = alpha_t * sample - sigma_t * model_output
            if self.config["thresholding"]:
                x0_pred = threshold_sample(
                    x0_pred, self.config["dynamic_thresholding_ratio"], self.config["sample_max_value"]
                )
            return x0_pred
        if prediction == "epsilon":
            return model_output
        if prediction == "sample":
            return (sample - alpha_t * model_output) / sigma_t
        return alpha_t * model_output + sigma_t * sample  # "v_prediction"

    def _lambda(self, index: int) -> tuple[np.float32, np.float32, np.float32]:
        alpha, sigma = self._alpha_sigma(self.sigmas[index])
        return alpha, sigma, _log(alpha) - _log(sigma)

    def _coefficients(
        self, h: np.float32, order: int
    ) -> tuple[np.float32, np.float32, np.float32, list[np.float32]]:
        """hh, h*phi_1(hh), B(h) and the right-hand side b of UniPC's order conditions."""
        hh = -h if self.config["predict_x0"] else h
        h_phi_1 = _expm1(hh)  # h * phi_1(h) = e^h - 1
        b_h = hh if self.config["solver_type"] == "bh1" else _expm1(hh)
        factorial, b = 1, []
        # h = 0 (Karras with final_sigmas_type="sigma_min" repeats the last sigma) makes these 0/0; the
        # first-order last step does not use them, as in diffusers.
        with np.errstate(divide="ignore", invalid="ignore"):
            h_phi_k = h_phi_1 / hh - _ONE
            for i in range(1, order + 1):
                b.append(h_phi_k * np.float32(factorial) / b_h)
                factorial *= i + 1
                h_phi_k = h_phi_k / hh - np.float32(1 / factorial)
        return hh, h_phi_1, b_h, b

    def _update(
        self,
        x: np.ndarray,
        index_t: int,
        index_s0: int,
        previous: list[tuple[int, np.ndarray]],
        order: int,
        corrector_output: np.ndarray | None,
    ) -> np.ndarray:
        """UniP (corrector_output None) or UniC update from sigmas[index_s0] to sigmas[index_t].

        `previous`: (sigma index, converted model output) of the older steps, newest first.
        """
        m0 = self.model_outputs[-1]
        alpha_t, sigma_t, lambda_t = self._lambda(index_t)
        alpha_s0, sigma_s0, lambda_s0 = self._lambda(index_s0)
        h = lambda_t - lambda_s0
        rks, d1s = [], []
        for index_si, mi in previous[: order - 1]:
            _, _, lambda_si = self._lambda(index_si)
            with np.errstate(divide="ignore", invalid="ignore"):
                rk = (lambda_si - lambda_s0) / h
            rks.append(rk)
            d1s.append((mi - m0) / rk)
        rks.append(_ONE)
        hh, h_phi_1, b_h, b = self._coefficients(h, order)

        if self.config["predict_x0"]:
            x_t_ = sigma_t / sigma_s0 * x - alpha_t * h_phi_1 * m0
            factor = alpha_t * b_h
        else:
            x_t_ = alpha_t / alpha_s0 * x - sigma_t * h_phi_1 * m0
            factor = sigma_t * b_h

        if corrector_output is None:  # UniP; order 2 uses rho = 1/2 (diffusers hard-codes it)
            if not d1s:
                return x_t_ - factor * 0  # diffusers subtracts a zero residual (NaN if factor is inf)
            pred_res = _HALF * d1s[0]
            return x_t_ - factor * pred_res
        # UniC: solve R rho = b with R[k] = rks ** k (order 1: rho = 1/2).
        if order == 1:
            rhos_c = np.array([_HALF], dtype=np.float32)
        else:
            r = np.stack([np.power(np.array(rks, dtype=np.float32), k) for k in range(order)])
            rhos_c = np.linalg.solve(r, np.array(b, dtype=np.float32)).astype(np.float32)
        corr_res = rhos_c[0] * d1s[0] if d1s else 0
        d1_t = corrector_output - m0
        return x_t_ - factor * (corr_res + rhos_c[-1] * d1_t)

    def step(
        self, model_output: np.ndarray, timestep: int, sample: np.ndarray, noise: NoiseSource | None = None
    ) -> np.ndarray:
        """Correct the sample with this model output (from the second step on), then predict the next one."""
        index = self._begin_step(timestep)
        model_output, sample = _f32(model_output), _f32(sample)
        self._check_shapes(model_output, sample)
        cfg = self.config
        use_corrector = (
            index > 0 and (index - 1) not in cfg["disable_corrector"] and self.last_sample is not None
        )
        converted = self._convert_model_output(model_output, sample, index)
        if use_corrector:
            # model_outputs still ends with the previous step's output: it is m0 of the corrector, whose
            # older outputs sit at sigma indices index - 2, index - 3, ...
            older = [(index - 1 - k, self.model_outputs[-1 - k]) for k in range(1, len(self.model_outputs))]
            sample = _f32(self._update(self.last_sample, index, index - 1, older, self.this_order, converted))

        self.model_outputs = [*self.model_outputs[1:], converted]
        self.timestep_list = [*self.timestep_list[1:], int(timestep)]
        order = cfg["solver_order"]
        this_order = min(order, len(self.timesteps) - index) if cfg["lower_order_final"] else order
        self.this_order = min(this_order, self.lower_order_nums + 1)  # warm-up of the multistep method
        self.last_sample = sample
        older = [(index - k, self.model_outputs[-1 - k]) for k in range(1, len(self.model_outputs))]
        prev_sample = self._update(sample, index + 1, index, older, self.this_order, None)
        if self.lower_order_nums < order:
            self.lower_order_nums += 1
        self._step_index = index + 1
        return _f32(prev_sample)
