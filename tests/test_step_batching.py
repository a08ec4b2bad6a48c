"""Step-level batching in the `kandinsky` model (`python_models/step_batching.py`).

First the batcher alone, against a stand-in network whose every output row is a function of that row's
inputs only, so each generation's result can be checked row for row: batches form, rows come back to
their owner, batches never exceed the model's limit and split fairly, a slow or departed generation
holds nobody, a member past its deadline is left out, and a failed batch fails only the generation whose
input broke it.

Then the real thing: a Triton server whose `kandinsky` model batches steps (`step_batching` on, CPU
flavour). Concurrent generations of different modes, sizes and schedulers give exactly the client loop's
pixels (ONNX Runtime gives every row the same bits whatever batch it runs in, on this CPU: checked
below on the served networks), a cancelled or timed-out generation stops without disturbing the
others in its batch, and a generation whose input makes the UNet fail fails alone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import pytest
from kandinsky_core.components import PRIOR, UNET, ModelSpec, model_inputs
from kandinsky_core.errors import Cancelled, InvalidRequest, RequestTimeout
from kandinsky_core.request import GenerationRequest
from kandinsky_repository.python_models.step_batching import (
    STEP_BATCHING,
    STEP_BATCHING_PARAMETER,
    StepBatcher,
    step_batcher,
)

from .conftest import TINY_DIMS

# -- the batcher against a stand-in network ---------------------------------------------------------------


@dataclass
class Network:
    """A per-step network: noise_pred = 2 * sample + timestep, row by row; records every call.

    `delay_s` keeps a call in flight (a GPU step); a NaN in a row fails the whole call, as the served
    networks refuse non-finite values.
    """

    delay_s: float = 0.0
    calls: list[dict] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __call__(self, spec: ModelSpec, inputs: Mapping[str, np.ndarray], deadline: float) -> dict:
        with self.lock:
            self.calls.append(
                {
                    "rows": len(inputs["sample"]),
                    "tags": inputs["sample"][:, 0, 0, 0].tolist(),
                    "deadline": deadline,
                }
            )
        if self.delay_s:
            time.sleep(self.delay_s)
        if not np.isfinite(inputs["sample"]).all():
            raise InvalidRequest("sample", "contains NaN or Inf")
        timestep = inputs["timestep"].reshape(-1, 1, 1, 1).astype(np.float32)
        return {"noise_pred": 2 * inputs["sample"] + timestep}


def unet_inputs(tag: float, step: int, images: int = 1, side: int = 8) -> dict[str, np.ndarray]:
    """One guided step of one generation: 2 rows per image, every value of the sample equal to `tag`."""
    rows = 2 * images
    spec_inputs = {
        "sample": np.full((rows, 4, side, side), tag, np.float32),
        "timestep": np.full((rows,), 1000 - step, np.int64),
        "image_embeds": np.zeros((rows, 32), np.float32),
    }
    return model_inputs(UNET, spec_inputs)


@dataclass
class Generation:
    """A generation's thread: `steps` UNet steps through the batcher, `between_s` of work between two."""

    batcher: StepBatcher
    tag: float
    steps: int
    images: int = 1
    between_s: float = 0.0
    deadline_s: float = 60.0
    start_delay_s: float = 0.0
    outputs: list[np.ndarray] = field(default_factory=list)
    error: BaseException | None = None
    step_done: list[float] = field(default_factory=list)

    def run(self) -> None:
        time.sleep(self.start_delay_s)
        member = self.batcher.member(f"generation {self.tag}")
        deadline = time.monotonic() + self.deadline_s
        try:
            for step in range(self.steps):
                out = self.batcher.infer(member, UNET, unet_inputs(self.tag, step, self.images), deadline)
                self.outputs.append(out["noise_pred"])
                self.step_done.append(time.monotonic())
                time.sleep(self.between_s)
        except BaseException as error:  # noqa: BLE001 - the test reads it
            self.error = error
        finally:
            self.batcher.leave(member)

    def expected(self, step: int) -> np.ndarray:
        inputs = unet_inputs(self.tag, step, self.images)
        return 2 * inputs["sample"] + np.float32(1000 - step)


def run_all(generations: list[Generation], timeout: float = 60.0) -> None:
    threads = [threading.Thread(target=g.run) for g in generations]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
        assert not thread.is_alive(), "a generation hangs"


