"""ONNX export with torch's dynamo exporter, checked against eager torch with onnxruntime.

    report = export_onnx("runs/quickstart/model", "lm.onnx")               # input_ids [B, T] -> logits [B, T, V]
    report = export_onnx("runs/quickstart/model", "lm.onnx", kv_cache=True)  # + past/present keys and values
    report = export_onnx("runs/quickstart/model", "lm.onnx", quantize_int8=True)   # also lm.int8.onnx
    report = export_onnx(cnn, "cnn.onnx", example_inputs=(torch.randn(2, 1, 8, 8),), input_names=["image"])

A language model (a model directory or a :class:`MoETransformer`) becomes a graph with dynamic batch and
sequence axes. Its MoE layers take :class:`~deepseek.nn.dispatch.LoopDispatch` while exporting (the sorted
dispatch reads expert counts on the host and calls ``torch._grouped_mm``, neither of which has an ONNX form):
per expert, the tokens that chose it are found with NonZero, gathered, multiplied and scatter-added back. Only
the chosen (token, expert) pairs are computed, as in eager; the graph holds E expert blocks per MoE layer.

``kv_cache=True`` exports the decoding step instead: inputs ``input_ids`` [B, T] and, per layer,
``past_key_values.{i}.key`` / ``.value`` [B, Hkv, P, Dh] (P = 0 for the prompt); outputs ``logits`` and
``present.{i}.key`` / ``.value`` [B, Hkv, P + T, Dh]. Positions are P, P+1, ...: every row of a batch has the
same length (no padding). Validation then also decodes 8 tokens greedily through the graph and requires the
tokens of eager greedy decoding.

Every export is validated (unless ``validate=False``) by running onnxruntime and eager torch on a few shapes;
a max abs difference above :data:`FP32_TOLERANCE` raises :class:`ExportError`. ``export.json`` next to the file
records the source, opset, input/output names, dynamic axes and the validation.
"""

from __future__ import annotations

import contextlib
import json
import logging
import statistics
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
from torch import nn

from deepseek.models.transformer import MoETransformer
from deepseek.nn.attention import AttentionInputs
from deepseek.nn.quantized import QuantizedWeight

FP32_TOLERANCE = 1e-4
LM_SHAPES = ((1, 7), (2, 16), (3, 33))  # (batch, tokens) checked for a language model
BATCH_SIZES = (1, 2, 5)  # batch sizes checked for any other module
GREEDY_TOKENS = 8
EXTERNAL_DATA_BYTES = 1 << 30  # above this the weights go to a .data file next to the graph (protobuf's 2 GB cap)
METADATA_FILE = "export.json"


class ExportError(ValueError):
    """The export failed, or the ONNX graph does not compute what the torch model computes."""


@dataclass
class ExportReport:
    """What :func:`export_onnx` wrote and how well the graph matched eager torch.

    ``inputs`` / ``outputs``: ``{"name", "dtype", "shape"}`` as stored in the graph (dynamic dims are names);
    ``validation``: one row per checked shape with ``max_abs_diff``, ``eager_ms`` and ``ort_ms``;
    ``int8``: the quantized file, its size and its agreement with the fp32 graph;
    ``static_int8``: for :func:`~deepseek.export.static_int8_onnx.export_static_int8_onnx`, the QDQ graph's
    activation ranges, added Clips, operator counts and int8 initializer bytes.
    """

    path: Path
    source: str
    opset: int
    kv_cache: bool
    inputs: list[dict]
    outputs: list[dict]
    dynamic_axes: dict[str, dict[int, str]]
    file_bytes: int
    validation: list[dict] = field(default_factory=list)
    greedy_match: Optional[bool] = None
    int8: Optional[dict] = None
    static_int8: Optional[dict] = None

    @property
    def max_abs_diff(self) -> Optional[float]:
        return max((row["max_abs_diff"] for row in self.validation), default=None)

    def to_dict(self) -> dict:
        data = asdict(self)
        data["path"] = str(self.path)
        data["max_abs_diff"] = self.max_abs_diff
        return data


# -- the graphs ------------------------------------------------------------------------------------------

class _Logits(nn.Module):
    """``input_ids`` [B, T] -> logits [B, T, V]: the signature the LM graph gets."""

    def __init__(self, model: MoETransformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)


