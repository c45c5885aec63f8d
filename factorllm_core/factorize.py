"""Model surgery: replace every gated FFN of a decoder-only model by a FactorizedFFN.

`build_factorized_ffn` is a pure builder for one layer; `factorize` swaps modules
in place (like peft's `_replace_module`) and returns a report of what changed.
`save_factorized` / `load_factorized` round-trip weights plus the factor config.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from .config import FactorConfig
from .experts import Experts
from .ffn import FactorizedFFN, factorized_layers
from .partition import PARTITIONS
from .registry import Registry
from .router import Router


@dataclass(frozen=True)
class GatedFFNWeights:
    """The pieces of a gated FFN `down(act(gate(x)) * up(x))`."""

    gate_weight: torch.Tensor  # (I, H)
    up_weight: torch.Tensor  # (I, H)
    down_weight: torch.Tensor  # (H, I)
    act_fn: nn.Module
    gate_bias: torch.Tensor | None = None
    up_bias: torch.Tensor | None = None
    down_bias: torch.Tensor | None = None


# An adapter recognises one FFN family and extracts its weights, or returns None.
FFNAdapter = Callable[[nn.Module], GatedFFNWeights | None]
FFN_ADAPTERS: Registry[FFNAdapter] = Registry("FFN adapter")


@FFN_ADAPTERS.register("gate_up_down")
def gate_up_down(module: nn.Module) -> GatedFFNWeights | None:
    """Llama, Qwen2, Mistral, Gemma/Gemma3 MLPs: gate_proj, up_proj, down_proj, act_fn."""
    parts = [getattr(module, n, None) for n in ("gate_proj", "up_proj", "down_proj")]
    if not all(isinstance(p, nn.Linear) for p in parts) or not hasattr(module, "act_fn"):
        return None
    gate, up, down = parts
    return GatedFFNWeights(gate.weight.data, up.weight.data, down.weight.data, module.act_fn,
                           _data(gate.bias), _data(up.bias), _data(down.bias))


def _data(p: nn.Parameter | None) -> torch.Tensor | None:
    return None if p is None else p.data


def match_ffn(module: nn.Module) -> GatedFFNWeights | None:
    for name in FFN_ADAPTERS:
        weights = FFN_ADAPTERS.get(name)(module)
        if weights is not None:
            return weights
    return None


def build_factorized_ffn(weights: GatedFFNWeights, config: FactorConfig, layer_seed: int,
                         neuron_index: torch.Tensor | None = None) -> FactorizedFFN:
    """Pure builder: dense gated-FFN weights -> FactorizedFFN on the same device and dtype."""
    ffn_width, hidden = weights.gate_weight.shape
    config.check_ffn_width(ffn_width)
    if neuron_index is None:
        partition = PARTITIONS.get(config.partition, "partition")
        neuron_index = partition(weights.gate_weight, weights.up_weight, config.n_experts, layer_seed)
    neuron_index = neuron_index.to(weights.gate_weight.device)
    experts = Experts(weights.gate_weight, weights.up_weight, weights.down_weight, neuron_index,
                      weights.act_fn, weights.gate_bias, weights.up_bias)
    router = Router(hidden, config.n_experts, config.n_routers, config.top_k,
                    config.router_mode, config.combine, seed=layer_seed)
    _init_router(router, layer_seed)
    router.to(device=weights.gate_weight.device, dtype=weights.gate_weight.dtype)
    return FactorizedFFN(config, router, experts, weights.down_bias)


def _init_router(router: Router, seed: int) -> None:
    """nn.Linear's default init (uniform +-1/sqrt(fan_in)), but seeded per layer."""
    generator = torch.Generator().manual_seed(seed)
    bound = 1.0 / math.sqrt(router.gate.in_features)
    with torch.no_grad():
        for p in (router.gate.weight, router.gate.bias):
            p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=generator))


@dataclass(frozen=True)
class FactorReport:
    """What `factorize` changed."""

    setting: str  # e.g. 1R4E2K
    layers: list[str]
    hidden_size: int
    ffn_width: int
    n_experts: int
    top_k: int
    n_routers: int
    params_before: int
    params_after: int
    router_params: int
    ffn_params: int  # all experts of all layers (== the dense FFN parameters)
    active_ffn_params_per_token: int  # K/N of ffn_params, plus the routers

    def to_dict(self) -> dict:
        return asdict(self)