def check_results(generations: list[Generation]) -> None:
    for g in generations:
        assert g.error is None, f"generation {g.tag}: {g.error!r}"
        assert len(g.outputs) == g.steps
        for step, out in enumerate(g.outputs):
            assert np.array_equal(out, g.expected(step)), f"generation {g.tag} got another's rows at {step}"


def test_the_steps_of_concurrent_generations_share_one_call_and_each_gets_its_own_rows() -> None:
    network = Network(delay_s=0.01)
    batcher = StepBatcher(network, straggler_wait_s=0.05)
    generations = [Generation(batcher, tag=float(k + 1), steps=10) for k in range(4)]
    run_all(generations)
    check_results(generations)
    rows = [call["rows"] for call in network.calls]
    assert max(rows) == 8 == UNET.max_batch_size
    # The first step may go before every generation has arrived; from then on they step together.
    assert len(rows) <= 10 + 3, rows
    assert sum(rows) == 4 * 10 * 2


def test_rows_never_exceed_the_batch_limit_and_a_full_loop_is_split_fairly() -> None:
    """16 generations of 2 rows and one of 8 (4 images): 40 rows per round for a limit of 8. Every call
    holds at most 8 rows; the oldest submission always goes next, so nobody is passed over: between two
    steps of a generation the loop sends at most one round of calls."""
    network = Network(delay_s=0.005)
    batcher = StepBatcher(network, straggler_wait_s=0.05)
    generations = [Generation(batcher, tag=float(k + 1), steps=6) for k in range(16)]
    generations.append(Generation(batcher, tag=100.0, steps=6, images=4))
    run_all(generations)
    check_results(generations)
    assert all(call["rows"] <= UNET.max_batch_size for call in network.calls)
    rounds = 40 // UNET.max_batch_size
    tag_calls: dict[float, list[int]] = {}
    for index, call in enumerate(network.calls):
        for tag in set(call["tags"]):
            tag_calls.setdefault(tag, []).append(index)
    for tag, indices in tag_calls.items():
        gaps = np.diff(indices)
        assert gaps.max() <= 2 * rounds, f"generation {tag} waited {gaps.max()} calls for its turn"


def test_a_generation_that_joins_waits_for_the_running_step_and_then_shares_it() -> None:
    """The late one does not ping-pong with the running one: after its first step they share calls."""
    network = Network(delay_s=0.03)
    batcher = StepBatcher(network, straggler_wait_s=0.05)
    first = Generation(batcher, tag=1.0, steps=12)
    late = Generation(batcher, tag=2.0, steps=6, start_delay_s=0.1)
    run_all([first, late])
    check_results([first, late])
    shared = [call for call in network.calls if set(call["tags"]) == {1.0, 2.0}]
    assert len(shared) >= 5, [call["tags"] for call in network.calls]
    assert all(call["rows"] in (2, 4) for call in network.calls)


def test_a_slow_generation_does_not_hold_the_others_beyond_the_straggler_wait() -> None:
    network = Network()
    batcher = StepBatcher(network, straggler_wait_s=0.02)
    slow = Generation(batcher, tag=1.0, steps=3, between_s=0.5)
    fast = Generation(batcher, tag=2.0, steps=20)
    started = time.monotonic()
    run_all([slow, fast])
    check_results([slow, fast])
    assert fast.step_done[-1] - started < 1.0, "the fast generation waited for the slow one's steps"


def test_a_generation_that_leaves_its_loop_releases_the_others_at_once() -> None:
    """A member between two steps is waited for (here up to 10 s); once it calls another model or ends
    (`leave`), the waiting step goes."""
    network = Network()
    batcher = StepBatcher(network, straggler_wait_s=10.0)
    a, b = batcher.member("a"), batcher.member("b")
    deadline = time.monotonic() + 60
    batcher.infer(a, UNET, unet_inputs(1.0, 0), deadline)  # a is in the loop, between two steps
    done = threading.Event()

    def step_of_b() -> None:
        batcher.infer(b, UNET, unet_inputs(2.0, 0), deadline)
        done.set()

    thread = threading.Thread(target=step_of_b)
    thread.start()
    assert not done.wait(0.3), "b's step went without waiting for a"
    left = time.monotonic()
    batcher.leave(a)  # e.g. a preview decode, or its loop is over
    assert done.wait(5)
    assert time.monotonic() - left < 1.0
    thread.join()
    batcher.leave(b)


