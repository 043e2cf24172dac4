"""ONNX export of a static int8 model (the pt2e path of ``deepseek.compress.static_int8``) as a QDQ graph.

    int8 = convert_static_int8_qat(qat)                     # or quantize_static_int8(cnn, batches, example)
    report = export_static_int8_onnx(int8, "int8/model.onnx", (images[:2],), input_names=["pixel_values"])

The converted pt2e program (quantize/dequantize around fp32 ops, int8 weights as constants) becomes, through
torch's dynamo exporter, QuantizeLinear/DequantizeLinear around Conv/Gemm with int8 weight initializers and
per-channel scales: the "QDQ" form that onnxruntime's graph optimizer rewrites into its int8 kernels
(QLinearConv, QGemm) when it loads the file. The batch axis stays symbolic.

Two differences from a plain export:

- 7-bit activations. On CPUs whose int8 products saturate, pt2e quantizes activations to 0..127
  (``reduce_range``); ONNX's QuantizeLinear has no quant_min/quant_max and clamps uint8 to 0..255, and the
  exporter drops the narrower clamp: activations above the calibrated maximum then reach 255 where the reference
  stops at 127, and on such a CPU onnxruntime's U8S8 kernels may saturate on them (its own quantizer takes 7-bit
  *weights* there instead). ``clip_reduced_range=True`` (default) puts a ``Clip`` to the float range that maps
  onto 0..127 before each such QuantizeLinear, so the graph computes the reference's numbers; onnxruntime then
  no longer fuses those convolutions into its int8 kernels (its Clip-into-QuantizeLinear fusion needs a Clip no
  narrower than the uint8 range) and runs them in fp32 between Q/DQ pairs (measured 1.35x slower on the digits
  ResNet). ``False``: the fused int8 kernels, outputs that differ from the reference on out-of-range activations.
  On CPUs with VNNI (or AMX) pt2e uses 0..255 and neither applies.
- Validation against the pt2e reference program (``StaticInt8Model.program``), not eager fp32: onnxruntime and
  torch may round a value lying on a quantization boundary differently, moving one activation by one step, so
  the tolerance is relative (:data:`INT8_TOLERANCE` of the largest reference output, doubled for 7-bit
  activations) and the argmax agreement is reported too.

The debugging metadata the exporter writes (stack traces per node, intermediate shapes) is stripped, as for
every export (:func:`~deepseek.export.onnx.strip_model_metadata`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from deepseek.export.onnx import (ExportError, ExportReport, _file_bytes, _graph_signature, _median_ms,
                                  _quiet_exporter, _session, _write_metadata, checked_out_path,
                                  strip_model_metadata)

# max |ORT - reference| allowed, as a fraction of max(1, max |reference output|), for 8-bit activations; 7-bit ones
# (0..127) have steps twice as coarse, so a value rounded one step the other way moves twice as far and the bound
# scales with 255 / (quant_max - quant_min) (measured under AVX2, 7-bit: 1.2 % on the digits ResNet, argmax 100 %)
INT8_TOLERANCE = 1e-2
INT8_BATCH_SIZES = (1, 5, 64)  # batch sizes validated (the symbolic batch axis is exercised by all three)
_QUANTIZE = "quantized_decomposed.quantize_per_tensor"


def _activation_ranges(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """``{fx node name: (quant_min, quant_max)}`` of every activation quantization in the pt2e program."""
    ranges = {}
    for node in model.exported.graph.nodes:
        if node.op == "call_function" and str(node.target).startswith(_QUANTIZE):
            qmin, qmax = node.args[3], node.args[4]
            ranges[node.name] = (int(qmin), int(qmax))
    return ranges


def _clamp_reduced_ranges(graph_model, ranges: dict[str, tuple[int, int]], path: Path) -> int:
    """Put a ``Clip`` before each uint8 QuantizeLinear whose pt2e range is narrower than 0..255 (in the loaded
    ``graph_model``, to be written to ``path``); returns how many.

    The exporter names a QuantizeLinear's output after the FX node it came from; where a name is not found and
    the program used a single range, that range applies."""
    import onnx
    from onnx import numpy_helper

    graph = graph_model.graph
    constants = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    only_range = next(iter(set(ranges.values()))) if len(set(ranges.values())) == 1 else None
    nodes, clipped = [], 0
    for node in graph.node:
        if node.op_type == "QuantizeLinear" and len(node.input) == 3 and node.input[2] in constants \
                and constants[node.input[2]].dtype == np.uint8:
            qrange = ranges.get(node.output[0], only_range)
            if qrange is None:
                raise ExportError(f"{path}: QuantizeLinear {node.output[0]!r} matches no quantization of the pt2e "
                                  f"program, whose activation ranges differ ({sorted(set(ranges.values()))})")
            if qrange != (0, 255):
                scale = float(constants[node.input[1]])
                zero_point = int(constants[node.input[2]])
                # short names: each Clip's two bounds and its node are part of the file the bytes are counted in
                low, high = f"ds_clip{clipped}_lo", f"ds_clip{clipped}_hi"
                graph.initializer.extend([
                    numpy_helper.from_array(np.array((qrange[0] - zero_point) * scale, np.float32), low),
                    numpy_helper.from_array(np.array((qrange[1] - zero_point) * scale, np.float32), high)])
                clipped_name = f"ds_clip{clipped}"
                nodes.append(onnx.helper.make_node("Clip", [node.input[0], low, high], [clipped_name],
                                                   name=clipped_name))
                node.input[0] = clipped_name
                clipped += 1
        nodes.append(node)
    if clipped:
        del graph.node[:]
        graph.node.extend(nodes)
        onnx.checker.check_model(graph_model)
    return clipped


def _graph_summary(graph_model) -> dict:
    """Operator counts and int8 initializer bytes of the graph."""
    import onnx

    graph = graph_model.graph
    ops: dict[str, int] = {}
    for node in graph.node:
        ops[node.op_type] = ops.get(node.op_type, 0) + 1
    int8_bytes = sum(len(t.raw_data) for t in graph.initializer
                     if t.data_type in (onnx.TensorProto.INT8, onnx.TensorProto.UINT8))
    return {"operators": dict(sorted(ops.items())), "int8_initializer_bytes": int8_bytes}


def _cases(example: torch.Tensor, batch_sizes: Sequence[int]) -> list[tuple[str, torch.Tensor]]:
    """The example's rows repeated to each batch size, with a little noise so rows differ."""
    generator = torch.Generator().manual_seed(0)
    cases = []
    for b in batch_sizes:
        rows = example[torch.arange(b) % example.shape[0]]
        cases.append((f"batch {b}", rows + 0.1 * torch.randn(rows.shape, generator=generator)))
    return cases