class _PastPresent:
    """Stands in for a KVCache inside the exported step: appends the new keys/values of each layer to the
    past ones it was given and keeps the results as the step's ``present`` outputs."""

    def __init__(self, past: Sequence[torch.Tensor]):
        self.past = list(past)  # [k0, v0, k1, v1, ...], each [B, Hkv, P, Dh]
        self.present: list[Optional[torch.Tensor]] = [None] * len(self.past)
        self.k = self.v = self.past[0]  # Attention reads the cache dtype from .k / .v

    def write(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        k = torch.cat([self.past[2 * layer], k_BHTD], dim=2)
        v = torch.cat([self.past[2 * layer + 1], v_BHTD], dim=2)
        self.present[2 * layer], self.present[2 * layer + 1] = k, v
        return k, v


class _DecodingStep(nn.Module):
    """``(input_ids [B, T], past [k0, v0, ...] each [B, Hkv, P, Dh])`` -> ``(logits, k0', v0', ...)``.

    The model's own blocks, fed explicit past tensors instead of a KVCache object: the new tokens sit at
    positions P .. P+T-1 and each attends to every past slot and to the new ones up to itself.
    """

    def __init__(self, model: MoETransformer):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, past_key_values: list[torch.Tensor]) -> tuple[torch.Tensor, ...]:
        model = self.model
        B, T = input_ids.shape
        P = past_key_values[0].shape[2]
        q_pos_T = P + torch.arange(T, device=input_ids.device)
        cos, sin = model.rope(q_pos_T.expand(B, T))
        mask_11TS = (torch.arange(P + T, device=input_ids.device)[None, :] <= q_pos_T[:, None])[None, None]
        cache = _PastPresent(past_key_values)
        inputs = AttentionInputs(cos, sin, mask=mask_11TS, cache=cache)
        x_BTD = model.embed(input_ids)
        for block in model.blocks:
            x_BTD = block(x_BTD, inputs)
        return (model._head(model.norm(x_BTD)), *cache.present)


def _kv_names(n_layers: int, prefix: str) -> list[str]:
    return [f"{prefix}.{i}.{kv}" for i in range(n_layers) for kv in ("key", "value")]


def _empty_past(model: MoETransformer, batch: int, length: int = 0) -> list[torch.Tensor]:
    cfg = model.config
    dtype = next(model.parameters()).dtype
    return [torch.zeros(batch, cfg.n_kv_heads, length, cfg.head_dim, dtype=dtype) for _ in range(2 * cfg.n_layers)]


# -- export ------------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _quiet_exporter():
    """The exporter logs a line per missing optional package and warns about its own internals; the quantizer
    logs a warning per integer tensor it leaves alone."""
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(previous)


def _resolve(model_dir_or_model) -> tuple[nn.Module, str]:
    if isinstance(model_dir_or_model, nn.Module):
        return model_dir_or_model, type(model_dir_or_model).__name__
    if isinstance(model_dir_or_model, (str, Path)):
        from deepseek.models.directory import load

        path = Path(model_dir_or_model)
        if not path.exists():
            raise FileNotFoundError(f"{path} does not exist (expected a model directory)")
        model, _ = load(path)  # ModelDirectoryError names a missing or corrupt file
        return model, str(path.resolve())
    raise ExportError(f"expected a model directory or an nn.Module, got {type(model_dir_or_model).__name__}")


def _weight_bytes(module: nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in [*module.parameters(), *module.buffers()])


def _graph_signature(path: Path) -> tuple[int, list[dict], list[dict]]:
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    opset = next((o.version for o in graph_model.opset_import if o.domain in ("", "ai.onnx")), 0)

    def describe(values) -> list[dict]:
        out = []
        for v in values:
            t = v.type.tensor_type
            dims = [d.dim_param if d.dim_param else d.dim_value for d in t.shape.dim]
            out.append({"name": v.name, "dtype": onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name,
                        "shape": dims})
        return out

    return opset, describe(graph_model.graph.input), describe(graph_model.graph.output)


def strip_metadata(path: Path) -> None:
    """Drop what the dynamo exporter records for debugging: per-node ``metadata_props`` (stack traces, FX node
    strings) and doc strings, the graph's ``value_info`` (intermediate shapes, which onnxruntime infers again) and
    the model's ``metadata_props``. Up to half of a small model's file; the inputs, outputs, initializers and
    operators are unchanged. External weights (``<file>.data``) stay where they are."""
    import onnx

    graph_model = onnx.load(str(path), load_external_data=False)
    strip_model_metadata(graph_model)
    onnx.save(graph_model, str(path))


