"""Static int8 quantization of convolutional models: torchao's pt2e flow, inductor-compiled, saved without pickle.

    qmodel = quantize_static_int8(cnn, calibration_batches, example_input)   # export -> prepare -> calibrate -> convert
    qmodel(images)                                                           # compiled int8 (fp32 logits out)
    save_static_int8(qmodel, "digits-int8")
    qmodel = load_static_int8("digits-int8")                                 # never unpickles

The flow is the one torch.ao's FX static quantization moved to (torch 2.13 no longer ships pt2e):
``torch.export.export(model, dynamic batch).module()`` -> ``prepare_pt2e`` with torchao's
``X86InductorQuantizer`` (default config: int8 weights symmetric per output channel, uint8 activations
affine per tensor, 7-bit (``reduce_range``) on CPUs whose int8 products saturate, see below; BatchNorm folded
into the convolutions) -> calibration forwards that record activation
ranges -> ``convert_pt2e`` (quantize/dequantize nodes around fp32 ops, int8 weights as constants) ->
``torch.compile`` with inductor's ``freezing``, which pattern-matches dequant -> conv/linear -> quant into
oneDNN int8 kernels with prepacked weights. Without ``freezing`` there is no int8 kernel and no gain.

Activations by the CPU. oneDNN's int8 kernels without VNNI (AVX2-only CPUs: AMD Zen 2/3, Intel before Cascade
Lake) multiply uint8 x int8 pairs with ``vpmaddubsw``, which sums each pair into 16 bits with saturation:
2 * 255 * 127 > 32,767, so large activations times large weights come out clipped (measured under
``ONEDNN_MAX_CPU_ISA=AVX2``: 156 of the digits CNN's 3,600 compiled logits off by up to 0.69 against the
reference program). Where :func:`deepseek.hardware.int8_products_exact` says so, activations are quantized to
0..127 (``reduce_range=True``, PyTorch's answer to the same problem): 2 * 127 * 127 fits, at half the activation
resolution. The choice is recorded in ``compression.json`` (``reduce_range``); a model quantized with 8-bit
activations and loaded on a saturating CPU warns, since its compiled outputs will drift there.

Two workarounds for torch 2.13 + torchao 0.18, both measured (docs/compression-distill.md):
- ``freezing`` must be set in the global inductor config while dynamo traces: passed as
  ``torch.compile(options={"freezing": True})`` it reaches inductor but not dynamo, the weights stay graph
  inputs and compilation fails (``onednn.qconv_prepack`` has no fake kernel). :class:`StaticInt8Model`
  patches the config around each call instead of changing it for the whole process.
- compiled with dynamic shapes, a quantized convolution over a 1-channel input fails inductor's stride
  assertion (``expected size 16==16, stride 1==64``; 3-channel inputs work), so the compiled model is
  specialised per batch size (``dynamic=False``): one compilation (a few seconds) per new batch size.

Saving. ``torch.export.save``/``load`` is not an option: its loader unpickles the example inputs with
``torch.load(weights_only=True)`` and *falls back to* ``weights_only=False`` when that fails, unpickles
tensor subclasses and custom objects with ``weights_only=False``/``pickle.loads``, and ``ExportedProgram.module()``
``exec``s the program's ``guards_code`` strings. So the folder holds the converted program's graph in
torch.export's own JSON schema (``program.json``, node metadata dropped) and its tensors (int8 weights,
scales, zero points, biases) in ``model.safetensors``; :func:`load_static_int8` reads the tensors with
safetensors, checks the JSON (operators limited to aten and quantized_decomposed, no guard code, symbolic
sizes only of the form torch.export writes) and rebuilds the program with torch.export's deserializer,
handing it plain tensors, so nothing is ever unpickled, exec'd or looked up outside those operator namespaces.

Legend: B batch, C channels, H/W image height/width.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Optional

import torch
import torch._inductor.config
from torch import nn

from deepseek.compile import jit
from deepseek.models.directory import ModelDirectoryError, load_weights, read_json, write_atomically

METHOD = "static-int8"
FORMAT_VERSION = 1
PROGRAM = "program.json"
WEIGHTS = "model.safetensors"
COMPRESSION = "compression.json"

# Operators a saved program may call; anything else in program.json is refused at load.
ALLOWED_OPERATOR_PREFIXES = ("torch.ops.aten.", "torch.ops.quantized_decomposed.")
# What torch.export writes for a dynamic batch size: Symbol('s77', positive=True, integer=True), or
# arithmetic on such names. sympy parses these strings with eval, so nothing else may pass.
_SYMBOL = re.compile(r"Symbol\('[a-z]\d+'(?:, (?:positive|integer|nonnegative)=(?:True|False))*\)")
_SYMBOLIC_ARITHMETIC = re.compile(r"(?:[\s\d+\-*/()]|\b[a-z]\d+\b)*")


# -- quantizing ----------------------------------------------------------------------------------------

class StaticInt8Model(nn.Module):
    """A pt2e-quantized model: ``program`` is the converted graph (the slow, obviously-correct reference:
    quantize/dequantize around fp32 ops); ``forward`` runs its inductor-compiled int8 version.

    Inference only: calls run under ``torch.no_grad()`` (freezing needs it) with inductor's ``freezing``
    switched on. Input [B, C, H, W] float32 of the shape it was exported with, any B; output as the original
    model's (logits [B, classes] for a classifier).
    """

    def __init__(self, exported: torch.export.ExportedProgram, *, compile: bool = True,
                 info: Optional[dict[str, Any]] = None):
        super().__init__()
        self.exported = exported
        self.program = exported.module()
        self.info = dict(info or {})
        self.compiled = jit(self._run_program, dynamic=False) if compile else None

    def _run_program(self, x: torch.Tensor) -> torch.Tensor:
        return self.program(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.compiled is None:
            with torch.no_grad():
                return self.program(x)
        # Dynamo reads `freezing` from the global config while tracing (see the module docstring). Set and
        # restored by hand: `config.patch(freezing=True)` costs ~130 us a call, more than the whole CNN at batch 1.
        config = torch._inductor.config
        previous = config.freezing
        config.freezing = True
        try:
            with torch.no_grad():
                return self.compiled(x)
        finally:
            config.freezing = previous


def int8_saturates_here() -> bool:
    """This CPU's int8 products saturate 16-bit pair sums (no VNNI, by flags or by the exactness probe)."""
    from deepseek.hardware import hardware_profile, int8_products_exact, int8_products_exact_probe

    profile = hardware_profile(measure=False)  # flags only; the exactness probe alone is ~1 ms
    return not int8_products_exact(dataclasses.replace(profile, int8_exact=int8_products_exact_probe()))


