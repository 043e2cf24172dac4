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
# `ds.serve` is the function (`ds.serve(model_or_repo, port=8080)`), not the deepseek.serve package: this import
# loads the package (which names it ds.serve) and then binds the function over that name. Reach the package's
# modules with `from deepseek.serve.manager import ...`, which goes through sys.modules, not ds.serve.
from deepseek.serve.server import Server, serve


__version__ = "0.1.0"

__all__ = [
    "ConfigError", "GenerationOutput", "KVCache", "SamplingParams", "generate", "generate_stream", "pipeline",
    "stream", "ModelConfig", "ModelDirectoryError", "MoETransformer", "PRESETS", "RouterStats",
    "Server", "byte_tokenizer", "jit", "load", "preset", "save", "serve", "update_router_biases",
]
