"""The model directory: round trips, atomic overwrite, and errors that name the broken file."""

from __future__ import annotations

import json

import pytest
import torch

import deepseek as ds
from deepseek.models.directory import WEIGHTS, WEIGHTS_INDEX, load_config, load_weights, read_extra

CFG = dict(d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, moe_ffn_dim=16, n_routed_experts=4, top_k=2,
           max_seq_len=32)


def make_model(**overrides) -> ds.MoETransformer:
    model = ds.MoETransformer(ds.ModelConfig(**{**CFG, **overrides})).eval()
    with torch.no_grad():  # non-default buffers must survive the trip too
        for i, r in enumerate(model.routers()):
            r.expert_bias.copy_(torch.linspace(-1, 1, r.n_experts) * (i + 1))
    return model


@pytest.fixture
def saved(tmp_path):
    """A saved tiny model: (path, model)."""
    model = make_model()
    path = tmp_path / "model"
    ds.save(model, ds.byte_tokenizer(), path)
    return path, model


def assert_same_model(a: ds.MoETransformer, b: ds.MoETransformer):
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for name in sa:
        assert sa[name].dtype == sb[name].dtype and torch.equal(sa[name], sb[name]), name
    ids = torch.randint(0, a.config.vocab_size, (2, 9))
    with torch.no_grad():
        assert torch.equal(a(ids), b(ids))


# -- round trips -----------------------------------------------------------------------------------

@pytest.mark.parametrize("overrides", [{}, dict(tie_embeddings=True, router="sigmoid", n_shared_experts=1,
                                                first_k_dense=1, attention="sparse", window=4)])
def test_round_trip(tmp_path, overrides):
    model = make_model(**overrides)
    tokenizer = ds.byte_tokenizer()
    path = ds.save(model, tokenizer, tmp_path / "m", generation={"temperature": 0.7})
    assert sorted(p.name for p in path.iterdir()) == ["config.json", "generation.json", WEIGHTS, "tokenizer.json"]
    loaded, loaded_tok = ds.load(path)
    assert not loaded.training
    assert_same_model(model, loaded)
    assert loaded_tok.encode("héllo").ids == tokenizer.encode("héllo").ids
    assert read_extra(path, "generation.json") == {"temperature": 0.7}
    assert read_extra(path, "compression.json") is None
    config = json.loads((path / "config.json").read_text())
    assert config["format"] == "deepseek-moe" and config["tie_embeddings"] == model.config.tie_embeddings


def test_tied_model_stores_the_matrix_once(tmp_path):
    path = ds.save(make_model(tie_embeddings=True), ds.byte_tokenizer(), tmp_path / "m")
    assert "lm_head.weight" not in load_weights(path)
    loaded, _ = ds.load(path)
    assert loaded.lm_head is None


def test_sharded_round_trip(tmp_path):
    model = make_model()
    path = ds.save(model, ds.byte_tokenizer(), tmp_path / "m", max_shard_bytes=20_000)
    shards = sorted(p.name for p in path.glob("model-*.safetensors"))
    assert len(shards) > 2 and not (path / WEIGHTS).exists()
    assert shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.loads((path / WEIGHTS_INDEX).read_text())
    assert set(index["weight_map"]) == set(model.state_dict())
    assert set(index["weight_map"].values()) == set(shards)
    loaded, _ = ds.load(path)
    assert_same_model(model, loaded)


def test_load_with_dtype(saved):
    path, model = saved
    loaded, _ = ds.load(path, dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in loaded.parameters())
    assert loaded.rope.cos_table.dtype == torch.float32
    ids = torch.randint(0, 259, (1, 6))
    with torch.no_grad():
        assert ((loaded(ids).float() - model(ids)).norm() / model(ids).norm()) < 3e-2


def test_load_accum_is_not_saved_and_starts_at_zero(tmp_path):
    model = make_model(router="sigmoid").train()
    model(torch.randint(0, 259, (1, 8)))
    assert model.routers()[0].load_accum.sum() > 0
    path = ds.save(model, ds.byte_tokenizer(), tmp_path / "m")
    assert not any("load_accum" in k for k in load_weights(path))
    loaded, _ = ds.load(path)
    assert all(r.load_accum.sum() == 0 and r.load_accum.shape == (4,) for r in loaded.routers())


def test_save_unwraps_compiled_and_wrapped_modules(tmp_path):
    model = make_model()

    class Wrapper(torch.nn.Module):  # the shape of DDP: the model under `.module`
        def __init__(self, module):
            super().__init__()
            self.module = module
            self.config = module.config

    path = ds.save(Wrapper(model), ds.byte_tokenizer(), tmp_path / "m")
    assert set(load_weights(path)) == set(model.state_dict())


# -- atomic writes ---------------------------------------------------------------------------------

