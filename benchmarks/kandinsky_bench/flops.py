"""`kandinsky-bench flops`: the FLOP and weight counts behind `kandinsky_core/gpu_costs.json`.

    kandinsky-bench flops                      # count, print the table (nothing written)
    kandinsky-bench flops --output core/kandinsky_core/gpu_costs.json   # regenerate
    kandinsky-bench flops --calibrate-only --output my_costs.json   # re-derive efficiencies, no torch work

Instantiates the real diffusers/transformers classes from an architecture's configs on the meta device
(no weights, no memory), calls them as the exported graphs do (`kandinsky_export.modules`), and counts
with `torch.utils.flop_counter.FlopCounterMode` (1 multiply-add = 2 FLOP) at three square sizes
(`SIDES`). FLOP per batch row is then fitted exactly as c0 + c1*P + c2*P^2 in the pixel count P (convolutions
are linear in P, attention over latent tokens quadratic); a fourth, non-square size checks the fit.
Weight bytes are the FP16 size of the parameters the call reads (embedding tables: the rows looked up).

Architectures: `released` (the `full` preset: the released Kandinsky 2.2 configs), and `sd15` / `sdxl`
(configs written from the public config.json files) whose published end-to-end runs calibrate each GPU's
efficiency (`calibration` in the data file: each run's counted FLOP / (seconds x dense FP16 peak)).
On the meta device scaled-dot-product attention decomposes into counted matmuls; on CPU it runs as one
fused kernel the counter does not know, so `count_call` maps that kernel explicitly (tested to agree).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

logger = logging.getLogger(__name__)

# Square image sides counted: three sizes fit c0 + c1*P + c2*P^2 exactly.
SIDES = (512, 768, 1024)
# A non-square size the fitted polynomial must reproduce (checks that cost depends on P, not on the sides).
CHECK_SIZE = (640, 384)
# The released configs are the `full` preset's (export/kandinsky_export/presets.py).
RELEASED_PRESET = "full"
# The inpainting repo's MoVQ is the decoder's architecture: its components share the counts.
RELEASED_ALIASES = {"movq_encoder_inpaint": "movq_encoder", "movq_decoder_inpaint": "movq_decoder"}
FP16_BYTES = 2
# Relative size below which a fitted term is float64 rounding noise.
ROUNDING = 1e-12

# Stable Diffusion 1.5 and SDXL base, written from their public diffusers configs
# (runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-xl-base-1.0: unet/, vae/, text_encoder/,
# text_encoder_2/ config.json), for counting the published runs that calibrate the efficiencies.
SD15_UNET = {
    "act_fn": "silu",
    "attention_head_dim": 8,
    "block_out_channels": [320, 640, 1280, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 768,
    "down_block_types": [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "sample_size": 64,
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
}
SDXL_UNET = {
    "act_fn": "silu",
    "addition_embed_type": "text_time",
    "addition_embed_type_num_heads": 64,
    "addition_time_embed_dim": 256,
    "attention_head_dim": [5, 10, 20],
    "block_out_channels": [320, 640, 1280],
    "center_input_sample": False,
    "cross_attention_dim": 2048,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "downsample_padding": 1,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "in_channels": 4,
    "layers_per_block": 2,
    "mid_block_scale_factor": 1,
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "norm_eps": 1e-05,
    "norm_num_groups": 32,
    "out_channels": 4,
    "projection_class_embeddings_input_dim": 2816,
    "sample_size": 128,
    "transformer_layers_per_block": [1, 2, 10],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "use_linear_projection": True,
}
SD_VAE = {  # identical in SD 1.5 and SDXL (sample_size aside)
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "in_channels": 3,
    "latent_channels": 4,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
}
CLIP_L_TEXT = {  # openai/clip-vit-large-patch14's text tower (SD 1.5's and SDXL's first text encoder)
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "projection_dim": 768,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "vocab_size": 49408,
}
CLIP_BIGG_TEXT = {  # SDXL's text_encoder_2 (OpenCLIP ViT-bigG text tower, with projection)
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "projection_dim": 1280,
    "max_position_embeddings": 77,
    "hidden_act": "gelu",
    "vocab_size": 49408,
}
TEXT_TOKENS = 77
VAE_SCALE = 8  # latents per pixel side of the SD VAEs (2 ** (len(block_out_channels) - 1))


@dataclass(frozen=True)
class Network:
    """One countable call: how to build the module and its inputs at `rows` rows and a pixel size."""

    build: Callable[[], Any]
    inputs: Callable[[int, int, int], dict[str, Any]]  # (rows, height, width) -> keyword inputs
    spatial: bool = True
    call: Callable[[Any, dict[str, Any]], Any] = lambda module, inputs: module(**inputs)


@dataclass(frozen=True)
class Count:
    flop: float  # FLOP of the call
    weight_bytes: int  # FP16 bytes of the parameters the call read
    parameters: int  # parameters of the modules the call ran
    activation_bytes: int  # FP16 bytes written by every non-view op (unfused traffic; information only)


def _meta(arrays: Mapping[str, Any]) -> dict[str, Any]:
    import torch

    return {k: torch.from_numpy(np.ascontiguousarray(v)).to("meta") for k, v in arrays.items()}


def count_call(network: Network, rows: int, height: int, width: int, *, device: str = "meta") -> Count:
    """Count one call of `network` with `rows` rows at `height` x `width` px (module built on `device`)."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    aten = torch.ops.aten

    def cpu_sdpa(query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)

    class ActivationWrites(TorchDispatchMode):
        """FP16 bytes of every op output that is not a view of its input."""

        def __init__(self) -> None:
            super().__init__()
            self.bytes = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            out = func(*args, **(kwargs or {}))
            returns = func._schema.returns
            if returns and returns[0].alias_info is None:
                for tensor in out if isinstance(out, tuple | list) else (out,):
                    if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                        self.bytes += tensor.numel() * FP16_BYTES
            return out

    with torch.device(device):
        module = network.build().eval()
    called: dict[int, Any] = {}
    looked_up: dict[int, int] = {}

    def record(mod: Any, args: Any) -> None:
        called[id(mod)] = mod
        if isinstance(mod, torch.nn.Embedding) and args:
            looked_up[id(mod)] = min(mod.num_embeddings, int(args[0].numel()))

    hooks = [m.register_forward_pre_hook(record) for m in module.modules()]
    inputs = network.inputs(rows, height, width)
    inputs = _meta(inputs) if device == "meta" else {k: torch.from_numpy(v) for k, v in inputs.items()}
    counter = FlopCounterMode(
        display=False,
        custom_mapping={aten._scaled_dot_product_flash_attention_for_cpu: cpu_sdpa},
    )
    writes = ActivationWrites()
    try:
        with torch.no_grad(), counter, writes:
            network.call(module, inputs)
    finally:
        for hook in hooks:
            hook.remove()
    parameters = read = 0
    for key, mod in called.items():
        own = sum(p.numel() for p in mod.parameters(recurse=False))
        parameters += own
        if key in looked_up:  # a gather reads only the rows it looks up
            read += own * looked_up[key] // mod.num_embeddings
        else:
            read += own
    return Count(float(counter.get_total_flops()), read * FP16_BYTES, parameters, writes.bytes)


