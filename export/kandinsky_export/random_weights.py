"""Random weights that make parity tests meaningful: the presets and their optional parts use them."""

from __future__ import annotations

import torch


def randomize_untrained_parameters(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Give random values to tensors that default initialisation leaves constant.

    PriorTransformer starts with zero positional/prd embeddings and zero clip_mean/clip_std, which would
    make its output constant and any parity test vacuous. Constant tensors get small noise; clip_std,
    a scale, gets values in [0.5, 1.5].
    """
    with torch.no_grad():
        for name, tensor in list(module.named_parameters()) + list(module.named_buffers()):
            if not tensor.is_floating_point() or tensor.numel() < 2:
                continue
            if name.endswith("clip_std"):
                tensor.copy_(0.5 + torch.rand(tensor.shape, generator=generator))
            elif bool((tensor == tensor.flatten()[0]).all()):
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
