"""``ds.pipeline`` and ``ds generate`` on a model directory."""


import pytest

import deepseek as ds


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, tiny):
    model, tok = tiny
    path = tmp_path_factory.mktemp("models") / "tiny"
    ds.save(model, tok, path, generation={"max_new_tokens": 7, "ignore_eos": True})
    return path


def test_pipeline_output_format_and_defaults(model_dir, tiny):
    model, tok = tiny
    pipe = ds.pipeline("text-generation", model=model_dir)
    result = pipe("def main():")
    assert isinstance(result, list) and set(result[0]) == {"generated_text"}
    expected = ds.generate(model, tok, "def main():", max_new_tokens=7, ignore_eos=True)
    assert result[0]["generated_text"] == "def main():" + expected.text
    only_new = pipe("def main():", return_full_text=False, max_new_tokens=3)
    assert only_new[0]["generated_text"] == ds.generate(model, tok, "def main():", max_new_tokens=3,
                                                         ignore_eos=True).text
    batch = pipe(["a", "b"])
    assert len(batch) == 2 and all(r[0]["generated_text"][0] in "ab" for r in batch)
    assert "".join(pipe.stream("def main():")) == expected.text


def test_pipeline_rejects_unknown_task_and_bad_defaults(model_dir, tiny):
    with pytest.raises(ValueError, match="unknown task"):
        ds.pipeline("summarization", model=model_dir)
    model, tok = tiny
    with pytest.raises(ds.ConfigError, match="valid keys"):
        ds.pipeline("text-generation", model=model, tokenizer=tok, max_tokens=3)


def test_cli_generate(model_dir, tiny, ds_main):
    model, tok = tiny
    expected = ds.generate(model, tok, "hi", max_new_tokens=5, ignore_eos=True).text
    run = ds_main("generate", model_dir, "hi", "--max-new-tokens", "5")
    assert run.returncode == 0, run.stderr
    assert run.stdout == "hi" + expected + "\n"


def test_cli_generate_missing_model_is_one_line_error(tmp_path, ds_main):
    run = ds_main("generate", tmp_path / "nope", "hi")
    assert run.returncode == 1
    assert "is not a directory" in run.stderr and "Traceback" not in run.stderr
