"""The client's numpy schedulers against diffusers' torch ones, step by step.

Every trajectory test runs diffusers with a seeded generator while recording what its `randn_tensor`
hands out, then runs the client with those draws replayed through `ReplayNoise`: the two runs must
agree at every step and consume exactly the same draws.
"""

from __future__ import annotations

import inspect
import os
import subprocess
import sys
import types
from pathlib import Path

import diffusers
import numpy as np
import pytest
import tomllib
import torch
from diffusers import DDPMScheduler as RefDDPM
from diffusers import UnCLIPScheduler as RefUnCLIP
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_img2img import KandinskyV22Img2ImgPipeline
from diffusers.pipelines.kandinsky2_2.pipeline_kandinsky2_2_prior_emb2emb import (
    KandinskyV22PriorEmb2EmbPipeline,
)
from diffusers.schedulers import (
    scheduling_ddpm,
    scheduling_dpmsolver_multistep,
    scheduling_euler_ancestral_discrete,
    scheduling_unclip,
)
from kandinsky_export.presets import DECODER_SCHEDULER as PRESET_DECODER_CONFIG

try:
    from kandinsky_core import schedulers as ks
    from kandinsky_core.errors import InvalidRequest
    from kandinsky_core.noise import ReplayNoise
except ImportError:  # the client package is not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    from kandinsky_core import schedulers as ks
    from kandinsky_core.errors import InvalidRequest
    from kandinsky_core.noise import ReplayNoise

CLIENT_DIR = Path(ks.__file__).resolve().parents[2]

# Tolerances of the trajectory comparisons. Both sides do the same float32 operations in the same
# order, so they can differ only where a float32 primitive is rounded differently: torch's CPU linspace
# (the linear betas) and its MKL sqrt are not correctly rounded, and its log/exp are within an ulp of
# what ours rounds from float64. Each such difference is one ulp (~6e-8 relative) of a beta or a step
# coefficient; it is amplified by up to 1/sqrt(alpha_prod_t) (~15 at the decoder's t=999) and carried
# along the trajectory, so it is measured against the sample's magnitude (atol is scaled by max |x| at
# each step: an element near zero carries the absolute error of its large neighbours).
# Largest deviation / max |x| seen on an AVX-512 CPU (torch 2.13): with our own schedule 9e-7 up to
# 100 steps and 5e-6 after 999 decoder steps; with diffusers' betas and alphas copied in (isolating the
# step arithmetic) 0 in most cases and at most 1e-6. A wrong formula (a missed clip, a beta one step
# off, a wrong variance) deviates by 1e-3 or more.
RTOL = 1e-5
ATOL = 2e-5  # times max |x| of the expected sample at that step
EXACT_RTOL = 1e-5  # for runs on diffusers' own schedule
EXACT_ATOL = 5e-6  # times max |x|


