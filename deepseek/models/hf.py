"""Hugging Face interop: weights and configs move both ways between our model directory and ``transformers``.

Export (``export_hf``) writes a folder that ``transformers.MixtralForCausalLM.from_pretrained`` loads,
for the configs Mixtral can express. Import (``import_hf``) reads a local Hugging Face folder of a
Mixtral, Qwen2-MoE or Qwen3-MoE causal LM into a :class:`MoETransformer`.

Legend: L layer, E experts, D model width, F expert width.

Key layouts. Ours: ``blocks.{L}.ffn.experts.gate_up`` [E, 2F, D] (gate rows first) and
``blocks.{L}.ffn.experts.down`` [E, D, F]. Hugging Face has two on-disk layouts of the experts:

- per expert, ``nn.Linear`` style (what ``save_pretrained`` writes, in transformers 4 and 5 alike):
  Mixtral ``model.layers.{L}.block_sparse_moe.experts.{e}.w1|w3|w2.weight`` ([F, D], [F, D], [D, F]),
  Qwen ``model.layers.{L}.mlp.experts.{e}.gate_proj|up_proj|down_proj.weight``;
- fused (the in-memory modules of transformers 5): ``model.layers.{L}.mlp.experts.gate_up_proj``
  [E, 2F, D] and ``...experts.down_proj`` [E, D, F], exactly ours.

Both are read; the per-expert one is written, since every transformers version loads it.
Attention needs no permutation: our RoPE uses the same "rotate half" layout.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any, Optional

import torch
from tokenizers import Tokenizer

from deepseek.config import ConfigError
from deepseek.data.tokenizer import BOS, EOS, PAD, byte_tokenizer
from deepseek.models.config import ModelConfig
from deepseek.models.directory import (FORMAT, ModelDirectoryError, load, load_tokenizer, load_weights, read_json,
                                       save, save_weights, summarize_names, write_atomically)
from deepseek.models.directory import model_from_state as directory_model_from_state
from deepseek.models.transformer import MoETransformer
from deepseek.nn.quantized import is_quantized

SUPPORTED_MODEL_TYPES = ("mixtral", "qwen2_moe", "qwen3_moe")


class HFConversionError(ValueError):
    """A model or a Hugging Face checkpoint that the other side cannot express; the message lists every reason."""


# -- export: ours -> Hugging Face Mixtral ---------------------------------------------------------

def mixtral_incompatibilities(config: ModelConfig) -> list[str]:
    """Every reason ``config`` cannot be written as a Mixtral checkpoint (empty when it can)."""
    reasons = []
    if config.router != "softmax":
        reasons.append(f"router is {config.router!r}; Mixtral has a softmax router")
    if config.n_shared_experts > 0:
        reasons.append(f"n_shared_experts={config.n_shared_experts}; Mixtral has no shared experts")
    if config.first_k_dense > 0:
        reasons.append(f"first_k_dense={config.first_k_dense}; every Mixtral layer is an MoE layer")
    if config.attention_bias:
        reasons.append("attention_bias=True; Mixtral's q/k/v projections have no bias")
    if config.qk_norm:
        reasons.append("qk_norm=True; Mixtral does not normalise queries and keys")
    if config.attention == "sparse" and config.n_global_tokens > 0:
        reasons.append(f"sparse attention with n_global_tokens={config.n_global_tokens}; Mixtral only has a "
                       "plain sliding window (n_global_tokens=0)")
    if not config.norm_topk_prob:
        reasons.append("norm_topk_prob=False; Mixtral always renormalises the top-k weights")
    if config.routed_scaling_factor != 1.0:
        reasons.append(f"routed_scaling_factor={config.routed_scaling_factor}; Mixtral does not scale routed outputs")
    return reasons


def _special_token_ids(tokenizer: Optional[Tokenizer]) -> dict[str, Optional[int]]:
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None}
    if tokenizer is not None:
        for key, token in (("bos_token_id", BOS), ("eos_token_id", EOS), ("pad_token_id", PAD)):
            ids[key] = tokenizer.token_to_id(token)
    return ids


def _unwrap(model: torch.nn.Module) -> MoETransformer:
    # torch.compile / DDP wrappers: convert the module underneath.
    while hasattr(model, "_orig_mod") or hasattr(model, "module"):
        model = getattr(model, "_orig_mod", None) or model.module
    if not isinstance(getattr(model, "config", None), ModelConfig):
        raise TypeError("expected a deepseek MoETransformer (a model with a ModelConfig `.config`)")
    return model


def to_hf_state_dict(model: MoETransformer, tokenizer: Optional[Tokenizer] = None
                     ) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """``(config.json dict, state dict)`` of ``model`` as a ``MixtralForCausalLM``, in save_pretrained's layout.

    Raises :class:`HFConversionError` listing every reason when Mixtral cannot express the config.
    """
    model = _unwrap(model)
    cfg = model.config
    reasons = mixtral_incompatibilities(cfg)
    if reasons:
        raise HFConversionError("cannot export to Mixtral: " + "; ".join(reasons))
    ours = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    dtype = ours["embed.weight"].dtype
    F = cfg.moe_ffn_dim

    hf: dict[str, torch.Tensor] = {"model.embed_tokens.weight": ours["embed.weight"],
                                   "model.norm.weight": ours["norm.weight"]}
    if not cfg.tie_embeddings:
        hf["lm_head.weight"] = ours["lm_head.weight"]
    for i in range(cfg.n_layers):
        src, dst = f"blocks.{i}.", f"model.layers.{i}."
        hf[dst + "input_layernorm.weight"] = ours[src + "attn_norm.weight"]
        hf[dst + "post_attention_layernorm.weight"] = ours[src + "ffn_norm.weight"]
        for p in "qkvo":
            hf[dst + f"self_attn.{p}_proj.weight"] = ours[src + f"attn.{p}.weight"]
        hf[dst + "block_sparse_moe.gate.weight"] = ours[src + "ffn.router.weight"]
        gate_up_EF2D, down_EDF = ours[src + "ffn.experts.gate_up"], ours[src + "ffn.experts.down"]
        for e in range(cfg.n_routed_experts):
            expert = dst + f"block_sparse_moe.experts.{e}."
            hf[expert + "w1.weight"] = gate_up_EF2D[e, :F]  # gate, [F, D]
            hf[expert + "w3.weight"] = gate_up_EF2D[e, F:]  # up, [F, D]
            hf[expert + "w2.weight"] = down_EDF[e]  # down, [D, F]
    # Our tied head shares storage with the embedding, and slices share storage with their expert
    # tensor: safetensors stores only standalone tensors, so give each its own memory.
    hf = {k: v.contiguous().clone() for k, v in hf.items()}

    config = {
        "architectures": ["MixtralForCausalLM"],
        "model_type": "mixtral",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.moe_ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "num_local_experts": cfg.n_routed_experts,
        "num_experts_per_tok": cfg.top_k,
        "rms_norm_eps": cfg.norm_eps,
        # transformers 5 reads `rope_parameters`; 4.x reads the top-level `rope_theta`.
        "rope_parameters": {"rope_type": "default", "rope_theta": cfg.rope_theta},
        "rope_theta": cfg.rope_theta,
        "max_position_embeddings": cfg.max_seq_len,
        "sliding_window": cfg.window if cfg.attention == "sparse" else None,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "attention_dropout": 0.0,
        "router_aux_loss_coef": cfg.aux_loss_coef,
        "output_router_logits": cfg.aux_loss_coef > 0,
        "router_jitter_noise": 0.0,
        "use_cache": True,
        "dtype": str(dtype).removeprefix("torch."),
        **_special_token_ids(tokenizer),
    }
    return config, hf


def _tokenizer_config(tokenizer: Tokenizer, max_len: int) -> dict[str, Any]:
    """The ``tokenizer_config.json`` that lets ``AutoTokenizer`` wrap our ``tokenizer.json``."""
    config: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_len,
                              "clean_up_tokenization_spaces": False}
    for key, token in (("bos_token", BOS), ("eos_token", EOS), ("pad_token", PAD)):
        if tokenizer.token_to_id(token) is not None:
            config[key] = token
    return config


def export_hf(model: MoETransformer, tokenizer: Tokenizer, out_dir: str | Path, *,
              max_shard_bytes: int = 4 << 30) -> Path:
    """Write ``model`` and ``tokenizer`` as a Hugging Face Mixtral folder at ``out_dir``, atomically.

    The folder holds ``config.json``, ``model.safetensors`` (or shards plus an index),
    ``tokenizer.json`` and ``tokenizer_config.json``.
    """
    model = _unwrap(model)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but the model only "
                         f"{model.config.vocab_size}")
    config, state = to_hf_state_dict(model, tokenizer)

    def write_into(folder: Path) -> None:
        (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        save_weights(state, folder, max_shard_bytes)
        tokenizer.save(str(folder / "tokenizer.json"))
        tok_config = _tokenizer_config(tokenizer, model.config.max_seq_len)
        (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2) + "\n")

    return write_atomically(out_dir, write_into)


# -- import: Hugging Face -> ours -----------------------------------------------------------------

def _rope_theta(hf: dict, default: float, problems: list[str]) -> float:
    rope = hf.get("rope_parameters") or {}
    legacy = hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type") or legacy.get("rope_type") or legacy.get("type") or "default"
    if rope_type != "default":
        problems.append(f"rope type {rope_type!r} (only plain RoPE, 'default', is supported)")
    return float(rope.get("rope_theta", hf.get("rope_theta", default)))


def _dense_prefix(hf: dict, n_layers: int, problems: list[str]) -> int:
    """Qwen's count of leading dense layers (``first_k_dense``), from ``mlp_only_layers``/``decoder_sparse_step``."""
    mlp_only = set(hf.get("mlp_only_layers") or [])
    step = hf.get("decoder_sparse_step", 1) or 1
    dense = [i for i in range(n_layers) if i in mlp_only or (i + 1) % step != 0]
    if dense != list(range(len(dense))):
        problems.append(f"dense (non-MoE) layers {dense} (from mlp_only_layers / decoder_sparse_step={step}) "
                        "are not a prefix of the stack; only leading dense layers are supported")
    return len(dense)


