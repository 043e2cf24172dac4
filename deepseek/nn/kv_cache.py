"""A static key/value cache for batched incremental decoding.

Buffers are allocated once for ``max_len`` slots, so decoding never reallocates. All sequences in a
batch write to the same slot each step; prompts of different lengths are left-padded, and the
padding slots are marked invalid so attention never reads them. Each sequence keeps its own count
of real tokens, which gives its rotary positions.

``static=True`` keeps every shape fixed from step to step (the write position is a tensor, attention
always spans all ``max_len`` slots under a mask), so a compiled decoding step is traced once and
replayed, never recompiled (the approach of gpt-fast).

:class:`AttentionCache` is what the model asks of any cache (this one, or the continuous-batching
:class:`~deepseek.nn.slot_cache.SlotKVCache`): each cache lays out its own new tokens, so the model has one
code path whatever cache it is given.
"""

from __future__ import annotations

from typing import Optional, Protocol

import torch

from deepseek.nn.attention_mask import AttentionLayout, AttentionPattern


class AttentionCache(Protocol):
    """The key/value cache interface the model calls, once per forward in this order:

    ``length_after`` (checked against the model's ``max_seq_len`` before anything changes), ``begin_forward``
    (claims room for the new tokens and lays them out), ``write`` once per layer, ``advance`` after the last.
    ``k`` / ``v`` are the stored tensors (attention writes in their dtype).
    """

    k: torch.Tensor
    v: torch.Tensor

    @property
    def batch_size(self) -> int: ...

    def length_after(self, n_new: int) -> Optional[int]:
        """The longest row's length in slots after ``n_new`` more tokens, or None where it is not on the host."""

    def begin_forward(self, n_new: int, valid_BT: Optional[torch.Tensor], pattern: AttentionPattern
                      ) -> AttentionLayout:
        """Claim ``n_new`` slots per row; ``valid_BT`` [B, n_new] marks real tokens (None: all are)."""

    def write(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store ``layer``'s new keys/values; returns the keys/values attention reads [B, Hkv, S, Dh]."""

    def advance(self, n_new: int) -> None:
        """Called once per forward, after every layer has written."""


class KVCache:
    """Keys and values for every layer: ``k[layer]`` is [B, Hkv, max_len, Dh]."""

    def __init__(self, n_layers: int, batch_size: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", static: bool = False):
        shape = (n_layers, batch_size, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.max_len = max_len
        self.batch_size = batch_size
        self.pos = 0  # the next slot to write, shared by the whole batch
        self.slot_valid = torch.zeros(batch_size, max_len, dtype=torch.bool, device=device)
        self.slot_position = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)
        self.n_tokens = torch.zeros(batch_size, dtype=torch.long, device=device)  # real tokens so far
        self.has_padding = False
        self.static = static
        self.pos_tensor = torch.zeros((), dtype=torch.long, device=device)  # static mode's write position
        self.all_slots = torch.arange(max_len, device=device)
        self._slots: torch.Tensor | None = None  # the slots being written by the current forward (static)

    @classmethod
    def for_model(cls, model, batch_size: int, max_len: int, dtype: torch.dtype | None = None,
                  static: bool = False) -> "KVCache":
        """A cache shaped for ``model`` (a ``MoETransformer``), in the dtype of its weights unless given."""
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, batch_size, max_len, cfg.n_kv_heads, cfg.head_dim,
                   dtype=dtype or param.dtype, device=param.device, static=static)

    # -- the model's side (AttentionCache) -------------------------------------------------------

    def length_after(self, n_new: int) -> Optional[int]:
        # Static mode keeps its write position on the device: the engine sized the cache to fit.
        return None if self.static else self.pos + n_new

    def begin_forward(self, n_new: int, valid_BT: Optional[torch.Tensor], pattern: AttentionPattern
                      ) -> AttentionLayout:
        """Claim the next ``n_new`` slots of every row and lay the new tokens out (see :class:`AttentionCache`)."""
        if self.static:  # fixed shapes, no host values: what a compiled decoding step needs
            positions, slots = self.reserve_static(valid_BT, n_new)
            return AttentionLayout(positions, pattern.mask(positions, slots, self.slot_position, self.all_slots,
                                                           self.slot_valid))
        start = self.pos
        positions = self.reserve(valid_BT, n_new)
        if not self.has_padding and start == 0 and n_new > 1:
            return AttentionLayout(positions, is_causal=not pattern.sparse, blocked_sparse=pattern.sparse)
        if not self.has_padding and n_new == 1 and not pattern.sparse:
            return AttentionLayout(positions)  # one new token sees every cached slot
        end = start + n_new
        device = positions.device
        return AttentionLayout(positions, pattern.mask(positions, torch.arange(start, end, device=device),
                                                       self.slot_position[:, :end], torch.arange(end, device=device),
                                                       self.slot_valid[:, :end]))

    def reserve_static(self, valid_BT: torch.Tensor | None, n_new: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Static-mode :meth:`reserve`: returns positions [B, n_new] and slots [n_new], with no host values.

        The caller (the engine) is responsible for not running past ``max_len``.
        """
        device = self.slot_valid.device
        slots = self.pos_tensor + torch.arange(n_new, device=device)
        if valid_BT is None:
            valid_BT = torch.ones(self.batch_size, n_new, dtype=torch.bool, device=device)
        positions_BT = self._positions(valid_BT)
        self.slot_valid.index_copy_(1, slots, valid_BT)
        self.slot_position.index_copy_(1, slots, positions_BT)
        self.n_tokens += valid_BT.sum(1)
        self._slots = slots
        return positions_BT, slots

    def reserve(self, valid_BT: torch.Tensor | None, n_new: int) -> torch.Tensor:
        """Claim the next ``n_new`` slots; returns the rotary positions [B, n_new] of the new tokens.

        ``valid_BT`` marks real tokens (False for left padding); ``None`` means all are real.
        """
        start, end = self.pos, self.pos + n_new
        if end > self.max_len:
            raise ValueError(f"KV cache is full: {end} tokens needed, {self.max_len} slots allocated")
        if valid_BT is None:
            if not self.has_padding:
                # Every row has seen exactly `start` tokens: positions are the slots (the decoding fast path).
                self.slot_valid[:, start:end] = True
                positions_BT = torch.arange(start, end, device=self.slot_valid.device).expand(self.batch_size, -1)
                self.slot_position[:, start:end] = positions_BT
                self.n_tokens += n_new
                return positions_BT
            valid_BT = torch.ones(self.batch_size, n_new, dtype=torch.bool, device=self.slot_valid.device)
        else:
            self.has_padding = self.has_padding or not bool(valid_BT.all())
        positions_BT = self._positions(valid_BT)
        self.slot_valid[:, start:end] = valid_BT
        self.slot_position[:, start:end] = positions_BT
        self.n_tokens += valid_BT.sum(1)
        return positions_BT

    def _positions(self, valid_BT: torch.Tensor) -> torch.Tensor:
        """Rotary positions of new tokens: each row continues its own count of real tokens."""
        return (self.n_tokens[:, None] + valid_BT.long().cumsum(1) - 1).clamp_min(0)

    def write(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer`` and return all keys/values so far [B, Hkv, S, Dh].

        In static mode S is always ``max_len`` (unwritten slots are masked out by the caller).
        """
        if self.static:
            self.k[layer].index_copy_(2, self._slots, k_BHTD)
            self.v[layer].index_copy_(2, self._slots, v_BHTD)
            return self.k[layer], self.v[layer]
        start, end = self.pos, self.pos + k_BHTD.shape[2]
        self.k[layer, :, :, start:end] = k_BHTD
        self.v[layer, :, :, start:end] = v_BHTD
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]

    def advance(self, n_new: int) -> None:
        """Called once per model forward, after every layer has written."""
        if self.static:
            self.pos_tensor += n_new  # no Python int changes inside a compiled step: it would recompile
            return
        self.pos += n_new

    def select(self, keep: torch.Tensor) -> None:
        """Keep only the batch rows in ``keep`` (index tensor), e.g. after some sequences finished."""
        self.k = self.k[:, keep]
        self.v = self.v[:, keep]
        self.slot_valid = self.slot_valid[keep]
        self.slot_position = self.slot_position[keep]
        self.n_tokens = self.n_tokens[keep]
        self.batch_size = int(keep.numel())
