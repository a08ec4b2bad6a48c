"""What the sigma-indexed schedulers share (DPM-Solver++, UniPC, Euler, Euler ancestral).

These schedulers work on sigma = sqrt((1 - alpha_bar) / alpha_bar) and keep a step index: diffusers
initialises it on the first `step` (or Euler's `scale_model_input`) by looking the timestep up in
`timesteps` (the second match when a value repeats, as Karras timesteps can), unless `set_begin_index`
was called; then it counts up by one per step. `add_noise` picks its sigma the same way: by looking each
timestep up while no begin index is set (the Kandinsky 2.2 pipelines never set one), else at the current
step index (or the begin index before the first step).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from ._common import _ONE, Scheduler, _f32, broadcast_per_item, invalid


def spaced_timesteps(
    spacing: str, last_timestep: int, num_train_timesteps: int, n: int, steps_offset: int
) -> np.ndarray:
    """diffusers' `timestep_spacing` for the multistep schedulers: `n` descending int64 timesteps.

    `last_timestep` is where the schedule starts ("linspace", "leading" and "trailing" count from it; the
    trailing step ratio is taken over all `num_train_timesteps`, as diffusers does).
    """
    if spacing == "linspace":
        return np.linspace(0, last_timestep - 1, n + 1).round()[::-1][:-1].copy().astype(np.int64)
    if spacing == "leading":
        step_ratio = last_timestep // (n + 1)
        return (np.arange(0, n + 1) * step_ratio).round()[::-1][:-1].copy().astype(np.int64) + steps_offset
    step_ratio = num_train_timesteps / n  # "trailing"
    return np.arange(last_timestep, 0, -step_ratio).round().copy().astype(np.int64) - 1


class SigmaScheduler(Scheduler):
    """Step-index state and timestep lookups shared by the sigma-space schedulers."""

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__(config)
        if self.config["rescale_betas_zero_snr"]:
            # diffusers: a zero terminal alpha_bar would give sigma = inf; it uses 2**-24 instead.
            self.alphas_cumprod = self.alphas_cumprod.copy()
            self.alphas_cumprod[-1] = np.float32(2.0**-24)
        self.sigmas = np.zeros(0, dtype=np.float32)
        self._schedule = self.timesteps.astype(np.float64)  # what timesteps are matched against
        self._step_index: int | None = None
        self._begin_index: int | None = None

    def _check_sigma_options(self, unsupported: Sequence[str]) -> None:
        """Refuse the sigma schedules we do not implement (they default to off)."""
        for key in unsupported:
            if self.config.get(key):
                raise invalid(
                    type(self).__name__, key, f"{key}=true is not supported here; valid values: false"
                )

    def _train_sigmas(self) -> np.ndarray:
        """sigma at every trained timestep (float32), from the current alphas_cumprod."""
        return np.sqrt((_ONE - self.alphas_cumprod) / self.alphas_cumprod)

    def _sigma_min_last(self) -> np.float32:
        """The final sigma for final_sigmas_type="sigma_min": sigma at t = 0."""
        return np.sqrt((_ONE - self.alphas_cumprod[0]) / self.alphas_cumprod[0])

    def _karras(self, descending_sigmas: np.ndarray, n: int) -> np.ndarray:
        """Karras et al. (arXiv:2206.00364, eq. 5) rho = 7 sigmas between the trained extremes, float64.

        diffusers reads sigma_min/sigma_max from the config when present there (they are only ever there
        as keys carried over from another scheduler's config).
        """
        sigma_min = self.config.get("sigma_min")
        sigma_max = self.config.get("sigma_max")
        sigma_min = sigma_min if sigma_min is not None else descending_sigmas[-1].item()
        sigma_max = sigma_max if sigma_max is not None else descending_sigmas[0].item()
        rho = 7.0
        ramp = np.linspace(0, 1, n)
        min_inv_rho = sigma_min ** (1 / rho)
        max_inv_rho = sigma_max ** (1 / rho)
        return (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho

    @staticmethod
    def _sigma_to_t(sigma: np.floating, log_sigmas: np.ndarray) -> np.ndarray:
        """The (fractional) trained timestep of `sigma`: linear interpolation in log-sigma.

        Evaluated one sigma at a time with numpy scalars, as diffusers does (with numpy 1.x's promotion
        rules the arithmetic then stays in float32, which a vectorised version would not reproduce).
        """
        log_sigma = np.log(np.maximum(sigma, 1e-10))
        dists = log_sigma - log_sigmas[:, np.newaxis]
        low_idx = np.cumsum(dists >= 0, axis=0).argmax(axis=0).clip(max=log_sigmas.shape[0] - 2)
        high_idx = low_idx + 1
        low, high = log_sigmas[low_idx], log_sigmas[high_idx]
        w = np.clip((low - log_sigma) / (low - high), 0, 1)
        return ((1 - w) * low_idx + w * high_idx).reshape(np.shape(sigma))

    # --- step index ---------------------------------------------------------------------------------

    @property
    def step_index(self) -> int | None:
        """Index into `timesteps` of the next step (None until the first step of a loop)."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """What diffusers' SD img2img pipelines call; the Kandinsky 2.2 pipelines never do."""
        self._begin_index = int(begin_index)

    def _reset(self) -> None:
        self._step_index = None
        self._begin_index = None

    def index_for_timestep(self, timestep: Any) -> int:
        """Where `timestep` sits in `timesteps`: the second match when it repeats, as in diffusers.

        A timestep outside the schedule raises ValueError (diffusers returns the last index for the
        multistep schedulers and raises IndexError for Euler's).
        """
        matches = np.flatnonzero(self._schedule == float(timestep))
        if matches.size == 0:
            raise ValueError(
                f"{type(self).__name__}: timestep {timestep} is not one of the scheduler's timesteps"
            )
        return int(matches[1] if matches.size > 1 else matches[0])

    def _init_step_index(self, timestep: Any) -> None:
        self._step_index = (
            self.index_for_timestep(timestep) if self._begin_index is None else self._begin_index
        )

    def _begin_step(self, timestep: Any) -> int:
        if self.num_inference_steps is None:
            raise ValueError(f"{type(self).__name__}: call set_timesteps before step (diffusers raises too)")
        if self._step_index is None:
            self._init_step_index(timestep)
        if self._step_index >= len(self.timesteps):
            raise ValueError(
                f"{type(self).__name__}: step {self._step_index} requested but the schedule has "
                f"{len(self.timesteps)} timesteps; a scheduler object serves one loop: call set_timesteps "
                "again for the next one"
            )
        return self._step_index

    def _noise_sigmas(self, timesteps: Any, ndim: int) -> np.ndarray:
        """The sigma add_noise uses for each timestep, shaped to broadcast over `ndim` dimensions."""
        t = np.atleast_1d(np.asarray(timesteps))
        if self._begin_index is None:
            indices = [self.index_for_timestep(v) for v in t.reshape(-1)]
        elif self._step_index is not None:
            indices = [self._step_index] * t.shape[0]
        else:
            indices = [self._begin_index] * t.shape[0]
        return broadcast_per_item(self.sigmas[indices], ndim)


class VPSigmaScheduler(SigmaScheduler):
    """The multistep solvers' variance-preserving view of a sigma: alpha_t = 1/sqrt(1+sigma^2)."""

    @staticmethod
    def _alpha_sigma(sigma: Any) -> tuple[Any, Any]:
        alpha_t = _ONE / np.sqrt(sigma * sigma + _ONE)
        return alpha_t, sigma * alpha_t

    def add_noise(self, original_samples: np.ndarray, noise: np.ndarray, timesteps: Any) -> np.ndarray:
        """alpha_t x0 + sigma_t noise, at the sigma of each timestep (see the module docstring)."""
        original_samples = _f32(original_samples)
        alpha_t, sigma_t = self._alpha_sigma(self._noise_sigmas(timesteps, original_samples.ndim))
        return alpha_t * original_samples + sigma_t * _f32(noise)
