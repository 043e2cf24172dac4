"""``ds compress`` and ``ds compress report`` as a user runs them (the console entry point, in this process), on the
trained tiny model."""

import json

import deepseek as ds
from deepseek.nn.quantized import is_quantized


def test_compress_int8_then_report(tmp_path, trained_tiny, lm_data, ds_main):
    out = tmp_path / "int8"
    result = ds_main("compress", trained_tiny, "--method", "int8-dynamic", "--out", out)
    assert result.returncode == 0, result.stderr
    model, _ = ds.load(out)
    assert is_quantized(model)
    record = json.loads((out / "compression.json").read_text())
    assert record["method"] == "int8-dynamic" and record["source"] == str(trained_tiny)

    result = ds_main("compress", "report", trained_tiny, out, "--data", lm_data, "--rounds", "1")
    assert result.returncode == 0, result.stderr
    assert "bytes on disk" in result.stdout and "validation perplexity" in result.stdout
    report = json.loads((out / "compression-report.json").read_text())
    assert report["compressed"]["method"] == "int8-dynamic"
    assert report["ratios"]["parameters"] == 1.0
    assert report["ratios"]["bytes"] < 0.35
    assert report["compressed"]["val_ppl"] < report["original"]["val_ppl"] * 1.02
    assert (out / "compression-report.png").stat().st_size > 0
    (kernel,) = report["compressed"]["kernels"]  # which kernel ran here, and why
    assert kernel["scheme"] == "int8-dynamic" and kernel["kernel"] in ("int_mm", "dequant") and kernel["reason"]
    assert "kernels on this CPU" in result.stdout
    slower = any((report["compressed"][k] > report["original"][k]) if k != "decode_tokens_per_s"
                 else (report["compressed"][k] < report["original"][k])
                 for k in ("latency_b1_ms", "latency_b8_ms", "decode_tokens_per_s"))
    assert len(report["notes"]) == int(slower)  # a slower compressed model always carries its note
    assert not slower or kernel["reason"].removeprefix("auto: ") in report["notes"][0]

    generated = ds_main("generate", out, "def ", "--max-new-tokens", "5", "--temperature", "0")
    assert generated.returncode == 0, generated.stderr


def test_compress_qat_trains_and_converts(tmp_path, trained_tiny, lm_data, ds_main):
    out = tmp_path / "qat"
    result = ds_main("compress", trained_tiny, "--method", "qat", "--scheme", "int4-weight", "--data", lm_data,
                    "--steps", "4", "--batch-size", "4", "--seq-len", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    model, _ = ds.load(out)
    assert is_quantized(model)
    record = json.loads((out / "compression.json").read_text())
    assert record["quantization"]["scheme"] == "int4-weight" and record["training"]["steps"] == 4
    assert (tmp_path / "qat.run" / "metrics.jsonl").is_file()  # the ordinary trainer ran it


def test_compress_prune_channels_with_finetune(tmp_path, trained_tiny, lm_data, ds_main):
    out = tmp_path / "pruned"
    result = ds_main("compress", trained_tiny, "--method", "prune-channels", "--ratio", "0.5", "--data", lm_data,
                    "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    original, _ = ds.load(trained_tiny)
    pruned, tokenizer = ds.load(out)
    assert pruned.num_parameters() < original.num_parameters()
    assert ds.generate(pruned, tokenizer, "def ", max_new_tokens=4, temperature=0.0).completion_tokens == 4


def test_compress_errors_are_one_line(tmp_path, trained_tiny, ds_main):
    result = ds_main("compress", trained_tiny, "--method", "int3", "--out", tmp_path / "x")
    assert result.returncode == 2 and "methods: int8-dynamic" in result.stderr
    result = ds_main("compress", trained_tiny, "--method", "qat", "--out", tmp_path / "x")
    assert result.returncode == 2 and "needs a prepared data directory" in result.stderr
    result = ds_main("compress", tmp_path / "missing", "--method", "int8-weight", "--out", tmp_path / "x")
    assert result.returncode == 1 and "is not a directory" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "x").exists()


def test_compress_distill_writes_a_smaller_student(tmp_path, trained_tiny, lm_data, ds_main):
    out = tmp_path / "student"
    result = ds_main("compress", trained_tiny, "--method", "distill", "--student-layers", "1", "--data", lm_data,
                    "--steps", "3", "--batch-size", "4", "--seq-len", "32", "--out", out)
    assert result.returncode == 0, result.stderr
    student, _ = ds.load(out)
    assert student.config.n_layers == 1
    record = json.loads((out / "compression.json").read_text())
    assert record["distillation"]["student_layers"] == 1 and record["training"]["steps"] == 3
