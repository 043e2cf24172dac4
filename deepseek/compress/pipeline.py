"""One call per ``ds compress --method``: load the model directory, compress, fine-tune when asked, save.

    path, summary = compress("runs/quickstart/model", "runs/int8", "int8-dynamic")
    path, summary = compress(src, "runs/pruned", "prune-channels", ratio=0.3,
                             training=dict(data="runs/quickstart/data", steps=200, lr=1e-3))

Every output is an ordinary model directory plus ``compression.json`` (method, source, date, details), so
``ds.load``, ``ds generate``, ``ds eval`` and ``ds serve`` need nothing else to use it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from deepseek.compress.finetune import finetune, finetune_config
from deepseek.compress.quantize import compression_record, quantization_entry, quantize, save_compressed
from deepseek.models.directory import load

QUANTIZATION_METHODS = ("int8-dynamic", "int8-weight", "int4-weight")


def _training_config(out: Path, training: dict[str, Any], default_steps: int = 0):
    steps = int(training.get("steps") or default_steps)
    if steps < 1:
        return None
    data = training.get("data")
    if data is None:
        raise ValueError("fine-tuning needs a prepared data directory (--data)")
    run_dir = training.get("run_dir") or out.parent / f"{out.name}.run"
    return finetune_config(data, run_dir, steps=steps, lr=training.get("lr", 3e-4),
                           batch_size=training.get("batch_size", 16), seq_len=training.get("seq_len", 256),
                           precision=training.get("precision", "auto"), resume=bool(training.get("resume")),
                           warmup_steps=min(20, steps // 10))


def _finetune_summary(result) -> Optional[dict[str, Any]]:
    if result is None:
        return None
    return {"steps": result.step, "final_loss": round(result.loss, 4),
            **({k: round(v, 4) for k, v in (result.final_eval or {}).items()})}


def compress(model_dir: str | Path, out: str | Path, method: str, *, training: Optional[dict[str, Any]] = None,
             **options: Any) -> tuple[Path, str]:
    """Compress ``model_dir`` into ``out`` with ``method``; returns the written path and a one-line summary."""
    source, out = Path(model_dir), Path(out)
    training = dict(training or {})
    model, tokenizer = load(source)
    details: dict[str, Any] = {}
    quantization = None

    if method in QUANTIZATION_METHODS:
        group_size = options.get("group_size", 32)
        quantize(model, method, group_size=group_size)
        quantization = quantization_entry(method, group_size)
        summary = f"{method}: every Linear, expert and the embedding quantized"
    elif method == "qat":
        from deepseek.compress.qat import convert_qat, prepare_qat

        scheme, group_size = options.get("scheme", "int8-dynamic"), options.get("group_size", 32)
        config = _training_config(out, training)
        if config is None:
            raise ValueError("qat trains: give steps >= 1 and data")
        prepare_qat(model, scheme, group_size=group_size)
        result = finetune(model, config, tokenizer=tokenizer)
        convert_qat(model)
        quantization = quantization_entry(scheme, group_size)
        details["training"] = _finetune_summary(result)
        summary = f"qat {scheme}: {result.step} fake-quantized steps, converted"
    elif method.startswith("prune-"):
        model, details, summary = _prune(model, method, options, out, training, tokenizer)
    elif method == "distill":
        model, details, summary = _distill(model, options, out, training, tokenizer)
    else:
        raise ValueError(f"unknown method {method!r}")

    record = compression_record(method, source=source, quantization=quantization, **details)
    return save_compressed(model, tokenizer, out, record, source=source), summary


def _prune(model, method: str, options: dict[str, Any], out: Path, training: dict[str, Any], tokenizer):
    from deepseek.compress import prune

    if method == "prune-unstructured":
        report = prune.prune_unstructured(model, options.get("sparsity", 0.5), scope=options.get("scope", "global"))
    elif method == "prune-channels":
        model, report = prune.prune_channels(model, options.get("ratio", 0.3), heads=options.get("heads", True))
    elif method == "prune-experts":
        from deepseek.data import eval_batches

        keep = options.get("keep")
        if keep is None:
            raise ValueError("prune-experts: give keep (routed experts kept per layer)")
        data = training.get("data")
        if data is None:
            raise ValueError("prune-experts gathers router statistics on calibration data: give data")
        batches = eval_batches(str(data), split="train", batch_size=8, seq_len=min(training.get("seq_len", 256),
                                                                                model.config.max_seq_len),
                               max_batches=options.get("calibration_batches", 16))
        stats = prune.gather_router_stats(model, batches)
        model, report = prune.prune_experts(model, keep=keep, stats=stats, mode=options.get("mode", "drop"))
    else:
        raise ValueError(f"unknown pruning method {method!r}")
    details = {"pruning": report.to_dict()}
    config = _training_config(out, training)
    summary = (f"{method}: {report.parameters_before:,} -> {report.parameters_after:,} parameters"
               + (f", sparsity {report.sparsity:.1%}" if method == "prune-unstructured" else ""))
    if config is not None:
        if method == "prune-unstructured":
            raise ValueError("fine-tuning would refill the zeroed weights of prune-unstructured; give no steps")
        result = finetune(model, config, tokenizer=tokenizer)
        details["training"] = _finetune_summary(result)
        summary += f", fine-tuned {result.step} steps"
    return model, details, summary


def _distill(teacher, options: dict[str, Any], out: Path, training: dict[str, Any], tokenizer):
    from deepseek.compress import distill

    config = _training_config(out, training)
    if config is None:
        raise ValueError("distill trains: give steps >= 1 and data")
    layers = options.get("student_layers") or max(1, teacher.config.n_layers // 2)
    student_cfg = distill.student_config(teacher.config, n_layers=layers,
                                         n_routed_experts=options.get("student_experts"))
    student = distill.init_student_from_teacher(teacher, student_cfg)
    result = distill.distill_lm(teacher, student, config, temperature=options.get("temperature", 1.0),
                                alpha=options.get("alpha", 0.7), tokenizer=tokenizer)
    details = {"distillation": {"teacher_layers": teacher.config.n_layers, "student_layers": layers,
                                "temperature": options.get("temperature", 1.0), "alpha": options.get("alpha", 0.7)},
               "training": _finetune_summary(result)}
    summary = (f"distill: {teacher.num_parameters():,} -> {student.num_parameters():,} parameters, "
               f"{result.step} steps")
    return student, details, summary
