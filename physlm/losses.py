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
"""

from __future__ import annotations

import torch

CHUNK_ELEMENTS = 2**23  # logits per chunk: 32 MiB in float32


def _chunked_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                           targets: torch.Tensor, with_grads: bool) -> tuple[torch.Tensor, ...]:
    """Mean loss and, if asked, its gradients (dh, dW, db), one chunk of tokens at a time."""
    inputs = h.reshape(-1, h.shape[-1])
    targets = targets.reshape(-1)
    num_tokens, vocab = inputs.shape[0], weight.shape[0]
    dtype = torch.promote_types(weight.dtype, torch.float32)  # softmax never below fp32
    loss = torch.zeros((), device=h.device, dtype=dtype)
    if with_grads:
        grad_h = torch.empty_like(inputs)
        grad_w = torch.zeros_like(weight, dtype=dtype)
        grad_b = None if bias is None else torch.zeros(vocab, device=h.device, dtype=dtype)
    chunk = max(1, CHUNK_ELEMENTS // vocab)
    for start in range(0, num_tokens, chunk):
        h_chunk, y = inputs[start:start + chunk], targets[start:start + chunk]
        logits = (h_chunk @ weight.t()).to(dtype)
        if bias is not None:
            logits += bias
        lse = torch.logsumexp(logits, dim=-1)
        loss += (lse - logits.gather(1, y.unsqueeze(1)).squeeze(1)).sum()
        if with_grads:
            probs = logits.sub_(lse.unsqueeze(1)).exp_()           # softmax, in place
            probs[torch.arange(len(y), device=y.device), y] -= 1.0
            grad_h[start:start + chunk] = (probs @ weight.to(dtype)).to(inputs.dtype)
            grad_w.addmm_(probs.t(), h_chunk.to(dtype))
            if grad_b is not None:
                grad_b += probs.sum(dim=0)
    scale = 1.0 / num_tokens
    if not with_grads:
        return (loss * scale,)
    return (loss * scale, grad_h.mul_(scale).view_as(h), grad_w.mul_(scale).to(weight.dtype),
            None if grad_b is None else grad_b.mul_(scale).to(bias.dtype))


class _LinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h, weight, bias, targets):
        loss, *grads = _chunked_cross_entropy(h, weight, bias, targets, with_grads=True)
        ctx.save_for_backward(*grads)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        return (grad_h * grad_loss, grad_w * grad_loss,
                None if grad_b is None else grad_b * grad_loss, None)


def linear_cross_entropy(h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                         targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy of the logits h @ weight.T + bias against targets.

    Equals F.cross_entropy(F.linear(h, weight, bias).flatten(0, -2), targets.flatten())
    to floating-point tolerance, in value and gradients, without ever holding all logits.
    """
    tensors = (h, weight) if bias is None else (h, weight, bias)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return _LinearCrossEntropy.apply(h, weight, bias, targets)
    return _chunked_cross_entropy(h, weight, bias, targets, with_grads=False)[0]
