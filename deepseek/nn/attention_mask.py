"""Which keys the new tokens of a forward attend to: the model's pattern, and the layout a forward runs under.

Legend: B rows, T new tokens, S key slots (cache + new).

A forward without a cache takes its layout from :meth:`AttentionPattern.uncached`; with a cache, the cache
builds it (:meth:`~deepseek.nn.kv_cache.AttentionCache.begin_forward`), because only the cache knows where
each row's tokens sit. Either way the model gets the same :class:`AttentionLayout` and never asks which
cache it holds.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from deepseek.nn.sparse_attention import local_global_mask


@dataclass
class AttentionLayout:
    """Rotary positions of the new tokens and how they attend.

    ``mask`` ([B, 1, T, S] bool) is None when ``is_causal`` or ``blocked_sparse`` covers the pattern, or when
    every new token sees every key (one token per row, nothing padded).
    """

    positions_BT: torch.Tensor
    mask: Optional[torch.Tensor] = None
    is_causal: bool = False
    blocked_sparse: bool = False


@dataclass(frozen=True)
class AttentionPattern:
    """The model's attention pattern: causal, or causal local + global tokens (``sparse``)."""

    sparse: bool = False
    window: int = 0
    n_global: int = 0

    def mask(self, q_pos_BT: torch.Tensor, q_slot_T: torch.Tensor, k_pos_BS: torch.Tensor, k_slot_S: torch.Tensor,
             k_valid_BS: torch.Tensor) -> torch.Tensor:
        """[B, 1, T, S] bool: causal by slot, padding excluded, the sparse pattern by position.

        ``q_slot_T`` is [T] (every row writes the same slots) or [B, T] (rows at their own positions).
        """
        q_slot_BT = q_slot_T if q_slot_T.dim() == 2 else q_slot_T[None]
        mask = (k_slot_S[None, None, :] <= q_slot_BT[:, :, None]) & k_valid_BS[:, None, :]
        if self.sparse:
            mask &= local_global_mask(q_pos_BT, k_pos_BS, self.window, self.n_global)
        # Every query sees at least itself, so padding rows stay finite (their outputs are never used).
        mask |= k_slot_S[None, None, :] == q_slot_BT[:, :, None]
        return mask.unsqueeze(1)

    def uncached(self, B: int, T: int, valid_BT: Optional[torch.Tensor], device: torch.device,
                 document_ids_BT: Optional[torch.Tensor] = None,
                 positions_BT: Optional[torch.Tensor] = None) -> AttentionLayout:
        """The layout of a forward without a cache; ``valid_BT`` marks real tokens (None: all are).

        ``document_ids_BT`` (packed rows): a token attends only to earlier tokens with the same id (block-diagonal
        causal), and its rotary position counts from the start of its run of equal ids unless ``positions_BT``
        gives them. A packed example then sees exactly what it would see alone.
        """
        if document_ids_BT is not None or positions_BT is not None:
            if positions_BT is None:
                positions_BT = document_positions(document_ids_BT)
            slots = torch.arange(T, device=device)
            valid = torch.ones(B, T, dtype=torch.bool, device=device) if valid_BT is None else valid_BT
            mask = self.mask(positions_BT, slots, positions_BT, slots, valid)
            if document_ids_BT is not None:  # the diagonal survives: a token is in its own document
                mask &= (document_ids_BT[:, :, None] == document_ids_BT[:, None, :])[:, None]
            return AttentionLayout(positions_BT, mask=mask)
        if valid_BT is None:
            positions = torch.arange(T, device=device).expand(B, T)
            return AttentionLayout(positions, is_causal=not self.sparse, blocked_sparse=self.sparse)
        positions = (valid_BT.long().cumsum(1) - 1).clamp_min(0)
        slots = torch.arange(T, device=device)
        return AttentionLayout(positions, mask=self.mask(positions, slots, positions, slots, valid_BT))


def document_positions(document_ids_BT: torch.Tensor) -> torch.Tensor:
    """[B, T] long: each token's index within its run of equal document ids (0 at every new document)."""
    B, T = document_ids_BT.shape
    index_BT = torch.arange(T, device=document_ids_BT.device).expand(B, T)
    starts_BT = torch.ones_like(document_ids_BT, dtype=torch.bool)
    starts_BT[:, 1:] = document_ids_BT[:, 1:] != document_ids_BT[:, :-1]
    run_start_BT = torch.where(starts_BT, index_BT, torch.zeros_like(index_BT)).cummax(dim=1).values
    return index_BT - run_start_BT
