"""The served models: a KServe v2 model repository whose config.yaml decodes PNG bytes before batching.

    repository/digits/config.yaml
    repository/digits/1/model.onnx                 # fp32, from `run.py compress` (deepseek.export.export_onnx)
    repository/digits/1/preprocessor_config.json   # the DeepseekImageProcessor the model was trained with
    repository/digits-int8/...                     # the same, model.onnx the QAT int8 QDQ graph
                                                   # (deepseek.export.export_static_int8_onnx)

Clients send a BYTES input ``image`` [B, 1], one encoded image per row (as Triton's image client does); the
server's ``preprocess`` step turns it into ``pixel_values`` [B, 1, 32, 32] FP32 per request, and the dynamic
batcher joins concurrent requests into one onnxruntime call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

MODEL_NAME = "digits"
INT8_MODEL_NAME = "digits-int8"
ONNX_FILES = {MODEL_NAME: "onnx/model.onnx", INT8_MODEL_NAME: "onnx-int8/model.onnx"}  # under the run directory


def serving_config(backend: str = "onnx", max_batch_size: int = 64, max_queue_delay_ms: float = 2.0,
                   threads: int = 1) -> dict:
    config = {"backend": backend, "max_batch_size": max_batch_size,
            "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
            "outputs": [{"name": "logits", "datatype": "FP32", "shape": [10]}],
            "preprocess": {"kind": "image", "processor": "preprocessor_config.json", "input": "image",
                           "output": "pixel_values"},
            "dynamic_batching": {"max_queue_delay_ms": max_queue_delay_ms}}
    if backend == "onnx":
        config["parameters"] = {"threads": threads}  # onnxruntime's intra-op threads
    return config


def build_repository(run_dir: Path, backend: str = "onnx", model=None) -> Path:
    """``run_dir/repository`` with the digits models (rebuilt from the run's files each time); returns its path.

    ``backend="onnx"``: ``digits`` and ``digits-int8``, the fp32 and int8 graphs ``run.py compress`` exported,
    with the same preprocessing and batching. ``backend="torch"``: ``digits`` only, ``model`` (an nn.Module, in
    eval mode) written as a torch.export program ``model.pt2`` with a dynamic batch (seconds, where the ONNX
    exports and their validation take longer: the miniature test serves this way)."""
    repo = run_dir / "repository"
    if backend == "onnx":
        for file in ONNX_FILES.values():
            if not (run_dir / file).is_file():
                raise FileNotFoundError(f"{run_dir / file} is missing: run `python examples/vision/run.py compress` "
                                        f"first")
        for name, file in ONNX_FILES.items():
            version = _fresh_version(repo, name, run_dir)
            shutil.copyfile(run_dir / file, version / "model.onnx")
        return repo
    import torch

    from deepseek.vision import DeepseekImageProcessor

    if (repo / INT8_MODEL_NAME).exists():  # from an earlier onnx build: this repository serves the torch model only
        shutil.rmtree(repo / INT8_MODEL_NAME)
    version = _fresh_version(repo, MODEL_NAME, run_dir, backend)
    example = torch.zeros(2, *DeepseekImageProcessor.from_pretrained(run_dir).output_shape)
    program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
    torch.export.save(program, str(version / "model.pt2"))
    return repo


def _fresh_version(repo: Path, name: str, run_dir: Path, backend: str = "onnx") -> Path:
    """``repo/name/1`` emptied, with the run's preprocessor config, and ``repo/name/config.yaml``."""
    version = repo / name / "1"
    if version.exists():
        shutil.rmtree(version)
    version.mkdir(parents=True)
    shutil.copyfile(run_dir / "preprocessor_config.json", version / "preprocessor_config.json")
    (repo / name / "config.yaml").write_text(yaml.safe_dump(serving_config(backend), sort_keys=False))
    return version


def start_server(repo: Path, port: int = 8000, block: bool = True, grpc_port: int | None = 8081):
    """``ds serve <repo>`` in this process (the same server as the CLI), HTTP on ``port`` and gRPC on ``grpc_port``
    (None: HTTP only; 0: any free port); ``block=False`` returns it started."""
    from deepseek.serve.server import serve

    if block:
        print(f"serving {repo} on http://127.0.0.1:{port} and gRPC 127.0.0.1:{grpc_port} (Ctrl-C stops)")
    return serve(str(repo), port=port, block=block, torch_threads=1, grpc_port=grpc_port)
