"""The LitServe 0.2.19 anchor for ``bench_serve.py``: the benchmark's models behind ``ls.LitServer``.

    python benchmarks/litserve_server.py MODE MAX_BATCH BATCH_TIMEOUT PORT
    python benchmarks/litserve_server.py classifier 64 0.005 8001   # POST /predict {"ids": [64 ints]}

MODE is ``classifier`` (``{"ids": [...]}``), ``mlp`` or ``trivial`` (``{"x": [...]}``); the answer is
``{"y": [...]}``. MAX_BATCH > 1 uses the batched API (``torch.stack`` of the decoded requests, one model call,
``list(output)`` back), BATCH_TIMEOUT is in seconds. One inference worker on the CPU, every other LitServer
option at its default, as in shared/reference/litserve-baseline.md.

The API classes live at module level: LitServe starts its workers with multiprocessing "spawn" and pickles
the API object. The models are ``bench_serve.build_model``'s, so the weights are those our server runs.
The server leaves its Manager, worker and uvicorn processes behind when only its main process is signalled:
stop it by its whole process group (``deepseek.bench.loadgen.stop_server``).
"""

from __future__ import annotations

import sys
from pathlib import Path

import litserve as ls
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_serve import INPUT_KEYS, build_model  # noqa: E402


class ModelAPI(ls.LitAPI):
    """One request per model call: decode -> [1, ...] forward -> encode."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def setup(self, device):
        self.model = build_model(self.mode).to(device)
        self.key, self.dtype = INPUT_KEYS[self.mode]
        print(f"litserve {self.mode}: torch threads {torch.get_num_threads()}", flush=True)

    def decode_request(self, request):
        return torch.tensor(request[self.key], dtype=self.dtype)

    def predict(self, x):
        with torch.inference_mode():
            if x.dim() == 1:
                return self.model(x[None])[0]
            return self.model(x)

    def encode_response(self, output):
        return {"y": output.tolist()}


class BatchedModelAPI(ModelAPI):
    """Dynamic batching: the decoded requests stacked into one [B, ...] call, split back by rows."""

    def batch(self, inputs):
        return torch.stack(inputs)

    def predict(self, x):
        with torch.inference_mode():
            return self.model(x)

    def unbatch(self, output):
        return list(output)


def main() -> None:
    if len(sys.argv) != 5 or sys.argv[1] not in INPUT_KEYS:
        sys.exit(f"usage: {sys.argv[0]} {{{','.join(INPUT_KEYS)}}} MAX_BATCH BATCH_TIMEOUT PORT")
    mode, max_batch, timeout, port = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    api_class = BatchedModelAPI if max_batch > 1 else ModelAPI
    api = api_class(mode, max_batch_size=max_batch, batch_timeout=timeout)
    server = ls.LitServer(api, accelerator="cpu", workers_per_device=1)
    server.run(host="127.0.0.1", port=port, log_level="warning", generate_client_file=False)


if __name__ == "__main__":
    main()
