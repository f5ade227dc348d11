"""Fused, chunked vocabulary projection + cross-entropy.

    loss = mean_t [ logsumexp(W h_t + b) - (W h_t + b)_{y_t} ]
    dloss/dlogits_t = (softmax(W h_t + b) - onehot(y_t)) / T

The full (tokens x vocabulary) logits of a training batch, 4096 x 30,000 floats
(~0.5 GB), and their gradient are the largest tensors of a step. Here the
tokens are processed in chunks: each chunk's logits are made, reduced to the
loss, turned into their gradient in place, and contracted at once into the
gradients of h, W and b. Nothing of size T x V outlives a chunk, and the
backward pass only scales the gradients computed here by the incoming one,
so the three large matrix products (logits, dh, dW) each happen once.

Per chunk, with m_t the row maximum, e_t = exp(W h_t + b - m_t) and s_t = sum(e_t):

    dh_t = (e_t / s_t) W - W_{y_t}
    dW   = sum_t e_t (h_t / s_t)^T - sum_t onehot(y_t) h_t^T,   db = sum_t e_t / s_t - onehot(y_t)

so the softmax is never normalised over the vocabulary (1 / s_t scales the small
operands), and the one-hot terms are one gather and one index_add over all tokens.
All chunks reuse one logits buffer, and the bias enters the logits product as the
weight of a constant input 1: on the CPU a fresh chunk-sized tensor per chunk costs
page faults, and a separate bias pass costs a sweep over the chunk. (The logits
product, written into that float32 buffer, is not autocast: it runs in float32.)

Each token's loss m_t + log s_t - (W h_t + b)_{y_t} is kept as well (detached, one float per
token): evaluation sums it over subsets of the targets (those that are not `<unk>`).
"""

from __future__ import annotations

import torch

# Logits per chunk: a 32 MiB float32 buffer (279 tokens at 30,000 words). On a 2-core CPU
# with 32 MiB of L3, 2^23 and 2^24 measured alike and faster than 2^21 and 2^22.
CHUNK_ELEMENTS = 2**23


def _chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, with_grads: bool) -> tuple[torch.Tensor, ...]:
    """Mean loss, each token's loss (shaped as `targets`) and, if asked, the mean's
    gradients (dh, dW, db), one chunk of tokens at a time."""
    dtype = torch.promote_types(weight.dtype, torch.float32)  # softmax never below fp32
    d_model = h.shape[-1]
    targets_shape = targets.shape
    inputs, targets = h.reshape(-1, d_model).to(dtype), targets.reshape(-1)
    w = weight.to(dtype)
    num_tokens, vocab = inputs.shape[0], weight.shape[0]
    # The bias as the weight of a constant input 1, so each chunk's logits are one product.
    x, w_x = inputs, w
    if bias is not None:
        x = torch.cat([inputs, inputs.new_ones(num_tokens, 1)], dim=1)
        w_x = torch.cat([w, bias.to(dtype).unsqueeze(1)], dim=1)
    chunk = max(1, min(num_tokens, CHUNK_ELEMENTS // vocab))
    buffer = torch.empty(chunk, vocab, device=h.device, dtype=dtype)  # reused by every chunk
    loss = torch.zeros((), device=h.device, dtype=dtype)
    token_losses = torch.empty(num_tokens, device=h.device, dtype=dtype)
    if with_grads:
        grad_h = torch.empty_like(inputs)
        grad_w = torch.zeros_like(w)
        grad_b = None if bias is None else torch.zeros(vocab, device=h.device, dtype=dtype)
    for start in range(0, num_tokens, chunk):
        end = min(start + chunk, num_tokens)
        logits = torch.mm(x[start:end], w_x.t(), out=buffer[:end - start])
        target_logit = logits.gather(1, targets[start:end].unsqueeze(1))
        row_max = logits.amax(dim=1, keepdim=True)
        exp = logits.sub_(row_max).exp_()                           # in place: e_t
        total = exp.sum(dim=1, keepdim=True)                        # s_t
        chunk_losses = (row_max + total.log() - target_logit).squeeze(1)
        token_losses[start:end] = chunk_losses
        loss += chunk_losses.sum()
        if with_grads:
            inv_total = total.reciprocal_()
            grad_h[start:end] = (exp @ w).mul_(inv_total)
            grad_w.addmm_(exp.t(), inputs[start:end] * inv_total)
            if grad_b is not None:
                grad_b.addmv_(exp.t(), inv_total.squeeze(1))
    scale = 1.0 / num_tokens
    token_losses = token_losses.view(targets_shape)
    if not with_grads:
        return loss * scale, token_losses
    grad_h -= w[targets]
    grad_w.index_add_(0, targets, inputs, alpha=-1)
    if grad_b is not None:
        grad_b.index_add_(0, targets, grad_b.new_ones(num_tokens), alpha=-1)
    return (loss * scale, token_losses, grad_h.mul_(scale).to(h.dtype).view_as(h),
            grad_w.mul_(scale).to(weight.dtype),
            None if grad_b is None else grad_b.mul_(scale).to(bias.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets):
        loss, token_losses, *grads = _chunked_cross_entropy(h, weight, bias, targets,
                                                            with_grads=True)
        ctx.save_for_backward(*grads)
        ctx.mark_non_differentiable(token_losses)
        return loss, token_losses

    @staticmethod
    def backward(ctx, grad_loss, _grad_token_losses):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss, grad_w * grad_loss,
                None if grad_b is None else grad_b * grad_loss, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean cross-entropy of the logits h @ weight.T + bias against targets, and each
    target's loss (float32 or wider, shaped as `targets`, without gradient).

    The mean equals F.cross_entropy(F.linear(h, weight, bias).flatten(0, -2),
    targets.flatten()) to floating-point tolerance, in value and gradients, without ever
    holding all logits; the per-token losses are its reduction="none".
    """
    tensors = (h, weight) if bias is None else (h, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(h, weight, bias, targets)
    return _chunked_cross_entropy(h, weight, bias, targets, with_grads=False)


def head_output(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                targets: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """(loss, token_losses, logits) of an LM head: with targets, the fused mean loss and
    each target's loss (no logits are built); without, only the logits h @ weight.T + b."""
    if targets is None:
        return None, None, torch.nn.functional.linear(h, weight, bias)
    return (*linear_cross_entropy(h, weight, bias, targets), None)
