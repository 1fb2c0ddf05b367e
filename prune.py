"""
prune.py: make a DiT cheaper by removing block computations. Section 1: TinyFusion learnable depth
pruning, its baselines and recovery. Section 2: DiP-GO step-wise block reuse with a feature cache.

Section 1. "TinyFusion: Diffusion Transformers Learned Shallow", Gongfan Fang, Kunjun Li, Xinyin Ma, Xinchao
Wang, CVPR 2025, arXiv 2412.01199. Whole blocks are removed, and which ones is *learned*: every local group
of M blocks keeps N (N:M), one logit per keep-pattern; a hard straight-through Gumbel-softmax draws a
pattern per example; the masked DiT trains on the diffusion loss while a LoRA update simulates the later
fine-tuning, so masks that are cheap to *repair* win. The argmax of the EMA logits is the mask; the shallow
DiT is rebuilt from the original weights and fine-tuned (optionally with Masked KD).
    paper (Sec. 3 method, Tables 1, 3-5) / official code  -> here
    N:M block-local search space (code default 1:2)       -> parse_pattern
    differentiable sampling: ST Gumbel-softmax, tau 4->0.1,
      s = 100, one draw per example                        -> st_gumbel_masks, MaskSearch
    h <- m Block(h, c) + (1 - m) h                         -> masked_forward
    recoverability dW: LoRA on every Linear (Table 4)      -> LoRALinear, delta_w, learn_mask
    argmax of the EMA logits, rebuild from the original    -> MaskSearch.kept, export_pruned
    baselines (Tables 1, 3): first/last/uniform, ShortGPT,
      sensitivity, magnitude, Taylor, min-loss random      -> baseline_kept, block_influence, calib_loss
    recovery: fine-tune / KD / Masked KD (Table 5)         -> recovery_loss, masked_rep_loss, recover
    the algorithm: search -> export -> recover            -> tinyfusion
[inferred], for CPU minutes: LoRA lr 1e-3 (paper 1e-4), gates the paper's 1e-3 for 2000 steps (the mask
settles: the same at every seed), recovery 1e-3 cosine to 5e-4 (paper 2e-4 -> 1e-4), a few hundred steps
(paper 100K+, 1.4% of pre-training: ~170 of the shipped base's 12000); Masked-KD pairs student j <->
the last teacher block of its group; the KD variance term is KL(teacher || student) of the two reverse
Gaussians; magnitude / Taylor / sensitivity scores; ShortGPT's Block Influence measured along the base
model's own DDIM trajectories (the official prune_by_score.py: 128 real images at a random t, no CFG).

Section 2. "DiP-GO: A Diffusion Pruner via Few-step Gradient Optimization", Haowei Zhu et al. (AMD), NeurIPS
2024, arXiv 2410.16942. The K-step sampling trajectory is a SuperNet: after the first step every block
either computes or reuses its contribution from the previous step. A small pruner (a query per (step,
block) -> self-attention + FFN -> heads) gives straight-through keep/reuse gates, trained for a few steps
on labels and noise only so the gated sampler's image matches the full one (SSIM) with few blocks on.
A greedy falling threshold turns its scores into a static plan; inference runs the plan with a cache.
    paper (Sec. 3 method, Sec. 4 experiments) / code      -> here
    SuperNet, backup connection to step t-1, the cascade  -> BackupRule; gated_blocks (train), cached_blocks
    (update_query_status, cascade_nodes)                     (infer: when a computed block fills its entry)
    pruner network; straight-through gate (no Gumbel)     -> Pruner (Pruner.gate)
    consistency (SSIM) + sparsity loss, few steps         -> dipgo_loss (ssim), learn_scores
    post-processing: falling threshold, blocks output-side
      first (both official prune() visit block_names[::-1]) -> postprocess
    inference with the cache; baselines                  -> CachedDiT, uniform_plan, random_plan
    the algorithm: pruner -> post-process -> sampler      -> dipgo
For a DiT (the code is SD-UNet only) a unit is one block. --backup output is the code's rule (a skipped
block returns its cached output, so the blocks before it are dead: the cascade); --backup residual [ours,
inferred] adds its previous update, h + D[t-1, b]. --dipgo-optim sgd is the code's optimiser; adam [ours].
[inferred]: --ratio r = fraction of (step >= 1, block) slots reused, the sparsity term off while the hard
plan keeps < 1 - r; query width 128; fresh labels and noise at every pruner step (the official training
reuses fixed noise).

Run:
    python prune.py --method tinyfusion                  # 6 -> 3 blocks of the base, ~15 min, 2 CPU cores
    python prune.py --method all --recover finetune      # every method, same depth and recovery, one table
    python prune.py --method tinyfusion --recover maskedkd --pattern 2:4 --deltaw full
    python prune.py --method index --kept 0,2,5          # a fixed kept set (official: prune_by_index.py)
    python prune.py --method dipgo --ratios 0.3,0.5,0.7  # a DiP-GO plan per ratio vs four baselines
Each stage's checkpoint name carries a hash of every setting that made it; re-running reuses it only when all
are equal (and says so). Pruned checkpoints are kind "dit"; DiP-GO plans kind "dipgo" (sample.py runs both).
"""
import dataclasses
import itertools
import json
import math
import os
import sys
import statistics
import time
import types
from dataclasses import asdict, dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from scipy.stats import rankdata, spearmanr

import dit
import fid

# ==================================================================================================
# Section 1: TinyFusion
# ==================================================================================================

# --- The algorithm: search -> export -> recover ---------------------------------------------------

def tinyfusion(cfg, method, teacher_ckpt, teacher, data, batch):
    """TinyFusion's algorithm (Sec. 3) as one box: search -> export -> recover. Method "tinyfusion"
    learns which blocks stay; a baseline (Tables 1, 3) picks them by its rule. Returns a dict."""
    L = len(teacher.blocks)
    # 1. search: the argmax of the EMA pattern logits (Sec. 3.2), or a baseline's rule
    if method == "tinyfusion":
        kept, info = learn_mask(cfg, teacher_ckpt, data, stage_path(cfg, "search", teacher_ckpt, data))
    else:
        options, groups = parse_pattern(cfg.pattern, L)
        kept, info = baseline_kept(method, teacher, groups * int(options[0].sum()), batch, cfg), {}
    # 2. export: the kept blocks with their ORIGINAL weights (the LoRA that judged the mask is dropped)
    loss = calib_loss(teacher, batch, keep_mask(kept, L, batch[0].device))
    pruned = export_pruned(teacher_ckpt, kept, method=method, calib_loss=loss)
    name = save_pruned(cfg, pruned, kept, L, f"{method}: kept {kept}, calibration loss {loss:.4f}", info)
    # 3. recover: fine-tune the shallow DiT (plain, KD or Masked KD: Table 5)
    recovered = None if cfg.recover == "none" else \
        recover(cfg, pruned, teacher, data, stage_path(cfg, name, teacher_ckpt, data))
    return dict(method=method, kept=kept, calib_loss=loss, pruned=pruned, recovered=recovered, info=info)


# --- Method: search space, mask sampler, masked model, LoRA, export -------------------------------

def parse_pattern(pattern, depth):
    """Block-local N:M search space, TinyFusion Sec. 3: (options (K, M) 0/1 rows = every M-choose-N
    keep-pattern of one group, number of groups G = depth / M)."""
    try:
        n, m = map(int, pattern.split(":"))
    except ValueError:
        sys.exit(f"error: --pattern must look like 1:2, not {pattern!r}")
    if not 0 < n <= m or depth % m:
        sys.exit(f"error: --pattern {pattern} does not tile {depth} blocks (need 0 < N <= M and M | depth)")
    options = [[float(j in c) for j in range(m)] for c in itertools.combinations(range(m), n)]
    return torch.tensor(options), depth // m


def st_gumbel_masks(logits, options, batch, tau, scale):
    """Per-example block masks by hard straight-through Gumbel-softmax (differentiable sampling, TinyFusion
    Sec. 3, from MaskLLM). logits (G, K), options (K, M) -> (mask (B, G*M), exactly 0/1 in the forward pass,
    one-hot (B, G, K))."""
    # assignment 6 begin: TinyFusion's straight-through Gumbel-softmax N:M mask
    G, K = logits.shape
    gumbel = -torch.empty(batch, G, K, device=logits.device).exponential_().log()  # g ~ Gumbel(0, 1)
    # y = softmax((s z + g) / tau), one independent draw per example and group
    soft = torch.softmax((scale * logits + gumbel) / tau, dim=-1)  # (B, G, K)
    hard = F.one_hot(soft.argmax(-1), K).to(soft.dtype)
    # straight-through: the value is exactly `hard`, the gradient is d soft
    onehot = hard + (soft - soft.detach())
    return (onehot @ options).reshape(batch, -1), onehot  # (B, G, M) -> (B, L)
    # assignment 6 end


def masked_forward(model, x, t, y, mask):
    """The DiT with block mask m (B, L) or (L,), TinyFusion Sec. 3: h <- m_j Block_j(h, c) + (1 - m_j) h,
    so a dropped block is exactly the identity. A block dropped (kept) for the whole batch by a mask that
    needs no gradient is skipped (run plainly)."""
    h, c = model.embed(x, t, y)
    mask = mask.expand(x.shape[0], -1) if mask.dim() == 1 else mask
    for j, block in enumerate(model.blocks):
        m = mask[:, j].view(-1, 1, 1)  # (B, 1, 1)
        if not m.requires_grad and (m.all() or not m.any()):
            h = block(h, c) if m.all() else h
        else:
            h = m * block(h, c) + (1 - m) * h
    return model.head(h, c)


