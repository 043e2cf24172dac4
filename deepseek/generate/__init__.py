"""Generation: the batch engine (CLI, Python pipeline) and the continuous one (server), one per-sequence state."""

from deepseek.generate.engine import GenerationOutput, StreamEvent, encode_prompts, generate, generate_stream, stream
from deepseek.generate.params import SamplingParams
from deepseek.generate.pipeline import TextGenerationPipeline, pipeline
from deepseek.generate.sampling import Sampler

__all__ = [
    "GenerationOutput", "SamplingParams", "Sampler", "StreamEvent", "TextGenerationPipeline", "encode_prompts",
    "generate", "generate_stream", "pipeline", "stream",
]
