"""
distill.py: one-step "DiT-Nano" students distilled from a multi-step DiT, with the TA and MI1 feature methods.

Paper: "Designing Parameter and Compute Efficient Diffusion Transformers using Distillation", Vignesh
Sundaresha, 2025, arXiv 2502.14226. Only the abstract and third-party summaries are available, so almost
every detail below is [inferred] from it and from the methods it names. A teacher's deterministic sampler
turns noise z into images x; a small DiT with no timestep input learns z -> x in ONE forward pass, helped by
feature distillation through a Teaching Assistant (TA) or Multi-In-One (MI1); then depth, width and heads
are swept for the quality / size / latency trade-off.

    paper (abstract) / the methods it builds on         -> here
    offline teacher signals (GET, arXiv 2312.04453)     -> make_pairs (DDIM eta 0, cached in out/distill/)
    one-step DiT, no timestep input (GET)               -> OneStepDiT; the large one, "onestep-teacher"
    output + feature KD, projectors (BK-SDM Sec. 3.2)   -> distill_loss, Distiller
    block mapping knob                                  -> dit.block_map (uniform | first)
    Teaching Assistant: depth hop, then width hop       -> teaching_assistant (the width cut: slice_width)
    Multi-In-One: one student block <- k teacher blocks -> Distiller(mi1=True), --method mi1
    depth / width / heads trade-off (abstract)          -> --sweep, sweep, measure, fid.pareto_png
    the recipe: one-step teacher -> TA -> student       -> run_method
[inferred]: weight-free output losses; token states standardised per channel as features; the block maps;
MI1 as "block j packs teacher blocks (m(j-1), m(j)]", trained alone first (stage A); the one-step teacher.

Run: python distill.py --method ta (or kd | fkd | mi1, --mapping first, --sweep). It ends with a Markdown
table (teacher, helpers, student: params, GFLOPs and latency per image, quality) and
out/distill/<run>_grid.png (one row per model, same noise). Results, and the settled options that left the
code: docs/distill.md.
"""
import functools
import json
import os
import statistics
import sys
from dataclasses import asdict, dataclass, replace

import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from tqdm import tqdm

import dit
import fid

# --- The algorithm: pairs -> one-step teacher -> TA -> student -----------------------------------

def run_method(cfg, offline, shape):
    """The recipe (Sundaresha 2025, abstract; the pairs are made before, make_pairs): the multi-step base ->
    a one-step teacher on the pairs (the feature source) -> a TA at the student's depth -> the student cut
    from the TA to its width -> distilled with output + feature KD. --method kd stops at output KD alone, fkd
    distils from the one-step teacher directly, mi1 packs its blocks (MI1). Returns [(name, model,
    checkpoint)] of the stages trained, the student last."""
    if cfg.method == "kd":
        return [("student", *train_stage(cfg, "student", shape, None, None, offline))]
    T = offline["teacher"]  # the multi-step base; the one-step teacher starts as its copy, one for every seed
    onestep = train_stage(cfg, "onestep-teacher", shape_of(T), None, None, offline, init=T,
                          blocks=list(range(len(T.blocks))), steps=cfg.teacher_steps, shared=True)
    stages = [("onestep-teacher", *onestep)]
    if cfg.method == "ta":
        return stages + teaching_assistant(cfg, onestep[0], shape, offline)
    how = cfg.mapping if cfg.method == "fkd" else "uniform"  # mi1: groups of the uniform map
    student = train_stage(cfg, "student", shape, onestep[0], how, offline, mi1=cfg.method == "mi1")
    return stages + [("student", *student)]


def teaching_assistant(cfg, source, shape, offline):
    """The Teaching Assistant between `source` (L_T x D_T) and a student of `shape`, two hops [inferred]:
    1. depth: the TA has the student's depth at the source's width, starts from source blocks m(i) (block
       removal, BK-SDM Sec. 3.1) and learns output + feature KD from the source (one fixed TA for every seed);
    2. width: the student starts as the TA cut to its width (slice_width), learns from the TA, block i -> i.
    Returns [(name, model, checkpoint)] of the TA and the student."""
    L_T, D_T, H_T = shape_of(source)
    blocks = [j - 1 for _, j in dit.block_map(shape[0], L_T)]
    ta = train_stage(cfg, "ta", (shape[0], D_T, H_T), source, "uniform", offline, init=source, blocks=blocks,
                     steps=cfg.aux_steps, shared=True)
    student = train_stage(cfg, "student", shape, ta[0], "first", offline, init=ta[0], cut=True)
    return [("ta", *ta), ("student", *student)]


# --- Method: the one-step student, block mappings, the distillation loss --------------------------