# The Kandinsky 2.2 scheduler configs (kandinsky-community/kandinsky-2-2-prior and -decoder,
# scheduler/scheduler_config.json) with their diffusers metadata keys; keys left out take diffusers'
# defaults.
PRIOR_CONFIG = {
    "_class_name": "UnCLIPScheduler",
    "_diffusers_version": "0.17.0.dev0",
    "clip_sample": True,
    "clip_sample_range": 10.0,
    "num_train_timesteps": 1000,
    "prediction_type": "sample",
    "variance_type": "fixed_small_log",
}
DECODER_CONFIG = {
    "_class_name": "DDPMScheduler",
    "_diffusers_version": "0.18.0.dev0",
    "beta_end": 0.012,
    "beta_schedule": "linear",
    "beta_start": 0.00085,
    "clip_sample": False,
    "num_train_timesteps": 1000,
    "prediction_type": "epsilon",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

LATENT = (2, 4, 8, 8)  # small decoder latents: batch 2, 4 channels
EMBED = (2, 1280)  # prior image embeddings


def _pair(config: dict) -> tuple:
    """The diffusers scheduler and ours, built from the same config dict."""
    ref_cls = RefUnCLIP if config["_class_name"] == "UnCLIPScheduler" else RefDDPM
    return ref_cls.from_config(config), ks.scheduler_from_config(config)


def _fake_model(sample: np.ndarray, rand: np.ndarray, scale: float, variance: str | None) -> np.ndarray:
    """A stand-in network: it depends on its input, so that step errors feed back as in a real loop.

    With a learned variance the output carries a second half of channels: values in [-1, 1] for
    "learned_range", positive variances for "learned".
    """
    channels = sample.shape[1]
    prediction = (0.5 * sample + scale * rand[:, :channels]).astype(np.float32)
    if variance is None:
        return prediction
    extra = rand[:, channels:]
    extra = np.tanh(extra) if variance == "learned_range" else 1e-3 * (1.0 + np.abs(extra))
    return np.concatenate([prediction, extra.astype(np.float32)], axis=1)


def _trajectories(
    config: dict,
    num_steps: int,
    shape: tuple[int, ...],
    monkeypatch: pytest.MonkeyPatch,
    *,
    scale: float = 1.0,
    pass_prev_timestep: bool = False,
    seed: int = 0,
    diffusers_schedule: bool = False,
) -> tuple[float, float]:
    """Run both schedulers over a whole trajectory; assert agreement at every step.

    With `diffusers_schedule`, ours runs on diffusers' own betas and alphas, which isolates the step
    arithmetic from the ulp-level differences of the schedule. Returns the largest absolute deviation
    and the largest deviation relative to the sample's magnitude at that step.
    """
    ref, ours = _pair(config)
    if diffusers_schedule:
        ours.betas, ours.alphas, ours.alphas_cumprod = (
            getattr(ref, name).numpy().copy() for name in ("betas", "alphas", "alphas_cumprod")
        )
    module = scheduling_unclip if isinstance(ours, ks.UnCLIPScheduler) else scheduling_ddpm
    learned = ours.config["variance_type"] in ("learned", "learned_range")
    variance = ours.config["variance_type"] if learned else None
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps.dtype == np.int64

    rng = np.random.default_rng(seed)
    start = rng.standard_normal(shape, dtype=np.float32)
    out_shape = (shape[0], shape[1] * (2 if learned else 1), *shape[2:])
    rands = [rng.standard_normal(out_shape, dtype=np.float32) for _ in range(num_steps)]

    draws: list[np.ndarray] = []
    original_randn = module.randn_tensor

    def recording_randn(*args, **kwargs):
        out = original_randn(*args, **kwargs)
        draws.append(out.numpy().copy())
        return out

    monkeypatch.setattr(module, "randn_tensor", recording_randn)

    last = len(ref.timesteps) - 1
    generator = torch.Generator().manual_seed(seed)
    ref_sample = torch.from_numpy(start.copy())
    ref_trajectory = []
    for i, t in enumerate(ref.timesteps):
        model_output = torch.from_numpy(_fake_model(ref_sample.numpy(), rands[i], scale, variance))
        kwargs = {}
        if pass_prev_timestep:  # as KandinskyV22PriorPipeline does
            kwargs["prev_timestep"] = None if i == last else ref.timesteps[i + 1]
        ref_sample = ref.step(model_output, t, ref_sample, generator=generator, **kwargs).prev_sample
        ref_trajectory.append(ref_sample.numpy().copy())
    assert len(draws) == int((ref.timesteps > 0).sum())

    replay = ReplayNoise(draws)
    sample = start.copy()
    rtol, atol = (EXACT_RTOL, EXACT_ATOL) if diffusers_schedule else (RTOL, ATOL)
    max_abs = max_scaled = 0.0
    for i, t in enumerate(ours.timesteps):
        model_output = _fake_model(sample, rands[i], scale, variance)
        kwargs = {}
        if pass_prev_timestep:
            kwargs["prev_timestep"] = None if i == last else int(ours.timesteps[i + 1])
        sample = ours.step(model_output, t, sample, replay, **kwargs)
        assert sample.dtype == np.float32 and sample.shape == shape
        expected = ref_trajectory[i]
        assert np.isfinite(expected).all()
        magnitude = float(np.abs(expected).max())
        np.testing.assert_allclose(
            sample, expected, rtol=rtol, atol=atol * magnitude, err_msg=f"step {i}, t={t}"
        )
        error = float(np.abs(sample.astype(np.float64) - expected).max())
        max_abs = max(max_abs, error)
        max_scaled = max(max_scaled, error / magnitude)
    assert replay.remaining == 0
    print(f"max abs error {max_abs:.2e}, max error / max |x| {max_scaled:.2e}")
    return max_abs, max_scaled


# --- whole trajectories ---------------------------------------------------------------------------


SCHEDULES = pytest.mark.parametrize(
    "diffusers_schedule", [False, True], ids=["own_schedule", "shared_schedule"]
)


@SCHEDULES
@pytest.mark.parametrize("num_steps", [2, 3, 25, 100])
def test_prior_trajectory_matches_diffusers(num_steps, diffusers_schedule, monkeypatch):
    # scale 12: about 40% of the predicted samples exceed clip_sample_range=10, so clipping is exercised.
    _trajectories(
        PRIOR_CONFIG,
        num_steps,
        EMBED,
        monkeypatch,
        scale=12.0,
        pass_prev_timestep=True,
        diffusers_schedule=diffusers_schedule,
    )


@SCHEDULES
def test_unclip_without_prev_timestep_uses_precomputed_betas(diffusers_schedule, monkeypatch):
    # 1000 steps visit every t, so prev_timestep=None (t - 1) takes the betas[t] branch of diffusers.
    config = {**PRIOR_CONFIG, "prediction_type": "epsilon", "clip_sample_range": 1.0}
    _trajectories(config, 1000, (2, 16), monkeypatch, diffusers_schedule=diffusers_schedule)


@SCHEDULES
@pytest.mark.parametrize("pass_prev_timestep", [True, False])
def test_unclip_learned_range_matches_diffusers(pass_prev_timestep, diffusers_schedule, monkeypatch):
    config = {**PRIOR_CONFIG, "prediction_type": "epsilon", "variance_type": "learned_range"}
    _trajectories(
        config,
        25,
        (2, 16),
        monkeypatch,
        pass_prev_timestep=pass_prev_timestep,
        diffusers_schedule=diffusers_schedule,
    )


@SCHEDULES
@pytest.mark.parametrize("num_steps", [1, 2, 10, 50, 100, 999])
def test_decoder_trajectory_matches_diffusers(num_steps, diffusers_schedule, monkeypatch):
    _trajectories(DECODER_CONFIG, num_steps, LATENT, monkeypatch, diffusers_schedule=diffusers_schedule)


DDPM_CASES = {
    "clip_sample": ({"clip_sample": True}, 50),
    "clip_sample_range": ({"clip_sample": True, "clip_sample_range": 2.5}, 50),
    "learned_range_8_channels": ({"variance_type": "learned_range"}, 50),
    "learned_8_channels": ({"variance_type": "learned"}, 25),
    "fixed_small_log": ({"variance_type": "fixed_small_log"}, 25),
    "fixed_large": ({"variance_type": "fixed_large"}, 25),
    "v_prediction_trailing": ({"prediction_type": "v_prediction", "timestep_spacing": "trailing"}, 30),
    "v_prediction_trailing_zero_snr": (
        {"prediction_type": "v_prediction", "timestep_spacing": "trailing", "rescale_betas_zero_snr": True},
        30,
    ),
    "sample_linspace": (
        {"prediction_type": "sample", "timestep_spacing": "linspace", "clip_sample": True},
        20,
    ),
    "thresholding": ({"thresholding": True, "sample_max_value": 3.0}, 50),
    "thresholding_ratio": (
        {"thresholding": True, "dynamic_thresholding_ratio": 0.9, "sample_max_value": 1.5},
        20,
    ),
    "scaled_linear": ({"beta_schedule": "scaled_linear"}, 25),
    "squaredcos_cap_v2": ({"beta_schedule": "squaredcos_cap_v2", "clip_sample": True}, 25),
    "laplace": ({"beta_schedule": "laplace"}, 25),
    "sigmoid": ({"beta_schedule": "sigmoid"}, 25),
    "trained_betas": ({"trained_betas": np.linspace(1e-4, 0.02, 1000).tolist()}, 25),
    "diffusers_defaults": ({"beta_start": 0.0001, "beta_end": 0.02, "steps_offset": 0}, 40),
}


@SCHEDULES
@pytest.mark.parametrize("case", list(DDPM_CASES))
def test_ddpm_variants_match_diffusers(case, diffusers_schedule, monkeypatch):
    overrides, num_steps = DDPM_CASES[case]
    _trajectories(
        {**DECODER_CONFIG, **overrides}, num_steps, LATENT, monkeypatch, diffusers_schedule=diffusers_schedule
    )


def test_thresholding_changes_the_result():
    """Guards the thresholding cases above against passing because thresholding never triggers."""
    plain = ks.DDPMScheduler({**DECODER_CONFIG})
    thresholded = ks.DDPMScheduler({**DECODER_CONFIG, "thresholding": True, "sample_max_value": 3.0})
    for scheduler in (plain, thresholded):
        scheduler.set_timesteps(50)
    rng = np.random.default_rng(1)
    sample, model_output = rng.standard_normal((2, *LATENT), dtype=np.float32)
    t = plain.timesteps[0]
    a = plain.step(model_output, t, sample, ReplayNoise([np.zeros(LATENT)]))
    b = thresholded.step(model_output, t, sample, ReplayNoise([np.zeros(LATENT)]))
    assert np.abs(a - b).max() > 1e-2


def test_ddpm_step_before_set_timesteps_steps_to_t_minus_1():
    ref, ours = _pair(DECODER_CONFIG)
    rng = np.random.default_rng(2)
    for t in (999, 500, 1, 0):
        sample, model_output, noise = rng.standard_normal((3, *LATENT), dtype=np.float32)
        replay = ReplayNoise([noise] if t > 0 else [])
        ours_out = ours.step(model_output, t, sample, replay)
        # diffusers draws its own noise: hand it the same array by patching randn_tensor.
        draw = torch.from_numpy(noise.copy())
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(scheduling_ddpm, "randn_tensor", lambda *a, draw=draw, **k: draw)
            ref_out = ref.step(torch.from_numpy(model_output), t, torch.from_numpy(sample)).prev_sample
        np.testing.assert_allclose(ours_out, ref_out.numpy(), rtol=RTOL, atol=1e-6)
        assert replay.remaining == 0


# --- schedules and timesteps ----------------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"beta_schedule": "scaled_linear"},
        {"beta_schedule": "squaredcos_cap_v2"},
        {"beta_schedule": "laplace"},
        {"beta_schedule": "sigmoid"},
        {"num_train_timesteps": 37, "beta_start": 0.001, "beta_end": 0.2},
    ],
)
def test_ddpm_noise_schedule_matches_diffusers(overrides):
    ref, ours = _pair({**DECODER_CONFIG, **overrides})
    for name in ("betas", "alphas", "alphas_cumprod"):
        mine, theirs = getattr(ours, name), getattr(ref, name).numpy()
        assert mine.dtype == np.float32
        # A few float32 ulps at most (torch's linspace and sqrt are not correctly rounded).
        np.testing.assert_allclose(mine, theirs, rtol=5e-7, atol=1e-12, err_msg=name)