class LoRALinear(nn.Module):
    """W x + b + (alpha / r) B A x, W and b frozen, B = 0 at the start (LoRA, Hu et al. 2021, arXiv
    2106.09685, Sec. 4.1, Eq. 3): the recoverability update dW of TinyFusion Sec. 3."""
    def __init__(self, base, rank, alpha):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.A = nn.Parameter(torch.randn(rank, base.in_features) / math.sqrt(base.in_features))
        self.B = nn.Parameter(torch.zeros(base.out_features, rank))
        self.scale = alpha / rank

    def forward(self, x):
        return self.base(x) + self.scale * (x @ self.A.T) @ self.B.T


def delta_w(model, how, rank=8, alpha=16.0):
    """The recoverability update dW learned together with the mask, TinyFusion Sec. 3 (Table 4 compares the
    three): "lora" puts a LoRALinear on every nn.Linear (attention, MLP, adaLN, embedders, head) and freezes
    the rest; "full" trains every weight; "frozen" none (the mask then judges the blocks as they are).
    Returns the parameters dW trains."""
    if how == "full":
        return list(model.parameters())
    model.requires_grad_(False)
    if how == "frozen":
        return []
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, nn.Linear):
                setattr(parent, name, LoRALinear(child, rank, alpha))
    return [p for mod in model.modules() if isinstance(mod, LoRALinear) for p in (mod.A, mod.B)]


class MaskSearch(nn.Module):
    """A DiT (+ dW) with one learnable logit per keep-pattern per group, TinyFusion Sec. 3. forward(x, t, y)
    draws a mask per example (training) and runs the masked DiT; `step` drives the temperature schedule."""
    def __init__(self, model, options, groups, steps, cfg):
        super().__init__()
        self.model = model
        self.register_buffer("options", options)
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.logits = nn.Parameter(torch.full((groups, len(options)), cfg.logit_init))
        self.steps, self.tau, self.scaling = steps, (cfg.tau_start, cfg.tau_end), cfg.scaling
        dit.samples_like(self, model)

    def temperature(self):
        # tau_n = tau_0 + (tau_1 - tau_0) n / (steps - 1)     (linear, 4 -> 0.1)
        frac = min(self.step.item() / max(self.steps - 1, 1), 1.0)
        return self.tau[0] + (self.tau[1] - self.tau[0]) * frac

    def forward(self, x, t, y):
        mask, _ = st_gumbel_masks(self.logits, self.options, x.shape[0], self.temperature(), self.scaling)
        if self.training:
            self.step += 1
        return masked_forward(self.model, x, t, y, mask)

    def confidence(self):
        """Largest pattern probability softmax(s z_g) per group (G,)."""
        return torch.softmax(self.scaling * self.logits.detach(), -1).max(-1).values

    def kept(self):
        """The most probable pattern of every group -> sorted kept block indices."""
        return torch.nonzero(self.options[self.logits.argmax(-1)].reshape(-1)).flatten().tolist()


def export_pruned(ckpt, kept, **info):
    """A plain, shallower "dit" checkpoint from the ORIGINAL (EMA) weights: block kept[j] becomes block j;
    embedders and final layer unchanged. Any LoRA is simply never looked at (TinyFusion Sec. 3)."""
    def slim(state):
        out = {}
        for k, v in state.items():
            if k.startswith("blocks."):
                _, i, rest = k.split(".", 2)
                if int(i) in kept:
                    out[f"blocks.{kept.index(int(i))}.{rest}"] = v.clone()
            else:
                out[k] = v.clone()
        return out
    weights = slim(ckpt["ema"] if "ema" in ckpt else ckpt["model"])
    return dict(kind="dit", config=dict(ckpt["config"], depth=len(kept)), model=weights,
                ema={k: v.clone() for k, v in weights.items()}, kept=list(kept), **info)


# --- Method: baselines (TinyFusion Tables 1 and 3) ------------------------------------------------

CALIB_OFFSET = 12345  # [ours] the calibration batch's stream: apart from the --seed of masks and training


def calib_batch(data, n, seed, device):
    """A fixed calibration batch (x0, y, i, noise): the same images, timesteps and noise for every mask."""
    g = dit.rng(seed + CALIB_OFFSET)
    idx = torch.randperm(len(data[0]), generator=g)[:n]
    x0 = dit.to_float(data[0][idx])
    i, noise = torch.randint(0, 1000, (n,), generator=g), torch.randn(x0.shape, generator=g)
    return [v.to(device) for v in (x0, data[1][idx], i, noise)]


def calib_loss(model, batch, mask):
    """Diffusion loss under a fixed mask right after pruning ("calibration loss", TinyFusion Table 3)."""
    x0, y, i, noise = batch
    diffusion = dit.Diffusion()
    with torch.no_grad():
        xt = diffusion.q_sample(x0, i, noise)
        out = masked_forward(model, xt, diffusion.model_t(i), y, mask)
        return diffusion.loss_from_output(out, x0, xt, i, noise)["loss"].item()


def keep_mask(kept, depth, device="cpu"):
    return torch.tensor([float(j in kept) for j in range(depth)], device=device)


@torch.no_grad()
def block_influence(model, n, steps, cfg_scale):
    """ShortGPT Block Influence BI_j = 1 - cos(h_in, h_out), averaged over tokens, samples and every step of
    the base model's own DDIM trajectories [inferred: the official prune_by_score.py uses 128 real images,
    one forward each at a random t, no CFG]."""
    sims, calls = torch.zeros(len(model.blocks)), torch.zeros(len(model.blocks))

    def record(j, inp, out):
        sims[j] += F.cosine_similarity(inp[0], out, dim=-1).mean().item()  # mean over tokens and samples
        calls[j] += 1
    hooks = [b.register_forward_hook(lambda mod, inp, out, j=j: record(j, inp, out))
             for j, b in enumerate(model.blocks)]
    # ours [inferred]: the base's own DDIM trajectories (code: 128 real images at a random t, no CFG)
    dit.generate(model, torch.arange(n) % model.num_classes, seed=1, steps=steps, cfg_scale=cfg_scale,
                 stream="train")  # a mask choice draws training noise
    for h in hooks:
        h.remove()
    return 1 - sims / calls


def baseline_kept(method, model, k, batch, cfg):
    """Kept block indices (sorted) of a baseline at depth k (TinyFusion Table 1); higher score = keep."""
    L, rng = len(model.blocks), np.random.default_rng(cfg.seed)
    top = lambda score: sorted(torch.topk(torch.as_tensor(score, dtype=torch.float), k).indices.tolist())
    if method == "first":
        return list(range(k))
    if method == "last":
        return list(range(L - k, L))
    if method == "uniform":  # oracle: first and last kept, the middle evenly (28 -> 14: the code's list)
        return sorted(set(np.linspace(0, L - 1, k).round().astype(int).tolist()))
    if method == "index":
        kept = sorted(int(v) for v in cfg.kept.split(",") if v.strip())
        if len(set(kept)) != k or not all(0 <= v < L for v in kept):
            sys.exit(f"error: --kept {cfg.kept!r} must list {k} distinct blocks in 0..{L - 1} "
                     f"(--pattern {cfg.pattern})")
        return kept
    if method == "random":
        return sorted(rng.choice(L, k, replace=False).tolist())
    if method == "shortgpt":  # drop the most input-like blocks; never drop the last one
        bi = block_influence(model, cfg.calib_n, cfg.eval_steps, cfg.cfg_scale)
        bi[-1] = float("inf")
        return top(bi)
    if method == "sensitivity":  # loss increase when block j alone is dropped
        full = calib_loss(model, batch, keep_mask(range(L), L, batch[0].device))
        drop = lambda j: keep_mask([i for i in range(L) if i != j], L, batch[0].device)  # noqa: E731
        return top([calib_loss(model, batch, drop(j)) - full for j in range(L)])
    if method == "magnitude":  # sum |W| over the block's weights
        return top([sum(p.abs().sum().item() for p in b.parameters()) for b in model.blocks])
    if method == "taylor":  # first-order Taylor importance sum |W dL/dW| on the calibration batch
        model.zero_grad()
        x0, y, i, noise = batch
        dit.Diffusion().loss(model, x0, y, i, noise)["loss"].backward()
        score = [sum((p * p.grad).abs().sum().item() for p in b.parameters()) for b in model.blocks]
        model.zero_grad()
        return top(score)
    combos = list(itertools.combinations(range(L), k))  # randmin: the lowest calibration loss of k-of-L masks
    if len(combos) > cfg.random_masks:
        combos = [sorted(rng.choice(L, k, replace=False).tolist()) for _ in range(cfg.random_masks)]
    losses = [calib_loss(model, batch, keep_mask(c, L, batch[0].device)) for c in combos]
    return list(combos[int(np.argmin(losses))])


# --- Method: recovery losses (TinyFusion Sec. 3, Masked KD; Table 5) ------------------------------

