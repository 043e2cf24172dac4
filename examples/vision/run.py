"""Vision classification end to end on scikit-learn's digits: prepare -> train -> evaluate -> compress -> serve -> query.

    python examples/vision/run.py prepare                # the split -> runs/vision/data.npz (+ the image processor)
    python examples/vision/run.py train                  # ours (ResNet-style, MoE-ViT) + baselines, same split
    python examples/vision/run.py evaluate               # accuracy table, confusion matrix PNG
    python examples/vision/run.py compress               # QAT -> static int8 (pt2e), fp32 and int8 ONNX exports
    python examples/vision/run.py serve                  # `ds serve` both ONNX models: PNG bytes in (KServe v2 BYTES)
    python examples/vision/run.py query                  # tritonclient sends test PNGs, checks the answers
    python examples/vision/run.py query --model digits-int8   # the same through the int8 model

Common options: ``--run-dir`` (default runs/vision), ``--threads`` (torch CPU threads, default 1). Every command
reads what the one before it wrote under the run directory and adds its numbers to ``results.json``.
See examples/vision/README.md for what each model is and what the numbers mean.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
if str(ROOT) not in sys.path:  # run from a checkout without `pip install -e .`
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402


def sibling(name: str):
    """This folder's ``name``.py, imported under a name of its own (``vision_example.<name>``): other examples
    have a data.py or training.py too, and one test process may import several of them."""
    import importlib.util

    key = f"vision_example.{name}"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, HERE / f"{name}.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key]


from deepseek.vision import DeepseekForImageClassification, DeepseekImageProcessor, VisionConfig  # noqa: E402
from deepseek.vision.augment import RandomAffine  # noqa: E402

digits_data = sibling("data")

MODEL_NAME = "digits"  # the served fp32 model; its QAT int8 ONNX twin is served as "digits-int8"
OURS = {  # the framework's classifiers, by the name the run gives them
    "ours-resnet": VisionConfig(arch="resnet", widths=[16, 32, 64], blocks=1),
    "ours-moe-vit": VisionConfig(arch="moe-vit", patch_size=4, d_model=64, depth=2, n_heads=4, n_experts=4,
                                 top_k=2, expert_dim=64, shared_expert_dim=64),
}
SERVED = "ours-resnet"  # the model compressed, exported and served


def processor(side: int = 32) -> DeepseekImageProcessor:
    """8x8 digits upsampled to 32x32 (16x16 for the miniature); background 0 -> -1 after normalising."""
    return DeepseekImageProcessor(size=side, crop_size=side, num_channels=1, image_mean=[0.5], image_std=[0.5])


def augmentation() -> RandomAffine:
    return RandomAffine(degrees=12, scale=(0.9, 1.1), shift=0.08, fill=-1.0)


def console():
    from rich.console import Console

    return Console()


# -- results.json ----------------------------------------------------------------------------------------

def read_results(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "results.json"
    return json.loads(path.read_text()) if path.is_file() else {}


def update_results(run_dir: Path, section: str, values: dict[str, Any]) -> None:
    from deepseek.atomic import write_json_atomically

    results = read_results(run_dir)
    results.setdefault(section, {}).update(values)
    write_json_atomically(run_dir / "results.json", results)


def tensors(run_dir: Path) -> dict[str, torch.Tensor]:
    """The split, processed: pixels [N, 1, 32, 32] and labels, for training and test."""
    split = digits_data.load(run_dir)
    proc = DeepseekImageProcessor.from_pretrained(run_dir)
    return {"x_train": proc(list(split["x_train"])), "y_train": torch.from_numpy(split["y_train"]),
            "x_test": proc(list(split["x_test"])), "y_test": torch.from_numpy(split["y_test"])}


# -- commands --------------------------------------------------------------------------------------------

def cmd_prepare(args) -> dict[str, Any]:
    path = digits_data.prepare(args.run_dir, args.limit)
    processor(16 if args.tiny else 32).save_pretrained(args.run_dir)
    split = digits_data.load(args.run_dir)
    console().print(f"{len(split['y_train'])} training / {len(split['y_test'])} test digits -> {path}")
    return {"n_train": len(split["y_train"]), "n_test": len(split["y_test"])}


def cmd_train(args) -> dict[str, Any]:
    train_sklearn_baselines = sibling("baselines").train_sklearn_baselines
    ResNet18 = sibling("resnet18").ResNet18
    train_classifier, predict = sibling("training").train_classifier, sibling("training").predict

    out = console()
    t = tensors(args.run_dir)
    split = digits_data.load(args.run_dir)
    results: dict[str, Any] = {}
    overrides = ["progress=false", "tensorboard=false"] if args.quiet else []
    if args.batch_size:
        overrides.append(f"batch_size={args.batch_size}")
    if args.tiny:
        overrides += ["schedule.warmup_steps=3", "optimizer.lr=1e-2"]
    wanted = args.models.split(",") if args.models else [*OURS, "resnet18", "sklearn"]
    for name in wanted:
        torch.manual_seed(args.seed)
        started = time.perf_counter()
        if name == "sklearn":
            for baseline, accuracy in train_sklearn_baselines(split).items():
                results[baseline] = {"accuracy": accuracy}
                out.print(f"{baseline}: test accuracy {accuracy:.4f}")
            continue
        if name in OURS:
            side = DeepseekImageProcessor.from_pretrained(args.run_dir).crop_size
            config = dataclasses.replace(OURS[name], image_size=side)
            if args.tiny:  # the miniature test: half the widths
                config = dataclasses.replace(config, widths=[8, 16, 32], d_model=32, expert_dim=32,
                                             shared_expert_dim=32)
            model = DeepseekForImageClassification(config)
            save = _save_ours(args.run_dir)
        elif name == "resnet18":
            model = ResNet18(in_channels=1, num_classes=10)
            save = _save_state_dict
        else:
            raise SystemExit(f"unknown model {name!r}: choose from {', '.join([*OURS, 'resnet18', 'sklearn'])}")
        n_params = sum(p.numel() for p in model.parameters())
        out.print(f"[bold]{name}[/]: {n_params:,} parameters, {args.steps} steps")
        model = train_classifier(model, args.run_dir / "train" / name, (t["x_train"], t["y_train"]),
                                 (t["x_test"], t["y_test"]), steps=args.steps, augment=augmentation(),
                                 save_model=save, overrides=overrides, seed=args.seed)
        _copy_model(args.run_dir / "train" / name / "model", args.run_dir / "models" / name)
        accuracy = float((predict(model, t["x_test"]) == t["y_test"]).float().mean())
        results[name] = {"accuracy": accuracy, "parameters": n_params, "steps": args.steps,
                         "train_s": round(time.perf_counter() - started, 1)}
        out.print(f"{name}: test accuracy {accuracy:.4f} ({results[name]['train_s']} s)")
    update_results(args.run_dir, "train", results)
    return results


def _save_ours(run_dir: Path):
    def save(model, path: Path) -> None:
        model.save_pretrained(path)
        DeepseekImageProcessor.from_pretrained(run_dir).save_pretrained(path)
    return save


def _save_state_dict(model, path: Path) -> None:
    from safetensors.torch import save_file

    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().contiguous() for k, v in model.state_dict().items()}, str(path / "model.safetensors"))


def _copy_model(src: Path, dst: Path) -> None:
    import shutil

    if dst.exists():
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def load_model(run_dir: Path, name: str) -> torch.nn.Module:
    folder = run_dir / "models" / name
    if not folder.is_dir():
        raise SystemExit(f"{folder} is missing: run `python examples/vision/run.py train` first")
    if name in OURS:
        return DeepseekForImageClassification.from_pretrained(folder)
    from safetensors.torch import load_file

    model = sibling("resnet18").ResNet18()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    return model.eval()


def cmd_evaluate(args) -> dict[str, Any]:
    report = sibling("report")
    predict = sibling("training").predict
    t = tensors(args.run_dir)
    trained = read_results(args.run_dir).get("train", {})
    majority = int(torch.bincount(t["y_train"]).argmax())
    rows = {"majority class": {"accuracy": float((t["y_test"] == majority).float().mean())}}
    matrices = {}
    for name in [*OURS, "resnet18"]:
        if not (args.run_dir / "models" / name).is_dir():
            continue
        predicted = predict(load_model(args.run_dir, name), t["x_test"])
        matrices[name] = report.confusion_matrix(t["y_test"], predicted)
        rows[name] = {"accuracy": float(matrices[name].trace() / matrices[name].sum()),
                      "parameters": trained.get(name, {}).get("parameters")}
    for name in ("logistic-regression", "svc-rbf"):
        if name in trained:
            rows[name] = {"accuracy": trained[name]["accuracy"]}
    report.print_table(console(), "digits test set (360 images unless --limit)", rows)
    if SERVED in matrices:
        png = report.plot_confusion(matrices[SERVED], args.run_dir / "confusion.png",
                             f"{SERVED}: digits test set, accuracy {rows[SERVED]['accuracy']:.3f}")
        console().print(f"confusion matrix: {png}")
    update_results(args.run_dir, "evaluate", rows)
    return rows


def cmd_compress(args) -> dict[str, Any]:
    results = sibling("compress").compress_served_model(
        args.run_dir, load_model(args.run_dir, SERVED), tensors(args.run_dir),
        train_classifier=sibling("training").train_classifier, qat_steps=args.qat_steps, augment=augmentation(), quiet=args.quiet, seed=args.seed)
    update_results(args.run_dir, "compress", results)
    return results


def cmd_serve(args) -> None:
    serving = sibling("serving")
    return serving.start_server(serving.build_repository(args.run_dir), port=args.port, block=True)


def cmd_query(args) -> dict[str, Any]:
    from tritonclient.utils import InferenceServerException

    split = digits_data.load(args.run_dir)
    try:
        result = sibling("client").query_test_images(args.url, split["x_test"][:args.n], split["y_test"][:args.n],
                                                     model=args.model)
    except (OSError, RuntimeError, InferenceServerException) as exc:
        raise SystemExit(f"error: cannot query {args.url} ({type(exc).__name__}: {exc}); is "
                         f"`python examples/vision/run.py serve` running?") from None
    result["model"] = args.model
    console().print(f"{result['n']} PNGs through {args.url}/{args.model}: accuracy {result['accuracy']:.4f}, "
                    f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms (one request per image)")
    return result


COMMANDS = {"prepare": cmd_prepare, "train": cmd_train, "evaluate": cmd_evaluate, "compress": cmd_compress,
            "serve": cmd_serve, "query": cmd_query}


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=list(COMMANDS))
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vision"))
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--limit", type=int, default=0, help="prepare: keep only the first N images of each part")
    parser.add_argument("--steps", type=int, default=400, help="train: optimizer steps per network")
    parser.add_argument("--batch-size", type=int, default=0, help="train: batch size (default 64)")
    parser.add_argument("--models", default="", help="train: comma-separated subset of "
                                                     "ours-resnet,ours-moe-vit,resnet18,sklearn")
    parser.add_argument("--tiny", action="store_true", help="prepare: 16x16 images; train: half-width "
                        "networks, lr 1e-2, 3 warm-up steps (the miniature test)")
    parser.add_argument("--qat-steps", type=int, default=150, help="compress: QAT fine-tuning steps")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--port", type=int, default=8000, help="serve: HTTP port")
    parser.add_argument("--url", default="127.0.0.1:8000", help="query: the server (host:port)")
    parser.add_argument("-n", type=int, default=100, help="query: how many test images to send")
    parser.add_argument("--model", default=MODEL_NAME, choices=[MODEL_NAME, f"{MODEL_NAME}-int8"],
                        help="query: the served model (fp32 ONNX, or the QAT int8 ONNX graph)")
    return parser.parse_args(argv)


def main(argv: list[str]) -> Any:
    args = parse_args(argv)
    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        return COMMANDS[args.command](args)
    finally:
        torch.set_num_threads(previous)


if __name__ == "__main__":
    from deepseek.errors import UserError

    try:
        main(sys.argv[1:])
    except UserError as exc:  # a missing step or a bad file: one line, not a traceback
        sys.exit(f"error: {exc}")
