"""The sparse autoencoder (EleutherAI/sparsify's formulation and tensor names).

x̂ = W_dec z + b_dec, decoder rows unit norm, z the codes of its architecture (`archs/`:
TopK, BatchTopK, JumpReLU, Matryoshka), which decides the encoding. A transcoder (sparsify's
`transcode`) predicts another activation y from x (an MLP's output from its input): its
encoder reads x uncentred, its decoder (zero at the start, rows free) writes y, and a skip
connection adds W_skip x. The decode is sparse
(embedding_bag over the active pairs), so its cost grows with the active latents and not
with the number of latents.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from sae_ray.sae.archs import architecture
from sae_ray.sae.codes import Codes


@dataclass
class SaeConfig:
    d_in: int
    num_latents: int
    k: int
    architecture: str = "topk"  # a name in the registry (`archs/`)
    l0_coefficient: float = 1e-3  # jumprelu's L0 penalty, in FVU units per active latent
    matryoshka_widths: list[int] | None = None  # matryoshka's prefixes (default: n/8, /4, /2)
    target_l0: float | None = None  # jumprelu: a quadratic penalty around this L0 instead
    transcode: bool = False  # predict another activation (width d_out) from x
    d_out: int | None = None  # a transcoder's target width (default d_in)
    skip_connection: bool = False  # a transcoder's linear skip term W_skip x

    def __post_init__(self) -> None:
        if self.k > self.num_latents:
            raise ValueError(f"sae.k: {self.k} is larger than the {self.num_latents} latents")
        architecture(self.architecture).check(self)

    @property
    def width_out(self) -> int:
        """The width of what the SAE reconstructs (a transcoder's target)."""
        return self.d_out or self.d_in


class SparseAutoencoder(nn.Module):
    def __init__(self, cfg: SaeConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = nn.Linear(cfg.d_in, cfg.num_latents)
        self.encoder.bias.data.zero_()
        if cfg.transcode:  # sparsify's: what a latent writes is learnt from nothing
            self.W_dec = nn.Parameter(torch.zeros(cfg.num_latents, cfg.width_out))
        else:  # W_encᵀ with unit rows: each latent first reconstructs what it reads
            self.W_dec = nn.Parameter(self.encoder.weight.data.clone())
        self.b_dec = nn.Parameter(torch.zeros(cfg.width_out))
        if cfg.skip_connection:
            self.W_skip = nn.Parameter(torch.zeros(cfg.width_out, cfg.d_in))
        self.set_decoder_norm_to_unit_norm()
        self.arch = architecture(cfg.architecture)
        self.arch.add_parameters(self)

    @torch.no_grad()
    def init_b_dec(self, x: torch.Tensor, y: torch.Tensor | None = None) -> None:
        """b_dec from the data (the mean of what is reconstructed, `y` for a transcoder), so
        the encoder sees centred inputs from step one (a transcoder's: b_enc = −W_enc E[x],
        sparsify's); then whatever else the architecture sets from the first batch."""
        x = x.float()
        target = x if y is None else y.float()
        self.b_dec.data.copy_(target.mean(0).to(self.b_dec.dtype))
        if self.cfg.transcode:
            self.encoder.bias.data.copy_(-(self.encoder.weight.float() @ x.mean(0)))
        self.arch.init_from_data(self, x)

    def centred(self, x: torch.Tensor) -> torch.Tensor:
        """What the encoder reads: x − b_dec (Anthropic's), or a transcoder's x as it is
        (its b_dec lives in the target's space)."""
        return x if self.cfg.transcode else x - self.b_dec

    def encode(self, x: torch.Tensor, dead: torch.Tensor | None = None) -> Codes:
        """The architecture's codes; with a `dead` mask also the AuxK candidates (Gao et al.
        B.1: the top d/2 dead latents)."""
        return self.arch.encode(self, x, dead)

    def decode_sparse(
        self, values: torch.Tensor, indices: torch.Tensor, offsets: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Σ_j z_j W_dec[j] over the active indices only (without b_dec); with `offsets`,
        flat CSR codes (`Codes.offsets`)."""
        return F.embedding_bag(
            indices,
            self.W_dec,
            offsets,
            per_sample_weights=values.to(self.W_dec.dtype),
            mode="sum",
        )

    def forward(
        self, x: torch.Tensor, dead: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, Codes]:
        codes = self.encode(x, dead)
        if codes.dense is not None:
            out = self.decode_dense(codes.dense)
        else:
            out = self.decode_sparse(codes.values, codes.indices, codes.offsets) + self.b_dec
        if self.cfg.skip_connection:
            out = out + x.to(self.W_skip.dtype) @ self.W_skip.T
        return out, codes

    def dense_codes(self, x: torch.Tensor) -> torch.Tensor:
        codes = self.encode(x)
        if codes.dense is not None:
            return codes.dense
        dense = codes.values.new_zeros(len(x), self.cfg.num_latents)
        if codes.offsets is not None:  # CSR: row i holds the pairs from offsets[i]
            counts = torch.diff(codes.offsets, append=codes.offsets.new_tensor([len(codes.values)]))
            rows = torch.arange(len(x), device=x.device).repeat_interleave(counts)
            return dense.index_put_((rows, codes.indices), codes.values)
        return dense.scatter_(-1, codes.indices, codes.values)

    def decode_dense(self, z: torch.Tensor) -> torch.Tensor:
        return z @ self.W_dec + self.b_dec

    @torch.no_grad()
    def fold_input_scale(self, scale: float, out_scale: float | None = None) -> SparseAutoencoder:
        """Trained on `scale`·x (to reconstruct `out_scale`·y, a transcoder's target), this SAE
        becomes one that takes raw x: its codes divided by `scale` (b_enc and any threshold
        over it), its output by `out_scale` (default `scale`: an autoencoder's decoder keeps
        its unit rows). In place; returns it."""
        out = scale if out_scale is None else out_scale
        self.encoder.bias /= scale
        self.b_dec /= out
        if self.cfg.transcode:
            self.W_dec *= scale / out
        if self.cfg.skip_connection:
            self.W_skip *= scale / out
        self.arch.fold_scale(self, scale)
        return self

    @torch.no_grad()
    def set_decoder_norm_to_unit_norm(self) -> None:
        if self.cfg.transcode:  # its rows write another space: their norms are learnt
            return
        self.W_dec.data /= self.W_dec.data.norm(dim=1, keepdim=True).clamp_min(1e-8)

    @torch.no_grad()
    def remove_gradient_parallel_to_decoder_directions(self) -> None:
        """Keep the unit-norm constraint honest: Adam should not push rows off the sphere."""
        if self.W_dec.grad is None or self.cfg.transcode:
            return
        parallel = (self.W_dec.grad * self.W_dec.data).sum(-1, keepdim=True)
        self.W_dec.grad -= parallel * self.W_dec.data

    def save(self, directory: Path) -> None:
        """sparsify's layout and tensor names: `SparseCoder.load_from_disk` reads it as is."""
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, str(directory / "sae.safetensors"))
        (directory / "cfg.json").write_text(json.dumps(asdict(self.cfg), indent=1))

    @classmethod
    def load(cls, directory: Path, device: str = "cpu") -> SparseAutoencoder:
        cfg = SaeConfig(**json.loads((directory / "cfg.json").read_text()))
        sae = cls(cfg)
        sae.load_state_dict(load_file(str(directory / "sae.safetensors"), device=device))
        return sae.eval()  # BatchTopK encodes by its threshold, not by the batch


def default_lr(num_latents: int) -> float:
    """Gao et al.'s scaling: lr ∝ 1/sqrt(latents), 2e-4 at 16k latents."""
    return 2e-4 / math.sqrt(num_latents / 2**14)


def fvu(x: torch.Tensor, x_hat: torch.Tensor) -> torch.Tensor:
    """Fraction of variance unexplained: Σ‖x − x̂‖² / Σ‖x − mean(x)‖²."""
    total = (x - x.mean(0)).pow(2).sum()
    return (x - x_hat).pow(2).sum() / total.clamp_min(1e-12)


def auxk_loss(
    sae: SparseAutoencoder,
    x: torch.Tensor,
    x_hat: torch.Tensor,
    codes: Codes,
    num_dead: int,
    total_variance: torch.Tensor | None = None,
) -> torch.Tensor:
    """Dead latents learn to explain what the live ones miss (residual detached).

    `codes` must come from `encode(x, dead)` so it carries the top dead latents. Normalised
    like the main loss, by the input's Σ‖x − mean(x)‖² (as sparsify does), so the two terms
    share a scale; under DDP pass the all-workers value as `total_variance`.
    """
    if num_dead == 0 or codes.aux_indices.shape[1] == 0:
        return x.new_zeros(())
    # Gao et al. B.1: k_aux = d/2, and the loss shrinks when fewer latents than that are dead.
    scale = min(num_dead / (x.shape[-1] // 2), 1.0)
    residual = (x - x_hat).detach()
    e_hat = sae.decode_sparse(codes.aux_values, codes.aux_indices)  # b_dec counted once
    if total_variance is None:
        total_variance = (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)
    return scale * (residual - e_hat).pow(2).sum() / total_variance