def strip_model_metadata(graph_model) -> None:
    """:func:`strip_metadata` on a loaded ``onnx.ModelProto``, in place."""
    graphs = [graph_model.graph]
    while graphs:  # subgraphs (If / Loop bodies) carry metadata too
        graph = graphs.pop()
        del graph.value_info[:]
        for node in graph.node:
            del node.metadata_props[:]
            node.doc_string = ""
            graphs += [a.g for a in node.attribute if a.HasField("g")] + [g for a in node.attribute for g in a.graphs]
    for function in graph_model.functions:
        for node in function.node:
            del node.metadata_props[:]
            node.doc_string = ""
    del graph_model.metadata_props[:]
    graph_model.graph.doc_string = ""


def checked_out_path(out_path: str | Path) -> Path:
    """``out_path`` as a Path; ExportError unless it names a ``.onnx`` file (not a directory)."""
    out_path = Path(out_path)
    if out_path.suffix != ".onnx":
        raise ExportError(f"{out_path}: the output file name must end in .onnx")
    if out_path.is_dir():
        raise ExportError(f"{out_path} is a directory; give the .onnx file to write")
    return out_path


def _file_bytes(path: Path) -> int:
    data = path.with_name(path.name + ".data")
    return path.stat().st_size + (data.stat().st_size if data.exists() else 0)


def export_onnx(model_dir_or_model, out_path: str | Path, *, kv_cache: bool = False, opset: Optional[int] = None,
                quantize_int8: bool = False, validate: bool = True,
                example_inputs: Optional[Sequence[torch.Tensor]] = None, input_names: Optional[Sequence[str]] = None,
                output_names: Optional[Sequence[str]] = None,
                dynamic_axes: Optional[dict[str, dict[int, str]]] = None) -> ExportReport:
    """Export a language model or any ``nn.Module`` to ONNX, validate it with onnxruntime, write ``export.json``.

    ``model_dir_or_model``: a model directory (loaded with ``ds.load``), a :class:`MoETransformer`, or any
    module. A language model takes ``input_ids`` int64 [batch, seq] and returns ``logits`` float32
    [batch, seq, vocab] (``kv_cache``: see the module docs). Any other module needs ``example_inputs``
    (a tuple of tensors); ``input_names`` default to ``input`` / ``input_0, input_1, ...``, ``output_names``
    to ``output`` / ``output_0, ...``, ``dynamic_axes`` to ``{name: {0: "batch"}}`` for every input.
    ``opset``: the ONNX opset (default: torch's). ``quantize_int8`` also writes ``<stem>.int8.onnx``
    (onnxruntime dynamic int8 quantization) and reports its agreement with the fp32 graph.
    Raises :class:`ExportError` when the export fails or the graph differs from eager by more than
    :data:`FP32_TOLERANCE`; missing or broken model directories raise ``FileNotFoundError`` /
    ``ModelDirectoryError``.
    """
    model, source = _resolve(model_dir_or_model)
    out_path = checked_out_path(out_path)
    is_lm = isinstance(model, MoETransformer)
    if kv_cache and not is_lm:
        raise ExportError("kv_cache=True needs a deepseek language model (MoETransformer)")
    if is_lm and kv_cache and model.config.attention != "dense":
        raise ExportError("kv_cache=True supports dense attention only (this model uses sparse attention)")
    if not is_lm and example_inputs is None:
        raise ExportError(f"{type(model).__name__} is not a deepseek language model: pass example_inputs "
                          f"(a tuple of tensors shaped like one batch)")
    if any(isinstance(m, QuantizedWeight) for m in model.modules()):
        raise ExportError("a compressed (quantized) model has no ONNX form: export the uncompressed model "
                          "and quantize the graph with quantize_int8=True (ds export onnx --int8)")
    if is_lm and example_inputs is not None:
        raise ExportError("example_inputs are for non-LM modules; a language model takes input_ids [batch, seq]")

    with _eval_mode(model):
        if is_lm:
            module, args, names, outputs, axes, dims = _lm_signature(model, kv_cache)
        else:
            module, args, names, outputs, axes, dims = _module_signature(model, example_inputs, input_names,
                                                                         output_names, dynamic_axes)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        for stale in (out_path, out_path.with_name(out_path.name + ".data")):
            stale.unlink(missing_ok=True)
        try:
            with _quiet_exporter():
                program = torch.onnx.export(module, args, dynamo=True, input_names=names, output_names=outputs,
                                            dynamic_shapes=dims, opset_version=opset, verbose=False)
                program.save(str(out_path), external_data=_weight_bytes(model) > EXTERNAL_DATA_BYTES)
            strip_metadata(out_path)
        except Exception as exc:  # the exporter raises its own error types; keep the first line of its story
            raise ExportError(f"torch.onnx.export failed for {source}: {str(exc).strip().splitlines()[0]}") from exc

        graph_opset, graph_inputs, graph_outputs = _graph_signature(out_path)
        report = ExportReport(path=out_path, source=source, opset=graph_opset, kv_cache=kv_cache,
                              inputs=graph_inputs, outputs=graph_outputs, dynamic_axes=axes,
                              file_bytes=_file_bytes(out_path))
        cases = _validation_cases(model, kv_cache, args) if (validate or quantize_int8) else []
        if validate:
            _validate(report, module, cases)
            if kv_cache:
                report.greedy_match = _check_greedy(model, out_path, names)
        if quantize_int8:
            report.int8 = _quantize(out_path, cases, names)
    _write_metadata(report, validate, quantize_int8)
    return report


