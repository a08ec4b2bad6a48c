"""What the served checkpoint is: sizes, scheduler configs and size limits, read from model configs.

The client reads these from the `unet`, `prior` and `unet_inpaint` model configs over the network; the
server-side generation model gets the same parameters written into its own config by the repository
generator. Both go through `ServerInfo.from_parameters`, so the two paths cannot disagree on a limit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .components import ModelDims
from .errors import InvalidRequest, ModelNotReady

# The models whose config parameters describe the checkpoint ("unet_inpaint" is optional).
INFO_MODELS = ("unet", "prior", "unet_inpaint")


@dataclass(frozen=True)
class ServerInfo:
    """Sizes and scheduler configs of the served checkpoint, and the image sizes the server accepts."""

    dims: ModelDims
    prior_scheduler: dict
    decoder_scheduler: dict
    max_image_size: int
    max_images_per_request: int
    inpaint_scheduler: dict | None = None  # None when the repository has no inpainting UNet
    min_image_size: int = 0  # 0: the checkpoint's size multiple; TensorRT engines accept their profile only
    static_size: tuple[int, int] | None = None  # (height, width) of static-shape engines

    @classmethod
    def from_parameters(cls, parameters: Mapping[str, Mapping[str, Any] | None]) -> ServerInfo:
        """Build from the decoded config parameters of INFO_MODELS (None for an absent inpainting UNet)."""
        unet, prior, inpaint = (parameters.get(name) for name in INFO_MODELS)
        if not unet or not prior:
            raise ModelNotReady("the server's 'unet' and 'prior' model parameters are missing")
        dims = ModelDims.from_dict(unet["kandinsky_dims"])
        smallest, largest, static = dims.size_multiple, int(unet["max_image_size"]), None
        profile = unet.get("tensorrt_profile")  # written by the tensorrt flavour: the engines' sizes
        if isinstance(profile, dict):
            if profile.get("static_size"):
                static = (int(profile["static_size"][0]), int(profile["static_size"][1]))
            else:
                smallest = max(smallest, int(profile["min_size"]))
                largest = min(largest, int(profile["max_size"]))
        return cls(
            dims=dims,
            prior_scheduler=prior["scheduler_config"],
            decoder_scheduler=unet["scheduler_config"],
            max_image_size=largest,
            max_images_per_request=int(unet["max_images_per_request"]),
            inpaint_scheduler=inpaint.get("scheduler_config") if inpaint else None,
            min_image_size=smallest,
            static_size=static,
        )

    @classmethod
    def read(cls, model_parameters: Callable[[str], dict[str, Any]]) -> ServerInfo:
        """From a server, through `model_parameters(model)` (e.g. `TritonTransport.model_parameters`)."""
        parameters: dict[str, dict[str, Any] | None] = {}
        for name in INFO_MODELS:
            try:
                parameters[name] = model_parameters(name)
            except ModelNotReady:
                if name != "unet_inpaint":
                    raise
                parameters[name] = None
        return cls.from_parameters(parameters)

    def decoder_scheduler_config(self, inpainting: bool) -> dict:
        """The scheduler config of the UNet a decoder loop uses (the inpainting UNet has its own)."""
        if not inpainting:
            return self.decoder_scheduler
        if self.inpaint_scheduler is None:
            raise InvalidRequest(
                "mode", "inpainting needs an inpainting UNet, which this server does not serve"
            )
        return self.inpaint_scheduler

    def latent_size(self, height: int, width: int) -> tuple[int, int]:
        """diffusers' downscale_height_and_width: ceil(side / scale**2) * scale."""
        scale = self.dims.movq_scale_factor
        return (-(-height // scale**2) * scale, -(-width // scale**2) * scale)
