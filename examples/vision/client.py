"""A KServe v2 client for the digits model: PNG bytes in a BYTES input, with NVIDIA's ``tritonclient``
(HTTP or gRPC).

    from client import classify
    classes = classify("127.0.0.1:8000", [png_bytes, ...])                     # predicted digits, over HTTP
    classes = classify("127.0.0.1:8081", [png_bytes, ...], protocol="grpc")    # the same over gRPC

    python examples/vision/client.py                        # 100 test PNGs of runs/vision over HTTP (:8000)
    python examples/vision/client.py --protocol grpc        # the same over gRPC (:8081, `ds serve`'s --grpc-port)
    python examples/vision/client.py --protocol grpc a.png  # classify image files

Each request carries ``image`` [n, 1] BYTES, each element a 4-byte little-endian length then the PNG (over HTTP
the binary tensor extension, over gRPC ``raw_input_contents``: what Triton's image client sends), and asks for
``logits`` [n, 10].
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np

MODEL_NAME = "digits"
DEFAULT_URLS = {"http": "127.0.0.1:8000", "grpc": "127.0.0.1:8081"}  # `ds serve`'s default ports


def triton(protocol: str):
    """``tritonclient.http`` or ``tritonclient.grpc``: the same API, so the rest of this file serves both."""
    if protocol == "grpc":
        import tritonclient.grpc as module
    elif protocol == "http":
        import tritonclient.http as module
    else:
        raise ValueError(f"unknown protocol {protocol!r}: http or grpc")
    return module


def png_input(pngs: list[bytes], protocol: str = "http"):
    data = np.empty((len(pngs), 1), dtype=object)
    data[:, 0] = pngs
    tensor = triton(protocol).InferInput("image", [len(pngs), 1], "BYTES")
    if protocol == "http":
        tensor.set_data_from_numpy(data, binary_data=True)
    else:  # gRPC always sends raw_input_contents
        tensor.set_data_from_numpy(data)
    return tensor


def logits(url: str, pngs: list[bytes], client=None, protocol: str = "http", model: str = MODEL_NAME) -> np.ndarray:
    """Logits [n, 10] of the served ``model`` for encoded images; tritonclient's InferenceServerException carries
    the server's message (a 4xx over HTTP, INVALID_ARGUMENT over gRPC, for a malformed image)."""
    module = triton(protocol)
    client = client or module.InferenceServerClient(url)
    kwargs = {"binary_data": True} if protocol == "http" else {}
    result = client.infer(model, [png_input(pngs, protocol)],
                          outputs=[module.InferRequestedOutput("logits", **kwargs)])
    return result.as_numpy("logits")


def classify(url: str, pngs: list[bytes], client=None, protocol: str = "http", model: str = MODEL_NAME) -> np.ndarray:
    """Predicted classes [n] for encoded images (see :func:`logits`)."""
    return logits(url, pngs, client, protocol, model).argmax(-1)


def query_test_images(url: str, images: np.ndarray, labels: np.ndarray, protocol: str = "http",
                      model: str = MODEL_NAME) -> dict:
    """Send each test image alone (batch 1), as PNG; accuracy and latency percentiles."""
    from deepseek.vision.processor import encode_png

    client = triton(protocol).InferenceServerClient(url)
    pngs = [encode_png(image) for image in images]
    predicted, times = [], []
    for png in pngs:
        start = time.perf_counter()
        predicted.append(int(classify(url, [png], client, protocol, model)[0]))
        times.append((time.perf_counter() - start) * 1e3)
    times.sort()
    return {"n": len(pngs), "accuracy": float(np.mean(np.array(predicted) == labels)),
            "p50_ms": statistics.median(times), "p99_ms": times[min(len(times) - 1, int(0.99 * len(times)))]}


def _test_split(run_dir: Path) -> dict[str, np.ndarray]:
    """The run's split, read by this folder's data.py (imported under run.py's name for it)."""
    import importlib.util

    key = "vision_example.data"
    if key not in sys.modules:
        spec = importlib.util.spec_from_file_location(key, Path(__file__).resolve().parent / "data.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[key] = module
        spec.loader.exec_module(module)
    return sys.modules[key].load(run_dir)


def main(argv: list[str]) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("images", nargs="*", type=Path, help="PNG/JPEG files to classify (default: test images)")
    parser.add_argument("--protocol", choices=list(DEFAULT_URLS), default="http")
    parser.add_argument("--url", help="the server, host:port (default 127.0.0.1:8000 for http, :8081 for grpc)")
    parser.add_argument("--run-dir", type=Path, default=Path("runs/vision"), help="where the test split is")
    parser.add_argument("-n", type=int, default=100, help="how many test images to send")
    args = parser.parse_args(argv)
    url = args.url or DEFAULT_URLS[args.protocol]
    from tritonclient.utils import InferenceServerException

    try:  # a missing step or image file: one line
        split = None if args.images else _test_split(args.run_dir)
        pngs = [path.read_bytes() for path in args.images]
    except OSError as exc:
        raise SystemExit(f"error: {exc}") from None
    try:
        if args.images:
            predicted = classify(url, pngs, protocol=args.protocol)
            result = {str(path): int(c) for path, c in zip(args.images, predicted)}
            for path, c in result.items():
                print(f"{path}: {c}")
            return result
        result = query_test_images(url, split["x_test"][:args.n], split["y_test"][:args.n], args.protocol)
    except (OSError, RuntimeError, InferenceServerException) as exc:
        raise SystemExit(f"error: querying {url} over {args.protocol} failed ({type(exc).__name__}: {exc})") from None
    print(f"{result['n']} PNGs through {args.protocol} {url}: accuracy {result['accuracy']:.4f}, "
          f"p50 {result['p50_ms']:.2f} ms, p99 {result['p99_ms']:.2f} ms (one request per image)")
    return result


if __name__ == "__main__":
    root = str(Path(__file__).resolve().parents[2])
    if root not in sys.path:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, root)
    main(sys.argv[1:])
