"""LoRA on a base without a Hugging Face Mixtral export (the quickstart's shape): ``ds finetune run`` trains it and
saves the adapter in our own format (``deepseek_format``: our module names and layouts), which ``load_adapter``,
``ds lora merge`` and serving read back exactly; bad files are one-line AdapterErrors naming file and reason."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import deepseek as ds
from deepseek.finetune.config import load_finetune_config
from deepseek.finetune.run import finetune
from deepseek.models.adapters import AdapterError, load_adapter, save_adapter
from deepseek.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora, lora_state_dict
from tests.finetune.test_run import CHATS, logits, overrides, run_ds
from tests.models.quickstart_shaped import quickstart_shaped_model, save_quickstart_shaped

TARGETS = ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.shared.up", "ffn.shared.down", "ffn.experts")


def ids() -> torch.Tensor:
    return torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(1))


def randomize_lora(model: torch.nn.Module, seed: int = 3) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(0.2 * torch.randn(p.shape, generator=g))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A quickstart-shaped base fine-tuned with LoRA (attention, shared expert, routed experts; rsLoRA) through
    finetune() for a few steps: (base dir, adapter dir)."""
    folder = tmp_path_factory.mktemp("native")
    base = save_quickstart_shaped(folder / "base")
    data = folder / "chats.jsonl"
    data.write_text("".join(json.dumps({"messages": chat}) + "\n" for chat in CHATS))
    lora = "lora={r: 4, alpha: 6, rslora: true, target_modules: [%s]}" % ", ".join(TARGETS)
    result = finetune(load_finetune_config(None, overrides(base, data, folder / "run", lora, "max_steps=3")))
    assert result.step == 3
    return base, folder / "run" / "adapter"


def test_finetune_saves_a_quickstart_shaped_adapter_in_our_format(trained):
    base, adapter = trained
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["deepseek_format"] == 1 and config["peft_type"] == "LORA"
    assert (config["r"], config["lora_alpha"], config["use_rslora"]) == (4, 6, True)
    assert config["base_model_name_or_path"] == str(base)
    assert "blocks.1.ffn.shared.up" in config["target_modules"] and "blocks.0.attn.q" in config["target_modules"]
    tensors = load_file(adapter / "adapter_model.safetensors")
    assert tensors["blocks.0.attn.q.lora_A"].shape == (4, 64)  # our layouts: A [r, in], B [out, r]
    assert tensors["blocks.1.ffn.shared.down.lora_B"].shape == (64, 4)
    assert tensors["blocks.1.ffn.experts.lora_gate_up_A"].shape == (8, 4, 64)  # [E, R, D]
    assert tensors["blocks.1.ffn.experts.lora_down_B"].shape == (8, 64, 4)  # [E, D, R]
    assert tensors["blocks.1.ffn.shared.up.lora_B"].abs().sum() > 0  # trained (B starts at zero)


def test_our_format_round_trips_exactly_with_rslora(tmp_path):
    model = quickstart_shaped_model()
    apply_lora(model, LoRAConfig(r=3, alpha=5, rslora=True, target_modules=TARGETS))
    randomize_lora(model)
    save_adapter(model, tmp_path / "adapter", base_model_name_or_path="base")
    again = quickstart_shaped_model()
    modules = load_adapter(again, tmp_path / "adapter")
    assert "blocks.1.ffn.shared.up" in modules and isinstance(again.blocks[1].ffn.experts, LoRAExperts)
    assert again.blocks[0].attn.q.scaling == 5 / 3 ** 0.5  # rsLoRA kept, not folded into alpha
    assert torch.equal(logits(again, ids()), logits(model, ids()))
    assert lora_state_dict(again).keys() == lora_state_dict(model).keys()
    assert not torch.equal(logits(again, ids()), logits(quickstart_shaped_model(), ids()))  # the adapter matters


def test_load_adapter_and_lora_merge_of_the_finetuned_adapter(trained, tmp_path):
    base, adapter = trained
    model, _ = ds.load(base)
    load_adapter(model, adapter)
    assert isinstance(model.blocks[1].ffn.shared.up, LoRALinear)
    plain, _ = ds.load(base)
    x = ids()
    assert not torch.equal(logits(model, x), logits(plain, x))
    run_ds("lora", "merge", base, adapter, tmp_path / "merged")
    merged, _ = ds.load(tmp_path / "merged")
    assert (logits(merged, x) - logits(model, x)).abs().max().item() < 1e-4


def test_bad_files_of_our_format_are_named(tmp_path):
    model = quickstart_shaped_model()
    apply_lora(model, LoRAConfig(r=2, target_modules=("attn.q", "ffn.shared.up")))
    folder = save_adapter(model, tmp_path / "adapter")
    weights, config_path = folder / "adapter_model.safetensors", folder / "adapter_config.json"
    tensors, config = load_file(weights), json.loads(config_path.read_text())

    def refused(match):
        fresh = quickstart_shaped_model()
        with pytest.raises(AdapterError, match=match):
            load_adapter(fresh, folder)
        assert isinstance(fresh.blocks[0].attn.q, torch.nn.Linear)  # left as it was

    config_path.write_text(json.dumps({**config, "deepseek_format": 2}))
    refused("deepseek_format 2 is not supported")
    config_path.write_text(json.dumps(config))
    save_file({k: v for k, v in tensors.items() if k != "blocks.1.attn.q.lora_B"}, weights)
    refused(r"adapter_model.safetensors: blocks\.1\.attn\.q\.lora_B is missing")
    save_file({**tensors, "blocks.1.attn.q.lora_A": torch.zeros(2, 10)}, weights)
    refused(r"blocks\.1\.attn\.q\.lora_A has shape \[2, 10\], expected \[2, 64\]")
    save_file({**tensors, "blocks.7.attn.q.lora_A": torch.zeros(2, 64)}, weights)
    refused(r"targets not in this model: blocks\.7\.attn\.q")
    save_file({**tensors, "blocks.1.ffn.router.lora_A": torch.zeros(2, 64)}, weights)
    refused(r"blocks\.1\.ffn\.router is a \w+, not a linear or routed-experts module")
    save_file({**tensors, "blocks.1.attn.q.weight": torch.zeros(2, 64)}, weights)
    refused("tensors that are not LoRA weights: blocks.1.attn.q.weight")
