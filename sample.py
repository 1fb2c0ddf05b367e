"""
sample.py: images (a grid, an .npz) and a quality score from ANY tinydit checkpoint.

The samplers themselves live next to the diffusion process in dit.py (dit.sample: DDPM, Ho et al. 2020,
arXiv 2006.11239, Algorithm 2, respaced as IDDPM, arXiv 2102.09672, Sec. 4; DDIM, Song et al. 2021, arXiv
2010.02502, Eq. 12; classifier-free guidance, Ho & Salimans 2022, arXiv 2207.12598, as DiT Sec. 3.1 uses
it). This file sits above the method scripts: load_model reads a checkpoint's `kind` and builds it with
the script that wrote it, so every sampler and scorer runs every variant without architecture flags.

    kind "dit"      dit.py, and the depth-pruned DiTs of prune.py (TinyFusion and its baselines)
    kind "student"  distill.py: one-step or multi-step distilled students
    kind "dipgo"    prune.py --method dipgo: a DiT + a learned block-reuse plan
    kind "dydit"    dynamic.py: DyDiT with per-step sliced widths and token gathering

Run:
    python sample.py --grid out/grid.png                        # the shipped base: labels in rows
    python sample.py --ckpt out/dit.pt --npz out/samples.npz --n 10000 --cfg-scale 1.5   # any ckpt
    python sample.py --ckpt out/prune/dipgo_r0.5.pt --fid --steps 20    # fid.evaluate, any kind
"""
import os
import sys
from dataclasses import dataclass

import numpy as np
import torch

import dit
import distill
import dynamic
import fid
import prune


@dataclass
class SampleConfig:
    ckpt: str = "weights/dit_shapes.pt"  # any tinydit checkpoint (default: the shipped base)
    grid: str = ""                # write a grid PNG here (labels in rows); default <ckpt>_samples.png
    npz: str = ""                 # write --n samples to this .npz (arr_0: uint8 N x H x W x 3, labels)
    fid: bool = False             # score --n samples with fid.evaluate (FID, or FD-clf offline)
    n: int = 1000                 # >=1: samples for --npz / --fid (labels cycle through the classes)
    per_class: int = 8            # >=1: grid columns (samples per class row)
    steps: int = 50               # [1,1000]: sampling steps (1000-step process respaced; DiT: 250 DDPM)
    method: str = "ddim"          # ddim | ddpm
    eta: float = 0.0              # [0,1]: DDIM eta (0 = deterministic, 1 ~ DDPM)
    cfg_scale: float = 4.0        # >=0: classifier-free guidance scale; 1 = off (DiT: 4.0 visuals, 1.5 FID)
    batch_size: int = 64          # >=1: images per forward batch
    data: str = ""                # --fid reference data set ("" = the checkpoint's training data)
    data_dir: str = "data"        # where cifar10 / imagenet64 live
    seed: int = 0                 # >=0: the noise seed: the same seed gives the same noise for every model
    device: str = "auto"          # auto | cpu | cuda | mps
    dtype: str = "float32"        # float32 | bfloat16 | float16 (autocast)


def load_model(path, device="cpu"):
    """Build the model a tinydit checkpoint describes (EMA weights), in eval mode on `device`."""
    ckpt = dit.load_checkpoint(path)
    kind = ckpt["kind"]
    if kind == "dit":
        model = dit.build_dit(ckpt)
    elif kind == "student":
        model = distill.build_student(ckpt)
    elif kind == "dipgo":
        model = prune.build_dipgo(ckpt)
    elif kind == "dydit":
        model = dynamic.build_dydit(ckpt)
    else:
        sys.exit(f"error: {path} holds a model of kind {kind!r}, which sample.py does not know")
    return model.to(device).eval()


def main(argv=None):
    cfg = dit.check(dit.parse_args(SampleConfig, argv), dict(method=("ddim", "ddpm"), dtype=dit.DTYPES))
    for path, flag in ((cfg.npz, "--npz"), (cfg.grid, "--grid")):
        if path:  # one error line before any sampling
            dit.check_writable(path, flag=flag)
    device = dit.pick_device(cfg.device)
    model = load_model(cfg.ckpt, device)
    gen = dict(seed=cfg.seed, steps=cfg.steps, method=cfg.method, eta=cfg.eta, cfg_scale=cfg.cfg_scale,
               batch_size=cfg.batch_size, dtype=cfg.dtype, progress=True)
    if cfg.npz:
        labels = torch.arange(cfg.n) % model.num_classes
        imgs = dit.generate(model, labels, **gen)
        with open(cfg.npz + ".tmp", "wb") as f:  # written whole, then renamed: never half a file
            np.savez(f, arr_0=imgs.permute(0, 2, 3, 1).numpy(), labels=labels.numpy())
        os.replace(cfg.npz + ".tmp", cfg.npz)
        print(f"wrote {len(imgs)} samples to {cfg.npz}")
    tc = dit.load_checkpoint(cfg.ckpt).get("train_config", {})
    data = cfg.data or tc.get("data", "shapes")
    data_dir = cfg.data_dir if cfg.data else tc.get("data_dir", cfg.data_dir)
    if cfg.fid:
        r = fid.evaluate(model, data, data_dir, model.input_size, cfg.n, cfg.steps, cfg.method, cfg.cfg_scale,
                         cfg.seed, min(cfg.batch_size, 100), device, verbose=True)
        print("\n" + dit.run_header(device, "float32", cfg.batch_size, cfg.seed))
        acc = "-" if r["acc"] is None else f"{r['acc']:.3f}"
        print(dit.markdown_table([{"checkpoint": cfg.ckpt, "metric": r["metric"],
                                   "score": f"{r['score']:.3f}", "class acc": acc, "n": r["n"],
                                   "sampler": f"{cfg.steps} {cfg.method}, cfg {cfg.cfg_scale}"}]))
    if cfg.grid or not (cfg.npz or cfg.fid):
        path = cfg.grid or os.path.splitext(cfg.ckpt)[0] + "_samples.png"
        nc = min(model.num_classes, 10)
        imgs = dit.generate(model, torch.arange(nc).repeat_interleave(cfg.per_class), **gen)
        names = dit.CLASS_NAMES.get(cfg.data or tc.get("data"), [f"class {c}" for c in range(nc)])
        dit.save_grid(imgs, path, nrow=cfg.per_class, row_labels=names[:nc])
        print(f"wrote {path} ({nc} classes in rows, seed {cfg.seed}, {cfg.steps} {cfg.method} steps, "
              f"cfg {cfg.cfg_scale})")


if __name__ == "__main__":
    main()