def factorize(model: nn.Module, config: FactorConfig, *, _placeholder_partition: bool = False) -> FactorReport:
    """Replace, in place, every FFN that an adapter recognises. Raises if none is found."""
    params_before = _count(model)
    targets = [(name, module, w) for name, module in model.named_modules()
               if (w := match_ffn(module)) is not None]
    if not targets:
        raise ValueError(f"no gated FFN found in {type(model).__name__}; known adapters: "
                         f"{FFN_ADAPTERS.names()}")
    build_config = replace(config, partition="contiguous") if _placeholder_partition else config
    for layer_number, (name, module, weights) in enumerate(targets):
        config.check_ffn_width(weights.gate_weight.shape[0], where=name)
        new = build_factorized_ffn(weights, build_config, layer_seed=config.seed + layer_number)
        new.config = config
        new.train(module.training)  # a fresh nn.Module is in training mode; keep the model's
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    layers = factorized_layers(model)
    ffn_width, hidden = targets[0][2].gate_weight.shape
    router_params = sum(_count(layer.router) for _, layer in layers)
    ffn_params = sum(_count(layer.experts) + _count_opt(layer.down_bias) for _, layer in layers)
    return FactorReport(config.name, [n for n, _ in layers], hidden, ffn_width, config.n_experts,
                        config.top_k, config.n_routers, params_before, _count(model),
                        router_params, ffn_params,
                        ffn_params * config.top_k // config.n_experts + router_params)


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_opt(p: torch.Tensor | None) -> int:
    return 0 if p is None else p.numel()


def factor_config_of(model: nn.Module) -> FactorConfig:
    layers = factorized_layers(model)
    if not layers:
        raise ValueError("model has no FactorizedFFN layers; call factorize() first")
    return layers[0][1].config


FACTOR_CONFIG_FILE = "factor_config.json"
WEIGHTS_FILE = "model.safetensors"


def save_factorized(model: nn.Module, directory: str | Path) -> Path:
    """Write the base model config, the factor config and all weights to `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(directory)
    meta = {"factor_config": factor_config_of(model).to_dict(),
            "dtype": str(next(model.parameters()).dtype).removeprefix("torch.")}
    (directory / FACTOR_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    save_model(model, str(directory / WEIGHTS_FILE))
    return directory


def load_factorized(directory: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild a model saved by `save_factorized`: same weights, same logits."""
    from transformers import AutoConfig, AutoModelForCausalLM

    directory = Path(directory)
    meta = json.loads((directory / FACTOR_CONFIG_FILE).read_text())
    config = FactorConfig.from_dict(meta["factor_config"])
    model_config = AutoConfig.from_pretrained(directory)
    model = AutoModelForCausalLM.from_config(model_config, dtype=getattr(torch, meta["dtype"]))
    # The saved neuron_index buffers overwrite the placeholder partition on load.
    factorize(model, config, _placeholder_partition=True)
    load_model(model, str(directory / WEIGHTS_FILE), device=str(device))
    return model.to(device).eval()


class GatedFFN(nn.Module):
    """A plain dense gated FFN `down(act(gate(x)) * up(x))`: what `defactorize` puts back."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def merge_experts(layer: FactorizedFFN) -> GatedFFN:
    """Pure builder: the dense FFN equal to the sum of all of `layer`'s experts (their
    current weights, trained or not), neurons back in their original order."""
    experts = layer.experts
    order = experts.neuron_index.flatten().argsort()  # inverse of the partition

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        module = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None,
                           device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    rows = lambda w: w.detach().reshape(-1, w.shape[-1])[order]  # (N, I/N, H) -> (I, H)
    gate = linear(rows(experts.gate_weight), None if experts.gate_bias is None else experts.gate_bias.detach().flatten()[order])
    up = linear(rows(experts.up_weight), None if experts.up_bias is None else experts.up_bias.detach().flatten()[order])
    down_weight = experts.down_weight.detach().permute(1, 0, 2).reshape(experts.down_weight.shape[1], -1)[:, order]
    down = linear(down_weight, None if layer.down_bias is None else layer.down_bias.detach())
    return GatedFFN(gate, up, down, experts.act_fn)


def defactorize(model: nn.Module) -> nn.Module:
    """In place: every FactorizedFFN back to a dense FFN (all experts, merged). Used to
    time a same-sized dense model beside a factorized one; returns `model`."""
    for name, layer in factorized_layers(model):
        parent_name, _, child = name.rpartition(".")
        dense = merge_experts(layer)
        dense.train(layer.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model