def test_overwrite_replaces_directory_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "m"
    ds.save(make_model(), ds.byte_tokenizer(), path, generation={"temperature": 1.0})
    (path / "stale.txt").write_text("from an old run")
    new = make_model(tie_embeddings=True)
    with torch.no_grad():
        new.embed.weight.add_(1.0)
    ds.save(new, ds.byte_tokenizer(), path)
    assert not (path / "stale.txt").exists() and not (path / "generation.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, _ = ds.load(path)
    assert_same_model(new, loaded)


def test_failed_save_keeps_the_old_directory(tmp_path, monkeypatch):
    path = tmp_path / "m"
    old = make_model()
    ds.save(old, ds.byte_tokenizer(), path)

    def boom(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr("deepseek.models.directory.save_file", boom)
    with pytest.raises(OSError, match="disk full"):
        ds.save(make_model(tie_embeddings=True), ds.byte_tokenizer(), path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]
    loaded, _ = ds.load(path)
    assert_same_model(old, loaded)


def test_save_refuses_bad_inputs(tmp_path):
    with pytest.raises(TypeError, match="MoETransformer"):
        ds.save(torch.nn.Linear(2, 2), ds.byte_tokenizer(), tmp_path / "m")
    with pytest.raises(ValueError, match="259 tokens"):
        ds.save(make_model(vocab_size=100), ds.byte_tokenizer(), tmp_path / "m")
    assert not any(tmp_path.iterdir())


# -- clear errors ----------------------------------------------------------------------------------

def load_error(path) -> str:
    with pytest.raises(ds.ModelDirectoryError) as exc:
        ds.load(path)
    return str(exc.value)


def test_not_a_directory(tmp_path):
    assert "is not a directory" in load_error(tmp_path / "nothing")


def test_missing_config(saved):
    path, _ = saved
    (path / "config.json").unlink()
    msg = load_error(path)
    assert "config.json" in msg and "missing" in msg


@pytest.mark.parametrize("text, needle", [("{not json", "not valid JSON"), ("[1, 2]", "expected a JSON object"),
                                          (b"\xff\xfe\x00", "not valid JSON")])
def test_corrupt_config(saved, text, needle):
    path, _ = saved
    if isinstance(text, bytes):
        (path / "config.json").write_bytes(text)
    else:
        (path / "config.json").write_text(text)
    msg = load_error(path)
    assert "config.json" in msg and needle in msg


def test_unknown_config_key_lists_valid_keys(saved):
    path, _ = saved
    data = json.loads((path / "config.json").read_text())
    data["n_expertz"] = 4
    (path / "config.json").write_text(json.dumps(data))
    msg = load_error(path)
    assert "config.json" in msg and "n_expertz" in msg
    assert "n_routed_experts" in msg and "d_model" in msg


def test_invalid_config_value(saved):
    path, _ = saved
    data = json.loads((path / "config.json").read_text())
    data["n_kv_heads"] = 3
    (path / "config.json").write_text(json.dumps(data))
    msg = load_error(path)
    assert "config.json" in msg and "n_kv_heads" in msg


def test_foreign_or_newer_format(saved):
    path, _ = saved
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "format_version": 99}))
    assert "format_version 99" in load_error(path)
    (path / "config.json").write_text(json.dumps({"model_type": "mixtral", "hidden_size": 64}))
    msg = load_error(path)
    assert "format" in msg and "convert" in msg


def test_missing_weights(saved):
    path, _ = saved
    (path / WEIGHTS).unlink()
    msg = load_error(path)
    assert WEIGHTS in msg and "missing" in msg


@pytest.mark.parametrize("damage", ["truncate", "garbage", "empty"])
def test_corrupt_weights(saved, damage):
    path, _ = saved
    file = path / WEIGHTS
    data = file.read_bytes()
    if damage == "truncate":
        file.write_bytes(data[: len(data) // 2])
    elif damage == "garbage":
        file.write_bytes(b"\x12\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}" + data[30:])
    else:
        file.write_bytes(b"")
    msg = load_error(path)
    assert WEIGHTS in msg and "corrupt" in msg


def test_missing_shard_and_corrupt_index(tmp_path):
    path = ds.save(make_model(), ds.byte_tokenizer(), tmp_path / "m", max_shard_bytes=20_000)
    sorted(path.glob("model-*.safetensors"))[1].unlink()
    msg = load_error(path)
    assert "model-00002" in msg and "missing" in msg
    (path / WEIGHTS_INDEX).write_text("{}")
    msg = load_error(path)
    assert WEIGHTS_INDEX in msg and "corrupt" in msg


def test_missing_or_corrupt_tokenizer(saved):
    path, _ = saved
    (path / "tokenizer.json").write_text("{\"version\": 3}")
    msg = load_error(path)
    assert "tokenizer.json" in msg and "corrupt" in msg
    (path / "tokenizer.json").unlink()
    msg = load_error(path)
    assert "tokenizer.json" in msg and "missing" in msg


def test_shape_mismatch_names_the_weight(saved):
    path, _ = saved
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "moe_ffn_dim": 8}))
    msg = load_error(path)
    assert "ffn.experts." in msg and "has shape" in msg and "config.json" in msg


def test_missing_and_unexpected_weights_are_listed(saved):
    path, _ = saved
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**data, "tie_embeddings": True}))
    msg = load_error(path)
    assert "unexpected" in msg and "lm_head.weight" in msg
    (path / "config.json").write_text(json.dumps({**data, "n_layers": 3}))
    msg = load_error(path)
    assert "missing" in msg and "blocks.2." in msg


def test_load_config_alone(saved):
    path, model = saved
    assert load_config(path) == model.config
