"""Bad input gets a clear error naming the field and the valid values; the server keeps serving."""

from __future__ import annotations

import re

import numpy as np
import pytest
from kandinsky_client.pipeline import KandinskyClient, ServerInfo
from kandinsky_core import components as registry
from kandinsky_core.errors import InferenceFailed, InvalidRequest, ModelNotReady, ServerUnavailable
from kandinsky_core.request import GenerationRequest
from kandinsky_core.validation import check_request

from .conftest import free_port

FAST = {"prior_num_inference_steps": 2, "num_inference_steps": 2, "height": 64, "width": 64}


@pytest.mark.parametrize(
    ("kwargs", "field", "fragment"),
    [
        ({"prompt": []}, "prompt", "non-empty list"),
        ({"prompt": ["ok", 3]}, "prompt[1]", "must be a string"),
        ({"prompt": "x", "height": 65}, "height", "multiple of 64"),
        ({"prompt": "x", "width": 0}, "width", "valid values are [64, 1024]"),
        ({"prompt": "x", "height": 2048}, "height", "[64, 1024]"),
        ({"prompt": "x", "num_inference_steps": 0}, "num_inference_steps", "[1, 1000]"),
        ({"prompt": "x", "prior_num_inference_steps": 1}, "prior_num_inference_steps", "[2, 1000]"),
        ({"prompt": "x", "prior_guidance_scale": float("nan")}, "prior_guidance_scale", "finite"),
        ({"prompt": "x", "num_images_per_prompt": 5}, "num_images_per_prompt", "[1, 4]"),
        ({"prompt": ["a", "b", "c"], "num_images_per_prompt": 2}, "num_images_per_prompt", "at most 4"),
        ({"prompt": ["a", "b"], "negative_prompt": ["x", "y", "z"]}, "negative_prompt", "one per prompt"),
        ({"prompt": "x", "seed": -1}, "seed", "valid values are [0,"),
    ],
)
def test_client_rejects_bad_arguments(grpc_client, kwargs, field, fragment):
    with pytest.raises(InvalidRequest) as error:
        grpc_client.text_to_image(**{**FAST, **kwargs})
    assert error.value.field == field
    assert fragment in str(error.value)


@pytest.mark.parametrize("field", ["guidance_scale", "prior_guidance_scale"])
def test_a_huge_guidance_scale_is_refused_naming_its_range_on_both_loops(
    grpc_client, server_loop_clients, triton_server, field
):
    """1e308 is finite, so it passed: uncond + g * (cond - uncond) overflowed float32 and the client loop's
    next UNet step answered "input 'sample' contains NaN". Now it is an invalid argument naming the field
    and its range, on the client loop (checked before anything is sent) and on the server loop (the
    server's own check, reached by sending the request as it is, over gRPC and HTTP)."""
    from kandinsky_client.remote import RemoteGenerator

    request = GenerationRequest(prompt="x", **{**FAST, field: 1e308})
    with pytest.raises(InvalidRequest) as local:
        check_request(request, grpc_client.info)
    assert local.value.field == field and re.search(r"\[[^],]+, [^]]+\]", str(local.value)), local.value
    for client in (grpc_client, *server_loop_clients.values()):
        with pytest.raises(InvalidRequest) as refused:
            client.text_to_image(**{**FAST, "prompt": "x", field: 1e308})
        assert refused.value.field == field and str(refused.value) == str(local.value)
    for protocol, url in (("grpc", triton_server.grpc_url), ("http", triton_server.http_url)):
        remote = RemoteGenerator(url, protocol, 60.0, {}, grpc_client.info.dims.embed_dim)
        with pytest.raises(InvalidRequest) as served:
            remote.generate(request)
        assert str(served.value) == str(local.value), protocol


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_unknown_server_is_reported(protocol):
    with pytest.raises(ServerUnavailable, match=f"127.0.0.1:{(port := free_port())}"):
        KandinskyClient(f"127.0.0.1:{port}", protocol=protocol, timeout_s=5)


def test_unknown_protocol_is_reported():
    with pytest.raises(InvalidRequest, match="protocol"):
        KandinskyClient("localhost:1", protocol="carrier-pigeon")