class OneStepDiT(nn.Module):
    """One-step generator x = G(z, y) (GET, arXiv 2312.04453): a DiT with no timestep input. The
    conditioning is c = c0 + y_emb with a learned constant c0; no label dropout (the pairs already carry
    the teacher's CFG). return_features: also [h_0, h_1, .., h_L], the tokens (B, T, D) after block l
    (h_0: the patch embedding)."""

    def __init__(self, **config):  # dit.DiT keyword arguments
        super().__init__()
        self.dit = dit.DiT(**dict(config, class_dropout_prob=0.0, learn_sigma=False))
        self.dit.t_embedder = None
        self.c0 = nn.Parameter(torch.zeros(self.dit.pos_embed.shape[-1]))
        dit.samples_like(self, self.dit)
        self.one_step = True

    def embed(self, z, y):
        """(h_0 (B, T, D), c = c0 + y_emb (B, D)), the labels used as given (no random CFG drop)."""
        return self.dit.x_embedder(z) + self.dit.pos_embed, self.c0 + self.dit.y_embedder(y, False)

    def forward(self, z, y, return_features=False):
        h, c = self.embed(z, y)
        feats = [h]
        for block in self.dit.blocks:
            h = block(h, c)
            feats.append(h)
        out = self.dit.head(h, c)
        return (out, feats) if return_features else out


def shape_of(model):
    """(depth, width, heads) of a dit.DiT or a OneStepDiT."""
    net = getattr(model, "dit", model)
    return len(net.blocks), net.pos_embed.shape[-1], net.num_heads


HUBER_C = 0.00054  # iCT's c = 0.00054 sqrt(d) on ||.||, i.e. 0.00054 on the per-dimension RMS used here


def output_distance(a, b):
    """Weight-free output loss: pseudo-Huber (iCT, Song & Dhariwal 2023, Sec. 3.3), per sample, averaged."""
    # d(a, b) = sqrt(||a - b||^2 / dim + c^2) - c
    return (((a - b) ** 2).flatten(1).mean(1) + HUBER_C * HUBER_C).sqrt().sub(HUBER_C).mean()


def standardise(h, ref):
    """(h - mu_c) / sd_c with the mean and std of each channel c of ref over the batch and the tokens
    [inferred]: every channel of a target counts the same (a token-wise LayerNorm leaves one channel with
    most of the energy, and part of each target the same for every image)."""
    mu, sd = ref.mean((0, 1)), ref.std((0, 1)).clamp_min(1e-4)
    return (h - mu) / sd


def distill_loss(out, target, s_feats, t_feats, links, feat_weight=1.0, up=None):
    """Output + feature distillation (GET; BK-SDM Sec. 3.2, Eq. "L_FeatKD"):
        L = d(out, target) + lambda_f * mean_k MSE(std(W_k h_S,i_k), std(h_T,j_k)),  (i_k, j_k) = links[k]
    std() = `standardise` with the teacher state's per-channel statistics. s_feats[k] = h_S,i_k (B, T, D_S),
    the output of student block i_k; up[k] = the projector W_k: D_S -> D_T (None: the identity). out None:
    no output term (MI1 stage A); no links: output only."""
    terms, loss = {}, 0.0
    if out is not None:
        terms["out"] = output_distance(out, target)
        loss = terms["out"]
    if t_feats is not None and links:
        up = up or [nn.Identity()] * len(links)
        # assignment 5 begin: feature KD with its projector
        # ours: both sides standardised per channel (BK-SDM: plain MSE, far worse here: docs/distill.md)
        mse = [F.mse_loss(standardise(w(s), t_feats[j]), standardise(t_feats[j], t_feats[j]))
               for w, s, (_, j) in zip(up, s_feats, links)]
        terms["feat"] = sum(mse) / len(links)
        # assignment 5 end
        loss = loss + feat_weight * terms["feat"]
    terms["loss"] = loss
    return terms


class Distiller(nn.Module):
    """The student plus its projectors W_k: Linear(D_S -> D_T) (applied in distill_loss, dropped after
    training). forward returns (output, the outputs of student blocks i_k of the links), or with `target` the
    distill_loss terms.
    Multi-In-One (mi1=True) [inferred]: student block j packs teacher blocks (a_j, b_j], b_j = m(j) of the
    links (the uniform map), a_j = b_(j-1). Stage A (self.local, trained first): each block runs alone on
    the teacher state h_T,a_j (through a projector down_j: D_T -> D_S) and learns h_T,b_j, a feature loss
    only; stage B (local off): end to end, output + feature KD at the group ends, as fkd."""
    def __init__(self, student, d_teacher, links, mi1=False):
        super().__init__()
        d = shape_of(student)[1]
        make = lambda a, b: nn.Identity() if a == b else nn.Linear(a, b)
        ends = [j for _, j in links]
        self.groups = list(zip([0] + ends[:-1], ends)) if mi1 else []  # (a_j, b_j) of student block j
        self.student, self.links, self.local = student, links, mi1
        self.up = nn.ModuleList(make(d, d_teacher) for _ in links)
        self.down = nn.ModuleList(make(d_teacher, d) for _ in self.groups)

    def forward(self, x, y, t_feats=None, target=None, feat_weight=1.0):
        if not self.local:
            out, feats = self.student(x, y, return_features=True)
            feats = [feats[i] for i, _ in self.links]
        else:  # MI1 stage A: no output term
            h, c = self.student.embed(x, y)
            out, feats = None, []
            for j, ((a, _), block) in enumerate(zip(self.groups, self.student.dit.blocks)):
                h_in = h if a == 0 else self.down[j](t_feats[a])  # (B, T, D_S)
                feats.append(block(h_in, c))
        if target is None:
            return out, feats
        # the loss inside forward: under DDP the projectors must be used in the wrapped call
        return distill_loss(out, target, feats, t_feats, self.links, feat_weight, self.up)


