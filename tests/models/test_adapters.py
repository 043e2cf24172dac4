"""LoRA adapters in PEFT's format, checked against the real PEFT library both ways: PEFT loads our adapter onto our
Hugging Face export with equal logits, and we load an adapter PEFT made on that export with equal logits.
"""

from __future__ import annotations

import json

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from tests.models.mixtral_shaped import base_model  # noqa: E402
from safetensors.torch import load_file, save_file  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.models.adapters import AdapterError, load_adapter, save_adapter  # noqa: E402
from deepseek.models.hf import export_hf  # noqa: E402
from deepseek.nn.lora import LoRAConfig, LoRAExperts, apply_lora  # noqa: E402

TOL = 1e-4
VOCAB = 300
ATTENTION = ("attn.q", "attn.k", "attn.v", "attn.o")
HF_ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]


def randomize_lora(model: torch.nn.Module) -> None:
    """Non-zero B everywhere (fresh adapters start at B = 0, which would prove nothing)."""
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))


def ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (2, 16), generator=torch.Generator().manual_seed(1))


def hf_export(model, folder):
    export_hf(model, ds.byte_tokenizer(), folder)
    return transformers.AutoModelForCausalLM.from_pretrained(folder).eval()


def logits(model, x):
    with torch.no_grad():
        out = model(x)
    return getattr(out, "logits", out)


@pytest.mark.parametrize("lora", [
    LoRAConfig(r=4, target_modules=ATTENTION),
    LoRAConfig(r=4, alpha=12, target_modules=ATTENTION + ("lm_head",)),
    LoRAConfig(r=4, alpha=3, rslora=True, target_modules=("blocks.1.attn.q", "blocks.0.attn.v")),
    LoRAConfig(r=2, alpha=5, target_modules=("attn.q", "experts")),
], ids=["attention", "alpha-head", "rslora-some-layers", "routed-experts"])
def test_peft_loads_our_adapter_on_our_export(tmp_path, lora):
    base = base_model()
    hf = hf_export(base, tmp_path / "hf")
    apply_lora(base, lora)
    randomize_lora(base)
    save_adapter(base, tmp_path / "adapter", base_model_name_or_path=str(tmp_path / "hf"))

    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    peft_model = peft.PeftModel.from_pretrained(hf, tmp_path / "adapter").eval()
    x = ids()
    assert (logits(peft_model, x) - logits(base, x)).abs().max().item() < TOL
    with peft_model.disable_adapter():  # and the adapter did something
        assert (logits(peft_model, x) - logits(base, x)).abs().max().item() > 1e-3


@pytest.mark.parametrize("kw", [
    dict(r=4, lora_alpha=8, target_modules=HF_ATTENTION),
    dict(r=4, lora_alpha=6, use_rslora=True, target_modules=["q_proj", "v_proj", "lm_head"]),
    dict(r=2, lora_alpha=3, target_modules=["k_proj"],
         target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
    dict(r=2, lora_alpha=2, target_modules=[], target_parameters=["experts.down_proj"]),
], ids=["attention", "rslora-head", "routed-experts", "down-only"])
def test_we_load_an_adapter_peft_made_on_our_export(tmp_path, kw):
    hf = hf_export(base_model(), tmp_path / "hf")
    peft_model = peft.get_peft_model(hf, peft.LoraConfig(task_type="CAUSAL_LM", **kw))
    randomize_lora(peft_model)
    peft_model.save_pretrained(tmp_path / "adapter")
    peft_model.eval()

    ours = base_model()
    adapted = load_adapter(ours, tmp_path / "adapter")
    assert adapted
    x = ids()
    assert (logits(ours, x) - logits(peft_model, x)).abs().max().item() < TOL


def test_our_adapter_round_trips_through_our_loader(tmp_path):
    model = base_model()
    apply_lora(model, LoRAConfig(r=3, alpha=7, rslora=True, target_modules=ATTENTION + ("experts",)))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter")
    again = base_model()
    load_adapter(again, tmp_path / "adapter")
    assert isinstance(again.blocks[0].ffn.experts, LoRAExperts)
    x = ids()
    assert (logits(again, x) - logits(model, x)).abs().max().item() < 1e-5


def test_missing_files_unknown_targets_and_bad_shapes_are_named(tmp_path):
    model = base_model()
    with pytest.raises(AdapterError, match="adapter_config.json is missing"):
        load_adapter(model, tmp_path)
    apply_lora(model, LoRAConfig(r=2, target_modules=("attn.q",)))
    randomize_lora(model)
    folder = save_adapter(model, tmp_path / "adapter")
    weights = folder / "adapter_model.safetensors"
    tensors = load_file(weights)

    (folder / "adapter_model.safetensors").rename(folder / "moved")
    with pytest.raises(AdapterError, match="adapter_model.safetensors is missing"):
        load_adapter(base_model(), folder)
    (folder / "moved").rename(weights)

    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "peft_type": "IA3"}))
    with pytest.raises(AdapterError, match="peft_type 'IA3' is not supported"):
        load_adapter(base_model(), folder)
    (folder / "adapter_config.json").write_text(json.dumps(config))

    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    save_file({**tensors, key.replace("layers.0", "layers.9"): tensors[key].clone()}, weights)
    with pytest.raises(AdapterError, match=r"targets not in this model: model\.layers\.9\.self_attn\.q_proj"):
        load_adapter(base_model(), folder)
    save_file({**tensors, "base_model.model.model.layers.0.mlp.gate.lora_A.weight": tensors[key].clone()}, weights)
    with pytest.raises(AdapterError, match="no module of the Mixtral export"):
        load_adapter(base_model(), folder)
    save_file({**tensors, key: tensors[key][:, :10].contiguous()}, weights)
    fresh = base_model()
    with pytest.raises(AdapterError, match=r"q_proj\.lora_A\.weight has shape \[2, 10\], expected \[2, 64\]"):
        load_adapter(fresh, folder)
    assert isinstance(fresh.blocks[0].attn.q, torch.nn.Linear)  # left as it was, not half-adapted
    assert all(p.requires_grad for p in fresh.parameters())


def test_save_refuses_what_peft_cannot_express(tmp_path):
    with pytest.raises(AdapterError, match="no LoRA adapters"):
        save_adapter(base_model(), tmp_path / "a")
    model = base_model()
    apply_lora(model, LoRAConfig(r=2, dropout=0.1, target_modules=("experts",)))
    with pytest.raises(AdapterError, match="support no dropout"):
        save_adapter(model, tmp_path / "a")
    assert not (tmp_path / "a").exists()