@contextlib.contextmanager
def _eval_mode(model: nn.Module):
    """Dropout off and no routing statistics while exporting; the caller's mode afterwards."""
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def _lm_signature(model: MoETransformer, kv_cache: bool):
    cfg = model.config
    batch = torch.export.Dim("batch")
    seq = torch.export.Dim("seq", max=cfg.max_seq_len)
    # Example sizes above 1 and distinct, so that the exporter keeps every axis symbolic.
    ids = torch.randint(0, cfg.vocab_size, (2, 3), generator=torch.Generator().manual_seed(0))
    if not kv_cache:
        axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"}}
        return _Logits(model), (ids,), ["input_ids"], ["logits"], axes, {"input_ids": {0: batch, 1: seq}}
    past = torch.export.Dim("past", max=cfg.max_seq_len)
    past_names, present_names = _kv_names(cfg.n_layers, "past_key_values"), _kv_names(cfg.n_layers, "present")
    axes = {"input_ids": {0: "batch", 1: "seq"}, "logits": {0: "batch", 1: "seq"},
            **{n: {0: "batch", 2: "past"} for n in past_names},
            **{n: {0: "batch", 2: "past + seq"} for n in present_names}}
    dims = {"input_ids": {0: batch, 1: seq}, "past_key_values": [{0: batch, 2: past}] * len(past_names)}
    return (_DecodingStep(model), (ids, _empty_past(model, 2, 5)), ["input_ids", *past_names],
            ["logits", *present_names], axes, dims)


def _module_signature(model: nn.Module, example_inputs, input_names, output_names, dynamic_axes):
    if isinstance(example_inputs, torch.Tensor):
        example_inputs = (example_inputs,)
    example_inputs = tuple(example_inputs)
    if not example_inputs or not all(isinstance(t, torch.Tensor) for t in example_inputs):
        raise ExportError("example_inputs must be a non-empty tuple of tensors")
    n = len(example_inputs)
    names = list(input_names) if input_names else (["input"] if n == 1 else [f"input_{i}" for i in range(n)])
    if len(names) != n:
        raise ExportError(f"{len(names)} input_names for {n} example inputs")
    axes = dict(dynamic_axes) if dynamic_axes is not None else {name: {0: "batch"} for name in names}
    unknown = sorted(set(axes) - set(names))
    if unknown:
        raise ExportError(f"dynamic_axes name unknown inputs {', '.join(unknown)}; inputs are {', '.join(names)}")
    # Dynamic axes need example sizes above 1, or the exporter specialises them to the example.
    args = []
    for name, t in zip(names, example_inputs):
        for axis in axes.get(name, {}):
            if t.shape[axis] < 2:
                t = torch.cat([t, t], dim=axis)
        args.append(t)
    symbols = {axis_name: torch.export.Dim(axis_name) for spec in axes.values() for axis_name in spec.values()}
    dims = tuple({axis: symbols[axis_name] for axis, axis_name in axes.get(name, {}).items()} or None
                 for name in names)
    with torch.no_grad():
        example_out = model.eval()(*args)
    n_out = 1 if isinstance(example_out, torch.Tensor) else len(example_out)
    outputs = list(output_names) if output_names else (["output"] if n_out == 1 else
                                                       [f"output_{i}" for i in range(n_out)])
    if len(outputs) != n_out:
        raise ExportError(f"{len(outputs)} output_names for {n_out} outputs of the model")
    return model, tuple(args), names, outputs, axes, dims


