"""What every SAE architecture's encoder shares: the codes it returns (`Codes`), the
encoder's pre-activations, AuxK's dead-latent candidates, and the sparse kernels (a
backward over picked (row, latent) pairs only, `latent_rows`; the CSR pairs encoder of the
batch- and threshold-selected architectures, `pairs_encode`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


class Codes(NamedTuple):
    values: torch.Tensor  # (batch, k), >= 0; other architectures: the widest row's count
    indices: torch.Tensor  # (batch, k)
    aux_values: torch.Tensor  # (batch, k_aux): top dead latents, for AuxK; k_aux may be 0
    aux_indices: torch.Tensor  # (batch, k_aux)
    dense: torch.Tensor | None = None  # (batch, latents): the non-TopK architectures' codes
    penalty: torch.Tensor | None = None  # jumprelu in training: Σ L0 over the rows
    # BatchTopK / Matryoshka / JumpReLU in training: values and indices are flat (pairs,),
    # sorted by row, and row i's pairs start at offsets[i] (CSR; a row may hold any number)
    offsets: torch.Tensor | None = None


def latent_rows(
    rows: torch.Tensor, cols: torch.Tensor, grads: torch.Tensor, x: torch.Tensor, m: int
) -> torch.Tensor:
    """Σ_n g_nj x_n for every latent j over the pairs (rows[i], cols[i]) with weight grads[i].

    A transposed embedding_bag: sort the pairs by latent, then bag rows of x per latent.
    Costs O(pairs·d) instead of the dense O(batch·latents·d) of `pre.T @ x`.
    """
    order = cols.argsort()
    counts = torch.bincount(cols, minlength=m)
    offsets = counts.cumsum(0) - counts
    weights = grads[order].to(x.dtype)
    return F.embedding_bag(rows[order], x, offsets, mode="sum", per_sample_weights=weights)


def encoder_pre(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
    """W_enc x + b_enc, in autocast's dtype when it is on (the encoders' own Functions run
    outside autocast, which would not see inside them)."""
    dev = x.device.type
    dt = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else x.dtype
    with torch.autocast(dev, enabled=False):
        return torch.addmm(bias.to(dt), x.to(dt), weight.to(dt).t())


def dead_latents(sae: nn.Module, dead: torch.Tensor | None) -> tuple[torch.Tensor | None, int]:
    """AuxK's dead latents and how many each row picks: the top d/2 (Gao et al. B.1)."""
    if dead is None or not bool(dead.any()):
        return None, 0
    dead_idx = dead.nonzero().squeeze(1)
    return dead_idx, min(sae.cfg.width_out // 2, len(dead_idx))


def aux_candidates(pre: torch.Tensor, dead_idx: torch.Tensor | None, k_aux: int):
    """AuxK's (values, latents): each row's top `k_aux` dead latents (Gao et al. B.1),
    ReLU'd; none without dead latents."""
    if dead_idx is None or k_aux == 0:
        empty = pre.new_zeros(len(pre), 0)
        return empty, empty.long()
    araw, pos = pre.index_select(1, dead_idx).topk(k_aux, dim=-1, sorted=False)
    return araw.clamp_min(0), dead_idx[pos]


class _PairsEncode(torch.autograd.Function):
    """W_enc x + b_enc at the (row, latent) pairs `select` picks from the whole matrix, as
    CSR codes, with TopK's sparse backward: only the picked pairs and the AuxK candidates
    carry gradient, so the encoder's backward costs pairs x d, not rows x latents x d."""

    @staticmethod
    def forward(ctx, x, weight, bias, select: Callable, dead_idx, k_aux: int):
        pre = encoder_pre(x, weight, bias)
        n, m = pre.shape
        flat = select(pre)  # ascending: each row's pairs together
        values = pre.flatten()[flat]
        rows, cols = flat // m, flat % m
        counts = torch.bincount(rows, minlength=n)
        offsets = counts.cumsum(0) - counts
        aux_values, aux_indices = aux_candidates(pre, dead_idx, k_aux)
        ctx.save_for_backward(x, weight, rows, cols, offsets, aux_indices, aux_values)
        ctx.mark_non_differentiable(rows, cols, offsets, aux_indices)
        return values, rows, cols, offsets, aux_values, aux_indices

    @staticmethod
    def backward(ctx, g_values, _g_rows, _g_cols, _g_offsets, g_aux, _g_aux_indices):
        x, weight, rows, cols, offsets, aux_indices, aux_values = ctx.saved_tensors
        grads = g_values.to(weight.dtype)
        aux_grads = (g_aux * (aux_values > 0)).to(weight.dtype)  # AuxK's ReLU
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(cols, weight, offsets, mode="sum", per_sample_weights=grads)
            if aux_indices.shape[1]:
                grad_x = grad_x + F.embedding_bag(
                    aux_indices, weight, mode="sum", per_sample_weights=aux_grads
                )
            grad_x = grad_x.to(x.dtype)
        aux_rows = torch.arange(len(x), device=x.device).repeat_interleave(aux_indices.shape[1])
        all_rows = torch.cat([rows, aux_rows])
        all_cols = torch.cat([cols, aux_indices.reshape(-1)])
        all_grads = torch.cat([grads, aux_grads.reshape(-1)])
        if ctx.needs_input_grad[1]:
            grad_w = latent_rows(all_rows, all_cols, all_grads, x.to(weight.dtype), len(weight))
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device)
            grad_b.index_add_(0, all_cols, all_grads)
        return grad_x, grad_w, grad_b, None, None, None


def pairs_encode(sae: nn.Module, x: torch.Tensor, dead: torch.Tensor | None, select: Callable):
    """Training's sparse codes of the pairs `select` picks: (pre-activations at the pairs,
    their rows, latents and CSR offsets, AuxK's values and latents)."""
    dead_idx, k_aux = dead_latents(sae, dead)
    return _PairsEncode.apply(
        sae.centred(x), sae.encoder.weight, sae.encoder.bias, select, dead_idx, k_aux
    )


def padded(z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense codes as (values, indices) of the widest row's count (at least k): the shape
    every TopK consumer reads; an inactive slot is 0."""
    width = min(max(k, int((z > 0).sum(-1).max()) if len(z) else k), z.shape[-1])
    top = z.topk(width, dim=-1)
    return top.values, top.indices


def dense_codes(z: torch.Tensor, k: int) -> Codes:
    """Inference codes from dense activations `z`, with their padded (values, indices)."""
    values, indices = padded(z.detach(), k)
    return Codes(values, indices, values[:, :0], indices[:, :0], dense=z)