def _validate_int8(report: ExportReport, model: torch.nn.Module, example: torch.Tensor, tolerance: float,
                   batch_sizes: Sequence[int]) -> None:
    session = _session(report.path)
    name = report.inputs[0]["name"]
    for label, x in _cases(example, batch_sizes):
        feed = {name: np.ascontiguousarray(x.numpy())}
        with torch.no_grad():
            expected = model.program(x).numpy()
            reference_ms = _median_ms(lambda: model.program(x))
        got = session.run(None, feed)[0]
        ort_ms = _median_ms(lambda: session.run(None, feed))
        diff = float(np.abs(got - expected).max())
        allowed = tolerance * max(1.0, float(np.abs(expected).max()))
        agreement = float((got.argmax(-1) == expected.argmax(-1)).mean()) if got.ndim > 1 else None
        report.validation.append({"shape": label, "max_abs_diff": diff, "allowed": allowed,
                                  "argmax_agreement": agreement, "eager_ms": reference_ms, "ort_ms": ort_ms})
        if not diff <= allowed:  # also catches NaN
            raise ExportError(f"{report.path}: onnxruntime differs from the int8 reference program by {diff:.3g} "
                              f"at {label} (allowed {allowed:.3g})")


def export_static_int8_onnx(model: torch.nn.Module, out_path: str | Path, example_inputs: Sequence[torch.Tensor],
                            *, input_names: Optional[Sequence[str]] = None,
                            output_names: Optional[Sequence[str]] = None, opset: Optional[int] = None,
                            validate: bool = True, tolerance: float = INT8_TOLERANCE,
                            clip_reduced_range: bool = True,
                            batch_sizes: Sequence[int] = INT8_BATCH_SIZES) -> ExportReport:
    """Export a :class:`~deepseek.compress.static_int8.StaticInt8Model` to a QDQ int8 ONNX graph with a dynamic
    batch axis, validate it with onnxruntime against the model's reference program, write ``export.json``.

    ``example_inputs``: ``(x,)``, one tensor shaped like a batch (every dimension but the batch is fixed).
    ``input_names`` / ``output_names``: one each (default ``input`` / ``output``). ``validate``: run batch sizes
    ``batch_sizes`` through both and require ``max |ORT - reference| <= tolerance * max(1, max |reference|)``
    (``tolerance`` scaled by 255 / the narrowest activation range: x2 for 7-bit activations).
    ``clip_reduced_range``: keep a 0..127 activation range exact with Clips (see the module docs).
    The report's ``static_int8`` holds the activation range, the Clips added for it, the operator counts and the
    int8 initializer bytes. Raises :class:`ExportError` on a wrong argument, a failed export or validation.
    """
    if not (hasattr(model, "exported") and hasattr(model, "program") and hasattr(model, "info")):
        raise ExportError(f"expected a StaticInt8Model (quantize_static_int8 / convert_static_int8_qat), got "
                          f"{type(model).__name__}; export a float model with export_onnx")
    out_path = checked_out_path(out_path)
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    if len(example_inputs) != 1 or not isinstance(example_inputs[0], torch.Tensor):
        raise ExportError("example_inputs must be a tuple of one tensor shaped like a batch, e.g. (images[:2],)")
    names = list(input_names or ["input"])
    outputs = list(output_names or ["output"])
    if len(names) != 1 or len(outputs) != 1:
        raise ExportError(f"a static int8 model has one input and one output; got input_names {names}, "
                          f"output_names {outputs}")
    example = example_inputs[0].detach().float()
    if example.shape[0] < 2:  # export specialises a size-1 axis: repeat the row so the batch stays symbolic
        example = example.expand(2, *example.shape[1:]).contiguous()

    out_path.parent.mkdir(parents=True, exist_ok=True)
    out_path.unlink(missing_ok=True)
    try:
        with _quiet_exporter():
            program = torch.onnx.export(model.exported, (example,), dynamo=True, input_names=names,
                                        output_names=outputs, dynamic_shapes=({0: torch.export.Dim("batch")},),
                                        opset_version=opset, verbose=False)
            program.save(str(out_path))
    except Exception as exc:  # the exporter raises its own error types; keep the first line of its story
        raise ExportError(f"torch.onnx.export failed for the static int8 model: "
                          f"{str(exc).strip().splitlines()[0]}") from exc
    import onnx

    graph_model = onnx.load(str(out_path))  # stripped and clamped in memory, written once
    strip_model_metadata(graph_model)
    ranges = _activation_ranges(model)
    clipped = _clamp_reduced_ranges(graph_model, ranges, out_path) if clip_reduced_range else 0
    summary = _graph_summary(graph_model)
    onnx.save(graph_model, str(out_path))

    graph_opset, graph_inputs, graph_outputs = _graph_signature(out_path)
    if not isinstance(graph_inputs[0]["shape"][0], str):
        raise ExportError(f"{out_path}: the exported batch axis is fixed ({graph_inputs[0]['shape']}), not symbolic")
    source = model.info.get("source_class", type(model).__name__)
    report = ExportReport(path=out_path, source=f"{source} (static int8)", opset=graph_opset, kv_cache=False,
                          inputs=graph_inputs, outputs=graph_outputs, dynamic_axes={names[0]: {0: "batch"}},
                          file_bytes=_file_bytes(out_path))
    report.static_int8 = {"activation_ranges": [list(r) for r in sorted(set(ranges.values()))],
                          "reduce_range": bool(model.info.get("reduce_range", False)), "clips_added": clipped,
                          "quantize_nodes": len(ranges), **summary}
    narrowest = min((qmax - qmin for qmin, qmax in ranges.values()), default=255)
    tolerance *= 255 / narrowest
    if validate:
        _validate_int8(report, model, example, tolerance, batch_sizes)
    _write_metadata(report, validate, False, tolerance=tolerance)
    return report
