"""kandinsky-serve runs the OpenAI Images API: on its own loopback port and through the gateway.

With a gateway token set, `openai`'s client gets the same images through the gateway's HTTP port as from
the app's own port, with the token as `Authorization: Bearer`; refusals (no token, a wrong one, a body
over the cap) are OpenAI's error objects, whoever answers (the app, or nginx before the app sees a byte);
streamed partial images pass through unbuffered; the playground page needs no token. The app is part of
deep readiness, and the supervisor starts it again when it stopped.
"""

from __future__ import annotations

import json

import numpy as np
import openai
import pytest
from kandinsky_repository.openai_api.app import MAX_JSON_BODY_BYTES
from kandinsky_repository.openai_api.server import OpenAIServer
from kandinsky_repository.serving.supervisor import Supervisor
from kandinsky_repository.serving.triton import free_port

from .serving import http, start_serve, wait_for
from .test_gateway import _options
from .test_openai_api import decoded, pixels

TOKEN = "openai-gateway-token-0123456789"
SMALL = {"seed": 11, "num_inference_steps": 2, "prior_num_inference_steps": 2}


@pytest.fixture(scope="module")
def served(nginx_with_njs, tiny_repository, tmp_path_factory):
    """`kandinsky-serve` with its defaults and a gateway token."""
    server = start_serve(tiny_repository, tmp_path_factory.mktemp("openai-serve"), "--gateway-token", TOKEN)
    yield server
    server.stop()


def _client(base_url: str, token: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key=token, max_retries=0, timeout=120)


def test_the_api_is_served_on_its_port_and_through_the_gateway_alike(served):
    assert f"OpenAI  http://127.0.0.1:{served.openai_port}/v1" in served.output
    direct = f"http://127.0.0.1:{served.openai_port}/v1"
    gatewayed = f"http://{served.http_url}/v1"
    images = []
    for base_url in (direct, gatewayed):
        with _client(base_url, TOKEN) as client:
            response = client.images.generate(prompt="a fox", size="64x64", extra_body=SMALL)
            images.append(pixels(decoded(response.data[0].b64_json)))
            assert [m.id for m in client.models.list().data]
    np.testing.assert_array_equal(images[0], images[1])


@pytest.mark.parametrize("where", ["direct", "gateway"])
def test_the_token_is_checked_with_openai_error_objects(served, where):
    base_url = (
        f"http://127.0.0.1:{served.openai_port}/v1" if where == "direct" else f"http://{served.http_url}/v1"
    )
    with _client(base_url, "not-the-token"), pytest.raises(openai.AuthenticationError) as error:
        _client(base_url, "not-the-token").images.generate(prompt="a fox", size="64x64", extra_body=SMALL)
    assert error.value.status_code == 401 and error.value.body["code"] == "invalid_api_key"
    status, body = http("POST", base_url + "/images/generations", {"prompt": "a fox"})
    assert status == 401 and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == "invalid_api_key" and "Authorization: Bearer" in body["error"]["message"]


def test_the_gateway_checks_the_token_when_the_app_has_none(nginx_with_njs, triton_server, tiny_repository):
    """Compose and Helm run the gateway apart from kandinsky-serve, whose app then knows no token: the
    gateway itself must refuse /v1 without it (it used to leave /v1 to the app: open to anyone)."""
    from kandinsky_repository.gateway.nginx import Gateway

    with OpenAIServer(triton_server.grpc_url, port=free_port()) as app:  # no token of its own
        options = _options(triton_server, tiny_repository, openai=f"127.0.0.1:{app.port}", token=TOKEN)
        with Gateway(options) as gateway:
            base_url = f"http://{gateway.http_url}/v1"
            for path in ("/models", "/images/generations", "/images/edits", "/images/variations"):
                status, body = http("POST" if "images" in path else "GET", base_url + path, b"{}")
                assert status == 401 and body["error"]["code"] == "invalid_api_key", (path, status, body)
            with _client(base_url, TOKEN) as client:
                assert client.images.generate(prompt="a fox", size="64x64", extra_body=SMALL).data
            assert http("GET", f"http://{gateway.http_url}/")[0] == 200  # the page needs none


def test_the_playground_needs_no_token_through_the_gateway(served):
    status, page = http("GET", f"http://{served.http_url}/")
    assert status == 200 and "<html" in page.lower()
    status, script = http("GET", f"http://{served.http_url}/playground/app.js")
    assert status == 200 and "v1/images/generations" in script
    # the rest of the gateway still wants the token
    assert http("GET", f"http://{served.http_url}/v2/health/ready")[0] == 401


def test_an_oversize_body_is_refused_by_the_gateway_as_an_openai_error(served):
    body = json.dumps({"prompt": "x" * (MAX_JSON_BODY_BYTES + 10)})
    status, answer = http(
        "POST",
        f"http://{served.http_url}/v1/images/generations",
        body,
        {"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert status == 413, answer
    assert (
        answer["error"]["code"] == "request_too_large"
        and str(MAX_JSON_BODY_BYTES) in answer["error"]["message"]
    )
    assert set(answer["error"]) == {"message", "type", "param", "code"}


def test_partial_images_stream_through_the_gateway(served):
    with _client(f"http://{served.http_url}/v1", TOKEN) as client:
        events = list(
            client.images.generate(
                prompt="a fox", size="64x64", stream=True, partial_images=1, extra_body=SMALL
            )
        )
    kinds = [event.type for event in events]
    assert kinds[-1] == "image_generation.completed" and "image_generation.partial_image" in kinds, kinds


def test_the_app_is_part_of_deep_readiness_and_is_restarted(triton_server):
    """A stopped app makes the server not ready, with the cause; the supervisor starts it again."""
    app = OpenAIServer(triton_server.grpc_url, port=free_port()).start()
    supervisor = Supervisor(triton_server, openai=app)
    supervisor.state = "serving"  # (as after its first start; the session's server is serving)
    try:
        assert supervisor.readiness().ready, supervisor.readiness().problems
        app.stop()
        report = supervisor.readiness()
        assert not report.ready and any("OpenAI API" in p for p in report.problems), report.problems
        supervisor._check_openai()
        assert app.alive()
        wait_for(lambda: supervisor.readiness().ready, 10, what="ready again")
        assert http("GET", f"http://127.0.0.1:{app.port}/health/live")[0] == 200
    finally:
        app.stop()