@pytest.mark.parametrize("beta_schedule", ["linear", "scaled_linear"])
def test_zero_snr_rescale_matches_diffusers(beta_schedule):
    ref, ours = _pair({**DECODER_CONFIG, "beta_schedule": beta_schedule, "rescale_betas_zero_snr": True})
    assert ours.alphas_cumprod[-1] == 0.0 and ref.alphas_cumprod[-1] == 0.0
    # The rescale subtracts nearly equal square roots, so one ulp of difference there (torch's sqrt)
    # becomes up to ~1e-5 in the last betas, in diffusers as in ours; the cumulative alphas, which is
    # what the steps use, stay within a few 1e-7.
    np.testing.assert_allclose(ours.alphas_cumprod, ref.alphas_cumprod.numpy(), rtol=0, atol=5e-7)
    np.testing.assert_allclose(ours.betas, ref.betas.numpy(), rtol=0, atol=2e-5)


def test_unclip_noise_schedule_matches_diffusers():
    ref, ours = _pair(PRIOR_CONFIG)
    np.testing.assert_array_equal(ours.betas, ref.betas.numpy())  # python floats rounded once: exact
    np.testing.assert_array_equal(ours.alphas_cumprod, ref.alphas_cumprod.numpy())


STEP_COUNTS = [1, 2, 3, 7, 10, 25, 50, 100, 333, 999, 1000]


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("steps_offset", [0, 1])
@pytest.mark.parametrize("num_train_timesteps", [1000, 500])
def test_ddpm_timesteps_match_diffusers(spacing, steps_offset, num_train_timesteps):
    config = {
        **DECODER_CONFIG,
        "timestep_spacing": spacing,
        "steps_offset": steps_offset,
        "num_train_timesteps": num_train_timesteps,
    }
    ref, ours = _pair(config)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())  # before set_timesteps
    for n in [n for n in STEP_COUNTS if n <= num_train_timesteps]:
        ref.set_timesteps(n)
        expected = ref.timesteps.numpy()
        if expected.max() >= num_train_timesteps:
            # diffusers accepts this (leading + offset with n = T) and fails later in step(); we refuse.
            with pytest.raises(ValueError, match="num_inference_steps"):
                ours.set_timesteps(n)
            continue
        ours.set_timesteps(n)
        assert ours.timesteps.dtype == np.int64
        np.testing.assert_array_equal(ours.timesteps, expected, err_msg=f"{n} steps")
        prev = [ours.previous_timestep(t) for t in ours.timesteps]
        assert prev == [int(ref.previous_timestep(t)) for t in ref.timesteps]


def test_released_decoder_timesteps():
    ours = ks.scheduler_from_config(DECODER_CONFIG)
    ours.set_timesteps(10)
    assert ours.timesteps.tolist() == [901, 801, 701, 601, 501, 401, 301, 201, 101, 1]


@pytest.mark.parametrize("n", [2, 3, 7, 10, 25, 50, 100, 999, 1000])
def test_unclip_timesteps_match_diffusers(n):
    ref, ours = _pair(PRIOR_CONFIG)
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    assert ours.timesteps.dtype == np.int64
    np.testing.assert_array_equal(ours.timesteps, ref.timesteps.numpy())
    assert ours.timesteps[0] == 999 and ours.timesteps[-1] == 0


# --- add_noise ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("config", "shape", "timesteps"),
    [
        (DECODER_CONFIG, (4, 4, 8, 8), [0, 1, 500, 999]),
        (DECODER_CONFIG, (1, 4, 8, 8), 250),
        (PRIOR_CONFIG, (4, 1280), [999, 600, 17, 0]),
        ({**DECODER_CONFIG, "rescale_betas_zero_snr": True}, (3, 4, 8, 8), [999, 998, 3]),
    ],
)
def test_add_noise_matches_diffusers(config, shape, timesteps):
    ref, ours = _pair(config)
    rng = np.random.default_rng(3)
    original, noise = rng.standard_normal((2, *shape), dtype=np.float32)
    expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.tensor(timesteps))
    mine = ours.add_noise(original, noise, np.asarray(timesteps))
    assert mine.dtype == np.float32 and mine.shape == shape
    np.testing.assert_allclose(mine, expected.numpy(), rtol=1e-6, atol=1e-7)


# --- configs and refusals -------------------------------------------------------------------------


@pytest.mark.parametrize("config", [PRIOR_CONFIG, DECODER_CONFIG, {"_class_name": "DDPMScheduler"}])
def test_config_defaults_match_diffusers(config):
    ref, ours = _pair(config)
    assert type(ours).__name__ == config["_class_name"]
    assert not any(key.startswith("_") for key in ours.config)
    for key, value in ours.config.items():
        assert value == ref.config[key], key
    assert set(ours.config) == {key for key in ref.config if not key.startswith("_")}
    assert ours.init_noise_sigma == 1.0


def test_unknown_config_key_warns():
    with pytest.warns(UserWarning, match="set_alpha_to_one"):
        ks.DDPMScheduler({**DECODER_CONFIG, "set_alpha_to_one": False})


@pytest.mark.parametrize("cls", [ks.UnCLIPScheduler, ks.DDPMScheduler])
@pytest.mark.parametrize("n", [0, -1, 1001])
def test_num_inference_steps_out_of_range(cls, n):
    with pytest.raises(ValueError, match=r"num_inference_steps.*\[(1|2), 1000\]"):
        cls().set_timesteps(n)


def test_prior_needs_two_steps():
    with pytest.raises(ZeroDivisionError):  # what diffusers does: step_ratio divides by n - 1
        RefUnCLIP.from_config(PRIOR_CONFIG).set_timesteps(1)
    with pytest.raises(ValueError, match=r"num_inference_steps=1 .*\[2, 1000\]"):
        ks.scheduler_from_config(PRIOR_CONFIG).set_timesteps(1)


@pytest.mark.parametrize(
    ("cls", "key", "value"),
    [
        (ks.DDPMScheduler, "beta_schedule", "cubic"),
        (ks.DDPMScheduler, "prediction_type", "x0"),
        (ks.DDPMScheduler, "variance_type", "fixed_medium"),
        (ks.DDPMScheduler, "timestep_spacing", "uniform"),
        (ks.UnCLIPScheduler, "beta_schedule", "linear"),
        (ks.UnCLIPScheduler, "prediction_type", "v_prediction"),
        (ks.UnCLIPScheduler, "variance_type", "fixed_small"),
    ],
)
def test_unsupported_values_name_the_key(cls, key, value):
    with pytest.raises(ValueError, match=key) as info:
        cls({key: value})
    assert repr(value) in str(info.value) and "valid values" in str(info.value)


def test_fixed_large_log_is_refused_because_diffusers_returns_nan():
    ref = RefDDPM(variance_type="fixed_large_log")
    ref.set_timesteps(10)
    out = ref.step(torch.randn(LATENT), ref.timesteps[0], torch.randn(LATENT)).prev_sample
    assert torch.isnan(out).all()  # if diffusers ever fixes this, support it here too
    with pytest.raises(ValueError, match="variance_type"):
        ks.DDPMScheduler({"variance_type": "fixed_large_log"})


@pytest.mark.parametrize("config", [{"_class_name": "HeunDiscreteScheduler"}, {}])
def test_unknown_class_name(config):
    with pytest.raises(
        InvalidRequest, match="scheduler: .*valid names: UnCLIPScheduler, DDPMScheduler"
    ) as info:
        ks.scheduler_from_config(config)
    assert info.value.field == "scheduler"