# -- validation ------------------------------------------------------------------------------------------

def _session(path: Path):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()  # the same threads as eager, for a fair timing
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _median_ms(fn, repeats: int = 3) -> float:
    fn()  # warm-up (first-run allocations, ORT's lazy kernel setup)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(1e3 * (time.perf_counter() - start))
    return statistics.median(times)


def _validation_cases(model: nn.Module, kv_cache: bool, args: tuple) -> list[tuple]:
    """``(label, torch inputs)`` for each checked shape. The KV-cache step is checked on prompts (no past) and,
    in the last case, on a chunk that follows 5 past tokens (random keys and values: any past is valid input)."""
    generator = torch.Generator().manual_seed(0)
    if isinstance(model, MoETransformer):
        cases = []
        for i, (b, t) in enumerate(LM_SHAPES):
            t = min(t, model.config.max_seq_len)
            ids = torch.randint(0, model.config.vocab_size, (b, t), generator=generator)
            if not kv_cache:
                cases.append((f"{b}x{t}", (ids,)))
                continue
            past_len = 5 if i == len(LM_SHAPES) - 1 and t + 5 <= model.config.max_seq_len else 0
            past = [torch.randn(p.shape, generator=generator, dtype=p.dtype) for p in _empty_past(model, b, past_len)]
            cases.append((f"{b}x{t}" + (f" after {past_len}" if past_len else ""), (ids, past)))
        return cases
    cases = []
    for b in BATCH_SIZES:
        inputs = []
        for t in args:
            rows = t[torch.arange(b) % t.shape[0]]
            if t.is_floating_point():
                rows = rows + 0.1 * torch.randn(rows.shape, generator=generator, dtype=t.dtype)
            inputs.append(rows)
        cases.append((f"batch {b}", tuple(inputs)))
    return cases


def _feed(names: list[str], inputs: tuple) -> dict[str, np.ndarray]:
    flat = [inputs[0], *inputs[1]] if len(inputs) == 2 and isinstance(inputs[1], list) else list(inputs)
    return {name: np.ascontiguousarray(t.numpy()) for name, t in zip(names, flat)}


def _validate(report: ExportReport, module: nn.Module, cases: list[tuple]) -> None:
    session = _session(report.path)
    names = [i["name"] for i in report.inputs]
    for label, inputs in cases:
        feed = _feed(names, inputs)
        with torch.no_grad():
            expected = [t.numpy() for t in _as_tuple(module(*inputs))]
            eager_ms = _median_ms(lambda: module(*inputs))
        got = session.run(None, feed)
        ort_ms = _median_ms(lambda: session.run(None, feed))
        diff = max(float(np.abs(g - e).max()) if g.size else 0.0 for g, e in zip(got, expected))
        report.validation.append({"shape": label, "max_abs_diff": diff, "eager_ms": eager_ms, "ort_ms": ort_ms})
        if not diff <= FP32_TOLERANCE:  # also catches NaN
            raise ExportError(f"{report.path}: onnxruntime differs from eager torch by {diff:.3g} at {label} "
                              f"(tolerance {FP32_TOLERANCE:g})")


def _as_tuple(result) -> tuple:
    return (result,) if isinstance(result, torch.Tensor) else tuple(result)


def _check_greedy(model: MoETransformer, path: Path, names: list[str]) -> bool:
    """Greedy decoding of :data:`GREEDY_TOKENS` tokens through the KV graph (prompt, then one token per step)
    must give the tokens of eager greedy decoding (full forward each step)."""
    generator = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, model.config.vocab_size, (2, 5), generator=generator)
    n_new = min(GREEDY_TOKENS, model.config.max_seq_len - prompt.shape[1])
    eager = prompt
    with torch.no_grad():
        for _ in range(n_new):
            eager = torch.cat([eager, model(eager)[:, -1].argmax(-1, keepdim=True)], dim=1)
    session = _session(path)
    feed = _feed(names, (prompt, _empty_past(model, prompt.shape[0])))
    tokens = [prompt.numpy()]
    for _ in range(n_new):
        logits, *present = session.run(None, feed)
        next_ids = logits[:, -1].argmax(-1)[:, None].astype(np.int64)
        tokens.append(next_ids)
        feed = {"input_ids": next_ids, **dict(zip(names[1:], present))}
    onnx_tokens = np.concatenate(tokens, axis=1)
    if not np.array_equal(onnx_tokens, eager.numpy()):
        raise ExportError(f"{path}: greedy decoding with the KV-cache graph gives {onnx_tokens[:, 5:].tolist()}, "
                          f"eager torch {eager[:, 5:].tolist()}")
    return True


