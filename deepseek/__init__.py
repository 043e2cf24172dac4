"""DeepSeek Framework: build, train, compress, export and serve Mixture-of-Experts language models.

    import deepseek as ds
    model = ds.MoETransformer(ds.preset("tiny"))
    ds.save(model, ds.byte_tokenizer(), "my-model")
    model, tokenizer = ds.load("my-model")
    print(ds.generate(model, tokenizer, "def main():", max_new_tokens=32).text)
"""

from deepseek.compile import jit
from deepseek.config import ConfigError
from deepseek.data import byte_tokenizer
from deepseek.generate import GenerationOutput, SamplingParams, generate, generate_stream, pipeline, stream
from deepseek.models import PRESETS, ModelConfig, MoETransformer, RouterStats, preset
from deepseek.models.directory import ModelDirectoryError, load, save
from deepseek.nn import KVCache, update_router_biases


def __getattr__(name):
    if name == "serve":  # the deepseek.serve package, which is callable: ds.serve(model_or_repo, port=8080)
        import importlib
        return importlib.import_module("deepseek.serve")
    if name in ("Server", "DeepseekServing"):  # imported lazily: serving pulls in FastAPI and friends
        from deepseek.serve import server
        return getattr(server, name)
    raise AttributeError(f"module 'deepseek' has no attribute {name!r}")


__version__ = "0.1.0"

__all__ = [
    "ConfigError", "GenerationOutput", "KVCache", "SamplingParams", "generate", "generate_stream", "pipeline",
    "stream", "ModelConfig", "ModelDirectoryError", "MoETransformer", "PRESETS", "RouterStats",
    "byte_tokenizer", "jit", "load", "preset", "save", "serve", "update_router_biases",
]
