"""Hugging Face interop: logits parity with transformers both ways, round trips, refusals, the CLI, bad files.

Every Hugging Face model here is built from a random config on the spot (no downloads).
"""

from __future__ import annotations

import json
import re

import pytest
import torch

transformers = pytest.importorskip("transformers")
import typer  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from typer.testing import CliRunner  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.models.hf import (HFConversionError, config_from_hf, convert_from_hf, convert_to_hf, export_hf,  # noqa: E402
                                import_hf, to_hf_state_dict)

# Folders saved by save_pretrained have no tokenizer.json; the import warns and uses the byte tokenizer.
pytestmark = pytest.mark.filterwarnings("ignore:.*has no tokenizer.json")

TOL = 1e-4
VOCAB = 300


def mixtral_config(**overrides) -> ds.ModelConfig:
    fields = dict(vocab_size=VOCAB, d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=64,
                  rope_theta=10000.0, moe_ffn_dim=32, n_routed_experts=4, top_k=2, router="softmax")
    return ds.ModelConfig(**{**fields, **overrides})


def random_model(config: ds.ModelConfig) -> ds.MoETransformer:
    """Our model with weights large enough that routing and attention are far from uniform."""
    model = ds.MoETransformer(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if name.endswith("norm.weight") else 0.15 * torch.randn_like(p))
    return model


