"""Config machinery: dataclass <-> dict, overrides, files, ModelConfig validation and presets."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from deepseek.config import ConfigError, apply_overrides, from_dict, load_file, save_file, to_dict
from deepseek.models.config import PRESETS, ModelConfig, preset


@dataclass
class Optim:
    lr: float = 1e-3
    betas: tuple[float, ...] = (0.9, 0.95)
    kind: Literal["adamw", "sgd"] = "adamw"


@dataclass
class Run:
    name: str = "run"
    steps: int = 10
    compile: bool = False
    seed: Optional[int] = None
    optim: Optim = field(default_factory=Optim)
    tags: list[str] = field(default_factory=list)


# -- from_dict -------------------------------------------------------------------------------------

def test_from_dict_builds_nested_dataclasses():
    run = from_dict(Run, {"name": "a", "steps": 3, "optim": {"lr": 0.5, "kind": "sgd"}, "tags": ["x", "y"]})
    assert run == Run(name="a", steps=3, optim=Optim(lr=0.5, kind="sgd"), tags=["x", "y"])
    assert isinstance(run.optim, Optim)
    assert from_dict(Run, to_dict(run)) == run


def test_unknown_key_is_rejected_and_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"stpes": 3})
    msg = str(exc.value)
    assert "stpes" in msg
    for key in ("name", "steps", "compile", "seed", "optim", "tags"):
        assert key in msg


def test_unknown_nested_key_names_the_full_path_and_the_section_keys():
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, {"optim": {"learning_rate": 1.0}})
    msg = str(exc.value)
    assert "optim.learning_rate" in msg
    assert "Optim" in msg and "lr" in msg and "betas" in msg and "kind" in msg


@pytest.mark.parametrize("data, field_name", [
    ({"steps": "ten"}, "steps"),
    ({"steps": 1.5}, "steps"),
    ({"steps": True}, "steps"),
    ({"compile": "yes"}, "compile"),
    ({"name": 3}, "name"),
    ({"optim": {"lr": "fast"}}, "optim.lr"),
    ({"optim": {"betas": 0.9}}, "optim.betas"),
    ({"optim": {"betas": [0.9, "x"]}}, "optim.betas[1]"),
    ({"optim": 3}, "optim"),
    ({"seed": "abc"}, "seed"),
])
def test_type_errors_name_the_field(data, field_name):
    with pytest.raises(ConfigError) as exc:
        from_dict(Run, data)
    assert str(exc.value).startswith(field_name + ":") or f" {field_name}" in str(exc.value), str(exc.value)


def test_lossless_coercions():
    run = from_dict(Run, {"steps": 4.0, "optim": {"lr": 1, "betas": [0.8, 0.9]}, "seed": None})
    assert run.steps == 4 and isinstance(run.steps, int)
    assert run.optim.lr == 1.0 and isinstance(run.optim.lr, float)
    assert run.optim.betas == (0.8, 0.9) and isinstance(run.optim.betas, tuple)
    assert run.seed is None
    assert from_dict(Run, {"seed": 7}).seed == 7


def test_literal_choices():
    assert from_dict(Optim, {"kind": "sgd"}).kind == "sgd"
    with pytest.raises(ConfigError) as exc:
        from_dict(Optim, {"kind": "lion"})
    msg = str(exc.value)
    assert "kind" in msg and "'lion'" in msg and "'adamw'" in msg and "'sgd'" in msg


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="expected a mapping"):
        from_dict(Run, ["steps", 3])


# -- overrides -------------------------------------------------------------------------------------

def test_apply_overrides_parses_values_and_nested_keys():
    base = Run()
    run = apply_overrides(base, ["steps=20", "optim.lr=3e-4", "optim.kind=sgd", "compile=true",
                                 "tags=[a, b]", "name=x=y", "seed=null"])
    assert run.steps == 20 and run.optim.lr == pytest.approx(3e-4) and run.optim.kind == "sgd"
    assert run.compile is True and run.tags == ["a", "b"] and run.name == "x=y" and run.seed is None
    assert base == Run(), "overrides must return a copy"


def test_apply_overrides_from_dict():
    assert apply_overrides(Run(), {"optim.lr": 0.1, "steps": 2}) == Run(steps=2, optim=Optim(lr=0.1))


@pytest.mark.parametrize("override, needle", [
    ("stepz=3", "stepz"),
    ("optim.momentum=0.9", "optim.momentum"),
    ("steps.inner=3", "'steps' is not a config section"),
    ("steps", "key=value"),
    ("optim.kind=lion", "lion"),
    ("steps=many", "steps"),
])
def test_bad_overrides(override, needle):
    with pytest.raises(ConfigError) as exc:
        apply_overrides(Run(), [override])
    assert needle in str(exc.value)


def test_unknown_override_lists_valid_keys():
    with pytest.raises(ConfigError) as exc:
        apply_overrides(ModelConfig(), ["n_layer=4"])
    assert "n_layers" in str(exc.value) and "d_model" in str(exc.value)


def test_model_config_override_revalidates():
    cfg = apply_overrides(ModelConfig(), ["n_routed_experts=16", "top_k=4", "router=sigmoid"])
    assert (cfg.n_routed_experts, cfg.top_k, cfg.router) == (16, 4, "sigmoid")
    with pytest.raises(ConfigError, match="n_kv_heads"):
        apply_overrides(ModelConfig(), ["n_kv_heads=3"])


# -- files -----------------------------------------------------------------------------------------

def test_yaml_and_json_files_round_trip(tmp_path):
    run = Run(name="r", steps=5, optim=Optim(lr=0.25, betas=(0.5, 0.6), kind="sgd"), tags=["t"])
    for suffix in (".json", ".yaml", ".yml"):
        path = tmp_path / f"run{suffix}"
        save_file(run, path)
        assert load_file(Run, path) == run
    assert json.loads((tmp_path / "run.json").read_text())["optim"]["lr"] == 0.25


def test_yaml_file_written_by_hand(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("name: hand\nsteps: 7\noptim:\n  lr: 1.0e-2\n  kind: sgd\n")
    assert load_file(Run, path) == Run(name="hand", steps=7, optim=Optim(lr=0.01, kind="sgd"))
    # YAML 1.1 reads `3e-4` (no dot) as a string; a float field must still take it.
    path.write_text("optim:\n  lr: 3e-4\n  betas: [9e-1, 1E0]\n")
    assert load_file(Run, path).optim == Optim(lr=3e-4, betas=(0.9, 1.0))
    (tmp_path / "empty.yaml").write_text("")
    assert load_file(Run, tmp_path / "empty.yaml") == Run()


def test_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="cannot read"):
        load_file(Run, tmp_path / "missing.yaml")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_file(Run, tmp_path / "bad.json")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_file(Run, tmp_path / "bad.yaml")
    (tmp_path / "unknown.yaml").write_text("stepz: 3\n")
    with pytest.raises(ConfigError, match="stepz.*valid keys"):
        load_file(Run, tmp_path / "unknown.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="expected a mapping"):
        load_file(Run, tmp_path / "list.yaml")


def test_model_config_file_round_trip(tmp_path):
    cfg = preset("small")
    save_file(cfg, tmp_path / "model.yaml")
    assert load_file(ModelConfig, tmp_path / "model.yaml") == cfg


# -- ModelConfig -----------------------------------------------------------------------------------

def test_defaults_are_tiny_preset_and_derived_fields():
    cfg = ModelConfig()
    assert cfg == preset("tiny")
    assert cfg.head_dim == cfg.d_model // cfg.n_heads
    assert cfg.shared_ffn_dim == 0
    assert ModelConfig(n_shared_experts=2, moe_ffn_dim=32).shared_ffn_dim == 64
    assert ModelConfig(n_layers=3, first_k_dense=1).n_moe_layers == 2
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize("kwargs, needle", [
    (dict(n_heads=4, n_kv_heads=3), "n_heads (4) must be a multiple of n_kv_heads (3)"),
    (dict(top_k=9, n_routed_experts=16), "top_k must be 1..8"),
    (dict(top_k=0), "top_k must be 1..8"),
    (dict(top_k=4, n_routed_experts=2), "top_k (4) exceeds n_routed_experts (2)"),
    (dict(d_model=66, n_heads=4), "d_model (66) must be divisible by n_heads (4)"),
    (dict(head_dim=7), "head_dim (7) must be even"),
    (dict(first_k_dense=3, n_layers=2), "first_k_dense must be 0..n_layers"),
    (dict(window=0), "window must be >= 1"),
    (dict(n_global_tokens=-1), "n_global_tokens >= 0"),
    (dict(vocab_size=0), "vocab_size must be positive"),
])
def test_model_config_validation(kwargs, needle):
    with pytest.raises(ConfigError) as exc:
        ModelConfig(**kwargs)
    assert needle in str(exc.value)
    with pytest.raises(ConfigError) as exc:  # the same through the dict path
        ModelConfig.from_dict(kwargs)
    assert needle in str(exc.value)


def test_model_config_reports_every_problem_at_once():
    with pytest.raises(ConfigError) as exc:
        ModelConfig(n_kv_heads=3, top_k=12)
    assert "n_kv_heads" in str(exc.value) and "top_k" in str(exc.value)


def test_all_dense_model_may_have_top_k_above_expert_count():
    cfg = ModelConfig(n_layers=2, first_k_dense=2, n_routed_experts=1, top_k=2)
    assert cfg.n_moe_layers == 0


def test_model_config_literals():
    with pytest.raises(ConfigError, match="'relu'"):
        ModelConfig.from_dict({"router": "relu"})
    with pytest.raises(ConfigError, match="attention"):
        ModelConfig.from_dict({"attention": "linear"})


def test_presets():
    assert set(PRESETS) >= {"tiny", "small", "mixtral-tiny", "base", "large"}
    for name in PRESETS:
        assert isinstance(preset(name), ModelConfig)
    small = preset("small")
    assert (small.router, small.first_k_dense, small.tie_embeddings) == ("sigmoid", 1, True)
    assert preset("tiny", n_routed_experts=16).n_routed_experts == 16
    with pytest.raises(ConfigError, match="unknown key.*n_expert"):
        preset("tiny", n_expert=16)


def test_unknown_preset_lists_presets():
    with pytest.raises(ConfigError) as exc:
        preset("nope")
    msg = str(exc.value)
    assert "'nope'" in msg
    for name in PRESETS:
        assert name in msg