@pytest.mark.parametrize("cls", [ks.UnCLIPScheduler, ks.DDPMScheduler])
def test_learned_range_needs_twice_the_channels(cls):
    scheduler = cls({"variance_type": "learned_range"})
    scheduler.set_timesteps(10)
    sample = np.zeros(LATENT, dtype=np.float32)
    with pytest.raises(ValueError, match="2 x 4 channels"):
        scheduler.step(sample, scheduler.timesteps[0], sample, ReplayNoise([]))


def test_timestep_outside_schedule():
    scheduler = ks.scheduler_from_config(DECODER_CONFIG)
    scheduler.set_timesteps(10)
    sample = np.zeros(LATENT, dtype=np.float32)
    with pytest.raises(ValueError, match="timestep 500"):
        scheduler.step(sample, 500, sample, ReplayNoise([]))
    with pytest.raises(ValueError, match="timestep 1000"):
        scheduler.step(sample, 1000, sample, ReplayNoise([]))


def test_importing_schedulers_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(CLIENT_DIR), os.environ.get("PYTHONPATH", "")])}
    code = "import sys, kandinsky_core.schedulers; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


# === the decoder schedulers beyond DDPM ================================================
#
# Each numpy scheduler runs whole decoder trajectories next to its diffusers class, both built from the
# same Kandinsky 2.2 decoder config the way diffusers' `from_config` builds them. The stand-in UNet is a
# fixed smooth function of its (scaled) input and t, evaluated on the [uncond, cond] batch with 8 output
# channels (noise + learned variance), combined and split exactly as KandinskyV22Pipeline does.
#
# Tolerances (float32). Both sides do the same float32 operations in the same order; they can differ
# only where a primitive rounds differently: torch's CPU linspace (the linear betas, <= 1 ulp), and
# log/exp/expm1 of the per-step scalars (torch's vs ours rounded from float64, <= 1 ulp). One ulp of a
# step coefficient is ~6e-8 relative; the multistep solvers amplify it by the divided difference
# (m0 - m1) / r0 and every step feeds the next, so the error is measured against the sample's
# magnitude: the largest |x| of the trajectory so far (an element near zero, or a sample shrunk by x0
# clipping, carries the absolute error made on larger values).
# Measured on an AMD EPYC CPU (torch 2.13, numpy 1.26, diffusers 0.42.1): at most 1.1e-6 of max |x|
# for the deterministic schedulers and 2.6e-6 for sde-dpmsolver++ and the extreme-magnitude configs
# (zero-SNR, cosine + Karras); docs/schedulers.md lists them. A wrong coefficient, a sigma one step off,
# a missed final-order switch, a skipped corrector or a 1% error in the ancestral noise scale deviates by
# 1e-3 or more, so 2e-5 keeps a ~8x margin over rounding and a 50x margin under the smallest real bug.
TRAJ_ATOL = 2e-5  # times max |x| of the expected sample at that step
TRAJ_RTOL = 1e-5

DECODER_CONFIGS = {"released": DECODER_CONFIG, "preset": PRESET_DECODER_CONFIG}
NOISY_MODULES = (scheduling_ddpm, scheduling_euler_ancestral_discrete, scheduling_dpmsolver_multistep)
GUIDANCE = 4.0


def _fake_unet(model_input: np.ndarray, t: float, cfg: bool) -> np.ndarray:
    """8-channel output for [uncond, cond] (or one batch without guidance), smooth in input and t."""
    x = model_input.astype(np.float64)
    s = t / 1000.0
    batch = np.concatenate([x, x]) if cfg else x
    eps = 0.8 * np.tanh(batch) + 0.2 * np.sin(1.3 * batch + 3.0 * s)
    if cfg:  # the conditional half differs
        eps[len(x) :] += 0.1 * np.cos(2.0 * x + s)
    variance = np.tanh(0.5 * batch - s)  # in (-1, 1), as "learned_range" expects
    return np.concatenate([eps, variance], axis=1).astype(np.float32)


def _guide_torch(out: torch.Tensor, channels: int, cfg: bool, learned: bool) -> torch.Tensor:
    """KandinskyV22Pipeline's guidance and split, in torch as the pipeline writes it."""
    if cfg:
        noise_pred, variance_pred = out.split(channels, dim=1)
        uncond, cond = noise_pred.chunk(2)
        _, variance_cond = variance_pred.chunk(2)
        out = torch.cat([uncond + GUIDANCE * (cond - uncond), variance_cond], dim=1)
    if not learned:
        out, _ = out.split(channels, dim=1)
    return out


def _guide_numpy(out: np.ndarray, channels: int, cfg: bool, learned: bool) -> np.ndarray:
    if cfg:
        uncond, cond = np.split(out[:, :channels], 2)
        variance_cond = np.split(out[:, channels:], 2)[1]
        out = np.concatenate([uncond + np.float32(GUIDANCE) * (cond - uncond), variance_cond], axis=1)
    return out if learned else out[:, :channels]


def _diffusers_pair(config: dict, class_name: str, overrides: dict | None = None) -> tuple:
    overrides = overrides or {}
    ref = getattr(diffusers, class_name).from_config(config, **overrides)
    ours = ks.scheduler_from_config(config, class_name, overrides)
    return ref, ours