def config_from_hf(hf: dict, source: str = "config.json") -> ModelConfig:
    """Translate a Hugging Face ``config.json`` dict (mixtral, qwen2_moe, qwen3_moe) into a :class:`ModelConfig`."""
    if not isinstance(hf, dict):
        raise HFConversionError(f"{source}: expected a JSON object")
    model_type = hf.get("model_type")
    if model_type is None and hf.get("format") == FORMAT:
        raise HFConversionError(f"{source} belongs to a deepseek model directory, not a Hugging Face folder "
                                "(export it with --to-hf)")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise HFConversionError(f"{source}: model_type {model_type!r} is not supported; "
                                f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
    mixtral = model_type == "mixtral"
    experts_key = "intermediate_size" if mixtral else "moe_intermediate_size"
    required = ["vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "num_experts_per_tok",
                "max_position_embeddings", experts_key]
    missing = [k for k in required if hf.get(k) is None]
    n_experts = hf.get("num_local_experts", hf.get("num_experts"))
    if n_experts is None:
        missing.append("num_local_experts (or num_experts)")
    if missing:
        raise HFConversionError(f"{source}: missing {', '.join(missing)}")

    problems: list[str] = []
    if hf.get("hidden_act", "silu") != "silu":
        problems.append(f"hidden_act {hf['hidden_act']!r} (only 'silu' SwiGLU experts are supported)")
    rope_theta = _rope_theta(hf, 1e6 if mixtral else 1e4, problems)
    n_layers = hf["num_hidden_layers"]
    fields: dict[str, Any] = dict(
        vocab_size=hf["vocab_size"], d_model=hf["hidden_size"], n_layers=n_layers,
        n_heads=hf["num_attention_heads"], n_kv_heads=hf.get("num_key_value_heads") or hf["num_attention_heads"],
        head_dim=hf.get("head_dim"), max_seq_len=hf["max_position_embeddings"], rope_theta=rope_theta,
        norm_eps=hf.get("rms_norm_eps", 1e-5 if mixtral else 1e-6), moe_ffn_dim=hf[experts_key],
        n_routed_experts=n_experts, top_k=hf["num_experts_per_tok"], router="softmax",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)), init_std=hf.get("initializer_range", 0.02),
        aux_loss_coef=hf.get("router_aux_loss_coef", 0.0) if hf.get("output_router_logits") else 0.0,
    )
    if mixtral:
        fields["norm_topk_prob"] = True
        window = hf.get("sliding_window")
        if window is not None and window < hf["max_position_embeddings"]:
            # Mixtral's window (a query sees the `window` latest keys) is our sparse attention without globals.
            fields.update(attention="sparse", window=window, n_global_tokens=0)
    else:
        fields["norm_topk_prob"] = bool(hf.get("norm_topk_prob", False))
        fields["ffn_dim"] = hf.get("intermediate_size") or fields["moe_ffn_dim"]
        fields["first_k_dense"] = _dense_prefix(hf, n_layers, problems)
        if hf.get("use_sliding_window"):
            problems.append("use_sliding_window=True (Qwen's per-layer sliding window is not supported)")
        if model_type == "qwen2_moe":
            fields["attention_bias"] = bool(hf.get("qkv_bias", hf.get("attention_bias", True)))
            shared = hf.get("shared_expert_intermediate_size", 0) or 0
            if shared > 0:
                fields.update(n_shared_experts=1, shared_ffn_dim=shared, shared_expert_gate=True)
        else:
            fields.update(attention_bias=bool(hf.get("attention_bias", False)), qk_norm=True)
    if problems:
        raise HFConversionError(f"{source}: cannot import this {model_type} model: " + "; ".join(problems))
    try:
        return ModelConfig(**fields)
    except ConfigError as exc:
        raise HFConversionError(f"{source}: {exc}") from exc


