"""Server-side generation (the `kandinsky` model) against a real Triton server.

- Parity: for every mode, the server loop gives the client loop's pixels and embeddings for the same
  seed, over gRPC (streamed with progress, and without), HTTP generate_stream and plain-JSON HTTP
  generate. Both loops run the same `Generator` on the same ONNX models with the same seeded noise, so
  they agree exactly here; the bound is the issue's (1 uint8 level) in case a batch composition ever
  differs. The client loop's own diffusers parity is in test_modes / test_text_to_image_parity.
- Bad input: INVALID_ARGUMENT / HTTP 400 with the client's own messages; the server keeps serving.
- Progress, cancellation (at most one step after the cancel), time limits, the bounded queue, and
  batching across concurrent generations.
"""

from __future__ import annotations

import base64
import io
import json
import queue
import threading
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
from kandinsky_client.pipeline import KandinskyClient
from kandinsky_client.retry import NO_RETRY, RetryPolicy
from kandinsky_core.errors import InvalidRequest, RequestTimeout, ServerBusy
from kandinsky_core.request import GenerationRequest
from kandinsky_core.validation import check_request
from kandinsky_core.wire import MODEL_NAME, ResponseOptions, request_inputs
from kandinsky_repository.generator.repository import RepositoryOptions, generate_repository
from kandinsky_repository.serving.triton import TritonServer
from PIL import Image

from .conftest import free_port
from .reference import mask, picture

SMALL = {"height": 64, "width": 64, "num_inference_steps": 3}
PROMPTED = {**SMALL, "prior_num_inference_steps": 3}
IMAGE = picture(40, 48, seed=11)
HINT = picture(64, 64, seed=12).convert("L")  # a depth map at the output size (SMALL's)
MODE_CASES = [
    pytest.param(
        "text_to_image", {"prompt": ["a cat", "a dog"], "negative_prompt": "blurry", **PROMPTED}, id="t2i"
    ),
    pytest.param("variations", {"image": IMAGE, "num_images_per_prompt": 2, **SMALL}, id="variations"),
    pytest.param(
        "fuse",
        {
            "images_and_prompts": ["a fox", IMAGE],
            "weights": [0.6, 0.4],
            "negative_prior_prompt": "dark",
            **PROMPTED,
        },
        id="fuse",
    ),
    pytest.param(
        "image_to_image",
        {"image": IMAGE, "prompt": "a watercolor", "strength": 0.7, **PROMPTED},
        id="img2img",
    ),
    pytest.param("emb2emb", {"image": IMAGE, "prompt": "an owl", "strength": 0.7, **PROMPTED}, id="emb2emb"),
    pytest.param(
        "inpaint",
        {"image": IMAGE, "mask_image": mask(40, 48, (8, 8, 30, 40)), "prompt": "a hat", **PROMPTED},
        id="inpaint",
    ),
    pytest.param(
        "outpaint", {"image": IMAGE, "prompt": "a beach", "left": 16, "top": 24, **PROMPTED}, id="outpaint"
    ),
    pytest.param(
        "text_to_image",
        {
            "prompt": "a cat",
            "scheduler": "DPMSolverMultistepScheduler",
            "scheduler_config": {"use_karras_sigmas": True},
            **PROMPTED,
        },
        id="t2i-dpm++karras",
    ),
    pytest.param(
        "image_to_image",
        {
            "image": IMAGE,
            "prompt": "ink",
            "strength": 0.6,
            "scheduler": "EulerAncestralDiscreteScheduler",
            "height": 64,
            "width": 64,
            "prior_num_inference_steps": 3,
            "num_inference_steps": 3,
        },
        id="img2img-euler-ancestral",
    ),
    pytest.param("controlnet", {"prompt": "a robot", "hint": HINT, **PROMPTED}, id="controlnet"),
    pytest.param(
        "controlnet_image_to_image",
        {"image": IMAGE, "hint": HINT, "prompt": "a robot", "strength": 0.7, **PROMPTED},
        id="controlnet-img2img",
    ),
]


def _pixels(generation) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in generation.images])