def _quantizer(reduce_range: bool):
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(reduce_range=reduce_range))
    return quantizer


def _inputs_of(batch: Any) -> torch.Tensor:
    """The model input of a calibration batch: a tensor, or the first item of (inputs, labels)."""
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def _batch_dim(example: torch.Tensor) -> tuple[torch.Tensor, tuple[dict[int, Any]]]:
    # export specialises a size-1 dimension to 1, so a batch of one is repeated to make the batch dynamic
    if example.shape[0] < 2:
        example = example.expand(2, *example.shape[1:]).contiguous()
    return example, ({0: torch.export.Dim("batch", min=1)},)


def _drop_unused_state(gm: torch.fx.GraphModule) -> None:
    """convert_pt2e leaves the fp32 weights (and BatchNorm state) on the module although the graph now reads
    the folded int8 copies: drop every parameter and buffer no ``get_attr`` node uses, so they are not saved."""
    used = {node.target for node in gm.graph.nodes if node.op == "get_attr"}
    for name, _ in [*gm.named_parameters(), *gm.named_buffers()]:
        if name not in used:
            owner_name, _, attr = name.rpartition(".")
            delattr(gm.get_submodule(owner_name) if owner_name else gm, attr)


def quantize_static_int8(model: nn.Module, calibration_batches: Iterable[Any], example_input: torch.Tensor, *,
                         compile: bool = True, reduce_range: Optional[bool] = None) -> StaticInt8Model:
    """Static int8 quantization of ``model`` (a CNN or any exportable module with one tensor input).

    ``calibration_batches`` yields inputs [B, C, H, W] (or ``(inputs, labels)`` tuples, labels ignored): the
    activation ranges are recorded on them, so they should look like real data (8-16 batches is plenty for
    a small model). ``example_input`` fixes every dimension but the batch. ``model`` is not modified.
    Returns the compiled :class:`StaticInt8Model` (``compile=False``: the uncompiled reference program).
    ``reduce_range``: 7-bit activations; None (default) chooses by this CPU (:func:`int8_saturates_here`).
    """
    from torchao.quantization.pt2e.quantize_pt2e import prepare_pt2e

    example, dynamic = _batch_dim(example_input.detach().float())
    was_training = model.training
    model.eval()  # BatchNorm with running statistics, folded into the convolutions by prepare_pt2e
    try:
        graph = torch.export.export(model, (example,), dynamic_shapes=dynamic).module()
    finally:
        model.train(was_training)
    with warnings.catch_warnings():  # "The input of maxpool2d is not quantized": expected, not actionable
        warnings.filterwarnings("ignore", message="The input of .* is not quantized")
        if reduce_range is None:
            reduce_range = int8_saturates_here()
        prepared = prepare_pt2e(graph, _quantizer(reduce_range))
    n_batches = 0
    with torch.no_grad():
        for batch in calibration_batches:
            prepared(_inputs_of(batch).float())
            n_batches += 1
    if n_batches == 0:
        raise ValueError("quantize_static_int8: no calibration batches (activation ranges would be empty)")
    return _convert(prepared, example, dynamic, model, reduce_range, {"calibration_batches": n_batches}, compile)


