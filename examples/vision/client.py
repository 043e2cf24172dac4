"""A KServe v2 client for the digits model: PNG bytes in a BYTES input, with NVIDIA's ``tritonclient`` (http).

    from client import classify
    classes = classify("127.0.0.1:8000", [png_bytes, ...])      # predicted digits

Each request carries ``image`` [n, 1] BYTES (binary tensor extension: a 4-byte length, then the PNG) and asks
for ``logits`` [n, 10].
"""

from __future__ import annotations

import statistics
import time

import numpy as np

MODEL_NAME = "digits"


def png_input(pngs: list[bytes]):
    import tritonclient.http as httpclient

    data = np.empty((len(pngs), 1), dtype=object)
    data[:, 0] = pngs
    tensor = httpclient.InferInput("image", [len(pngs), 1], "BYTES")
    tensor.set_data_from_numpy(data, binary_data=True)
    return tensor


def classify(url: str, pngs: list[bytes], client=None) -> np.ndarray:
    """Predicted classes [n] for encoded images; tritonclient's InferenceServerException carries a 4xx message."""
    import tritonclient.http as httpclient

    client = client or httpclient.InferenceServerClient(url)
    result = client.infer(MODEL_NAME, [png_input(pngs)],
                          outputs=[httpclient.InferRequestedOutput("logits", binary_data=True)])
    return result.as_numpy("logits").argmax(-1)


def query_test_images(url: str, images: np.ndarray, labels: np.ndarray) -> dict:
    """Send each test image alone (batch 1), as PNG; accuracy and latency percentiles."""
    import tritonclient.http as httpclient

    from deepseek.vision.processor import encode_png

    client = httpclient.InferenceServerClient(url)
    pngs = [encode_png(image) for image in images]
    predicted, times = [], []
    for png in pngs:
        start = time.perf_counter()
        predicted.append(int(classify(url, [png], client)[0]))
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"n": len(pngs), "accuracy": float(np.mean(np.array(predicted) == labels)),
            "p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))]}
