"""LoRA adapters in PEFT's format, under the module names of our Hugging Face (Mixtral) export.

    adapter_config.json        PEFT's LoraConfig (peft_type "LORA", r, lora_alpha, use_rslora, target_modules, ...)
    adapter_model.safetensors  base_model.model.<HF module path>.lora_A.weight / .lora_B.weight

``save_adapter`` writes what ``peft.PeftModel.from_pretrained`` loads onto ``ds convert --to-hf`` output, and
``load_adapter`` reads an adapter PEFT trained on that export (or one we wrote) onto our model. Only JSON and
safetensors are read (never pickle).

Legend: E experts, R rank, I/O a projection's input/output width, D model width, F expert width.

Module names, ours -> Hugging Face Mixtral (transformers 5, in memory):
``blocks.{L}.attn.{q,k,v,o}`` -> ``model.layers.{L}.self_attn.{q,k,v,o}_proj`` (PEFT ``target_modules``),
``lm_head`` -> ``lm_head``, and the routed experts ``blocks.{L}.ffn.experts`` -> ``model.layers.{L}.mlp.experts``,
whose fused 3-D parameters ``gate_up_proj`` [E, 2F, D] and ``down_proj`` [E, D, F] (our layout exactly) PEFT adapts
through ``target_parameters``. PEFT keeps one pair per parameter as flat linears: ``lora_A`` [E*R, I] is our
[E, R, I] expert-major, ``lora_B`` [O, R*E] is our [E, O, R] with the expert index fastest. Both parameters of one
module are wrapped one inside the other, in the module's parameter order: the first one's keys carry an extra
``base_layer.`` (``...experts.base_layer.lora_A.weight`` is gate_up's, ``...experts.lora_A.weight`` down's).
The router (``mlp.gate``) has no counterpart: our LoRA does not adapt routers.

Our own format, for a base without a Mixtral export (sigmoid router, shared experts, dense first layers: the
quickstart model) or a target without a Hugging Face name (``blocks.N.ffn.shared.up``, a compressed model's
``attn.qkv``): the same two files, ``adapter_config.json`` with PEFT's fields (peft_type "LORA", r, lora_alpha,
use_rslora, lora_dropout, base_model_name_or_path; ``target_modules`` lists our module names) plus
``"deepseek_format": 1`` (the marker: names and layouts are ours), and ``adapter_model.safetensors`` keyed as
:func:`~deepseek.nn.lora.lora_state_dict` names them, in our layouts: ``<module>.lora_A`` [R, I] / ``.lora_B``
[O, R] for linears, ``<experts>.lora_gate_up_A`` [E, R, D], ``.lora_gate_up_B`` [E, 2F, R], ``.lora_down_A``
[E, R, F], ``.lora_down_B`` [E, D, R] for routed experts. r, lora_alpha and use_rslora are written as the adapters
were made, so an rsLoRA scaling is exact. :func:`save_adapter` writes PEFT's format whenever it can, ours otherwise;
every loader reads both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek.atomic import write_atomically
from deepseek.errors import UserFacingError
from deepseek.models.hf import _unwrap, mixtral_incompatibilities
from deepseek.nn.experts import GroupedExperts
from deepseek.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora
from deepseek.nn.multi_lora import MultiLoRALinear
from deepseek.nn.quantized import QuantizedExperts, QuantizedLinear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # MixtralExperts' parameter order, in which PEFT nests them
FORMAT_MARKER = "deepseek_format"  # adapter_config.json field: 1 = our module names and layouts (module docstring)
FORMAT_VERSION = 1
LINEAR_TENSORS = ("lora_A", "lora_B")
EXPERT_TENSORS = ("lora_gate_up_A", "lora_gate_up_B", "lora_down_A", "lora_down_B")

_ATTENTION = re.compile(r"blocks\.(\d+)\.attn\.([qkvo])")
_EXPERTS = re.compile(r"blocks\.(\d+)\.ffn\.experts")
_HF_ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj")
_HF_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts")
_KEY = re.compile(r"(?P<module>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight")
_OUR_KEY = re.compile(r"(?P<module>.+)\.(?P<tensor>lora_(?:A|B|gate_up_A|gate_up_B|down_A|down_B))")


class AdapterError(UserFacingError, ValueError):
    """An adapter directory that is missing a file, or whose config or tensors do not fit the model."""


def hf_module_name(name: str) -> Optional[str]:
    """Our module name -> the Hugging Face Mixtral one (None when the export has no such module)."""
    if name == "lm_head":
        return name
    if m := _ATTENTION.fullmatch(name):
        return f"model.layers.{m[1]}.self_attn.{m[2]}_proj"
    if m := _EXPERTS.fullmatch(name):
        return f"model.layers.{m[1]}.mlp.experts"
    return None


def our_module_name(hf_name: str) -> Optional[str]:
    """The Hugging Face Mixtral module name -> ours (legacy ``block_sparse_moe`` accepted); None if unknown."""
    hf_name = hf_name.replace(".block_sparse_moe.", ".mlp.")
    if hf_name == "lm_head":
        return hf_name
    if m := _HF_ATTENTION.fullmatch(hf_name):
        return f"blocks.{m[1]}.attn.{m[2]}"
    if m := _HF_EXPERTS.fullmatch(hf_name):
        return f"blocks.{m[1]}.ffn.experts"
    return None


def _targets(names: list[str], n_layers: int) -> list[str]:
    """PEFT target names: a projection adapted in every layer as its suffix (``self_attn.q_proj``), else full names."""
    by_suffix: dict[str, list[str]] = {}
    for name in names:
        by_suffix.setdefault(re.sub(r"^model\.layers\.\d+\.", "", name), []).append(name)
    out = []
    for suffix, full in by_suffix.items():
        layers = {re.match(r"model\.layers\.(\d+)\.", n)[1] for n in full if n.startswith("model.layers.")}
        out += [suffix] if suffix == "lm_head" or len(layers) == n_layers else full
    return sorted(out)


def _number(x: float) -> Any:
    return int(x) if float(x).is_integer() else float(x)


def writes_peft_format(model: nn.Module, modules: Sequence[str]) -> bool:
    """Whether :func:`save_adapter` writes adapters on ``modules`` (our names) of ``model`` in PEFT's format — the
    base has a Mixtral export and every module a Hugging Face name — rather than in ours."""
    return not mixtral_incompatibilities(_unwrap(model).config) and all(hf_module_name(n) is not None for n in modules)


def save_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s LoRA adapters as an adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``), atomically; returns the path. PEFT's format for the Hugging Face export of the
    base when :func:`writes_peft_format`, else ours (module docstring).

    Raises :class:`AdapterError` when the model has no adapters, when its adapters differ in rank or scaling (one
    config holds one r and alpha here), or, in PEFT's format, when routed experts have dropout (PEFT's parameter
    adapters have none).
    """
    model = _unwrap(model)
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    if not adapted:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora first)")
    ranks = {(m.lora_A.shape[0] if isinstance(m, LoRALinear) else m.lora_gate_up_A.shape[1]) for _, m in adapted}
    scalings = {m.scaling for _, m in adapted}
    if len(ranks) > 1 or len(scalings) > 1:
        raise AdapterError(f"adapters of different ranks {sorted(ranks)} or scalings {sorted(scalings)}; "
                           "save_adapter writes one r and lora_alpha")
    r, scaling = ranks.pop(), scalings.pop()
    dropout = max(m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for _, m in adapted)
    if writes_peft_format(model, [name for name, _ in adapted]):
        config, tensors = _peft_files(adapted, model.config.n_layers, r, scaling, dropout)
    else:
        config, tensors = _our_files(adapted, r, scaling, dropout)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model_name_or_path,
              **config}
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}

    def write_into(folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return write_atomically(directory, write_into)


def _our_files(adapted: list, r: int, scaling: float, dropout: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """Our format's config fields and tensors (:func:`~deepseek.nn.lora.lora_state_dict`'s names and layouts)."""
    made_with = getattr(adapted[0][1], "lora_config", None)  # all share r and scaling (checked)
    if made_with is not None:
        alpha, rslora = (r if made_with.alpha is None else made_with.alpha), made_with.rslora
    else:
        alpha, rslora = scaling * r, False
    tensors = {f"{name}.{key}": tensor for name, m in adapted
               for key, tensor in m.state_dict().items() if key.startswith("lora_")}
    config = {FORMAT_MARKER: FORMAT_VERSION, "r": r, "lora_alpha": _number(alpha), "lora_dropout": dropout,
              "use_rslora": rslora, "target_modules": sorted(name for name, _ in adapted), "bias": "none",
              "inference_mode": True}
    return config, tensors


def _peft_files(adapted: list, n_layers: int, r: int, scaling: float,
                dropout: float) -> tuple[dict, dict[str, torch.Tensor]]:
    """PEFT's config fields and tensors, under the Hugging Face Mixtral names (module docstring)."""
    if dropout > 0 and any(isinstance(m, LoRAExperts) for _, m in adapted):
        raise AdapterError(f"routed experts have LoRA dropout {dropout}; PEFT's adapters of expert parameters "
                           "(target_parameters) support no dropout")
    # PEFT's file could say use_rslora, but its scaling from (alpha, rslora) is what matters: write plain LoRA
    # with the alpha that gives the same scaling (PEFT computes lora_alpha / r).
    alpha = scaling * r
    tensors: dict[str, torch.Tensor] = {}
    modules, parameters = [], []
    for name, m in adapted:
        hf = hf_module_name(name)
        if isinstance(m, LoRALinear):
            modules.append(hf)
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B
            continue
        parameters.append(hf)
        pairs = {"gate_up_proj": (m.lora_gate_up_A, m.lora_gate_up_B), "down_proj": (m.lora_down_A, m.lora_down_B)}
        for depth, param in enumerate(reversed(EXPERT_PARAMETERS)):  # the last-wrapped is outermost
            a_ERI, b_EOR = (t.detach() for t in pairs[param])
            E, R, _ = a_ERI.shape
            nest = "base_layer." * depth
            tensors[f"{PREFIX}{hf}.{nest}lora_A.weight"] = a_ERI.reshape(E * R, -1)
            tensors[f"{PREFIX}{hf}.{nest}lora_B.weight"] = b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], R * E)
    config = {
        "revision": None,
        "r": r,
        "lora_alpha": _number(alpha),
        "lora_dropout": dropout,
        "use_rslora": False,
        "target_modules": _targets(modules, n_layers),
        "target_parameters": [f"{t}.{p}" for t in _targets(parameters, n_layers) for p in EXPERT_PARAMETERS] or None,
        "exclude_modules": None,
        "bias": "none",
        "lora_bias": False,
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "inference_mode": True,
        "modules_to_save": None,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_dora": False,
        "layer_replication": None,
    }
    return config, tensors


