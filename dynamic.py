"""
dynamic.py: DyDiT, a DiT whose width follows the timestep and whose MLPs skip easy tokens.

Paper: "Dynamic Diffusion Transformer", Wangbo Zhao, Yizeng Han, Jiasheng Tang, Kai Wang, Yibing Song,
Gao Huang, Fan Wang, Yang You, ICLR 2025, arXiv 2410.03456. Two routers per block decide how much of the
block to run. Timestep-wise Dynamic Width (TDW) reads only the timestep embedding E_t and switches
attention heads and MLP channel groups on or off, so the width is a pure function of t. Spatial-wise
Dynamic Token (SDT) reads each token after the attention residual and lets it skip the MLP. A FLOPs loss
pulls the batch-mean compute ratio to a target lambda while the pretrained DiT is fine-tuned.
The released code only multiplies activations by the masks, which saves nothing. Here the inference path
slices the weights per sampling step (the masks depend on t alone) and runs each MLP only on the kept
tokens of the whole batch. It equals the masked training graph to fp32 rounding (test_all.py).

Paper / reference code -> this file
    Sec. 3.1 TDW routers on E_t, head 0 / group 0 always on  -> Routers.width (H groups, H heads)
    Sec. 3.1 Gumbel-sigmoid, tau 5, straight-through          -> gumbel_sigmoid
    Sec. 3.2 SDT token router (D -> D/16 -> 1), MLP bypass    -> Routers.tokens; sdt_mlp
    Sec. 3.3 per-sample FLOPs ratio, w (mean - lambda)^2      -> flops_ratio, flops_loss, dydit_loss
    Sec. 3.4 complete-model warm-up, lambda ramp, t strata    -> dydit_loss, lam_target, stratified_steps
    importance ordering (paper; commented out in the code)    -> reorder_
    inference: skip masked heads / channels (author, issue 3) -> DyDiT.slices, sliced_forward
    batched token gather / scatter (DyFLUX code)              -> sdt_mlp (gather=True)
    the algorithm: routers -> fine-tune -> slice              -> finetune (then build_dydit)

[inferred]: the slicing recipe and its cache; the importance score (L1 norm of a unit's weights); the
half-width baseline (magnitude pruning of half the heads and groups); TDW router weights starting at 0
(code: Xavier); for a few hundred CPU
steps (paper: 50k-200k) a router lr of 0.005 (0.05 saturates the TDW logits on the shipped base, whose
|E_t| is about 60: Adam moves each logit by lr x |E_t|_1 per step), EMA 0.99, FLOPs weight w = 10 (paper 2:
with 2 the ratio lagged the ramp, 0.60 after 200 steps at lambda 0.5) and a scaled-down hold / ramp / warm-up.

Run:
    python dynamic.py --lam 0.5             # fine-tune the shipped base 800 steps, evaluate (docs: times)
    python dynamic.py --sweep               # lambda 0.7/0.5/0.3, static and half-width baselines, ablations
    python dynamic.py --mode halfwidth      # one baseline alone (modes: see DyConfig.mode)
    python sample.py --ckpt out/dydit_dydit_0.5_<hash>.pt   # any sampler runs a DyDiT checkpoint
Measured results (2 CPU cores): docs/dynamic.md. Mask -> weight slice: DyDiT.slices.
Settled options that left the code (--token-bias, --router-init, --ema-warmup, the random-router mode,
--recipe official: train.py's settings, now given as flags) keep their numbers in docs/dynamic.md.
"""
import dataclasses
import functools
import json
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

import dit
import fid
from dit import modulate

# --- The algorithm: routers -> fine-tune with the FLOPs loss -> slice -----------------------------

