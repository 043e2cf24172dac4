"""BYTES inputs (KServe v2 binary and JSON) and config.yaml's ``preprocess`` step, without a server."""

import numpy as np
import pytest
import torch
import yaml

from deepseek.config import ConfigError
from deepseek.serve.backends import load_backend
from deepseek.serve.config import parse_serving_config
from deepseek.serve.errors import RequestError
from deepseek.serve.protocols.kserve_tensors import parse_inputs
from deepseek.vision import DeepseekImageProcessor, encode_png

CONFIG = {"backend": "torch", "max_batch_size": 8, "inputs": [{"name": "image", "datatype": "BYTES", "shape": [1]}],
          "outputs": [{"name": "y", "datatype": "FP32", "shape": [4]}],
          "preprocess": {"processor": "preprocessor_config.json"}}


def _binary(items: list[bytes]) -> bytes:
    return b"".join(len(item).to_bytes(4, "little") + item for item in items)


def test_bytes_inputs_binary_and_json():
    blob = _binary([b"ab", b"", b"xyz"])
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [3, 1],
                          "parameters": {"binary_data_size": len(blob)}},
                         {"name": "text", "datatype": "BYTES", "shape": [2], "data": ["hé", "b"]}]}
    inputs = parse_inputs(header, blob)
    assert inputs["image"].dtype == object and inputs["image"].shape == (3, 1)
    assert list(inputs["image"][:, 0]) == [b"ab", b"", b"xyz"]
    assert list(inputs["text"]) == ["hé".encode(), b"b"]


@pytest.mark.parametrize("blob, message", [
    (b"\x05\x00\x00\x00ab", "runs past"),
    (b"\x01\x00", "4-byte length"),
    (_binary([b"a"]) + b"!", "left after"),
])
def test_malformed_bytes_are_request_errors(blob, message):
    header = {"inputs": [{"name": "image", "datatype": "BYTES", "shape": [1, 1],
                          "parameters": {"binary_data_size": len(blob)}}]}
    with pytest.raises(RequestError, match=message):
        parse_inputs(header, blob)
    with pytest.raises(RequestError, match="must be strings"):
        parse_inputs({"inputs": [{"name": "t", "datatype": "BYTES", "shape": [1], "data": [3]}]}, b"")


def test_preprocess_config_is_checked():
    bad = dict(CONFIG, inputs=[{"name": "image", "datatype": "FP32", "shape": [1]}])
    with pytest.raises(ConfigError, match="BYTES input"):
        parse_serving_config(bad)
    with pytest.raises(ConfigError, match="max_batch_size"):
        parse_serving_config(dict(CONFIG, max_batch_size=0))
    with pytest.raises(ConfigError, match="unknown|valid"):
        parse_serving_config(dict(CONFIG, preprocess={"processor": "p.json", "resize": 3}))


class _Mean(torch.nn.Module):
    def forward(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)


def test_backend_decodes_pngs_into_the_model_input(tmp_path):
    version = tmp_path / "m" / "1"
    version.mkdir(parents=True)
    processor = DeepseekImageProcessor(size=8, crop_size=8, image_mean=[0.0], image_std=[1.0])
    processor.save_pretrained(tmp_path / "m")  # found in the model folder, next to config.yaml
    program = torch.export.export(_Mean(), (torch.zeros(2, 1, 8, 8),), dynamic_shapes=({0: torch.export.Dim("b")},))
    torch.export.save(program, str(version / "model.pt2"))
    (tmp_path / "m" / "config.yaml").write_text(yaml.safe_dump(CONFIG))
    backend = load_backend("m", 1, version, parse_serving_config(CONFIG))
    assert backend.metadata()["inputs"] == [{"name": "image", "datatype": "BYTES", "shape": [-1, 1]}]
    assert [s.name for s in backend.inputs] == ["pixel_values"]
    images = np.empty((2, 1), dtype=object)
    images[:, 0] = [encode_png(np.full((8, 8), 255, np.uint8)), encode_png(np.zeros((8, 8), np.uint8))]
    decoded = backend.decode_inputs({"image": images})
    backend.validate_inputs(decoded)
    torch.testing.assert_close(backend.infer(decoded)["y"], torch.tensor([[1.0] * 4, [0.0] * 4]))
    images[1, 0] = b"junk"
    with pytest.raises(ValueError, match="image 1: 4 bytes .* not a readable PNG/JPEG"):
        backend.decode_inputs({"image": images})
    with pytest.raises(ValueError, match="shape"):
        backend.decode_inputs({"image": images[:, 0]})
