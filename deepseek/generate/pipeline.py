"""``ds.pipeline("text-generation", model=...)``: a callable in the style of Hugging Face pipelines."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

import torch
from tokenizers import Tokenizer

from deepseek.config import ConfigError
from deepseek.generate.engine import generate, stream
from deepseek.generate.params import SamplingParams
from deepseek.hardware import resolve_precision
from deepseek.models.directory import load, read_extra

TASKS = ("text-generation",)


class TextGenerationPipeline:
    """``pipe(prompt, **sampling)`` -> ``[{"generated_text": ...}]``; a list of prompts gives a list of those.

    Defaults come from the model directory's ``generation.json`` when it has one; keyword arguments
    override them per call. ``return_full_text=False`` returns only the completion. Besides the
    :class:`SamplingParams` fields, Hugging Face's ``do_sample`` is understood (False: greedy; True: sample,
    at temperature 1.0 unless given).
    """

    def __init__(self, model: torch.nn.Module, tokenizer: Tokenizer, defaults: Optional[dict[str, Any]] = None):
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.defaults = dict(defaults or {})
        self._params({})  # fail now, not at the first call

    def _params(self, options: dict[str, Any]) -> SamplingParams:
        merged = {**self.defaults, **options}
        # Hugging Face's do_sample: False is greedy whatever the temperature; True samples, at temperature 1.0
        # unless one is given (a temperature of 0 cannot sample).
        do_sample = merged.pop("do_sample", None)
        if do_sample is False:
            merged["temperature"] = 0.0
        elif do_sample is True:
            merged.setdefault("temperature", 1.0)
            if merged["temperature"] == 0:
                raise ConfigError("do_sample=True needs temperature > 0 (temperature=0 is greedy decoding)")
        elif do_sample is not None:
            raise ConfigError(f"do_sample must be True or False, got {do_sample!r}")
        return SamplingParams.from_dict(merged)

    def __call__(self, prompts: Union[str, Sequence[str]], return_full_text: bool = True, **options):
        single = isinstance(prompts, str)
        batch = [prompts] if single else list(prompts)
        outputs = generate(self.model, self.tokenizer, batch, self._params(options))
        results = [[{"generated_text": (prompt if return_full_text else "") + out.text}]
                   for prompt, out in zip(batch, outputs)]
        return results[0] if single else results

    def stream(self, prompt: str, **options) -> Iterator[str]:
        """Text deltas of the completion of ``prompt``."""
        return stream(self.model, self.tokenizer, prompt, self._params(options))


def pipeline(task: str, model: Union[str, Path, torch.nn.Module], tokenizer: Optional[Tokenizer] = None, *,
             device: str | torch.device = "cpu", dtype: Optional[torch.dtype] = None, precision: str = "auto",
             **defaults) -> TextGenerationPipeline:
    """Build a pipeline for ``task`` from a model directory (or a model object plus its tokenizer).

    A directory is loaded in ``dtype`` if given, else in the ``precision`` (auto, fp32, bf16) that decodes fastest
    on ``device`` (:func:`deepseek.hardware.resolve_precision`; on CPUs that is fp32 almost everywhere: one-row
    products are slower in bf16 even with AMX).
    """
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; tasks: {', '.join(TASKS)}")
    if isinstance(model, (str, Path)):
        directory = model
        if dtype is None:
            dtype = resolve_precision(precision, device, workload="decode").autocast_dtype
        model, tokenizer = load(directory, device=device, dtype=dtype)
        defaults = {**(read_extra(directory, "generation.json") or {}), **defaults}
    elif tokenizer is None:
        raise ValueError("pass the tokenizer together with a model object")
    return TextGenerationPipeline(model, tokenizer, defaults)