def _convert(prepared: torch.fx.GraphModule, example: torch.Tensor, dynamic, source: nn.Module, reduce_range: bool,
             extra: dict[str, Any], compile: bool) -> StaticInt8Model:
    """convert_pt2e a calibrated (or QAT-trained) graph into the saved-and-compiled :class:`StaticInt8Model`."""
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e

    converted = convert_pt2e(prepared)
    _drop_unused_state(converted)
    # Exported once more: an ExportedProgram is what torch.export's JSON serializer writes.
    exported = torch.export.export(converted, (example,), dynamic_shapes=dynamic)
    import torchao

    info = {"method": METHOD, "format_version": FORMAT_VERSION,
            "quantizer": "torchao X86InductorQuantizer, default config: int8 weights symmetric per output channel, "
                         f"uint8 activations affine per tensor ({'0..127' if reduce_range else '0..255'})",
            "reduce_range": bool(reduce_range),
            "input_shape": [None, *example.shape[1:]], "input_dtype": "float32",
            "source_class": f"{type(source).__module__}.{type(source).__qualname__}",
            "torch": torch.__version__, "torchao": torchao.__version__,
            "program": PROGRAM, "weights": WEIGHTS, **extra}
    return StaticInt8Model(exported, compile=compile, info=info)


# -- quantization-aware training -----------------------------------------------------------------------

class StaticInt8QAT(nn.Module):
    """A model prepared for quantization-aware training (pt2e ``prepare_qat_pt2e``): train it like the original
    (same input, same output; fake quantization of weights and activations in every forward, BatchNorm folded
    into the convolutions the way the int8 model will have it), then :func:`convert_static_int8_qat`.

    ``train()``/``eval()`` switch the exported graph's BatchNorm and fake-quantize observers (an exported graph
    ignores the module flag), so the Trainer and its evaluation use it unchanged."""

    def __init__(self, graph: torch.fx.GraphModule, example: torch.Tensor, dynamic, source: nn.Module,
                 reduce_range: bool):
        super().__init__()
        self.graph = graph
        self._example, self._dynamic, self._reduce_range = example, dynamic, reduce_range
        self._source = type(source)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.graph(x)

    def train(self, mode: bool = True) -> "StaticInt8QAT":
        from torchao.quantization.pt2e import move_exported_model_to_eval, move_exported_model_to_train

        self.training = mode
        (move_exported_model_to_train if mode else move_exported_model_to_eval)(self.graph)
        return self