class _Recorder:
    """Records what diffusers' randn_tensor hands out, in every scheduler module that draws noise."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.draws: list[np.ndarray] = []
        for module in NOISY_MODULES:
            original = module.randn_tensor

            def recording(*args, _original=original, **kwargs):
                out = _original(*args, **kwargs)
                self.draws.append(out.numpy().copy())
                return out

            monkeypatch.setattr(module, "randn_tensor", recording)


def _step_kwargs(ref, generator) -> dict:
    # The Kandinsky pipelines pass generator=; UniPC's step takes none (diffusers' pipelines fail there).
    return {"generator": generator} if "generator" in inspect.signature(ref.step).parameters else {}


def _assert_close(
    mine: np.ndarray, expected: np.ndarray, what: str, peak: float = 0.0
) -> tuple[float, float]:
    """Compare against TRAJ_ATOL times the largest |x| of the trajectory so far (`peak`): an error made
    while the sample was large is carried into later, smaller samples (e.g. after x0 clipping)."""
    assert np.isfinite(expected).all(), f"{what}: diffusers' value is not finite"
    assert np.isfinite(mine).all(), f"{what}: ours is not finite"
    magnitude = max(peak, float(np.abs(expected).max()))
    np.testing.assert_allclose(mine, expected, rtol=TRAJ_RTOL, atol=TRAJ_ATOL * magnitude, err_msg=what)
    error = float(np.abs(mine.astype(np.float64) - expected).max())
    return error, error / magnitude


def _decoder_loops(
    ref,
    ours,
    timesteps_ref: torch.Tensor,
    timesteps_ours: np.ndarray,
    start_ref: torch.Tensor,
    start_ours: np.ndarray,
    monkeypatch: pytest.MonkeyPatch,
    *,
    cfg: bool = True,
    after_step_ref=None,
    after_step_ours=None,
    label: str = "",
) -> tuple[float, float]:
    """Run the decoder loop on both sides (diffusers' first, recording its draws; ours replaying them)
    and compare every step. Returns (max abs error, max error / max |x|)."""
    np.testing.assert_array_equal(timesteps_ours, timesteps_ref.numpy())
    assert timesteps_ours.dtype == np.int64
    channels = start_ours.shape[1]
    learned = ks.learned_variance(ours)
    assert learned == (getattr(ref.config, "variance_type", None) in ("learned", "learned_range"))

    recorder = _Recorder(monkeypatch)
    generator = torch.Generator().manual_seed(0)
    kwargs = _step_kwargs(ref, generator)
    latents = start_ref
    expected = []
    for i, t in enumerate(timesteps_ref):
        model_input = ref.scale_model_input(latents, t)
        out = torch.from_numpy(_fake_unet(model_input.numpy(), float(t), cfg))
        latents = ref.step(_guide_torch(out, channels, cfg, learned), t, latents, **kwargs).prev_sample
        if after_step_ref is not None:
            latents = after_step_ref(latents, i)
        expected.append(latents.numpy().copy())
    monkeypatch.undo()

    replay = ReplayNoise(recorder.draws)
    latents = start_ours
    max_abs = max_rel = 0.0
    peak = float(np.abs(start_ref.numpy()).max())
    for i, t in enumerate(timesteps_ours):
        model_input = ours.scale_model_input(latents, t)
        out = _guide_numpy(_fake_unet(model_input, float(t), cfg), channels, cfg, learned)
        latents = ours.step(out, t, latents, replay)
        if after_step_ours is not None:
            latents = after_step_ours(latents, i)
        assert latents.dtype == np.float32 and latents.shape == start_ours.shape
        peak = max(peak, float(np.abs(expected[i]).max()))
        error, relative = _assert_close(latents, expected[i], f"{label} step {i}, t={t}", peak)
        max_abs, max_rel = max(max_abs, error), max(max_rel, relative)
    assert replay.remaining == 0, "diffusers drew noise that we did not"
    print(f"TRAJECTORY {label} max_abs={max_abs:.2e} max_rel={max_rel:.2e} peak={peak:.3g}")
    return max_abs, max_rel


def _text_to_image(config, class_name, overrides, num_steps, monkeypatch, *, cfg=True, seed=0, label=""):
    ref, ours = _diffusers_pair(config, class_name, overrides)
    ref.set_timesteps(num_steps)
    ours.set_timesteps(num_steps)
    np.testing.assert_allclose(float(ours.init_noise_sigma), float(ref.init_noise_sigma), rtol=1e-6)
    start = np.random.default_rng(seed).standard_normal(LATENT, dtype=np.float32)
    # prepare_latents: randn * init_noise_sigma (a float or a 0-d float32 tensor in diffusers)
    start_ref = torch.from_numpy(start.copy()) * ref.init_noise_sigma
    start_ours = start * np.float32(ours.init_noise_sigma)
    return _decoder_loops(
        ref, ours, ref.timesteps, ours.timesteps, start_ref, start_ours, monkeypatch, cfg=cfg, label=label
    )


STEP_COUNTS_DECODER = [1, 2, 7, 20, 50]
# (class, overrides) variants run over every step count; Karras on/off and orders 1/2 for the solvers.
BASE_VARIANTS = {
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++2M_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "DPM++1": ("DPMSolverMultistepScheduler", {"solver_order": 1}),
    "DPM++1_karras": ("DPMSolverMultistepScheduler", {"solver_order": 1, "use_karras_sigmas": True}),
    "UniPC2": ("UniPCMultistepScheduler", {}),
    "UniPC2_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC1": ("UniPCMultistepScheduler", {"solver_order": 1}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "EulerA": ("EulerAncestralDiscreteScheduler", {}),
}


@pytest.mark.parametrize("num_steps", STEP_COUNTS_DECODER)
@pytest.mark.parametrize("variant", list(BASE_VARIANTS))
def test_decoder_scheduler_trajectory_matches_diffusers(variant, num_steps, monkeypatch):
    class_name, overrides = BASE_VARIANTS[variant]
    _text_to_image(
        DECODER_CONFIG, class_name, overrides, num_steps, monkeypatch, label=f"{variant} n={num_steps}"
    )


# Options at 20 steps (7 where the step count decides the final-step order: lower_order_final < 15).
OPTION_VARIANTS = {
    "DDIM_preset": ("preset", "DDIMScheduler", {}, 20),
    "DDIM_trailing": ("released", "DDIMScheduler", {"timestep_spacing": "trailing"}, 20),
    "DDIM_linspace_clip": (
        "released",
        "DDIMScheduler",
        {"timestep_spacing": "linspace", "clip_sample": True},
        20,
    ),
    "DDIM_no_alpha_one_v": (
        "released",
        "DDIMScheduler",
        {"set_alpha_to_one": False, "prediction_type": "v_prediction"},
        20,
    ),
    "DDIM_thresholding": ("released", "DDIMScheduler", {"thresholding": True, "sample_max_value": 2.0}, 20),
    "DDPM_learned_range_8ch": ("released", "DDPMScheduler", {"variance_type": "learned_range"}, 20),
    "DPM_preset": ("preset", "DPMSolverMultistepScheduler", {}, 20),
    "DPM_linspace": ("released", "DPMSolverMultistepScheduler", {"timestep_spacing": "linspace"}, 20),
    "DPM_trailing": ("released", "DPMSolverMultistepScheduler", {"timestep_spacing": "trailing"}, 20),
    "DPM_heun": ("released", "DPMSolverMultistepScheduler", {"solver_type": "heun"}, 20),
    "DPM_sigma_min_20": ("released", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, 20),
    "DPM_sigma_min_7": ("released", "DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min"}, 7),
    "DPM_sigma_min_karras_7": (
        "released",
        "DPMSolverMultistepScheduler",
        {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        7,
    ),
    "DPM_sigma_min_no_lower_final_7": (
        "released",
        "DPMSolverMultistepScheduler",
        {"final_sigmas_type": "sigma_min", "lower_order_final": False},
        7,
    ),
    "DPM_euler_at_final": (
        "released",
        "DPMSolverMultistepScheduler",
        {"final_sigmas_type": "sigma_min", "euler_at_final": True},
        20,
    ),
    "DPM_sde": ("released", "DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, 20),
    "DPM_sde_karras_heun": (
        "released",
        "DPMSolverMultistepScheduler",
        {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True, "solver_type": "heun"},
        20,
    ),
    "DPM_thresholding_v": (
        "released",
        "DPMSolverMultistepScheduler",
        {"thresholding": True, "sample_max_value": 2.0, "prediction_type": "v_prediction"},
        20,
    ),
    "DPM_zero_snr_trailing": (
        "released",
        "DPMSolverMultistepScheduler",
        {"rescale_betas_zero_snr": True, "timestep_spacing": "trailing"},
        20,
    ),
    "DPM_lambda_clipped": ("released", "DPMSolverMultistepScheduler", {"lambda_min_clipped": -5.1}, 20),
    "DPM_karras_cosine": (
        "released",
        "DPMSolverMultistepScheduler",
        {"use_karras_sigmas": True, "beta_schedule": "squaredcos_cap_v2"},
        20,
    ),
    "UniPC_preset": ("preset", "UniPCMultistepScheduler", {}, 20),
    "UniPC_sigma_min": ("released", "UniPCMultistepScheduler", {"final_sigmas_type": "sigma_min"}, 20),
    "UniPC_karras_sigma_min": (
        "released",
        "UniPCMultistepScheduler",
        {"final_sigmas_type": "sigma_min", "use_karras_sigmas": True},
        20,
    ),
    "UniPC_bh1_sigma_min": (
        "released",
        "UniPCMultistepScheduler",
        {"solver_type": "bh1", "final_sigmas_type": "sigma_min"},
        20,
    ),
    "UniPC_noise_pred_sigma_min": (
        "released",
        "UniPCMultistepScheduler",
        {"predict_x0": False, "final_sigmas_type": "sigma_min"},
        20,
    ),
    "UniPC_disable_corrector": ("released", "UniPCMultistepScheduler", {"disable_corrector": [0, 3]}, 7),
    "UniPC_no_lower_final_sigma_min": (
        "released",
        "UniPCMultistepScheduler",
        {"lower_order_final": False, "final_sigmas_type": "sigma_min"},
        7,
    ),
    "UniPC_trailing_thresholding": (
        "released",
        "UniPCMultistepScheduler",
        {"timestep_spacing": "trailing", "thresholding": True, "sample_max_value": 2.0},
        20,
    ),
    "Euler_preset": ("preset", "EulerDiscreteScheduler", {}, 20),
    "Euler_trailing": ("released", "EulerDiscreteScheduler", {"timestep_spacing": "trailing"}, 20),
    "Euler_linspace_10": ("released", "EulerDiscreteScheduler", {"timestep_spacing": "linspace"}, 10),
    "Euler_sigma_min_v": (
        "released",
        "EulerDiscreteScheduler",
        {"final_sigmas_type": "sigma_min", "prediction_type": "v_prediction"},
        20,
    ),
    "EulerA_preset": ("preset", "EulerAncestralDiscreteScheduler", {}, 20),
    "EulerA_trailing_v": (
        "released",
        "EulerAncestralDiscreteScheduler",
        {"timestep_spacing": "trailing", "prediction_type": "v_prediction"},
        20,
    ),
}


@pytest.mark.parametrize("variant", list(OPTION_VARIANTS))
def test_decoder_scheduler_options_match_diffusers(variant, monkeypatch):
    config_name, class_name, overrides, num_steps = OPTION_VARIANTS[variant]
    _text_to_image(DECODER_CONFIGS[config_name], class_name, overrides, num_steps, monkeypatch, label=variant)


@pytest.mark.parametrize("class_name", ks.DECODER_SCHEDULERS)
def test_decoder_scheduler_without_guidance(class_name, monkeypatch):
    _text_to_image(
        DECODER_CONFIG, class_name, {}, 20, monkeypatch, cfg=False, seed=5, label=f"{class_name} no CFG"
    )


def test_karras_timesteps_repeat_and_are_looked_up_like_diffusers(monkeypatch):
    """At 50 Karras steps the rounded timesteps repeat (..., 1, 1, 0): the step index still counts up."""
    ref, ours = _diffusers_pair(DECODER_CONFIG, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    ours.set_timesteps(50)
    assert len(np.unique(ours.timesteps)) < 50
    assert ours.index_for_timestep(1) == int(np.flatnonzero(ours.timesteps == 1)[1])  # the second match


# --- image-to-image: strength slicing, add_noise, the sliced loop ----------------------------------

STRENGTH_VARIANTS = {
    "DDPM": ("DDPMScheduler", {}),
    "DDIM": ("DDIMScheduler", {}),
    "DPM++2M": ("DPMSolverMultistepScheduler", {}),
    "DPM++2M_karras": ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
    "UniPC2": ("UniPCMultistepScheduler", {}),
    "UniPC2_karras": ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
    "Euler": ("EulerDiscreteScheduler", {}),
    "EulerA": ("EulerAncestralDiscreteScheduler", {}),
}
STRENGTHS = [0.05, 0.3, 0.5, 0.75, 0.99, 1.0]


@pytest.mark.parametrize("variant", list(STRENGTH_VARIANTS))
def test_strength_timesteps_match_diffusers_get_timesteps(variant):
    class_name, overrides = STRENGTH_VARIANTS[variant]
    ref, ours = _diffusers_pair(DECODER_CONFIG, class_name, overrides)
    pipe = types.SimpleNamespace(scheduler=ref)
    for n in (7, 20, 50):
        for strength in STRENGTHS:
            ref.set_timesteps(n)
            expected, expected_steps = KandinskyV22Img2ImgPipeline.get_timesteps(pipe, n, strength, "cpu")
            if expected_steps == 0:
                with pytest.raises(InvalidRequest, match="strength") as info:
                    ks.strength_timesteps(ours, n, strength)
                assert info.value.field == "strength"
                continue
            try:
                timesteps, steps = ks.strength_timesteps(ours, n, strength)
            except InvalidRequest as error:  # a repeated Karras first timestep: diffusers' loop fails
                assert "repeats" in str(error) and "Karras" not in class_name
                continue
            np.testing.assert_array_equal(timesteps, expected.numpy(), err_msg=f"n={n} strength={strength}")
            assert steps == expected_steps == len(timesteps)


@pytest.mark.parametrize("n", [2, 7, 25])
def test_prior_emb2emb_strength_timesteps_match_diffusers(n):
    ref, ours = _pair(PRIOR_CONFIG)
    pipe = types.SimpleNamespace(scheduler=ref)
    for strength in (0.3, 0.5, 0.8, 1.0):
        ref.set_timesteps(n)
        expected, expected_steps = KandinskyV22PriorEmb2EmbPipeline.get_timesteps(pipe, n, strength, "cpu")
        if expected_steps == 0:
            with pytest.raises(InvalidRequest, match="strength"):
                ks.strength_timesteps(ours, n, strength)
            continue
        timesteps, steps = ks.strength_timesteps(ours, n, strength)
        np.testing.assert_array_equal(timesteps, expected.numpy())
        assert steps == expected_steps


@pytest.mark.parametrize("strength", [0.3, 0.75])
@pytest.mark.parametrize("variant", list(STRENGTH_VARIANTS))
def test_img2img_loop_matches_diffusers(variant, strength, monkeypatch):
    """KandinskyV22Img2ImgPipeline's start and loop: timesteps sliced by strength, the image latents
    noised at the first of them (no set_begin_index), then the usual steps on the sliced timesteps."""
    class_name, overrides = STRENGTH_VARIANTS[variant]
    ref, ours = _diffusers_pair(DECODER_CONFIG, class_name, overrides)
    n = 20
    ref.set_timesteps(n)
    timesteps_ref, _ = KandinskyV22Img2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=ref), n, strength, "cpu"
    )
    timesteps_ours, steps = ks.strength_timesteps(ours, n, strength)
    assert steps == len(timesteps_ref)
    rng = np.random.default_rng(7)
    image_latents = rng.standard_normal(LATENT, dtype=np.float32)
    noise = rng.standard_normal(LATENT, dtype=np.float32)
    batch = LATENT[0]
    start_ref = ref.add_noise(
        torch.from_numpy(image_latents), torch.from_numpy(noise), timesteps_ref[:1].repeat(batch)
    )
    start_ours = ours.add_noise(image_latents, noise, np.repeat(timesteps_ours[:1], batch))
    _assert_close(start_ours, start_ref.numpy(), "add_noise at the first timestep")
    _decoder_loops(
        ref,
        ours,
        timesteps_ref,
        timesteps_ours,
        start_ref,
        start_ours,
        monkeypatch,
        label=f"img2img {variant} {strength}",
    )


def test_repeated_karras_first_timestep_fails_in_diffusers_and_is_refused_here():
    ref, ours = _diffusers_pair(DECODER_CONFIG, "DPMSolverMultistepScheduler", {"use_karras_sigmas": True})
    n, strength = 50, 0.07  # keeps the last 3 timesteps: 1, 1, 0
    ref.set_timesteps(n)
    timesteps, _ = KandinskyV22Img2ImgPipeline.get_timesteps(
        types.SimpleNamespace(scheduler=ref), n, strength, "cpu"
    )
    assert timesteps.tolist() == [1, 1, 0]
    sample = torch.zeros(LATENT)
    with pytest.raises(IndexError):  # diffusers starts at the second "1" and steps past the schedule
        for t in timesteps:
            sample = ref.step(sample, t, sample).prev_sample
    with pytest.raises(InvalidRequest, match="repeats") as info:
        ks.strength_timesteps(ours, n, strength)
    assert info.value.field == "strength"


# --- inpainting: the known region re-noised after every step --------------------------------------


@pytest.mark.parametrize("variant", list(STRENGTH_VARIANTS))
def test_inpaint_renoise_matches_diffusers(variant, monkeypatch):
    """KandinskyV22InpaintPipeline's loop: after each step the known region is the image latents noised
    with add_noise(image[:1], noise, [timesteps[i + 1]]) (clean after the last step), with noise =
    the initial latents as diffusers clones them (after init_noise_sigma)."""
    class_name, overrides = STRENGTH_VARIANTS[variant]
    ref, ours = _diffusers_pair(DECODER_CONFIG, class_name, overrides)
    n = 7
    ref.set_timesteps(n)
    ours.set_timesteps(n)
    rng = np.random.default_rng(11)
    image = rng.standard_normal((1, *LATENT[1:]), dtype=np.float32)
    keep = np.zeros((1, 1, *LATENT[2:]), dtype=np.float32)
    keep[..., : LATENT[2] // 2, :] = 1.0  # top half known
    start = rng.standard_normal(LATENT, dtype=np.float32)
    start_ref = torch.from_numpy(start.copy()) * ref.init_noise_sigma
    start_ours = start * np.float32(ours.init_noise_sigma)
    noise_ref, noise_ours = start_ref.clone(), start_ours.copy()
    image_ref, keep_ref = torch.from_numpy(image), torch.from_numpy(keep)
    timesteps_ref = ref.timesteps

    def after_ref(latents, i):
        proper = image_ref
        if i < len(timesteps_ref) - 1:
            proper = ref.add_noise(proper, noise_ref, torch.tensor([timesteps_ref[i + 1]]))
        return keep_ref * proper + (1 - keep_ref) * latents

    def after_ours(latents, i):
        proper = ks.inpaint_known_latents(ours, image, noise_ours, ours.timesteps, i)
        return keep * proper + (np.float32(1.0) - keep) * latents

    _decoder_loops(
        ref,
        ours,
        timesteps_ref,
        ours.timesteps,
        start_ref,
        start_ours,
        monkeypatch,
        after_step_ref=after_ref,
        after_step_ours=after_ours,
        label=f"inpaint {variant}",
    )


@pytest.mark.parametrize("variant", list(STRENGTH_VARIANTS))
def test_sigma_add_noise_matches_diffusers(variant):
    class_name, overrides = STRENGTH_VARIANTS[variant]
    ref, ours = _diffusers_pair(DECODER_CONFIG, class_name, overrides)
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    rng = np.random.default_rng(3)
    original, noise = rng.standard_normal((2, 4, 4, 8, 8), dtype=np.float32)
    timesteps = ours.timesteps[[0, 5, 12, 19]]
    expected = ref.add_noise(torch.from_numpy(original), torch.from_numpy(noise), torch.from_numpy(timesteps))
    _assert_close(ours.add_noise(original, noise, timesteps), expected.numpy(), "add_noise")


def test_euler_scale_model_input_and_init_noise_sigma():
    ref, ours = _diffusers_pair(DECODER_CONFIG, "EulerDiscreteScheduler")
    ref.set_timesteps(20)
    ours.set_timesteps(20)
    assert float(ours.init_noise_sigma) > 14  # sqrt(sigma_max^2 + 1) under "leading" spacing
    sample = np.random.default_rng(4).standard_normal(LATENT, dtype=np.float32)
    t = ours.timesteps[3]
    ref._step_index = ours._step_index = 3  # the scaling of the fourth step
    expected = ref.scale_model_input(torch.from_numpy(sample), ref.timesteps[3]).numpy()
    np.testing.assert_allclose(ours.scale_model_input(sample, t), expected, rtol=1e-6)
    for class_name in ks.DECODER_SCHEDULERS:
        if not class_name.startswith("Euler"):
            scheduler = ks.scheduler_from_config(DECODER_CONFIG, class_name)
            scheduler.set_timesteps(10)
            assert scheduler.scale_model_input(sample, scheduler.timesteps[0]) is sample
            assert scheduler.init_noise_sigma == 1.0


# --- construction like from_config, and its refusals ----------------------------------------------


@pytest.mark.parametrize("config_name", list(DECODER_CONFIGS))
@pytest.mark.parametrize("class_name", ks.DECODER_SCHEDULERS)
def test_from_config_carries_the_keys_like_diffusers(class_name, config_name):
    config = DECODER_CONFIGS[config_name]
    for overrides in ({}, {"timestep_spacing": "trailing", "steps_offset": 0}):
        ref, ours = _diffusers_pair(config, class_name, overrides)
        assert type(ours).__name__ == class_name
        expected = {k: v for k, v in ref.config.items() if not k.startswith("_")}
        assert ours.config == expected
        assert ours.order == ref.order == 1
    # diffusers' pipelines read variance_type from the config; a DDPM config's value stays visible there.
    if "variance_type" in config:
        assert ks.scheduler_from_config(config, class_name).config["variance_type"] == "fixed_small"


@pytest.mark.parametrize(
    ("class_name", "overrides"),
    [
        (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": True, "solver_order": 1, "final_sigmas_type": "sigma_min"},
        ),
        ("DPMSolverMultistepScheduler", {"solver_type": "bh2"}),  # remapped to midpoint
        ("UniPCMultistepScheduler", {"solver_type": "midpoint", "disable_corrector": [1]}),  # remapped
        ("EulerDiscreteScheduler", {"final_sigmas_type": "sigma_min", "interpolation_type": "linear"}),
    ],
)
def test_overrides_like_from_config_kwargs(class_name, overrides):
    ref, ours = _diffusers_pair(DECODER_CONFIG, class_name, overrides)
    assert ours.config == {k: v for k, v in ref.config.items() if not k.startswith("_")}


def test_use_default_values_are_not_carried_over():
    """A diffusers scheduler's own config lists the keys nobody set; from_config skips them."""
    ddim = diffusers.DDIMScheduler.from_config(DECODER_CONFIG)
    config = dict(ddim.config)
    assert "_use_default_values" in config
    ref = diffusers.DPMSolverMultistepScheduler.from_config(config)
    ours = ks.scheduler_from_config(config, "DPMSolverMultistepScheduler")
    assert ours.config == {k: v for k, v in ref.config.items() if not k.startswith("_")}


def test_scheduler_swaps_keep_the_checkpoint_class_by_default():
    assert type(ks.decoder_scheduler_from_config(DECODER_CONFIG)).__name__ == "DDPMScheduler"
    assert type(ks.prior_scheduler_from_config(PRIOR_CONFIG)).__name__ == "UnCLIPScheduler"


@pytest.mark.parametrize(
    ("class_name", "overrides", "field", "message"),
    [
        (
            "PNDMScheduler",
            {},
            "scheduler",
            r"valid names: DDPMScheduler, DDIMScheduler, DPMSolverMultistepScheduler",
        ),
        ("UnCLIPScheduler", {}, "scheduler", "valid names: DDPMScheduler"),  # not a decoder scheduler
        (
            "DPMSolverMultistepScheduler",
            {"clip_sample": True},
            "scheduler_config.clip_sample",
            "valid keys: .*solver_order",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"eta": 0.5},
            "scheduler_config.eta",
            "not a DPMSolverMultistepScheduler setting",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpm3"},
            "scheduler_config.algorithm_type",
            "valid values: dpmsolver\\+\\+, sde-dpmsolver\\+\\+",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "dpmsolver"},
            "scheduler_config.algorithm_type",
            "deprecates",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"algorithm_type": "deis"},
            "scheduler_config.algorithm_type",
            "final_sigmas_type='zero'",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"solver_order": 3},
            "scheduler_config.solver_order",
            "valid values: 1, 2",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"solver_order": 2.0},
            "scheduler_config.solver_order",
            "valid values: 1, 2",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": "yes"},
            "scheduler_config.use_karras_sigmas",
            "not a boolean; valid values: true, false",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"use_karras_sigmas": 1},
            "scheduler_config.use_karras_sigmas",
            "not a boolean",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"final_sigmas_type": "max"},
            "scheduler_config.final_sigmas_type",
            "valid values: zero, sigma_min",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"use_lu_lambdas": True},
            "scheduler_config.use_lu_lambdas",
            "valid values: false",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"variance_type": "learned_range"},
            "scheduler_config.variance_type",
            "only DDPMScheduler",
        ),
        (
            "DPMSolverMultistepScheduler",
            {"beta_schedule": "sigmoid"},
            "scheduler_config.beta_schedule",
            "valid values: linear, scaled_linear, squaredcos_cap_v2",
        ),
        (
            "UniPCMultistepScheduler",
            {"solver_order": 3},
            "scheduler_config.solver_order",
            "valid values: 1, 2",
        ),
        ("UniPCMultistepScheduler", {"solver_type": "bh1"}, "scheduler_config.solver_type", "returns NaN"),
        ("UniPCMultistepScheduler", {"predict_x0": False}, "scheduler_config.predict_x0", "returns NaN"),
        (
            "UniPCMultistepScheduler",
            {"lower_order_final": False},
            "scheduler_config.lower_order_final",
            "divides by zero",
        ),
        (
            "EulerDiscreteScheduler",
            {"use_karras_sigmas": True},
            "scheduler_config.use_karras_sigmas",
            "fractional timesteps",
        ),
        (
            "EulerDiscreteScheduler",
            {"interpolation_type": "log_linear"},
            "scheduler_config.interpolation_type",
            "valid values: linear",
        ),
        (
            "EulerAncestralDiscreteScheduler",
            {"prediction_type": "sample"},
            "scheduler_config.prediction_type",
            "valid values: epsilon, v_prediction",
        ),
        ("DDIMScheduler", {"steps_offset": -1}, "scheduler_config.steps_offset", "valid range"),
        (
            "DDIMScheduler",
            {"num_train_timesteps": "1000"},
            "scheduler_config.num_train_timesteps",
            "must be an integer",
        ),
    ],
)
def test_bad_scheduler_names_and_configs(class_name, overrides, field, message):
    with pytest.raises(InvalidRequest, match=message) as info:
        ks.decoder_scheduler_from_config(DECODER_CONFIG, class_name, overrides)
    assert info.value.field == field


