"""Calibration: the dense model's FFN inputs on a few thousand tokens, cached per layer.

One forward pass of the dense model, no gradients. Every gated FFN's input is
kept (tokens, hidden) in float32 on the CPU: 4,096 tokens of SmolLM2-135M (30
layers x 576) take 283 MB. From these inputs `factorize` derives, per layer and
without touching the model again, what the options below need:
  - the neurons' activations (coact partition, shared-expert choice);
  - each expert's mean output (the mean_comp combine);
  - pseudo-labels to fit the router to (router_init: fit);
  - the dense FFN's output (the layer-wise stage).
Each layer sees the inputs of the dense model, not of the partly factorized one
(as CMoE and LLaMA-MoE v2 do).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass
class Calibration:
    """inputs: FFN module name -> (tokens, hidden) float32 on the CPU."""

    inputs: dict[str, torch.Tensor]
    tokens: int


@torch.no_grad()
def calibrate(model: nn.Module, sequences: list[torch.Tensor], device: str | torch.device) -> Calibration:
    """Run the dense model on each sequence (1-D token ids, one forward each) and keep
    every gated FFN's input. Deterministic: the same sequences give the same tensors."""
    from .factorize import match_ffn  # factorize imports this module

    names = [name for name, module in model.named_modules() if match_ffn(module) is not None]
    if not names:
        raise ValueError(f"no gated FFN found in {type(model).__name__} to calibrate")
    if not sequences:
        raise ValueError("calibration needs at least one sequence of tokens")
    captured: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    hooks = [model.get_submodule(name).register_forward_hook(_keep_input(captured[name])) for name in names]
    was_training = model.training
    model.eval()
    try:
        for ids in sequences:
            model(input_ids=ids[None].to(device), use_cache=False)
    finally:
        for hook in hooks:
            hook.remove()
        model.train(was_training)
    inputs = {name: torch.cat(parts) for name, parts in captured.items()}
    return Calibration(inputs, tokens=sum(len(s) for s in sequences))


def _keep_input(store: list[torch.Tensor]):
    def hook(module, args, output):
        x = args[0]
        store.append(x.detach().reshape(-1, x.shape[-1]).float().cpu())

    return hook
