"""Generation: one engine for the CLI, the Python pipeline and the server."""

from deepseek.generate.engine import GenerationOutput, StreamEvent, encode_prompts, generate, generate_stream, stream
from deepseek.generate.params import SamplingParams
from deepseek.generate.pipeline import TextGenerationPipeline, pipeline
from deepseek.generate.sampling import Sampler

__all__ = [
    "GenerationOutput", "SamplingParams", "Sampler", "StreamEvent", "TextGenerationPipeline", "encode_prompts",
    "generate", "generate_stream", "pipeline", "stream",
]