# Hugging Face name (canonical: Qwen-style `mlp.`, `*_proj`) -> ours, for every one-to-one tensor.
_RENAMES = [(re.compile(pattern), replacement) for pattern, replacement in [
    (r"model\.embed_tokens\.weight", "embed.weight"),
    (r"model\.norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", r"blocks.\1.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", r"blocks.\1.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.([qkvo])_proj\.(weight|bias)", r"blocks.\1.attn.\2.\3"),
    (r"model\.layers\.(\d+)\.self_attn\.([qk]_norm)\.weight", r"blocks.\1.attn.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate\.weight", r"blocks.\1.ffn.router.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert\.(gate|up|down)_proj\.weight", r"blocks.\1.ffn.shared.\2.weight"),
    (r"model\.layers\.(\d+)\.mlp\.shared_expert_gate\.weight", r"blocks.\1.ffn.shared_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"blocks.\1.ffn.\2.weight"),  # dense layers
]]
_EXPERT = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight")
_FUSED_EXPERTS = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)")
_MIXTRAL_EXPERT_NAMES = {"w1": "gate_proj", "w3": "up_proj", "w2": "down_proj"}


def _canonical_name(name: str) -> str:
    """Mixtral's legacy names in the Qwen spelling that transformers 5 uses in memory."""
    name = name.replace(".block_sparse_moe.", ".mlp.")
    return re.sub(r"(\.experts\.\d+\.)(w[123])\.", lambda m: m[1] + _MIXTRAL_EXPERT_NAMES[m[2]] + ".", name)


