"""The OpenAI Images API (kandinsky-openai) with the official `openai` package as its client.

Against the session's Triton serving the tiny preset (64 px, a few steps): every endpoint and the mode each
edit maps to, sizes, `n`, output formats, Kandinsky's extra fields, the streamed events; the images equal
those of `KandinskyClient(loop="server")` for the same request and seed. Then every error: status, OpenAI's
error object and the server's own message, bad JSON and multipart, oversize bodies, the token, a busy or
absent model server; a client that goes away cancels its generation; and the server keeps serving.
"""

from __future__ import annotations

import base64
import io
import json
import socket
import time
import urllib.request
from http.client import HTTPConnection

import numpy as np
import openai
import pytest
from kandinsky_core.components import MAX_PROMPT_BYTES
from kandinsky_core.errors import RequestTimeout, ServerBusy
from kandinsky_core.request import GenerationRequest
from kandinsky_repository.openai_api.app import MAX_JSON_BODY_BYTES, MAX_MULTIPART_BODY_BYTES, create_app
from kandinsky_repository.openai_api.fields import MAX_EDIT_IMAGES, MODEL_ID
from kandinsky_repository.openai_api.server import OpenAIServer
from kandinsky_repository.openai_api.triton import KandinskyModel
from kandinsky_repository.serving.triton import free_port
from PIL import Image

from .reference import picture
from .serving import http

SMALL = {"seed": 5, "num_inference_steps": 3, "prior_num_inference_steps": 2}
SIZE = {"height": 64, "width": 64}
IMAGE = picture(64, 64, seed=21)
BOX = (8, 16, 40, 48)  # the repainted box: top, left, bottom, right


@pytest.fixture(scope="module")
def api(triton_server):
    with OpenAIServer(triton_server.grpc_url, port=free_port()) as server:
        yield server


@pytest.fixture(scope="module")
def client(api) -> openai.OpenAI:
    with openai.OpenAI(base_url=api.url, api_key="not-checked-on-loopback", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def reference(server_loop_clients):
    """The server loop as the project's own client runs it: what every image here must equal."""
    return server_loop_clients["grpc"]


def png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def file(image: Image.Image, name: str = "image.png") -> tuple[str, bytes, str]:
    return (name, png(image), "image/png")


def decoded(b64: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(b64)))


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def assert_same_images(data: list, expected: list) -> None:
    assert len(data) == len(expected)
    for item, image in zip(data, expected, strict=True):
        np.testing.assert_array_equal(pixels(decoded(item.b64_json)), pixels(image))


def expected(reference, mode: str, **fields) -> list[Image.Image]:
    return reference.generate(GenerationRequest.build(mode, **fields)).images


def with_transparent_box(image: Image.Image) -> Image.Image:
    """`image` with the BOX fully transparent (OpenAI's convention: that area is repainted)."""
    rgba = image.convert("RGBA")
    alpha = np.full((image.height, image.width), 255, np.uint8)
    top, left, bottom, right = BOX
    alpha[top:bottom, left:right] = 0
    rgba.putalpha(Image.fromarray(alpha))
    return rgba


def _box_l() -> Image.Image:
    """The project's mask of BOX (white = repaint)."""
    values = np.zeros((64, 64), np.uint8)
    top, left, bottom, right = BOX
    values[top:bottom, left:right] = 255
    return Image.fromarray(values)


# -- generations --------------------------------------------------------------------------------------


def test_generations_equal_the_server_loop_with_n_and_extra_fields(client, reference):
    extra = {
        **SMALL,
        "negative_prompt": "blurry",
        "guidance_scale": 5.0,
        "prior_guidance_scale": 3.0,
        "scheduler": "DDIMScheduler",
    }
    response = client.images.generate(
        model=MODEL_ID, prompt="a red cat", n=2, size="64x64", response_format="b64_json", extra_body=extra
    )
    assert response.size == "64x64" and response.output_format == "png" and isinstance(response.created, int)
    assert response.seed == 5  # not OpenAI's: the seed that redoes the images
    assert all(decoded(item.b64_json).format == "PNG" for item in response.data)
    assert_same_images(
        response.data,
        expected(reference, "text_to_image", prompt="a red cat", num_images_per_prompt=2, **SIZE, **extra),
    )


