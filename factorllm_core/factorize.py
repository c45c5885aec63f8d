"""Model surgery: replace every gated FFN of a decoder-only model by a FactorizedFFN.

`build_factorized_ffn` is a pure builder for one layer; `factorize` swaps modules
in place (like peft's `_replace_module`) and returns a report of what changed.
`save_factorized` / `load_factorized` round-trip weights plus the factor config;
`save_trained_ffns` / `load_trained_ffns` keep only what training changes (the
factorized layers) and rebuild the model from its unchanged source model.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn

from .calibration import Calibration
from .config import FactorConfig
from .experts import Experts
from .ffn import FactorizedFFN, factorized_layers
from .partition import PARTITIONS, shared_neurons
from .registry import Registry
from .router import ROUTER_INITS, Router


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
    return GatedFFNWeights(
        gate.weight.data,
        up.weight.data,
        down.weight.data,
        module.act_fn,
        _data(gate.bias),
        _data(up.bias),
        _data(down.bias),
    )


def _data(p: nn.Parameter | None) -> torch.Tensor | None:
    return None if p is None else p.data


def match_ffn(module: nn.Module) -> GatedFFNWeights | None:
    """The weights of the first adapter, in registration order, that recognises `module`."""
    for name in FFN_ADAPTERS.in_order():
        weights = FFN_ADAPTERS.get(name)(module)
        if weights is not None:
            return weights
    return None


def build_factorized_ffn(
    weights: GatedFFNWeights,
    config: FactorConfig,
    layer_seed: int,
    neuron_index: torch.Tensor | None = None,
    calibration_inputs: torch.Tensor | None = None,
    placeholder: bool = False,
) -> FactorizedFFN:
    """Pure builder: dense gated-FFN weights -> FactorizedFFN on the same device and dtype.

    calibration_inputs: (T, H) the dense FFN's inputs on calibration tokens; required
        when `config.needs_calibration`. `fit_report` on the result says how the
        router fit went (router_init: fit).
    placeholder: build the right shapes without calibration (the partition, shared
        neurons, means and router are then overwritten by a saved state dict).
    """
    ffn_width, hidden = weights.gate_weight.shape
    config.check_ffn_width(ffn_width)
    if config.needs_calibration and calibration_inputs is None and not placeholder:
        raise ValueError(
            f"{config.name} ({', '.join(config.calibrated_options())}) needs calibration inputs: "
            "pass a Calibration to factorize (harness: train.calibration_tokens > 0)"
        )
    device = weights.gate_weight.device
    x = None if placeholder or calibration_inputs is None else calibration_inputs.to(device, weights.gate_weight.dtype)
    activations = None if x is None else _activations(weights, x)
    width = ffn_width // (config.n_experts + config.n_shared)
    shared_index, routed = None, torch.arange(ffn_width)
    if config.n_shared:
        shared_index = (
            torch.arange(config.n_shared * width)
            if activations is None
            else shared_neurons(activations, weights.down_weight, config.n_shared * width)
        )
        routed = routed[~torch.isin(routed, shared_index)]
    if neuron_index is None:
        partition = PARTITIONS.get("contiguous" if placeholder else config.partition, "partition")

        def rows(w):
            return w[routed.to(device)]

        groups = partition(
            rows(weights.gate_weight),
            rows(weights.up_weight),
            config.n_experts,
            layer_seed,
            None if activations is None else activations[:, routed.to(device)],
        )
        neuron_index = routed[groups.cpu()]
    neuron_index = neuron_index.to(device)
    experts = Experts(
        weights.gate_weight,
        weights.up_weight,
        weights.down_weight,
        neuron_index,
        weights.act_fn,
        weights.gate_bias,
        weights.up_bias,
    )
    shared = (
        None
        if shared_index is None
        else Experts(
            weights.gate_weight,
            weights.up_weight,
            weights.down_weight,
            shared_index[None].to(device),
            weights.act_fn,
            weights.gate_bias,
            weights.up_bias,
        )
    )
    router = Router(
        hidden,
        config.n_experts,
        config.n_routers,
        config.top_k,
        config.router_mode,
        config.combine,
        seed=layer_seed,
        bias=config.router_bias,
    )
    layer = FactorizedFFN(config, router, experts, weights.down_bias, shared)
    labels = None
    if x is not None:
        with torch.no_grad():
            outputs = torch.cat([experts.all_outputs(chunk) for chunk in x.split(1024)])  # (T, N, H)
            if layer.unchosen_mean is not None:
                layer.unchosen_mean.copy_(outputs.mean(dim=0))
            if config.router_init != "random":
                labels = layer.pseudo_label(outputs.float(), config.top_k, layer.label_context())
    init = ROUTER_INITS.get("random" if placeholder else config.router_init, "router_init")
    layer.fit_report = init(
        router, None if x is None else x.float().cpu(), None if labels is None else labels.cpu(), layer_seed
    )
    router.to(device=device, dtype=weights.gate_weight.dtype)
    return layer


def _activations(weights: GatedFFNWeights, x: torch.Tensor) -> torch.Tensor:
    """(T, I): act(gate(x)) * up(x), the neurons' activations, in float32."""
    with torch.no_grad():
        gate = torch.nn.functional.linear(x, weights.gate_weight, weights.gate_bias)
        up = torch.nn.functional.linear(x, weights.up_weight, weights.up_bias)
        return (weights.act_fn(gate) * up).float()


