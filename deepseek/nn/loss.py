"""Cross-entropy of a linear head without materialising the [N, V] logits.

Legend: N tokens, D model width, V vocabulary, C tokens per chunk.

The language-model head is a third of the FLOPs of a small MoE (V = 8192, D = 256) and its logits are
the largest activation: [N, V] in fp32 is 64 MiB at N = 2048. The plain path writes them, reads them
for log_softmax, writes the log-probabilities, and in backward writes a gradient of the same size,
each a fresh allocation that the OS must page in. Here the tokens go through the head in chunks of C
rows whose logits stay in cache; the gradient of each chunk's logits (``softmax - onehot``) is formed
right away and turned into the gradients of ``x`` and of the head weight, so backward is a scale.
Same FLOPs (one forward and two backward matmuls), a fraction of the memory traffic.
"""

from __future__ import annotations

from typing import Optional

import torch

_CHUNK_BYTES = 8 << 20  # fp32 logits per chunk: small enough to stay in L3, big enough for efficient matmuls


def _autocast_dtype(x: torch.Tensor) -> Optional[torch.dtype]:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND, weight_VD, targets_N, ignore_index: int, chunk: int, dtype: torch.dtype, need_x: bool,
                need_w: bool):
        N, V = x_ND.shape[0], weight_VD.shape[0]
        w = weight_VD.to(dtype)
        xc = x_ND.to(dtype)
        valid_N = targets_N != ignore_index
        n_valid = valid_N.sum()
        safe_N = torch.where(valid_N, targets_N, 0)
        loss = torch.zeros((), dtype=torch.float32, device=x_ND.device)
        # Only the gradients autograd will ask for: a frozen head (LoRA) skips grad_w, a third of the head's FLOPs.
        need_grad = need_x or need_w
        grad_x = torch.empty(x_ND.shape, dtype=dtype, device=x_ND.device) if need_x else None
        grad_w = torch.zeros(weight_VD.shape, dtype=torch.float32, device=x_ND.device) if need_w else None
        scale = 1.0 / n_valid.clamp_min(1).float()
        # One logits buffer for every chunk, and the softmax formed in place in it: a fresh [C, V] tensor per
        # chunk (matmul output, logsumexp's shifted copy) costs page faults comparable to the matmul itself.
        buffer = torch.empty(min(chunk, N), V, dtype=dtype, device=x_ND.device)
        for start in range(0, N, chunk):
            rows = slice(start, min(start + chunk, N))
            logits_CV = torch.mm(xc[rows], w.t(), out=buffer[: rows.stop - start]).float()
            picked_C = logits_CV.gather(1, safe_N[rows, None]).squeeze(1)
            max_C = logits_CV.amax(dim=-1)
            exp_CV = logits_CV.sub_(max_C[:, None]).exp_()  # logits are not needed after this
            sum_C = exp_CV.sum(dim=-1)
            lse_C = sum_C.log() + max_C
            loss += ((lse_C - picked_C) * valid_N[rows]).sum()
            if need_grad:
                # d loss / d logits = (softmax - onehot(target)) / n_valid on valid rows, 0 on ignored ones.
                grad_CV = exp_CV.div_(sum_C[:, None])
                grad_CV.scatter_add_(1, safe_N[rows, None], torch.full_like(lse_C[:, None], -1.0))
                grad_CV.mul_((valid_N[rows].float() * scale)[:, None])
                grad_CV = grad_CV.to(dtype)
                if need_x:
                    torch.mm(grad_CV, w, out=grad_x[rows])
                if need_w and dtype == torch.float32:
                    grad_w.addmm_(grad_CV.t(), xc[rows])
                elif need_w:  # a bf16 product per chunk, accumulated in fp32
                    grad_w += (grad_CV.t() @ xc[rows]).float()
        if need_grad:
            ctx.save_for_backward(grad_x, grad_w)
            ctx.dtypes = (x_ND.dtype, weight_VD.dtype)
        # Mean over the valid targets (nan when there are none, like F.cross_entropy).
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_loss):
        grad_x, grad_w = ctx.saved_tensors
        x_dtype, w_dtype = ctx.dtypes
        grad_x = None if grad_x is None else (grad_x * grad_loss).to(x_dtype)
        grad_w = None if grad_w is None else (grad_w * grad_loss).to(w_dtype)
        return grad_x, grad_w, None, None, None, None, None, None


# Below this share of counted targets the head runs on the counted rows only (SFT counts assistant tokens alone,
# ~35 % of a packed batch of chat examples): the row gather costs far less than the head products it skips.
_COMPACT_BELOW = 0.9


def _counted_rows(x_ND: torch.Tensor, targets_N: torch.Tensor, ignore_index: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows whose target is counted, when ignored ones are many enough to be worth skipping (one host read of
    the count); the ignored rows then get a zero gradient through index_select's backward."""
    valid_N = targets_N != ignore_index
    n_valid = int(valid_N.sum())
    if n_valid == 0 or n_valid >= _COMPACT_BELOW * targets_N.shape[0]:
        return x_ND, targets_N
    rows = valid_N.nonzero().squeeze(1)
    return x_ND.index_select(0, rows), targets_N.index_select(0, rows)


def linear_cross_entropy(x_ND: torch.Tensor, weight_VD: torch.Tensor, targets_N: torch.Tensor,
                         ignore_index: int = -100, chunk_size: Optional[int] = None) -> torch.Tensor:
    """``F.cross_entropy(x @ weight.T, targets, ignore_index=ignore_index)`` (mean), computed in chunks.

    x: [N, D], weight: [V, D], targets: [N] (``ignore_index`` entries excluded). Under autocast the matmuls
    run in the autocast dtype and the softmax in fp32, like the plain path. When a gradient is needed it is
    computed during the forward (one pass over the chunks), so calling ``backward`` is cheap. Only rows with a
    counted target go through the head when many are ignored (an ignored row's loss and gradient are zero anyway).
    """
    dtype = _autocast_dtype(x_ND) or x_ND.dtype
    V = weight_VD.shape[0]
    chunk = chunk_size or max(16, _CHUNK_BYTES // (4 * V))
    grad_on = torch.is_grad_enabled()
    need_x, need_w = grad_on and x_ND.requires_grad, grad_on and weight_VD.requires_grad
    x_ND, targets_N = _counted_rows(x_ND, targets_N, ignore_index)
    with torch.autocast(x_ND.device.type, enabled=False):  # dtypes are handled explicitly above
        return _LinearCrossEntropy.apply(x_ND, weight_VD, targets_N, ignore_index, chunk, dtype, need_x, need_w)
