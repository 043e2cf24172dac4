"""A key/value cache of per-sequence slots, for continuous batching.

Legend: L layers, N slots, Hkv key/value heads, S slots' capacity in tokens, Dh head dim, B rows of
the current forward, T new tokens per row.

Unlike :class:`~deepseek.nn.kv_cache.KVCache` (one batch that starts and ends together), every slot
holds one sequence with its own length, and sequences come and go between steps. Memory is
preallocated once ([L, N, Hkv, S, Dh] for keys and for values), so nothing is reallocated while
serving and there is no fragmentation; a freed slot is reused by the next sequence.

A forward works on a contiguous range of slots (:meth:`bind`): the scheduler keeps its running
sequences in slots ``0..n-1`` (when one finishes, the last one moves into its place), so a decoding
step reads the cache through views, never gathering it. Each row writes at its own position, and
attention masks every row to its own length. The model calls it through the same
:class:`~deepseek.nn.kv_cache.AttentionCache` interface as a :class:`~deepseek.nn.kv_cache.KVCache`.
"""

from __future__ import annotations

from typing import Optional

import torch

from deepseek.nn.attention_mask import AttentionLayout, AttentionPattern


class SlotKVCache:
    """Keys and values for ``n_slots`` sequences of up to ``max_len`` tokens each."""

    def __init__(self, n_layers: int, n_slots: int, max_len: int, n_kv_heads: int, head_dim: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu"):
        shape = (n_layers, n_slots, n_kv_heads, max_len, head_dim)
        self.k = torch.zeros(shape, dtype=dtype, device=device)
        self.v = torch.zeros(shape, dtype=dtype, device=device)
        self.n_slots, self.max_len = n_slots, max_len
        self.lengths = [0] * n_slots  # tokens stored in each slot (host side: the scheduler reads them)
        self._first, self._rows = 0, 0
        self._starts: list[int] = []
        self._positions: torch.Tensor | None = None

    @classmethod
    def for_model(cls, model, n_slots: int, max_len: int | None = None, dtype: torch.dtype | None = None
                  ) -> "SlotKVCache":
        cfg = model.config
        param = next(model.parameters())
        return cls(cfg.n_layers, n_slots, min(max_len or cfg.max_seq_len, cfg.max_seq_len), cfg.n_kv_heads,
                   cfg.head_dim, dtype=dtype or param.dtype, device=param.device)

    # -- the scheduler's side ---------------------------------------------------------------------

    def bind(self, first_slot: int, n_rows: int) -> "SlotKVCache":
        """The next forward's batch rows are slots ``first_slot .. first_slot + n_rows - 1``."""
        if first_slot < 0 or n_rows < 1 or first_slot + n_rows > self.n_slots:
            raise ValueError(f"slots {first_slot}..{first_slot + n_rows - 1} outside 0..{self.n_slots - 1}")
        self._first, self._rows = first_slot, n_rows
        return self

    def reset(self, slot: int) -> None:
        """Forget a slot's sequence (its memory is simply overwritten by the next one)."""
        self.lengths[slot] = 0

    def move(self, src: int, dst: int) -> None:
        """Move the sequence in slot ``src`` to slot ``dst`` (only its stored tokens are copied)."""
        n = self.lengths[src]
        if src != dst:
            self.k[:, dst, :, :n] = self.k[:, src, :, :n]
            self.v[:, dst, :, :n] = self.v[:, src, :, :n]
            self.lengths[dst], self.lengths[src] = n, 0

    def used_tokens(self) -> int:
        return sum(self.lengths)

    def utilization(self) -> float:
        """Fraction of the preallocated token capacity holding live keys and values."""
        return self.used_tokens() / (self.n_slots * self.max_len)

    @property
    def bytes(self) -> int:
        return 2 * self.k.numel() * self.k.element_size()

    # -- the model's side -------------------------------------------------------------------------

    @property
    def batch_size(self) -> int:
        return self._rows

    def length_after(self, n_new: int) -> Optional[int]:
        return max(self.lengths[self._first:self._first + self._rows]) + n_new

    def begin_forward(self, n_new: int, valid_BT: Optional[torch.Tensor], pattern: AttentionPattern
                      ) -> AttentionLayout:
        """Claim ``n_new`` positions in every bound row, each continuing its own sequence (no padding)."""
        if valid_BT is not None:
            raise ValueError("a SlotKVCache holds unpadded sequences: attention_mask is not supported with it")
        positions, starts = self.reserve(n_new)
        if len(starts) == 1 and starts[0] == 0 and not pattern.sparse:
            return AttentionLayout(positions, is_causal=True)  # a first prefill chunk
        if n_new == 1 and min(starts) == max(starts) and not pattern.sparse:
            return AttentionLayout(positions)  # every row sees every stored token
        end = max(starts) + n_new
        k_slot = torch.arange(end, device=positions.device)
        valid = k_slot[None, :] < (positions[:, -1:] + 1)  # a row's own tokens only
        return AttentionLayout(positions, pattern.mask(positions, positions, k_slot.expand(len(starts), -1), k_slot,
                                                       valid))

    def reserve(self, n_new: int) -> tuple[torch.Tensor, list[int]]:
        """Claim ``n_new`` positions in every bound row: rotary positions [B, T] and each row's start."""
        starts = self.lengths[self._first:self._first + self._rows]
        if max(starts) + n_new > self.max_len:
            raise ValueError(f"sequence longer than the cache's {self.max_len} tokens per slot")
        device = self.k.device
        self._starts = starts
        self._positions = torch.tensor(starts, device=device)[:, None] + torch.arange(n_new, device=device)
        return self._positions, starts

    def write(self, layer: int, k_BHTD: torch.Tensor, v_BHTD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store the new keys/values of ``layer``; returns the bound rows' keys/values [B, Hkv, S, Dh].

        S is the longest row's length after this write; shorter rows are masked by the caller.
        """
        rows = slice(self._first, self._first + self._rows)
        k_all, v_all = self.k[layer, rows], self.v[layer, rows]
        T = k_BHTD.shape[2]
        starts = self._starts
        if min(starts) == max(starts):
            k_all[:, :, starts[0]:starts[0] + T] = k_BHTD
            v_all[:, :, starts[0]:starts[0] + T] = v_BHTD
        elif T == 1:  # decoding: one token per row, each at its own position
            row_idx = torch.arange(self._rows, device=k_BHTD.device)
            pos = self._positions[:, 0]
            k_all[row_idx, :, pos] = k_BHTD[:, :, 0]
            v_all[row_idx, :, pos] = v_BHTD[:, :, 0]
        else:
            for row, start in enumerate(starts):
                k_all[row, :, start:start + T] = k_BHTD[row]
                v_all[row, :, start:start + T] = v_BHTD[row]
        end = max(starts) + T
        return k_all[:, :, :end], v_all[:, :, :end]

    def advance(self, n_new: int) -> None:
        """Called once per model forward, after every layer has written."""
        for slot in range(self._first, self._first + self._rows):
            self.lengths[slot] += n_new