def test_size_is_width_by_height_and_auto_is_the_default_size(client):
    wide = client.images.generate(prompt="a fox", size="128x64", extra_body=SMALL)
    assert decoded(wide.data[0].b64_json).size == (128, 64) and wide.size == "128x64"
    auto = client.images.generate(prompt="a fox", size="auto", extra_body={**SMALL, "num_inference_steps": 1})
    assert decoded(auto.data[0].b64_json).size == (512, 512) and auto.size == "512x512"


def test_a_random_seed_is_returned_and_redoes_the_image(client):
    first = client.images.generate(prompt="a fox", size="64x64", extra_body={"num_inference_steps": 2})
    again = client.images.generate(
        prompt="a fox", size="64x64", extra_body={"num_inference_steps": 2, "seed": first.seed}
    )
    assert isinstance(first.seed, int)
    np.testing.assert_array_equal(
        pixels(decoded(first.data[0].b64_json)), pixels(decoded(again.data[0].b64_json))
    )


@pytest.mark.parametrize("output_format, pil_format", [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_output_formats_and_compression(client, output_format, pil_format):
    best = client.images.generate(prompt="a fox", size="64x64", output_format=output_format, extra_body=SMALL)
    small = client.images.generate(
        prompt="a fox", size="64x64", output_format=output_format, output_compression=10, extra_body=SMALL
    )
    assert best.output_format == output_format
    assert decoded(best.data[0].b64_json).format == pil_format
    assert len(base64.b64decode(small.data[0].b64_json)) < len(base64.b64decode(best.data[0].b64_json))


def test_streamed_partial_images_then_the_final_image(client):
    extra = {**SMALL, "num_inference_steps": 6}
    events = list(
        client.images.generate(prompt="a fox", size="64x64", stream=True, partial_images=2, extra_body=extra)
    )
    assert [e.type for e in events] == ["image_generation.partial_image"] * 2 + ["image_generation.completed"]
    assert [e.partial_image_index for e in events[:2]] == [0, 1]
    assert all(e.size == "64x64" and e.output_format == "png" for e in events)
    assert all(decoded(e.b64_json).size == (64, 64) for e in events)
    whole = client.images.generate(prompt="a fox", size="64x64", extra_body=extra)
    np.testing.assert_array_equal(
        pixels(decoded(events[-1].b64_json)), pixels(decoded(whole.data[0].b64_json))
    )


def test_streamed_without_partial_images_sends_one_event_per_image(client):
    events = list(client.images.generate(prompt="a fox", size="64x64", n=2, stream=True, extra_body=SMALL))
    assert [e.type for e in events] == ["image_generation.completed"] * 2


# -- edits and variations -----------------------------------------------------------------------------


def test_edit_inpaints_the_transparent_area_of_the_image_or_the_mask(client, reference):
    holed = with_transparent_box(IMAGE)
    raw = client.images.with_raw_response.edit(image=file(holed), prompt="a hat", extra_body=SMALL)
    assert raw.headers["kandinsky-mode"] == "inpaint"
    by_image = raw.parse()
    assert by_image.size == "64x64"  # "auto": the image's size
    want = expected(reference, "inpaint", image=png(holed), mask_image=_box_l(), prompt="a hat", **SMALL)
    assert_same_images(by_image.data, want)
    # The same area as a separate mask (transparent = repaint), the image opaque.
    by_mask = client.images.edit(
        image=file(IMAGE),
        mask=file(with_transparent_box(Image.new("RGB", (64, 64))), "mask.png"),
        prompt="a hat",
        extra_body=SMALL,
    )
    assert_same_images(
        by_mask.data,
        expected(reference, "inpaint", image=png(IMAGE), mask_image=_box_l(), prompt="a hat", **SMALL),
    )


def test_edit_with_strength_is_image_to_image(client, reference):
    raw = client.images.with_raw_response.edit(
        image=file(IMAGE),
        prompt="a watercolor",
        extra_body={**SMALL, "num_inference_steps": 4, "strength": 0.5},
    )
    assert raw.headers["kandinsky-mode"] == "image_to_image"
    want = expected(
        reference,
        "image_to_image",
        image=png(IMAGE),
        prompt="a watercolor",
        **SMALL | {"num_inference_steps": 4},
        strength=0.5,
    )
    assert_same_images(raw.parse().data, want)


def test_edit_with_margins_outpaints(client, reference):
    raw = client.images.with_raw_response.edit(
        image=file(IMAGE), prompt="a beach", extra_body={**SMALL, "right": 64}
    )
    assert raw.headers["kandinsky-mode"] == "outpaint"
    response = raw.parse()
    assert response.size == "128x64"
    assert_same_images(
        response.data, expected(reference, "outpaint", image=png(IMAGE), prompt="a beach", right=64, **SMALL)
    )


def test_edit_without_mask_or_strength_fuses_the_prompt_and_images(client, reference):
    second = picture(48, 40, seed=22)
    raw = client.images.with_raw_response.edit(
        image=file(IMAGE), prompt="a fox", size="64x64", extra_body={**SMALL, "weights": [0.3, 0.7]}
    )
    assert raw.headers["kandinsky-mode"] == "fuse"
    want = expected(
        reference, "fuse", images_and_prompts=["a fox", png(IMAGE)], weights=[0.3, 0.7], **SIZE, **SMALL
    )
    assert_same_images(raw.parse().data, want)
    several = client.images.edit(
        image=[file(IMAGE), file(second, "second.png")], prompt="a fox", size="64x64", extra_body=SMALL
    )
    want = expected(
        reference,
        "fuse",
        images_and_prompts=["a fox", png(IMAGE), png(second)],
        weights=[1 / 3] * 3,
        **SIZE,
        **SMALL,
    )
    assert_same_images(several.data, want)


def test_edits_stream_their_own_events(client):
    events = list(
        client.images.edit(
            image=file(with_transparent_box(IMAGE)),
            prompt="a hat",
            stream=True,
            partial_images=1,
            output_format="webp",
            extra_body={**SMALL, "num_inference_steps": 4},
        )
    )
    assert [e.type for e in events] == ["image_edit.partial_image", "image_edit.completed"]
    assert decoded(events[-1].b64_json).format == "WEBP"


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # openai marks create_variation deprecated
def test_variations_equal_the_server_loop(client, reference):
    extra = {"seed": 5, "num_inference_steps": 3}  # no prior: variations decode the image's embedding
    response = client.images.create_variation(image=file(IMAGE), n=2, size="64x64", extra_body=extra)
    assert_same_images(
        response.data,
        expected(reference, "variations", image=png(IMAGE), num_images_per_prompt=2, **SIZE, **extra),
    )


def test_models_lists_the_served_model_and_its_limits(client, triton_server):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL_ID]
    model = client.models.retrieve(MODEL_ID)
    limits = model.kandinsky
    assert limits["max_images_per_request"] >= 1 and limits["size_multiple"] == 64
    assert "inpaint" in limits["modes"] and "DDPMScheduler" in limits["schedulers"]
    with pytest.raises(openai.NotFoundError) as error:
        client.models.retrieve("dall-e-3")
    assert error.value.code == "model_not_found"


# -- errors -------------------------------------------------------------------------------------------


def _max_side(client) -> int:
    return client.models.retrieve(MODEL_ID).kandinsky["max_image_size"]


@pytest.mark.parametrize(
    "options, param, words",
    [
        ({"size": "100x64"}, "size", "size: width is 100; it must be a multiple of 64"),
        ({"size": "64x8192"}, "size", "size: height is 8192; valid values are [64, "),
        ({"size": "big"}, "size", "size: is 'big'; valid values: 'auto' or 'WIDTHxHEIGHT'"),
        ({"n": 99}, "n", "n: is 99; valid values are [1, "),
        ({"extra_body": {"num_inference_steps": 0}}, "num_inference_steps", "num_inference_steps: is 0"),
        ({"prompt": "x" * (MAX_PROMPT_BYTES + 1)}, "prompt", f"at most {MAX_PROMPT_BYTES}"),
        ({"response_format": "url"}, "response_format", "'url' is not supported"),
        ({"output_format": "gif"}, "output_format", "valid values: png, jpeg, webp"),
        ({"output_compression": 50}, "output_compression", "applies to output_format jpeg or webp"),
        ({"partial_images": 2}, "partial_images", "applies to streamed responses only"),
        ({"stream": True, "partial_images": 4}, "partial_images", "valid values are [0, 3]"),
        ({"quality": "high"}, "quality", "this server has no quality levels"),
        ({"background": "transparent"}, "background", "Kandinsky 2.2 draws opaque images"),
        ({"extra_body": {"seed": -1}}, "seed", "seed: is -1"),
        ({"extra_body": {"scheduler": "NoSuchScheduler"}}, "scheduler", "NoSuchScheduler"),
        ({"extra_body": {"guidance_scale": "high"}}, "guidance_scale", "must be a finite number"),
        ({"extra_body": {"strength": 0.5}}, "strength", "strength: "),
        ({"extra_body": {"temperature": 1}}, "temperature", "is not a parameter of /v1/images/generations"),
    ],
)
def test_bad_generation_fields_are_refused_by_name(client, options, param, words):
    options = {"prompt": "a fox", "size": "64x64", **options}
    with pytest.raises(openai.BadRequestError) as error:
        client.images.generate(**options)
    assert error.value.status_code == 400
    body = error.value.body
    assert set(body) == {"message", "type", "param", "code"}
    assert body["type"] == "invalid_request_error" and body["param"] == param
    assert words in body["message"], body["message"]


ODD_VALUES = [None, [], {}, "x", "\ud800", -1, 1.5, True, 10**30, float("inf"), float("nan"), [1, [2]]]


def test_odd_values_of_every_field_get_an_answer_never_a_failure(api):
    """Whatever a generation field holds, the answer is a result or OpenAI's error object with 400/404, and
    the server goes on (a huge guidance scale included: the core bounds it)."""
    from kandinsky_repository.openai_api.fields import GENERATION_FIELDS

    base = {"prompt": "a", "size": "64x64", "num_inference_steps": 1, "prior_num_inference_steps": 2}
    url = api.url + "/images/generations"
    for name in GENERATION_FIELDS:
        for value in ODD_VALUES:
            body = json.dumps({**base, name: value})
            status, answer = http("POST", url, body, {"Content-Type": "application/json"})
            if status == 200:
                continue
            assert set(answer["error"]) == {"message", "type", "param", "code"}, answer
            assert status in (400, 404), (name, value, status, answer)
    deep = "[" * 100_000 + "]" * 100_000
    status, answer = http("POST", url, deep, {"Content-Type": "application/json"})
    assert status == 400 and answer["error"]["code"] == "invalid_json"


def test_an_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as error:
        client.images.generate(prompt="a fox", model="dall-e-3")
    assert error.value.body["code"] == "model_not_found" and error.value.body["param"] == "model"


@pytest.mark.parametrize(
    "method, path, body, headers, status, words",
    [
        (
            "POST",
            "/v1/images/generations",
            b"{not json",
            {"Content-Type": "application/json"},
            400,
            "not valid JSON",
        ),
        (
            "POST",
            "/v1/images/generations",
            b"[1, 2]",
            {"Content-Type": "application/json"},
            400,
            "JSON object",
        ),
        (
            "POST",
            "/v1/images/generations",
            b"{}",
            {"Content-Type": "application/json"},
            400,
            "prompt: is required",
        ),
        (
            "POST",
            "/v1/images/edits",
            b'{"prompt": "x"}',
            {"Content-Type": "application/json"},
            400,
            "multipart",
        ),
        (
            "POST",
            "/v1/images/edits",
            b'--xyz\r\nContent-Disposition: form-data; name="prompt"\r\n\r\nunterminated',
            {"Content-Type": "multipart/form-data; boundary=xyz"},
            400,
            "",
        ),
        ("POST", "/v1/images/edits", b"x", {"Content-Type": "multipart/form-data"}, 400, "Missing boundary"),
        ("GET", "/v1/images/generations", None, {}, 405, "GET is not allowed on /v1/images/generations"),
        ("POST", "/v1/chat/completions", b"{}", {"Content-Type": "application/json"}, 404, "no route"),
        ("GET", "/no/such/page", None, {}, 404, "no route GET /no/such/page"),
    ],
)
def test_bad_bodies_and_routes_get_openai_error_objects(api, method, path, body, headers, status, words):
    code, answer = http(method, api.url.removesuffix("/v1") + path, body, headers)
    assert code == status, answer
    assert set(answer["error"]) == {"message", "type", "param", "code"}
    assert words in answer["error"]["message"]


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::PIL.Image.DecompressionBombWarning")
def test_bad_images_and_masks_are_refused_by_name(client):
    cases = [
        (dict(image=("x.png", b"not an image", "image/png")), "image", "is not a readable image file"),
        (dict(image=file(Image.new("L", (10000, 10000)))), "image", "at most 40000000 pixels"),
        (
            dict(image=file(IMAGE), mask=file(with_transparent_box(IMAGE).resize((32, 32)))),
            "mask",
            "image's size",
        ),
        (dict(image=file(IMAGE), mask=file(IMAGE)), "mask", "has no transparent pixels"),
        (
            dict(image=[file(IMAGE)] * (MAX_EDIT_IMAGES + 1)),
            "image",
            f"has {MAX_EDIT_IMAGES + 1} files; at most {MAX_EDIT_IMAGES}",
        ),
        (
            dict(image=file(IMAGE), extra_body={"strength": 0.5, "weights": [1, 1]}),
            "weights",
            "applies to fusion",
        ),
        (
            dict(image=file(IMAGE), mask=file(with_transparent_box(IMAGE)), extra_body={"left": 64}),
            "mask",
            "outpainting",
        ),
        (
            dict(image=file(with_transparent_box(IMAGE)), extra_body={"strength": 0.5}),
            "strength",
            "strength: ",
        ),
        (dict(image=file(IMAGE), extra_body={"left": 4096}), "left, right", "exceeds the maximum image size"),
    ]
    for options, param, words in cases:
        with pytest.raises(openai.BadRequestError) as error:
            client.images.edit(prompt="a hat", **options)
        assert error.value.body["param"] == param, (param, error.value.body)
        assert words in error.value.body["message"], error.value.body
    with pytest.raises(openai.BadRequestError) as error:
        client.images.edit(image=file(IMAGE), prompt="a hat", extra_body={"image": "text, not a file"})
    assert error.value.body["param"] == "image"
    with pytest.raises(openai.BadRequestError) as error:
        client.images.create_variation(image=file(IMAGE), extra_body={"prompt": "variations take none"})
    assert error.value.body["param"] == "prompt" and error.value.body["code"] == "unknown_parameter"


def test_oversize_bodies_are_413(api, client):
    with pytest.raises(openai.APIStatusError) as error:
        client.images.generate(prompt="a fox", extra_body={"negative_prompt": "x" * MAX_JSON_BODY_BYTES})
    assert error.value.status_code == 413 and error.value.body["code"] == "request_too_large"
    big = b"\0" * (MAX_MULTIPART_BODY_BYTES + 1)
    with pytest.raises(openai.APIStatusError) as error:
        client.images.edit(image=("big.png", big, "image/png"), prompt="a fox")
    assert error.value.status_code == 413
    # No Content-Length (chunked): counted as it arrives.
    host, port = api.host, api.port
    connection = HTTPConnection(host, port, timeout=30)
    chunks = (b"x" * (256 * 1024) for _ in range(MAX_JSON_BODY_BYTES // (256 * 1024) + 2))
    connection.request(
        "POST",
        "/v1/images/generations",
        body=chunks,
        headers={"Content-Type": "application/json"},
        encode_chunked=True,
    )
    response = connection.getresponse()
    assert response.status == 413 and json.loads(response.read())["error"]["code"] == "request_too_large"
    connection.close()


def test_the_token_is_required_when_set(triton_server):
    with OpenAIServer(triton_server.grpc_url, port=free_port(), token="s3cret-token") as server:
        stranger = openai.OpenAI(base_url=server.url, api_key="wrong", max_retries=0)
        with stranger, pytest.raises(openai.AuthenticationError) as error:
            stranger.images.generate(prompt="a fox", size="64x64", extra_body=SMALL)
        assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
        status, body = http("POST", server.url + "/images/generations", {"prompt": "a fox"})  # no header
        assert status == 401 and "no API key given" in body["error"]["message"]
        with openai.OpenAI(base_url=server.url, api_key="s3cret-token", max_retries=0) as known:
            assert known.images.generate(prompt="a fox", size="64x64", extra_body=SMALL).data
        assert http("GET", f"http://{server.host}:{server.port}/")[0] == 200  # the page itself is public


class _Refusing(KandinskyModel):
    """The real model's limits, but a stream that fails as the `kandinsky` model's errors say."""

    def __init__(self, url: str, error: Exception, after_first: bool = False) -> None:
        super().__init__(url)
        self.error, self.after_first = error, after_first

    async def stream(self, inputs):
        if self.after_first:
            yield {"stage": np.array([b"prior"], dtype=object)}
        raise self.error


def _serve_app(app) -> tuple:
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, lifespan="on"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    return server, thread, f"http://127.0.0.1:{port}/v1"


@pytest.mark.parametrize(
    "error, status, kind",
    [
        (ServerBusy("8 generations are running and 32 are waiting; retry later"), 429, openai.RateLimitError),
        (
            RequestTimeout("the generation's time limit passed; it was stopped"),
            504,
            openai.InternalServerError,
        ),
    ],
)
def test_busy_and_timed_out_generations(triton_server, error, status, kind):
    server, thread, url = _serve_app(
        create_app(triton_server.grpc_url, model=_Refusing(triton_server.grpc_url, error))
    )
    try:
        with openai.OpenAI(base_url=url, api_key="x", max_retries=0) as c:
            with pytest.raises(kind) as raised:
                c.images.generate(prompt="a fox", size="64x64", extra_body=SMALL)
            assert raised.value.status_code == status and str(error) in raised.value.body["message"]
            assert raised.value.response.headers.get("retry-after") == ("1" if status == 429 else None)
            # After the first event the status is sent: the error comes as OpenAI's error event.
    finally:
        server.should_exit = True
        thread.join(10)
    late = _Refusing(
        triton_server.grpc_url, RequestTimeout("the generation's time limit passed"), after_first=True
    )
    server, thread, url = _serve_app(create_app(triton_server.grpc_url, model=late))
    try:
        c = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with c, pytest.raises(openai.APIError, match="time limit passed"):
            list(c.images.generate(prompt="a fox", size="64x64", stream=True, extra_body=SMALL))
    finally:
        server.should_exit = True
        thread.join(10)


def test_no_model_server_is_503_and_not_ready():
    with OpenAIServer(f"127.0.0.1:{free_port()}", port=free_port()) as server:
        c = openai.OpenAI(base_url=server.url, api_key="x", max_retries=0)
        with c, pytest.raises(openai.InternalServerError) as error:
            c.images.generate(prompt="a fox")
        assert error.value.status_code == 503 and error.value.body["code"] == "service_unavailable"
        assert error.value.response.headers["retry-after"] == "1"
        base = f"http://{server.host}:{server.port}"
        assert http("GET", f"{base}/health/live")[0] == 200
        status, body = http("GET", f"{base}/health/ready")
        assert status == 503 and not body["ready"] and "not ready" in body["reason"]


def test_ready_when_the_model_is(api):
    assert http("GET", api.url.removesuffix("/v1") + "/health/ready") == (200, {"ready": True})


# -- cancellation -------------------------------------------------------------------------------------

LONG = {"seed": 1, "num_inference_steps": 60, "prior_num_inference_steps": 2}  # ~0.1 s per step at 512 px


def _unet_count(grpc_client) -> int:
    stats = grpc_client.transport.inference_statistics("unet")["model_stats"][0]
    return int(stats["inference_stats"]["success"].get("count", 0))


def _settled(grpc_client) -> int:
    count = _unet_count(grpc_client)
    for _ in range(40):
        time.sleep(0.5)
        now = _unet_count(grpc_client)
        if now == count:
            return now
        count = now
    return count


def test_closing_a_stream_cancels_its_generation(client, grpc_client):
    before = _settled(grpc_client)
    stream = client.images.generate(
        prompt="a fox", size="512x512", stream=True, partial_images=3, extra_body=LONG
    )
    first = next(iter(stream))  # after 15 of the 60 decoder steps
    assert first.type == "image_generation.partial_image"
    at_cancel = _unet_count(grpc_client)
    stream.close()
    settled = _settled(grpc_client)
    assert at_cancel - before >= 15
    assert settled - at_cancel <= 3, f"{settled - at_cancel} UNet steps ran after the client went away"
    assert client.images.generate(prompt="next", size="64x64", extra_body=SMALL).data  # still serving


def test_a_client_that_gives_up_cancels_a_plain_generation(api, grpc_client):
    before = _settled(grpc_client)
    body = json.dumps({"prompt": "a fox", "size": "512x512", **LONG}).encode()
    request = urllib.request.Request(
        api.url + "/images/generations", data=body, headers={"Content-Type": "application/json"}
    )
    with pytest.raises((TimeoutError, socket.timeout)):
        urllib.request.urlopen(request, timeout=2.0)  # gives up (and closes) long before the 60 steps
    settled = _settled(grpc_client)
    assert 0 < settled - before < 50, f"{settled - before} UNet steps ran for a client that left after 2 s"