# -- loading --------------------------------------------------------------------------------------

def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path} is missing (not a LoRA adapter directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupt: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only 'LORA')")
    if config.get(FORMAT_MARKER, FORMAT_VERSION) != FORMAT_VERSION:
        raise AdapterError(f"{path}: {FORMAT_MARKER} {config[FORMAT_MARKER]!r} is not supported (only "
                           f"{FORMAT_VERSION}); written by a newer deepseek?")
    problems = []
    for key, ok in (("use_dora", False), ("lora_bias", False), ("fan_in_fan_out", False)):
        if config.get(key, ok) != ok:
            problems.append(f"{key}={config[key]!r}")
    if config.get("bias", "none") != "none":
        problems.append(f"bias={config['bias']!r} (only 'none')")
    for key in ("rank_pattern", "alpha_pattern", "modules_to_save", "layer_replication", "trainable_token_indices"):
        if config.get(key):
            problems.append(f"{key}={config[key]!r}")
    if problems:
        raise AdapterError(f"{path}: unsupported LoRA options: " + "; ".join(problems))
    if not isinstance(config.get("r"), int) or config["r"] < 1:
        raise AdapterError(f"{path}: r must be a positive integer, got {config.get('r')!r}")
    return config


def _read_tensors(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        pickled = path.with_name("adapter_model.bin")
        hint = f" ({pickled.name} is there, but pickle is never read: re-save with safe_serialization=True)" \
            if pickled.is_file() else ""
        raise AdapterError(f"{path} is missing{hint}")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as exc:
        raise AdapterError(f"{path} is corrupt: {exc}") from exc


def _expert_order(config: dict, hf_module: str) -> list[str]:
    """The expert parameters of ``hf_module`` that ``target_parameters`` names, innermost first.

    PEFT wraps a module's targeted parameters in the module's own parameter order (gate_up_proj, down_proj: it
    sorts and walks ``named_parameters``), not in the order of ``target_parameters``, which it saves from a set.
    """
    targets = config.get("target_parameters") or []
    return [param for param in EXPERT_PARAMETERS
            if any(f"{hf_module}.{param}" == t or f"{hf_module}.{param}".endswith("." + t) for t in targets)]


def _lora_shapes(module: nn.Module, r: int) -> Optional[dict[str, tuple[int, ...]]]:
    """The shapes of rank-``r`` adapter tensors (our names and layouts) of ``module`` (a plain, quantized or
    per-row-adapted base); None when it is not adaptable."""
    if isinstance(module, MultiLoRALinear):
        module = module.base_layer
    if isinstance(module, (nn.Linear, QuantizedLinear)):
        return {"lora_A": (r, module.in_features), "lora_B": (module.out_features, r)}
    if isinstance(module, (GroupedExperts, QuantizedExperts)):
        E, F = module.n_experts, module.ffn_dim
        D = module.d_model if isinstance(module, QuantizedExperts) else module.gate_up.shape[2]
        return {"lora_gate_up_A": (E, r, D), "lora_gate_up_B": (E, 2 * F, r), "lora_down_A": (E, r, F),
                "lora_down_B": (E, D, r)}
    return None


@dataclass
class AdapterFile:
    """An adapter directory read and checked against a model: our LoRAConfig (targets = the modules its tensors
    name), and per module (our name) its tensors in our names and layouts, complete and of the right shapes;
    ``where`` names each module's tensors in error messages (file and the file's own module name)."""

    directory: Path
    lora: LoRAConfig
    tensors: dict[str, dict[str, torch.Tensor]]
    where: dict[str, str]


def read_adapter(model: nn.Module, directory: str | Path) -> AdapterFile:
    """Read an adapter directory of either format and check it against ``model`` (unchanged); AdapterError
    naming the file and why otherwise."""
    folder = Path(directory)
    try:
        is_dir = folder.is_dir()
    except OSError as exc:  # e.g. a name too long: the caller's path, not our failure
        raise AdapterError(f"{folder} is not a readable directory: {exc.strerror or exc}") from None
    if not is_dir:
        raise AdapterError(f"{folder} is not a directory")
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    config = _read_config(config_path)
    raw = _read_tensors(weights_path)
    if config.get(FORMAT_MARKER) == FORMAT_VERSION:
        tensors, where = _our_tensors(model, raw, config["r"], weights_path)
    else:
        tensors, where = _peft_tensors(model, raw, config, weights_path)
    if not tensors:
        raise AdapterError(f"{weights_path} holds no LoRA tensors")
    try:
        lora = LoRAConfig(r=config["r"], alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                          rslora=bool(config.get("use_rslora", False)), target_modules=tuple(sorted(tensors)))
    except ValueError as exc:
        raise AdapterError(f"{config_path}: {exc}") from exc
    return AdapterFile(folder, lora, tensors, where)


def _check_module(model: nn.Module, name: str, r: int, shown: str, weights_path: Path) -> dict[str, tuple]:
    try:
        module = model.get_submodule(name)
    except AttributeError:
        raise AdapterError(f"{weights_path}: targets not in this model: {shown}") from None
    shapes = _lora_shapes(module, r)
    if shapes is None:
        raise AdapterError(f"{weights_path}: {shown} is a {type(module).__name__}, not a linear or routed-experts "
                           "module")
    return shapes


def _our_tensors(model: nn.Module, raw: dict[str, torch.Tensor], r: int, weights_path: Path):
    """Our format: ``{module: {tensor name: tensor}}`` and the message prefix of each module."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    unknown = []
    for key, tensor in raw.items():
        m = _OUR_KEY.fullmatch(key)
        if m is None:
            unknown.append(key)
            continue
        by_module.setdefault(m["module"], {})[m["tensor"]] = tensor
    if unknown:
        shown = ", ".join(unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        raise AdapterError(f"{weights_path}: tensors that are not LoRA weights: {shown}")
    where = {}
    for name, parts in by_module.items():
        shapes = _check_module(model, name, r, name, weights_path)
        where[name] = f"{weights_path}: {name}"
        for key in shapes:
            _check_shape(parts.get(key), shapes[key], f"{where[name]}.{key}")
        if set(parts) - set(shapes):
            raise AdapterError(f"{where[name]}: unexpected tensors {sorted(set(parts) - set(shapes))}")
    return by_module, where


def _peft_tensors(model: nn.Module, raw: dict[str, torch.Tensor], config: dict, weights_path: Path):
    """PEFT's format (Hugging Face Mixtral names): converted to our names and layouts, as :func:`_our_tensors`."""
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}  # {our module: {(nesting depth, "A"|"B"): tensor}}
    hf_of: dict[str, str] = {}
    unknown, absent = [], []
    for key, tensor in raw.items():
        m = _KEY.fullmatch(key.removeprefix(PREFIX)) if key.startswith(PREFIX) else None
        if m is None:
            if key.endswith(".base_layer.weight"):  # PEFT's copy of a targeted embedding/head's frozen base
                continue
            unknown.append(key)
            continue
        ours = our_module_name(m["module"])
        if ours is None:
            unknown.append(key)
            continue
        try:
            model.get_submodule(ours)
        except AttributeError:
            absent.append(f"{m['module']} (our {ours})")
            continue
        hf_of[ours] = m["module"]
        found.setdefault(ours, {})[(m["nest"].count("base_layer."), m["ab"])] = tensor
    if unknown:
        shown = ", ".join(unknown[:6]) + (", ..." if len(unknown) > 6 else "")
        raise AdapterError(f"{weights_path}: tensors of no module of the Mixtral export: {shown}")
    if absent:
        raise AdapterError(f"{weights_path}: targets not in this model: {', '.join(sorted(set(absent))[:6])}")

    r = config["r"]
    tensors: dict[str, dict[str, torch.Tensor]] = {}
    where: dict[str, str] = {}
    for ours, parts in found.items():
        shapes = _check_module(model, ours, r, hf_of[ours], weights_path)
        where[ours] = here = f"{weights_path}: {hf_of[ours]}"
        if "lora_A" in shapes:
            a, b = parts.pop((0, "A"), None), parts.pop((0, "B"), None)
            _check_shape(a, shapes["lora_A"], here + ".lora_A.weight")
            _check_shape(b, shapes["lora_B"], here + ".lora_B.weight")
            tensors[ours] = {"lora_A": a, "lora_B": b}
        else:
            tensors[ours] = _peft_experts(parts, _expert_order(config, hf_of[ours]), shapes, here)
        if parts:
            raise AdapterError(f"{here}: unexpected tensors {sorted(parts)}")
    return tensors, where