def fit_pixels(counts: Mapping[int, float]) -> list[float]:
    """Exact c0 + c1*P + c2*P^2 through three (pixel count -> FLOP) points; [c, 0, 0] when all agree."""
    pixels = sorted(counts)
    values = [counts[p] for p in pixels]
    if len(pixels) != 3:
        raise ValueError(f"need counts at three sizes, got {len(pixels)}")
    if max(values) == min(values):
        return [float(values[0]), 0.0, 0.0]
    scale = float(pixels[-1])  # solve in P / scale: a well-conditioned 3x3 system
    x = np.array(pixels, dtype=np.float64) / scale
    c = np.linalg.solve(np.vander(x, 3, increasing=True), np.array(values, dtype=np.float64))
    # A term that contributes less than rounding at every size is zero (the MoVQ has no constant term).
    c[np.abs(c) < ROUNDING * max(values)] = 0.0
    return [float(c[0]), float(c[1] / scale), float(c[2] / scale**2)]


def evaluate(coefficients: list[float], height: int, width: int) -> float:
    pixels = float(height) * float(width)
    return coefficients[0] + coefficients[1] * pixels + coefficients[2] * pixels * pixels


# ---------------------------------------------------------------------------------------------- networks


def preset_networks(preset_name: str) -> dict[str, Network]:
    """Every registry network of a preset, built and called exactly as it is exported."""
    from diffusers import PriorTransformer, UNet2DConditionModel, VQModel
    from kandinsky_core.components import COMPONENTS
    from kandinsky_export.controlnet import controlnet_unet_config
    from kandinsky_export.modules import build_wrapper, sample_inputs
    from kandinsky_export.presets import PRESETS
    from transformers import (
        CLIPTextConfig,
        CLIPTextModelWithProjection,
        CLIPVisionConfig,
        CLIPVisionModelWithProjection,
    )

    preset = PRESETS[preset_name]
    dims = preset_dims(preset_name)
    vocab = preset.text_encoder.get("vocab_size", CLIPTextConfig().vocab_size)
    text = {"vocab_size": vocab, **preset.text_encoder}
    inpaint_unet = {**preset.unet, "in_channels": dims.inpaint_in_channels}
    models: dict[str, Callable[[], Any]] = {
        "text_encoder": lambda: CLIPTextModelWithProjection(CLIPTextConfig(**text)),
        "image_encoder": lambda: CLIPVisionModelWithProjection(CLIPVisionConfig(**preset.image_encoder)),
        "prior": lambda: PriorTransformer(**preset.prior),
        "unet": lambda: UNet2DConditionModel(**preset.unet),
        "unet_inpaint": lambda: UNet2DConditionModel(**inpaint_unet),
        "unet_controlnet": lambda: UNet2DConditionModel(**controlnet_unet_config(preset.unet)),
        "movq_encoder": lambda: VQModel(**preset.movq),
        "movq_decoder": lambda: VQModel(**preset.movq),
    }

    def network(name: str) -> Network:
        spec = COMPONENTS[name]
        spatial = any("height" in t.shape or "latent_height" in t.shape for t in spec.inputs)
        return Network(
            build=lambda: build_wrapper(name, models[name]()),
            inputs=lambda rows, h, w: sample_inputs(
                spec, dims, batch=rows, height=h, width=w, seed=0, vocab_size=vocab
            ),
            spatial=spatial,
        )

    return {name: network(name) for name in models}


