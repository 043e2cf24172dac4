"""Test helpers for the routes that queue texts on an embedding model's batcher (``/v1/embeddings``, ``/v1/retrieve``).

    metric = functools.partial(served_metric, model="minilm")   # metric(base, family, sample, **labels)
    run_behind_held_encode(mv, call, count=9, queued=8)         # call(0) held in the model, call(1..8) queue behind
    kserve_embedding(base, "minilm", ids)                       # the vector KServe infer answers for word-piece ids

The hold is a forward pre-hook on the real model: the first request's encode waits until the others have reached the
batcher's queue, so which requests share a batch is deterministic (no sleeps).
"""

from __future__ import annotations

import threading
from typing import Callable

import httpx
import numpy as np
from prometheus_client.parser import text_string_to_metric_families

from tests.serve.gated_model import wait_for


def served_metric(base: str, family: str, sample: str, *, model: str, version: str = "1", **labels: str) -> float:
    """The sum of the ``sample`` values of metric ``family`` at ``base``/metrics for ``model``/``version`` whose
    labels include ``labels``."""
    families = {f.name: f for f in text_string_to_metric_families(httpx.get(base + "/metrics").text)}
    labels = {"model": model, "version": version, **labels}
    return sum(s.value for s in families[family].samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


def run_behind_held_encode(mv, call: Callable[[int], None], count: int, queued: int) -> None:
    """Run ``call(i)`` for i in 0..count-1, each in a thread: ``call(0)``'s encode is held at the model's first
    forward until ``queued`` requests wait in ``mv``'s batcher, then released; returns when every thread is done."""
    release, held = threading.Event(), threading.Event()

    def hold_first_batch(module, args):  # the real model, held at its first forward until the queue has filled
        if not release.is_set():
            held.set()
            release.wait(30)

    hook = mv.backend.embedder.model.register_forward_pre_hook(hold_first_batch)
    threads = [threading.Thread(target=call, args=(0,))]
    try:
        threads[0].start()
        wait_for(held.is_set, "the first request to reach the model")
        threads += [threading.Thread(target=call, args=(i,)) for i in range(1, count)]
        for thread in threads[1:]:
            thread.start()
        wait_for(lambda: mv.batcher.queue_size == queued, "the other requests to queue")
    finally:
        release.set()
        for thread in threads:
            thread.join(60)
        hook.remove()


def kserve_embedding(base: str, model: str, ids: list[int]) -> np.ndarray:
    """The vector ``/v2/models/{model}/infer`` answers for one text's word-piece ``ids`` (float32)."""
    answer = httpx.post(f"{base}/v2/models/{model}/infer", json={"inputs": [
        {"name": "input_ids", "datatype": "INT64", "shape": [1, len(ids)], "data": ids}]}).json()
    return np.array(answer["outputs"][0]["data"], dtype=np.float32)