def masked_rep_loss(h_s, h_t, k):
    """Masked hidden-state KD, TinyFusion Sec. 3: per sample, mu and sigma over tokens and channels; only
    entries with |h - mu| < k sigma count, in student and teacher alike ("massive activations" ignored).
        L_rep = mean (M_s * h_s - M_t * h_t)^2,   M = [|h - mu| < k sigma]          (k = 0: unmasked)"""
    def keep(h):
        mu, sd = h.mean(dim=(1, 2), keepdim=True), h.std(dim=(1, 2), keepdim=True)  # (B, 1, 1)
        return ((h - mu).abs() < k * sd).to(h.dtype) if k > 0 else torch.ones_like(h)
    return ((keep(h_s) * h_s - keep(h_t) * h_t.detach()) ** 2).mean()


def recovery_loss(student, teacher, diffusion, x0, y, frac, cfg):
    """Masked KD, TinyFusion Sec. 3 / Table 5: a_KD L_KD + a_GT L_GT + beta L_rep, beta = beta_0 (1 - frac).
    Teacher and student see the same x_t, t and the same CFG label drop. L_KD = ||eps_s - eps_t||^2 + the
    KL between the two reverse Gaussians (student eps detached, as L_vb). cfg.recover == "kd": beta = 0."""
    B, C = x0.shape[0], x0.shape[1]
    i, noise = torch.randint(0, diffusion.num_steps, (B,), device=x0.device), torch.randn_like(x0)
    y = teacher.y_embedder.token_drop(y)  # one CFG label drop for both nets (the student's own is off)
    xt, t = diffusion.q_sample(x0, i, noise), diffusion.model_t(i)
    out_s, feats_s = student(xt, t, y, return_features=True)
    with torch.no_grad():
        out_t, feats_t = teacher(xt, t, y, return_features=True)
    gt = diffusion.loss_from_output(out_s, x0, xt, i, noise)
    kd = ((out_s[:, :C] - out_t[:, :C]) ** 2).mean()
    if out_s.shape[1] == 2 * C:
        frozen = torch.cat([out_s[:, :C].detach(), out_s[:, C:]], 1)
        mean_s, logvar_s, _, _ = diffusion.p_mean_variance(frozen, xt, i)
        mean_t, logvar_t, _, _ = diffusion.p_mean_variance(out_t, xt, i)
        # ours [inferred]: KL(N_t || N_s) of the two reverse Gaussians, bits/dim (paper: KD on the output)
        kd = kd + dit.normal_kl(mean_t, logvar_t, mean_s, logvar_s).mean() / math.log(2.0)
    k, L = len(feats_s), len(feats_t)
    links = [(i - 1, m - 1) for i, m in dit.block_map(k, L)]  # ours [inferred]: j <-> last block of group j
    rep = sum(masked_rep_loss(feats_s[j], feats_t[jt], cfg.kd_sigma) for j, jt in links) / k
    beta = cfg.beta_rep * (1 - frac) if cfg.recover == "maskedkd" else 0.0
    loss = cfg.alpha_kd * kd + cfg.alpha_gt * gt["loss"] + beta * rep
    return dict(loss=loss, kd=kd.detach(), gt=gt["loss"].detach(), rep=rep.detach())


# --- Train / Apply: learn the mask, export, recover (every stage through dit.train) ---------------