def preset_dims(preset_name: str) -> Any:
    """The `ModelDims` a preset's checkpoint has (as `Checkpoint.dims` reads them from its configs)."""
    from kandinsky_core.components import ModelDims
    from kandinsky_export.presets import PRESETS

    p = PRESETS[preset_name]
    return ModelDims(
        text_seq_len=TEXT_TOKENS,
        text_hidden=p.text_encoder["hidden_size"],
        text_embed=p.text_encoder["projection_dim"],
        embed_dim=p.prior["embedding_dim"],
        image_size=p.image_encoder["image_size"],
        latent_channels=p.movq["latent_channels"],
        unet_out_channels=p.unet["out_channels"],
        inpaint_in_channels=2 * p.unet["in_channels"] + 1,
        movq_scale_factor=2 ** (len(p.movq["block_out_channels"]) - 1),
        unet_downscale=2 ** (len(p.unet["block_out_channels"]) - 1),
    )


def _text_tokens(rows: int, height: int, width: int) -> dict[str, Any]:
    return {"input_ids": np.ones((rows, TEXT_TOKENS), dtype=np.int64)}


def _zeros(shape: tuple[int, ...]) -> np.ndarray:
    return np.zeros(shape, dtype=np.float32)


def stable_diffusion_networks(xl: bool) -> dict[str, Network]:
    """SD 1.5 (`xl=False`) or SDXL base: text encoder(s), UNet and VAE decoder, as their pipelines call them."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet_config = SDXL_UNET if xl else SD15_UNET
    context = unet_config["cross_attention_dim"]

    def unet_inputs(rows: int, height: int, width: int) -> dict[str, Any]:
        inputs = {
            "sample": _zeros((rows, 4, height // VAE_SCALE, width // VAE_SCALE)),
            "timestep": np.full((rows,), 999, dtype=np.int64),
            "encoder_hidden_states": _zeros((rows, TEXT_TOKENS, context)),
        }
        if xl:
            inputs["text_embeds"] = _zeros((rows, CLIP_BIGG_TEXT["projection_dim"]))
            inputs["time_ids"] = _zeros((rows, 6))
        return inputs

    def unet_call(module: Any, inputs: dict[str, Any]) -> Any:
        added = {k: inputs.pop(k) for k in ("text_embeds", "time_ids") if k in inputs}
        return module(**inputs, added_cond_kwargs=added or None, return_dict=False)

    networks = {
        "text_encoder": Network(
            build=lambda: CLIPTextModel(CLIPTextConfig(**CLIP_L_TEXT)), inputs=_text_tokens, spatial=False
        ),
        "unet": Network(
            build=lambda: UNet2DConditionModel(**unet_config), inputs=unet_inputs, call=unet_call
        ),
        "vae_decoder": Network(
            build=lambda: AutoencoderKL(**SD_VAE),
            inputs=lambda rows, h, w: {"z": _zeros((rows, 4, h // VAE_SCALE, w // VAE_SCALE))},
            call=lambda module, inputs: module.decode(**inputs, return_dict=False),
        ),
    }
    if xl:
        networks["text_encoder_2"] = Network(
            build=lambda: CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG_TEXT)),
            inputs=_text_tokens,
            spatial=False,
        )
    return networks


ARCHITECTURES: dict[str, tuple[str, Callable[[], dict[str, Network]]]] = {
    "released": (
        "Kandinsky 2.2 as released (the `full` preset of export/kandinsky_export/presets.py; "
        "configs in shared/kandinsky22.md)",
        lambda: preset_networks(RELEASED_PRESET),
    ),
    "sd15": (
        "Stable Diffusion 1.5 (runwayml/stable-diffusion-v1-5 configs), for calibration only",
        lambda: stable_diffusion_networks(xl=False),
    ),
    "sdxl": (
        "SDXL base 1.0 (stabilityai/stable-diffusion-xl-base-1.0 configs), for calibration only",
        lambda: stable_diffusion_networks(xl=True),
    ),
}


def count_architecture(networks: Mapping[str, Network], progress: Any = None) -> dict[str, Any]:
    """Per network: FLOP per row at every side in `SIDES` (batch 1), the fit, the check, weights."""
    components: dict[str, Any] = {}
    for component, network in networks.items():
        sides = SIDES if network.spatial else SIDES[:1]
        counts = {}
        for side in sides:
            counts[side] = count_call(network, 1, side, side)
            if progress is not None:
                progress.update(1)
        flop_by_pixels = {side * side: c.flop for side, c in counts.items()}
        if not network.spatial:
            flop_by_pixels = {side * side: counts[SIDES[0]].flop for side in SIDES}
        coefficients = fit_pixels(flop_by_pixels)
        record: dict[str, Any] = {
            "flop_per_row": coefficients,
            "counted_flop_per_row": {str(side): flop_by_pixels[side * side] for side in SIDES},
            "parameters": counts[SIDES[0]].parameters,
            "weight_bytes": counts[SIDES[0]].weight_bytes,
            "activation_bytes_per_row": {str(side): c.activation_bytes for side, c in counts.items()},
        }
        if network.spatial:
            check = count_call(network, 1, *CHECK_SIZE)
            predicted = evaluate(coefficients, *CHECK_SIZE)
            record["check"] = {
                "size": list(CHECK_SIZE),
                "counted_flop_per_row": check.flop,
                "relative_error": abs(predicted - check.flop) / check.flop,
            }
            if progress is not None:
                progress.update(1)
        components[component] = record
    return components


def count_all(architectures: list[str]) -> dict[str, dict[str, Any]]:
    """Count every listed architecture (a few seconds each on the meta device)."""
    built = {name: ARCHITECTURES[name][1]() for name in architectures}
    total = sum(
        (len(SIDES) + 1) if net.spatial else 1 for networks in built.values() for net in networks.values()
    )
    result = {}
    with tqdm(total=total, desc="counting FLOPs", unit="call") as progress:
        for name, networks in built.items():
            result[name] = count_architecture(networks, progress)
    return result


# ------------------------------------------------------------------------------------------- data file


def update_costs(
    data: dict[str, Any], counted: Mapping[str, Mapping[str, Any]], command: str
) -> dict[str, Any]:
    """The data file with fresh counts, each run's counted FLOP and fraction of peak, and the efficiencies."""
    from kandinsky_core.gpu_costs import calibrated_efficiencies, run_flop, run_fraction_of_peak

    data = json.loads(json.dumps(data))  # a deep copy
    for name, components in counted.items():
        arch = data["architectures"].setdefault(name, {})
        arch["description"] = ARCHITECTURES[name][0]
        arch["counted_sides"] = list(SIDES)
        arch["components"] = dict(components)
        if name == "released":
            arch["aliases"] = dict(RELEASED_ALIASES)
    if counted:
        data["counted"] = {
            "command": command,
            "date": time.strftime("%Y-%m-%d", time.gmtime()),
            "versions": _versions(),
        }
    for run in data["calibration"]["runs"]:
        run["counted_flop"] = run_flop(run, data)
        run["fraction_of_peak"] = round(run_fraction_of_peak(run, data), 4)
    runs = data["calibration"]["runs"]
    for gpu, efficiency in calibrated_efficiencies(data).items():
        data["gpus"][gpu]["efficiency"] = round(efficiency, 3)
        own = [run for run in runs if run.get("gpu_key") == gpu] or runs
        mean_of = " + ".join(f"{run['name']} {run['fraction_of_peak']:.3f}" for run in own)
        kind = "its own runs" if own is not runs else "every run (no run of its own)"
        data["gpus"][gpu]["efficiency_derivation"] = f"mean fraction of dense FP16 peak of {kind}: {mean_of}"
    return data