# --- Train: offline pairs, initialisation, the stages of each method ------------------------------

@torch.no_grad()
def make_pairs(teacher, n, steps, cfg_scale, seed, path, batch_size=250, shipped=""):
    """GET's offline signals: n (noise z, image x = DDIM_eta=0(z, y), label y) triples, cached at `path`.
    x is kept as uint8, an image's precision; a `shipped` PNG holds the images alone (z and y are remade
    from the seed, a training stream: never the evaluation noise)."""
    if os.path.exists(path):
        pairs = torch.load(path, map_location="cpu", weights_only=True)
        if not (isinstance(pairs, dict) and {"z", "x", "y"} <= pairs.keys()) or dit.nonfinite(pairs):
            sys.exit(f"error: {path} is not a pairs file with finite z, x, y; delete it to remake it")
        return pairs
    device = next(teacher.parameters()).device
    C, S = teacher.in_channels, teacher.input_size
    z = torch.randn(n, C, S, S, generator=dit.rng(seed))
    y = torch.arange(n) % teacher.num_classes
    xs = [read_tiles(shipped, n, C, S)] if os.path.exists(shipped) else \
        [dit.to_uint8(dit.sample(teacher, z[k:k + batch_size].to(device), y[k:k + batch_size].to(device),
                                 steps, "ddim", 0.0, cfg_scale)).cpu()
         for k in tqdm(range(0, n, batch_size), desc=f"pairs ({steps} DDIM steps)", dynamic_ncols=True)]
    pairs = dict(z=z, x=torch.cat(xs), y=y)
    dit.save_checkpoint(pairs, path)
    return pairs


TILES = 100  # images per row of a shipped pairs PNG


def write_tiles(x, path):
    """uint8 (N, C, S, S) -> one lossless PNG, TILES images per row (the last row padded with zeros), and its
    sha256 into SHA256SUMS beside it."""
    n, C, S, _ = x.shape
    x = torch.cat([x, x.new_zeros(-n % TILES, C, S, S)])
    grid = x.view(-1, TILES, C, S, S).permute(0, 3, 1, 4, 2).reshape(-1, TILES * S, C)
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    Image.fromarray(grid.squeeze(-1).numpy()).save(path + ".tmp.png", optimize=True)
    os.replace(path + ".tmp.png", path)
    dit.record_sum(path)


