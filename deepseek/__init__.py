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

# The design documents' names (docs/design-names.md), loaded on first use so that `import deepseek` stays light:
# ds.DynamicBatcher from deepseek.compat, the namespaces ds.amp / ds.prune / ... as their re-export modules.
_COMPAT_NAMES = ("DynamicBatcher",)
_COMPAT_MODULES = ("amp", "distill", "experiment", "prune", "quantization")


def __getattr__(name: str):
    import importlib

    if name in _COMPAT_NAMES:
        return getattr(importlib.import_module("deepseek.compat"), name)
    if name in _COMPAT_MODULES:
        return importlib.import_module(f"deepseek.{name}")
    raise AttributeError(f"module 'deepseek' has no attribute {name!r}")

__all__ = [
    "ConfigError", "GenerationOutput", "KVCache", "SamplingParams", "generate", "generate_stream", "pipeline",
    "stream", "ModelConfig", "ModelDirectoryError", "MoETransformer", "PRESETS", "RouterStats",
    "Server", "byte_tokenizer", "jit", "load", "preset", "save", "serve", "update_router_biases",
]
