"""
sample.py: DDPM / DDIM sampling with classifier-free guidance from any tinydit checkpoint.

Papers: DDPM (Ho et al. 2020, arXiv 2006.11239) ancestral sampling, respaced to K steps as in IDDPM
(Nichol & Dhariwal 2021, arXiv 2102.09672, Sec. 4); DDIM (Song et al. 2021, arXiv 2010.02502, Eq. 12)
with eta; classifier-free guidance (Ho & Salimans 2022, arXiv 2207.12598) as DiT Sec. 3.3 uses it.

    paper -> here
    DDPM Algorithm 2 / IDDPM respacing -> sample() with method="ddpm" (Diffusion.respace in dit.py)
    DDIM Eq. 12 (eta)                  -> sample() with method="ddim"
    CFG eps_u + s (eps_c - eps_u)      -> dit.forward_with_cfg
    every variant from the same noise  -> generate() (noise from torch.Generator(seed), on the CPU)

Run:
    python sample.py --ckpt out/dit.pt --grid out/grid.png      # labels in rows, same noise for any ckpt
    python sample.py --ckpt out/dit.pt --npz out/samples.npz --n 10000 --cfg-scale 1.5
Any checkpoint written by a tinydit script loads here without architecture flags: load_model() reads
its 'kind' and builds the right model.
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from dit import (Diffusion, autocast, build_dit, forward_with_cfg, load_checkpoint, parse_args,
                 pick_device, save_grid, to_uint8)


@dataclass
class SampleConfig:
    ckpt: str = "out/dit.pt"      # any tinydit checkpoint
    grid: str = ""                # write a grid PNG here (labels in rows); default <ckpt>_samples.png
    npz: str = ""                 # write --n samples to this .npz (arr_0: uint8 N x H x W x 3, labels)
    n: int = 1000                 # number of samples for --npz (labels cycle through the classes)
    per_class: int = 8            # grid columns (samples per class row)
    steps: int = 50               # sampling steps (the 1000-step process respaced; DiT used 250 DDPM)
    method: str = "ddim"          # ddim | ddpm
    eta: float = 0.0              # DDIM eta (0 = deterministic, 1 ~ DDPM)
    cfg_scale: float = 4.0        # classifier-free guidance scale; 1 = off (DiT: 4.0 visuals, 1.5 FID)
    batch_size: int = 64          # images per forward batch
    seed: int = 0                 # the noise seed: the same seed gives the same noise for every model
    device: str = "auto"          # auto | cpu | cuda | mps
    dtype: str = "float32"        # float32 | bfloat16 | float16 (autocast)


# --------------------------------------------------------------------------------------------------
# Method: the samplers
# --------------------------------------------------------------------------------------------------

def sample(model, z, y, steps=50, method="ddim", eta=0.0, cfg_scale=1.0, generator=None, clip=True):
    """Run the reverse process from noise z (B, C, H, W) with labels y. Gradients flow if enabled by the
    caller (DiP-GO backpropagates through it). generator drives the DDPM / eta > 0 noise. clip: clamp the
    predicted x0 to the pixel range [-1, 1] at every step, as pixel-space DDPM (Ho et al. Sec. 3.3) and
    IDDPM do; DiT samples latents and does not (clip_denoised=False). Without it, eps errors at high
    noise are amplified by up to 1/sqrt(abar) ~ 158 and small models give saturated colour noise."""
    if method not in ("ddim", "ddpm"):
        sys.exit(f"error: --method must be ddim or ddpm, not {method!r}")
    diffusion, x, B = Diffusion().respace(steps), z, z.shape[0]
    null = torch.full_like(y, model.num_classes)
    for i in reversed(range(steps)):
        idx = torch.full((B,), i, device=z.device, dtype=torch.long)
        t = diffusion.model_t(idx)
        if cfg_scale != 1.0:
            out = forward_with_cfg(model, torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), cfg_scale)[:B]
        else:
            out = model(x, t, y)
        mean, logvar, x0, eps = diffusion.p_mean_variance(out.float(), x, idx, clip)
        noise = torch.randn(x.shape, generator=generator).to(x.device) if (method == "ddpm" or eta > 0) and i > 0 else 0
        if method == "ddpm":
            # x_{i-1} = mu(x_i, x0_hat) + sigma_i * n   (DDPM Algorithm 2, sigma learned or fixed)
            x = mean + torch.exp(0.5 * logvar) * noise if i > 0 else mean
        else:
            ab, ab_prev = diffusion.ac[i], diffusion.ac_prev[i]
            # sigma = eta * sqrt((1 - ab_prev) / (1 - ab)) * sqrt(1 - ab / ab_prev)      (DDIM Eq. 16)
            sigma = eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5
            # x_{i-1} = sqrt(ab_prev) x0 + sqrt(1 - ab_prev - sigma^2) eps + sigma n  (DDIM Eq. 12)
            x = ab_prev ** 0.5 * x0 + (1 - ab_prev - sigma ** 2) ** 0.5 * eps + sigma * noise
    return x


@torch.no_grad()
def generate(model, labels, seed=0, steps=50, method="ddim", eta=0.0, cfg_scale=4.0, batch_size=64,
             dtype="float32", progress=False):
    """uint8 images (N, 3, H, W) for `labels`. The initial noise comes from torch.Generator(seed) on the
    CPU for the whole set at once, so any two models given the same seed start from the same noise,
    whatever the batch size or device. One-step models (model.one_step) map the noise in one call."""
    device = next(model.parameters()).device
    labels = torch.as_tensor(labels, dtype=torch.long)
    C, S = model.in_channels, model.input_size
    z_all = torch.randn(len(labels), C, S, S, generator=torch.Generator().manual_seed(seed))
    out = []
    for k in tqdm(range(0, len(labels), batch_size), disable=not progress, desc="sampling"):
        z, y = z_all[k:k + batch_size].to(device), labels[k:k + batch_size].to(device)
        g = torch.Generator().manual_seed(seed + 1 + k)
        with autocast(device, dtype):
            if getattr(model, "one_step", False):
                x = model(z, y)
            else:
                x = sample(model, z, y, steps, method, eta, cfg_scale, generator=g)
        out.append(to_uint8(x.float()).cpu())
    return torch.cat(out)


def save_rows(models, path, seed=0, steps=25, cfg_scale=4.0):
    """One PNG, one row per model (in order), one image per class (up to 10), all from the same noise:
    the side-by-side picture of prune.py and jetson_bench.py. models: {name: model} or a list; steps: one
    number or one per model (a DiP-GO plan runs on its own K)."""
    models = list(models.values()) if isinstance(models, dict) else list(models)
    steps = steps if isinstance(steps, (list, tuple)) else [steps] * len(models)
    labels = torch.arange(min(models[0].num_classes, 10))
    imgs = [generate(m, labels, seed, k, cfg_scale=cfg_scale) for m, k in zip(models, steps)]
    save_grid(torch.cat(imgs), path, nrow=len(labels))


# --------------------------------------------------------------------------------------------------
# Checkpoints of every kind -> a model
# --------------------------------------------------------------------------------------------------

def load_model(path, device="cpu"):
    """Build the model a tinydit checkpoint describes (EMA weights), in eval mode on `device`.
    Each script registers its kind here, as one branch of this if/elif."""
    ckpt = load_checkpoint(path)
    kind = ckpt["kind"]
    if kind == "dit":  # dit.py, and depth-pruned DiTs exported by prune.py (TinyFusion and baselines)
        model = build_dit(ckpt)
    elif kind == "student":  # distill.py: one-step or multi-step distilled students
        from distill import build_student
        model = build_student(ckpt)
    elif kind == "dipgo":  # prune.py --method dipgo: a DiT + a learned block-reuse plan
        from prune import build_dipgo
        model = build_dipgo(ckpt)
    elif kind == "dydit":  # dynamic.py: DyDiT with per-step sliced widths and token gathering
        from dynamic import build_dydit
        model = build_dydit(ckpt)
    else:
        sys.exit(f"error: {path} holds a model of kind {kind!r}, which sample.py does not know")
    return model.to(device).eval()


# --------------------------------------------------------------------------------------------------
# main
# --------------------------------------------------------------------------------------------------

def main(argv=None):
    cfg = parse_args(SampleConfig, argv)
    device = pick_device(cfg.device)
    model = load_model(cfg.ckpt, device)
    nc = min(model.num_classes, 10)
    if cfg.npz:
        labels = torch.arange(cfg.n) % model.num_classes
        imgs = generate(model, labels, cfg.seed, cfg.steps, cfg.method, cfg.eta, cfg.cfg_scale, cfg.batch_size,
                        cfg.dtype, progress=True)
        os.makedirs(os.path.dirname(cfg.npz) or ".", exist_ok=True)
        np.savez(cfg.npz, arr_0=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        print(f"wrote {len(imgs)} samples to {cfg.npz}")
    if cfg.grid or not cfg.npz:
        path = cfg.grid or os.path.splitext(cfg.ckpt)[0] + "_samples.png"
        labels = torch.arange(nc).repeat_interleave(cfg.per_class)
        imgs = generate(model, labels, cfg.seed, cfg.steps, cfg.method, cfg.eta, cfg.cfg_scale, cfg.batch_size,
                        cfg.dtype, progress=True)
        save_grid(imgs, path, nrow=cfg.per_class)
        print(f"wrote {path} ({nc} classes in rows, seed {cfg.seed}, {cfg.steps} {cfg.method} steps, "
              f"cfg {cfg.cfg_scale})")


if __name__ == "__main__":
    main()