@dataclass(frozen=True)
class FactorReport:
    """What `factorize` changed."""

    setting: str  # e.g. 1R4E2K, 1R3E1K1S
    layers: list[str]
    hidden_size: int
    ffn_width: int
    n_experts: int
    top_k: int
    n_routers: int
    params_before: int
    params_after: int
    router_params: int
    ffn_params: int  # all experts of all layers, shared ones included (== the dense FFN parameters)
    active_ffn_params_per_token: int  # (K + n_shared)/(N + n_shared) of ffn_params, plus the routers
    n_shared: int = 0
    active_ffn_fraction: float = 0.0  # (K + n_shared)/(N + n_shared): the active FFN width
    calibration_tokens: int = 0
    router_fit: dict | None = None  # router_init: fit, means over layers of `fitted_init`'s report

    def to_dict(self) -> dict:
        return asdict(self)


def factorize(
    model: nn.Module,
    config: FactorConfig,
    calibration: Calibration | None = None,
    *,
    _placeholder_partition: bool = False,
) -> FactorReport:
    """Replace, in place, every FFN that an adapter recognises. Raises if none is found.
    `calibration` (from `calibrate` on this dense model) is required when
    `config.needs_calibration`."""
    params_before = _count(model)
    targets = [(name, module, w) for name, module in model.named_modules() if (w := match_ffn(module)) is not None]
    if not targets:
        raise ValueError(f"no gated FFN found in {type(model).__name__}; known adapters: {FFN_ADAPTERS.names()}")
    if calibration is not None and set(calibration.inputs) != {name for name, _, _ in targets}:
        raise ValueError("the calibration was taken on another model: its FFN names differ from this model's")
    fits = []
    for layer_number, (name, module, weights) in enumerate(targets):
        config.check_ffn_width(weights.gate_weight.shape[0], where=name)
        new = build_factorized_ffn(
            weights,
            config,
            layer_seed=config.seed + layer_number,
            calibration_inputs=None if calibration is None else calibration.inputs[name],
            placeholder=_placeholder_partition,
        )
        new.train(module.training)  # a fresh nn.Module is in training mode; keep the model's
        if new.fit_report:
            fits.append(new.fit_report)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    layers = factorized_layers(model)
    ffn_width, hidden = targets[0][2].gate_weight.shape
    router_params = sum(_count(layer.router) for _, layer in layers)
    ffn_params = sum(
        _count(layer.experts) + _count_opt(layer.shared) + _count_opt(layer.down_bias) for _, layer in layers
    )
    active = config.active_fraction
    router_fit = {key: sum(f[key] for f in fits) / len(fits) for key in fits[0]} if fits else None
    return FactorReport(
        config.name,
        [n for n, _ in layers],
        hidden,
        ffn_width,
        config.n_experts,
        config.top_k,
        config.n_routers,
        params_before,
        _count(model),
        router_params,
        ffn_params,
        round(ffn_params * active) + router_params,
        config.n_shared,
        active,
        0 if calibration is None else calibration.tokens,
        router_fit,
    )