def test_loops_are_per_model_and_shape_group() -> None:
    """Different sizes, or the prior and the UNet, never share a call."""
    calls: list[tuple[str, tuple]] = []

    def network(spec: ModelSpec, inputs: Mapping[str, np.ndarray], deadline: float) -> dict:
        calls.append((spec.name, inputs[spec.inputs[0].name].shape))
        time.sleep(0.01)
        if spec is PRIOR:
            return {"predicted_image_embedding": inputs["hidden_states"] * 2}
        return {"noise_pred": inputs["sample"] * 2}

    batcher = StepBatcher(network, straggler_wait_s=0.05)
    prior_inputs = model_inputs(
        PRIOR,
        {
            "hidden_states": np.ones((2, 32), np.float32),
            "timestep": np.full(2, 3),
            "proj_embedding": np.ones((2, 32), np.float32),
            "encoder_hidden_states": np.ones((2, 77, 32), np.float32),
            "attention_mask": np.ones((2, 77), bool),
        },
    )
    jobs: list[Callable[[], None]] = []
    for k, (spec, inputs) in enumerate(
        [(UNET, unet_inputs(1.0, 0, side=8)), (UNET, unet_inputs(1.0, 0, side=16)), (PRIOR, prior_inputs)] * 2
    ):

        def job(spec: ModelSpec = spec, inputs: dict = inputs, k: int = k) -> None:
            member = batcher.member(str(k))
            for _ in range(3):
                batcher.infer(member, spec, inputs, time.monotonic() + 60)
            batcher.leave(member)

        jobs.append(job)
    threads = [threading.Thread(target=job) for job in jobs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert {shape[1:] for name, shape in calls if name == "unet"} == {(4, 8, 8), (4, 16, 16)}
    assert {shape[1:] for name, shape in calls if name == "prior"} == {(32,)}
    assert sum(shape[0] for _, shape in calls) == 6 * 3 * 2  # every row once, none mixed across groups


def test_a_member_past_its_deadline_is_left_out_and_the_batch_takes_the_longest_timeout() -> None:
    network = Network(delay_s=0.05)
    batcher = StepBatcher(network, straggler_wait_s=0.05)
    short = Generation(batcher, tag=1.0, steps=20, deadline_s=0.4)
    long = Generation(batcher, tag=2.0, steps=20, deadline_s=60)
    run_all([short, long])
    assert isinstance(short.error, RequestTimeout)
    assert "time limit passed" in str(short.error)
    assert 3 <= len(short.outputs) < 20
    check_results([long])
    both = [call for call in network.calls if set(call["tags"]) == {1.0, 2.0}]
    assert both, "they never shared a call"
    # A shared call's timeout is the longer deadline, so the short one cannot cut its neighbour's step.
    assert all(call["deadline"] > time.monotonic() + 30 for call in both)
    last_shared = max(i for i, call in enumerate(network.calls) if set(call["tags"]) == {1.0, 2.0})
    assert all(call["tags"] == [2.0, 2.0] for call in network.calls[last_shared + 1 :])


def test_a_failed_batch_fails_only_the_generation_whose_input_broke_it() -> None:
    """One generation's non-finite sample fails the shared call (as a served network refuses it): each
    member is re-run alone, so the broken one gets its own error and the others their exact rows."""
    network = Network(delay_s=0.02)
    batcher = StepBatcher(network, straggler_wait_s=0.05)
    fine = [Generation(batcher, tag=float(k + 1), steps=5) for k in range(3)]
    broken = Generation(batcher, tag=float("nan"), steps=5, start_delay_s=0.01)  # joins a running loop
    run_all([broken, *fine])
    assert isinstance(broken.error, InvalidRequest) and broken.error.field == "sample"
    assert broken.outputs == []
    check_results(fine)
    failed = [call for call in network.calls if any(np.isnan(call["tags"]))]
    assert any(len(set(np.nan_to_num(call["tags"]))) > 1 for call in failed), "the NaN was never batched"
    assert [call for call in failed if call["rows"] == 2], "the broken generation was not re-run alone"


def test_a_cancelled_generation_leaves_and_the_others_in_its_batch_go_on() -> None:
    """Cancellation is checked after every step (the model's step callback raises): the cancelled
    generation's thread ends and leaves its loop; the others' steps are not held or disturbed."""
    network = Network(delay_s=0.01)
    batcher = StepBatcher(network, straggler_wait_s=10.0)  # a member that never came back would hang them

    class Cancelling(Generation):
        def run(self) -> None:
            member = self.batcher.member("cancelled")
            try:
                for step in range(self.steps):
                    out = self.batcher.infer(member, UNET, unet_inputs(self.tag, step), time.monotonic() + 60)
                    self.outputs.append(out["noise_pred"])
                    if step == 2:
                        raise Cancelled("the client cancelled the generation")
            except Cancelled as error:
                self.error = error
            finally:
                self.batcher.leave(member)

    cancelled = Cancelling(batcher, tag=9.0, steps=10)
    others = [Generation(batcher, tag=float(k + 1), steps=10) for k in range(2)]
    started = time.monotonic()
    run_all([cancelled, *others])
    assert isinstance(cancelled.error, Cancelled) and len(cancelled.outputs) == 3
    check_results(others)
    assert time.monotonic() - started < 5.0
    assert sum(9.0 in call["tags"] for call in network.calls) == 3


def test_the_parameter_chooses_the_dispatch() -> None:
    assert step_batcher({}, Network()) is None
    assert step_batcher({STEP_BATCHING_PARAMETER: "off"}, Network()) is None
    assert isinstance(step_batcher({STEP_BATCHING_PARAMETER: STEP_BATCHING}, Network()), StepBatcher)
    with pytest.raises(ValueError, match="step_batching"):
        step_batcher({STEP_BATCHING_PARAMETER: "sometimes"}, Network())


# -- the served networks: rows do not depend on the batch ---------------------------------------------------


@pytest.mark.parametrize("name", ["unet", "prior", "unet_inpaint", "unet_controlnet"])
def test_onnx_runtime_gives_each_row_the_same_bits_in_any_batch(tiny_bundle, name: str) -> None:
    """What makes step batching bit-identical on the CPU flavour: a row's output does not depend on the
    rows it runs with (batch size, position), so a merged call equals the calls alone."""
    import json

    import onnxruntime as ort
    from kandinsky_core.components import COMPONENTS, ModelDims

    bundle = tiny_bundle[0]
    spec = COMPONENTS[name]
    dims = ModelDims.from_dict(json.loads((bundle / "manifest.json").read_text())["dims"])
    symbols = {**dims.as_symbols(), "batch": spec.max_batch_size, "height": 128, "width": 128}
    symbols.update(latent_height=128 // dims.movq_scale_factor, latent_width=128 // dims.movq_scale_factor)
    rng = np.random.default_rng(0)
    full = {}
    for tensor in spec.inputs:
        shape = tensor.resolve(symbols, keep_dynamic=False)
        if tensor.name == "timestep":
            full[tensor.name] = rng.integers(0, 1000, shape)
        elif tensor.dtype == "bool":
            full[tensor.name] = rng.random(shape) > 0.3
        else:
            full[tensor.name] = rng.standard_normal(shape).astype(np.float32)
    session = ort.InferenceSession(str(bundle / name / "model.onnx"), providers=["CPUExecutionProvider"])
    whole = session.run(None, full)[0]
    for start, size in [(0, 1), (0, 2), (2, 2), (4, 4), (6, 2), (1, 5)]:
        if start + size <= len(whole):
            part = session.run(None, {k: v[start : start + size] for k, v in full.items()})[0]
            assert np.array_equal(part, whole[start : start + size]), f"rows {start}:{start + size}"


# -- a server whose `kandinsky` model batches steps ----------------------------------------------------------

STEP = {"height": 64, "width": 64, "prior_num_inference_steps": 4, "num_inference_steps": 6}


@pytest.fixture(scope="module")
def step_server(tiny_bundle, tmp_path_factory: pytest.TempPathFactory):
    """The tiny CPU repository with step batching on, served by its own Triton."""
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository

    from .conftest import local_triton_server

    folder = tmp_path_factory.mktemp("step-batching")
    repository = folder / "model_repository"
    generate_repository(tiny_bundle[0], repository, RepositoryOptions(step_batching=STEP_BATCHING))
    with local_triton_server(repository, folder / "triton.log") as server:
        yield server


def _pixels(generation) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


def _step_requests(
    client, models: tuple[str, ...] = ("unet", "unet_inpaint", "unet_controlnet", "prior")
) -> int:
    """Requests the per-step models have answered so far (one per step per generation without batching)."""
    total = 0
    for model in models:
        stats = client.transport.inference_statistics(model)["model_stats"]
        total += sum(int(s["inference_stats"]["success"].get("count", 0)) for s in stats)
    return total


def _in_threads(jobs: dict[str, Callable[[], object]], timeout: float = 300) -> dict[str, object]:
    """Run the jobs at once; name -> result or the exception it raised."""
    results: dict[str, object] = {}

    def run(name: str, job: Callable[[], object]) -> None:
        try:
            results[name] = job()
        except BaseException as error:  # noqa: BLE001 - the test reads it
            results[name] = error

    threads = [threading.Thread(target=run, args=item) for item in jobs.items()]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout)
    assert len(results) == len(jobs), "a generation hangs"
    return results


def _mixed_requests() -> dict[str, GenerationRequest]:
    from .reference import mask, picture

    image = picture(40, 48, seed=11)
    hint = picture(64, 64, seed=12).convert("L")
    build = GenerationRequest.build
    return {
        "t2i": build("text_to_image", prompt=["a cat", "a dog"], negative_prompt="blurry", seed=1, **STEP),
        "t2i-4-images": build("text_to_image", prompt="a fox", num_images_per_prompt=4, seed=2, **STEP),
        "t2i-128px-dpm++": build(
            "text_to_image",
            prompt="a cat",
            seed=3,
            scheduler="DPMSolverMultistepScheduler",
            **{**STEP, "height": 128, "width": 128},
        ),
        "t2i-unipc": build(
            "text_to_image", prompt="an owl", seed=4, scheduler="UniPCMultistepScheduler", **STEP
        ),
        "variations": build(
            "variations",
            image=image,
            num_images_per_prompt=2,
            seed=5,
            height=64,
            width=64,
            num_inference_steps=6,
        ),
        "img2img-euler-a": build(
            "image_to_image",
            image=image,
            prompt="ink",
            strength=0.7,
            seed=6,
            scheduler="EulerAncestralDiscreteScheduler",
            **STEP,
        ),
        "inpaint": build(
            "inpaint", image=image, mask_image=mask(40, 48, (8, 8, 30, 40)), prompt="a hat", seed=7, **STEP
        ),
        "controlnet": build("controlnet", prompt="a robot", hint=hint, seed=8, **STEP),
    }


def test_concurrent_mixed_generations_are_bit_identical_to_the_client_loop(step_server, grpc_client) -> None:
    """Eight generations at once (modes, sizes, schedulers, 1-4 images): each gets exactly the client
    loop's pixels and embeddings, and the per-step models answered fewer requests than there were steps
    (steps of different generations travelled together)."""
    from kandinsky_client.pipeline import KandinskyClient

    requests = _mixed_requests()
    before = _step_requests(grpc_client)
    expected = {name: grpc_client.generate(request) for name, request in requests.items()}
    steps = _step_requests(grpc_client) - before  # the client loop: one request per step

    clients = {name: KandinskyClient(step_server.grpc_url, loop="server") for name in requests}
    stats = KandinskyClient(step_server.grpc_url)
    try:
        before = _step_requests(stats)
        served = _in_threads({name: lambda n=name: clients[n].generate(requests[n]) for name in requests})
        sent = _step_requests(stats) - before
    finally:
        for client in (*clients.values(), stats):
            client.close()
    for name, result in served.items():
        assert not isinstance(result, BaseException), f"{name}: {result!r}"
        assert np.array_equal(_pixels(result), _pixels(expected[name])), name
        assert np.array_equal(result.image_embeds, expected[name].image_embeds), name
        assert np.array_equal(result.negative_image_embeds, expected[name].negative_image_embeds), name
    assert _pixels(expected["t2i"]).std() > 5, "a vacuous comparison must not pass"
    assert sent < steps, f"{sent} step requests for {steps} steps: no step was batched"


def _unet_rows(client) -> int:
    """UNet rows computed so far (Triton's inference_count: batch items, not requests)."""
    return int(client.transport.inference_statistics("unet")["model_stats"][0].get("inference_count", 0))


def _settled_unet_rows(client) -> int:
    """The UNet row count once it has stopped moving for 0.5 s."""
    rows = _unet_rows(client)
    for _ in range(40):
        time.sleep(0.5)
        rows, previous = _unet_rows(client), rows
        if rows == previous:
            break
    return rows


NEIGHBOUR = {"height": 256, "width": 256, "prior_num_inference_steps": 2, "num_inference_steps": 16}


def _neighbours(grpc_client) -> tuple[dict[str, GenerationRequest], dict[str, np.ndarray]]:
    """Two generations that share the UNet loop with the one under test, and their client-loop pixels."""
    requests = {
        f"neighbour-{k}": GenerationRequest.build("text_to_image", prompt=prompt, seed=20 + k, **NEIGHBOUR)
        for k, prompt in enumerate(("a red cube", "a blue sphere"))
    }
    return requests, {name: _pixels(grpc_client.generate(request)) for name, request in requests.items()}


def test_cancelling_one_generation_stops_it_and_not_the_others_in_its_batch(step_server, grpc_client) -> None:
    """Cancelled at its second decoder step (the client stops reading and cancels the stream): it stops
    within a step of the cancel, its neighbours in the same UNet batches finish with their exact pixels."""
    from kandinsky_client.pipeline import KandinskyClient

    requests, expected = _neighbours(grpc_client)
    doomed = GenerationRequest.build(
        "text_to_image", prompt="a cat", seed=1, **{**NEIGHBOUR, "num_inference_steps": 200}
    )
    stats = KandinskyClient(step_server.grpc_url)
    clients = {name: KandinskyClient(step_server.grpc_url, loop="server") for name in [*requests, "doomed"]}
    reached, cancel = threading.Event(), threading.Event()

    def on_step(stage: str, step: int, timestep: int, latents) -> None:
        if stage == "decoder" and step >= 1:
            reached.set()
            cancel.wait(120)
            raise KeyboardInterrupt("cancelled by the test")

    try:
        before = _settled_unet_rows(stats)
        jobs = {name: lambda n=name: clients[n].generate(requests[n]) for name in requests}
        jobs["doomed"] = lambda: clients["doomed"].generate(doomed, callback_on_step_end=on_step)
        canceller = threading.Thread(target=lambda: (reached.wait(120), cancel.set()))
        canceller.start()
        # `reached` is set while the neighbours run: the cancel comes in the middle of shared batches.
        results = _in_threads(jobs)
        canceller.join()
        at_end = _settled_unet_rows(stats)
    finally:
        for client in (*clients.values(), stats):
            client.close()
    assert isinstance(results["doomed"], KeyboardInterrupt)
    for name in requests:
        assert np.array_equal(_pixels(results[name]), expected[name]), name
    neighbour_rows = 2 * 2 * NEIGHBOUR["num_inference_steps"]
    doomed_rows = at_end - before - neighbour_rows
    assert 0 < doomed_rows < 2 * 200 // 4, f"the cancelled generation ran {doomed_rows // 2} UNet steps"


def test_a_deadline_in_a_batch_stops_only_its_generation(step_server, grpc_client) -> None:
    from kandinsky_client.pipeline import KandinskyClient

    requests, expected = _neighbours(grpc_client)
    late = GenerationRequest.build(
        "text_to_image", prompt="a cat", seed=1, **{**NEIGHBOUR, "num_inference_steps": 200}
    )
    clients = {name: KandinskyClient(step_server.grpc_url, loop="server") for name in requests}
    short = KandinskyClient(step_server.grpc_url, loop="server", timeout_s=1.5)
    try:
        jobs = {name: lambda n=name: clients[n].generate(requests[n]) for name in requests}
        jobs["late"] = lambda: short.generate(late)
        started = time.monotonic()
        results = _in_threads(jobs)
    finally:
        for client in (*clients.values(), short):
            client.close()
    assert isinstance(results["late"], RequestTimeout), results["late"]
    assert time.monotonic() - started < 120
    for name in requests:
        assert np.array_equal(_pixels(results[name]), expected[name]), name


def test_a_generation_whose_input_breaks_the_unet_fails_alone_with_its_own_message(
    step_server, grpc_client, server_loop_clients
) -> None:
    """Start latents of 3e38 are finite (the request is valid) but overflow in the UNet, which refuses
    the non-finite output. Batched with two others, the shared call fails; re-run alone, only that
    generation fails, with the message per-request dispatch gives it, and the others' pixels are exact."""
    from kandinsky_client.pipeline import KandinskyClient
    from kandinsky_core.errors import KandinskyClientError

    requests, expected = _neighbours(grpc_client)
    latent_side = 256 // 8
    broken = GenerationRequest.build(
        "text_to_image",
        prompt="a cat",
        seed=1,
        latents=np.full((1, 4, latent_side, latent_side), 3e38),
        **NEIGHBOUR,
    )
    with pytest.raises(KandinskyClientError) as alone:
        server_loop_clients["grpc"].generate(broken)  # per-request dispatch
    assert "not finite" in str(alone.value)
    clients = {name: KandinskyClient(step_server.grpc_url, loop="server") for name in [*requests, "broken"]}
    started = threading.Event()

    def broken_after_the_others_start() -> object:
        started.wait(60)  # the neighbours are in their UNet loop: the broken one joins their batches
        return clients["broken"].generate(broken)

    def on_step(stage: str, step: int, timestep: int, latents) -> None:
        if stage == "decoder":
            started.set()

    def neighbour(name: str) -> object:
        return clients[name].generate(requests[name], callback_on_step_end=on_step)

    try:
        jobs = {name: lambda n=name: neighbour(n) for name in requests}
        jobs["broken"] = broken_after_the_others_start
        results = _in_threads(jobs)
    finally:
        for client in clients.values():
            client.close()
    assert isinstance(results["broken"], KandinskyClientError), results["broken"]
    assert str(results["broken"]) == str(alone.value)
    for name in requests:
        assert np.array_equal(_pixels(results[name]), expected[name]), name


def test_a_row_limit_below_the_batch_limit_bounds_every_call() -> None:
    """The memory budget's per-call limit (CPU flavour) caps a loop's calls like the batch limit does."""
    network = Network(delay_s=0.005)
    batcher = StepBatcher(network, straggler_wait_s=0.05, row_limit=lambda spec, inputs: 4)
    generations = [Generation(batcher, tag=float(k + 1), steps=5) for k in range(5)]
    run_all(generations)
    check_results(generations)
    assert max(call["rows"] for call in network.calls) == 4


def test_the_memory_budget_gives_each_loop_its_row_limit() -> None:
    from kandinsky_core.memory import MemoryFit, ModelMemory
    from kandinsky_repository.python_models.step_batching import memory_row_limit

    dims = {"kandinsky_dims": asdict(TINY_DIMS)}
    per_row_pixel = 1000.0
    fit = MemoryFit(per_row=0.0, per_row_pixel=per_row_pixel, per_row_pixel2=0.0, spatial=True)
    limit = int(3.5 * per_row_pixel * 64 * 64)  # 3 rows of 64 px fit, 4 do not
    memory = ModelMemory(fit, limit, limit, 10 * limit).as_parameters()
    row_limit = memory_row_limit({"unet": {**dims, **memory}, "prior": {"scheduler_config": {}}})
    assert row_limit is not None
    assert row_limit(UNET, unet_inputs(1.0, 0, side=8)) == 3  # 8 latent = 64 px
    assert row_limit(UNET, unet_inputs(1.0, 0, side=4)) == UNET.max_batch_size  # 32 px: 14 rows would fit
    assert row_limit(PRIOR, {}) == PRIOR.max_batch_size  # no budget of its own
    assert memory_row_limit({"unet": dims, "prior": {}}) is None


def test_the_generator_writes_the_setting_from_its_option_and_flag(tiny_bundle, tmp_path: Path) -> None:
    from kandinsky_core.wire import MODEL_NAME
    from kandinsky_repository.generator.cli import main
    from kandinsky_repository.generator.configs import read_config
    from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository
    from kandinsky_repository.python_models.step_batching import DEFAULT_STEP_BATCHING

    def written(repository: Path) -> str:
        return read_config(repository / MODEL_NAME).parameters[STEP_BATCHING_PARAMETER].string_value

    generate_repository(tiny_bundle[0], tmp_path / "default")
    assert written(tmp_path / "default") == DEFAULT_STEP_BATCHING
    assert (
        main(["--bundle", str(tiny_bundle[0]), "--output", str(tmp_path / "on"), "--step-batching", "on"])
        == 0
    )
    assert written(tmp_path / "on") == STEP_BATCHING
    with pytest.raises(ValueError, match="step batching"):
        generate_repository(tiny_bundle[0], tmp_path / "bad", RepositoryOptions(step_batching="sometimes"))


def test_a_step_cancelled_before_its_batch_goes_is_withdrawn_at_once() -> None:
    """The cancellation check runs once the step is submitted, while the batch waits: a cancelled step
    that no batch holds yet is taken back and the generation stops at once, without a call."""
    network = Network()
    batcher = StepBatcher(network, straggler_wait_s=10.0)  # b's step waits for a, between two steps
    a, b = batcher.member("a"), batcher.member("b")
    deadline = time.monotonic() + 60
    batcher.infer(a, UNET, unet_inputs(1.0, 0), deadline)  # a alone: goes at once; a is between steps
    b_first = threading.Thread(target=batcher.infer, args=(b, UNET, unet_inputs(2.0, 0), deadline))
    b_first.start()  # waits for a, between two steps
    time.sleep(0.2)
    batcher.infer(a, UNET, unet_inputs(1.0, 1), deadline)  # a's next step: both go in one call
    b_first.join(5)
    assert network.calls[-1]["tags"] == [2.0, 2.0, 1.0, 1.0]

    def cancelled() -> None:
        raise Cancelled("the client cancelled the generation")

    started = time.monotonic()
    with pytest.raises(Cancelled):
        batcher.infer(b, UNET, unet_inputs(2.0, 1), deadline, check=cancelled)
    assert time.monotonic() - started < 1.0
    batcher.leave(b)
    calls = len(network.calls)
    out = batcher.infer(a, UNET, unet_inputs(1.0, 2), deadline)  # alone in the loop now: goes at once
    assert np.array_equal(out["noise_pred"], Generation(batcher, 1.0, 3).expected(2))
    assert len(network.calls) == calls + 1 and network.calls[-1]["tags"] == [1.0, 1.0]
    batcher.leave(a)


def test_the_benchmark_compares_both_dispatches_against_the_targets() -> None:
    """`kandinsky-bench timed --dispatch per-request step-batching`: one window per dispatch per cell,
    the client loop once, and the step-batching targets judged per (schedule, size)."""
    from kandinsky_bench import timed

    plan = timed.TimedPlan(
        gpu="h100",
        schedules=(timed.parse_schedule("ddpm-2+2"),),
        sizes=(768,),
        concurrency=(1, 8),
        loops=("client", "server"),
        repeats=2,
        protocol="grpc",
        preset="tiny",
        gpu_costs="",
        architecture="released",
        dispatches=("per-request", "step-batching"),
    )
    assert plan.variants() == [("client", None), ("server", "per-request"), ("server", "step-batching")]
    assert plan.cells() == 6

    def row(dispatch: str, concurrency: int, images_per_s: float, p50: float, rows: float) -> dict:
        return {
            "schedule": "ddpm-2+2",
            "size": 768,
            "loop": "server",
            "dispatch": dispatch,
            "concurrency": concurrency,
            "images_per_s": images_per_s,
            "latency": {"p50": p50},
            "unet_rows_of_ideal": rows,
            "prior_rows_of_ideal": rows,
        }

    rows = [
        row("per-request", 1, 1.0, 1.00, 1.0),
        row("step-batching", 1, 1.0, 1.02, 1.0),
        row("per-request", 8, 1.0, 8.0, 0.5),
        row("step-batching", 8, 1.3, 6.0, 0.96),
    ]
    (comparison,) = timed.dispatch_comparison(rows)
    assert comparison["speedup_at_target"] == pytest.approx(1.3) and comparison["speedup_met"]
    assert comparison["rows_met"] and comparison["p50_met"]
    rows[3]["prior_rows_of_ideal"] = 0.9
    rows[1]["latency"]["p50"] = 1.05
    (comparison,) = timed.dispatch_comparison(rows)
    assert not comparison["rows_met"] and not comparison["p50_met"]
    other = next(d for d in timed.DISPATCHES if d != timed.DEFAULT_DISPATCH)
    assert timed.loop_label({"loop": "server", "dispatch": timed.DEFAULT_DISPATCH}) == "server"
    assert timed.loop_label({"loop": "server", "dispatch": other}) == f"server, {other}"
    assert "**not met**" in timed.dispatch_lines({"dispatch_comparison": [comparison]})[0]
