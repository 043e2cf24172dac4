"""Transaction-fraud detection end to end: prepare -> train -> evaluate -> compress -> serve -> query.

    python examples/fraud/run.py prepare                  # synthetic transactions -> runs/fraud/data
    python examples/fraud/run.py train                    # teacher (6-layer LSTM), transformer, 2-layer LSTM
    python examples/fraud/run.py evaluate                 # + HGB baseline; results.json, pr_curve.png
    python examples/fraud/run.py compress                 # distil 6 -> 2 layers, INT8 ONNX, model repository
    python examples/fraud/run.py serve                    # ds serve the repository on :8080 (dynamic batching)
    python examples/fraud/run.py query                    # a client: scores test windows, one malformed request

Every command takes ``--out DIR`` (default runs/fraud) and ``--threads N`` (default 1). See README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
for path in (str(ROOT), str(HERE.parent)):  # the checkout without `pip install -e .`; the package `fraud`
    if path not in sys.path:
        sys.path.insert(0, path)

from deepseek.errors import UserFacingError  # noqa: E402

from fraud.features import N_FEATURES, window_features  # noqa: E402
from fraud.generate import PATTERNS, Transactions, generate  # noqa: E402
from fraud.metrics import summary  # noqa: E402
from fraud.model import FraudLSTM, FraudTransformer  # noqa: E402
from fraud import training  # noqa: E402

# name -> (kind, layers, hidden, steps at full size)
MODELS = {"teacher": ("lstm", 6, 64, 800), "transformer": ("transformer", 2, 64, 800),
          "lstm2_scratch": ("lstm", 2, 64, 800)}
STUDENT_LAYERS = 2


class FraudExampleError(UserFacingError):
    """A missing step (no data, no trained teacher): the message says which command to run first."""


def _console():
    from rich.console import Console
    return Console()


def _data(out: Path) -> training.Dataset:
    file = out / "data" / "transactions.npz"
    if not file.is_file():
        raise FraudExampleError(f"{file} is missing: run `python examples/fraud/run.py prepare --out {out}` first")
    meta = json.loads((out / "data" / "meta.json").read_text())
    return training.load_dataset(Transactions.load(file), meta["days"])


def _trained(out: Path, name: str) -> Path:
    path = out / "models" / name / "model"
    if not (path / "model.safetensors").is_file():
        raise FraudExampleError(f"{path} is missing: run `python examples/fraud/run.py train --out {out}` first")
    return path


# -- commands ------------------------------------------------------------------------------------------

def cmd_prepare(args) -> dict:
    tx = generate(accounts=args.accounts, days=args.days, seed=args.seed, progress=True)
    (args.out / "data").mkdir(parents=True, exist_ok=True)
    tx.save(args.out / "data" / "transactions.npz")
    (args.out / "data" / "meta.json").write_text(json.dumps({"accounts": args.accounts, "days": args.days,
                                                             "seed": args.seed}) + "\n")
    data = training.load_dataset(tx, args.days)
    stats = {"transactions": len(tx), "fraud_rate": float(tx.is_fraud.mean()), "accounts": args.accounts}
    for split in ("train", "val", "test"):
        _, y = data.windows(split)
        stats[f"{split}_windows"], stats[f"{split}_positives"] = len(y), int(y.sum())
    _console().print(f"{len(tx):,} transactions, {stats['fraud_rate']:.3%} fraud -> {args.out / 'data'}; windows: "
                     + ", ".join(f"{s} {stats[s + '_windows']:,} ({stats[s + '_positives']} fraud)"
                                 for s in ("train", "val", "test")))
    return stats


def _build(kind: str, layers: int, hidden: int) -> torch.nn.Module:
    if kind == "lstm":
        return FraudLSTM(N_FEATURES, hidden=hidden, layers=layers)
    return FraudTransformer(N_FEATURES, hidden=hidden, layers=layers, window=training.WINDOW)


def cmd_train(args) -> dict:
    data = _data(args.out)
    names = args.only or list(MODELS)
    results = {}
    for name in names:
        if name not in MODELS:
            raise FraudExampleError(f"unknown model {name!r}; one of {', '.join(MODELS)}")
        kind, layers, hidden, steps = MODELS[name]
        steps = args.steps or steps
        torch.manual_seed(args.seed)  # the initialisation: the same whichever models this run trains
        model = _build(kind, layers, hidden)
        _console().print(f"[bold]{name}[/]: {kind}, {layers} layers, hidden {hidden}, "
                         f"{sum(p.numel() for p in model.parameters()):,} parameters, {steps} steps")
        results[name] = training.train_model(model, data, args.out / "models" / name, steps=steps, seed=args.seed)
    return results


def _hgb(data: training.Dataset, console) -> dict:
    from fraud.baseline import fit_hgb

    x = {}
    for split in ("train", "val", "test"):
        idx, y = data.windows(split)
        x[split] = (window_features(data.tx, data.raw, idx), y.numpy())
    model, tuning = fit_hgb(*x["train"], *x["val"],
                            progress=lambda it, ap: console.print(f"  HGB max_iter={it}: val PR-AUC {ap:.4f}"))
    scores = {s: model.decision_function(x[s][0]) for s in ("val", "test")}  # log-odds: no ties at 1.0
    return {"labels": {s: x[s][1] for s in ("val", "test")}, "scores": scores,
            "extra": {"max_iter": max(tuning, key=tuning.get)}}


def _onnx_eval(data: training.Dataset, onnx_file: Path) -> dict:
    from fraud.features import windows_tensor
    from fraud.serving import onnx_scores

    out = {"labels": {}, "scores": {}, "extra": {}}
    for split in ("val", "test"):
        idx, y = data.windows(split)
        out["labels"][split], out["scores"][split] = y.numpy(), onnx_scores(onnx_file, windows_tensor(data.inputs_NF, idx))
    return out


def cmd_evaluate(args) -> dict:
    console = _console()
    data = _data(args.out)
    _, y_test = data.windows("test")
    scored = {}
    t0 = time.perf_counter()
    scored["hgb_baseline"] = _hgb(data, console)
    scored["hgb_baseline"]["extra"]["fit_s"] = round(time.perf_counter() - t0, 1)
    for name in MODELS:
        if (args.out / "models" / name / "model" / "model.safetensors").is_file():
            model = training.load_model(_trained(args.out, name))
            labels, scores = {}, {}
            for split in ("val", "test"):
                labels[split], scores[split] = training.predict(model, data, split)
            scored[name] = {"labels": labels, "scores": scores, "extra": {
                "parameters": sum(p.numel() for p in model.parameters())}}
    for name, file in (("student_distilled_fp32", args.out / "onnx" / "student" / "model.onnx"),
                       ("student_distilled_int8", args.out / "onnx" / "student" / "model.int8.onnx")):
        if file.is_file():
            scored[name] = _onnx_eval(data, file)
            scored[name]["extra"]["onnx_bytes"] = file.stat().st_size
    results = {"positive_rate_test": float(y_test.float().mean()), "models": {}}
    pattern = data.tx.pattern[data.sampler.split_events("test").numpy()]  # which planted pattern, -1 genuine
    for name, s in scored.items():
        results["models"][name] = summary(s["labels"]["val"], s["scores"]["val"], s["labels"]["test"],
                                          s["scores"]["test"]) | s["extra"]
        flagged = s["scores"]["test"] >= results["models"][name]["threshold"]
        results["models"][name]["test_recall_by_pattern"] = {
            p: float(flagged[pattern == i].mean()) for i, p in enumerate(PATTERNS) if (pattern == i).any()}
    _print_results(results, console)
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    plot = _plot_pr(scored, args.out / "pr_curve.png", results["positive_rate_test"])
    if plot:
        console.print(f"PR curves: {plot}")
    return results


def _print_results(results: dict, console) -> None:
    from rich.table import Table

    table = Table(title=f"fraud, test windows (positive rate {results['positive_rate_test']:.3%}); recall at the "
                        f"threshold chosen for 1% FPR on validation, overall and per planted pattern")
    for column in ("model", "val PR-AUC", "test PR-AUC", "recall @1% FPR", "FPR reached", *PATTERNS):
        table.add_column(column, justify="right")
    for name, m in results["models"].items():
        table.add_row(name, f"{m['val_pr_auc']:.4f}", f"{m['test_pr_auc']:.4f}", f"{m['test_recall_at_1pct_fpr']:.3f}",
                      f"{m['test_fpr_reached']:.4f}",
                      *(f"{m['test_recall_by_pattern'].get(p, float('nan')):.2f}" for p in PATTERNS))
    console.print(table)


def _plot_pr(scored: dict, path: Path, positive_rate: float):
    try:
        from matplotlib.figure import Figure
    except ImportError:
        return None
    from sklearn.metrics import average_precision_score, precision_recall_curve

    fig = Figure(figsize=(6, 4.5))
    ax = fig.add_subplot()
    for name in ("hgb_baseline", "teacher", "transformer", "student_distilled_int8"):
        if name in scored:
            y, s = scored[name]["labels"]["test"], scored[name]["scores"]["test"]
            precision, recall, _ = precision_recall_curve(y, s)
            ax.step(recall, precision, where="post", label=f"{name} (AP {average_precision_score(y, s):.3f})")
    ax.axhline(positive_rate, color="grey", linestyle=":", label=f"positive rate {positive_rate:.3%}")
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("synthetic card fraud, test period")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def cmd_compress(args) -> dict:
    from fraud.serving import add_to_repository, export_model

    console = _console()
    data = _data(args.out)
    teacher = training.load_model(_trained(args.out, "teacher"))
    hidden = teacher.hparams["hidden"]
    torch.manual_seed(args.seed)
    student = FraudLSTM(N_FEATURES, hidden=hidden, layers=STUDENT_LAYERS)
    steps = args.steps or MODELS["teacher"][3]
    console.print(f"distilling the {teacher.hparams['layers']}-layer teacher into a {STUDENT_LAYERS}-layer student, "
                  f"{steps} steps")
    training.train_model(student, data, args.out / "models" / "student", steps=steps, seed=args.seed, teacher=teacher)
    student = student.cpu().eval()  # export on the CPU, whatever device trained it
    exported = {}
    for name, model, int8 in (("teacher", teacher, False), ("student", student, True)):
        exported[name] = export_model(model, training.WINDOW, N_FEATURES, args.out / "onnx" / name, int8=int8)
    repo = args.out / "repository"
    add_to_repository(repo, "fraud_teacher", args.out / "onnx" / "teacher" / "model.onnx", exported["teacher"]["report"])
    add_to_repository(repo, "fraud_student", args.out / "onnx" / "student" / "model.int8.onnx",
                      exported["student"]["report"])
    add_to_repository(repo, "fraud_student_fp32", args.out / "onnx" / "student" / "model.onnx",
                      exported["student"]["report"])  # to measure what INT8 itself buys when served
    sizes = {"teacher_fp32_onnx_bytes": exported["teacher"]["fp32_bytes"],
             "student_fp32_onnx_bytes": exported["student"]["fp32_bytes"],
             "student_int8_onnx_bytes": exported["student"]["int8_bytes"]}
    console.print(f"model repository: {repo} (fraud_teacher fp32, fraud_student int8, fraud_student_fp32); "
                  f"sizes {sizes}")
    (args.out / "compress.json").write_text(json.dumps(sizes, indent=2) + "\n")
    return sizes


def cmd_serve(args) -> None:
    import deepseek as ds

    repo = args.out / "repository"
    if not repo.is_dir():
        raise FraudExampleError(f"{repo} is missing: run `python examples/fraud/run.py compress --out {args.out}` first")
    _console().print(f"serving {repo} on http://127.0.0.1:{args.port} (Ctrl-C stops)")
    ds.serve(str(repo), port=args.port, torch_threads=args.threads)


def cmd_query(args) -> dict:
    import httpx

    from fraud.features import windows_tensor
    from fraud.serving import fraud_probabilities, infer_body

    console = _console()
    data = _data(args.out)
    idx, y = data.windows("test")
    rows = torch.cat([torch.nonzero(y == 1)[:3, 0], torch.nonzero(y == 0)[:3, 0]])
    url = f"http://127.0.0.1:{args.port}/v2/models/{args.model}/infer"
    answer = httpx.post(url, json=infer_body(windows_tensor(data.inputs_NF, idx[rows])), timeout=30)
    answer.raise_for_status()
    for row, p in zip(rows.tolist(), fraud_probabilities(answer.json())):
        console.print(f"test window {row}: fraud probability {p:.4f} (label {int(y[row])})")
    bad = httpx.post(url, json={"inputs": [{"name": "transactions", "shape": [1, 3], "datatype": "FP32",
                                            "data": [0.0, 1.0, 2.0]}]}, timeout=30)
    console.print(f"a malformed request (shape [1, 3]) -> {bad.status_code}: {bad.json().get('error')}")
    return {"status": answer.status_code, "malformed_status": bad.status_code}


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "compress": cmd_compress,
            "serve": cmd_serve, "query": cmd_query}


def parse_args(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--out", type=Path, default=Path("runs/fraud"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--accounts", type=int, default=1000, help="prepare: cardholders")
    parser.add_argument("--days", type=int, default=180, help="prepare: days simulated")
    parser.add_argument("--steps", type=int, default=None, help="train/compress: steps (default per model)")
    parser.add_argument("--only", nargs="*", help=f"train: which of {', '.join(MODELS)}")
    parser.add_argument("--port", type=int, default=8080, help="serve/query")
    parser.add_argument("--model", default="fraud_student", help="query: fraud_student or fraud_teacher")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    except UserFacingError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2)


if __name__ == "__main__":
    main()