def read_tiles(path, n, C, S):
    """The inverse of write_tiles, checked against SHA256SUMS and the expected shape (one error line)."""
    dit.check_sum(path)
    grid = torch.tensor(fid.read_image(path))[..., :C]  # (H, W, C); a grey PNG reads as 3 equal channels
    if grid.shape[:2] != (-(-n // TILES) * S, TILES * S):
        sys.exit(f"error: {path} holds {tuple(grid.shape[:2])} pixels, not {n} images of {S} px; delete it")
    return grid.reshape(-1, S, TILES, S, C).permute(0, 2, 4, 1, 3).reshape(-1, C, S, S)[:n].contiguous()


@torch.no_grad()
def init_from(dst, src, blocks):
    """Copy src's weights into dst wherever names and shapes match, src block blocks[i] -> dst block i
    (BK-SDM Sec. 3.1 block removal, TA hop 1). The label table keeps its first rows (a one-step
    model has no "null" class); a learned-sigma output layer gives its eps rows; a one-step dst of a
    multi-step src gets c0 = t_emb(999), its first step."""
    src_sd = {k.removeprefix("dit."): v for k, v in src.state_dict().items()}
    new = {}
    for k, v in dst.state_dict().items():
        name = k.removeprefix("dit.")
        if name.startswith("blocks."):
            i, rest = name[len("blocks."):].split(".", 1)
            name = f"blocks.{blocks[int(i)]}.{rest}"
        w = src_sd.get(name)
        if w is not None and name.startswith("final_layer.linear") and len(w) == 2 * len(v):
            # learned-sigma head (p*p*2C rows) -> eps-only head (p*p*C): keep the eps rows of every pixel
            pp = src.patch_size ** 2
            w = w.view(pp, 2, -1, *w.shape[1:])[:, 0].reshape(v.shape)
        ok = w is not None and (w.shape == v.shape or (name.startswith("y_embedder")
                                                       and w.shape[1:] == v.shape[1:]))
        new[k] = w[:len(v)] if ok else v
    if isinstance(dst, OneStepDiT) and not isinstance(src, OneStepDiT):
        # ours [inferred]: c0 starts as the base's embedding of its first sampling step, t = 999
        new["c0"] = src.t_embedder(torch.tensor([999], device=src.pos_embed.device))[0]
    dst.load_state_dict(new)


@torch.no_grad()
def slice_width(dst, src, states):
    """The width hop as pruning (Minitron, arXiv 2407.14679, Sec. 2) [inferred]: dst starts as src cut to its
    width. Kept: the D_S residual channels with the largest mean h^2 over src's states (the same channels in
    c, which feeds adaLN elementwise), and in each block the H_S heads and the hidden MLP units with the
    largest product of in- and out-weight norms; every weight is src's sub-matrix at those indices."""
    (_, d, h), (_, D, H) = shape_of(dst), shape_of(src)
    ch = sum((s ** 2).mean((0, 1)) for s in states).topk(d).indices.sort().values
    top = lambda score, k: score.topk(k).indices.sort().values
    chunks = lambda n: torch.cat([p * D + ch for p in range(n)])  # the kept channels of each (n D) chunk
    picks = {"c0": [ch], "x_embedder": [ch], "pos_embed": [None, None, ch], "embedding_table": [None, ch],
            "final_layer.linear": [None, ch], "final_layer.adaLN": [chunks(2), ch]}  # per dim, None: all
    for b, (block, small) in enumerate(zip(src.dit.blocks, dst.dit.blocks)):
        a, m = block.attn, block.mlp
        v_rows = a.qkv.weight[2 * D:].view(H, -1)  # (q, k, v) x heads x head dims
        heads = top(a.proj.weight.view(D, H, -1).norm(dim=(0, 2)) * v_rows.norm(dim=1), h)
        dims = (heads[:, None] * (D // H) + torch.arange(D // H)).flatten()  # the kept heads' channels
        units = top(m.fc1.weight.norm(dim=1) * m.fc2.weight.norm(dim=0), small.mlp.fc1.out_features)
        picks.update({f"blocks.{b}.attn.qkv": [torch.cat([dims + p * D for p in range(3)]), ch],
                     f"blocks.{b}.attn.proj": [ch, dims], f"blocks.{b}.mlp.fc1": [units, ch],
                     f"blocks.{b}.mlp.fc2": [ch, units], f"blocks.{b}.adaLN": [chunks(6), ch]})
    new, src_sd = {}, src.state_dict()
    for k in dst.state_dict():
        w = src_sd[k]
        index = next(i for name, i in picks.items() if name in k)
        for dim, i in enumerate(index[:w.dim()]):
            w = w if i is None else w.index_select(dim, i)
        new[k] = w
    dst.load_state_dict(new)


def build_student(ckpt, ema=True):
    """The model of a "student" checkpoint (any stage), EMA weights, eval mode, without the projectors."""
    config = dict(ckpt["config"])
    if config.pop("arch") != "onestep":  # the multi-step student left the code (its numbers: docs/distill.md)
        sys.exit("error: this checkpoint holds a multi-step student, which distill.py no longer builds")
    model = OneStepDiT(**config)
    state = ckpt["ema"] if ema else ckpt["model"]
    model.load_state_dict({k[len("student."):]: v for k, v in state.items() if k.startswith("student.")})
    return model.eval()


def train_stage(cfg, name, shape, source, how, offline, init=None, blocks=None, cut=False, mi1=False,
                steps=None, shared=False):
    """Train one network of `shape` -> (EMA model, checkpoint): it starts from init's `blocks` (or, cut, from
    init cut to its width) and learns output + feature KD (Distiller) from the frozen feature `source` (None:
    the pairs only) through the block map `how` (None: output only); mi1: MI1's stage A, then B.
    shared: a helper fixed across --seed (trained with seed 0), reused from --shipped, written by --ship."""
    steps, cfg = cfg.steps if steps is None else steps, replace(cfg, seed=0) if shared else cfg
    config = dict(offline["config"], depth=shape[0], hidden_size=shape[1], num_heads=shape[2])
    torch.manual_seed(dit.seed_of(cfg.seed))
    student = OneStepDiT(**config)
    if cut:  # the TA cut to the student's width
        slice_width(student, init, source_states(init, offline, range(shape[0] + 1)).values())
    elif init is not None:
        init_from(student, init, blocks)
    L_T, D_T, _ = shape_of(source) if source is not None else (0, 0, 0)
    links = dit.block_map(shape[0], L_T, how) if how else []
    net = Distiller(student, D_T, links, mi1)
    used = {j for _, j in links} | {a for a, _ in net.groups}  # the source states the loss reads
    cache = source_states(source, offline, used) if source is not None else None
    loss_fn = functools.partial(pairs_loss, offline=offline, cache=cache, feat_weight=cfg.feat_weight)
    start = "slice" if cut else blocks  # the key's literal for a cut start (saved stages' keys still match)
    key = stage_key(cfg, name, config, links, mi1, offline, source, init, start, steps)
    about = f"shape {shape}, source {getattr(source, 'name', None)}, mapping {links}"
    return fit_stage(cfg, name, net, loss_fn, key, steps, offline, shared, about)


def fit_stage(cfg, name, net, loss_fn, key, steps, offline, shared, about):
    """Plumbing of a stage: its file is named by a hash of every setting it depends on (key), so equal stages
    are shared across runs; a shared helper is reused from --shipped when the keys are equal, written there by
    --ship; MI1 runs stage A (block-local, local_frac * steps) before B; --curve scores the student."""
    device, tag = dit.pick_device(cfg.device), dit.settings_tag(key)
    phases = [(f"{name}_{tag}", steps)]
    if net.local:  # MI1: stage A (block-local), then B (end to end) as many steps as the other students
        phases.insert(0, (f"{name}_{tag}_local", max(1, round(cfg.local_frac * steps))))
    meta = dict(kind="student", config=dict(key["config"], arch="onestep"), stage=name, method=cfg.method,
                setup="onestep", key=json.dumps(key))
    shipped = os.path.join(cfg.shipped, f"distill_{name}_{tag}.pt")
    if shared and (found := load_shipped(shipped, meta, tag, steps, device)):
        return found
    points = dit.curve_steps(cfg.curve, steps) if name == "student" else set()
    wall, mi1 = 0.0, net.local
    for k, (run, n) in enumerate(phases):
        net.local = k == 0 and mi1  # MI1: stage A block-local, then B end to end
        tcfg = dit.TrainConfig(preset=cfg.preset or "cpu", data=cfg.data, data_dir=cfg.data_dir, steps=n,
                               out=os.path.join(cfg.out, run + ".pt"), lr=cfg.lr, batch_size=cfg.batch_size,
                               warmup=20, ema_decay=cfg.ema_decay, seed=cfg.seed + k, log_every=cfg.log_every,
                               ckpt_every=10**9, device=cfg.device, dtype=cfg.dtype)
        print(f"[{name}] {run}: {n} steps, {about}{' (MI1 block-local)' if net.local else ''}")
        last = k == len(phases) - 1 and points
        on_step = functools.partial(curve_point, cfg=cfg, points=points, device=device) if last else None
        _, ema, ck = dit.train(net, loss_fn, offline["data"], tcfg, meta, find_unused=True, on_step=on_step)
        net = ema.train().requires_grad_(True)
        wall += ck.get("metrics", {}).get("wall_s") or 0.0
    if shared and cfg.ship and dit.is_main():
        dit.ship_weights(ck, shipped)
        print(f"[{name}] wrote {shipped} (EMA weights, float16)")
    model = net.student.eval().requires_grad_(False).to(device)
    model.tag, model.name = tag, name
    return model, dict(ck, wall_s=wall, steps=steps, path=tcfg.out)


def pairs_loss(net, xb, yb, step, offline, cache, feat_weight):
    """dit.train's loss on a batch of offline pairs: yb indexes them (xb, the same images as uint8, is
    unused); the frozen source's states come from `cache` (computed once per stage; None: output KD only)."""
    z, target, y = offline["z"][yb], offline["x"][yb], offline["y"][yb]
    t_feats = None if cache is None else {j: h[yb] for j, h in cache.items()}
    return net(z, y, t_feats, target, feat_weight)  # Distiller: distill_loss with its projectors


def curve_point(step, ema, cfg, points, device):
    """--curve (dit.train's on_step): the student's EMA quality at these steps of its training."""
    if step in points:
        q = fid.evaluate(ema.student, cfg.data, cfg.data_dir, ema.student.input_size, n=cfg.eval_n,
                         steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=device)
        return dict(score=round(q["score"], 4), acc=q["acc"])


def stage_key(cfg, name, config, links, mi1, offline, source, init, start, steps):
    """Every setting a stage's result depends on (its checkpoint's name hashes it)."""
    # "pairs" is the key's old name for the block links, kept so that the shipped files' keys still match
    key = dict(name=name, config=config, setup="onestep", pairs=links, mi1=mi1, data=offline["data_tag"],
               teacher=getattr(source, "tag", None), init=getattr(init, "tag", None), keep=start, steps=steps,
               out_loss="huber",  # setup, out_loss: literals of removed options (shipped keys still match)
               **{k: getattr(cfg, k) for k in ("batch_size", "lr", "ema_decay", "seed", "dtype")})
    if links:  # the feature weight and MI1's split only matter to the stages that use them
        key.update(feat_weight=cfg.feat_weight, feat_norm="channel")  # a literal of the removed --feat-loss
    if mi1:
        key.update(local_frac=cfg.local_frac, local_on_top=True)
    if cfg.curve and name == "student":  # a curve run keeps its scores in the checkpoint: its own file
        key.update(curve=cfg.curve, curve_n=cfg.eval_n)
    return key


@torch.no_grad()
def source_states(source, offline, used, chunk=250):
    """{j: h_j (N, T, D)}: the frozen feature source's states j on every pair, computed once."""
    chunks = [source(offline["z"][k:k + chunk], offline["y"][k:k + chunk], return_features=True)[1]
              for k in range(0, len(offline["z"]), chunk)]
    return {j: torch.cat([f[j] for f in chunks]) for j in sorted(used)}


def load_shipped(path, meta, tag, steps, device):
    """(model, checkpoint) of a shipped helper whose settings key equals meta's, else None."""
    ck = dit.load_checkpoint(path, kinds=["student"]) if os.path.exists(path) else {}
    if ck.get("key") != meta["key"]:
        return None
    print(f"[{meta['stage']}] reusing {path}: every setting that made it is equal (key {tag}, fp16)")
    model = build_student(ck).to(device).requires_grad_(False)
    model.tag, model.name = f"{tag}-fp16", meta["stage"]  # stages made from it differ from a float32 one's
    return model, dict(ck, wall_s=ck["metrics"].get("wall_s"), steps=steps, path=path)


# --- Evaluate: params, GFLOPs and latency per generated image, quality, the Pareto plot ----------

@torch.no_grad()
def held_out(teacher, cfg):
    """(z, y, x): --eval-n new noises (the evaluation stream, never a pair) and the teacher's images."""
    C, S, n, dev = teacher.in_channels, teacher.input_size, cfg.eval_n, next(teacher.parameters()).device
    z = torch.randn(n, C, S, S, generator=dit.rng(cfg.seed, "eval")).to(dev)
    y = (torch.arange(n) % teacher.num_classes).to(dev)
    return z, y, dit.sample(teacher, z, y, cfg.sample_steps, "ddim", 0.0, cfg.cfg_scale).clamp(-1, 1)


@torch.no_grad()
def rmse(model, triples):
    """Pixel RMSE of a one-step model's images to the teacher's on (z, y, x): on the training pairs and on new
    noise it shows memorisation (a far smaller error on the pairs)."""
    z, y, x = triples
    return float(torch.cat([(model(z[k:k + 250], y[k:k + 250]).clamp(-1, 1) - x[k:k + 250]).pow(2).flatten(1)
                            for k in range(0, len(z), 250)]).mean().sqrt())


def measure(cfg, entries, device, offline):
    """One row per (name, model, checkpoint): a multi-step model pays its whole DDIM + CFG sampler. Latency:
    ms per image at batch 1 and 64, median of --bench-reps interleaved rounds (fid.time_sampling). One-step
    models: pixel RMSE to the teacher's images on the first --eval-n pairs and on as many new noises."""
    models = {name: model for name, model, _ in entries}
    ms = {B: fid.time_sampling(models, B, cfg.sample_steps, cfg.cfg_scale, cfg.bench_reps) for B in (1, 64)}
    held = held_out(entries[0][1], cfg) if cfg.eval_n else None
    rows = []
    for name, model, ck in entries:
        nfe = 1 if getattr(model, "one_step", False) else cfg.sample_steps * (2 if cfg.cfg_scale != 1 else 1)
        gflops = fid.sampler_gflops(model, cfg.sample_steps, cfg.cfg_scale)
        L, D, H = shape_of(model)
        row = {"model": name, "L x D x heads": f"{L} x {D} x {H}",
               "params": f"{dit.param_count(model) / 1e6:.3f}M", "NFE": nfe, "GFLOPs/img": f"{gflops:.3f}",
               **{f"ms/img b{B}": f"{1000 * statistics.median(t[name]) / B:.2f}" for B, t in ms.items()},
               "train steps": ck["steps"] if ck else "-", "train s": ck["wall_s"] if ck else "-"}
        if cfg.eval_n:
            q = fid.evaluate(model, cfg.data, cfg.data_dir, model.input_size, n=cfg.eval_n,
                             steps=cfg.sample_steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed, device=device)
            row[q["metric"] + " (lower better)"] = f"{q['score']:.2f}"
            row["class acc"] = "-" if q["acc"] is None else f"{q['acc']:.2f}"
            seen = (offline["z"][:cfg.eval_n], offline["y"][:cfg.eval_n], offline["x"][:cfg.eval_n])
            row["RMSE pairs / new"] = f"{rmse(model, seen):.3f} / {rmse(model, held):.3f}" \
                if nfe == 1 else "-"  # the multi-step teacher made the pairs: no such error
        rows.append(row)
    return rows


def curves(cfg, ck):
    """--curve: keep this run's student scores (ck["evals"]), then one table (per method and step: each seed's
    FD-clf, mean +- sd, training seconds) and curves.png over every run in cfg.out whose settings equal
    these but for the method and the seed."""
    same = {k: v for k, v in asdict(cfg).items() if k not in ("method", "seed", "out", "device", "log_every",
                                                                "bench_reps", "ship")}
    folder = os.path.join(cfg.out, f"curves_{dit.settings_tag(same)}")
    label = cfg.method + ("-slice" if cfg.method == "ta" else "")  # the student cut from the TA
    rows, png = fid.pool_curves(folder, f"{label}_seed{cfg.seed}", ck.get("evals", []),
                                ("method", "student steps"),
                                xlabel="student training steps (MI1: end-to-end steps, after its stage A)")
    print(f"\nquality during training (n = {cfg.eval_n}, seed = the student's --seed), {folder}:\n"
          f"{dit.markdown_table(rows)}\n{png}")
    return rows


# depth vs width at ~equal 18 L D^2 (6x64, 3x92, 2x112: +-4%), and 1/2/4/8 heads at L=3, D=64
SWEEP = [(6, 64, 2), (3, 92, 2), (2, 112, 2), (3, 64, 1), (3, 64, 2), (3, 64, 4), (3, 64, 8)]


def sweep(cfg, offline, device):
    """Train cfg.method for every SWEEP shape; one table (teacher first) and the Pareto plot."""
    entries = [("teacher", offline["teacher"], None)]
    for shape in SWEEP:
        _, model, ck = run_method(cfg, offline, shape)[-1]
        entries.append((f"student {shape[0]}x{shape[1]}x{shape[2]}", model, ck))
    if not dit.is_main():  # under torchrun: rank 0 measures, the others wait in dist_finish
        return []
    rows = measure(cfg, entries, device, offline)
    points = [(float(r["ms/img b1"]), float(q), f"{r['model'][8:]} {r['params']}")
              for r in rows[1:] for k, q in r.items() if "lower better" in k]
    if points:
        fid.pareto_png(points, os.path.join(cfg.out, f"pareto_onestep_{cfg.method}.png"),
                       "ms per image at batch 1")
    return rows


# ===== plumbing: nothing paper-specific below (config, main) ======================================

@dataclass
class DistillConfig:
    method: str = "ta"           # kd (output only) | fkd (output + features) | ta (teaching assistant) | mi1
    mapping: str = "uniform"     # student->teacher block map for fkd: uniform | first
    depth: int = 3               # >=1: student blocks (teacher: 6)
    width: int = 64              # >=1: student hidden size D (multiple of 4 * heads; teacher: 128)
    heads: int = 2               # >=1: student attention heads
    feat_weight: float = 0.1     # >=0: lambda_f on the feature loss (BK-SDM: 1; 0.1 here) [inferred]
    local_frac: float = 0.3      # (0,1): mi1: block-local stage A steps = local_frac * steps, first
    steps: int = 2400            # >=1: student training steps (equal for every method; end-to-end for MI1)
    teacher_steps: int = 1500    # >=1: steps of the one-step teacher (the feature source of fkd / ta / mi1)
    aux_steps: int = 1000        # >=1: steps of the teaching assistant (--method ta; one fixed TA, shipped)
    batch_size: int = 64         # >=1: pairs (or images) per step
    lr: float = 1e-3             # >0: AdamW learning rate (constant after a 20-step warm-up)
    ema_decay: float = 0.999     # [0,1): EMA of the weights (the evaluated model)
    pairs: int = 10000           # >=1: offline (noise, image, label) pairs from the teacher
    sample_steps: int = 10       # [1,1000]: teacher DDIM steps (eta 0): pairs, teacher quality/latency
    cfg_scale: float = 1.5       # >=0: classifier-free guidance of the teacher's sampler (DiT: 1.5 for FID)
    eval_n: int = 500            # >=0: samples per fid.evaluate; 0 = skip the quality column
    bench_reps: int = 5          # >=1: timing rounds, each model once per round (interleaved); median
    sweep: bool = False          # train the depth/width/heads grid and draw the Pareto plot
    curve: str = ""              # student steps to score during training, e.g. 300,600,1200,2400: a table
    #                              and out/<...>/curves.png over every method and seed run with these settings
    teacher: str = "weights/dit_shapes.pt"  # base DiT (shipped; out/dit.pt after python dit.py)
    preset: str = ""             # "" = the base's; cifar / imagenet64: lr, EMA left at default -> PAPER
    shipped: str = "weights"     # a one-step teacher here with the same settings key is reused, not trained
    ship: bool = False           # write what this run made of the fixed helpers and pairs to --shipped
    data: str = "shapes"         # shapes (embedded) | cifar10 (with --data-dir ../shared/data/cifar10-subset)
    data_dir: str = "data"       # where cifar10 lives
    out: str = "out/distill"     # folder for pairs, stage checkpoints, grids and plots
    seed: int = 0                # >=0: students, TA, evaluation noise (pairs, one-step teacher fixed)
    pairs_seed: int = 1          # >=0: noise of the offline pairs (the data set, fixed across --seed)
    device: str = "auto"         # auto | cpu | cuda | mps
    dtype: str = "float32"       # float32 | bfloat16 | float16 (autocast)
    log_every: int = 100         # >=1: training log line every N steps


# the GPU presets' recipe for every stage (DiT Sec. 4: lr 1e-4, constant EMA 0.9999 from a copy) [inferred]
PAPER = dict(lr=1e-4, ema_decay=0.9999)


def main(argv=None):
    cfg = dit.check(dit.parse_args(DistillConfig, argv),
                    dict(method=("kd", "fkd", "ta", "mi1"), mapping=("uniform", "first"), dtype=dit.DTYPES))
    if cfg.width % (4 * cfg.heads):
        sys.exit("error: --width must be a multiple of 4 * --heads")
    dit.curve_steps(cfg.curve, cfg.steps, "student steps (--steps)")
    dit.check_writable(cfg.out, folder=True)
    device = dit.pick_device(cfg.device)
    dit.dist_setup(device)
    ck = dit.get_teacher(cfg.teacher, data=cfg.data, data_dir=cfg.data_dir, device=cfg.device, seed=cfg.seed)
    dit.method_preset(cfg, ck, PAPER)
    head_dim = ck["config"]["hidden_size"] // ck["config"]["num_heads"]
    if cfg.method == "ta" and cfg.width // cfg.heads != head_dim:
        sys.exit(f"error: the student cut from the TA keeps whole heads: --width / --heads must be "
                 f"{head_dim} (the TA's)")
    print(json.dumps(dict(asdict(cfg), resolved_device=str(device))))
    T = dit.build_dit(ck).to(device).requires_grad_(False)
    T.tag, T.name = dit.weights_tag(ck["ema"]), "teacher"
    offline = dict(teacher=T, config=ck["config"])  # GET's offline signals: the teacher and its pairs
    os.makedirs(cfg.out, exist_ok=True)
    name = f"pairs_{T.tag}_{cfg.sample_steps}steps_cfg{cfg.cfg_scale}_n{cfg.pairs}_seed{cfg.pairs_seed}_u8"
    path = os.path.join(cfg.out, name + ".pt")
    shipped = os.path.join(cfg.shipped, name + ".png")  # the images only
    p = dit.main_first(make_pairs, T, cfg.pairs, cfg.sample_steps, cfg.cfg_scale, cfg.pairs_seed, path,
                       shipped=shipped)
    if cfg.ship and not os.path.exists(shipped) and dit.is_main():
        write_tiles(p["x"], shipped)
    offline.update(z=p["z"].to(device), x=dit.to_float(p["x"]).to(device), y=p["y"].to(device),
                   data_tag=name, data=(p["x"], torch.arange(len(p["y"]))))
    header = dit.run_header(device, cfg.dtype, cfg.batch_size, cfg.seed)
    if cfg.sweep:
        rows = sweep(cfg, offline, device)
        if rows:
            print(f"\n{header}\n{dit.markdown_table(rows)}")
        return dit.dist_finish() or rows
    stages = run_method(cfg, offline, (cfg.depth, cfg.width, cfg.heads))
    if not dit.is_main():  # under torchrun: rank 0 measures and writes, the others wait in dist_finish
        return dit.dist_finish()
    grid = os.path.join(cfg.out, f"onestep_{cfg.method}_grid.png")
    dit.save_rows([T] + [m for _, m, _ in stages], grid, cfg.seed, cfg.sample_steps, cfg.cfg_scale)
    rows = measure(cfg, [("teacher", T, None)] + stages, device, offline)
    names = ", ".join(n for n, _, _ in stages)
    print(f"\n{header}\n{dit.markdown_table(rows)}\n\ngrid (rows: teacher, {names}; same noise): {grid}"
          f"\nstudent checkpoint: {stages[-1][2]['path']}")
    if cfg.curve:
        curves(cfg, stages[-1][2])
    dit.dist_finish()
    return rows


if __name__ == "__main__":
    main()
