"""Fused output projection + cross-entropy: the language-model loss without materialising the logits.

The causal-LM loss of a (N, D) hidden state against a (V, D) output matrix normally builds the (N, V) logits, their
log-softmax and, in the backward, two more (N, V) gradients: four buffers of N*V floats, the largest tensors of a
small model's step (at N=8192 and V=150k, 4.6 GiB each in fp32). Here the rows are processed in chunks: each chunk's
logits, softmax and logit gradient live in one reused (chunk, V) buffer, and the gradients of the hidden state and
of the weight are computed in the same pass (the loss is a scalar, so the backward only rescales them). Liger
Kernel's `FusedLinearCrossEntropy` and Apple's Cut Cross-Entropy are the GPU-kernel versions of the same idea.

Semantics follow transformers' `ForCausalLMLoss`: labels are shifted inside, -100 is ignored, the sum is divided by
`num_items_in_batch` when given and by the number of counted tokens otherwise.
"""

from __future__ import annotations

import math
import threading

import torch
import torch.nn.functional as F

from .moe import accumulate_dtype, refuse_second_order

# Rows per chunk by default: as many as fit a (rows, V) buffer of this size (at least 64). The three matmuls of a
# chunk lose 20-25% of their rate at 256 rows against 1024 (fp32, 2 CPU threads, V=8192, D=512), while the softmax
# passes cost little either way (exp dominates them). At V=150k this gives the 64-row minimum: the matmuls there are
# still large (64 x D x 150k).
CHUNK_BYTES = 32 * 2**20
MIN_CHUNK_ROWS = 64

# The chunk buffer of the last call, per thread, reused while its shape fits: a fresh buffer of tens of MiB is a
# fresh mapping from the C allocator, and faulting its pages in each step costs as much as a chunk's matmul.
_buffers = threading.local()