def from_hf_state_dict(hf_state: dict[str, torch.Tensor], config: ModelConfig,
                       source: str = "checkpoint") -> dict[str, torch.Tensor]:
    """Our state dict from a Hugging Face one (either expert layout); errors name what is missing or extra."""
    ours: dict[str, torch.Tensor] = {}
    per_expert: dict[int, dict[tuple[int, str], torch.Tensor]] = {}
    unknown = []
    for name, tensor in hf_state.items():
        name = _canonical_name(name)
        if name.endswith("rotary_emb.inv_freq"):  # old checkpoints store the derived RoPE table
            continue
        if m := _EXPERT.fullmatch(name):
            per_expert.setdefault(int(m[1]), {})[(int(m[2]), m[3])] = tensor
        elif m := _FUSED_EXPERTS.fullmatch(name):
            # gate_up_proj [E, 2F, D] and down_proj [E, D, F] are our layout already
            ours[f"blocks.{m[1]}.ffn.experts.{'gate_up' if m[2] == 'gate_up_proj' else 'down'}"] = tensor
        else:
            for pattern, replacement in _RENAMES:
                if pattern.fullmatch(name):
                    ours[pattern.sub(replacement, name)] = tensor
                    break
            else:
                unknown.append(name)
    if unknown:
        raise HFConversionError(f"{source}: unrecognised tensors: {summarize_names(unknown)}")

    E = config.n_routed_experts
    for layer, parts in sorted(per_expert.items()):
        absent = [f"{e}.{p}_proj" for e in range(E) for p in ("gate", "up", "down") if (e, p) not in parts]
        extra = [f"{e}.{p}_proj" for e, p in parts if e >= E]
        if absent or extra:
            raise HFConversionError(f"{source}: layer {layer} experts do not match num_experts={E}"
                                    + (f"; missing experts.{summarize_names(absent)}" if absent else "")
                                    + (f"; extra experts.{summarize_names(extra)}" if extra else ""))
        try:
            gate_EFD = torch.stack([parts[(e, "gate")] for e in range(E)])
            up_EFD = torch.stack([parts[(e, "up")] for e in range(E)])
            down_EDF = torch.stack([parts[(e, "down")] for e in range(E)])
            ours[f"blocks.{layer}.ffn.experts.gate_up"] = torch.cat([gate_EFD, up_EFD], dim=1)
        except RuntimeError as exc:  # experts of different shapes
            raise HFConversionError(f"{source}: layer {layer} experts have inconsistent shapes ({exc})") from exc
        ours[f"blocks.{layer}.ffn.experts.down"] = down_EDF
    for name in [k for k in ours if k.endswith(".ffn.router.weight")]:
        # Softmax routers have no balancing bias; ours keeps the buffer (zeros) for a uniform layout.
        ours[name.replace(".weight", ".expert_bias")] = torch.zeros(config.n_routed_experts,
                                                                   dtype=ours[name].dtype)
    if config.tie_embeddings:
        ours.pop("lm_head.weight", None)  # some tied checkpoints still store a copy
    return {k: v.contiguous() for k, v in ours.items()}


