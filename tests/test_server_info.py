"""What the client reads from a server and checks before sending anything, without a
server: the repository generator's parameters for the tiny bundle, read back through `ServerInfo`."""

from __future__ import annotations

import pytest
from kandinsky_core.errors import InvalidRequest
from kandinsky_core.request import GenerationRequest
from kandinsky_core.server_info import ServerInfo
from kandinsky_core.validation import check_request


@pytest.fixture(scope="module")
def info(tiny_repository) -> ServerInfo:
    from kandinsky_repository.generator.kandinsky_model_config import decoded_parameters
    from kandinsky_repository.generator.repository import read_config

    return ServerInfo.from_parameters(
        {
            name: decoded_parameters(read_config(tiny_repository / name))
            for name in ("unet", "prior", "unet_inpaint")
        }
    )


def test_too_many_decoder_steps_are_refused_before_anything_runs(info: ServerInfo) -> None:
    """`num_inference_steps=1000` passed the [1, 1000] range check, then the checkpoint's DDPM scheduler
    ("leading" spacing, steps_offset 1) made timestep 1000, which the UNet refuses, after the prior had run.
    The request is now checked by building the scheduler and asking it for its timesteps."""
    request = GenerationRequest(prompt="x", height=64, width=64, num_inference_steps=1000)
    with pytest.raises(InvalidRequest, match=r"timesteps outside \[0, 999\]") as error:
        check_request(request, info)
    assert error.value.field == "num_inference_steps"
    assert check_request(GenerationRequest(prompt="x", height=64, width=64, num_inference_steps=999), info)


def test_the_client_reads_the_sizes_the_repository_publishes(info: ServerInfo) -> None:
    assert (info.min_image_size, info.max_image_size, info.static_size) == (
        info.dims.size_multiple,
        1024,
        None,
    )
    with pytest.raises(InvalidRequest, match="height"):
        check_request(GenerationRequest(prompt="x", height=1024 + info.dims.size_multiple, width=64), info)
