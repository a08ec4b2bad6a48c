"""The client's numpy schedulers against diffusers' torch ones, step by step.

Every trajectory test runs diffusers with a seeded generator while recording what its `randn_tensor`
hands out, then runs the client with those draws replayed through `ReplayNoise`: the two runs must
agree at every step and consume exactly the same draws.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler as RefDDPM
from diffusers import UnCLIPScheduler as RefUnCLIP
from diffusers.schedulers import scheduling_ddpm, scheduling_unclip

try:
    from kandinsky_client import schedulers as ks
    from kandinsky_client.noise import ReplayNoise
except ImportError:  # the client package is not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "client"))
    from kandinsky_client import schedulers as ks
    from kandinsky_client.noise import ReplayNoise

CLIENT_DIR = Path(ks.__file__).resolve().parents[1]

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


@pytest.mark.parametrize("config", [{"_class_name": "DDIMScheduler"}, {}])
def test_unknown_class_name(config):
    with pytest.raises(ValueError, match="_class_name.*UnCLIPScheduler.*DDPMScheduler"):
        ks.scheduler_from_config(config)


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
    code = "import sys, kandinsky_client.schedulers; assert 'torch' not in sys.modules, 'torch imported'"
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
