"""The anchor of ``bench_serve_generate.py``: Hugging Face ``generate``, one request at a time, behind our HTTP front.

    python benchmarks/hf_generate_server.py --model-repository REPO --http-port 8081

Runs ``ds serve`` itself (same FastAPI app, same OpenAI routes, SSE framing, metrics and event loop), with one
change: each language model's generation engine is :class:`HFGenerateEngine`, which serves requests in
arrival order, each with ``transformers.MixtralForCausalLM.generate`` on a Mixtral carrying the model's exact
weights (``hf_anchor.hf_mixtral_from_ours``), streaming every token through a ``BaseStreamer``. That is what
a server wrapping ``generate`` per request does; so the comparison isolates the engine, not the web stack.
The model must be Mixtral-shaped (softmax router, no shared experts, every layer MoE, untied embeddings).
"""

from __future__ import annotations

import queue
import sys
import threading
import time
from pathlib import Path
from typing import Optional

import torch
from transformers.generation import StoppingCriteria
from transformers.generation.streamers import BaseStreamer

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import setup_path  # noqa: E402

setup_path()
from hf_anchor import hf_mixtral_from_ours  # noqa: E402

from deepseek.generate.continuous import (EngineStats, EngineStoppedError, GenerationEvent,  # noqa: E402
                                          GenerationRequest, QueueFullError)
from deepseek.generate.params import SamplingParams  # noqa: E402
from deepseek.generate.sequence import SequenceState, encode_prompts  # noqa: E402
from deepseek.generate.threads import release_openmp_pool  # noqa: E402


class _EventStreamer(BaseStreamer):
    """Turns each token ``generate`` produces into the request's :class:`GenerationEvent`."""

    def __init__(self, engine: "HFGenerateEngine", request: GenerationRequest):
        self.engine, self.request, self.prompt_seen = engine, request, False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate() hands the prompt over first
            self.prompt_seen = True
            return
        r = self.request
        token = int(value.reshape(-1)[0])
        r.token_ids.append(token)
        self.engine.tokens_generated += 1
        r.on_event(GenerationEvent(r.request_id, r.seq.detok.push(token), token, prompt_tokens=len(r.prompt_ids),
                                   completion_tokens=len(r.token_ids)))

    def end(self) -> None:
        pass


class _Cancelled(StoppingCriteria):
    def __init__(self, request: GenerationRequest):
        self.request = request

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.request.cancelled, dtype=torch.bool)


class HFGenerateEngine:
    """The engine interface the OpenAI routes use (submit / stats / stop, ``tokenizer``, ``max_len``), served
    by ``hf.generate`` for one request at a time on a worker thread."""

    def __init__(self, model, tokenizer, *, max_queue: int = 256, name: str = "hf"):
        self.hf = hf_mixtral_from_ours(model).eval()
        self.hf.generation_config.eos_token_id = None  # set per request: ignore_eos must really ignore it
        self.tokenizer, self.name, self.max_queue = tokenizer, name, max_queue
        self.max_len = model.config.max_seq_len
        self._queue: queue.Queue = queue.Queue()
        self._stopping = False
        self._running = 0
        self.tokens_generated = 0
        release_openmp_pool()  # as our engine does: the worker thread runs the model from now on
        self._thread = threading.Thread(target=self._loop, name=f"hf-{name}", daemon=True)
        self._thread.start()

    def submit(self, prompt, params=None, *, on_event=None, timeout_s: Optional[float] = None,
               request_id: Optional[str] = None) -> GenerationRequest:
        params = params if isinstance(params, SamplingParams) else SamplingParams.from_dict(params or {})
        ids = encode_prompts(self.tokenizer, [prompt])[0]
        if len(ids) >= self.max_len:
            raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the {self.max_len}-token context")
        if self._stopping:
            raise EngineStoppedError("the engine is shutting down")
        if self._queue.qsize() >= self.max_queue:
            raise QueueFullError(f"{self._queue.qsize()} requests waiting (max_queue={self.max_queue})")
        request = GenerationRequest(request_id or f"{self.name}-{time.monotonic_ns()}",
                                    SequenceState(ids, params, self.tokenizer, self.max_len - len(ids)),
                                    on_event or (lambda event: None), None)
        self._queue.put(request)
        return request

    def stats(self) -> EngineStats:
        return EngineStats(self._running, self._queue.qsize(), 1, 0.0, 0, 0, self.tokens_generated)

    def stop(self, drain: bool = True, timeout: Optional[float] = None) -> None:
        self._stopping = True
        self._queue.put(None)
        self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            request = self._queue.get()
            if request is None:
                return
            self._running = 1
            try:
                self._generate(request)
            except Exception as exc:  # one failing request must not stop the engine
                print(f"hf engine: request {request.request_id} failed: {exc!r}", file=sys.stderr)
                if not request.finished:
                    request.finished, request.finish_reason = True, "abort"
                    request.on_event(GenerationEvent(request.request_id, finish_reason="abort",
                                                     prompt_tokens=len(request.prompt_ids),
                                                     completion_tokens=len(request.token_ids)))
                    request.done.set()
            finally:
                self._running = 0

    def _generate(self, request: GenerationRequest) -> None:
        params = request.params
        stop_ids = sorted(request.seq.stop_ids)
        sampling = dict(do_sample=True, temperature=params.temperature, top_p=params.top_p,
                        top_k=params.top_k or None) if params.temperature > 0 else dict(do_sample=False)
        ids = torch.tensor([request.prompt_ids])
        with torch.inference_mode():
            self.hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=request.seq.max_new,
                             eos_token_id=stop_ids or None, pad_token_id=0, streamer=_EventStreamer(self, request),
                             stopping_criteria=[_Cancelled(request)], **sampling)
        reason = ("abort" if request.cancelled else
                  "stop" if request.token_ids and request.token_ids[-1] in stop_ids else "length")
        request.finished, request.finish_reason = True, reason
        request.on_event(GenerationEvent(request.request_id, request.seq.detok.flush(), finish_reason=reason,
                                         prompt_tokens=len(request.prompt_ids),
                                         completion_tokens=len(request.token_ids)))
        request.done.set()


def use_hf_engines() -> None:
    """Make every ``deepseek`` backend generate with :class:`HFGenerateEngine`."""
    from deepseek.serve.backends.deepseek_backend import DeepSeekBackend

    def engine(self):
        with self._engine_lock:
            if self._engine is None:
                self._engine = HFGenerateEngine(self.model, self.tokenizer, max_queue=self.config.generation.max_queue,
                                                name=f"{self.name}-v{self.version}")
            return self._engine

    DeepSeekBackend.engine = engine


if __name__ == "__main__":
    use_hf_engines()
    from deepseek.cli.main import main

    sys.argv = ["ds", "serve", *sys.argv[1:]]
    main()
