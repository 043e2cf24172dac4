"""``ds init`` and the CLI's error handling, through the console script's entry point (the ds_main fixture)."""

import deepseek as ds


def test_init_writes_a_loadable_model_directory_with_overrides(tmp_path, ds_main):
    result = ds_main("init", str(tmp_path / "m"), "--preset", "tiny", "n_routed_experts=16", "top_k=3", "--seed", "1")
    assert result.returncode == 0, result.stderr
    model, tokenizer = ds.load(tmp_path / "m")
    assert model.config.n_routed_experts == 16 and model.config.top_k == 3
    assert tokenizer.get_vocab_size() == 259


def test_init_rejects_unknown_keys_with_the_valid_ones(tmp_path, ds_main):
    result = ds_main("init", str(tmp_path / "m"), "n_expert=16")
    assert result.returncode == 2
    assert "unknown key n_expert" in result.stderr and "n_routed_experts" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "m").exists()