def _chunk_buffer(rows: int, vocab: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    buf = getattr(_buffers, "logits", None)
    if buf is None or buf.dtype != dtype or buf.device != device or buf.shape[1] != vocab or buf.shape[0] < rows:
        buf = torch.empty(rows, vocab, dtype=dtype, device=device)
        _buffers.logits = buf
    return buf[:rows]


def default_chunk_rows(vocab: int, dtype: torch.dtype) -> int:
    """Rows per chunk for a vocabulary of `vocab` in `dtype` (the accumulation dtype): see `CHUNK_BYTES`."""
    return max(MIN_CHUNK_ROWS, CHUNK_BYTES // (vocab * torch.finfo(dtype).bits // 8))


class LinearCrossEntropyFunction(torch.autograd.Function):
    """sum over counted rows of -log softmax(h W^T)[label], divided by `divisor`; gradients computed in forward.

    In fp16 the gradients are kept without the 1/divisor factor (the weight's in fp32) and scaled, with the upstream
    factor, in fp32 in `backward`: (softmax - onehot) / divisor underflows fp16 for large token counts, and
    GradScaler's first scale, 65536, is inf in fp16. bf16 has fp32's range and keeps the plain path (its weight
    gradient saved in bf16: an fp32 copy of a (vocab, hidden) matrix would be held through the whole backward).
    With no counted token (divisor nan) the loss is nan, as a mean over nothing is in `ForCausalLMLoss`, and the
    gradients are exactly zero, as they are there."""

    @staticmethod
    def forward(ctx, hidden_ND, weight_VD, labels_N, divisor, ignore_index, chunk_rows):
        need_h, need_w = ctx.needs_input_grad[:2]
        acc = accumulate_dtype(hidden_ND.dtype)  # logits, softmax and the weight gradient
        rows, vocab = hidden_ND.shape[0], weight_VD.shape[0]
        counted_N = labels_N != ignore_index
        if bool(((labels_N < 0) | (labels_N >= vocab))[counted_N].any()):
            raise ValueError(f"labels must be in [0, {vocab}) or equal ignore_index={ignore_index}")
        no_tokens = math.isnan(divisor)
        scale_later = hidden_ND.dtype == torch.float16
        grad_divisor = 1.0 if scale_later or no_tokens else divisor
        ctx.backward_divisor = divisor if scale_later and not no_tokens else 1.0
        ctx.grad_dtypes, ctx.acc = (hidden_ND.dtype, weight_VD.dtype), acc
        chunk_rows = chunk_rows or default_chunk_rows(vocab, acc)
        loss = torch.zeros((), dtype=acc, device=hidden_ND.device)
        grad_h = torch.empty_like(hidden_ND) if need_h else None
        # Written by the first chunk (no zero fill), unless there are no rows at all.
        new_grad_w = torch.zeros if rows == 0 else torch.empty
        grad_w = new_grad_w(weight_VD.shape, dtype=acc, device=weight_VD.device) if need_w else None
        logits_buf = _chunk_buffer(min(chunk_rows, rows), vocab, acc, hidden_ND.device)
        for start in range(0, rows, chunk_rows):
            stop = min(start + chunk_rows, rows)
            h_RD, labels_R, counted_R = hidden_ND[start:stop], labels_N[start:stop], counted_N[start:stop]
            logits_RV = logits_buf[: stop - start]
            if hidden_ND.dtype == acc:
                torch.mm(h_RD, weight_VD.t(), out=logits_RV)
            else:
                logits_RV.copy_(h_RD @ weight_VD.t())
            # log-sum-exp, then the buffer becomes the softmax in place.
            max_R = logits_RV.amax(dim=1, keepdim=True)
            safe_labels_R = labels_R.clamp(0, vocab - 1).unsqueeze(1)
            picked_R = logits_RV.gather(1, safe_labels_R)
            logits_RV.sub_(max_R).exp_()
            sum_R = logits_RV.sum(dim=1, keepdim=True)
            token_loss_R = (sum_R.log() + max_R - picked_R).squeeze(1)
            loss += token_loss_R.masked_fill(~counted_R, 0).sum()
            if not (need_h or need_w):
                continue
            # d loss / d logits = (softmax - onehot(label)) / divisor on counted rows, 0 elsewhere.
            counted_R1 = counted_R.to(acc).unsqueeze(1)
            logits_RV.mul_(counted_R1 / (sum_R * grad_divisor))
            logits_RV.scatter_add_(1, safe_labels_R, -counted_R1 / grad_divisor)
            grad_RV = logits_RV.to(hidden_ND.dtype)
            if need_h:
                torch.mm(grad_RV, weight_VD, out=grad_h[start:stop])
            if need_w:  # the first chunk writes the weight gradient, the others add to it
                if start == 0:
                    torch.mm(logits_RV.t(), h_RD.to(acc), out=grad_w)
                else:
                    grad_w.addmm_(logits_RV.t(), h_RD.to(acc))
        ctx.save_for_backward(grad_h, grad_w if scale_later or grad_w is None else grad_w.to(weight_VD.dtype))
        return loss / divisor

    @staticmethod
    def backward(ctx, grad_loss):
        refuse_second_order("the fused linear cross-entropy", "set config.fused_linear_cross_entropy=False")
        grad_h, grad_w = ctx.saved_tensors
        # The loss is a scalar: its gradients were computed in forward and only need the upstream factor (and, in
        # fp16, the 1/divisor left out there, applied in fp32 before the cast back).
        h_dtype, w_dtype = ctx.grad_dtypes
        factor = grad_loss.to(ctx.acc) / ctx.backward_divisor
        if bool(factor.ne(1).item()):
            if grad_h is not None:
                grad_h = (grad_h.float() * factor).to(h_dtype) if h_dtype == torch.float16 else grad_h * factor.to(h_dtype)
            if grad_w is not None:
                grad_w = grad_w.mul_(factor) if grad_w.dtype != w_dtype else grad_w * factor.to(w_dtype)
        return grad_h, grad_w.to(w_dtype) if grad_w is not None else None, None, None, None, None


def linear_cross_entropy(
    hidden_states: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.LongTensor,
    num_items_in_batch: int | torch.Tensor | None = None,
    ignore_index: int = -100,
    shift_labels: torch.LongTensor | None = None,
    chunk_rows: int | None = None,
) -> torch.Tensor:
    """Causal-LM loss of `hidden_states @ weight.T` without building the logits.

    Args:
        hidden_states (`torch.Tensor` of shape `(batch, seq, hidden)`): final (normed) hidden states.
        weight (`torch.Tensor` of shape `(vocab, hidden)`): the output projection (`lm_head.weight`).
        labels (`torch.LongTensor` of shape `(batch, seq)`): token ids, shifted inside; `ignore_index` is skipped.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*): divisor of the summed loss (gradient
            accumulation); defaults to the number of counted tokens.
        ignore_index (`int`, *optional*, defaults to -100): label value that does not count.
        shift_labels (`torch.LongTensor`, *optional*): already shifted labels; `labels` is then ignored.
        chunk_rows (`int`, *optional*): rows of the logits buffer; by default as many as fit `CHUNK_BYTES`.

    Returns:
        `torch.Tensor`: the scalar loss (fp32 for half-precision inputs), equal to transformers' `ForCausalLMLoss` on the full logits.
    """
    if chunk_rows is not None and chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    if shift_labels is None:
        shift_labels = F.pad(labels, (0, 1), value=ignore_index)[..., 1:]
    hidden_ND = hidden_states.reshape(-1, hidden_states.shape[-1])
    labels_N = shift_labels.reshape(-1).to(hidden_ND.device)
    if labels_N.shape[0] != hidden_ND.shape[0]:
        raise ValueError(f"{labels_N.shape[0]} labels for {hidden_ND.shape[0]} hidden states")
    if num_items_in_batch is None:
        divisor = (labels_N != ignore_index).sum().item()
        if divisor == 0:
            # Like a mean over no tokens in torch's cross-entropy: nan (and zero gradients).
            divisor = float("nan")
    else:
        divisor = float(num_items_in_batch.item() if torch.is_tensor(num_items_in_batch) else num_items_in_batch)
    return LinearCrossEntropyFunction.apply(hidden_ND, weight, labels_N, divisor, ignore_index, chunk_rows)


__all__ = ["CHUNK_BYTES", "LinearCrossEntropyFunction", "default_chunk_rows", "linear_cross_entropy"]