def train_config(cfg, out, steps, lr, ema_decay, grad_clip, lr_end=1.0):
    return dit.TrainConfig(preset=cfg.preset or "cpu", data=cfg.data, data_dir=cfg.data_dir, out=out,
                           steps=steps,
                           batch_size=cfg.batch_size, lr=lr, warmup=0, lr_end=lr_end, weight_decay=0.0,
                           grad_clip=grad_clip, ema_decay=ema_decay, log_every=max(steps // 4, 1),
                           ckpt_every=steps, seed=cfg.seed, device=cfg.device, dtype=cfg.dtype)


def learn_mask(cfg, teacher_ckpt, data, path):
    """TinyFusion mask learning, Sec. 3: the masked DiT + dW trained jointly with the logits on the
    diffusion loss (AdamW, wd 0, clip 1, LoRA lr / gate lr as param groups). Returns (kept, info)."""
    torch.manual_seed(dit.seed_of(cfg.seed))
    model = dit.build_dit(teacher_ckpt).train()
    options, groups = parse_pattern(cfg.pattern, len(model.blocks))
    weights = delta_w(model, cfg.deltaw, cfg.lora_rank, cfg.lora_alpha)  # frozen: only the logits learn
    net = MaskSearch(model, options, groups, cfg.learn_steps, cfg)
    groups_ = [{"params": [net.logits], "lr": cfg.gate_lr}]
    if weights:
        groups_.append({"params": weights, "lr": cfg.lora_lr})
    diffusion, history = dit.Diffusion(), {}

    def loss_fn(m, xb, yb, step):
        history[step] = net.kept()  # the live argmax mask before this step's update
        terms = diffusion.loss(m, xb, yb)
        return dict(loss=terms["loss"], mse=terms["mse"], tau=torch.tensor(net.temperature()),
                    conf=net.confidence().min())
    config = dict(teacher_ckpt["config"], pattern=cfg.pattern, deltaw=cfg.deltaw, lora_rank=cfg.lora_rank,
                  lora_alpha=cfg.lora_alpha)
    meta = dict(kind="tinyfusion_search", config=config)
    tcfg = dataclasses.replace(train_config(cfg, path, cfg.learn_steps, cfg.gate_lr, cfg.gate_ema, 1.0),
                               ema_warmup=0)  # the constant decay from step 0 (paper)
    _, ema, ck = dit.train(net, loss_fn, data, tcfg, meta, param_groups=groups_)
    trainable = sum(p.numel() for g in groups_ for p in g["params"])
    changes = [s for s in sorted(history) if s - 1 in history and history[s] != history[s - 1]]
    last = max(changes, default=min(history, default=0))  # the live mask is the same from this step on
    info = dict(confidence=[round(v, 3) for v in ema.confidence().tolist()], raw_kept=net.kept(),
                live_mask_stable_for=f"{(cfg.learn_steps - last) / cfg.learn_steps:.0%} of the steps",
                trainable_frac=round(trainable / sum(p.numel() for p in model.parameters()), 4))
    return ema.kept(), info  # recoverability: only the mask leaves; the LoRA that judged it is discarded


def recover(cfg, pruned_ckpt, teacher, data, path):
    """Recovery fine-tuning of the exported shallow DiT, TinyFusion Table 5: plain diffusion loss, logits
    KD or Masked KD. Returns the checkpoint (kind "dit")."""
    torch.manual_seed(dit.seed_of(cfg.seed))
    student, diffusion = dit.build_dit(pruned_ckpt).train(), dit.Diffusion()
    if cfg.recover == "finetune":
        def loss_fn(m, xb, yb, step):
            return {k: v for k, v in diffusion.loss(m, xb, yb).items() if k in ("loss", "mse", "vb")}
    else:  # kd, maskedkd
        student.y_embedder.dropout_prob = 0.0  # recovery_loss drops labels, the same ones for the teacher

        def loss_fn(m, xb, yb, step):  # beta decays with the step: a resumed run continues the schedule
            return recovery_loss(m, teacher, diffusion, xb, yb, step / cfg.recover_steps, cfg)
    meta = {k: pruned_ckpt[k] for k in pruned_ckpt if k not in ("model", "ema")}
    ema_decay = dit.PRESET_TRAIN[cfg.preset or "cpu"]["ema_decay"]
    tcfg = train_config(cfg, path, cfg.recover_steps, cfg.recover_lr, ema_decay, 1.0, cfg.recover_lr_end)
    points = dit.curve_steps(cfg.curve, cfg.recover_steps)

    def curve_point(step, ema):  # --curve: the EMA model's quality at these recovery steps
        return {k: score_model(ema, cfg)[k] for k in ("score", "acc")} if step in points else None
    _, _, ck = dit.train(student, loss_fn, data, tcfg, meta, on_step=curve_point if points else None)
    return ck


# every setting a stage's result depends on, besides the teacher's weights
SEARCH_KEYS = ("preset", "data", "pattern", "batch_size", "learn_steps", "deltaw", "lora_rank", "lora_alpha",
               "lora_lr", "gate_lr", "tau_start", "tau_end", "scaling", "logit_init", "gate_ema", "seed",
               "dtype")
RECOVER_KEYS = ("preset", "data", "batch_size", "recover", "recover_steps", "recover_lr", "recover_lr_end",
                "seed", "dtype")
KD_KEYS = ("kd_sigma", "alpha_kd", "alpha_gt", "beta_rep")  # only for --recover kd / maskedkd
DIPGO_KEYS = ("ratio", "eval_steps", "cfg_scale", "dipgo_steps", "dipgo_batch", "dipgo_lr", "dipgo_alpha",
              "dipgo_dim", "seed", "backup", "dipgo_optim")


def save_pruned(cfg, pruned, kept, L, line, info):
    """Writes out/<d L_k kept>_pruned.pt (methods that agree share, and reuse, its files), prints the line.
    Returns the name."""
    name = f"d{L}_k{'-'.join(map(str, kept))}"
    if dit.is_main():
        dit.save_checkpoint(pruned, os.path.join(cfg.out, name + "_pruned.pt"))
    print(line + (f", {info}" if info else ""))
    return name


def stage_path(cfg, stage, teacher_ckpt, data):
    """A TinyFusion stage's checkpoint ("search", or the pruned model's name for its recovery): the name
    carries a hash of every setting the stage depends on (dit.run_key), so a re-run reuses it only then."""
    data_tag = dit.data_tag(*data)  # a result made from other data is not reused
    if stage == "search":
        key = dit.run_key(cfg, SEARCH_KEYS, teacher_ckpt, data_tag)
        tag = f"{cfg.pattern.replace(':', 'of')}_{cfg.deltaw}_{key}"
        return os.path.join(cfg.out, f"tinyfusion_{tag}_search.pt")
    keys = RECOVER_KEYS + KD_KEYS * (cfg.recover != "finetune") + dit.CURVE_KEYS * bool(cfg.curve)
    return os.path.join(cfg.out, f"{stage}_{cfg.recover}_{dit.run_key(cfg, keys, teacher_ckpt, data_tag)}.pt")


# ==================================================================================================
# Evaluate: shared by every pruning method (scores, speed, grids, the mask picture, the table)
# ==================================================================================================

def score_model(model, cfg):
    """fid.evaluate with the same noise (seed 0) for every variant; None when --eval-n 0."""
    if cfg.eval_n <= 0:
        return None
    return fid.evaluate(model, data=cfg.data, data_dir=cfg.data_dir, image_size=model.input_size,
                        n=cfg.eval_n, steps=cfg.eval_steps, cfg_scale=cfg.cfg_scale, seed=0, batch_size=100)


def fmt_score(r):
    if r is None:
        return "-"
    return f"{r['score']:.2f}" + (f" (acc {r['acc']:.2f})" if r.get("acc") is not None else "")


def spearman(xs, ys):
    """Spearman's rho and its two-sided p. For n <= 8 the p is exact: the share of the n! orderings of ys
    whose |rho| reaches the observed one (scipy's t approximation prints p = 0 for 3 points in order).
    rho = Pearson correlation of the ranks; the first ordering is the observed one."""
    if len(xs) > 8:
        return tuple(spearmanr(xs, ys))
    dx, dy = (r - r.mean() for r in (rankdata(xs), rankdata(ys)))
    rhos = np.array(list(itertools.permutations(dy))) @ dx / np.sqrt((dx @ dx) * (dy @ dy))
    return float(rhos[0]), float(np.mean(np.abs(rhos) >= abs(rhos[0]) - 1e-12))


def sampling_seconds(models, batch, steps, cfg_scale, reps=3):
    """Median seconds per DDIM + CFG generation at `batch` for every model of {name: model}, timed
    interleaved in one run (fid.time_sampling); steps: one count or {name: steps}."""
    times = fid.time_sampling(models, batch, steps, cfg_scale, reps)
    return {name: statistics.median(t) for name, t in times.items()}


def save_mask_png(rows, depth, path, cell=16):
    """Which blocks each method keeps: one row per (name, kept), black = kept, white = removed."""
    kept = torch.tensor([[0.0 if j in k else 1.0 for j in range(depth)] for _, k in rows])
    fid.heatmap_png(kept, path, cell, [name for name, _ in rows], bar="black = kept block")


def print_results(rows, device, cfg, path):
    """The final Markdown table (headed by dit.run_header) + results.json next to it."""
    print("\n" + dit.run_header(device, cfg.dtype, cfg.speed_batch, cfg.seed))
    print(dit.markdown_table(rows))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as f:
        json.dump(dict(config=asdict(cfg), rows=rows), f, indent=1)


def model_stats(model, device):
    x = torch.zeros(1, model.in_channels, model.input_size, model.input_size, device=device)
    t = torch.zeros(1, dtype=torch.long, device=device)
    return dit.param_count(model) / 1e6, dit.count_flops(model, x, t, t) / 1e9


def run_depth_pruning(cfg, methods, device):
    """Prune the base DiT with every method in `methods`, recover each the same way, then score, time and
    picture them all against the base in one run."""
    teacher_ckpt = dit.get_teacher(cfg.teacher, cfg.preset or "cpu", cfg.data, cfg.data_dir, cfg.device,
                                   cfg.seed)
    dit.method_preset(cfg, teacher_ckpt, PAPER)
    teacher = dit.build_dit(teacher_ckpt).to(device)
    data = dit.load_data(cfg.data, cfg.data_dir, teacher.input_size)[:2]
    batch = calib_batch(data, cfg.calib_n, cfg.seed, device)
    results = [tinyfusion(cfg, m, teacher_ckpt, teacher, data, batch) for m in methods]
    if not dit.is_main():  # under torchrun: rank 0 scores, times and writes; the others wait in dist_finish
        return results

    variants, timed, scores = {"base": teacher}, {"base": teacher}, {}
    for r in results:
        r["model"] = dit.build_dit(r["recovered"] or r["pruned"]).to(device)
        variants[r["method"]] = r["model"]
        timed.setdefault(f"depth {len(r['kept'])}", r["model"])  # same depth = the same network to time
    secs = sampling_seconds(timed, cfg.speed_batch, cfg.speed_steps, cfg.cfg_scale)
    L = len(teacher.blocks)
    params, gflops = model_stats(teacher, device)
    base_score = score_model(teacher, cfg)

    def cached_score(key, model):  # methods that keep the same blocks are scored once
        if key not in scores:
            scores[key] = score_model(model, cfg)
        return scores[key]
    rows = [dict(method="base", kept=f"all {L}", params=f"{params:.2f}M", GFLOPs=f"{gflops:.3f}",
                 sampling_s=f"{secs['base']:.2f}", speedup="1.00x",
                 calib_loss=f"{calib_loss(teacher, batch, keep_mask(range(L), L, device)):.4f}",
                 pruned=fmt_score(base_score), recovered=fmt_score(base_score))]
    for r in results:
        params, gflops = model_stats(r["model"], device)
        pruned_score = cached_score(("pruned", *r["kept"]), dit.build_dit(r["pruned"]).to(device))
        rec_score = None if r["recovered"] is None else cached_score(("recovered", *r["kept"]), r["model"])
        r.update(pruned_score=pruned_score, recovered_score=rec_score)
        sec = secs[f"depth {len(r['kept'])}"]
        rows.append(dict(method=r["method"], kept=",".join(map(str, r["kept"])), params=f"{params:.2f}M",
                         GFLOPs=f"{gflops:.3f}", sampling_s=f"{sec:.2f}",
                         speedup=f"{secs['base'] / sec:.2f}x",
                         calib_loss=f"{r['calib_loss']:.4f}", pruned=fmt_score(pruned_score),
                         recovered=fmt_score(rec_score)))
    save_mask_png([(r["method"], r["kept"]) for r in results], L, os.path.join(cfg.out, "kept_blocks.png"))
    dit.save_rows(variants, os.path.join(cfg.out, "samples.png"), steps=cfg.eval_steps)
    metric = next((r["pruned_score"]["metric"] for r in results if r["pruned_score"]), "quality")
    quality = f"{metric} (lower is better), {cfg.eval_n} samples, {cfg.eval_steps} DDIM steps, CFG " \
        f"{cfg.cfg_scale}" if cfg.eval_n else "not scored (--eval-n 0)"
    recovered = f"after {cfg.recover_steps} steps of {cfg.recover}" if cfg.recover != "none" else "none"
    print(f"\nquality = {quality}; pruned = right after pruning, recovered = {recovered}; sampling_s = "
          f"{cfg.speed_steps} DDIM steps + CFG at batch {cfg.speed_batch}")
    print_results(rows, device, cfg, os.path.join(cfg.out, "results.json"))
    print_rank_correlations(results)
    print(f"\nwrote {cfg.out}/kept_blocks.png and {cfg.out}/samples.png (rows: {', '.join(variants)})")
    if cfg.curve:
        pool_recovery_curves(cfg, results, teacher_ckpt)
    return results


def print_rank_correlations(results):
    """TinyFusion's point (Sec. 1, Fig. 2): the loss right after pruning barely predicts recovery. Spearman of
    the calibration loss and of the pruned quality with the recovered quality, over >= 3 distinct masks."""
    distinct = {tuple(r["kept"]): r for r in results if r["recovered_score"] and r["pruned_score"]}.values()
    if len(distinct) >= 3:
        rec = [r["recovered_score"]["score"] for r in distinct]
        for what, xs in (("calibration loss", [r["calib_loss"] for r in distinct]),
                         ("quality right after pruning", [r["pruned_score"]["score"] for r in distinct])):
            rho, p = spearman(xs, rec)
            print(f"Spearman({what}, recovered quality), {len(rec)} distinct masks: {rho:.2f} (p = {p:.2f})")


def pool_recovery_curves(cfg, results, teacher_ckpt):
    """--curve: each mask's points, pooled with every seed of the same settings; one table and curves.png."""
    same = dict({k: getattr(cfg, k) for k in SEARCH_KEYS + RECOVER_KEYS + dit.CURVE_KEYS if k != "seed"},
                teacher=dit.weights_tag(teacher_ckpt["ema"]))
    folder = os.path.join("out", f"prune_curves_{dit.settings_tag(same)}")
    for r in results:
        rows, png = fid.pool_curves(folder, f"{r['method']}_seed{cfg.seed}", r["recovered"]["evals"],
                                    ("method", "recovery steps"), xlabel="recovery fine-tuning steps")
    print(f"\nquality during recovery (n = {cfg.eval_n}, noise seed 0), {folder}:\n"
          f"{dit.markdown_table(rows)}\n{png}")


# ==================================================================================================
# Section 2: DiP-GO
# ==================================================================================================

# --- Section 2: DiP-GO. The algorithm: SuperNet -> pruner -> post-process -> cached sampler --------

def dipgo(base, cfg):
    """DiP-GO's algorithm (Sec. 3) as one box, for the reuse ratio cfg.ratio of a cfg.eval_steps-step sampler.
    Returns (the cached sampler, P(reuse) (K-1, N), the pruner's log rows)."""
    # 1. SuperNet: the K-step sampler, a keep / reuse gate on every (step >= 1, block) slot (CachedDiT.gates)
    # 2. pruner: a few steps of gradient descent on consistency + sparsity through all K steps (dipgo_loss)
    score, log = learn_scores(base, cfg)
    # 3. post-process: a falling threshold on P(reuse), output-side blocks first, up to the ratio's budget
    plan = postprocess(score, cfg.ratio, cfg.backup)
    # 4. the cached sampler: the static plan, every skipped block answered by its backup connection
    return CachedDiT(base, cfg.eval_steps, plan, cfg.backup).eval(), score, log


# --- Section 2: DiP-GO. Method: cache rule, gate, pruner, losses, post-processing -----------------

class BackupRule:
    """DiP-GO's backup connection, Sec. 3, and the cache behind it, for one rule. A skipped block at step t
    returns, from the entry its last run left: "output" (the official code, replicate_prv_feature) its
    previous output, h_out = O[b]; "residual" (ours [inferred for DiT], as Learning-to-Cache / FORA) its
    previous update added to today's input, h_out = h_in + D[b]. Under "output", the official cascade
    (update_query_status, cascade_nodes): in a chain the blocks before b only feed b, whose output is
    replaced, so a reuse of b skips blocks 0..b too."""
    def __init__(self, name="residual"):
        self.output = name == "output"

    def connect(self, h, cached):
        """What a skipped block returns: O[b], or h + D[b]."""
        return cached if self.output else h + cached

    def entry(self, h_in, h_out):
        """What a computed block leaves in the cache: O[b] = h_out, or D[b] = h_out - h_in."""
        return h_out if self.output else h_out - h_in

    def skips(self, b):
        """The blocks a reuse of block b skips at its step: 0..b (output) or b alone."""
        return slice(0, b + 1) if self.output else slice(b, b + 1)

    def cascade_gates(self, gates):
        """The effective gates (S, N, 2) = [reuse, keep] one-hot. Under "output", walking from the output
        side, a reusing block b pushes its reuse gate into block b-1:
            g[b-1] <- g[b-1] * g[b] + g[b]  if b-1 keeps,   g[b-1] * g[b]  if it reuses already."""
        if not self.output:
            return gates
        g = list(gates.unbind(1))
        for b in range(len(g) - 1, 0, -1):
            reuse, prev_keeps = g[b][:, :1] > 0.5, g[b - 1][:, :1] < 0.5
            g[b - 1] = torch.where(reuse, g[b - 1] * g[b] + g[b] * prev_keeps, g[b - 1])
        return torch.stack(g, 1)

    def cascade_plan(self, plan):
        """A plan (K, N) bool, True = compute, as it runs: under "output" a step that reuses block b reuses
        every block before it too."""
        return ~(~plan).int().flip(1).cummax(1).values.flip(1).bool() if self.output else plan


def gated_blocks(blocks, h, c, cache, gate, rule):
    """SuperNet step over the block stack, DiP-GO Sec. 3 (SuperNet; DiT reading [inferred]). For block b:
        h <- g_keep * Block_b(h, c) + g_reuse * rule.connect(h, cache[b])
    gate (N, 2) = [g_reuse, g_keep] per block, one-hot forward values (under the output rule already
    cascaded); None = step 0 (compute all). Every block is computed so that g_keep gets a gradient.
    Returns (h, new cache)."""
    new = []
    for b, block in enumerate(blocks):
        out = block(h, c)
        if gate is not None:
            out = gate[b, 1] * out + gate[b, 0] * rule.connect(h, cache[b])
        new.append(rule.entry(h, out))
        h = out
    return h, new


def cached_blocks(blocks, h, c, cache, plan, s, rule):
    """Step s of the plan (K, N) bool, True = compute, DiP-GO Sec. 3 (inference), the whole cache rule: a kept
    block runs and, when the next step reuses it (plan[s + 1, b] False), fills its cache entry; a skipped
    block returns rule.connect (one add, or nothing: under the output rule its cascade is skipped
    too)."""
    keep = plan[s].tolist()
    store = (~plan[s + 1]).tolist() if s + 1 < len(plan) else [False] * len(keep)
    for b, block in enumerate(blocks):
        if keep[b]:
            out = block(h, c)
            if store[b]:
                cache[b] = rule.entry(h, out)
            h = out
        else:
            h = rule.connect(h, cache[b])
    return h


class Pruner(nn.Module):
    """Pruner network, DiP-GO Sec. 3, and its straight-through gate: a learnable query per gated (step,
    block) -> a 1-layer single-head self-attention across the blocks of each step (Q, K in d/4) + FFN
    (d -> d/4 -> d), LayerNorms -> a separate 3-layer MLP head per (step, block) (d -> d/4 -> d/4 -> 2)
    with logits [reuse, keep] initialised to [0, 1] (P(keep) = 0.73)."""
    def __init__(self, steps, depth, dim=128):
        super().__init__()
        S, N, r = steps - 1, depth, dim // 4
        self.shape = (S, N, dim)
        self.query = nn.Embedding(S * N, dim)
        self.q, self.k, self.v = nn.Linear(dim, r), nn.Linear(dim, r), nn.Linear(dim, dim)
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.ffn = nn.Sequential(nn.Linear(dim, r), nn.ReLU(), nn.Linear(r, dim))
        M = S * N
        self.w1 = nn.Parameter(torch.randn(M, dim, r) / dim ** 0.5)
        self.b1 = nn.Parameter(torch.zeros(M, r))
        self.w2 = nn.Parameter(torch.randn(M, r, r) / r ** 0.5)
        self.b2 = nn.Parameter(torch.zeros(M, r))
        self.w3 = nn.Parameter(torch.zeros(M, r, 2))
        self.b3 = nn.Parameter(torch.tensor([0.0, 1.0]).repeat(M, 1))

    def forward(self):
        S, N, d = self.shape
        x = self.query.weight.view(S, N, d)  # the paper's SA + FFN encoder (the released code skips it)
        # A = softmax(Q K^T / sqrt(d/4)) V across the N blocks of each step
        att = (self.q(x) @ self.k(x).transpose(1, 2) / math.sqrt(d // 4)).softmax(-1)  # (S, N, N)
        x = self.norm1(x + att @ self.v(x))
        x = self.norm2(x + self.ffn(x))  # (S, N, d)
        x = x.reshape(S * N, d)
        h = F.relu(torch.einsum("md,mdr->mr", x, self.w1) + self.b1)
        h = F.relu(torch.einsum("mr,mrs->ms", h, self.w2) + self.b2)
        return (torch.einsum("mr,mrk->mk", h, self.w3) + self.b3).view(S, N, 2)

    @staticmethod
    def gate(logits):
        """Straight-through hard gate (DiP-GO Sec. 3; no Gumbel noise, as the code), logits (..., 2) = [reuse,
        keep]: forward = one-hot argmax of softmax(logits) (exactly 0/1), backward = the softmax gradient."""
        p = logits.softmax(-1)
        hard = F.one_hot(p.argmax(-1), 2).to(p.dtype)
        return hard + (p - p.detach())


def ssim(a, b, data_range=1.0, size=11, sigma=1.5):
    """Mean SSIM (Wang et al. 2004) with an 11x11 Gaussian window, per channel, images in [-1, 1]; the
    official code's constants c1 = 1e-4, c2 = 9e-4 (data range 1, although the images span 2)."""
    g = torch.exp(-(torch.arange(size, dtype=a.dtype, device=a.device) - size // 2) ** 2 / (2 * sigma ** 2))
    w = (g[:, None] * g[None]) / g.sum() ** 2
    w = w.expand(a.shape[1], 1, size, size)

    def blur(x):
        return F.conv2d(x, w, padding=size // 2, groups=a.shape[1])
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2  # official: 1e-4, 9e-4 (until 22d64e8: 4x)
    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b, cov = blur(a * a) - mu_a ** 2, blur(b * b) - mu_b ** 2, blur(a * b) - mu_a * mu_b
    # SSIM = (2 mu_a mu_b + c1)(2 cov + c2) / ((mu_a^2 + mu_b^2 + c1)(var_a + var_b + c2))
    s = (2 * mu_a * mu_b + c1) * (2 * cov + c2) / ((mu_a ** 2 + mu_b ** 2 + c1) * (var_a + var_b + c2))
    return s.mean()


def dipgo_loss(x, ref, logits, gates, ratio, alpha=1.0, cascade=1):
    """The pruner's objective, DiP-GO Sec. 3: L = L_cons + alpha L_sparse, where
        L_cons   = 1 - SSIM(x, ref)       x: the gated SuperNet's images, ref: the full sampler's
        L_sparse = [kept_hard > 1 - r] * mean_{t>=1, b} cascade[b] P_keep[t, b]
    logits (K-1, N, 2) = [reuse, keep]; gates: their hard straight-through values (effective: cascaded).
    Each block is 1/N of the stack's FLOPs; cascade[b] = how many blocks its reuse skips (1; the output rule:
    b + 1, the official sparse_lossv2's cascade ratios). Returns (loss, L_cons, mean P_keep, kept_hard)."""
    # assignment 7 begin: DiP-GO's consistency + sparsity loss
    cons = 1 - ssim(x.clamp(-1, 1), ref.clamp(-1, 1))  # the paper's default (the code also has MSE, L1)
    kept = gates[..., 1].detach().mean()
    p_keep = (logits.softmax(-1)[..., 1] * cascade).mean()
    sparse = p_keep * (kept > 1 - ratio).float()  # ours: off once kept <= 1 - r (code: stops at a fixed 0.2)
    return cons + alpha * sparse, cons, p_keep, kept
    # assignment 7 end


SGD_WARMUP = 10  # the official pruner's linear lr warm-up steps (train_sd15.sh --lr_warmup_steps)
THETA_START, THETA_STEP = 0.95, 0.05  # DiP-GO post-processing: the reuse threshold falls from 0.95 by 0.05


def postprocess(score, ratio, backup="residual"):
    """Scores -> static plan, DiP-GO Sec. 3 post-processing (code): every block kept, theta = 0.95; for
    each block, steps by falling reuse score, mark reuse (with its cascade, BackupRule.skips) where
    score > theta while at most round(r S N) slots are reused; theta -= 0.05 and repeat (theta >= 0). score
    (K-1, N) = P(reuse). Returns plan (K, N) bool, True = compute; row 0 (the first step) always computes."""
    (S, N), skips = score.shape, BackupRule(backup).skips
    target, reuse = round(ratio * S * N), torch.zeros(S, N, dtype=torch.bool)
    for k in range(round(THETA_START / THETA_STEP), -1, -1):  # theta = 0.95, 0.90, ..., 0 (official prune())
        theta = THETA_STEP * k
        for b in reversed(range(N)):  # output side first, as both official prune() (block_names[::-1])
            dead = skips(b)
            for t in score[:, b].argsort(descending=True).tolist():
                if score[t, b] > theta:
                    if int(reuse.sum()) + int((~reuse[t, dead]).sum()) > target:
                        break  # ours: up to the target (official: strictly below it)
                    reuse[t, dead] = True
    return torch.cat([torch.ones(1, N, dtype=torch.bool), ~reuse])


def uniform_plan(steps, depth, ratio):
    """Baseline (a), DeepCache / FORA style: whole steps reuse every block, spread evenly (Bresenham)
    so that round(r (K-1)) of the K-1 steps reuse; the last step always computes."""
    c = steps - 1 - round(ratio * (steps - 1))  # computed steps among 1..K-1
    keep = [s == 0 or (s * c) // (steps - 1) > ((s - 1) * c) // (steps - 1) for s in range(steps)]
    return torch.tensor(keep)[:, None].expand(steps, depth).clone()


def random_plan(steps, depth, ratio, seed=0, backup="residual"):
    """Baseline (b): a random plan with DiP-GO's budget (at most round(r (K-1) N) reused slots): slots in a
    random order, each reused (with its cascade, BackupRule.skips) while the budget allows."""
    S, skips = steps - 1, BackupRule(backup).skips
    target, reuse = round(ratio * S * depth), torch.zeros(S, depth, dtype=torch.bool)
    for i in torch.randperm(S * depth, generator=dit.rng(seed)).tolist():
        t, dead = i // depth, skips(i % depth)
        if int(reuse.sum()) + int((~reuse[t, dead]).sum()) <= target:
            reuse[t, dead] = True
    return torch.cat([torch.ones(1, depth, dtype=torch.bool), ~reuse])


# --- Section 2: DiP-GO. Apply: the SuperNet / cached model, pruner training, checkpoint -----------

class CachedDiT(nn.Module):
    """A DiT that runs a DiP-GO plan inside any sampler (dit.sample / generate / fid.evaluate). It knows
    its step from t (the respaced schedule of `steps`, walked from its last entry down) and resets the cache
    at step 0. With `gates` set ((K-1, N, 2), training), it is the gated SuperNet instead. backup: the rule
    a skipped block follows (BackupRule); under "output" the plan runs with its cascade."""
    def __init__(self, model, steps, plan=None, backup="residual"):
        super().__init__()
        self.dit, self.steps = model, steps
        dit.samples_like(self, model)
        tmap = dit.Diffusion().respace(steps).timestep_map
        self.step_of = {int(t): steps - 1 - i for i, t in enumerate(tmap)}
        N = len(model.blocks)
        plan = torch.ones(steps, N, dtype=torch.bool) if plan is None else plan.bool().cpu()
        self.rule = BackupRule(backup)
        self.plan = self.rule.cascade_plan(plan)
        self.gates, self.cache = None, None

    def forward(self, x, t, y):
        s = self.step_of.get(int(t[0]))
        if s is None:
            raise ValueError(f"t={int(t[0])} is not on the {self.steps}-step schedule of this plan; "
                             f"sample with steps={self.steps}")
        if s == 0:
            self.cache = [None] * len(self.dit.blocks)
        h, c = self.dit.embed(x, t, y)
        if self.gates is not None:
            gate = None if s == 0 else self.gates[s - 1]
            h, self.cache = gated_blocks(self.dit.blocks, h, c, self.cache, gate, self.rule)
        else:
            h = cached_blocks(self.dit.blocks, h, c, self.cache, self.plan, s, self.rule)
        return self.dit.head(h, c)


def learn_scores(base, cfg, log=print):
    """Few-step gradient optimisation of the pruner, DiP-GO Sec. 3 (code): per step, fresh labels and
    noise (no images), the full sampler's image (no grad) vs the gated SuperNet's (grad through all K steps):
        L = L_cons + alpha * [kept_hard > 1 - r] * mean_{t>=1, b} cascade[b] P_keep[t, b]
    (dipgo_loss; under the output rule the gates are cascaded, BackupRule.cascade_gates). Optimiser: Adam
    (ours) or SGD, weight decay 1e-4, cosine with 10 warm-up steps (the official train_sd15.py). Returns
    (P(reuse) (K-1, N), log rows)."""
    K, N, B = cfg.eval_steps, len(base.blocks), cfg.dipgo_batch
    device = next(base.parameters()).device
    torch.manual_seed(dit.seed_of(cfg.seed))
    pruner = Pruner(K, N, cfg.dipgo_dim).to(device)
    if cfg.dipgo_optim == "sgd":  # the official optimiser (lr 0.2 = 0.1 x batch 1 x grad-accum 2)
        opt = torch.optim.SGD(pruner.parameters(), lr=cfg.dipgo_lr, weight_decay=1e-4)
        cosine = types.SimpleNamespace(warmup=SGD_WARMUP, lr_end=0.0, steps=cfg.dipgo_steps)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: dit.lr_factor(i, cosine))
    else:
        opt, sched = torch.optim.Adam(pruner.parameters(), lr=cfg.dipgo_lr), None  # ours
    net = CachedDiT(base, K, backup=cfg.backup)
    sizes = [len(range(N)[net.rule.skips(b)]) for b in range(N)]  # blocks each reuse skips
    cascade = torch.tensor(sizes, dtype=torch.float32, device=device)
    C, S, rows, prev = base.in_channels, base.input_size, [], None
    for it in range(cfg.dipgo_steps):
        g = dit.rng(cfg.seed * dit.STRIDE + it)  # ours: fresh labels and noise each step (code: fixed noise)
        y = torch.randint(0, base.num_classes, (B,), generator=g).to(device)
        z = torch.randn(B, C, S, S, generator=g).to(device)
        t0 = time.time()
        with torch.no_grad():
            ref = dit.sample(base, z, y, K, "ddim", cfg_scale=cfg.cfg_scale)
        logits = pruner()  # (K-1, N, 2)
        net.gates = net.rule.cascade_gates(pruner.gate(logits))
        x = dit.sample(net, z, y, K, "ddim", cfg_scale=cfg.cfg_scale)
        loss, cons, sparse, kept = dipgo_loss(x, ref, logits, net.gates, cfg.ratio, cfg.dipgo_alpha, cascade)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(pruner.parameters(), 1.0)
        lr = opt.param_groups[0]["lr"]  # this step's
        opt.step()
        if sched:
            sched.step()
        hard, p = net.gates[..., 1].detach(), logits.detach().softmax(-1)[..., 1]
        flips, prev = 0 if prev is None else int((hard != prev).sum()), hard  # slots whose decision changed
        rows.append(dict(step=it + 1, lr=round(lr, 5), cons=round(cons.item(), 4),
                         sparse=round(sparse.item(), 4), kept=round(kept.item(), 3), flips=flips,
                         saturated=round(((p < 0.01) | (p > 0.99)).float().mean().item(), 3),
                         s=round(time.time() - t0, 2)))
        if log and (it % 5 == 4 or it == cfg.dipgo_steps - 1):
            log(" ".join(f"{k} {v}" for k, v in rows[-1].items()))
    with torch.no_grad():
        return pruner().softmax(-1)[..., 0].cpu(), rows


def build_dipgo(ckpt):
    """A CachedDiT from a kind "dipgo" checkpoint (base DiT config, EMA weights, plan, steps), eval mode."""
    backup = ckpt.get("backup", "residual")  # plans saved before commit cc7cf8e all used the residual rule
    return CachedDiT(dit.build_dit(ckpt), ckpt["steps"], ckpt["plan"], backup).eval()


def save_dipgo(base_ckpt, plan, score, cfg, ratio, path, metrics=None, key=None):
    dit.save_checkpoint(dict(kind="dipgo", config=base_ckpt["config"], model=base_ckpt["ema"],
                             ema=base_ckpt["ema"], plan=plan, score=score, steps=cfg.eval_steps, ratio=ratio,
                             backup=cfg.backup,
                             dipgo_config=dataclasses.asdict(cfg), metrics=metrics or {}, key=key), path)


# --- Section 2: DiP-GO. Evaluate: compute accounting, timing, quality, pictures -------------------

def block_flops(model):
    """(FLOPs of one block, FLOPs of everything else) for one image and one forward."""
    S, dev = model.input_size, next(model.parameters()).device
    x, t = torch.zeros(1, model.in_channels, S, S, device=dev), torch.zeros(1, dtype=torch.long, device=dev)
    h, c = model.embed(x, t, t)
    fb = dit.count_flops(model.blocks[0], h, c)
    return fb, dit.count_flops(model, x, t, t) - len(model.blocks) * fb


def ideal_speedup(plan, fb, frest, steps):
    """FLOPs(full sampler) / FLOPs(plan or fewer steps): embedding and head run at every step."""
    N = plan.shape[1]
    return steps * (frest + N * fb) / (len(plan) * frest + int(plan.sum()) * fb)


def save_heatmap(score, plan, path, cell=12):
    """PNG: left P(reuse) (white = 1; the first step, always computed, black), right the plan (black =
    compute, white = reuse); rows = sampler steps (first at the top), columns = blocks."""
    K, N = plan.shape
    sc = torch.cat([torch.zeros(1, N), score])  # (K, N)
    fid.heatmap_png(torch.cat([sc, torch.ones(K, 1), (~plan).float()], 1), path, cell,
                    bar="left: P(reuse); right: white = reuse")


def dipgo_variants(base, score, ratio, cfg):
    """DiP-GO's plan and the matched-compute baselines for one ratio: [(name, model, steps, plan)]: uniform
    caching and a random plan under DiP-GO's backup rule, uniform caching under the other rule, fewer-step
    DDIM with as many block calls."""
    K, N, backup = cfg.eval_steps, len(base.blocks), cfg.backup
    other = "residual" if backup == "output" else "output"
    plans = {f"DiP-GO r={ratio}": (postprocess(score, ratio, backup), backup),
             f"uniform r={ratio}": (uniform_plan(K, N, ratio), backup),
             f"random r={ratio}": (random_plan(K, N, ratio, cfg.seed, backup), backup),
             f"uniform-{other} r={ratio}": (uniform_plan(K, N, ratio), other)}
    fewer = max(1, round(K * plans[f"DiP-GO r={ratio}"][0].float().mean().item()))  # as many block calls
    return ([(name, CachedDiT(base, K, p, b).eval(), K, p) for name, (p, b) in plans.items()]
            + [(f"DDIM-{fewer} r={ratio}", base, fewer, torch.ones(fewer, N, dtype=torch.bool))])


def longest_reuse(plan):
    """Per block of a (K, N) plan, the most consecutive steps reusing it (how long its cache stays stale)."""
    runs = ["".join(" x"[r] for r in col).split() for col in (~plan).T.tolist()]  # each block's reuse runs
    return [max([0] + [len(run) for run in block]) for block in runs]


def dipgo_main(cfg):
    """DiP-GO (Sec. 3) per ratio: the gated SuperNet's pruner (learn_scores) -> post-processing (postprocess)
    -> the cached sampler (CachedDiT), saved as kind "dipgo"; then one table against the baselines at
    matched compute: blocks kept, ideal and measured speed-up (same batch), quality, PSNR vs full."""
    device = dit.pick_device(cfg.device)
    base_ckpt = dit.get_teacher(cfg.teacher, cfg.preset or "cpu", cfg.data, cfg.data_dir, cfg.device,
                                cfg.seed)
    dit.method_preset(cfg, base_ckpt, PAPER)
    if not dit.is_main():  # the pruner needs no data parallelism: rank 0 does all of DiP-GO
        return []
    base = dit.build_dit(base_ckpt).to(device).requires_grad_(False)
    K, N = cfg.eval_steps, len(base.blocks)
    ratios = dit.number_list(cfg.ratios, PruneConfig, "ratio", "--ratios") if cfg.ratios else [cfg.ratio]
    os.makedirs(cfg.out, exist_ok=True)
    variants = [("full", base, K, torch.ones(K, N, dtype=torch.bool))]
    for r in ratios:
        print(f"\n== DiP-GO pruner, ratio {r}: {cfg.dipgo_steps} steps, batch {cfg.dipgo_batch}, "
              f"{K}-step DDIM")
        t0 = time.time()
        score = pruner_scores(cfg, base, base_ckpt, r)
        vs = dipgo_variants(base, score, r, cfg)
        plan = vs[0][3]
        save_heatmap(score, plan, os.path.join(cfg.out, f"dipgo_r{r}_plan.png"))
        print(f"{time.time() - t0:.0f} s; reused slots {int((~plan).sum())} of {(K - 1) * N} "
              f"(target {r * (K - 1) * N:.1f})")
        variants += vs
    rows, scores = compare_variants(cfg, base, variants, device)
    dit.save_rows({v[0]: v[1] for v in variants}, os.path.join(cfg.out, "dipgo_samples.png"), 0,
                  [v[2] for v in variants], cfg.cfg_scale)
    print(f"\nbase {cfg.teacher}: {N} blocks, {K}-step DDIM, CFG {cfg.cfg_scale}; quality = fid.evaluate, "
          f"{cfg.eval_n} samples (lower is better); speed-up = {K}-step sampling at batch {cfg.speed_batch} "
          f"vs full; blocks kept = block calls / ({K} x {N}); dipgo_samples.png: a row per variant")
    print_results(rows, device, cfg, os.path.join(cfg.out, "dipgo_results.json"))
    for r in ratios if cfg.eval_n else []:
        print(strongest_baseline(scores, r))
    return rows


def strongest_baseline(scores, r):
    """The verdict line of ratio r: DiP-GO's score against the best baseline of the same compute (caching
    under either rule, a random plan, fewer-step DDIM), one seed."""
    ours = f"DiP-GO r={r}"
    rivals = {n: s["score"] for n, s in scores.items() if n.endswith(f" r={r}") and n != ours}
    name = min(rivals, key=rivals.get)
    s, best = scores[ours]["score"], rivals[name]
    word = "better than" if s < best else "worse than" if s > best else "equal to"
    return f"r = {r}: DiP-GO {s:.2f} is {word} the strongest equal-compute baseline, {name} {best:.2f}" \
        " (one seed; lower is better)"


def pruner_scores(cfg, base, base_ckpt, r):
    """P(reuse) (K-1, N) of ratio r: learn_scores, saved with its plan to out/dipgo_r<r>.pt, or reused from
    there when every setting that made them is equal (its key)."""
    t0, path = time.time(), os.path.join(cfg.out, f"dipgo_r{r}.pt")
    key = dit.run_key(dataclasses.replace(cfg, ratio=r), DIPGO_KEYS, base_ckpt)
    old = dit.load_checkpoint(path, kinds=["dipgo"]) if os.path.exists(path) else {}
    if old.get("key") == key:
        print(f"reusing the scores in {path}: every setting that made them is equal (key {key})")
        return old["score"]
    _, score, log = dipgo(base, dataclasses.replace(cfg, ratio=r))
    metrics = dict(learn_s=round(time.time() - t0, 1), log=log)
    save_dipgo(base_ckpt, postprocess(score, r, cfg.backup), score, cfg, r, path, metrics, key)
    return score


def compare_variants(cfg, base, variants, device):
    """(table rows, {name: score}): every variant's blocks kept, ideal and measured speed-up (interleaved
    timing, same batch), quality and PSNR against the full sampler from the same noise."""
    K, N = cfg.eval_steps, len(base.blocks)
    print(f"\ntiming {len(variants)} variants ({K} DDIM steps + CFG, batch {cfg.speed_batch}) ...")
    secs = sampling_seconds({v[0]: v[1] for v in variants}, cfg.speed_batch, {v[0]: v[2] for v in variants},
                            cfg.cfg_scale)
    fb, frest = block_flops(base)
    z = torch.randn(cfg.speed_batch, base.in_channels, base.input_size, base.input_size,
                    generator=dit.rng(1, "eval")).to(device)
    yz = torch.arange(cfg.speed_batch, device=device) % base.num_classes
    with torch.no_grad():
        ref = dit.sample(base, z, yz, K, "ddim", cfg_scale=cfg.cfg_scale).clamp(-1, 1)
    rows, scores = [], {}
    for name, model, steps, plan in variants:
        with torch.no_grad():
            x = dit.sample(model, z, yz, steps, "ddim", cfg_scale=cfg.cfg_scale).clamp(-1, 1)
        # PSNR = 10 log10(range^2 / MSE), range 2 for [-1, 1] images, against the full sampler, same noise
        psnr = 10 * math.log10(4 / max(F.mse_loss(x, ref).item(), 1e-20))
        ideal = ideal_speedup(plan, fb, frest, K)
        q = scores[name] = score_model(model, dataclasses.replace(cfg, eval_steps=steps))
        rows.append({"variant": name, "blocks kept": f"{plan.sum().item() / (K * N):.3f}",
                     "longest reuse, blocks 0..N-1": "/".join(map(str, longest_reuse(plan))),
                     "ideal speedup": f"{ideal:.2f}x",
                     "measured speedup": f"{secs['full'] / secs[name]:.2f}x",
                     "measured/ideal": f"{secs['full'] / secs[name] / ideal:.2f}",
                     "quality": fmt_score(q), "PSNR vs full": "inf" if psnr > 150 else f"{psnr:.1f} dB"})
    return rows, scores


# ===== plumbing: nothing paper-specific below (config, main) ======================================

DEPTH_METHODS = ("tinyfusion", "first", "last", "uniform", "shortgpt", "sensitivity", "magnitude", "taylor",
                 "randmin", "random", "index")


@dataclass
class PruneConfig:
    method: str = "tinyfusion"   # tinyfusion | first | last | uniform | shortgpt | sensitivity | magnitude
    #                              | taylor | randmin | random | index, a comma list of them, or all (all but
    #                              index); dipgo (Section 2)
    teacher: str = "weights/dit_shapes.pt"  # base DiT (shipped; out/dit.pt after python dit.py)
    preset: str = ""             # "" = the base's (cpu when it must be trained); cifar / imagenet64 -> PAPER
    data: str = "shapes"         # shapes (embedded) | cifar10 | imagenet64, as dit.py
    data_dir: str = "data"       # where cifar10 / imagenet64 live
    out: str = "out/prune"       # folder for every stage's checkpoint, the PNGs and results.json
    pattern: str = "1:2"         # N:M: keep N of every M consecutive blocks (1:2 paper default; 3:6 = global)
    kept: str = ""               # --method index: the kept block indices, e.g. 0,2,5
    batch_size: int = 64         # >=1: batch for mask learning and recovery (paper: 128 / 256)
    learn_steps: int = 2000      # >=1: mask-learning steps (paper ~10K = 1 ImageNet epoch); 2000: settled
    deltaw: str = "lora"         # recoverability update during learning: lora | full | frozen (paper Table 4)
    lora_rank: int = 8           # >=1: LoRA rank r (paper 8)
    lora_alpha: float = 16.0     # >0: LoRA alpha (paper 2r)
    lora_lr: float = 1e-3        # >0: lr of LoRA (all weights for --deltaw full); paper 1e-4 [inferred 1e-3]
    gate_lr: float = 1e-3        # >0: lr of the pattern logits (paper 1e-3)
    tau_start: float = 4.0       # >0: Gumbel-softmax temperature at step 0 (paper 4) ...
    tau_end: float = 0.1         # >0: ... annealed linearly to this (paper 0.1)
    scaling: float = 100.0       # >0: logit multiplier s (paper 100, constant)
    logit_init: float = 0.02     # (-inf,inf): every pattern logit starts here (uniform; paper 0.02)
    gate_ema: float = 0.999      # [0,1): EMA decay of the logits (and LoRA); final mask = argmax of EMA
    calib_n: int = 128           # >=1: calibration samples for the score-based baselines and the loss column
    random_masks: int = 100      # >=1: randmin: random k-of-L masks tried (all of them if C(L, k) is smaller)
    recover: str = "finetune"    # none | finetune | kd (logits KD) | maskedkd (paper's TinyDiT recipe)
    recover_steps: int = 300     # >=1: recovery steps, identical for every method (paper 100K / 500K)
    recover_lr: float = 1e-3     # >0: recovery peak lr (paper 2e-4) [inferred for CPU] ...
    recover_lr_end: float = 0.5  # [0,1]: ... cosine-annealed to recover_lr * this (paper 2e-4 -> 1e-4)
    kd_sigma: float = 2.0        # >=0: Masked KD keeps |h - mu| < k sigma (paper 2; 0 = unmasked RepKD)
    alpha_kd: float = 0.9        # >=0: weight of the output KD term (paper 0.9)
    alpha_gt: float = 0.1        # >=0: weight of the ground-truth diffusion loss (paper 0.1)
    beta_rep: float = 1e-2       # >=0: weight of the hidden-state term, decays linearly to 0 (paper 1e-2)
    curve: str = ""              # recovery steps to score each mask at, e.g. 150,300: a table and curves.png
    #                              over every method and --seed run with these settings (out/prune_curves_*)
    eval_n: int = 200            # >=0: samples per quality score (fid.evaluate); 0 = skip the quality columns
    eval_steps: int = 20         # [1,1000]: DDIM steps for scores, block influence and grids; DiP-GO's K
    cfg_scale: float = 1.5       # >=0: classifier-free guidance for scores and grids (DiT FID setting)
    speed_batch: int = 64        # >=1: sampling batch for the speed-up column (the claim: 64)
    speed_steps: int = 10        # [1,1000]: DDIM steps timed per model, 3 interleaved repeats, median
    # Section 2, DiP-GO (--method dipgo); it also uses teacher, out, eval_n, eval_steps (= K, the plan's DDIM
    # schedule), cfg_scale, speed_batch and seed from above
    ratio: float = 0.5           # (0,1): fraction of (step >= 1, block) evaluations reused (paper 0.3-0.8)
    ratios: str = ""             # comma list ("0.3,0.5,0.7"): a plan per ratio, overrides --ratio
    dipgo_steps: int = 30        # >=1: pruner optimisation steps (official: 500)
    dipgo_batch: int = 4         # >=1: (label, noise) pairs per pruner step (paper: 1, grad-accum 2)
    dipgo_lr: float = 0.005      # >0: pruner lr (Adam [inferred; 0.02 flips all]); --dipgo-optim sgd: 0.2
    #                              unless given (official: 0.1 x batch 1 x grad-accum 2)
    dipgo_optim: str = "adam"    # adam (ours) | sgd (official: weight decay 1e-4, cosine, 10 warm-up steps)
    backup: str = "residual"     # a skipped block returns: residual (ours, h + D[b]) | output (official: its
    #                              cached output O[b], blocks before it skipped too: the cascade)
    dipgo_alpha: float = 1.0     # >=0: sparsity weight (paper 1.0, ablated 0.1-2.0)
    dipgo_dim: int = 128         # >=1: pruner query width d (paper 512)
    seed: int = 0                # >=0: seeds masks, LoRA, data order; scores and grids: noise seed 0
    device: str = "auto"         # auto | cpu | cuda | mps
    dtype: str = "float32"       # float32 | bfloat16 | float16 (autocast during training)


# On the GPU presets, flags left at their CPU defaults take the paper's values (TinyFusion Sec. 4: LoRA lr
# 1e-4, logits 10x, recovery 2e-4 -> 1e-4; the EMA constant from a copy, as DiT)
PAPER = dict(lora_lr=1e-4, gate_lr=1e-3, recover_lr=2e-4)


def main(argv=None):
    cfg = dit.check(dit.parse_args(PruneConfig, argv),
                    dict(deltaw=("lora", "full", "frozen"), recover=("none", "finetune", "kd", "maskedkd"),
                         dtype=dit.DTYPES, dipgo_optim=("adam", "sgd"), backup=("residual", "output")))
    if cfg.dipgo_optim == "sgd" and "dipgo_lr" not in dit.given_flags(argv):
        cfg.dipgo_lr = 0.2  # the official SGD lr (the default 0.005 is ours, for Adam)
    methods = [m for m in DEPTH_METHODS if m != "index"] if cfg.method == "all" else cfg.method.split(",")
    if cfg.method != "dipgo" and not all(m in DEPTH_METHODS for m in methods):
        sys.exit(f"error: unknown --method {cfg.method!r}; choose {', '.join(DEPTH_METHODS)}, all or dipgo")
    if cfg.method == "dipgo":
        dit.number_list(cfg.ratios or str(cfg.ratio), PruneConfig, "ratio", "--ratios")
        if cfg.curve:  # the pruner-step curves left the code after commit 8e03369 (docs/prune.md)
            sys.exit("error: --curve scores a TinyFusion recovery; DiP-GO takes no --curve")
    dit.curve_steps(cfg.curve, cfg.recover_steps, "recovery steps (--recover-steps)")
    if cfg.curve and not (cfg.eval_n and cfg.recover != "none"):
        sys.exit("error: --curve scores a TinyFusion recovery: it needs --eval-n > 0 and a --recover")
    dit.check_writable(cfg.out, folder=True)
    device = dit.pick_device(cfg.device)
    dit.dist_setup(device)
    print(json.dumps(asdict(cfg)))
    out = dipgo_main(cfg) if cfg.method == "dipgo" else run_depth_pruning(cfg, methods, device)
    dit.dist_finish()
    return out


if __name__ == "__main__":
    main()