@pytest.mark.parametrize("class_name", [c for c in ks.DECODER_SCHEDULERS if c != "DDPMScheduler"])
def test_learned_variance_checkpoints_only_run_ddpm(class_name):
    config = {**DECODER_CONFIG, "variance_type": "learned_range"}
    if class_name != "DPMSolverMultistepScheduler":
        # diffusers keeps the DDPM key in the new class's config, so its pipelines hand the learned
        # variance channels to a step that cannot take them.
        ref = getattr(diffusers, class_name).from_config(config)
        assert ref.config.variance_type == "learned_range"
    with pytest.raises(InvalidRequest, match="variance_type='learned_range'.*only DDPMScheduler"):
        ks.decoder_scheduler_from_config(config, class_name)
    assert ks.learned_variance(ks.decoder_scheduler_from_config(config))


@pytest.mark.parametrize("overrides", [{"solver_type": "bh1"}, {"predict_x0": False}])
def test_unipc_refusals_are_where_diffusers_returns_nan(overrides):
    ref = diffusers.UniPCMultistepScheduler.from_config(DECODER_CONFIG, **overrides)
    ref.set_timesteps(5)
    sample = torch.from_numpy(np.random.default_rng(0).standard_normal(LATENT, dtype=np.float32))
    for t in ref.timesteps:
        sample = ref.step(0.5 * sample, t, sample).prev_sample
    assert torch.isnan(sample).all()  # if diffusers fixes this, lift the refusal