def _peft_experts(parts: dict, order: list[str], shapes: dict[str, tuple], where: str) -> dict[str, torch.Tensor]:
    """PEFT's flat pairs of the expert parameters ``order`` names (innermost first) -> our four [E, ...] tensors;
    a parameter PEFT left alone gets zero A and B (adds nothing)."""
    if len(order) * 2 != len(parts):
        raise AdapterError(f"{where}: {len(parts)} LoRA tensors, but target_parameters names "
                           f"{order or 'none'} of its expert parameters")
    out = {}
    for depth, param in enumerate(reversed(order)):
        prefix = "lora_gate_up" if param == "gate_up_proj" else "lora_down"
        E, R, I = shapes[f"{prefix}_A"]
        O = shapes[f"{prefix}_B"][1]
        a, b = parts.pop((depth, "A"), None), parts.pop((depth, "B"), None)
        here = f"{where}.{'base_layer.' * depth}lora_A/B.weight ({param})"
        if a is None or b is None:
            raise AdapterError(f"{here} is missing")
        if tuple(a.shape) != (E * R, I) or tuple(b.shape) != (O, R * E):
            raise AdapterError(f"{here} have shapes {list(a.shape)} and {list(b.shape)}, expected {[E * R, I]} and "
                               f"{[O, R * E]}")
        out[f"{prefix}_A"] = a.reshape(E, R, I)
        out[f"{prefix}_B"] = b.reshape(O, R, E).permute(2, 0, 1)
    for key in EXPERT_TENSORS:
        out.setdefault(key, torch.zeros(shapes[key]))
    return out


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Apply the LoRA adapter of an adapter directory (ours, or PEFT's on the Hugging Face export of ``model``)
    to ``model``, in place: adapters with the config's r, lora_alpha, use_rslora and lora_dropout on the modules
    its tensors name, loaded with those tensors. Returns our names of the adapted modules.

    Raises :class:`AdapterError` naming the file and why: a missing or corrupt file, a peft_type other than LORA,
    an unsupported option, a tensor of a module our model lacks, or a shape that does not fit; the model is then
    left as it was.
    """
    adapter = read_adapter(model, directory)
    apply_lora(model, adapter.lora)
    with torch.no_grad():
        for name, parts in adapter.tensors.items():
            module = model.get_submodule(name)
            for key, tensor in parts.items():
                getattr(module, key).copy_(tensor)
    return sorted(adapter.tensors)


def _check_shape(tensor: Optional[torch.Tensor], shape: tuple[int, ...], where: str) -> None:
    if tensor is None:
        raise AdapterError(f"{where} is missing")
    if tuple(tensor.shape) != tuple(shape):
        raise AdapterError(f"{where} has shape {list(tensor.shape)}, expected {list(shape)}")


# -- serving: many adapters per row -----------------------------------------------------------------

@dataclass
class ServedAdapter:
    """One adapter as :class:`~deepseek.nn.multi_lora.MultiLoRALinear` holds it: per linear (our name) its
    (A [r, I], B [O, r]), with its scaling."""

    name: str
    rank: int
    scaling: float
    weights: dict[str, tuple[torch.Tensor, torch.Tensor]]


def read_served_adapter(model: nn.Module, name: str, directory: str | Path) -> ServedAdapter:
    """Read an adapter directory (either format) for serving per row on ``model`` (unchanged). AdapterError for
    what :func:`read_adapter` refuses, an empty name, and adapters of the head or the routed experts (served per
    row: not yet)."""
    if not isinstance(name, str) or not name:
        raise AdapterError(f"adapter names must be non-empty strings, got {name!r}")
    adapter = read_adapter(model, directory)
    weights = {}
    for module_name, parts in adapter.tensors.items():
        module = model.get_submodule(module_name)
        if isinstance(module, MultiLoRALinear):
            module = module.base_layer
        if not isinstance(module, nn.Linear) or module_name == "lm_head":
            raise AdapterError(f"{adapter.where[module_name]}: only linear layers (attention, dense and shared-expert "
                               f"projections), not the head or routed experts, are served per row (adapter {name!r})")
        weights[module_name] = (parts["lora_A"], parts["lora_B"])
    return ServedAdapter(name, adapter.lora.r, adapter.lora.scaling, weights)


def install_adapters(model: nn.Module, slots: Sequence[Optional[ServedAdapter]]) -> None:
    """Make ``model`` serve exactly ``slots`` per row (index = the row's adapter id; None = an empty slot, named
    ""): every linear some adapter targets becomes a fresh :class:`~deepseek.nn.multi_lora.MultiLoRALinear`
    (previous ones are replaced, their base layers reused, never copied)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, MultiLoRALinear):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.base_layer)
    present = [s for s in slots if s is not None]
    if not present:
        return
    names = [s.name if s is not None else "" for s in slots]
    rank = max(s.rank for s in present)
    for target in sorted({module for s in present for module in s.weights}):
        wrapper = MultiLoRALinear(model.get_submodule(target), names, rank)
        for index, slot in enumerate(slots):
            if slot is not None and target in slot.weights:
                wrapper.set_adapter(index, *slot.weights[target], slot.scaling)
        parent, _, child = target.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper)


def load_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> list[str]:
    """Serve several adapter directories (either format) on ``model`` at once, each row of a batch choosing its
    own: every linear an adapter targets becomes a :class:`~deepseek.nn.multi_lora.MultiLoRALinear` holding them
    all (in the order of ``adapters``; select per row with :func:`~deepseek.nn.multi_lora.row_adapters`).
    Returns the adapter names in index order. The model is left as it was if an adapter is refused.

    Raises :class:`AdapterError` for what :func:`read_served_adapter` refuses, for an empty mapping, and for a
    model that already has adapters.
    """
    if not adapters:
        raise AdapterError("no adapters to load")
    if any(isinstance(m, (LoRALinear, LoRAExperts, MultiLoRALinear)) for m in model.modules()):
        raise AdapterError("the model already has LoRA adapters")
    slots = [read_served_adapter(model, name, directory) for name, directory in adapters.items()]
    install_adapters(model, slots)
    return list(adapters)