def finetune(cfg, base_ckpt, quiet=False):
    """DyDiT's algorithm (Sec. 3) as one box: routers -> fine-tune with the FLOPs loss -> slice; the static
    and half-width baselines take the same steps. Returns the checkpoint dict (kind "dydit", or "dit" for
    mode static); build_dydit(ckpt) is step 3."""
    data = dit.load_data(cfg.data, cfg.data_dir, base_ckpt["config"]["input_size"])[:2]
    diffusion = dit.Diffusion()
    torch.manual_seed(dit.seed_of(cfg.seed))
    net = dit.build_dit(base_ckpt).train()
    if cfg.reorder or cfg.mode == "halfwidth":
        reorder_(net)  # importance order: the heads / groups a router switches off first sit last
    if cfg.mode == "static":  # the control: the same steps and t strata, no routers
        loss = functools.partial(static_loss, diffusion=diffusion)
        return train_run(cfg, base_ckpt, net, loss, data, quiet)
    # 1. routers: TDW on E_t (heads, MLP channel groups; Sec. 3.1), SDT on each token (MLP skip; Sec. 3.2)
    model = DyDiT(net, cfg.mode, cfg.lam, cfg.tau)
    if cfg.mode == "halfwidth":  # magnitude pruning: after reorder_ the first H/2 heads / groups are largest
        model.fixed[:, :, net.num_heads // 2:] = 0
    # 2. fine-tune: L_diff + w (mean_b r_b - lambda)^2 (Sec. 3.3), the routers at their own lr [ours]
    groups = [dict(params=list(net.parameters())),
              dict(params=list(model.routers.parameters()), lr=cfg.router_lr)]
    loss = functools.partial(dydit_loss, diffusion=diffusion, cfg=cfg)
    ck = train_run(cfg, base_ckpt, model, loss, data, quiet, [g for g in groups if g["params"]])
    # 3. slice: at load, build_dydit turns each timestep's masks into weight slices (DyDiT.slices)
    return ck


# --- Method: routers, masks, the masked (training) graph and the sliced (inference) graph ---------

def gumbel_sigmoid(logits, tau, training):
    """Binary mask from router logits, DyDiT Sec. 3.1: Gumbel-sigmoid with a straight-through estimator
    in training, deterministic 1[sigmoid(l) > 0.5] = 1[l > 0] at inference."""
    if not training:
        return (logits > 0).float()
    # assignment 8 begin: DyDiT's Gumbel-sigmoid router
    u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
    # y_soft = sigmoid((l + log u - log(1 - u)) / tau); logistic noise = a difference of two Gumbels
    soft = torch.sigmoid((logits + torch.log(u) - torch.log1p(-u)) / tau)
    hard = (soft > 0.5).float()
    return hard - soft.detach() + soft  # forward: hard; backward: d soft
    # assignment 8 end


def flops_ratio(blocks, T, used):
    """Per-sample FLOPs ratio r_b, DyDiT Sec. 3.3 (code loss.py), from the share of each block l that ran:
    used[l] = (heads on / H, MLP groups on / H, tokens through the MLP / N), each (B,) or a number.
        r_b = sum_l [A_l heads_l + M_l groups_l tokens_l] / sum_l (A_l + M_l),
        A_l = 4 N D^2 + 2 N^2 D (attention MACs), M_l = 2 N D hidden (MLP MACs)."""
    cost, total = blocks[0].attn.qkv.weight.new_zeros(()), 0.0
    for block, (heads, groups, tokens) in zip(blocks, used):
        D, hidden = block.attn.qkv.in_features, block.mlp.fc1.out_features
        A, M = 4 * T * D * D + 2 * T * T * D, 2 * T * D * hidden
        cost = cost + A * heads + M * groups * tokens
        total += A + M
    return cost / total


def flops_loss(ratio, lam, weight):
    """FLOPs-constrained loss, DyDiT Sec. 3.3: w (mean_b r_b - lambda)^2, the squared error of the
    batch-mean FLOPs ratio r_b (flops_ratio) to the target lambda."""
    # assignment 9 begin: DyDiT's FLOPs-ratio loss
    return weight * (ratio.mean() - lam) ** 2
    # assignment 9 end


WIDTH_BIAS, TOKEN_BIAS = 15.0, 35.0  # the routers' last biases at init (DyDiT code): every unit starts on


class Routers(nn.Module):
    """DyDiT's routers, per block: TDW D -> H-1 head / group logits on E_t (Sec. 3.1), SDT D -> D/16 -> ReLU
    -> 1 per token (Sec. 3.2). Biases +15 (TDW) and +35 (SDT) so every unit starts on (DyDiT code)."""
    def __init__(self, D, H, depth):
        super().__init__()
        self.attn = nn.ModuleList(nn.Linear(D, H - 1) for _ in range(depth))
        self.mlp = nn.ModuleList(nn.Linear(D, H - 1) for _ in range(depth))
        self.token = nn.ModuleList(nn.Sequential(nn.Linear(D, D // 16), nn.ReLU(), nn.Linear(D // 16, 1))
                                   for _ in range(depth))
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        for lin in list(self.attn) + list(self.mlp):
            nn.init.constant_(lin.bias, WIDTH_BIAS)
            nn.init.zeros_(lin.weight)  # ours: every unit on for any E_t (code: Xavier, 9% off at step 0)
        for r in self.token:
            nn.init.constant_(r[-1].bias, TOKEN_BIAS)

    def width(self, l, e, tau, training):
        """TDW masks of block l, Sec. 3.1: (B, H) heads and (B, H) MLP groups on from E_t (B, D); entry 0 is a
        constant 1 (the always-on head / group)."""
        one = e.new_ones(e.shape[0], 1)
        heads = gumbel_sigmoid(self.attn[l](e), tau, training)
        groups = gumbel_sigmoid(self.mlp[l](e), tau, training)
        return torch.cat([one, heads], 1), torch.cat([one, groups], 1)

    def tokens(self, l, h, tau, training):
        """SDT mask of block l, Sec. 3.2: (B, T) from each token h (B, T, D) after the attention residual;
        1 = the token goes through the MLP, 0 = it bypasses it."""
        return gumbel_sigmoid(self.token[l](h).squeeze(-1), tau, training)


class DyDiT(nn.Module):
    """A dit.DiT plus routers. Training: the masked graph (masked_forward), masks multiply activations.
    Eval: the sliced graph, per-t weight slices and a token gather. forward(x, t, y) like any DiT."""
    def __init__(self, model, mode="dydit", lam=0.5, tau=5.0):
        super().__init__()
        if mode not in ("dydit", "tdw", "sdt", "halfwidth"):
            raise ValueError(f"unknown DyDiT mode {mode!r}")
        self.dit, self.mode, self.lam, self.tau = model, mode, lam, tau
        D, H, L = model.pos_embed.shape[-1], model.num_heads, len(model.blocks)
        self.routers = Routers(D, H, L)
        self.register_buffer("fixed", torch.ones(2, L, H))  # halfwidth: the fixed (head, group) masks
        dit.samples_like(self, model)
        self.by_t, self.by_pattern, self.trace = {}, {}, None

    def _apply(self, fn, *args, **kw):  # .to(device) / .half() invalidate the cached weight slices
        self.by_t, self.by_pattern = {}, {}
        return super()._apply(fn, *args, **kw)

    def train(self, mode=True):  # weights are about to change (or did): drop the slices
        self.by_t, self.by_pattern = {}, {}
        return super().train(mode)

    def _load_from_state_dict(self, *args, **kw):  # new weights: the cached slices are stale
        self.by_t, self.by_pattern = {}, {}
        return super()._load_from_state_dict(*args, **kw)

    def width_masks(self, l, e):
        """(B, H) head and MLP-group masks of block l for this mode: the TDW routers' (Routers.width), all on
        (sdt), or the fixed half-width ones."""
        B, H = e.shape[0], self.dit.num_heads
        if self.mode == "sdt":
            return e.new_ones(B, H), e.new_ones(B, H)
        if self.mode == "halfwidth":
            return self.fixed[0, l].expand(B, H), self.fixed[1, l].expand(B, H)
        return self.routers.width(l, e, self.tau, self.training)

    def token_mask(self, l, h):
        """(B, T) SDT mask of block l (Routers.tokens); None = every token runs the MLP (tdw, halfwidth)."""
        if self.mode in ("tdw", "halfwidth"):
            return None
        return self.routers.tokens(l, h, self.tau, self.training)

    @torch.no_grad()
    def slices(self, t):
        """Mask -> weight slice [inferred recipe, exact]: per block, the weights restricted to the heads and
        MLP groups that the masks of timestep t (an int) keep: qkv rows and proj columns of the kept heads,
        fc1 rows / biases and fc2 columns of the kept groups. TDW masks depend on t alone, so they are
        computed once per distinct t; the slices are cached per distinct (block, heads, groups) pattern."""
        if t in self.by_t:
            return self.by_t[t]
        e = self.dit.t_embedder(torch.tensor([t], device=self.fixed.device))  # E_t (1, D)
        H, D = self.dit.num_heads, self.dit.pos_embed.shape[-1]
        steps = []
        for l, block in enumerate(self.dit.blocks):
            hm, gm = self.width_masks(l, e)
            heads, groups = (m[0].nonzero().flatten() for m in (hm, gm))
            key = (l, tuple(heads.tolist()), tuple(groups.tolist()))
            if key not in self.by_pattern:
                hd, G = D // H, block.mlp.fc1.out_features // H  # head dim; MLP channels per group
                a, m = block.attn, block.mlp
                self.by_pattern[key] = dict(
                    k=len(heads), g=len(groups),
                    qkv_w=a.qkv.weight.view(3, H, hd, D)[:, heads].reshape(-1, D),    # (3 k hd, D)
                    qkv_b=a.qkv.bias.view(3, H, hd)[:, heads].reshape(-1),
                    proj_w=a.proj.weight.view(D, H, hd)[:, heads].reshape(D, -1).contiguous(),
                    fc1_w=m.fc1.weight.view(H, G, D)[groups].reshape(-1, D),            # (g G, D)
                    fc1_b=m.fc1.bias.view(H, G)[groups].reshape(-1),
                    fc2_w=m.fc2.weight.view(D, H, G)[:, groups].reshape(D, -1).contiguous())  # (D, g G)
            steps.append(self.by_pattern[key])
        self.by_t[t] = steps
        return steps

    def forward(self, x, t, y, complete=False, return_ratio=False, with_complete=False):
        """with_complete: also the complete model's output on the same input, in the same call (one
        forward per step, as DDP requires): returns (out, ratio, out_complete)."""
        if self.training or complete:
            out, ratio = masked_forward(self, x, t, y, complete)
            if with_complete:
                return out, ratio, masked_forward(self, x, t, y, True)[0]
            return (out, ratio) if return_ratio else out
        if (t == t[0]).all():  # samplers share t across the batch
            out, ratio = sliced_forward(self, x, t, y)
        else:  # anything else is split by t
            out, ratio = x.new_empty(x.shape[0], self.dit.out_channels, *x.shape[2:]), x.new_empty(x.shape[0])
            for tv in t.unique():
                s = t == tv
                out[s], ratio[s] = sliced_forward(self, x[s], t[s], y[s])
        return (out, ratio) if return_ratio else out


def masked_forward(model, x, t, y, complete=False):
    """The DyDiT training graph, Sec. 3: masks multiply head outputs (before proj), fc1 outputs (before GELU)
    and the MLP update of each token. Returns the DiT output and the per-sample FLOPs ratio r_b, Sec. 3.3.
    complete=True bypasses the routers: the plain DiT (the complete model of the warm-up)."""
    net = model.dit
    h, c = net.embed(x, t, y)
    e = net.t_embedder(t)  # E_t (B, D): the TDW router input, timestep only
    (B, T, D), H = h.shape, net.num_heads
    frac = lambda m: 1.0 if m is None else m.mean(1)  # noqa: E731  (B,) fraction of ones
    used = []
    for l, block in enumerate(net.blocks):
        mod = block.modulation(c)
        hm, gm = (None, None) if complete else model.width_masks(l, e)
        a = modulate(block.norm1(h), mod.shift_msa, mod.scale_msa)
        qkv = block.attn.qkv(a).reshape(B, T, 3, H, D // H).permute(2, 0, 3, 1, 4)  # (3, B, H, T, D/H)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # (B, H, T, D/H)
        if hm is not None:
            o = o * hm[:, :, None, None]
        h = h + mod.gate_msa.unsqueeze(1) * block.attn.proj(o.transpose(1, 2).reshape(B, T, D))
        def mlp(v, block=block, gm=gm):  # the MLP, its channel groups masked (group g: [g G, (g+1) G))
            z = block.mlp.fc1(v)  # (B, T, hidden)
            z = z if gm is None else z * gm.repeat_interleave(z.shape[-1] // H, dim=1)[:, None]
            return block.mlp.fc2(F.gelu(z, approximate="tanh"))
        h, tm = sdt_mlp(model, l, block, h, mod, mlp, route=not complete)
        used.append((frac(hm), frac(gm), frac(tm)))
    return net.head(h, c), flops_ratio(net.blocks, T, used).expand(B)


def sdt_mlp(model, l, block, h, mod, mlp, route=True, gather=False):
    """Spatial-wise Dynamic Token (SDT), DyDiT Sec. 3.2: block l's token router scores each token of h
    (B, T, D) after the attention residual; kept tokens get their MLP update, the others bypass the MLP:
        h <- h + m_tok * gate_mlp * MLP(modulate(norm2(h)))
    Training (the masked graph): the 0/1 mask multiplies the update. Inference (gather): the MLP runs only on
    the kept tokens of the whole batch, flattened to (B T, D), scattered back (DyFLUX code). Returns (h, m_tok
    (B, T), or None: every token runs the MLP: no token router, or route=False, the complete model)."""
    B, T, D = h.shape
    tm = model.token_mask(l, h) if route else None
    if not gather or tm is None or bool(tm.all()):  # the dense update (the masked graph multiplies it)
        z = mod.gate_mlp.unsqueeze(1) * mlp(modulate(block.norm2(h), mod.shift_mlp, mod.scale_mlp))
        return h + (z if tm is None or gather else tm.unsqueeze(-1) * z), tm
    hf = h.reshape(B * T, D)
    idx = tm.flatten().nonzero().squeeze(1)  # (n_kept,) over the whole batch
    b = idx // T  # the sample each kept token belongs to
    v = block.norm2(hf[idx]) * (1 + mod.scale_mlp[b]) + mod.shift_mlp[b]  # modulate per kept token
    return hf.index_add(0, idx, mod.gate_mlp[b] * mlp(v)).view(B, T, D), tm


def sliced_forward(model, x, t, y):
    """The DyDiT inference graph for a batch that shares t: the per-t weight slices (DyDiT.slices) and SDT's
    batched token gather (sdt_mlp). Returns (output, per-sample FLOPs ratio r_b); also logs the ratio when
    model.trace is a list."""
    net = model.dit
    h, c = net.embed(x, t, y)
    B, T, D = h.shape
    tv, H = int(t[0]), net.num_heads
    used, keeps = [], []
    for l, (block, w) in enumerate(zip(net.blocks, model.slices(tv))):
        mod = block.modulation(c)
        a = modulate(block.norm1(h), mod.shift_msa, mod.scale_msa)
        qkv = F.linear(a, w["qkv_w"], w["qkv_b"]).reshape(B, T, 3, w["k"], D // H).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2]).transpose(1, 2)
        o = o.reshape(B, T, -1)  # (B, T, k hd)
        h = h + mod.gate_msa.unsqueeze(1) * F.linear(o, w["proj_w"], block.attn.proj.bias)
        def mlp(v, w=w, block=block):  # the sliced MLP
            return F.linear(F.gelu(F.linear(v, w["fc1_w"], w["fc1_b"]), approximate="tanh"), w["fc2_w"],
                            block.mlp.fc2.bias)
        h, tm = sdt_mlp(model, l, block, h, mod, mlp, gather=True)
        if tm is not None:
            keeps.append(tm.bool().cpu())
        used.append((w["k"] / H, w["g"] / H, h.new_ones(B) if tm is None else tm.mean(1)))
    ratio = flops_ratio(net.blocks, T, used)  # (B,): `kept` is per sample
    if model.trace is not None:
        model.trace.append(dict(t=tv, ratio=ratio.cpu(), keep=torch.stack(keeps) if keeps else None))
    return net.head(h, c), ratio


@torch.no_grad()
def reorder_(net):
    """Sort every block's heads and MLP channels by importance, most important first (DyDiT Sec. 3.1,
    [paper]; commented out in the released code). Score = L1 norm of the unit's weights [inferred]. A
    permutation of Q/K/V/proj and fc1/fc2 together, so the function of the DiT is unchanged."""
    for block in net.blocks:
        D, H = block.attn.qkv.in_features, net.num_heads
        qkv, proj, fc1, fc2 = block.attn.qkv, block.attn.proj, block.mlp.fc1, block.mlp.fc2
        # ours [inferred]: importance = the L1 norm of a unit's weights (paper: importance, no formula given)
        hs = (qkv.weight.view(3, H, D // H, D).abs().sum((0, 2, 3))
              + proj.weight.view(D, H, D // H).abs().sum((0, 2)))
        hp = hs.argsort(descending=True)
        qkv.weight.copy_(qkv.weight.view(3, H, D // H, D)[:, hp].reshape(3 * D, D))
        qkv.bias.copy_(qkv.bias.view(3, H, D // H)[:, hp].reshape(-1))
        proj.weight.copy_(proj.weight.view(D, H, D // H)[:, hp].reshape(D, D))
        cp = (fc1.weight.abs().sum(1) + fc2.weight.abs().sum(0)).argsort(descending=True)
        fc1.weight.copy_(fc1.weight[cp])
        fc1.bias.copy_(fc1.bias[cp])
        fc2.weight.copy_(fc2.weight[:, cp])
    return net

# --- Train: the FLOPs-constrained fine-tuning loss, run by dit.train ------------------------------

def stratified_steps(B, device, num_steps=1000, bins=4):
    """Diffusion steps for a batch: sample b draws from bin (b mod 4) of [0, 1000) (DyDiT code)."""
    width = num_steps // bins
    return (torch.arange(B) % bins * width + torch.randint(0, width, (B,))).to(device)


def lam_target(step, cfg):
    """Target of the FLOPs loss, DyDiT code: 1 for lam_hold steps, then linear to lambda over lam_ramp."""
    s = min(max((step - cfg.lam_hold) / max(cfg.lam_ramp, 1), 0.0), 1.0)
    return 1.0 - (1.0 - cfg.lam) * s


def dydit_loss(net, xb, yb, step, diffusion, cfg):
    """Fine-tuning objective, DyDiT Sec. 3.3-3.4: L_diff(dynamic) + w (mean_b r_b - lambda_t)^2, plus
    L_diff(complete model) on the same x_t for the first complete_steps steps; a function of the step,
    so a resumed run continues both schedules exactly."""
    i = stratified_steps(xb.shape[0], xb.device)
    noise = torch.randn_like(xb)
    xt, t = diffusion.q_sample(xb, i, noise), diffusion.model_t(i)
    warm = step < cfg.complete_steps and cfg.mode != "halfwidth"
    out, ratio, *out_c = net(xt, t, yb, return_ratio=True, with_complete=warm)
    terms = diffusion.loss_from_output(out, xb, xt, i, noise)
    lam = lam_target(step, cfg)
    loss = terms["loss"] + flops_loss(ratio, lam, cfg.flops_weight)
    if warm:  # + L_diff of the complete model on the same x_t
        loss = loss + diffusion.loss_from_output(out_c[0], xb, xt, i, noise)["loss"]
    return dict(loss=loss, mse=terms["mse"], flops=ratio.mean().detach(), lam=torch.tensor(lam))


# every setting a fine-tuned checkpoint depends on, besides the base's weights
TRAIN_KEYS = ("mode", "lam", "steps", "batch_size", "lr", "router_lr", "ema_decay", "lam_hold", "lam_ramp",
              "complete_steps", "flops_weight", "grad_skip", "tau", "reorder", "seed", "data")


def run_key(cfg, base_ckpt, data=None):
    """A fine-tuning run's key: the base's weights, every TRAIN_KEYS setting, the data (loaded if None)."""
    x, y = data or dit.load_data(cfg.data, cfg.data_dir, base_ckpt["config"]["input_size"])[:2]
    keys = TRAIN_KEYS + dit.CURVE_KEYS * bool(cfg.curve)
    return dit.run_key(cfg, keys, base_ckpt, dit.data_tag(x, y))


def default_out(prefix, cfg, base_ckpt, key=None):
    """<prefix>_<mode>_<lambda>_<key>.pt (run_key)."""
    return f"{prefix}_{cfg.mode}_{cfg.lam}_{key or run_key(cfg, base_ckpt)}.pt"


def static_loss(net, xb, yb, step, diffusion):
    """The static control's loss: L_diff on the same stratified timesteps as dydit_loss."""
    return diffusion.loss(net, xb, yb, i=stratified_steps(len(xb), xb.device))


def train_run(cfg, base_ckpt, model, loss, data, quiet, param_groups=None):
    """Plumbing of a fine-tuning run: dit.train under this run's key (reused when every setting is equal),
    with --curve's hook scoring the EMA model, rebuilt as inference builds it, at the listed steps."""
    key = run_key(cfg, base_ckpt, data)  # hashed once, from the arrays this run trains on
    tc = dit.TrainConfig(preset=cfg.preset or "cpu", data=cfg.data, data_dir=cfg.data_dir,
                         out=cfg.out or default_out("out/dydit", cfg, base_ckpt, key),
                         steps=cfg.steps, batch_size=cfg.batch_size, lr=cfg.lr, warmup=0,
                         ema_decay=cfg.ema_decay, ema_warmup=0, grad_skip=cfg.grad_skip,
                         log_every=max(cfg.steps // 8, 1),
                         ckpt_every=cfg.steps, seed=cfg.seed, device=cfg.device)
    meta = dict(kind="dit", config=base_ckpt["config"], key=key) if cfg.mode == "static" else \
        dict(kind="dydit", config=base_ckpt["config"], mode=cfg.mode, lam=cfg.lam, tau=cfg.tau, key=key)
    points = dit.curve_steps(cfg.curve, cfg.steps)
    device = dit.pick_device(cfg.device)

    def curve_point(step, ema):  # --curve: the EMA model, as inference builds it, scored at these steps
        if step in points:
            ck = dict(meta, ema={k: v.detach().clone() for k, v in ema.state_dict().items()})
            model = (dit.build_dit(ck) if cfg.mode == "static" else build_dydit(ck)).to(device)
            q, ratio, keep = quality(model, cfg, device)
            return dict(score=round(q["score"], 4), acc=q["acc"], ratio=round(ratio, 4), keep=keep or 1)
    hook = dict(on_step=curve_point) if points else {}
    extra = {} if param_groups is None else dict(param_groups=param_groups, find_unused=True)  # DyDiT
    return dit.train(model, loss, data, tc, meta, quiet=quiet, **hook, **extra)[2]


def build_dydit(ckpt, ema=True):
    """The sliced DyDiT inference model of a "dydit" checkpoint (EMA weights by default), in eval mode."""
    model = DyDiT(dit.DiT(**ckpt["config"]), ckpt["mode"], ckpt["lam"], ckpt["tau"])
    model.load_state_dict(ckpt["ema"] if ema and "ema" in ckpt else ckpt["model"])
    return model.eval()

# --- Evaluate: realised FLOPs, sampling speed, quality, pictures ----------------------------------

@torch.no_grad()
def width_profile(model, ts):
    """(2, L, len(ts)): active fraction of heads [0] and MLP groups [1] per block at each timestep t."""
    H = model.dit.num_heads
    prof = [[[w[k] / H for w in model.slices(int(t))] for t in ts] for k in ("k", "g")]  # (2, T, L)
    return torch.tensor(prof).transpose(1, 2)


def save_pictures(model, prefix, cfg, n=4, cols=5):
    """<prefix>_widths.png: heads (top) and MLP groups (bottom) active per block (rows) per DDIM step
    (columns, t = 999 on the left). <prefix>_tokens.png: per image, the fraction of blocks that ran the
    MLP on each token at `cols` steps of its trajectory, then the image."""
    ts = dit.Diffusion().respace(cfg.eval_steps).timestep_map[::-1]
    prof = width_profile(model, ts)
    L = prof.shape[1]
    fid.heatmap_png(torch.cat([prof[0], torch.ones(1, prof.shape[2]), prof[1]]), prefix + "_widths.png", 8,
                    [f"heads {k}" for k in range(L)] + [""] + [f"mlp {k}" for k in range(L)], bar="share on")
    if model.mode in ("tdw", "halfwidth"):
        return [prefix + "_widths.png"]
    model.trace = []
    imgs = dit.generate(model, torch.arange(n) % model.num_classes, cfg.seed, cfg.eval_steps,
                           cfg_scale=cfg.cfg_scale, batch_size=n)
    trace, model.trace = model.trace, None
    g, S = model.input_size // model.dit.patch_size, model.input_size
    tiles = []
    for b in range(n):
        for j in range(cols):
            keep = trace[round(j * (len(trace) - 1) / (cols - 1))]["keep"][:, b].float().mean(0)  # (T,)
            tiles.append(fid.heat(keep.view(g, g), S // g))
        tiles.append(imgs[b])
    dit.save_grid(torch.stack(tiles), prefix + "_tokens.png", nrow=cols + 1)
    return [prefix + "_widths.png", prefix + "_tokens.png"]


@torch.no_grad()
def sliced_vs_masked(model, batch=16, seed=0):
    """max |sliced - masked| over a batch of noise at a few timesteps (the deployment check, fp32)."""
    g = dit.rng(seed, "eval")
    dev, worst = model.fixed.device, 0.0
    for tv in (999, 500, 100):
        x = torch.randn(batch, model.in_channels, model.input_size, model.input_size, generator=g).to(dev)
        t = torch.full((batch,), tv, device=dev)
        y = torch.randint(0, model.num_classes, (batch,), generator=g).to(dev)
        worst = max(worst, (model(x, t, y) - masked_forward(model, x, t, y)[0]).abs().max().item())
    return worst


def quality(model, cfg, device, steps=None):
    """(fid.evaluate's result, the realised FLOPs ratio (Sec. 3.3 formula over its sampling steps; a static
    model: steps / eval_steps), the share of (block, token) MLP calls kept (None without SDT))."""
    dyn, steps = isinstance(model, DyDiT), steps or cfg.eval_steps
    if dyn:
        model.trace = []
    q = fid.evaluate(model, data=cfg.data, data_dir=cfg.data_dir, image_size=model.input_size, n=cfg.eval_n,
                     steps=steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=device)
    trace = model.trace if dyn else []
    if dyn:
        model.trace = None
    ratio = torch.cat([r["ratio"] for r in trace]).mean().item() if dyn else steps / cfg.eval_steps
    keeps = [r["keep"].float().mean().item() for r in trace if r["keep"] is not None]
    return q, ratio, sum(keeps) / len(keeps) if keeps else None


def evaluate(name, model, static, cfg, device, lam="1", steps=None):
    """One row of the results table: `quality`'s score, FLOPs ratio and token keep rate, and the sampling
    speedup over `static` at batch 64 and 1 (not for `steps`)."""
    dyn, steps = isinstance(model, DyDiT), steps or cfg.eval_steps
    q, ratio, keep = quality(model, cfg, device, steps)
    row = {"variant": name, "lambda": lam, "FLOPs ratio": f"{ratio:.3f}",
           "token keep": "1" if keep is None else f"{keep:.3f}"}
    for k, B in enumerate(int(b) for b in cfg.bench_batches.split(",")):
        # min over --bench-reps interleaved rounds; the warm-up round also fills the weight caches
        t = fid.time_sampling(dict(static=static, dy=model), B, steps, cfg.cfg_scale, cfg.bench_reps) \
            if steps == cfg.eval_steps else None
        ts, td = (min(t["static"]), min(t["dy"])) if t else (None, None)
        row[f"speedup b{B}"] = f"{ts / td:.2f}x" if t else "-"
        if k == 0:  # measured speedup / ideal speedup 1 / ratio
            row["of FLOPs cut"] = f"{ts / td * ratio:.2f}" if t else "-"
    return {**row, q["metric"]: f"{q['score']:.2f}",
            "acc": "-" if q["acc"] is None else f"{q['acc']:.3f}",
            "max|sliced-masked|": f"{sliced_vs_masked(model):.1e}" if dyn else "-"}


def direction(model):
    """Mean active width for t in [750, 1000) minus t in [0, 250), heads and groups (Fig. 5 direction)."""
    p = width_profile(model, range(0, 1000, 5)).mean(1)  # (2, 200): every 5th t
    return [round((p[k, 150:].mean() - p[k, :50].mean()).item(), 3) for k in (0, 1)]


# ===== plumbing: nothing paper-specific below (config, main) ======================================

@dataclass
class DyConfig:
    teacher: str = "weights/dit_shapes.pt"  # base DiT (shipped; out/dit.pt after python dit.py)
    preset: str = ""              # "" = the base's; cifar / imagenet64: lr, EMA left at default -> PAPER
    out: str = ""                 # checkpoint ("" = out/dydit_<mode>_<lam>_<hash>.pt); --sweep: the prefix
    mode: str = "dydit"           # dydit (TDW+SDT) | tdw | sdt | halfwidth | static (fine-tune)
    lam: float = 0.5              # (0,1]: target FLOPs ratio lambda (paper grid 0.9 .. 0.3)
    sweep: bool = False           # run every mode:lambda of --variants (static first: the speed reference)
    variants: str = "static:1,halfwidth:0.5,dydit:0.7,dydit:0.5,dydit:0.3,tdw:0.5,sdt:0.5"
    steps: int = 800              # >=1: fine-tuning steps (paper: 50k DiT-S .. 200k DiT-XL; 200 miss lambda)
    batch_size: int = 64          # >=1: fine-tuning batch (paper: 256)
    lr: float = 2e-4              # >0: AdamW lr of the DiT weights (paper: 1e-4, constant)
    router_lr: float = 0.005      # >0: AdamW lr of the routers [inferred, see the docstring]
    ema_decay: float = 0.99       # [0,1): EMA of the fine-tuned weights, constant from a copy (paper: 0.9999)
    lam_hold: int = 10            # >=0: steps at target 1 before the ramp (paper: 100)
    lam_ramp: int = 80            # >=0: steps of the linear ramp 1 -> lambda (paper: 1000 .. 5000)
    complete_steps: int = 50      # >=0: steps with the complete-model loss (paper: 30k of 200k for XL)
    flops_weight: float = 10.0    # >=0: w in w (mean_b r_b - lambda)^2 (paper: 2; 10 here [inferred])
    grad_skip: float = 0.0        # >=0: skip a step whose grad norm exceeds this (code: 200); 0 = off
    tau: float = 5.0              # >0: Gumbel-sigmoid temperature (paper: 5, fixed)
    reorder: bool = False         # sort heads / channels by importance first (Sec. 3.1; recommended: docs)
    curve: str = ""               # fine-tune steps to score the EMA model at (e.g. 100,200,400,800): a
    #                               table and curves.png over every variant and --seed of these settings
    eval_n: int = 500             # >=1: images per quality score (fid.evaluate)
    eval_steps: int = 50          # [1,1000]: DDIM steps for quality and for the speed benchmark
    cfg_scale: float = 1.5        # >=0: classifier-free guidance scale (paper FID setting: 1.5)
    bench_batches: str = "64,1"   # batch sizes of the sampling-speed benchmark (comma-separated)
    bench_reps: int = 3           # >=1: timed sampling runs per model and batch (min is reported)
    seed: int = 0                 # >=0: seeds fine-tuning; evaluation noise: fid / sample generators
    device: str = "auto"          # auto | cpu | cuda | mps
    data: str = "shapes"          # shapes | cifar10 (with --data-dir ../shared/data/cifar10-subset)
    data_dir: str = "data"        # where the data set lives

MODES = ("dydit", "tdw", "sdt", "halfwidth", "static")
CURVE_COLUMNS = (("ratio", "FLOPs ratio", ".3f"), ("keep", "token keep", ".3f"))  # --curve, beside FD-clf
# the GPU presets' recipe (DyDiT Sec. 4 / DiT Sec. 4: lr 1e-4, constant EMA 0.9999 from a copy)
PAPER = dict(lr=1e-4, ema_decay=0.9999)


def variants(cfg):
    """[(mode, lambda)] of this run: --variants' mode:lambda list with --sweep, else (--mode, --lam); one
    error line for an unknown mode or a lambda outside --lam's range."""
    runs = [tuple(r.split(":")) for r in cfg.variants.split(",")] if cfg.sweep else [(cfg.mode, str(cfg.lam))]
    if not all(len(r) == 2 and r[0] in MODES for r in runs):
        sys.exit(f"error: --variants takes mode:lambda pairs, modes {', '.join(MODES)}; not {cfg.variants!r}")
    return [(m, dit.number_list(v, DyConfig, "lam", "--variants lambda")[0]) for m, v in runs]


def main(argv=None):
    cfg = dit.check(dit.parse_args(DyConfig, argv), dict(mode=MODES))
    dit.curve_steps(cfg.curve, cfg.steps, "fine-tuning steps (--steps)")
    dit.number_list(cfg.bench_batches, DyConfig, "batch_size", "--bench-batches", int)
    runs = variants(cfg)
    dit.check_writable(cfg.out or "out/dydit")
    device = dit.pick_device(cfg.device)
    dit.dist_setup(device)
    base_ckpt = dit.get_teacher(cfg.teacher, data=cfg.data, data_dir=cfg.data_dir, device=cfg.device,
                              seed=cfg.seed)
    dit.method_preset(cfg, base_ckpt, PAPER)
    print(json.dumps(dataclasses.asdict(cfg)))
    base = dit.build_dit(base_ckpt).to(device)
    static, rows, pictures, dirs, grid = base, [], [], {}, {"base": base}
    lead = dit.is_main()  # under torchrun every rank fine-tunes; rank 0 evaluates and writes
    half = max(1, cfg.eval_steps // 2)  # the equal-FLOPs sampler baseline: lambda 0.5's compute
    same = {k: v for k, v in dataclasses.asdict(cfg).items()
            if k not in ("mode", "lam", "sweep", "variants", "seed", "out", "device", "bench_reps")}
    folder, curve = os.path.join("out", f"dydit_curves_{dit.settings_tag(same)}"), None
    if not cfg.sweep and lead:
        rows.append(evaluate("static (base, not fine-tuned)", base, base, cfg, device))
        rows.append(evaluate(f"static (base), {half} steps", base, base, cfg, device, steps=half))
    for mode, lam in runs:
        run = dataclasses.replace(cfg, mode=mode, lam=lam)
        out = cfg.out if cfg.out and not cfg.sweep else default_out(cfg.out or "out/dydit", run, base_ckpt)
        run = dataclasses.replace(run, out=out)
        t0 = time.time()
        ck = finetune(run, base_ckpt)
        print(f"fine-tuned {mode} lambda {lam} in {time.time() - t0:.0f} s")
        if not lead:
            continue
        label = f"{mode} {lam}"
        if cfg.curve:  # this run's points, pooled with every variant and seed of the same settings
            curve = fid.pool_curves(folder, f"{label}_seed{cfg.seed}", ck.get("evals", []),
                                    ("variant", "fine-tune steps"), CURVE_COLUMNS, "fine-tuning steps")
        if mode == "static":  # the control: speedups of every later row are measured against it
            static = grid["static"] = dit.build_dit(ck).to(device)
            rows += [evaluate("static, fine-tuned the same steps", static, static, cfg, device),
                     evaluate("base (not fine-tuned)", base, static, cfg, device)]
            rows.append(evaluate(f"static fine-tuned, {half} steps", static, static, cfg, device, steps=half))
        else:
            model = grid[label] = build_dydit(ck).to(device)
            rows.append(evaluate(mode, model, static, cfg, device, lam))
            pictures += save_pictures(model, os.path.splitext(out)[0], cfg)
            dirs[label] = direction(model)
        samples = os.path.join(os.path.dirname(out) or ".", "dydit_samples.png")
        dit.save_rows(grid, samples, cfg.seed, cfg.eval_steps, cfg.cfg_scale)
        print("\n" + dit.run_header(device, "float32", cfg.batch_size, cfg.seed))
        print(f"{cfg.steps} fine-tuning steps per variant; quality: fid.evaluate n={cfg.eval_n}, "
              f"{cfg.eval_steps} DDIM steps, cfg {cfg.cfg_scale}; speed: the same sampling, vs the first "
              "static row\n"
              + dit.markdown_table(rows))
        print("active width, t in [750,1000) minus t in [0,250) (heads, groups): " + json.dumps(dirs))
        print(f"pictures: {', '.join(pictures)}; {samples}: a row per model ({', '.join(grid)}), same noise")
    if curve:
        print(f"\nquality during fine-tuning (n = {cfg.eval_n}, {cfg.eval_steps} steps, noise seed --seed), "
              f"{folder}:\n{dit.markdown_table(curve[0])}\n{curve[1]}")
    dit.dist_finish()


if __name__ == "__main__":
    main()