def _count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def _count_opt(p: torch.Tensor | nn.Module | None) -> int:
    return 0 if p is None else _count(p) if isinstance(p, nn.Module) else p.numel()


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
    meta = {
        "factor_config": factor_config_of(model).to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
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


TRAINED_FFNS_FILE = "ffns.safetensors"


def save_trained_ffns(model: nn.Module, directory: str | Path) -> Path:
    """Write the factorized layers only (routers, experts, partitions, shared experts,
    calibration means) and the factor config to `directory`. Training changes nothing
    else (embeddings, attention, norms and head are frozen), so the source model plus
    this folder give the trained model back exactly (`load_trained_ffns`), at a fraction
    of a whole model's size."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {
        f"{name}.{key}": value.detach().contiguous()
        for name, layer in factorized_layers(model)
        for key, value in layer.state_dict().items()
    }
    save_file(tensors, str(directory / TRAINED_FFNS_FILE))
    meta = {
        "factor_config": factor_config_of(model).to_dict(),
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
    }
    (directory / FACTOR_CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    return directory


def load_trained_ffns(model: nn.Module, directory: str | Path) -> nn.Module:
    """Factorize `model`, the same dense source model the trained one started from, in
    place, and load the trained layers saved by `save_trained_ffns`. Every factorized
    tensor must be in the file, and nothing else."""
    directory = Path(directory)
    meta = json.loads((directory / FACTOR_CONFIG_FILE).read_text())
    factorize(model, FactorConfig.from_dict(meta["factor_config"]), _placeholder_partition=True)
    tensors = load_file(str(directory / TRAINED_FFNS_FILE))
    expected = {f"{name}.{key}" for name, layer in factorized_layers(model) for key in layer.state_dict()}
    if set(tensors) != expected:
        raise ValueError(
            f"{directory / TRAINED_FFNS_FILE} does not match this model's factorized layers "
            f"(missing {sorted(expected - set(tensors))[:3]}, unexpected {sorted(set(tensors) - expected)[:3]})"
        )
    device = next(model.parameters()).device
    model.load_state_dict({k: v.to(device) for k, v in tensors.items()}, strict=False)
    return model.eval()


class GatedFFN(nn.Module):
    """A plain dense gated FFN `down(act(gate(x)) * up(x))`: what `defactorize` puts back."""

    def __init__(self, gate: nn.Linear, up: nn.Linear, down: nn.Linear, act_fn: nn.Module):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj, self.act_fn = gate, up, down, act_fn

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act_fn(self.gate_proj(x)) * self.up_proj(x))


def merge_experts(layer: FactorizedFFN) -> GatedFFN:
    """Pure builder: the dense FFN equal to the sum of all of `layer`'s experts, shared
    ones included (their current weights, trained or not), neurons back in their
    original order."""
    parts = [layer.experts] + ([layer.shared] if layer.shared is not None else [])
    order = torch.cat([p.neuron_index.flatten() for p in parts]).argsort()  # inverse of the partition

    def linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
        module = nn.Linear(
            weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype
        )
        with torch.no_grad():
            module.weight.copy_(weight)
            if bias is not None:
                module.bias.copy_(bias)
        return module

    def rows(name: str) -> torch.Tensor:  # (N, I/N, H) per part -> (I, H)
        return torch.cat([getattr(p, name).detach().reshape(-1, p.gate_weight.shape[-1]) for p in parts])[order]

    def bias(name: str) -> torch.Tensor | None:
        if getattr(layer.experts, name) is None:
            return None
        return torch.cat([getattr(p, name).detach().flatten() for p in parts])[order]

    down_weight = torch.cat(
        [p.down_weight.detach().permute(1, 0, 2).reshape(p.down_weight.shape[1], -1) for p in parts], dim=1
    )[:, order]
    gate, up = linear(rows("gate_weight"), bias("gate_bias")), linear(rows("up_weight"), bias("up_bias"))
    down = linear(down_weight, None if layer.down_bias is None else layer.down_bias.detach())
    return GatedFFN(gate, up, down, layer.experts.act_fn)


def defactorize(model: nn.Module) -> nn.Module:
    """In place: every FactorizedFFN back to a dense FFN (all experts, merged). Used to
    time a same-sized dense model beside a factorized one; returns `model`."""
    for name, layer in factorized_layers(model):
        parent_name, _, child = name.rpartition(".")
        dense = merge_experts(layer)
        dense.train(layer.training)
        setattr(model.get_submodule(parent_name) if parent_name else model, child, dense)
    return model
