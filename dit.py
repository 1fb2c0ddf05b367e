"""
dit.py: the tiny Diffusion Transformer that every other tinydit script builds on (the ground floor).

Paper: "Scalable Diffusion Models with Transformers", William Peebles and Saining Xie, ICCV 2023,
arXiv 2212.09748. A DiT cuts the image into p x p patches, runs a stack of transformer blocks whose
LayerNorms are modulated by the timestep + class embedding (adaLN-Zero: every block starts as the
identity), and predicts the noise and a variance for a Gaussian diffusion (Ho et al. 2020, arXiv
2006.11239; learned variance of Nichol & Dhariwal 2021, arXiv 2102.09672).

Paper -> this file
    Sec. 3.2 patchify (Fig. 4), 2-D sin-cos positions   -> PatchEmbed, sincos_pos_embed
    Sec. 3.2 timestep / class embeddings                -> TimestepEmbedder, LabelEmbedder
    Sec. 3.2 adaLN-Zero block (Fig. 3)                  -> modulate, DiTBlock
    Sec. 3.2 transformer decoder, unpatchify            -> FinalLayer, DiT.head
    Sec. 3.1 / 4 linear betas, L_simple + L_vb          -> Diffusion.loss (IDDPM Eq. 16)
    Sec. 3.1 classifier-free guidance                   -> LabelEmbedder.token_drop, forward_with_cfg
    DDPM Alg. 2, DDIM Eq. 12, IDDPM respacing           -> Diffusion.respace, sample, generate
    Sec. 4 training: AdamW 1e-4, no decay, EMA 0.9999   -> train (torchrun + DDP, resumable)
State-dict names and constructor keywords equal facebookresearch/DiT models.py (an official checkpoint
loads with strict=True); Diffusion.respace follows the official space_timesteps(1000, "K").

Ours [inferred], for CPU-minute runs: the `tiny` / `cpu` presets use lr 2e-3 (cpu) with a warm-up, batch
16 and EMA 0.999 with a (1+n)/(10+n) warm-up; the GPU presets use the paper's values (constant EMA 0.9999
from a copy). The sampler clips x0 to [-1, 1] (pixel space; DiT samples latents and does not). The
embedded `shapes` data set replaces ImageNet latents (pixels, no VAE).

Run:
    python dit.py                         # trains out/dit.pt on the embedded data (~4 min, 2 CPU cores)
    python dit.py --preset cifar --data cifar10 --device cuda --steps 400000
    torchrun --nproc_per_node=2 dit.py --preset tiny --steps 20 --out out/ddp
"""
import argparse
import builtins
import copy
import dataclasses
import functools
import hashlib
import inspect
import json
import math
import os
import pickle
import re
import signal
import sys
import tarfile
import time
import urllib.request
import zipfile
from collections import namedtuple
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

# --- Model (names and init as facebookresearch/DiT models.py) -------------------------------------

Modulation = namedtuple("Modulation", "shift_msa scale_msa gate_msa shift_mlp scale_mlp gate_mlp")


def modulate(x, shift, scale):
    """adaLN modulation, DiT Sec. 3.2: x * (1 + scale) + shift, broadcast over the tokens."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class DiTBlock(nn.Module):
    """adaLN-Zero block, DiT Sec. 3.2 (Fig. 3): six vectors regressed from c modulate and gate both halves."""
    def __init__(self, hidden_size, num_heads, mlp_ratio=4.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def zero_init_(self):
        """adaLN-Zero (Sec. 3.2): the modulation starts at exactly 0, so every gate is 0 and the block is the
        identity. Called by DiT.initialize_weights after the Xavier init of every linear."""
        nn.init.zeros_(self.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.adaLN_modulation[-1].bias)

    def modulation(self, c):
        """The six (B, D) vectors of adaLN-Zero, by name (as DiT's models.py unpacks them)."""
        return Modulation(*self.adaLN_modulation(c).chunk(6, dim=1))

    def forward(self, x, c):
        # assignment 1 begin: adaLN-Zero modulation in the DiT block
        mod = self.modulation(c)
        # x = x + gate_msa * Attn(modulate(LN(x), shift_msa, scale_msa))
        x = x + mod.gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), mod.shift_msa, mod.scale_msa))
        # x = x + gate_mlp * MLP(modulate(LN(x), shift_mlp, scale_mlp))
        return x + mod.gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), mod.shift_mlp, mod.scale_mlp))
        # assignment 1 end


class PatchEmbed(nn.Module):
    """Patchify, DiT Sec. 3.2 (Fig. 4): a p x p conv with stride p gives T = (I/p)^2 tokens of width D."""
    def __init__(self, patch_size, in_chans, embed_dim):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x):
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, D, h, w) -> (B, T, D)