def model_from_state(config: ModelConfig, state: dict[str, torch.Tensor], source: str = "checkpoint") -> MoETransformer:
    """A :class:`MoETransformer` holding exactly ``state``; mismatches raise :class:`HFConversionError`."""
    return directory_model_from_state(config, state, source, error=HFConversionError)


def _hf_tokenizer(folder: Path, vocab_size: int) -> Tokenizer:
    if (folder / "tokenizer.json").is_file():
        tokenizer = load_tokenizer(folder)
        if tokenizer.get_vocab_size() > vocab_size:
            raise HFConversionError(f"{folder / 'tokenizer.json'} has {tokenizer.get_vocab_size()} tokens but the "
                                    f"model's vocab_size is {vocab_size}")
        return tokenizer
    fallback = byte_tokenizer()
    if fallback.get_vocab_size() > vocab_size:
        raise ModelDirectoryError(f"{folder / 'tokenizer.json'} is missing, and the byte tokenizer "
                                  f"({fallback.get_vocab_size()} tokens) does not fit vocab_size={vocab_size}")
    warnings.warn(f"{folder} has no tokenizer.json; using the byte tokenizer (ids will not match the original)",
                  stacklevel=3)
    return fallback


def import_hf(hf_dir: str | Path, *, dtype: Optional[torch.dtype] = None) -> tuple[MoETransformer, Tokenizer]:
    """Read a local Hugging Face Mixtral / Qwen2-MoE / Qwen3-MoE folder: returns ``(model, tokenizer)``.

    The folder needs ``config.json`` and ``model.safetensors`` (or shards plus
    ``model.safetensors.index.json``); ``tokenizer.json`` is used when present. Weights keep the
    checkpoint's dtype unless ``dtype`` is given. Only safetensors are read (never pickle).
    """
    folder = Path(hf_dir)
    if not folder.is_dir():
        raise ModelDirectoryError(f"{folder} is not a directory")
    config = config_from_hf(read_json(folder / "config.json"), str(folder / "config.json"))
    state = from_hf_state_dict(load_weights(folder), config, str(folder))
    if dtype is None:
        dtype = state["embed.weight"].dtype
    state = {k: v.to(dtype) for k, v in state.items()}
    model = model_from_state(config, state, str(folder))
    return model, _hf_tokenizer(folder, config.vocab_size)


# -- model directory <-> Hugging Face folder ------------------------------------------------------

def convert_to_hf(model_dir: str | Path, out_dir: str | Path) -> Path:
    """``ds convert --to-hf``: a model directory -> a Hugging Face Mixtral folder."""
    model, tokenizer = load(model_dir)
    if is_quantized(model):
        raise ValueError(f"{model_dir} is quantized (compression.json); convert the floating-point model it came from")
    return export_hf(model, tokenizer, out_dir)


def convert_from_hf(hf_dir: str | Path, out_model_dir: str | Path) -> Path:
    """``ds convert --from-hf``: a Hugging Face folder -> a model directory."""
    model, tokenizer = import_hf(hf_dir)
    return save(model, tokenizer, out_model_dir)