def _versions() -> dict[str, str]:
    import importlib.metadata

    return {p: importlib.metadata.version(p) for p in ("torch", "diffusers", "transformers")}


def table(data: Mapping[str, Any]) -> str:
    """Markdown: FLOP per row by size, weights, and the calibration runs."""
    lines = []
    for name, arch in data["architectures"].items():
        lines += [
            f"### {name}: {arch.get('description', '')}",
            "",
            "| component | GFLOP/row 512² | 768² | 1024² | fit c0 | c1 (/px) | c2 (/px²) | params (M) | "
            "FP16 weights read (MB) | fit error at 640x384 |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for component, c in arch["components"].items():
            counted = [c["counted_flop_per_row"][str(s)] / 1e9 for s in SIDES]
            c0, c1, c2 = c["flop_per_row"]
            error = f"{c['check']['relative_error']:.1e}" if "check" in c else "-"
            lines.append(
                f"| {component} | " + " | ".join(f"{v:,.1f}" for v in counted) + f" | {c0:.4g} | {c1:.4g} | "
                f"{c2:.4g} | {c['parameters'] / 1e6:,.1f} | {c['weight_bytes'] / 1e6:,.1f} | {error} |"
            )
        lines.append("")
    lines += [
        "### calibration runs",
        "",
        "| run | GPU | seconds | counted TFLOP | dense FP16 peak (TFLOP/s) | fraction of peak |",
        "|---|---|---|---|---|---|",
    ]
    for run in data["calibration"]["runs"]:
        lines.append(
            f"| {run['name']} | {run['gpu']} | {run['seconds']} | {run['counted_flop'] / 1e12:.2f} | "
            f"{run['peak_flops'] / 1e12:.1f} | {run['fraction_of_peak']:.3f} |"
        )
    lines += ["", "| GPU | efficiency |", "|---|---|"]
    lines += [f"| {key} ({gpu['name']}) | {gpu['efficiency']} |" for key, gpu in data["gpus"].items()]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="kandinsky-bench flops",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--costs", type=Path, help="the data file to start from (default: the packaged gpu_costs.json)"
    )
    parser.add_argument("--output", type=Path, help="write the updated data file here")
    parser.add_argument(
        "--architectures", nargs="+", choices=sorted(ARCHITECTURES), default=list(ARCHITECTURES)
    )
    parser.add_argument(
        "--calibrate-only",
        action="store_true",
        help="count nothing: re-derive the runs' fractions and the efficiencies from the file's counts",
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    from kandinsky_core.gpu_costs import load_costs

    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    command = "kandinsky-bench flops " + " ".join(sys.argv[1:] if argv is None else argv)
    data = load_costs(args.costs)
    counted = {} if args.calibrate_only else count_all(args.architectures)
    data = update_costs(data, counted, command)
    print(table(data))
    if args.output:
        args.output.write_text(json.dumps(data, indent=2) + "\n")
        print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
