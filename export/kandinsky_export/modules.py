"""PyTorch modules with exactly the registry's inputs and outputs, one per exported component.

Each wrapper calls its diffusers/transformers model the way the diffusers Kandinsky 2.2 pipelines
call it, so the exported graph computes what the reference computes at that point of the pipeline.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
from kandinsky_core.components import COMPONENTS, ComponentSpec, ModelDims


class TextEncoder(torch.nn.Module):
    """input_ids -> (text_embeds, last_hidden_state). The prior pipeline passes no attention mask."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=input_ids)
        return out.text_embeds, out.last_hidden_state


class ImageEncoder(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.model(pixel_values=pixel_values).image_embeds


class Prior(torch.nn.Module):
    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        proj_embedding: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        return self.model(
            hidden_states,
            timestep=timestep,
            proj_embedding=proj_embedding,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
        ).predicted_image_embedding


class UNet(torch.nn.Module):
    """Used for both the decoder UNet and the inpainting UNet (which takes more input channels)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, image_embeds: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            sample=sample,
            timestep=timestep,
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": image_embeds},
            return_dict=False,
        )[0]


class UNetControlnet(torch.nn.Module):
    """The ControlNet-depth UNet, called as KandinskyV22ControlnetPipeline calls it (hint in [0, 1])."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor, image_embeds: torch.Tensor, hint: torch.Tensor
    ) -> torch.Tensor:
        return self.model(
            sample=sample,
            timestep=timestep,
            encoder_hidden_states=None,
            added_cond_kwargs={"image_embeds": image_embeds, "hint": hint},
            return_dict=False,
        )[0]


class MoVQEncoder(torch.nn.Module):
    """VQModel.encode: the pre-quantisation latents, as the img2img and inpaint pipelines use them."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.model.encode(image).latents


class MoVQDecoder(torch.nn.Module):
    """VQModel.decode with force_not_quantize=True, as every Kandinsky 2.2 pipeline decodes."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return self.model.decode(latents, force_not_quantize=True).sample


WRAPPERS: dict[str, type[torch.nn.Module]] = {
    "text_encoder": TextEncoder,
    "image_encoder": ImageEncoder,
    "prior": Prior,
    "unet": UNet,
    "unet_inpaint": UNet,
    "unet_controlnet": UNetControlnet,
    "movq_encoder": MoVQEncoder,
    "movq_decoder": MoVQDecoder,
    "movq_encoder_inpaint": MoVQEncoder,
    "movq_decoder_inpaint": MoVQDecoder,
}


def sample_inputs(
    spec: ComponentSpec,
    dims: ModelDims,
    *,
    batch: int,
    height: int,
    width: int,
    seed: int,
    vocab_size: int = 0,
    num_train_timesteps: int = 1000,
) -> dict[str, np.ndarray]:
    """Random inputs in each tensor's valid range, for export tracing and parity checks.

    `height`/`width` are image pixels; latent sizes follow from the checkpoint's MoVQ scale factor.
    """
    rng = np.random.default_rng(seed)
    symbols = dims.size_symbols(batch, height, width)
    inputs: dict[str, np.ndarray] = {}
    for tensor in spec.inputs:
        shape = tensor.resolve(symbols, keep_dynamic=False)
        if tensor.name == "input_ids":
            inputs[tensor.name] = rng.integers(0, vocab_size, size=shape, dtype=np.int64)
        elif tensor.name == "timestep":
            inputs[tensor.name] = rng.integers(0, num_train_timesteps, size=shape, dtype=np.int64)
        elif tensor.dtype == "bool":
            # A prefix of real tokens then padding, as the tokenizer produces.
            lengths = rng.integers(2, shape[1] + 1, size=shape[0])
            inputs[tensor.name] = np.arange(shape[1])[None, :] < lengths[:, None]
        elif tensor.name in ("image", "pixel_values"):
            inputs[tensor.name] = rng.uniform(-1.0, 1.0, size=shape).astype(np.float32)
        elif tensor.name == "hint":  # a depth map as the pipeline takes it: [0, 1]
            inputs[tensor.name] = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
        else:
            inputs[tensor.name] = rng.standard_normal(size=shape).astype(np.float32)
    return inputs


def to_torch(inputs: Mapping[str, np.ndarray]) -> dict[str, torch.Tensor]:
    return {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in inputs.items()}


def build_wrapper(component: str, model: torch.nn.Module) -> torch.nn.Module:
    if component not in COMPONENTS:
        raise KeyError(f"unknown component '{component}'; known: {sorted(COMPONENTS)}")
    return WRAPPERS[component](model).eval()