def _quantize(path: Path, cases: list[tuple], names: list[str]) -> dict:
    """onnxruntime dynamic int8 quantization (int8 weights, activations quantized per call) of ``path``."""
    from onnxruntime.quantization import QuantType, quant_pre_process, quantize_dynamic

    int8_path = path.with_name(path.stem + ".int8.onnx")
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        with _quiet_exporter():
            try:
                quant_pre_process(str(path), str(prepared))
            except Exception:  # noqa: BLE001 - symbolic shape inference gives up on some graphs; skip just that
                quant_pre_process(str(path), str(prepared), skip_symbolic_shape=True)
            quantize_dynamic(str(prepared), str(int8_path), weight_type=QuantType.QInt8)
    result = {"path": str(int8_path), "file_bytes": _file_bytes(int8_path), "max_abs_diff": None,
              "argmax_agreement": None}
    if cases:
        fp32, int8 = _session(path), _session(int8_path)
        diffs, agree, total = [], 0, 0
        for _, inputs in cases:
            feed = _feed(names, inputs)
            a, b = fp32.run(None, feed)[0], int8.run(None, feed)[0]
            diffs.append(float(np.abs(a - b).max()))
            agree += int((a.argmax(-1) == b.argmax(-1)).sum())
            total += a.argmax(-1).size
        result["max_abs_diff"] = max(diffs)
        result["argmax_agreement"] = agree / total
    return result


def _write_metadata(report: ExportReport, validated: bool, quantized: bool,
                    tolerance: float = FP32_TOLERANCE) -> Path:
    data = {
        "source": report.source,
        "file": report.path.name,
        "opset": report.opset,
        "kv_cache": report.kv_cache,
        "inputs": report.inputs,
        "outputs": report.outputs,
        "dynamic_axes": {name: {str(k): v for k, v in spec.items()} for name, spec in report.dynamic_axes.items()},
        "file_bytes": report.file_bytes,
        "validation": ({"tolerance": tolerance, "max_abs_diff": report.max_abs_diff, "shapes": report.validation,
                        "greedy_match": report.greedy_match} if validated else None),
        "int8": report.int8 is not None,
        "int8_file": None if not quantized else {**report.int8, "path": Path(report.int8["path"]).name},
        "static_int8": report.static_int8,
        "torch": torch.__version__,
    }
    path = report.path.parent / METADATA_FILE
    path.write_text(json.dumps(data, indent=2) + "\n")
    return path


def serving_config(report: ExportReport | str | Path, max_batch_size: int = 8) -> dict[str, Any]:
    """A ``config.yaml`` mapping for the server's ``onnx`` backend (``model.onnx`` in a version folder), from
    an :class:`ExportReport` or an ``export.json`` file.

    Dim 0 of every input and output is the batch (``max_batch_size`` > 0); the other dynamic dims become -1.
    """
    if not isinstance(report, ExportReport):
        meta = json.loads(Path(report).read_text())
        report = ExportReport(path=Path(report).parent / meta["file"], source=meta["source"], opset=meta["opset"],
                              kv_cache=meta["kv_cache"], inputs=meta["inputs"], outputs=meta["outputs"],
                              dynamic_axes={}, file_bytes=meta["file_bytes"])
    datatypes = {"int64": "INT64", "int32": "INT32", "float32": "FP32", "float16": "FP16", "bool": "BOOL"}

    def specs(values: list[dict]) -> list[dict]:
        return [{"name": v["name"], "datatype": datatypes.get(v["dtype"], v["dtype"].upper()),
                 "shape": [d if isinstance(d, int) and d > 0 else -1 for d in v["shape"][1:]]} for v in values]

    return {"backend": "onnx", "max_batch_size": max_batch_size, "inputs": specs(report.inputs),
            "outputs": specs(report.outputs)}