def randomize_hf(model):
    """Re-draw every weight of a transformers model (its own init leaves routers at zero for Qwen)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.15 * torch.randn_like(p))
    return model.eval()


def random_ids(batch: int = 3, tokens: int = 20) -> torch.Tensor:
    return torch.randint(0, VOCAB, (batch, tokens), generator=torch.Generator().manual_seed(1))


def max_logit_diff(ours: ds.MoETransformer, hf_model, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return (ours(ids) - hf_model(ids).logits).abs().max().item()


HF_SIZES = dict(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                max_position_embeddings=64, num_experts_per_tok=2)


def hf_mixtral(**overrides):
    config = transformers.MixtralConfig(**{**HF_SIZES, "intermediate_size": 32, "num_local_experts": 4, **overrides})
    return randomize_hf(transformers.MixtralForCausalLM(config))


def hf_qwen2_moe(**overrides):
    config = transformers.Qwen2MoeConfig(**{**HF_SIZES, "intermediate_size": 48, "moe_intermediate_size": 32,
                                            "shared_expert_intermediate_size": 40, "num_experts": 4, **overrides})
    return randomize_hf(transformers.Qwen2MoeForCausalLM(config))


def hf_qwen3_moe(**overrides):
    config = transformers.Qwen3MoeConfig(**{**HF_SIZES, "intermediate_size": 48, "moe_intermediate_size": 32,
                                            "num_experts": 4, "head_dim": 24, "norm_topk_prob": True, **overrides})
    return randomize_hf(transformers.Qwen3MoeForCausalLM(config))


def load_hf(folder):
    model, info = transformers.AutoModelForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched keys
    return model.eval()


# -- (a) ours -> Hugging Face ---------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, {"tie_embeddings": True, "top_k": 3, "head_dim": 24}],
                         ids=["untied", "tied-top3-headdim"])
def test_export_loads_in_transformers_with_same_logits(tmp_path, overrides):
    model = random_model(mixtral_config(**overrides))
    export_hf(model, ds.byte_tokenizer(), tmp_path / "hf")
    hf_model = load_hf(tmp_path / "hf")
    assert isinstance(hf_model, transformers.MixtralForCausalLM)
    assert max_logit_diff(model, hf_model, random_ids()) < TOL


def test_export_writes_what_save_pretrained_writes(tmp_path):
    model = random_model(mixtral_config())
    config, state = to_hf_state_dict(model)
    hf_model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**{
        k: v for k, v in config.items() if k not in ("architectures", "model_type", "dtype", "rope_theta")}))
    hf_model.save_pretrained(tmp_path / "reference")
    from safetensors import safe_open
    with safe_open(str(tmp_path / "reference" / "model.safetensors"), "pt") as f:
        reference = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: tuple(v.shape) for k, v in state.items()} == reference


def test_export_sliding_window_matches_mixtral(tmp_path):
    # Our sparse attention without global tokens is Mixtral's sliding window; 20 tokens > window 8.
    model = random_model(mixtral_config(attention="sparse", window=8, n_global_tokens=0))
    export_hf(model, ds.byte_tokenizer(), tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["sliding_window"] == 8
    assert max_logit_diff(model, load_hf(tmp_path / "hf"), random_ids()) < TOL


def test_exported_tokenizer_loads_with_autotokenizer(tmp_path):
    tokenizer = ds.byte_tokenizer()
    export_hf(random_model(mixtral_config()), tokenizer, tmp_path / "hf")
    hf_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert hf_tokenizer("héllo")["input_ids"] == tokenizer.encode("héllo").ids
    assert hf_tokenizer.eos_token_id == tokenizer.token_to_id("<|eos|>")


# -- (b, c) Hugging Face -> ours ------------------------------------------------------------------

@pytest.mark.parametrize("build", [hf_mixtral, hf_qwen2_moe, hf_qwen3_moe], ids=["mixtral", "qwen2_moe", "qwen3_moe"])
def test_import_matches_transformers_logits(tmp_path, build):
    hf_model = build()
    hf_model.save_pretrained(tmp_path / "hf")
    model, tokenizer = import_hf(tmp_path / "hf")
    assert max_logit_diff(model, hf_model, random_ids()) < TOL


def test_import_qwen2_moe_maps_shared_expert_gate_and_bias(tmp_path):
    hf_qwen2_moe().save_pretrained(tmp_path / "hf")
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        model, _ = import_hf(tmp_path / "hf")
    cfg = model.config
    assert (cfg.attention_bias, cfg.n_shared_experts, cfg.shared_ffn_dim, cfg.shared_expert_gate) == (True, 1, 40, True)
    assert cfg.norm_topk_prob is False and cfg.qk_norm is False


def test_import_qwen_leading_dense_layers(tmp_path):
    hf_model = hf_qwen2_moe(num_hidden_layers=3, mlp_only_layers=[0])
    hf_model.save_pretrained(tmp_path / "hf")
    model, _ = import_hf(tmp_path / "hf")
    assert model.config.first_k_dense == 1 and model.config.ffn_dim == 48
    assert max_logit_diff(model, hf_model, random_ids()) < TOL


def test_import_fused_expert_layout_and_sharded_checkpoint(tmp_path):
    hf_model = hf_mixtral()
    # transformers 5 keeps experts fused in memory (mlp.experts.gate_up_proj [E, 2F, D]); a checkpoint may too.
    fused = tmp_path / "fused"
    hf_model.save_pretrained(fused)
    (fused / "model.safetensors").unlink()
    save_file({k: v.contiguous() for k, v in hf_model.state_dict().items()}, fused / "model.safetensors",
              metadata={"format": "pt"})
    assert max_logit_diff(import_hf(fused)[0], hf_model, random_ids()) < TOL

    sharded = tmp_path / "sharded"
    hf_model.save_pretrained(sharded, max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert max_logit_diff(import_hf(sharded)[0], hf_model, random_ids()) < TOL


def test_import_keeps_bf16_and_uses_folder_tokenizer(tmp_path):
    tokenizer = ds.byte_tokenizer()
    hf_model = hf_mixtral().to(torch.bfloat16)
    hf_model.save_pretrained(tmp_path / "hf")
    tokenizer.save(str(tmp_path / "hf" / "tokenizer.json"))
    model, imported = import_hf(tmp_path / "hf")
    assert model.embed.weight.dtype == torch.bfloat16
    assert imported.encode("abc").ids == tokenizer.encode("abc").ids


# -- (d) round trip -------------------------------------------------------------------------------

def test_round_trip_gives_identical_weights(tmp_path):
    model = random_model(mixtral_config(tie_embeddings=True))
    export_hf(model, ds.byte_tokenizer(), tmp_path / "hf")
    back, _ = import_hf(tmp_path / "hf")
    assert back.config == model.config
    original, returned = model.state_dict(), back.state_dict()
    assert original.keys() == returned.keys()
    for name, tensor in original.items():
        assert torch.equal(tensor, returned[name]), name


# -- (e) refusals ---------------------------------------------------------------------------------

def test_export_refuses_what_mixtral_cannot_express_and_lists_every_reason(tmp_path):
    config = ds.ModelConfig(router="sigmoid", n_shared_experts=1, first_k_dense=1, attention_bias=True, qk_norm=True,
                            norm_topk_prob=False, routed_scaling_factor=2.5, n_layers=2)
    with pytest.raises(HFConversionError) as err:
        export_hf(ds.MoETransformer(config), ds.byte_tokenizer(), tmp_path / "hf")
    for reason in ("router is 'sigmoid'", "n_shared_experts=1", "first_k_dense=1", "attention_bias", "qk_norm",
                   "norm_topk_prob=False", "routed_scaling_factor=2.5"):
        assert reason in str(err.value)
    assert not (tmp_path / "hf").exists()


def test_export_refuses_global_tokens():
    with pytest.raises(HFConversionError, match="n_global_tokens=4"):
        to_hf_state_dict(ds.MoETransformer(mixtral_config(attention="sparse", n_global_tokens=4)))


def test_top1_routing_matches_mixtral(tmp_path):
    # With norm_topk_prob the single chosen expert gets weight 1, as in Mixtral.
    model = random_model(mixtral_config(top_k=1))
    export_hf(model, ds.byte_tokenizer(), tmp_path / "hf")
    assert max_logit_diff(model, load_hf(tmp_path / "hf"), random_ids()) < TOL


def test_import_refuses_unsupported_configs():
    base = {**HF_SIZES, "model_type": "qwen2_moe", "moe_intermediate_size": 32, "num_experts": 4}
    with pytest.raises(HFConversionError, match="not a prefix"):
        config_from_hf({**base, "num_hidden_layers": 4, "decoder_sparse_step": 2})
    with pytest.raises(HFConversionError, match="rope type 'yarn'"):
        config_from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 4.0}})
    with pytest.raises(HFConversionError, match=r"model_type 'llama' is not supported; supported: mixtral, qwen2_moe"):
        config_from_hf({**base, "model_type": "llama"})
    with pytest.raises(HFConversionError, match="missing moe_intermediate_size"):
        config_from_hf({k: v for k, v in base.items() if k != "moe_intermediate_size"})


# -- (f) the CLI ----------------------------------------------------------------------------------

@pytest.fixture
def cli():
    """The `ds` app; a bare app with only `convert` if the full CLI is not importable yet."""
    try:
        from deepseek.cli.main import app
    except ImportError:
        from deepseek.cli import convert

        app = typer.Typer()
        app.callback()(lambda: None)  # keep `convert` a subcommand
        convert.register(app)
    runner = CliRunner()
    return lambda *args: runner.invoke(app, [str(a) for a in args])


def test_cli_converts_both_ways(tmp_path, cli):
    model = random_model(mixtral_config())
    ds.save(model, ds.byte_tokenizer(), tmp_path / "ours")
    result = cli("convert", "--to-hf", tmp_path / "ours", tmp_path / "hf")
    assert result.exit_code == 0, result.output
    assert max_logit_diff(model, load_hf(tmp_path / "hf"), random_ids()) < TOL

    result = cli("convert", "--from-hf", tmp_path / "hf", tmp_path / "back")
    assert result.exit_code == 0, result.output
    back, _ = ds.load(tmp_path / "back")
    with torch.no_grad():
        assert torch.equal(back(random_ids()), model(random_ids()))


def test_cli_needs_exactly_one_direction(tmp_path, cli):
    for flags in ([], ["--to-hf", "--from-hf"]):
        result = cli("convert", *flags, tmp_path / "a", tmp_path / "b")
        assert result.exit_code == 2
        assert "exactly one of --to-hf or --from-hf" in " ".join(re.sub("[│╭╮╰╯─]", " ", result.output).split())


# -- (g) missing and corrupt files ----------------------------------------------------------------

def test_missing_and_corrupt_files_are_named(tmp_path):
    folder = tmp_path / "hf"
    hf_mixtral().save_pretrained(folder)
    (folder / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ds.ModelDirectoryError, match=r"model\.safetensors is corrupt"):
        import_hf(folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(ds.ModelDirectoryError, match=r"model\.safetensors is missing"):
        import_hf(folder)
    (folder / "config.json").write_text("{not json")
    with pytest.raises(ds.ModelDirectoryError, match=r"config\.json is corrupt"):
        import_hf(folder)
    (folder / "config.json").unlink()
    with pytest.raises(ds.ModelDirectoryError, match=r"config\.json is missing"):
        import_hf(folder)
    with pytest.raises(ds.ModelDirectoryError, match="not a directory"):
        import_hf(tmp_path / "nowhere")


def test_wrong_tensors_are_named(tmp_path):
    folder = tmp_path / "hf"
    hf_mixtral().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "num_local_experts": 3}))
    with pytest.raises(HFConversionError, match=r"extra experts\.3\.gate_proj"):
        import_hf(folder)
    (folder / "config.json").write_text(json.dumps({**config, "intermediate_size": 16}))
    with pytest.raises(HFConversionError, match=r"blocks\.0\.ffn\.experts\.gate_up has shape"):
        import_hf(folder)


def test_directories_of_the_other_kind_get_a_hint(tmp_path):
    ds.save(random_model(mixtral_config()), ds.byte_tokenizer(), tmp_path / "ours")
    with pytest.raises(HFConversionError, match="belongs to a deepseek model directory"):
        convert_from_hf(tmp_path / "ours", tmp_path / "out")
    hf_mixtral().save_pretrained(tmp_path / "hf")
    with pytest.raises(ds.ModelDirectoryError, match="--from-hf"):
        convert_to_hf(tmp_path / "hf", tmp_path / "out")