def _unet_inputs(dims, latent=None, batch=2):
    latent = latent or dims.size_multiple // dims.movq_scale_factor
    return {
        "sample": np.zeros((batch, dims.latent_channels, latent, latent), np.float32),
        "timestep": np.full((batch,), 10, np.int64),
        "image_embeds": np.zeros((batch, dims.embed_dim), np.float32),
    }


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"sample": "nan"}, "input 'sample' contains NaN or Inf"),
        ({"timestep": 1000}, "input 'timestep' has values in [1000, 1000]; valid range is [0, 999]"),
        ({"latent": 3}, "input 'sample' height is 3; it must be a multiple of 8 in [8, 128]"),
    ],
)
def test_server_rejects_bad_tensors_and_keeps_serving(grpc_client, change, fragment):
    transport, dims = grpc_client.transport, grpc_client.info.dims
    inputs = _unet_inputs(dims, latent=change.get("latent"))
    if change.get("sample") == "nan":
        inputs["sample"][0, 0, 0, 0] = np.nan
    if "timestep" in change:
        inputs["timestep"][:] = change["timestep"]
    with pytest.raises(InferenceFailed) as error:
        transport.infer(registry.UNET, inputs)
    assert fragment in str(error.value)
    # The same model still answers a valid request.
    out = transport.infer(registry.UNET, _unet_inputs(dims))["noise_pred"]
    side = dims.size_multiple // dims.movq_scale_factor
    assert out.shape == (2, dims.unet_out_channels, side, side) and np.isfinite(out).all()


def test_server_rejects_out_of_vocabulary_tokens(grpc_client):
    ids = np.full((1, grpc_client.info.dims.text_seq_len), 10**6, np.int64)
    with pytest.raises(InferenceFailed, match="input 'input_ids'.*valid range is"):
        grpc_client.transport.infer(registry.TEXT_ENCODER, {"input_ids": ids})


def test_server_rejects_a_batch_above_the_model_limit(grpc_client):
    too_many = registry.UNET.max_batch_size + 1
    with pytest.raises(InferenceFailed, match="batch"):
        grpc_client.transport.infer(registry.UNET, _unet_inputs(grpc_client.info.dims, batch=too_many))


class _ConfigOnlyTransport:
    """Answers model_parameters like a server whose UNet is a TensorRT engine with `profile` (the
    generator's flavour-neutral `image_sizes` parameter, made from it)."""

    def __init__(self, dims, profile):
        from kandinsky_core.profiles import ProfileSettings, image_size_limits
        from kandinsky_core.server_info import REPOSITORY_FORMAT

        static = profile["static_size"]
        settings = ProfileSettings(
            min_size=profile["min_size"],
            opt_size=profile["min_size"],
            max_size=profile["max_size"],
            static_size=tuple(static) if static else None,
        )
        self.unet = {
            "repository_format": REPOSITORY_FORMAT,
            "kandinsky_dims": dims.as_symbols(),
            "scheduler_config": {"_class_name": "DDPMScheduler"},
            "max_images_per_request": "4",
            "image_sizes": image_size_limits(dims.size_multiple, 1024, settings),
        }

    def model_parameters(self, model):
        if model == "unet_inpaint":
            raise ModelNotReady("no inpainting UNet")
        return self.unet if model == "unet" else {"scheduler_config": {"_class_name": "UnCLIPScheduler"}}


def _request(info, height, width):
    return check_request(
        GenerationRequest(
            prompt="x", height=height, width=width, prior_num_inference_steps=2, num_inference_steps=2
        ),
        info,
    )


def test_client_follows_the_tensorrt_profile(grpc_client):
    dims = grpc_client.info.dims
    dynamic = ServerInfo.read(
        _ConfigOnlyTransport(dims, {"min_size": 512, "max_size": 768, "static_size": None}).model_parameters
    )
    assert (dynamic.min_image_size, dynamic.max_image_size) == (512, 768)
    assert _request(dynamic, 512, 768).width == 768
    with pytest.raises(InvalidRequest, match=r"height: is 448; valid values are \[512, 768\]"):
        _request(dynamic, 448, 512)
    static = ServerInfo.read(
        _ConfigOnlyTransport(
            dims, {"min_size": 512, "max_size": 1024, "static_size": [768, 512]}
        ).model_parameters
    )
    assert _request(static, 768, 512).height == 768
    with pytest.raises(
        InvalidRequest, match="width: is 768; the server's engines are built for 768x512 only"
    ):
        _request(static, 768, 768)
