"""TopK (Gao et al. 2024; EleutherAI/sparsify's formulation): z = TopK(ReLU(W_enc(x − b_dec)
+ b_enc)), each row exactly k active latents, with a backward that scales with k."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from sae_ray.sae.archs.base import Architecture, register
from sae_ray.sae.codes import Codes, aux_candidates, dead_latents, encoder_pre, latent_rows


def _latent_rows(indices: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, m: int):
    """Σ_n g_nj x_n for every latent j, touching only the selected (n, j) pairs (each
    row of `indices` the latents picked for that row of x)."""
    rows = torch.arange(len(x), device=x.device).repeat_interleave(indices.shape[1])
    return latent_rows(rows, indices.reshape(-1), grads.reshape(-1), x, m)


class _TopKEncode(torch.autograd.Function):
    """TopK(ReLU(W_enc x + b_enc)) with a backward that scales with k, not with latents.

    Only the selected pre-activations get gradient, so the encoder's backward is sparse
    (as in sparsify's fused encoder) and the ReLU is applied to the k winners, not to the
    whole (batch, latents) matrix. The AuxK candidates (top dead latents) are picked in the
    same pass and share the sparse backward, so AuxK also trains the encoder.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, k: int, dead_idx, k_aux: int):
        pre = encoder_pre(x, weight, bias)
        raw, indices = pre.topk(k, dim=-1, sorted=False)
        values = raw.clamp_min(0)
        aux_values, aux_indices = aux_candidates(pre, dead_idx, k_aux)
        ctx.save_for_backward(x, weight, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_indices, g_aux, _g_aux_indices):
        x, weight, indices, values, aux_indices, aux_values = ctx.saved_tensors
        # ReLU: no gradient where the selected pre-activation was not positive.
        grads = torch.cat([g_values * (values > 0), g_aux * (aux_values > 0)], 1)
        grads = grads.to(weight.dtype)
        picked = torch.cat([indices, aux_indices], 1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(picked, weight, mode="sum", per_sample_weights=grads)
            grad_x = grad_x.to(x.dtype)
        if ctx.needs_input_grad[1]:
            grad_w = _latent_rows(picked, grads, x.to(weight.dtype), weight.shape[0])
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, picked.reshape(-1), grads.reshape(-1))
        return grad_x, grad_w, grad_b, None, None, None


@register
class TopK(Architecture):
    name = "topk"
    fixed_l0 = True
    saelens_name = "topk"

    def encode(self, sae, x, dead):
        dead_idx, k_aux = dead_latents(sae, dead)
        values, indices, aux_values, aux_indices = _TopKEncode.apply(
            sae.centred(x), sae.encoder.weight, sae.encoder.bias, sae.cfg.k, dead_idx, k_aux
        )
        return Codes(values, indices, aux_values, aux_indices)

    def saelens(self, sae):
        return {"k": sae.cfg.k}, {}