def post_json(base_url: str, path: str, body: bytes | dict) -> tuple[int, dict]:
    """POST to Triton's HTTP endpoint; (status, decoded JSON body)."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(
        f"http://{base_url}{path}", data=data, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def generate_json(base_url: str, body: dict) -> tuple[int, dict]:
    return post_json(base_url, f"/v2/models/{MODEL_NAME}/generate", body)


@pytest.fixture(scope="module")
def server_clients(server_loop_clients):
    return server_loop_clients


@pytest.mark.parametrize(("mode", "options"), MODE_CASES)
def test_server_loop_equals_client_loop_for_every_mode(
    grpc_client, server_clients, triton_server, mode, options
):
    request = GenerationRequest.build(mode, seed=1234, **options)
    expected = grpc_client.generate(request)
    total = grpc_client.total_steps(request)

    steps: list[tuple[str, int, int]] = []
    streamed = server_clients["grpc"].generate(
        request, callback_on_step_end=lambda stage, step, t, latents: steps.append((stage, step, t))
    )
    plain_grpc = server_clients["grpc"].generate(request)
    over_http = server_clients["http"].generate(request)
    for name, got in (("grpc-stream", streamed), ("grpc", plain_grpc), ("http-stream", over_http)):
        assert got.seed == 1234
        diff = np.abs(_pixels(got) - _pixels(expected))
        assert diff.max() <= 1, f"{name}: max pixel difference {diff.max()}"
        np.testing.assert_allclose(got.image_embeds, expected.image_embeds, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(
            got.negative_image_embeds, expected.negative_image_embeds, rtol=1e-5, atol=1e-6
        )
        assert {"decoder", "decoder_scheduler", "decode_image", "total", "request"} <= set(got.timings)
    assert _pixels(expected).std() > 5, "a vacuous comparison must not pass"

    # One progress response per step, in order, with the client loop's timesteps.
    local: list[tuple[str, int, int]] = []
    grpc_client.generate(
        request, callback_on_step_end=lambda stage, step, t, latents: local.append((stage, step, t))
    )
    assert len(steps) == total and steps == local

    # Plain JSON over Triton's generate extension, as curl would send it.
    body = json.loads(json.dumps(_json_body(request)))
    status, answer = generate_json(triton_server.http_url, body)
    assert status == 200, answer
    images = answer["image"] if isinstance(answer["image"], list) else [answer["image"]]
    decoded = np.stack(
        [np.asarray(Image.open(io.BytesIO(base64.b64decode(i))).convert("RGB"), np.int16) for i in images]
    )
    assert np.abs(decoded - _pixels(expected)).max() <= 1
    assert answer["seed"] in (1234, [1234])


def _json_body(request: GenerationRequest) -> dict:
    from kandinsky_core.wire import request_json

    return request_json(request, ResponseOptions())


def test_server_loop_without_a_seed_reports_the_seed_it_used(server_clients, grpc_client):
    first = server_clients["grpc"].text_to_image("a cat", **PROMPTED)
    again = grpc_client.text_to_image("a cat", seed=first.seed, **PROMPTED)
    assert np.array_equal(_pixels(first), _pixels(again))


def test_progress_and_previews_stream_over_grpc_and_http(server_clients, grpc_client):
    request = GenerationRequest.build("text_to_image", prompt="a cat", seed=3, **PROMPTED)
    for protocol, client in server_clients.items():
        previews: list[tuple[str, int, int]] = []
        progress: list[tuple[str, int]] = []
        client.generate(
            request,
            callback_on_step_end=lambda stage, step, t, latents, seen=progress: seen.append((stage, step)),
            on_preview=lambda stage, step, images, seen=previews: seen.append((stage, step, len(images))),
            preview_every=2,
        )
        assert progress == [
            ("prior", 0),
            ("prior", 1),
            ("prior", 2),
            ("decoder", 0),
            ("decoder", 1),
            ("decoder", 2),
        ]
        assert previews == [("decoder", 1, 1)], protocol


BAD_FIELDS = [
    ({"prompt": "x", "height": 65}, "height"),
    ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps"),
    ({"prompt": "x", "guidance_scale": float("inf")}, "guidance_scale"),
    ({"prompt": "x", "num_images_per_prompt": 9}, "num_images_per_prompt"),
    ({"prompt": "x" * 9000}, "prompt"),
    ({"mode": "variations", "image": b"\x89PNG not really"}, "image"),
    ({"mode": "image_to_image", "image": IMAGE, "prompt": "x", "strength": 1.5, **SMALL}, "strength"),
    ({"mode": "fuse", "images_and_prompts": ["a"], "weights": [1, 2]}, "weights"),
    ({"prompt": "x", "strength": 0.9}, "strength"),  # a field text-to-image does not use
    ({"prompt": "x", "scheduler": "LMSDiscreteScheduler"}, "scheduler"),
    ({"prompt": "x", "scheduler": "DDIMScheduler", "scheduler_config": {"eta": 0.5}}, "scheduler_config.eta"),
    ({"prompt": "x", "output_type": "pt"}, "output_type"),
    ({"mode": "controlnet", "prompt": "x", "hint": HINT, "height": 128}, "hint"),  # not the output's size
    ({"mode": "controlnet", "prompt": "x", "hint": HINT.convert("LA")}, "hint"),  # 2 channels
    ({"mode": "controlnet", "prompt": "x", "hint": b"\x89PNG not really"}, "hint"),
]


@pytest.mark.parametrize(("fields", "field"), BAD_FIELDS)
def test_server_refuses_bad_fields_with_the_clients_message(
    grpc_client, server_clients, triton_server, fields, field
):
    request = GenerationRequest(**fields)
    with pytest.raises(InvalidRequest) as local:
        check_request(request, grpc_client.info)
    assert local.value.field == field
    # Sent as it is (no client-side check): gRPC stream and HTTP generate answer with the same message.
    from kandinsky_client.remote import RemoteGenerator

    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        remote = RemoteGenerator(url, protocol, 60.0, {}, grpc_client.info.dims.embed_dim)
        with pytest.raises(InvalidRequest) as served:
            remote.generate(request)
        assert str(served.value) == str(local.value), protocol
    status, answer = generate_json(triton_server.http_url, _json_body(request))
    assert status == 400 and answer["error"] == f"invalid argument: {local.value}"


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"mode": "paint", "prompt": "x"}, "mode: is 'paint'; valid modes: text_to_image, variations"),
        ({"height": 64}, "prompt: is required by mode text_to_image"),
        ({"mode": "variations", "image": "not base64!"}, "image: is not valid base64"),
        (
            {"mode": "variations", "image": base64.b64encode(b"GIF89a garbage").decode()},
            "image: the given bytes is not a readable image file",
        ),
        (
            {"mode": "variations", "image": "data:image/png,abc"},
            "image: is a data URI that is not base64-encoded",
        ),
        (
            {"prompt": "x", "heigth": 64},
            "heigth: is not a parameter of the generation model; valid: mode, prompt",
        ),
        ({"prompt": ["a", "b", "c"], "num_images_per_prompt": 2}, "at most 4 images per request"),
    ],
)
def test_generate_endpoint_refuses_bad_json_with_400_and_keeps_serving(triton_server, body, fragment):
    status, answer = generate_json(triton_server.http_url, body)
    assert status == 400, answer
    assert fragment in answer["error"] and answer["error"].startswith("invalid argument: ")
    status, answer = generate_json(triton_server.http_url, {"prompt": "ok", **PROMPTED})
    assert status == 200 and answer["image"]


def test_invalid_utf8_prompt_is_refused(server_clients, triton_server):
    import tritonclient.grpc as grpcclient

    inputs = request_inputs(GenerationRequest(prompt="x"), ResponseOptions())
    inputs["prompt"] = np.array([b"\xff\xfe broken"], dtype=np.object_)
    client = grpcclient.InferenceServerClient(triton_server.grpc_url)
    answers: queue.Queue = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put(error))
    tensor = grpcclient.InferInput("prompt", [1], "BYTES")
    tensor.set_data_from_numpy(inputs["prompt"])
    client.async_stream_infer(MODEL_NAME, [tensor])
    error = answers.get(timeout=60)
    client.stop_stream()
    assert "invalid argument: prompt: is not valid UTF-8" in error.message()


def _unet_count(client: KandinskyClient) -> int:
    stats = client.transport.inference_statistics("unet")["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def _run_until_decoder_step(client: KandinskyClient, request: GenerationRequest, steps_seen: int):
    """Start a server-side generation in a thread; return (thread, result holder) once the decoder has
    reported `steps_seen` steps. The step callback raises when `stop` is set, which cancels the request."""
    seen = threading.Event()
    stop = threading.Event()
    holder: dict = {}
    count = 0

    def on_step(stage: str, step: int, timestep: int, latents) -> None:
        nonlocal count
        count += stage == "decoder"
        if count >= steps_seen:
            seen.set()
            stop.wait(120)  # stop reading here (the server goes on) until the test cancels
            raise KeyboardInterrupt("cancelled by the test")

    def work() -> None:
        try:
            holder["result"] = client.generate(request, callback_on_step_end=on_step)
        except BaseException as error:  # noqa: BLE001
            holder["error"] = error

    thread = threading.Thread(target=work)
    thread.start()
    assert seen.wait(120)
    return thread, holder, stop


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_cancel_stops_the_server_loop_within_one_step(server_clients, grpc_client, protocol):
    """A 512x512 step takes ~0.1 s here, so a loop that kept going would add ~10 UNet steps per second.

    Triton counts a BLS request when it is released, which can trail its response slightly, so the count
    read at the cancel may miss the step that just finished: at most one step in flight at the cancel
    plus that one may appear afterwards.
    """
    request = GenerationRequest.build(
        "text_to_image",
        prompt="a cat",
        seed=1,
        height=512,
        width=512,
        num_inference_steps=60,
        prior_num_inference_steps=2,
    )
    before = _settled_unet_count(grpc_client)
    thread, holder, stop = _run_until_decoder_step(server_clients[protocol], request, 2)
    at_cancel = _unet_count(grpc_client)
    stop.set()  # the callback raises: the client cancels the stream / closes the connection
    thread.join(60)
    assert isinstance(holder.get("error"), KeyboardInterrupt)
    settled = _settled_unet_count(grpc_client)
    assert at_cancel - before >= 1, "the generation was running when it was cancelled"
    assert settled - at_cancel <= 2, f"{settled - at_cancel} UNet steps ran after the cancel"
    assert settled - before < 60, "the cancelled generation did not run to its end"
    # Nothing is left running: a new generation is not delayed by the cancelled one.
    grpc_client.generate(GenerationRequest.build("text_to_image", prompt="next", seed=2, **PROMPTED))


def _settled_unet_count(client: KandinskyClient) -> int:
    """The UNet request count once it has stopped moving for 0.5 s (work of earlier tests finishing)."""
    count = _unet_count(client)
    for _ in range(20):
        time.sleep(0.5)
        count, previous = _unet_count(client), count
        if count == previous:
            break
    return count


def test_request_time_limit_is_honoured(grpc_client, triton_server):
    client = KandinskyClient(triton_server.grpc_url, loop="server", timeout_s=0.5)
    started = time.monotonic()
    with pytest.raises(RequestTimeout):
        client.text_to_image(
            "a cat", height=512, width=512, num_inference_steps=200, prior_num_inference_steps=2
        )
    assert time.monotonic() - started < 10
    status, answer = generate_json(
        triton_server.http_url,
        {"prompt": "a cat", "height": 512, "width": 512, "num_inference_steps": 200, "timeout_s": 0.3},
    )
    assert status == 400 and answer["error"].startswith("deadline exceeded: "), answer


def test_concurrent_server_loops_share_unet_executions(grpc_client, triton_server):
    """Four generations at once: their BLS UNet requests meet in the dynamic batcher."""
    stats = lambda: grpc_client.transport.inference_statistics("unet")["model_stats"][0]  # noqa: E731
    _settled_unet_count(grpc_client)
    before = stats()
    request = GenerationRequest.build(
        "text_to_image",
        prompt="a cat",
        seed=5,
        height=256,
        width=256,
        num_inference_steps=12,
        prior_num_inference_steps=2,
    )
    results = []

    def work() -> None:
        with KandinskyClient(triton_server.grpc_url, loop="server") as client:
            results.append(client.generate(request))

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    after = stats()
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert len(results) == 4 and requests == 4 * 12 * 2  # every UNet batch row (CFG doubles each step)
    assert requests > executions * 2, f"{requests} rows in {executions} executions: no request was batched"
    for result in results[1:]:
        assert np.array_equal(_pixels(result), _pixels(results[0])), "batching must not change the result"


@pytest.fixture(scope="module")
def busy_server(tiny_bundle, tmp_path_factory):
    """A server whose generation model runs one generation and queues one (a third is refused)."""
    repository = tmp_path_factory.mktemp("busy") / "model_repository"
    generate_repository(
        tiny_bundle[0], repository, RepositoryOptions(max_concurrent_generations=1, max_queued_generations=1)
    )
    with TritonServer(
        repository, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port()
    ) as server:
        yield server


def test_full_generation_queue_refuses_at_once_with_server_busy(busy_server):
    slow = GenerationRequest.build(
        "text_to_image",
        prompt="a cat",
        height=512,
        width=512,
        num_inference_steps=30,
        prior_num_inference_steps=2,
    )
    clients = [KandinskyClient(busy_server.grpc_url, loop="server") for _ in range(2)]
    threads = [threading.Thread(target=c.generate, args=(slow,)) for c in clients]
    for thread in threads:
        thread.start()
        time.sleep(0.3)  # the first one runs, the second one waits
    started = time.monotonic()
    with pytest.raises(ServerBusy, match="1 generations are running and 1 are waiting"):
        KandinskyClient(busy_server.grpc_url, loop="server", retry=NO_RETRY).generate(slow)
    assert time.monotonic() - started < 2, "refused at once, not after waiting"
    # The default policy waits and tries again (retry.py), then says so.
    with pytest.raises(ServerBusy, match=r"gave up on generation after 2 attempts"):
        KandinskyClient(
            busy_server.grpc_url, loop="server", retry=RetryPolicy(attempts=2, backoff_s=0.1)
        ).generate(slow)
    status, answer = generate_json(busy_server.http_url, {"prompt": "x", **PROMPTED})
    assert status == 400 and answer["error"].startswith("server busy: ")
    for thread in threads:
        thread.join(120)
    # Once the queue has drained the server takes work again.
    KandinskyClient(busy_server.grpc_url, loop="server").generate(
        GenerationRequest.build("text_to_image", prompt="x", **PROMPTED)
    )