def prepare_static_int8_qat(model: nn.Module, example_input: torch.Tensor, *,
                            reduce_range: Optional[bool] = None) -> StaticInt8QAT:
    """``model`` (a trained float CNN, not modified) exported and prepared for QAT with the same quantizer as
    :func:`quantize_static_int8` (``is_qat=True``: fake-quantize modules instead of observers). Fine-tune the
    result for a few hundred steps at a small learning rate, then :func:`convert_static_int8_qat`."""
    from torchao.quantization.pt2e.quantize_pt2e import prepare_qat_pt2e
    from torchao.quantization.pt2e.quantizer.x86_inductor_quantizer import (
        X86InductorQuantizer, get_default_x86_inductor_quantization_config)

    example, dynamic = _batch_dim(example_input.detach().float())
    if reduce_range is None:
        reduce_range = int8_saturates_here()
    source = copy.deepcopy(model).train()  # QAT graphs are exported in training mode (BatchNorm batch statistics)
    graph = torch.export.export(source, (example,), dynamic_shapes=dynamic).module()
    quantizer = X86InductorQuantizer()
    quantizer.set_global(get_default_x86_inductor_quantization_config(is_qat=True, reduce_range=reduce_range))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The input of .* is not quantized")
        prepared = prepare_qat_pt2e(graph, quantizer)
    return StaticInt8QAT(prepared, example, dynamic, model, reduce_range)


def convert_static_int8_qat(qat: StaticInt8QAT, *, compile: bool = True) -> StaticInt8Model:
    """The QAT-trained model as a real static int8 :class:`StaticInt8Model` (saved by :func:`save_static_int8`)."""
    qat.eval()
    return _convert(qat.graph, qat._example, qat._dynamic, qat, qat._reduce_range,
                    {"qat": True, "source_class": f"{qat._source.__module__}.{qat._source.__qualname__}"}, compile)


def _warn_if_saturating(info: dict[str, Any], folder: Path) -> None:
    if not info.get("reduce_range", False) and int8_saturates_here():
        warnings.warn(f"{folder}: quantized with 8-bit activations, but this CPU's int8 products saturate 16-bit "
                      f"pair sums (no VNNI): compiled outputs will differ from the reference program; re-quantize "
                      f"here (reduce_range is then chosen automatically)", stacklevel=3)


# -- saving and loading --------------------------------------------------------------------------------

def _program_json(exported: torch.export.ExportedProgram) -> dict[str, Any]:
    from torch._export.serde.serialize import serialize

    artifact = serialize(exported, serialize_state_dict=False, serialize_constants=False,
                         serialize_example_inputs=False)
    program = json.loads(artifact.exported_program)
    for node in program["graph_module"]["graph"]["nodes"]:
        node["metadata"] = {}  # stack traces with local paths, provenance: two thirds of the file, not needed
    return program


def save_static_int8(model: StaticInt8Model, path: str | Path) -> Path:
    """Write ``model`` as a folder: ``program.json`` (the graph), ``model.safetensors`` (int8 weights, scales,
    zero points, biases) and ``compression.json`` ({"method": "static-int8", ...}); atomically."""
    from safetensors.torch import save_file

    exported = model.exported
    tensors = {**exported.state_dict, **exported.constants}
    if not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise TypeError("save_static_int8: the program holds non-tensor constants (not savable without pickle)")
    state = {name: t.detach().contiguous().clone() for name, t in tensors.items()}
    program = _program_json(exported)

    def write_into(folder: Path) -> None:
        save_file(state, str(folder / WEIGHTS), metadata={"format": "pt", "method": METHOD})
        (folder / PROGRAM).write_text(json.dumps(program, separators=(",", ":")) + "\n")
        (folder / COMPRESSION).write_text(json.dumps(model.info, indent=2) + "\n")

    return write_atomically(path, write_into)