def sincos_pos_embed(dim, grid):
    """Fixed 2-D sin-cos positions (MAE): half of D encodes each grid axis as [sin, cos]. (g*g, D)"""
    def one_axis(d, pos):
        omega = 1.0 / 10000 ** (np.arange(d // 2, dtype=np.float64) / (d / 2.0))
        out = np.einsum("m,d->md", pos.reshape(-1), omega)  # (g*g, d/2)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)
    gw, gh = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
    return np.concatenate([one_axis(dim // 2, gw), one_axis(dim // 2, gh)], axis=1)


class Attention(nn.Module):
    """Multi-head self-attention with qkv bias (timm layout: qkv, proj), through F.sdpa."""
    def __init__(self, dim, num_heads):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x):
        B, T, D = x.shape
        qkv = self.qkv(x).reshape(B, T, 3, self.num_heads, D // self.num_heads).permute(2, 0, 3, 1, 4)
        x = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        return self.proj(x.transpose(1, 2).reshape(B, T, D))


class Mlp(nn.Module):
    """fc1 -> GELU(tanh) -> fc2 (timm layout)."""
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the integer t (256 channels, [cos, sin]) -> MLP, DiT Sec. 3.2."""
    def __init__(self, hidden_size, frequency_embedding_size=256):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        self.frequency_embedding_size = frequency_embedding_size

    @staticmethod
    def timestep_embedding(t, dim, max_period=10000):
        half = dim // 2
        # freqs_k = exp(-ln(10000) * k / half), args = t * freqs
        k = torch.arange(half, dtype=torch.float32, device=t.device)
        freqs = torch.exp(-math.log(max_period) * k / half)
        args = t[:, None].float() * freqs[None]
        return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 256)

    def forward(self, t):
        return self.mlp(self.timestep_embedding(t, self.frequency_embedding_size))


class LabelEmbedder(nn.Module):
    """Class embedding with an extra "null" row (index num_classes). CFG's training half (DiT Sec. 3.1):
    token_drop turns a label into null with probability dropout_prob (the sampling half: forward_with_cfg)."""
    def __init__(self, num_classes, hidden_size, dropout_prob):
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + int(dropout_prob > 0), hidden_size)
        self.num_classes, self.dropout_prob = num_classes, dropout_prob

    def token_drop(self, labels, force_drop_ids=None):
        drop = (torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
                if force_drop_ids is None else force_drop_ids == 1)
        return torch.where(drop, self.num_classes, labels)

    def forward(self, labels, train, force_drop_ids=None):
        if (train and self.dropout_prob > 0) or force_drop_ids is not None:
            labels = self.token_drop(labels, force_drop_ids)
        return self.embedding_table(labels)


def forward_with_cfg(model, x, t, y, cfg_scale):
    """Classifier-free guidance at sampling, DiT Sec. 3.1, for any model with forward(x, t, y) and the null
    label learned by LabelEmbedder.token_drop: one call on the batch [x; x], labels [y; null],
        eps = eps_u + s (eps_c - eps_u)
    on all C_in eps channels (the official code guides the first 3 of its 4 latent channels; for RGB pixels
    that is all of them); the variance channels are the conditional half's. Returns (B, C_out)."""
    # ours: takes the plain batch and doubles it here (official: the caller passes [x; x], [y; null])
    null = torch.full_like(y, model.num_classes)
    out = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]))
    C, B = x.shape[1], len(x)
    cond, uncond = out[:B, :C], out[B:, :C]
    eps = uncond + cfg_scale * (cond - uncond)
    return torch.cat([eps, out[:B, C:]], 1)


class FinalLayer(nn.Module):
    """LN -> adaLN (shift, scale) -> Linear(D -> p*p*C_out), zero-initialised."""
    def __init__(self, hidden_size, patch_size, out_channels):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def zero_init_(self):
        """adaLN-Zero's output side: modulation and output linear at 0, so a fresh DiT predicts 0."""
        for layer in (self.adaLN_modulation[-1], self.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class DiT(nn.Module):
    """Diffusion Transformer, DiT Sec. 3.2. forward(x, t, y) -> (B, C_out, I, I); C_out = 2C if learn_sigma.
    embed() and head() are the parts before and after the block stack, so scripts that run the blocks
    their own way (skip, cache, slice, distil) write `h, c = embed(..); for b in blocks: ..; head(h, c)`."""
    def __init__(self, input_size=32, patch_size=2, in_channels=3, hidden_size=384, depth=12,
                 num_heads=6, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=10, learn_sigma=True):
        super().__init__()
        self.input_size, self.patch_size, self.in_channels = input_size, patch_size, in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.learn_sigma, self.num_classes, self.num_heads = learn_sigma, num_classes, num_heads
        self.has_null = class_dropout_prob > 0  # a "null" label row exists: classifier-free guidance works
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = (input_size // patch_size) ** 2
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self):
        """Xavier-uniform linears, zero biases; N(0, 0.02) embeddings; then adaLN-Zero (zero_init_ of each
        block and of the final layer: each block starts as the identity, Sec. 3.2)."""
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        g = int(self.pos_embed.shape[1] ** 0.5)
        pos = sincos_pos_embed(self.pos_embed.shape[-1], g)
        self.pos_embed.data.copy_(torch.from_numpy(pos).float()[None])
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for m in list(self.blocks) + [self.final_layer]:  # adaLN-Zero, owned by each block and the head
            m.zero_init_()

    def unpatchify(self, x):
        """(B, T, p*p*C) -> (B, C, I, I)"""
        c, p = self.out_channels, self.patch_size
        h = w = int(x.shape[1] ** 0.5)
        x = x.reshape(x.shape[0], h, w, p, p, c)
        return torch.einsum("nhwpqc->nchpwq", x).reshape(x.shape[0], c, h * p, w * p)

    def embed(self, x, t, y):
        """Tokens h (B, T, D) and the conditioning c = t_emb + y_emb (B, D)."""
        h = self.x_embedder(x) + self.pos_embed
        return h, self.t_embedder(t) + self.y_embedder(y, self.training)

    def head(self, h, c):
        return self.unpatchify(self.final_layer(h, c))

    def forward(self, x, t, y, return_features=False):
        h, c = self.embed(x, t, y)
        feats = []
        for block in self.blocks:
            h = block(h, c)
            feats.append(h)
        out = self.head(h, c)
        return (out, feats) if return_features else out


def param_count(model):
    """Parameters of a model, the fixed sin-cos pos_embed excluded (one definition for every table)."""
    return sum(p.numel() for n, p in model.named_parameters() if not n.endswith("pos_embed"))


def block_map(n_student, n_teacher, how="uniform"):
    """The block links [(i, m(i))] of a shallower model to a deeper one [inferred]: student layer i learns
    teacher layer m(i), 1-indexed (layer 0 = the embedding). uniform m(i) = round_half_up(i * L_T / L_S),
    the last block of each of L_S equal groups (distillation, TinyFusion's Masked KD); first m(i) = i."""
    if how == "uniform":
        return [(i, (2 * i * n_teacher + n_student) // (2 * n_student)) for i in range(1, n_student + 1)]
    return [(i, i) for i in range(1, min(n_student, n_teacher) + 1)]  # first


SAMPLER_ATTRS = ("num_classes", "in_channels", "input_size", "has_null", "learn_sigma", "out_channels")


def samples_like(wrapper, model):
    """Give a wrapper module (pruned, cached, dynamic, timed, ...) the attributes the sampler reads from
    the DiT it wraps, so that sample / generate / fid.evaluate treat it as a DiT."""
    for a in SAMPLER_ATTRS:
        if hasattr(model, a):
            setattr(wrapper, a, getattr(model, a))
    wrapper.one_step = getattr(model, "one_step", False)
    return wrapper

# --- Gaussian diffusion (DDPM, Ho et al. 2020; learned range variance, Nichol & Dhariwal 2021) ----

def space_timesteps(num_steps, k):
    """The kept timesteps of a K-step sampler: the official IDDPM / DiT `space_timesteps(T, "K")`: a
    fractional stride (T - 1) / (K - 1) accumulated by repeated addition and rounded (Python round)."""
    if not 1 <= k <= num_steps:
        sys.exit(f"error: sampling steps must be in 1..{num_steps}, not {k}")
    stride, cur, kept = (num_steps - 1) / (k - 1) if k > 1 else 1, 0.0, set()
    for _ in range(k):
        kept.add(round(cur))
        cur += stride
    return kept


def normal_kl(mean1, logvar1, mean2, logvar2):
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, in nats (IDDPM / ADM normal_kl):
    1/2 (-1 + logvar2 - logvar1 + e^(logvar1 - logvar2) + (mean1 - mean2)^2 e^-logvar2)."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2)
                  + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


class Diffusion:
    """The 1000-step linear-beta process (1e-4 .. 0.02), or a respaced subset of its steps.
    Indices i = 0..K-1 address this process; timestep_map[i] is the original t the model sees."""
    def __init__(self, num_steps=1000, use_timesteps=None):
        betas = np.linspace(1e-4 * 1000 / num_steps, 0.02 * 1000 / num_steps, num_steps, dtype=np.float64)
        ac = np.cumprod(1.0 - betas)
        self.timestep_map = np.arange(num_steps)
        if use_timesteps is not None:  # respacing: keep alpha_bar at the kept steps, recompute betas
            self.timestep_map = np.array(sorted(use_timesteps))
            ac = ac[self.timestep_map]
            betas = 1.0 - ac / np.append(1.0, ac[:-1])
        self.num_steps = len(betas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # all as float64 numpy; gathered per batch by _at()
        self.betas, self.ac, self.ac_prev, self.post_var = betas, ac, ac_prev, post_var
        first = post_var[1] if len(post_var) > 1 else betas[0]
        self.post_logvar_clipped = np.log(np.append(first, post_var[1:]))
        self.post_coef1 = betas * np.sqrt(ac_prev) / (1.0 - ac)
        self.post_coef2 = (1.0 - ac_prev) * np.sqrt(1.0 - betas) / (1.0 - ac)

    def respace(self, k):
        """K steps of the original process, as the official space_timesteps (IDDPM Sec. 4)."""
        return Diffusion(self.num_steps, space_timesteps(self.num_steps, k))

    def model_t(self, i):
        """Original timestep the model is conditioned on, for process index tensor i."""
        return torch.as_tensor(self.timestep_map, device=i.device)[i]

    @staticmethod
    def _at(arr, i, x):
        """arr[i] as a float32 tensor broadcastable to x: (B, 1, 1, 1)."""
        v = torch.as_tensor(arr, dtype=torch.float32, device=x.device)[i]
        return v.view(-1, *([1] * (x.dim() - 1)))

    def q_sample(self, x0, i, noise):
        """x_i = sqrt(abar_i) x0 + sqrt(1 - abar_i) eps (DDPM Eq. 4)."""
        return self._at(np.sqrt(self.ac), i, x0) * x0 + self._at(np.sqrt(1 - self.ac), i, x0) * noise

    def q_posterior(self, x0, xt, i):
        """Mean and clipped log-variance of q(x_{i-1} | x_i, x0) (DDPM Eq. 6-7)."""
        mean = self._at(self.post_coef1, i, xt) * x0 + self._at(self.post_coef2, i, xt) * xt
        return mean, self._at(self.post_logvar_clipped, i, xt)

    def predict_x0(self, xt, i, eps):
        return self._at(np.sqrt(1 / self.ac), i, xt) * xt - self._at(np.sqrt(1 / self.ac - 1), i, xt) * eps

    def p_mean_variance(self, out, xt, i, clip=False):
        """p(x_{i-1} | x_i) from the model output: eps -> x0 -> posterior mean; variance from the
        learned interpolation v in [-1, 1] (IDDPM Eq. 15), or the fixed-large beta when not learned.
        clip: clamp x0 to [-1, 1] and recompute eps from it (pixel-space DDPM/IDDPM do; DiT does not)."""
        C = xt.shape[1]
        eps = out[:, :C]
        if out.shape[1] == 2 * C:
            frac = (out[:, C:] + 1) / 2
            # log sigma^2 = frac * log beta + (1 - frac) * log beta_tilde
            logvar = (frac * self._at(np.log(self.betas), i, xt)
                      + (1 - frac) * self._at(self.post_logvar_clipped, i, xt))
        else:
            first = self.betas[0] if self.num_steps == 1 else self.post_var[1]
            logvar = self._at(np.log(np.append(first, self.betas[1:])), i, xt).expand_as(xt)
        x0 = self.predict_x0(xt, i, eps)
        if clip:
            x0 = x0.clamp(-1, 1)
            # eps = (x_t / sqrt(abar) - x0) / sqrt(1 / abar - 1)
            eps = (self._at(np.sqrt(1 / self.ac), i, xt) * xt - x0) / self._at(np.sqrt(1 / self.ac - 1),
                                                                              i, xt)
        mean, _ = self.q_posterior(x0, xt, i)
        return mean, logvar, x0, eps

    def loss(self, model, x0, y, i=None, noise=None):
        """DiT training loss, Sec. 3.1 / 4: ||eps - eps_hat||^2 averaged over dims, plus (learn_sigma) the
        bound L_vb in bits/dim with eps_hat detached (IDDPM Eq. 16, L_hybrid). lambda = 1 here and 0.001 in
        the paper: both right, as the paper's L_vb sums 1000 timestep terms and this is one sampled term (the
        official code's choice). Returns a dict of per-batch means; also 'out', 'xt', 'i', 'noise'."""
        if i is None:
            i = torch.randint(0, self.num_steps, (x0.shape[0],), device=x0.device)
        noise = torch.randn_like(x0) if noise is None else noise
        xt = self.q_sample(x0, i, noise)
        out = model(xt, self.model_t(i), y)
        return self.loss_from_output(out, x0, xt, i, noise)

    def loss_from_output(self, out, x0, xt, i, noise):
        C = x0.shape[1]
        mse = ((out[:, :C] - noise) ** 2).mean(dim=(1, 2, 3))
        vb = torch.zeros_like(mse)
        if out.shape[1] == 2 * C:
            frozen = torch.cat([out[:, :C].detach(), out[:, C:]], dim=1)
            vb = self.vb_terms(frozen, x0, xt, i)
        loss = mse + vb
        return dict(loss=loss.mean(), mse=mse.mean(), vb=vb.mean(), out=out, xt=xt, i=i, noise=noise)

    def vb_terms(self, out, x0, xt, i):
        """The L_vb term of L_hybrid (IDDPM Sec. 2 and 3.1), per sample, in bits/dim:
            L_{i-1} = KL(q(x_{i-1} | x_i, x0) || p(x_{i-1} | x_i))   for i > 0
            L_0     = -log p(x0 | x1)  (the discretised Gaussian decoder)  for i = 0"""
        # assignment 3 begin: the IDDPM hybrid loss's L_vb term
        true_mean, true_logvar = self.q_posterior(x0, xt, i)
        mean, logvar, _, _ = self.p_mean_variance(out, xt, i)
        kl = normal_kl(true_mean, true_logvar, mean, logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        nll = -discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2.0)
        return torch.where(i == 0, nll, kl)
        # assignment 3 end


def discretized_gaussian_loglik(x, means, log_scales):
    """log-likelihood of 8-bit data x in [-1, 1] under a Gaussian discretised to bins of width 2/255."""
    def cdf(v):  # standard normal CDF, tanh approximation (as ADM)
        return 0.5 * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))
    centered, inv_std = x - means, torch.exp(-log_scales)
    cdf_plus, cdf_min = cdf(inv_std * (centered + 1 / 255)), cdf(inv_std * (centered - 1 / 255))
    log_cdf_plus = torch.log(cdf_plus.clamp(min=1e-12))
    log_one_minus_cdf_min = torch.log((1 - cdf_min).clamp(min=1e-12))
    log_delta = torch.log((cdf_plus - cdf_min).clamp(min=1e-12))
    return torch.where(x < -0.999, log_cdf_plus, torch.where(x > 0.999, log_one_minus_cdf_min, log_delta))

# --- The reverse process: DDPM / DDIM with classifier-free guidance -------------------------------

def sample(model, z, y, steps=50, method="ddim", eta=0.0, cfg_scale=1.0, generator=None, clip=True):
    """Run the reverse process from noise z (B, C, H, W) with labels y. Gradients flow if the caller
    enables them (DiP-GO backpropagates through it). generator drives the DDPM / eta > 0 noise. clip:
    clamp the predicted x0 to [-1, 1] at every step, as pixel-space DDPM (Ho et al. Sec. 3.3) does;
    without it eps errors at high noise are amplified by up to 1/sqrt(abar) ~ 158. A model trained
    without label dropout has no null class: it samples without guidance (cfg_scale is ignored)."""
    if method not in ("ddim", "ddpm"):
        sys.exit(f"error: --method must be ddim or ddpm, not {method!r}")
    if cfg_scale != 1.0 and not getattr(model, "has_null", True):
        cfg_scale = 1.0
    diffusion, x, B = Diffusion().respace(steps), z, z.shape[0]
    for i in reversed(range(steps)):
        idx = torch.full((B,), i, device=z.device, dtype=torch.long)
        t = diffusion.model_t(idx)
        out = forward_with_cfg(model, x, t, y, cfg_scale) if cfg_scale != 1.0 else model(x, t, y)
        # ours: x0 clipped to [-1, 1], pixel space (DiT samples latents, unclipped)
        mean, logvar, x0, eps = diffusion.p_mean_variance(out.float(), x, idx, clip)
        noise = 0
        if (method == "ddpm" or eta > 0) and i > 0:
            noise = torch.randn(x.shape, generator=generator).to(x.device)
        if method == "ddpm":
            # x_{i-1} = mu(x_i, x0_hat) + sigma_i * n   (DDPM Algorithm 2, sigma learned or fixed)
            x = mean + torch.exp(0.5 * logvar) * noise if i > 0 else mean
        else:
            x = ddim_step(x0, eps, diffusion.ac[i], diffusion.ac_prev[i], eta, noise)
    return x


def ddim_step(x0, eps, ab, ab_prev, eta=0.0, noise=0):
    """One DDIM update, Song et al. 2021 Eq. 12 with sigma of Eq. 16: from x_t (given as its predicted x0 and
    eps; ab = alpha-bar at t) to x_{t_prev} (ab_prev). eta = 0: deterministic; eta = 1: DDPM's variance."""
    # assignment 2 begin: the DDIM step
    # sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)      (DDIM Eq. 16)
    sigma = eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5
    # x_prev = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma n   (DDIM Eq. 12)
    return ab_prev ** 0.5 * x0 + (1 - ab_prev - sigma ** 2) ** 0.5 * eps + sigma * noise
    # assignment 2 end


def run_sampler(model, z, y, steps=50, cfg_scale=1.0, method="ddim", eta=0.0, generator=None):
    """One batch of images from noise z: one call for a one-step model (model.one_step), else sample()."""
    if getattr(model, "one_step", False):
        return model(z, y)
    return sample(model, z, y, steps, method, eta, cfg_scale, generator)


# A CPU generator keeps only the low 32 bits of its seed. Evaluation owns the seeds with bit 31 set, every
# training stream the others, so no model is scored on noise it trained on, whatever the seeds say [ours].
EVAL_BIT = 2 ** 31


def seed_of(seed, stream="train"):
    """The generator seed of `seed` in one stream: "eval" (scores, grids, PSNR references, sampler FLOPs) or
    "train" (data order, flips, diffusion noise, pairs, pruner, calibration): disjoint 32-bit ranges."""
    return seed % EVAL_BIT + (EVAL_BIT if stream == "eval" else 0)


def rng(seed, stream="train"):
    """A CPU torch.Generator seeded with seed_of(seed, stream)."""
    return torch.Generator().manual_seed(seed_of(seed, stream))


@torch.no_grad()
def generate(model, labels, seed=0, steps=50, method="ddim", eta=0.0, cfg_scale=4.0, batch_size=64,
             dtype="float32", progress=False, stream="eval"):
    """uint8 images (N, 3, H, W) for `labels`. The initial noise comes from rng(seed, stream) on the CPU
    for the whole set at once, so any two models given the same seed start from the same noise, whatever
    the batch size or device. stream "eval" (scores, grids) is never drawn by training."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    C, S = model.in_channels, model.input_size
    z_all = torch.randn(len(labels), C, S, S, generator=rng(seed, stream))
    out = []
    for k in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="sampling"):
        z, y = z_all[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        g = rng(seed + 1 + k, stream)
        with autocast(device, dtype):
            x = run_sampler(model, z, y, steps, cfg_scale, method, eta, g)
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out)


def save_rows(models, path, seed=0, steps=25, cfg_scale=4.0):
    """One PNG, one row per model (in order), one image per class (up to 10), all from the same noise.
    models: {name: model} or a list; steps: one number or one per model (a DiP-GO plan runs its own K)."""
    names = list(models) if isinstance(models, dict) else [getattr(m, "name", "") for m in models]
    models = list(models.values()) if isinstance(models, dict) else list(models)
    steps = steps if isinstance(steps, (list, tuple)) else [steps] * len(models)
    labels = torch.arange(min(models[0].num_classes, 10))
    imgs = [generate(m, labels, seed, k, cfg_scale=cfg_scale) for m, k in zip(models, steps)]
    save_grid(torch.cat(imgs), path, nrow=len(labels), row_labels=names)

# --- Training loop (shared by every script: pass your own loss_fn) --------------------------------

def lr_factor(step, cfg):
    """lr multiplier at `step`: linear warm-up to 1, then constant (lr_end = 1, DiT) or a cosine to lr_end."""
    if step < cfg.warmup or cfg.lr_end == 1.0:
        return min(1.0, (step + 1) / max(cfg.warmup, 1))
    progress = (step - cfg.warmup) / max(cfg.steps - cfg.warmup, 1)
    return cfg.lr_end + (1.0 - cfg.lr_end) * 0.5 * (1.0 + math.cos(math.pi * progress))


@torch.no_grad()
def ema_update(ema, model, step, cfg):
    """EMA of the weights, DiT Sec. 4: e <- d e + (1 - d) p, the decay d constant (paper, --ema-warmup 0) or
    min(d, (1+n)/(10+n)) at step n while young (ours)."""
    decay = min(cfg.ema_decay, (1 + step) / (10 + step)) if cfg.ema_warmup else cfg.ema_decay
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train(model, loss_fn, data, cfg, meta, param_groups=None, quiet=False, find_unused=False, sharded=False,
          on_step=None):
    """The one training loop (DiT Sec. 4: AdamW, constant lr after an optional warm-up, EMA of the weights).
    loss_fn(model, xb, yb, step) -> dict with 'loss' (a scalar tensor) and other scalar terms to log; `step`
    (0-based) lets a schedule resume exactly. `data` = (images uint8, labels); `meta` = the checkpoint's
    'kind' and 'config' (+ anything else to save). Everything else (DDP, resume, autocast and GradScaler,
    logs, checkpoints, signals) lives in `Session`, below the plumbing line. sharded: each rank holds only
    its part of the data. on_step(step, ema) -> dict or None: an evaluation between steps (a quality curve),
    kept in meta["evals"], not counted as training time. Re-running with the same cfg.out resumes exactly.
    Returns (model, ema, ckpt)."""
    s = Session(model, data, cfg, meta, param_groups, quiet, find_unused, sharded)
    cfg, opt, ema = s.cfg, s.opt, s.ema
    if s.finished:  # a finished checkpoint with the same settings: nothing to train
        return model.eval(), ema, s.ck
    model.train()
    with s:  # closes the progress bar and restores the signal handlers however the loop ends
        while s.step < cfg.steps:
            xb, yb = (v.to(s.device) for v in next(s.it))
            for g in opt.param_groups:  # linear warm-up, then constant (the paper's schedule) or cosine
                g["lr"] = g["base_lr"] * lr_factor(s.step, cfg)
            with autocast(s.device, cfg.dtype):
                terms = loss_fn(s.net, xb, yb, s.step)
            values = scalars(terms, s)  # the step's one host sync; stops on a non-finite loss
            opt.zero_grad(set_to_none=True)
            s.scaler.scale(terms["loss"]).backward()
            norm = 0.0
            if cfg.grad_clip > 0 or cfg.grad_skip > 0:
                s.scaler.unscale_(opt)
                norm = nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip or math.inf)
            if cfg.grad_skip > 0 and norm > cfg.grad_skip:  # DyDiT's code drops such a step
                s.log.note(f"step {s.step + 1}: grad norm {float(norm):.1f} > {cfg.grad_skip}: skipped")
            else:
                s.scaler.step(opt)
            s.scaler.update()
            ema_update(ema, model, s.step, cfg)
            if on_step:
                s.evaluate(on_step)
            s.end_step(values)  # step += 1, log line, checkpoint, signals
    return model.eval(), ema, s.finish()


# ==================================================================================================
# plumbing: nothing paper-specific below (config, flags, data, checkpoints, devices and DDP, the
# training session, tables)
# ==================================================================================================

# --- Config ---------------------------------------------------------------------------------------

# Model sizes. `cpu` is calibrated for ~4 minutes of training on 2 CPU cores; `cifar` is DiT-S/2 on
# 32x32 pixels (256 tokens, ~6 GFLOPs/forward as DiT-S/2 on ImageNet-256 latents); `imagenet64` is DiT-B/4.
PRESETS = {
    "tiny": dict(input_size=16, patch_size=4, hidden_size=64, depth=4, num_heads=2),
    "cpu": dict(input_size=32, patch_size=4, hidden_size=128, depth=6, num_heads=4),
    "cifar": dict(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6),
    "imagenet64": dict(input_size=64, patch_size=4, hidden_size=768, depth=12, num_heads=12),
}
# Training defaults per preset: the paper's (DiT Sec. 4) for the GPU presets, ours for tiny / cpu.
PRESET_TRAIN = {
    "tiny": dict(steps=200, batch_size=32, lr=1e-3, warmup=20, ema_decay=0.99, ema_warmup=1),
    "cpu": dict(steps=1600, batch_size=16, lr=2e-3, warmup=50, ema_decay=0.999, ema_warmup=1),
    "cifar": dict(steps=400_000, batch_size=256, lr=1e-4, warmup=0, ema_decay=0.9999, ema_warmup=0),
    "imagenet64": dict(steps=400_000, batch_size=256, lr=1e-4, warmup=0, ema_decay=0.9999, ema_warmup=0),
}


@dataclass
class TrainConfig:
    preset: str = "cpu"          # model size: tiny | cpu | cifar | imagenet64 (see PRESETS)
    data: str = "shapes"         # shapes (embedded, offline) | cifar10 | imagenet64
    data_dir: str = "data"       # where cifar10 / imagenet64 files live (or are downloaded to)
    image_size: int = 0          # >=0: 0 = the preset's input_size; images are resized to this
    out: str = "out/dit.pt"      # checkpoint path; re-running with the same --out resumes
    steps: int = 0               # >=0: optimizer steps; 0 = the preset's default
    batch_size: int = 0          # >=0: global batch; 0 = the preset's default
    lr: float = 0.0              # >=0: AdamW learning rate; 0 = the preset's default (paper: 1e-4)
    warmup: int = -1             # >=-1: linear lr warm-up steps; -1 = the preset's default (paper: 0)
    lr_end: float = 1.0          # [0,1]: after the warm-up, cosine-anneal lr to lr * lr_end; 1 = constant
    weight_decay: float = 0.0    # >=0: AdamW weight decay (paper: 0)
    grad_clip: float = 0.0       # >=0: clip the grad norm to this; 0 = off (paper: off)
    grad_skip: float = 0.0       # >=0: skip the optimizer step when the grad norm exceeds this; 0 = off
    ema_decay: float = 0.0       # [0,1): EMA decay; 0 = the preset's default (paper: 0.9999)
    ema_warmup: int = -1         # [-1,1]: 1 = min(d, (1+n)/(10+n)) [ours]; 0 = constant (paper); -1 = preset
    learn_sigma: bool = True     # predict the variance too (DiT default) and add the L_vb term
    class_dropout: float = 0.1   # [0,1): label dropout for classifier-free guidance (paper: 0.1; 0 = no CFG)
    log_every: int = 50          # >=1: one log line (and one JSON line) every N steps
    ckpt_every: int = 500        # >=1: atomic checkpoint every N steps (also at the end and on SIGINT/TERM)
    seed: int = 0                # >=0: seeds model init, data order, noise and timesteps
    device: str = "auto"         # auto | cpu | cuda | mps
    dtype: str = "float32"       # float32 | bfloat16 | float16 (autocast; float16 adds a GradScaler)
    compile: bool = False        # torch.compile the model
    ship: str = ""               # after training, also write the EMA weights alone, in float16, to this path


def resolve(cfg):
    """Fill the 0/-1 "use the preset's default" fields of a TrainConfig in place."""
    if cfg.preset not in PRESETS:
        sys.exit(f"error: unknown --preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    for k, v in PRESET_TRAIN[cfg.preset].items():  # 0 (or -1 where 0 is a value) = the preset's default
        if getattr(cfg, k) == (-1 if k in ("warmup", "ema_warmup") else 0):
            setattr(cfg, k, v)
    if cfg.image_size == 0:
        cfg.image_size = PRESETS[cfg.preset]["input_size"]
    return check(check_ranges(cfg), dict(data=("shapes", "cifar10", "imagenet64"), dtype=DTYPES))


DTYPES = ("float32", "bfloat16", "float16")


def method_preset(cfg, teacher_ckpt, paper):
    """A method script's preset: cfg.preset, or "" = the base's (its train_config; cpu if it does not say).
    On the GPU presets (cifar, imagenet64) every field of `paper` still at its CPU default takes the paper's
    value (constant EMA, lr 1e-4 as DiT Sec. 4 ...); the CPU presets keep ours. The EMA warm-up follows the
    preset in train() (resolve)."""
    if not cfg.preset:
        cfg.preset = (teacher_ckpt.get("train_config") or {}).get("preset", "cpu")
    if cfg.preset not in PRESETS:
        sys.exit(f"error: unknown --preset {cfg.preset!r}; choose from {', '.join(PRESETS)}")
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    for k, v in paper.items():
        if cfg.preset in ("cifar", "imagenet64") and getattr(cfg, k) == defaults[k]:
            setattr(cfg, k, v)
    return cfg


def check(cfg, choices=None):
    """One error line (and exit) for a flag outside its choices."""
    for k, allowed in (choices or {}).items():
        if getattr(cfg, k) not in allowed:
            sys.exit(f"error: --{k.replace('_', '-')} must be one of {', '.join(map(str, allowed))}, "
                     f"not {getattr(cfg, k)!r}")
    return cfg


# A numeric field's valid range opens its comment, before a colon: ">=1:", ">0:", "(0,1]:", "(-inf,inf):"
RANGE = re.compile(r"^\s+(\w+)\s*:[^#\n]*#\s*(>=?-?[\d.e]+|[\[(]-?[\w.]+,-?[\w.]+[\])]):", re.M)


def in_range(value, text):
    """Is a finite number inside the declared range `text` (">=1", ">0", "(0,1]", "[0,1)", ...)?"""
    if not math.isfinite(value):
        return False
    if text[0] == ">":
        return value >= float(text[2:]) if text[1] == "=" else value > float(text[1:])
    lo, hi = (float(v) for v in text[1:-1].split(","))
    above = lo < value if text[0] == "(" else lo <= value
    return above and (value < hi if text[-1] == ")" else value <= hi)


@functools.lru_cache
def config_source(config_cls):
    """The source of a config class, whose comments are its flags' help and ranges (read once: it is slow)."""
    return inspect.getsource(config_cls)


def declared_ranges(config_cls):
    """{field: range text} of a config class's numeric fields."""
    return dict(RANGE.findall(config_source(config_cls)))


def check_range(config_cls, name, value, flag=None):
    """One error line (and exit) when `value` of field `name` lies outside the range its comment declares."""
    text = declared_ranges(config_cls).get(name)
    if text is not None and not in_range(value, text):
        said = re.sub(r"^(>=?)", r"\1 ", text) if text[0] == ">" else "in " + text.replace(",", ", ")
        sys.exit(f"error: {flag or '--' + name.replace('_', '-')} must be {said}, not {value}")
    return value


def check_ranges(cfg):
    """Every numeric field of a config against its declared range (parse_args calls this before any work)."""
    for name in declared_ranges(type(cfg)):
        check_range(type(cfg), name, getattr(cfg, name))
    return cfg


def number_list(text, config_cls, name, flag, kind=float):
    """A list flag's comma list ("0.3,0.5"), each number inside field `name`'s range; else one error line."""
    try:
        values = [kind(v) for v in text.split(",")]
    except ValueError:
        sys.exit(f"error: {flag} takes a comma list of numbers, not {text!r}")
    return [check_range(config_cls, name, v, flag) for v in values]


# what a --curve run adds to a stage's key: its scores are kept in the checkpoint
CURVE_KEYS = ("curve", "eval_n", "eval_steps", "cfg_scale")


def curve_steps(text, last, what="steps"):
    """--curve's "300,600,2400" -> {300, 600, 2400} ("" -> none); one error line unless each is in 1..last."""
    if text and not all(p.isdigit() and 0 < int(p) <= last for p in text.split(",")):
        sys.exit(f"error: --curve takes {what} in 1..{last}, e.g. {last // 2},{last}")
    return {int(p) for p in text.split(",")} if text else set()


def given_flags(argv=None):
    """Fields whose flags are on the command line (argv; None: sys.argv[1:]): --lam-ramp -> lam_ramp."""
    return {a[2:].split("=")[0].replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
            if a.startswith("--")}


class OneLineParser(argparse.ArgumentParser):
    def error(self, message):  # one line instead of the whole usage block
        sys.stderr.write(f"error: {message}; see --help\n")
        sys.exit(2)


def parse_args(config_cls, argv=None, paths=False):
    """Turn a @dataclass into argparse flags (--batch-size 64, --compile / --no-compile); the help of a
    flag is its field's trailing comment, which opens with the range of a numeric one (check_ranges). Unknown
    flags or a number outside its range: one error line. paths=True also takes positional paths anywhere on
    the line and returns (config, paths)."""
    p = OneLineParser(description=sys.modules["__main__"].__doc__,
                      formatter_class=argparse.RawDescriptionHelpFormatter)
    helps = dict(re.findall(r"^\s+(\w+)\s*:[^#\n]*#\s*(.*)$", config_source(config_cls), re.M))
    for f in dataclasses.fields(config_cls):
        flag, h = "--" + f.name.replace("_", "-"), helps.get(f.name, "") + f" (default: {f.default})"
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default, help=h)
        else:
            typ = {"int": int, "float": float, "str": str}.get(f.type, f.type)
            p.add_argument(flag, type=typ, default=f.default, help=h)
    if not paths:
        return check_ranges(config_cls(**vars(p.parse_args(argv))))
    p.add_argument("paths", nargs="*", help="input paths")
    args = vars(p.parse_intermixed_args(argv))
    found = args.pop("paths")
    return check_ranges(config_cls(**args)), found

# --- Data: uint8 (N, 3, H, W) images + int64 labels, held in memory -------------------------------

CIFAR_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR_MD5 = "c58f30108f718f92721af3b95e74349a"
SHAPE_NAMES = ["disk", "square", "triangle", "cross", "ring", "diamond", "hbars", "vbars", "checker", "x"]
CIFAR_NAMES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
CLASS_NAMES = dict(shapes=SHAPE_NAMES, cifar10=CIFAR_NAMES)  # grid row labels


@functools.lru_cache(maxsize=2)
def make_shapes(n_per_class=1000, size=32, seed=0):
    """The embedded data set: 10 classes of anti-aliased shapes (disk, square, triangle, ...), each class
    with its own hue band, random position/size/background. Deterministic, numpy only, ~1 s."""
    rng = np.random.default_rng(seed)
    n = n_per_class * 10
    y = np.repeat(np.arange(10), n_per_class)
    ss = 2 * size  # supersample 2x then average -> anti-aliasing
    v, u = np.meshgrid(*[np.linspace(-1, 1, ss, dtype=np.float32)] * 2, indexing="ij")  # (ss, ss)
    cx, cy = rng.uniform(-0.25, 0.25, (2, n, 1, 1)).astype(np.float32)
    r = rng.uniform(0.45, 0.7, (n, 1, 1)).astype(np.float32)
    masks = [  # class k -> inside(X, Y) in shape-local coordinates
        lambda X, Y, ax, ay: X ** 2 + Y ** 2 < 1,
        lambda X, Y, ax, ay: np.maximum(ax, ay) < 0.8,
        lambda X, Y, ax, ay: (Y < 0.7) & (Y > 1.7 * ax - 1.0),
        lambda X, Y, ax, ay: (np.minimum(ax, ay) < 0.28) & (np.maximum(ax, ay) < 1),
        lambda X, Y, ax, ay: (X ** 2 + Y ** 2 < 1) & (X ** 2 + Y ** 2 > 0.45),
        lambda X, Y, ax, ay: ax + ay < 1,
        lambda X, Y, ax, ay: (np.maximum(ax, ay) < 0.9) & (np.cos(Y * 2.5 * np.pi) > 0),
        lambda X, Y, ax, ay: (np.maximum(ax, ay) < 0.9) & (np.cos(X * 2.5 * np.pi) > 0),
        lambda X, Y, ax, ay: (np.maximum(ax, ay) < 0.9) & (np.cos(X * 2 * np.pi) * np.cos(Y * 2 * np.pi) > 0),
        lambda X, Y, ax, ay: (np.abs(ax - ay) < 0.3) & (np.maximum(ax, ay) < 1),
    ]
    m = np.zeros((n, ss, ss), dtype=np.float32)
    for k in range(10):
        s = y == k
        X, Y = (u[None] - cx[s]) / r[s], (v[None] - cy[s]) / r[s]  # (n_k, ss, ss)
        m[s] = masks[k](X, Y, np.abs(X), np.abs(Y))
    m = m.reshape(n, size, 2, size, 2).mean(axis=(2, 4))[:, None]  # (n, 1, size, size)
    hue = (y / 10 + rng.uniform(-0.03, 0.03, n)) * 2 * np.pi
    fg = 0.6 + 0.4 * np.stack([np.cos(hue), np.cos(hue - 2.094), np.cos(hue + 2.094)], 1)  # (n, 3)
    bg = rng.uniform(0.0, 0.35, (n, 3)).astype(np.float32)
    img = m * fg[:, :, None, None] + (1 - m) * bg[:, :, None, None]
    img += rng.normal(0, 0.02, img.shape).astype(np.float32)
    return torch.from_numpy((np.clip(img, 0, 1) * 255).round().astype(np.uint8)), torch.from_numpy(y)


def download(url, path, digest=None):
    """Download url to path with a tqdm bar; digest = (hash name, hex) is checked while streaming and a
    mismatch keeps nothing. Returns the path, or exits with one line when offline."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    h = hashlib.new(digest[0] if digest else "md5")
    try:
        with urllib.request.urlopen(url, timeout=30) as r, open(path + ".part", "wb") as f:
            bar = tqdm(total=int(r.headers.get("content-length", 0)), unit="B", unit_scale=True,
                       desc=os.path.basename(path))
            while chunk := r.read(1 << 20):
                f.write(chunk)
                h.update(chunk)
                bar.update(len(chunk))
    except OSError as e:
        sys.exit(f"error: could not download {url} ({e}). Offline? Put the file at {path}")
    if digest and h.hexdigest() != digest[1]:
        os.remove(path + ".part")
        sys.exit(f"error: {digest[0]} mismatch for {url}; the download is corrupt, try again")
    os.replace(path + ".part", path)
    return path


def load_cifar10(data_dir, train=True):
    """CIFAR-10 from `cifar-10-batches-py/` (any number of rows per batch) or the official tarball in
    data_dir; downloads the tarball when neither is there."""
    names = [f"data_batch_{k}" for k in range(1, 6)] if train else ["test_batch"]
    folder = os.path.join(data_dir, "cifar-10-batches-py")
    tar_path = os.path.join(data_dir, "cifar-10-python.tar.gz")
    check_data_dir(data_dir)
    if not os.path.isdir(folder):
        if not os.path.exists(tar_path):
            download(CIFAR_URL, tar_path, ("md5", CIFAR_MD5))
        try:
            with tarfile.open(tar_path) as tar:
                tar.extractall(data_dir, filter="data")
        except (tarfile.TarError, OSError) as e:
            sys.exit(f"error: {tar_path} is not a readable CIFAR-10 tarball ({e}); delete it and retry")
    xs, ys = [], []
    for name in names:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            sys.exit(f"error: {path} is missing; {folder} is not a complete cifar-10-batches-py folder")
        try:
            with open(path, "rb") as f:
                d = pickle.load(f, encoding="bytes")
            x, y = np.asarray(d[b"data"]), np.asarray(d[b"labels"], dtype=np.int64)
        except Exception as e:  # not a pickle, not a dict, or without the keys
            sys.exit(f"error: {path} is not a CIFAR-10 batch (a pickled dict with b'data' and b'labels'; "
                     f"{type(e).__name__}: {str(e)[:80]})")
        xs.append(check_flat_images(x, y, path, 32, 10))
        ys.append(y)
    return torch.from_numpy(np.concatenate(xs)), torch.from_numpy(np.concatenate(ys))


def check_data_dir(data_dir):
    """One error line when --data-dir names something that is not a folder."""
    if os.path.exists(data_dir) and not os.path.isdir(data_dir):
        sys.exit(f"error: --data-dir {data_dir} is a file, not a folder")


def check_flat_images(x, y, path, size, num_classes, first=0):
    """uint8 (N, 3 * size * size) rows + N labels in 0..num_classes-1 -> uint8 (N, 3, size, size); else one
    error line naming the file and what is wrong (its labels count from `first`)."""
    if x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * size * size:
        sys.exit(f"error: {path}: images must be uint8 rows of 3 x {size} x {size} values, "
                 f"not {x.dtype} {x.shape}")
    if y.shape != (len(x),) or (len(y) and not 0 <= y.min() <= y.max() < num_classes):
        sys.exit(f"error: {path}: needs one label in {first}..{num_classes - 1 + first} per image "
                 f"({len(x)} images, labels of shape {y.shape})")
    return x.reshape(-1, 3, size, size)


def load_imagenet64(data_dir, train=True, rank=0, world=1):
    """Downsampled ImageNet 64x64 (Chrabaszcz et al. 2017): npz files with `data` uint8 (N, 12288),
    channel-major, and `labels` 1..1000. One uint8 tensor is preallocated from the label counts and
    filled file by file, so the peak is the data set plus one file (not twice the data set); under
    torchrun each rank reads only its files (rank, rank + world, ...)."""
    prefix = "train_data_batch_" if train else "val_data"
    check_data_dir(data_dir)
    files = sorted(f for f in os.listdir(data_dir) if f.startswith(prefix) and f.endswith(".npz")) \
        if os.path.isdir(data_dir) else []
    if not files:
        sys.exit(f"error: no {prefix}*.npz in {data_dir}; get Imagenet64_train_npz from image-net.org "
                 "(downsampled variants) and unpack it there")
    files = [os.path.join(data_dir, f) for f in files[rank::world]]
    ys = [npz_arrays(f, ("labels",))["labels"].astype(np.int64) - 1 for f in files]
    x, k = torch.empty(sum(len(y) for y in ys), 3, 64, 64, dtype=torch.uint8), 0
    for f, y in zip(files, ys):  # one file's array alive at a time
        rows = check_flat_images(npz_arrays(f, ("data",))["data"], y, f, 64, 1000, first=1)
        x[k:k + len(y)] = torch.from_numpy(rows)
        del rows
        k += len(y)
    return x, torch.from_numpy(np.concatenate(ys))


def npz_arrays(path, keys, optional=()):
    """{key: array} of an .npz file's `keys` and of those `optional` ones it has (only these are read); one
    error line when it is unreadable or lacks one of `keys`."""
    try:
        with np.load(path) as d:
            missing = [k for k in keys if k not in d.files]
            if missing:
                sys.exit(f"error: {path} has no {', '.join(map(repr, missing))} array (it has {d.files})")
            return {k: d[k] for k in list(keys) + [k for k in optional if k in d.files]}
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        sys.exit(f"error: {path} is not a readable .npz file ({type(e).__name__}: {str(e)[:80]})")


def load_data(name="shapes", data_dir="data", image_size=32, train=True, shard=(0, 1)):
    """(images uint8 (N, 3, S, S), labels int64 (N,), num_classes). Resized (area) to image_size.
    shard = (rank, world): imagenet64 loads only that rank's files; the small sets load whole."""
    if name == "shapes":
        x, y = make_shapes(seed=0 if train else 1, n_per_class=1000 if train else 200)
    elif name == "cifar10":
        x, y = load_cifar10(data_dir, train)
    elif name == "imagenet64":
        x, y = load_imagenet64(data_dir, train, *shard)
    else:
        sys.exit(f"error: unknown --data {name!r}; choose shapes, cifar10 or imagenet64")
    if x.shape[-1] != image_size:
        x = F.interpolate(x.float(), size=image_size, mode="area").round().clamp(0, 255).to(torch.uint8)
    return x, y, 1000 if name == "imagenet64" else 10


def to_float(x):
    """uint8 [0, 255] -> float [-1, 1]"""
    return x.float() / 127.5 - 1


def to_uint8(x):
    """float [-1, 1] -> uint8 [0, 255]"""
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# Seeds of derived random streams [ours]: seed * STRIDE + index gives every (seed, index < STRIDE) its own
# generator seed (epochs of the data order, pruner steps); FLIP_STRIDE, a prime, spaces the per-step flip
# streams of nearby seeds; RESEED_STRIDE re-seeds a run resumed with another world size, by step.
STRIDE, FLIP_STRIDE, RESEED_STRIDE = 100003, 7919, 1000003


def batches(x, y, batch_size, seed, start_step=0, rank=0, world=1, flip=False):
    """Endless (images in [-1, 1], labels) batches. The order depends only on (seed, epoch), so a run
    resumed at step n sees exactly the batches an uninterrupted run would. Each rank takes its slice.
    A data set smaller than a batch is repeated within the epoch."""
    n, step = len(x), start_step
    per_epoch, reps = max(n // batch_size, 1), -(-batch_size // n)
    while True:
        epoch, k = divmod(step, per_epoch)
        perm = torch.randperm(n, generator=rng(seed * STRIDE + epoch)).repeat(reps)
        idx = perm[k * batch_size:(k + 1) * batch_size][rank::world]
        xb = to_float(x[idx])
        if flip:  # random horizontal flip, the only DiT augmentation; deterministic per step
            f = torch.rand(len(idx), generator=rng(seed + FLIP_STRIDE * step)) < 0.5
            xb = torch.where(f[:, None, None, None], xb.flip(-1), xb)
        yield xb, y[idx]
        step += 1

# --- Checkpoints: plain dicts, atomic writes, weights_only loads ----------------------------------

def save_checkpoint(obj, path):
    """torch.save to path.tmp, then rename: a crash mid-write never destroys the previous file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    torch.save(obj, path + ".tmp")
    os.replace(path + ".tmp", path)


def load_checkpoint(path, kinds=None):
    """Load a tinydit checkpoint dict with weights_only=True; one clear error line when it is missing,
    corrupt, damaged (a shipped file whose sha256 differs from its folder's SHA256SUMS), or not of the
    expected kind."""
    if not os.path.exists(path):
        sys.exit(f"error: checkpoint {path} not found (train one with `python dit.py --out {path}`)")
    check_sum(path)
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        sys.exit(f"error: {path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:120]})")
    if not isinstance(ckpt, dict) or "kind" not in ckpt or "config" not in ckpt:
        sys.exit(f"error: {path} is not a tinydit checkpoint (no 'kind'/'config' entries)")
    if "ema" not in ckpt and "model" not in ckpt:
        sys.exit(f"error: {path} holds no weights (no 'ema' or 'model' entry)")
    if kinds is not None and ckpt["kind"] not in kinds:
        sys.exit(f"error: {path} holds a {ckpt['kind']!r} model; expected one of {kinds}")
    bad = nonfinite(ckpt)
    if bad:
        sys.exit(f"error: {path} holds NaN or inf in {bad}; retrain it, or use another file")
    return ckpt


def nonfinite(obj, name=""):
    """The name ("ema/blocks.0.mlp.fc1.weight") of the first floating tensor in a checkpoint dict holding a
    NaN or inf, or None: broken weights are refused at load, before they sample, train or score."""
    if isinstance(obj, torch.Tensor):
        return name if obj.is_floating_point() and not torch.isfinite(obj).all() else None
    items = obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, (list, tuple)) else ()
    return next((bad for k, v in items if (bad := nonfinite(v, f"{name}/{k}".lstrip("/")))), None)


def weights_tag(state):
    """8 hex digits naming a set of weights (part of the names of the files derived from them)."""
    h = hashlib.sha1()
    for k, v in sorted(state.items()):
        h.update(k.encode() + v.detach().cpu().float().numpy().tobytes())
    return h.hexdigest()[:8]


def settings_tag(settings):
    """8 hex digits of a JSON-able dict of settings: a saved result is reused only when all are equal."""
    return hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]


def read_sums(folder):
    """{file: (sha256, the command that rebuilds it)} of folder/SHA256SUMS: `# <file>: <command>` above each
    `<sha256>  <file>` line (sha256sum -c reads it too); {} when absent."""
    path = os.path.join(folder or ".", "SHA256SUMS")
    lines = open(path).read().splitlines() if os.path.exists(path) else []
    cmds = dict(line[2:].split(": ", 1) for line in lines if line.startswith("# "))
    return {n: (h, cmds.get(n, "?")) for h, n in (line.split() for line in lines if line[:1] not in "#")}


def check_sum(path):
    """One error line when a shipped file's sha256 differs from its folder's SHA256SUMS."""
    sums = read_sums(os.path.dirname(path))
    name = os.path.basename(path)
    if name in sums and sha256(path) != sums[name][0]:
        sys.exit(f"error: {path} is damaged (its sha256 differs from {os.path.dirname(path)}/SHA256SUMS); "
                 f"rebuild it with `{sums[name][1]}` or restore it with `git checkout -- {path}`")


def sha256(path):
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def ship_weights(ck, path):
    """The shipped form of a trained checkpoint: every entry but the training state (model, optimizer, scaler,
    RNG), with the EMA weights in float16 (half the size; the builders cast them back to float32). Its sha256
    and this command go into SHA256SUMS beside it, checked by every load_checkpoint."""
    keep = {k: v for k, v in ck.items() if k not in ("model", "ema", "opt", "scaler", "rng")}
    save_checkpoint(dict(keep, ema={k: v.half() for k, v in ck["ema"].items()}), path)
    record_sum(path)


def record_sum(path):
    """Put path's sha256 and the command that made it into SHA256SUMS beside it."""
    folder = os.path.dirname(path) or "."
    cmd = " ".join(["python", os.path.basename(sys.argv[0])] + sys.argv[1:])
    sums = dict(read_sums(folder), **{os.path.basename(path): (sha256(path), cmd)})
    with open(os.path.join(folder, "SHA256SUMS.tmp"), "w") as f:
        f.write("".join(f"# {n}: {c}\n{h}  {n}\n" for n, (h, c) in sorted(sums.items())))
    os.replace(os.path.join(folder, "SHA256SUMS.tmp"), os.path.join(folder, "SHA256SUMS"))


def check_writable(path, folder=False, flag="--out"):
    """One error line, before any work, when the output file (or folder) given by `flag` cannot be written."""
    d = path if folder else (os.path.dirname(path) or ".")
    try:
        os.makedirs(d, exist_ok=True)
        probe = os.path.join(d, f".write_test_{os.getpid()}")  # one per process: torchrun ranks race
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        sys.exit(f"error: cannot write to {d} ({e.strerror}); choose another {flag}")
    if not folder and os.path.isdir(path):
        sys.exit(f"error: {flag} {path} is a folder; give a file path")


def data_tag(x, y):
    """8 hex digits of a data set's arrays (shape + bytes): a result made from other data is not reused."""
    shapes = str((tuple(x.shape), tuple(y.shape))).encode()
    return hashlib.sha1(shapes + x.numpy().tobytes() + y.numpy().tobytes()).hexdigest()[:8]


def run_key(cfg, keys, teacher, data=None):
    """8 hex digits of a teacher checkpoint's weights, the settings `keys` of cfg and (when given) the data's
    tag (data_tag): everything a saved stage depends on. A stage file is reused only when its key is equal."""
    extra = {} if data is None else dict(data_tag=data)
    return settings_tag(dict({k: getattr(cfg, k) for k in keys}, teacher=weights_tag(teacher["ema"]),
                             **extra))


def build_dit(ckpt, ema=True):
    """A plain DiT from a checkpoint dict, EMA weights by default (fp16 files are cast), in eval mode."""
    model = DiT(**ckpt["config"])
    state = ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"]
    try:
        model.load_state_dict({k: v.float() for k, v in state.items()})
    except RuntimeError as e:
        sys.exit(f"error: checkpoint weights do not match its config: {str(e).splitlines()[0]}")
    return model.eval()

# --- Devices, DDP and the training session --------------------------------------------------------


def pick_device(name="auto"):
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda asked for, but no CUDA GPU is visible")
    if name not in ("cpu", "mps") and not name.startswith("cuda"):
        sys.exit(f"error: --device must be auto, cpu, cuda or mps, not {name!r}")
    if name == "cuda" and int(os.environ.get("WORLD_SIZE", 1)) > 1:  # torchrun: each rank its own GPU
        name = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    return torch.device(name)


def dist_setup(device):
    """(rank, world) of this process. Under torchrun (WORLD_SIZE > 1) it joins the process group once (gloo
    on CPU, nccl on CUDA, on this rank's device) and silences print() on every rank but 0, so a script's
    log and table appear once; print(..., force=True) still prints."""
    if int(os.environ.get("WORLD_SIZE", 1)) == 1:
        return 0, 1
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        # long timeout: rank 0 evaluates and writes the pictures while the others wait at a barrier
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", timeout=timedelta(hours=6))
        if dist.get_rank() != 0:
            quiet = builtins.print
            builtins.print = lambda *a, force=False, **k: quiet(*a, **k) if force else None
    return dist.get_rank(), dist.get_world_size()


def is_main():
    """True on rank 0 (and in a plain, single-process run): the process that writes files and prints."""
    return not dist.is_initialized() or dist.get_rank() == 0


def main_first(fn, *args, **kw):
    """fn(*args, **kw) on rank 0 first, then on the others: fn caches its result in a file, which rank 0
    writes and the other ranks then read (the offline pairs)."""
    for turn in (True, False):
        if is_main() == turn:
            out = fn(*args, **kw)
        if dist.is_initialized():
            dist.barrier()
    return out


def dist_finish():
    """End of a script's main under torchrun: the other ranks wait here while rank 0 evaluates and writes."""
    if dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()

def autocast(device, dtype):
    """Autocast context for --dtype (a no-op for float32)."""
    if dtype not in ("float32", "bfloat16", "float16"):
        sys.exit(f"error: --dtype must be float32, bfloat16 or float16, not {dtype!r}")
    return torch.autocast(device.type, dtype=getattr(torch, dtype), enabled=dtype != "float32")

def rng_state(device):
    """Every random stream the loop draws from: the CPU generator and, on CUDA, the device's."""
    state = dict(cpu=torch.get_rng_state())
    if device.type == "cuda":
        state["cuda"] = torch.cuda.get_rng_state(device)
    return state


def set_rng_state(state, device):
    state = state if isinstance(state, dict) else dict(cpu=state)  # older files saved the CPU state only
    torch.set_rng_state(state["cpu"])
    if device.type == "cuda" and "cuda" in state:
        torch.cuda.set_rng_state(state["cuda"], device)

class Session:
    """Everything `train` needs that is not the algorithm: the device and DDP (gloo / nccl; stop and NaN
    decisions are collective), AdamW, the EMA copy, the GradScaler (float16), resume (model, EMA, optimizer,
    scaler, step, every RNG, data order), torch.compile, the data stream, a log line + JSON lines, atomic
    checkpoints every ckpt_every steps, at the end and on SIGINT / SIGTERM."""
    def __init__(self, model, data, cfg, meta, param_groups=None, quiet=False, find_unused=False,
                 sharded=False):
        self.cfg = cfg = resolve(cfg)  # the one place where a 0 / -1 setting becomes the preset's value
        self.model, self.meta, self.quiet = model, meta, quiet
        self.device = device = pick_device(cfg.device)
        self.rank, self.world = rank, world = dist_setup(device)
        if cfg.batch_size % world:
            sys.exit(f"error: --batch-size {cfg.batch_size} is not divisible by the {world} processes")
        torch.manual_seed(seed_of(cfg.seed + rank))  # the noise / timestep / label-drop stream of this rank
        model.to(device)
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)  # the EMA starts as a copy (official)
        groups = param_groups or [{"params": [p for p in model.parameters() if p.requires_grad]}]
        self.opt = torch.optim.AdamW(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.scaler = torch.amp.GradScaler(device.type, enabled=cfg.dtype == "float16")
        for g in self.opt.param_groups:
            g.setdefault("base_lr", g["lr"])
        self.step, self.done_s = 0, 0.0
        os.makedirs(os.path.dirname(cfg.out) or ".", exist_ok=True)
        self.finished = os.path.exists(cfg.out) and self.resume()
        if self.finished:
            return
        self.net = torch.compile(model) if cfg.compile else model
        if world > 1:
            ids = [device.index] if device.type == "cuda" else None
            self.net = nn.parallel.DistributedDataParallel(self.net, device_ids=ids,
                                                           find_unused_parameters=find_unused)
        self.it = data_stream(data, cfg, self.step, rank, world, sharded)
        self.stop = {"sig": 0}
        on_signal = lambda sig, _: self.stop.update(sig=sig)  # noqa: E731
        self.handlers = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        self.t0 = time.time() - self.done_s  # the training clock goes on from where a resumed run stopped
        self.log = RunLog(cfg, self.step, rank == 0, quiet)

    def resume(self):
        """Load cfg.out (same settings only). True when it already holds every step (self.ck: the file)."""
        cfg, meta, rank = self.cfg, self.meta, self.rank
        ck = load_checkpoint(cfg.out, kinds=[meta["kind"]])
        if ck["config"] != meta["config"] or ck.get("key", meta.get("key")) != meta.get("key"):
            sys.exit(f"error: {cfg.out} was made with other settings (model config or settings key); "
                     "use another --out")
        self.model.load_state_dict(ck["model"])
        self.ema.load_state_dict(ck["ema"])
        self.step, self.done_s = ck["step"], ck.get("train_s", 0.0)
        if self.step < cfg.steps:  # only a run that goes on needs the optimizer's state
            try:
                self.opt.load_state_dict(ck["opt"])
            except ValueError as e:
                sys.exit(f"error: {cfg.out}: its optimizer state does not fit this run ({e}); "
                         "use another --out")
            if ck.get("scaler"):
                self.scaler.load_state_dict(ck["scaler"])
        self.meta.update({k: ck[k] for k in ("evals",) if k in ck})
        if len(ck["rng"]) == self.world:
            set_rng_state(ck["rng"][rank], self.device)
        else:  # another world size: the old per-rank streams cannot be split; re-seed, deterministically
            print(f"note: {cfg.out} was written by {len(ck['rng'])} processes, now {self.world}: new noise")
            torch.manual_seed(seed_of(cfg.seed + rank + RESEED_STRIDE * self.step))
        done, same = self.step >= cfg.steps, "settings (its key)" if meta.get("key") else "model config"
        if rank == 0 and not self.quiet:
            print(f"reusing {cfg.out}: finished ({self.step} steps) with the same {same}" if done
                  else f"resuming {cfg.out} at step {self.step}")
        self.ck = ck if done else None  # a run that goes on does not hold the file's tensors
        return done

    def evaluate(self, fn):
        """fn(step, ema) after step `step` (1-based), its result kept in meta["evals"] (saved with every
        checkpoint); its time is taken off the training clock."""
        t = time.time()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            rec = fn(self.step + 1, self.ema)  # the training's random streams are left untouched
        if rec is not None:
            rec = dict(rec, step=self.step + 1, train_s=round(t - self.t0, 1))
            self.meta.setdefault("evals", []).append(rec)
            self.log.note("eval " + " ".join(f"{k} {v}" for k, v in rec.items()))
        self.t0, self.log.last = self.t0 + time.time() - t, self.log.last + time.time() - t

    def end_step(self, values):
        """step += 1; a log line every log_every steps; a checkpoint every ckpt_every steps or on a signal."""
        cfg = self.cfg
        self.step += 1
        self.log.add(self.step, values)
        sig = int(agreed(self.world, self.device, self.stop["sig"])[0])
        if (self.step % cfg.ckpt_every == 0 and self.step < cfg.steps) or sig:  # the last step: in finish
            self.checkpoint({})
        if sig:
            print(f"\ninterrupted at step {self.step}; saved {cfg.out}; run the same command again to resume")
            sys.exit(128 + sig)

    def checkpoint(self, metrics):  # collective under DDP: every rank calls it at the same step
        rngs = [rng_state(self.device)] if self.world == 1 else [None] * self.world
        if self.world > 1:
            dist.all_gather_object(rngs, rng_state(self.device))
        if self.rank == 0:
            save_checkpoint(dict(self.meta, model=self.model.state_dict(), ema=self.ema.state_dict(),
                                 opt=self.opt.state_dict(), scaler=self.scaler.state_dict(), step=self.step,
                                 train_s=round(time.time() - self.t0, 1), rng=rngs,
                                 train_config=dataclasses.asdict(self.cfg), metrics=metrics),
                            self.cfg.out)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.log.bar.close()
        for s, h in self.handlers.items():
            signal.signal(s, h)

    def finish(self):
        """The final checkpoint (saved once) -> the returned dict (no optimizer state)."""
        metrics = dict(wall_s=round(time.time() - self.t0, 1),
                       final_loss=self.log.last_line.get("loss") if self.step else None)
        self.checkpoint(metrics)
        return dict(self.meta, step=self.step, metrics=metrics, model=self.model.state_dict(),
                    ema=self.ema.state_dict())


def data_stream(data, cfg, step, rank, world, sharded):
    """The batches of a run from `step` on: each rank's slice of the global batch (sharded: each rank draws
    from its own part of the data, with its own order). Random flips for every data set but shapes."""
    (images, labels), flip = data, cfg.data != "shapes"
    if sharded:
        return batches(images, labels, cfg.batch_size // world, cfg.seed + 1000 * rank, step, flip=flip)
    return batches(images, labels, cfg.batch_size, cfg.seed, step, rank, world, flip=flip)


def scalars(terms, s):
    """Every scalar term of a step as a float, in one host sync; exits (collectively, under DDP) on a
    non-finite loss, leaving session s's last good checkpoint."""
    names = [k for k, v in terms.items() if torch.is_tensor(v) and v.dim() == 0]
    values = dict(zip(names, torch.stack([terms[k].detach().float() for k in names]).tolist()))
    if agreed(s.world, s.device, not math.isfinite(values["loss"]))[0]:
        sys.exit(f"error: loss is {values['loss']} at step {s.step}; {s.cfg.out} keeps the last good one")
    return values


def agreed(world, device, *flags):
    """The max of each flag over the ranks (DDP), so that every rank takes the same stop / NaN decision."""
    if world == 1:
        return [float(f) for f in flags]
    v = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(v, op=dist.ReduceOp.MAX)
    return v.tolist()


class RunLog:
    """A run's log: a tqdm bar and, every log_every steps, one line of the means since the last line (+ ms
    per step and images per second), printed on rank 0 unless quiet and appended as a JSON line next to
    the checkpoint (<out>.log.jsonl)."""
    def __init__(self, cfg, step, lead, quiet):
        self.cfg, self.lead, self.show = cfg, lead, lead and not quiet
        self.path = os.path.splitext(cfg.out)[0] + ".log.jsonl"
        self.bar = tqdm(total=cfg.steps, initial=step, disable=not self.show, desc=os.path.basename(cfg.out),
                        dynamic_ncols=True, leave=False)
        self.last, self.sums, self.n, self.last_line = time.time(), {}, 0, {}

    def note(self, text):
        if self.show:
            self.bar.write(text)

    def add(self, step, values):
        """The scalars of step `step` (1-based); a line every log_every steps and at the last step."""
        self.bar.update(1)
        for k, v in values.items():
            self.sums[k] = self.sums.get(k, 0.0) + v
        self.n += 1
        if step % self.cfg.log_every == 0 or step == self.cfg.steps:
            ms = (time.time() - self.last) * 1000 / self.n  # means over the steps since the last line
            rec = dict(step=step, **{k: round(v / self.n, 5) for k, v in self.sums.items()},
                       ms_per_step=round(ms, 1), img_per_s=round(self.cfg.batch_size * 1000 / ms, 1))
            self.note(" ".join(f"{k} {v}" for k, v in rec.items()))
            if self.lead:
                with open(self.path, "a") as f:
                    f.write(json.dumps(rec) + "\n")
            self.last_line, self.sums, self.last, self.n = rec, {}, time.time(), 0


def dit_config(cfg, num_classes=10):
    """The DiT constructor kwargs for a TrainConfig."""
    return dict(PRESETS[cfg.preset], input_size=cfg.image_size, in_channels=3, num_classes=num_classes,
                learn_sigma=cfg.learn_sigma, class_dropout_prob=cfg.class_dropout, mlp_ratio=4.0)


def train_base(cfg, quiet=False):
    """Train (or resume, or just load) the base DiT: the teacher every other script starts from.
    Returns the checkpoint dict; its EMA weights are the model to use."""
    resolve(cfg)
    shard = (0, 1)
    if cfg.data == "imagenet64":  # each rank reads only its own files
        shard = (int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))
    x, y, nc = load_data(cfg.data, cfg.data_dir, cfg.image_size, shard=shard)
    diffusion = Diffusion()
    torch.manual_seed(seed_of(cfg.seed))
    model = DiT(**dit_config(cfg, nc))
    meta = dict(kind="dit", config=dit_config(cfg, nc))
    loss_fn = lambda m, xb, yb, step: diffusion.loss(m, xb, yb)  # noqa: E731
    return train(model, loss_fn, (x, y), cfg, meta, quiet=quiet, sharded=shard[1] > 1)[2]


def get_teacher(path, preset="cpu", data="shapes", data_dir="data", device="auto", seed=0):
    """The base checkpoint at `path`, trained first (python dit.py defaults) when it does not exist yet.
    Used by distill.py / prune.py / dynamic.py so that their first command works on a fresh clone."""
    if not os.path.exists(path):
        print(f"no base model at {path}: training it first (python dit.py --preset {preset} --out {path})")
        train_base(TrainConfig(preset=preset, data=data, data_dir=data_dir, out=path, device=device,
                               seed=seed))
    return load_checkpoint(path, kinds=["dit"])

# --- Evaluate: FLOPs, grids, tables ---------------------------------------------------------------

def count_flops(fn, *args):
    """FLOPs of one call fn(*args), counted by torch.utils.flop_counter (matmuls/convs/SDPA: 2*M*N*K).
    The fused CPU attention kernel is not registered with the counter; the math backend is."""
    with FlopCounterMode(display=False) as fc, torch.no_grad(), sdpa_kernel([SDPBackend.MATH]):
        fn(*args)
    return fc.get_total_flops()


def save_grid(images, path, nrow, row_labels=None):
    """uint8 (N, 3, H, W) -> one PNG with nrow images per row (2 px gaps), each row's label on its left."""
    n, _, h, w = images.shape
    rows, left = math.ceil(n / nrow), 6 * max(map(len, row_labels or [""])) + 6 * bool(row_labels)
    grid = torch.full((3, rows * (h + 2) + 2, left + nrow * (w + 2) + 2), 255, dtype=torch.uint8)
    for k in range(n):
        y, x = 2 + k // nrow * (h + 2), left + 2 + k % nrow * (w + 2)
        grid[:, y:y + h, x:x + w] = images[k]
    img = Image.fromarray(grid.permute(1, 2, 0).numpy())
    for r, s in enumerate(row_labels or []):
        ImageDraw.Draw(img).text((3, 2 + r * (h + 2) + (h - 10) // 2), s, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    img.save(path)


def run_header(device, dtype="float32", batch=None, seed=None):
    """The line that heads every results table: device, torch, dtype, batch, seed and the command."""
    dev = (torch.cuda.get_device_name(device) if device.type == "cuda"
           else f"{device.type} ({torch.get_num_threads()} threads)")
    cmd = " ".join(os.path.basename(a) if k == 0 else a for k, a in enumerate(sys.argv))
    return f"{dev}, torch {torch.__version__}, {dtype}, batch {batch}, seed {seed}: `python {cmd}`"


def markdown_table(rows):
    """list of dicts (same keys) -> a Markdown table string."""
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    return "\n".join(lines + ["| " + " | ".join(str(r[k]) for k in keys) + " |" for r in rows])


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    cfg = resolve(parse_args(TrainConfig, argv))
    check_writable(cfg.out)
    if cfg.ship:
        check_writable(cfg.ship, flag="--ship")
    device = pick_device(cfg.device)
    dist_setup(device)
    print(json.dumps(dataclasses.asdict(cfg)))
    ck = train_base(cfg)
    if not is_main():
        return dist_finish()
    if cfg.ship:
        ship_weights(dict(load_checkpoint(cfg.out), metrics=ck.get("metrics")), cfg.ship)
        print(f"wrote the EMA weights (float16) to {cfg.ship}")
    model = build_dit(ck).to(device)
    grid = os.path.splitext(cfg.out)[0] + "_grid.png"
    save_grid(generate(model, labels=torch.arange(10).repeat_interleave(8), seed=cfg.seed), grid, nrow=8)
    m = ck.get("metrics", {})
    x1 = torch.zeros(1, 3, cfg.image_size, cfg.image_size, device=device)
    t1 = torch.zeros(1, dtype=torch.long, device=device)
    gflops = count_flops(model, x1, t1, t1) / 1e9
    print("\n" + run_header(device, cfg.dtype, cfg.batch_size, cfg.seed))
    print(markdown_table([{"model": f"DiT {cfg.preset}", "params": f"{param_count(model) / 1e6:.2f}M",
                           "GFLOPs/forward": f"{gflops:.3f}", "steps": ck["step"],
                           "wall time": f"{m.get('wall_s')} s", "final loss": m.get("final_loss"),
                           "grid": grid}]))
    dist_finish()


if __name__ == "__main__":
    main()
