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
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from deepseek.atomic import write_atomically
from deepseek.errors import UserFacingError
from deepseek.models.hf import _unwrap, mixtral_incompatibilities
from deepseek.nn.lora import LoRAConfig, LoRAExperts, LoRALinear, apply_lora
from deepseek.nn.multi_lora import MultiLoRALinear

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
EXPERT_PARAMETERS = ("gate_up_proj", "down_proj")  # MixtralExperts' parameter order, in which PEFT nests them

_ATTENTION = re.compile(r"blocks\.(\d+)\.attn\.([qkvo])")
_EXPERTS = re.compile(r"blocks\.(\d+)\.ffn\.experts")
_HF_ATTENTION = re.compile(r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj")
_HF_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts")
_KEY = re.compile(r"(?P<module>.+?)\.(?P<nest>(?:base_layer\.)*)lora_(?P<ab>[AB])\.weight")


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


def save_adapter(model: nn.Module, directory: str | Path, *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write ``model``'s LoRA adapters as a PEFT adapter directory (``adapter_config.json`` +
    ``adapter_model.safetensors``) for the Hugging Face export of its base, atomically; returns the path.

    Raises :class:`AdapterError` when the model has no adapters, when its adapters differ in rank or scaling (one
    PEFT config holds one r and alpha here), when the base cannot be exported to Mixtral, or when routed experts have
    dropout (PEFT's parameter adapters have none).
    """
    model = _unwrap(model)
    reasons = mixtral_incompatibilities(model.config)
    if reasons:
        raise AdapterError("cannot save in PEFT's format, the base has no Hugging Face export: " + "; ".join(reasons))
    adapted = [(name, m) for name, m in model.named_modules() if isinstance(m, (LoRALinear, LoRAExperts))]
    if not adapted:
        raise AdapterError("the model has no LoRA adapters to save (apply_lora first)")
    ranks = {(m.lora_A.shape[0] if isinstance(m, LoRALinear) else m.lora_gate_up_A.shape[1]) for _, m in adapted}
    scalings = {m.scaling for _, m in adapted}
    if len(ranks) > 1 or len(scalings) > 1:
        raise AdapterError(f"adapters of different ranks {sorted(ranks)} or scalings {sorted(scalings)}; "
                           "save_adapter writes one r and lora_alpha")
    r, scaling = ranks.pop(), scalings.pop()
    dropouts = {m.dropout.p if isinstance(m.dropout, nn.Dropout) else 0.0 for _, m in adapted}
    dropout = max(dropouts)
    if dropout > 0 and any(isinstance(m, LoRAExperts) for _, m in adapted):
        raise AdapterError(f"routed experts have LoRA dropout {dropout}; PEFT's adapters of expert parameters "
                           "(target_parameters) support no dropout")
    # rsLoRA or not cannot be told from the scaling alone; the adapted model does not keep the flag, so
    # write plain LoRA with the alpha that gives the same scaling (PEFT computes lora_alpha / r).
    alpha = scaling * r

    tensors: dict[str, torch.Tensor] = {}
    modules, parameters = [], []
    for name, m in adapted:
        hf = hf_module_name(name)
        if hf is None:
            raise AdapterError(f"module {name!r} has no Hugging Face Mixtral counterpart")
        if isinstance(m, LoRALinear):
            modules.append(hf)
            tensors[f"{PREFIX}{hf}.lora_A.weight"] = m.lora_A.detach()
            tensors[f"{PREFIX}{hf}.lora_B.weight"] = m.lora_B.detach()
            continue
        parameters.append(hf)
        pairs = {"gate_up_proj": (m.lora_gate_up_A, m.lora_gate_up_B), "down_proj": (m.lora_down_A, m.lora_down_B)}
        for depth, param in enumerate(reversed(EXPERT_PARAMETERS)):  # the last-wrapped is outermost
            a_ERI, b_EOR = (t.detach() for t in pairs[param])
            E, R, _ = a_ERI.shape
            nest = "base_layer." * depth
            tensors[f"{PREFIX}{hf}.{nest}lora_A.weight"] = a_ERI.reshape(E * R, -1)
            tensors[f"{PREFIX}{hf}.{nest}lora_B.weight"] = b_EOR.permute(1, 2, 0).reshape(b_EOR.shape[1], R * E)
    n_layers = model.config.n_layers
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
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
    tensors = {k: v.contiguous().cpu() for k, v in tensors.items()}

    def write_into(folder: Path) -> None:
        (folder / CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        save_file(tensors, folder / WEIGHTS, metadata={"format": "pt"})

    return write_atomically(directory, write_into)


# -- loading --------------------------------------------------------------------------------------

def _read_config(path: Path) -> dict:
    if not path.is_file():
        raise AdapterError(f"{path} is missing (not a PEFT adapter directory)")
    try:
        config = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AdapterError(f"{path} is corrupt: not valid JSON ({exc})") from exc
    if not isinstance(config, dict):
        raise AdapterError(f"{path}: expected a JSON object")
    if config.get("peft_type") != "LORA":
        raise AdapterError(f"{path}: peft_type {config.get('peft_type')!r} is not supported (only 'LORA')")
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


def load_adapter(model: nn.Module, directory: str | Path) -> list[str]:
    """Apply the LoRA adapter of a PEFT directory (ours or PEFT's, on the Hugging Face export of ``model``) to
    ``model``, in place: adapters with the config's r, lora_alpha, use_rslora and lora_dropout on the modules its
    tensors name, loaded with those tensors. Returns our names of the adapted modules.

    Raises :class:`AdapterError` naming the file and why: a missing or corrupt file, a peft_type other than LORA,
    an unsupported option, a tensor of a module our model lacks, or a shape that does not fit.
    """
    config, lora, found, hf_of, weights_path = _read_adapter(model, directory)
    requires_grad = {name: p.requires_grad for name, p in model.named_parameters()}
    apply_lora(model, lora)
    try:
        _load_tensors(model, found, hf_of, config, weights_path)
    except AdapterError:  # leave the model as it was, not half-adapted
        for name in found:
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, model.get_submodule(name).base_layer)
        for name, p in model.named_parameters():
            p.requires_grad_(requires_grad.get(name, p.requires_grad))
        raise
    return sorted(found)


def _read_adapter(model: nn.Module, directory: str | Path):
    """Read and check a PEFT adapter directory against ``model``: (its JSON config, our LoRAConfig, the tensors
    per our module name {module: {(nesting depth, "A"|"B"): tensor}}, our name -> the HF one, the weights path)."""
    folder = Path(directory)
    if not folder.is_dir():
        raise AdapterError(f"{folder} is not a directory")
    config_path, weights_path = folder / CONFIG, folder / WEIGHTS
    config = _read_config(config_path)
    tensors = _read_tensors(weights_path)

    # {our module: {(nesting depth, "A"|"B"): tensor}}
    found: dict[str, dict[tuple[int, str], torch.Tensor]] = {}
    hf_of: dict[str, str] = {}
    unknown, absent = [], []
    for key, tensor in tensors.items():
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
    if not found:
        raise AdapterError(f"{weights_path} holds no LoRA tensors")

    try:
        lora = LoRAConfig(r=config["r"], alpha=config.get("lora_alpha", 8), dropout=config.get("lora_dropout", 0.0),
                          rslora=bool(config.get("use_rslora", False)), target_modules=tuple(sorted(found)))
    except ValueError as exc:
        raise AdapterError(f"{config_path}: {exc}") from exc
    return config, lora, found, hf_of, weights_path


def _load_tensors(model: nn.Module, found: dict, hf_of: dict[str, str], config: dict, weights_path: Path) -> None:
    with torch.no_grad():
        for ours, parts in found.items():
            module = model.get_submodule(ours)
            where = f"{weights_path}: {hf_of[ours]}"
            if isinstance(module, LoRALinear):
                _copy(module.lora_A, parts.pop((0, "A"), None), where + ".lora_A.weight")
                _copy(module.lora_B, parts.pop((0, "B"), None), where + ".lora_B.weight")
            else:
                order = _expert_order(config, hf_of[ours])
                if len(order) * 2 != len(parts):
                    raise AdapterError(f"{where}: {len(parts)} LoRA tensors, but target_parameters names "
                                       f"{order or 'none'} of its expert parameters")
                for depth, param in enumerate(reversed(order)):
                    a, b = ((module.lora_gate_up_A, module.lora_gate_up_B) if param == "gate_up_proj"
                            else (module.lora_down_A, module.lora_down_B))
                    nest = "base_layer." * depth
                    _copy_experts(a, b, parts.pop((depth, "A"), None), parts.pop((depth, "B"), None),
                                  f"{where}.{nest}lora_A/B.weight ({param})")
                for param in set(EXPERT_PARAMETERS) - set(order):  # one PEFT left alone: our pair adds nothing
                    (module.lora_gate_up_B if param == "gate_up_proj" else module.lora_down_B).zero_()
            if parts:
                raise AdapterError(f"{where}: unexpected tensors {sorted(parts)}")


def _copy(dest: torch.Tensor, src: Optional[torch.Tensor], where: str) -> None:
    if src is None:
        raise AdapterError(f"{where} is missing")
    if tuple(src.shape) != tuple(dest.shape):
        raise AdapterError(f"{where} has shape {list(src.shape)}, expected {list(dest.shape)}")
    dest.copy_(src)


def _copy_experts(a_ERI: torch.Tensor, b_EOR: torch.Tensor, a: Optional[torch.Tensor], b: Optional[torch.Tensor],
                  where: str) -> None:
    E, R, I = a_ERI.shape
    O = b_EOR.shape[1]
    if a is None or b is None:
        raise AdapterError(f"{where} is missing")
    if tuple(a.shape) != (E * R, I) or tuple(b.shape) != (O, R * E):
        raise AdapterError(f"{where} have shapes {list(a.shape)} and {list(b.shape)}, expected {[E * R, I]} and "
                           f"{[O, R * E]}")
    a_ERI.copy_(a.reshape(E, R, I))
    b_EOR.copy_(b.reshape(O, R, E).permute(2, 0, 1))


def load_adapters(model: nn.Module, adapters: dict[str, str | Path]) -> list[str]:
    """Serve several PEFT adapter directories on ``model`` at once, each row of a batch choosing its own: every
    attention projection an adapter targets becomes a :class:`~deepseek.nn.multi_lora.MultiLoRALinear` holding
    them all (in the order of ``adapters``; select per row with :func:`~deepseek.nn.multi_lora.row_adapters`).
    Returns the adapter names in index order. The model is left as it was if an adapter is refused.

    Raises :class:`AdapterError` for what :func:`load_adapter` refuses, for an empty name or mapping, for a model
    that already has adapters, and for adapters of the head or the routed experts (served per row: not yet).
    """
    if not adapters:
        raise AdapterError("no adapters to load")
    if any(isinstance(m, (LoRALinear, LoRAExperts, MultiLoRALinear)) for m in model.modules()):
        raise AdapterError("the model already has LoRA adapters")
    names = list(adapters)
    read = {}
    for name, directory in adapters.items():
        if not isinstance(name, str) or not name:
            raise AdapterError(f"adapter names must be non-empty strings, got {name!r}")
        config, lora, found, hf_of, weights_path = _read_adapter(model, directory)
        for ours, parts in found.items():
            module = model.get_submodule(ours)
            where = f"{weights_path}: {hf_of[ours]}"
            if not isinstance(module, nn.Linear) or ours == "lm_head":
                raise AdapterError(f"{where}: only attention projections are served per row (adapter {name!r})")
            a, b = parts.pop((0, "A"), None), parts.pop((0, "B"), None)
            if parts:
                raise AdapterError(f"{where}: unexpected tensors {sorted(parts)}")
            r = lora.r
            _check_shape(a, (r, module.in_features), where + ".lora_A.weight")
            _check_shape(b, (module.out_features, r), where + ".lora_B.weight")
            found[ours] = (a, b)
        read[name] = (lora, found)
    rank = max(lora.r for lora, _ in read.values())
    targets = sorted({ours for _, found in read.values() for ours in found})
    for ours in targets:
        wrapper = MultiLoRALinear(model.get_submodule(ours), names, rank)
        for index, name in enumerate(names):
            lora, found = read[name]
            if ours in found:
                a, b = found[ours]
                wrapper.set_adapter(index, a, b, lora.scaling)
        parent, _, child = ours.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, wrapper)
    return names


def _check_shape(tensor: Optional[torch.Tensor], shape: tuple[int, ...], where: str) -> None:
    if tensor is None:
        raise AdapterError(f"{where} is missing")
    if tuple(tensor.shape) != shape:
        raise AdapterError(f"{where} has shape {list(tensor.shape)}, expected {list(shape)}")