def test_euler_fractional_linspace_timesteps_are_refused():
    ref, ours = _diffusers_pair(DECODER_CONFIG, "EulerDiscreteScheduler", {"timestep_spacing": "linspace"})
    ref.set_timesteps(20)
    assert not torch.equal(ref.timesteps, ref.timesteps.round())  # diffusers' UNet gets fractions
    with pytest.raises(InvalidRequest, match="fractional timesteps") as info:
        ours.set_timesteps(20)
    assert info.value.field == "scheduler_config.timestep_spacing"
    ours.set_timesteps(10)  # 999 / 9 = 111: whole timesteps
    assert ours.timesteps.tolist() == [999 - 111 * i for i in range(10)]


@pytest.mark.parametrize("name", ["DDPMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_prior_refuses_every_scheduler_but_unclip(name):
    with pytest.raises(InvalidRequest, match="prev_timestep.*only UnCLIPScheduler") as info:
        ks.check_prior_scheduler(name)
    assert info.value.field == "prior_scheduler"
    with pytest.raises(InvalidRequest) as info:
        ks.prior_scheduler_from_config(PRIOR_CONFIG, name)
    assert info.value.field == "prior_scheduler"
    with pytest.raises(InvalidRequest):  # a prior checkpoint naming another class
        ks.prior_scheduler_from_config({**PRIOR_CONFIG, "_class_name": name})
    ks.check_prior_scheduler(None)
    ks.check_prior_scheduler("UnCLIPScheduler")
    # The reason: diffusers' prior loop passes prev_timestep, which only UnCLIP's step takes.
    assert "prev_timestep" in inspect.signature(diffusers.UnCLIPScheduler.step).parameters
    assert "prev_timestep" not in inspect.signature(getattr(diffusers, name).step).parameters


def test_a_scheduler_serves_one_loop():
    scheduler = ks.scheduler_from_config(DECODER_CONFIG, "DPMSolverMultistepScheduler")
    scheduler.set_timesteps(2)
    sample = np.zeros(LATENT, dtype=np.float32)
    for t in scheduler.timesteps:
        sample = scheduler.step(sample, t, sample)
    with pytest.raises(ValueError, match="serves one loop"):
        scheduler.step(sample, scheduler.timesteps[0], sample)
    scheduler.set_timesteps(2)  # starts over
    scheduler.step(sample, scheduler.timesteps[0], sample)
    assert scheduler.step_index == 1


def test_client_package_lists_the_schedulers_subpackage():
    """A wheel of the client must ship kandinsky_core.schedulers (setuptools lists packages)."""
    project = tomllib.loads((CLIENT_DIR / "pyproject.toml").read_text())
    packages = project["tool"]["setuptools"]["packages"]
    on_disk = {
        ".".join(path.parent.relative_to(CLIENT_DIR).parts)
        for path in (CLIENT_DIR / "kandinsky_client").rglob("__init__.py")
    }
    assert on_disk <= set(packages), (
        f"client/pyproject.toml [tool.setuptools] packages lacks {on_disk - set(packages)}"
    )