def _check_program(program: Any, file: Path) -> None:
    """Refuse a program.json that could run anything but the allowed operators once deserialized."""
    if not isinstance(program, dict) or not isinstance(program.get("graph_module"), dict):
        raise ModelDirectoryError(f"{file} is corrupt: not a torch.export program")
    if program.get("guards_code"):
        raise ModelDirectoryError(f"{file}: guards_code is not allowed (torch.export would exec it)")
    try:
        nodes = program["graph_module"]["graph"]["nodes"]
    except (KeyError, TypeError) as exc:
        raise ModelDirectoryError(f"{file} is corrupt: no graph nodes") from exc
    for node in nodes:
        target = node.get("target") if isinstance(node, dict) else None
        if not isinstance(target, str) or not target.startswith(ALLOWED_OPERATOR_PREFIXES):
            raise ModelDirectoryError(f"{file}: operator {target!r} is not allowed in a static-int8 program "
                                      f"(only {', '.join(p + '*' for p in ALLOWED_OPERATOR_PREFIXES)})")

    def walk(value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                if key == "expr_str":
                    rest = _SYMBOL.sub("s0", item) if isinstance(item, str) else None
                    if rest is None or not _SYMBOLIC_ARITHMETIC.fullmatch(rest):
                        raise ModelDirectoryError(f"{file}: symbolic size {item!r} is not allowed")
                else:
                    walk(item)
        elif isinstance(value, list):
            for item in value:
                walk(item)

    walk(program)


def _parameter_names(program: dict[str, Any]) -> set[str]:
    specs = program["graph_module"].get("signature", {}).get("input_specs", [])
    return {spec["parameter"]["parameter_name"] for spec in specs if isinstance(spec, dict) and "parameter" in spec}


def read_compression(path: str | Path) -> dict[str, Any]:
    """The ``compression.json`` of a static-int8 folder, checked; errors name the file."""
    file = Path(path) / COMPRESSION
    info = read_json(file)
    if not isinstance(info, dict):
        raise ModelDirectoryError(f"{file} is corrupt: expected a JSON object")
    if info.get("method") != METHOD:
        raise ModelDirectoryError(f"{file}: method {info.get('method')!r} is not {METHOD!r}")
    if not isinstance(info.get("format_version"), int) or info["format_version"] > FORMAT_VERSION:
        raise ModelDirectoryError(f"{file}: format_version {info.get('format_version')!r} is not one this "
                                  f"framework reads (<= {FORMAT_VERSION})")
    shape = info.get("input_shape")
    if not (isinstance(shape, list) and shape and all(isinstance(d, int) and d > 0 for d in shape[1:])):
        raise ModelDirectoryError(f"{file} is corrupt: input_shape {shape!r} is not [null, C, H, W]")
    return info


def load_static_int8(path: str | Path, *, compile: bool = True) -> StaticInt8Model:
    """Read a folder written by :func:`save_static_int8`: the ready model (compiled unless ``compile=False``).

    Nothing is unpickled: tensors come from safetensors, the graph from JSON checked by :func:`_check_program`.
    Raises :class:`~deepseek.models.directory.ModelDirectoryError` naming the file that is missing or corrupt.
    """
    from torch._export.serde.schema import ExportedProgram as SerializedProgram
    from torch._export.serde.serialize import ExportedProgramDeserializer, SerializeError, _dict_to_dataclass

    import torchao.quantization.pt2e  # noqa: F401  (registers the quantized_decomposed operators)

    folder = Path(path)
    if not folder.is_dir():
        raise ModelDirectoryError(f"{folder} is not a directory")
    info = read_compression(folder)
    program_file = folder / PROGRAM
    program = read_json(program_file)
    _check_program(program, program_file)
    tensors = load_weights(folder)  # model.safetensors: missing or corrupt -> ModelDirectoryError naming it
    parameters = _parameter_names(program)
    state = {name: nn.Parameter(t, requires_grad=False) if name in parameters else t for name, t in tensors.items()}
    example = torch.zeros(2, *info["input_shape"][1:])
    try:
        serialized = _dict_to_dataclass(SerializedProgram, program)
        exported = ExportedProgramDeserializer().deserialize(serialized, state, {}, ((example,), {}))
    except (SerializeError, KeyError, TypeError, ValueError, AssertionError, RuntimeError) as exc:
        raise ModelDirectoryError(f"{program_file} does not load with {WEIGHTS} "
                                  f"({type(exc).__name__}: {str(exc)[:300]}); re-quantize with this torch "
                                  f"({torch.__version__}; saved with {info.get('torch')})") from exc
    if compile:
        _warn_if_saturating(info, folder)
    return StaticInt8Model(exported, compile=compile, info=info)
