"""The served model: a KServe v2 model repository whose config.yaml decodes PNG bytes before batching.

    repository/digits/config.yaml
    repository/digits/1/model.onnx                 # from `run.py compress` (deepseek.export)
    repository/digits/1/preprocessor_config.json   # the DeepseekImageProcessor the model was trained with

Clients send a BYTES input ``image`` [B, 1], one encoded image per row (as Triton's image client does); the
server's ``preprocess`` step turns it into ``pixel_values`` [B, 1, 32, 32] FP32 per request, and the dynamic
batcher joins concurrent requests into one onnxruntime call.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

MODEL_NAME = "digits"


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
    """``run_dir/repository`` with the digits model (rebuilt from the run's files each time); returns its path.

    ``backend="onnx"``: the graph ``run.py compress`` exported. ``backend="torch"``: ``model`` (an nn.Module, in
    eval mode) written as a torch.export program ``model.pt2`` with a dynamic batch (seconds, where the ONNX
    export and its validation take longer: the miniature test serves this way)."""
    repo = run_dir / "repository"
    version = repo / MODEL_NAME / "1"
    if version.exists():
        shutil.rmtree(version)
    version.mkdir(parents=True)
    if backend == "onnx":
        onnx_file = run_dir / "onnx" / "model.onnx"
        if not onnx_file.is_file():
            raise FileNotFoundError(f"{onnx_file} is missing: run `python examples/vision/run.py compress` first")
        shutil.copyfile(onnx_file, version / "model.onnx")
    else:
        import torch

        from deepseek.vision import DeepseekImageProcessor

        example = torch.zeros(2, *DeepseekImageProcessor.from_pretrained(run_dir).output_shape)
        program = torch.export.export(model.eval(), (example,), dynamic_shapes=({0: torch.export.Dim("batch")},))
        torch.export.save(program, str(version / "model.pt2"))
    shutil.copyfile(run_dir / "preprocessor_config.json", version / "preprocessor_config.json")
    (repo / MODEL_NAME / "config.yaml").write_text(yaml.safe_dump(serving_config(backend), sort_keys=False))
    return repo


def start_server(repo: Path, port: int = 8000, block: bool = True):
    """``ds serve <repo>`` in this process (the same server as the CLI); ``block=False`` returns it started."""
    from deepseek.serve.server import serve

    print(f"serving {repo} on http://127.0.0.1:{port} (Ctrl-C stops)" if block else "", end="\n" if block else "")
    return serve(str(repo), port=port, block=block, torch_threads=1)
