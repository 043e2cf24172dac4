"""Distillation on the quickstart model: a half-depth student trained N steps with vs without its teacher.

Teacher: ``runs/quickstart/model`` (the `small` preset, 4 layers, 4096-token BPE, trained by ``ds quickstart``) on
its data ``runs/quickstart/data`` (seq 256). Student: the same config with ``--student-layers`` (default 2)
layers, initialised from the teacher by :func:`deepseek.compress.distill.init_student_from_teacher` (layers 0 and
3, embeddings, norm, tied head). Two copies of that one initial student are trained for ``--steps`` steps
(default 150) with identical everything -- data order, seed, schedule, lr, precision, batch -- except the loss:

  with KD      distill_lm(teacher, ...): alpha * T^2 * KL(teacher_T || student_T) + (1 - alpha) * CE
  without KD   finetune(...): the plain next-token cross-entropy

and both go through the real Trainer (deepseek.compress.finetune). Printed: validation perplexity (the first
``--eval-batches`` x 8 windows of 256 tokens of the validation split, the same windows for every model) of
the teacher, the student before training, with KD and without KD, the ratio ppl(without) / ppl(with)
(> 1: the teacher helped), and the training time of each run (KD pays a teacher forward per step).

    python benchmarks/bench_distill.py [--steps 150] [--student-layers 2] [--temperature 1] [--alpha 0.7]
                                       [--lr 1e-3] [--precision bf16] [--threads 1]

``--steps 10`` checks that it runs (~1 min). Measured at 10 steps, 1 thread, bf16, on a busy 2-core host: a KD
step took ~2.6 s against ~0.9 s without (the teacher's forward, the student's full [16, 256, 4096] logits instead
of the fused head + loss, and the fp32 KL over the vocabulary), so 150 steps are ~10 min in all.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO_ROOT, machine_info, missing_model, print_machine, print_table, setup_path, write_results  # noqa: E402

setup_path()
import torch  # noqa: E402

import deepseek as ds  # noqa: E402
from deepseek.compress.distill import distill_lm, init_student_from_teacher, student_config  # noqa: E402
from deepseek.compress.finetune import finetune, finetune_config, validation_perplexity  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--teacher", default=str(REPO_ROOT / "runs" / "quickstart" / "model"))
    parser.add_argument("--data", default=str(REPO_ROOT / "runs" / "quickstart" / "data"))
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--student-layers", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=1.0,
                        help="T (default 1: on the tiny byte-level LM T=2 made distillation worse than none)")
    parser.add_argument("--alpha", type=float, default=0.7, help="weight of the KD term (1 - alpha on the CE)")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--precision", default="auto", choices=["auto", "fp32", "bf16"])
    parser.add_argument("--eval-batches", type=int, default=8, help="validation batches of 8 x seq-len tokens")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if missing_model(args.teacher, "--teacher/--data"):
        return
    torch.set_num_threads(args.threads)
    info = machine_info()
    print_machine(info)

    teacher, tokenizer = ds.load(args.teacher)
    cfg = student_config(teacher.config, n_layers=args.student_layers)
    initial = init_student_from_teacher(teacher, cfg, seed=args.seed)
    print(f"teacher: {teacher.config.n_layers} layers, {teacher.num_parameters():,} parameters; student: "
          f"{cfg.n_layers} layers (teacher layers {initial.init_report['layer_map']}), "
          f"{initial.num_parameters():,} parameters, {len(initial.init_report['random'])} tensors left random")

    def val(model):
        return validation_perplexity(model, args.data, seq_len=args.seq_len, batch_size=8,
                                     max_batches=args.eval_batches)

    results = {"teacher": val(teacher), "student_before": val(initial)}
    timings = {}
    scratch = Path(tempfile.mkdtemp(prefix="bench-distill-"))
    try:
        for name in ("with_kd", "without_kd"):
            student = init_student_from_teacher(teacher, cfg, seed=args.seed)
            config = finetune_config(args.data, scratch / name, steps=args.steps, lr=args.lr,
                                     batch_size=args.batch_size, seq_len=args.seq_len, warmup_steps=args.warmup,
                                     precision=args.precision, seed=args.seed, progress=False, eval_batches=1,
                                     overrides=["checkpoint.every=0"])
            start = time.perf_counter()
            if name == "with_kd":
                distill_lm(teacher, student, config, temperature=args.temperature, alpha=args.alpha,
                           tokenizer=tokenizer)
            else:
                finetune(student, config, tokenizer=tokenizer)
            timings[name] = time.perf_counter() - start
            results[name] = val(student)
            print(f"{name}: {args.steps} steps in {timings[name]:.0f} s, val ppl {results[name]['val_ppl']:.2f}",
                  flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    ratio = results["without_kd"]["val_ppl"] / results["with_kd"]["val_ppl"]
    print(f"\n{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, {args.precision}, lr {args.lr}, "
          f"T {args.temperature}, alpha {args.alpha}, {args.threads} thread(s)\n")
    rows = [[name.replace("_", " "), f"{r['val_loss']:.4f}", f"{r['val_ppl']:.2f}",
             f"{timings[name]:.0f}" if name in timings else ""] for name, r in results.items()]
    print_table(["model", "val loss", "val ppl", "train s"], rows)
    print(f"\nppl without KD / ppl with KD = {ratio:.3f} (> 1: the teacher helped)")
    write_results("distill", {"machine": info, "args": vars(args), "results": results, "train_seconds": timings,
                              "ppl_ratio_without_over_with": ratio,
                              "layer_map": initial.init_report["layer_map"]})


if __name__ == "__main__":
    main()
