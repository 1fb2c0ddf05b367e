"""
test_all.py: fast CPU tests of tinydit, each asserting a property of a method.

    python -m pytest -q test_all.py
"""
import ast
import copy
import dataclasses
import glob
import io
import json
import math
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import zipfile

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from scipy.stats import spearmanr

import dit
import distill
import dynamic
import fid
import jetson_bench
import prune
import sample
from course.graders import *  # noqa: F401,F403  (its __all__: the assignment graders, pytest -k assignment)

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CIFAR = os.path.join(HERE, "..", "shared", "data", "cifar10-subset")


def tiny_cfg(tmp, **kw):
    return dit.resolve(dit.TrainConfig(**dict(dict(preset="tiny", out=os.path.join(str(tmp), "dit.pt"),
                                                   steps=30, log_every=10, ckpt_every=10), **kw)))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path of a tiny-preset base checkpoint (16x16, 4 blocks, width 64), trained 150 steps."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("teacher"), steps=150, log_every=50, ckpt_every=150)
    dit.train_base(cfg, quiet=True)
    return cfg.out


def train_tiny(cfg, loss_fn=None, groups=None):
    """dit.train on a fresh tiny DiT (seed 0), 16 px shapes: (model, ema, ckpt); DiT's loss by default;
    groups(model) -> the optimizer's parameter groups (default: one)."""
    x, y, nc = dit.load_data("shapes", image_size=16)
    d = dit.Diffusion()
    torch.manual_seed(0)
    model = dit.DiT(**dit.dit_config(cfg, nc))
    return dit.train(model, loss_fn or (lambda m, xb, yb, step: d.loss(m, xb, yb)), (x, y), cfg,
                     dict(kind="dit", config=dit.dit_config(cfg, nc)), groups(model) if groups else None,
                     quiet=True)


def run(args, **kw):
    """Run a script in a subprocess from the repo root; returns CompletedProcess."""
    return subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, timeout=300,
                          **kw)


# --- dit.py: the model ----------------------------------------------------------------------------

def test_adaln_zero_fresh_block_is_identity():
    """adaLN-Zero (DiT Sec. 3.2): every gate starts at 0, so a fresh block returns its input exactly,
    and a fresh model predicts exactly 0."""
    model = dit.DiT(**dit.PRESETS["tiny"])
    h, c = torch.randn(3, 16, 64), torch.randn(3, 64)
    for block in model.blocks:
        assert torch.equal(block(h, c), h)
    out = model(torch.randn(3, 3, 16, 16), torch.tensor([0, 500, 999]), torch.tensor([0, 1, 2]))
    assert out.shape == (3, 6, 16, 16) and torch.equal(out, torch.zeros_like(out))


def test_state_dict_names_match_official_dit():
    """Parameter names/shapes equal facebookresearch/DiT models.py (DiT-S/2 at 32x32, learn_sigma)."""
    dit_s2 = dit.DiT(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=1000)
    sd = dit_s2.state_dict()
    expected = {
        "pos_embed": (1, 256, 384), "x_embedder.proj.weight": (384, 3, 2, 2), "x_embedder.proj.bias": (384,),
        "t_embedder.mlp.0.weight": (384, 256), "t_embedder.mlp.0.bias": (384,),
        "t_embedder.mlp.2.weight": (384, 384), "t_embedder.mlp.2.bias": (384,),
        "y_embedder.embedding_table.weight": (1001, 384),
        "final_layer.linear.weight": (2 * 2 * 6, 384), "final_layer.linear.bias": (24,),
        "final_layer.adaLN_modulation.1.weight": (768, 384), "final_layer.adaLN_modulation.1.bias": (768,),
    }
    for i in range(12):
        expected.update({
            f"blocks.{i}.attn.qkv.weight": (1152, 384), f"blocks.{i}.attn.qkv.bias": (1152,),
            f"blocks.{i}.attn.proj.weight": (384, 384), f"blocks.{i}.attn.proj.bias": (384,),
            f"blocks.{i}.mlp.fc1.weight": (1536, 384), f"blocks.{i}.mlp.fc1.bias": (1536,),
            f"blocks.{i}.mlp.fc2.weight": (384, 1536), f"blocks.{i}.mlp.fc2.bias": (384,),
            f"blocks.{i}.adaLN_modulation.1.weight": (2304, 384),
            f"blocks.{i}.adaLN_modulation.1.bias": (2304,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def reference_dit_forward(sd, x, t, y, p, heads):
    """An independent, functional DiT forward straight from the paper's equations and the official
    state-dict names (eager attention, explicit unpatchify), to check DiT.forward against."""
    lin = lambda v, name: v @ sd[name + ".weight"].T + sd[name + ".bias"]
    B = x.shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=p)
    h = h.flatten(2).transpose(1, 2) + sd["pos_embed"]
    D = h.shape[-1]
    freqs = torch.exp(-np.log(10000) * torch.arange(128) / 128)
    te = torch.cat([torch.cos(t[:, None] * freqs), torch.sin(t[:, None] * freqs)], 1)
    te = lin(F.silu(lin(te, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = te + sd["y_embedder.embedding_table.weight"][y]
    ln = lambda v: F.layer_norm(v, (D,), eps=1e-6)
    i, feats = 0, []
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        s1, c1, g1, s2, c2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        a = ln(h) * (1 + c1[:, None]) + s1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, -1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        m = ln(h) * (1 + c2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        feats.append(h)
        i += 1
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    o = lin(ln(h) * (1 + sc[:, None]) + sh[:, None], "final_layer.linear")
    g = int(o.shape[1] ** 0.5)
    o = o.reshape(B, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
    return o.reshape(B, o.shape[1], g * p, g * p), feats


def test_forward_matches_independent_reference_with_official_names():
    """A state dict with random values in every parameter (zero-init gates replaced) loads strict=True
    and DiT.forward equals an independent functional forward written from the paper, to fp32 rounding;
    return_features gives each block's output."""
    torch.manual_seed(0)
    model = dit.DiT(input_size=16, patch_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    sd = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        ours, feats = model(x, t.long(), y, return_features=True)
    ref, ref_feats = reference_dit_forward(sd, x, t, y, 4, 4)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()
    assert len(feats) == 2 and all(torch.allclose(a, r, atol=1e-4) for a, r in zip(feats, ref_feats))


def test_the_shipped_base_loads_as_a_plain_dit():
    """weights/dit_shapes.pt: kind dit, the cpu preset's config, float16 EMA weights only, loads with
    weights_only=True into the DiT it describes and predicts finite eps."""
    ck = dit.load_checkpoint(os.path.join(HERE, "weights", "dit_shapes.pt"), kinds=["dit"])
    assert ck["config"] == dict(dit.PRESETS["cpu"], in_channels=3, num_classes=10, learn_sigma=True,
                                class_dropout_prob=0.1, mlp_ratio=4.0)
    assert set(ck) >= {"kind", "config", "ema"} and "opt" not in ck
    assert all(v.dtype == torch.float16 for v in ck["ema"].values())
    model = dit.build_dit(ck)
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([10, 900]), torch.tensor([0, 9]))
    assert out.shape == (2, 6, 32, 32) and torch.isfinite(out).all() and out.abs().max() > 0


# --- dit.py: diffusion and training ---------------------------------------------------------------

def test_respacing_keeps_alpha_bar_at_kept_steps():
    """IDDPM respacing: the respaced process has the original alpha_bar at every kept timestep."""
    full, sp = dit.Diffusion(), dit.Diffusion().respace(25)
    assert len(sp.timestep_map) == 25 and sp.timestep_map[0] == 0 and sp.timestep_map[-1] == 999
    assert np.allclose(sp.ac, full.ac[sp.timestep_map])
    assert np.allclose(dit.Diffusion().respace(1000).betas, full.betas)


def test_vb_term_trains_only_the_variance_channels():
    """L_vb is computed with eps_hat detached (DiT Sec. 3.3 / IDDPM Eq. 16): its gradient reaches only
    the variance half of the output; the MSE term only the eps half."""
    d = dit.Diffusion()
    x0 = torch.rand(4, 3, 8, 8) * 2 - 1
    out = torch.randn(4, 6, 8, 8, requires_grad=True)
    i, noise = torch.tensor([0, 10, 500, 999]), torch.randn(4, 3, 8, 8)
    terms = d.loss_from_output(out, x0, d.q_sample(x0, i, noise), i, noise)
    g_vb, = torch.autograd.grad(terms["vb"], out, retain_graph=True)
    g_mse, = torch.autograd.grad(terms["mse"], out)
    assert g_vb[:, :3].abs().max() == 0 and g_vb[:, 3:].abs().max() > 0
    assert g_mse[:, 3:].abs().max() == 0 and g_mse[:, :3].abs().max() > 0


def test_lr_schedule_is_warmup_then_constant_or_cosine_to_lr_end():
    const = dit.TrainConfig(steps=100, warmup=10)
    assert dit.lr_factor(0, const) == 0.1 and dit.lr_factor(9, const) == 1.0
    assert dit.lr_factor(99, const) == 1.0
    cos = dit.TrainConfig(steps=100, warmup=10, lr_end=0.5)
    f = [dit.lr_factor(s, cos) for s in range(100)]
    assert f[:10] == [dit.lr_factor(s, const) for s in range(10)] and f[10] == 1.0
    assert all(a >= b for a, b in zip(f[10:], f[11:]))
    assert abs(f[-1] - 0.5) < 1e-3 and abs(f[55] - 0.75) < 1e-9


def test_tiny_training_lowers_the_loss(tmp_path):
    """60 steps of the shared training loop lower the diffusion loss on a fixed held-out batch."""
    cfg = tiny_cfg(tmp_path, steps=60)
    x, y, nc = dit.load_data("shapes", image_size=16, train=False)
    xb, yb = dit.to_float(x[:64]), y[:64]
    d = dit.Diffusion()
    torch.manual_seed(0)
    model = dit.DiT(**dit.dit_config(cfg, nc)).eval()
    g = torch.Generator().manual_seed(1)
    i, noise = torch.randint(0, 1000, (64,), generator=g), torch.randn(xb.shape, generator=g)
    with torch.no_grad():
        before = d.loss(model, xb, yb, i, noise)["loss"].item()
    ck = dit.train_base(cfg, quiet=True)
    with torch.no_grad():
        after = d.loss(dit.build_dit(ck, ema=False), xb, yb, i, noise)["loss"].item()
    assert after < 0.7 * before, (before, after)


def test_kill_and_resume_matches_uninterrupted_run(tmp_path):
    """A run stopped by SIGTERM mid-way saves a checkpoint; re-running resumes (model, EMA, optimizer,
    step, RNG, data order) and ends with exactly the weights of a run that was never interrupted."""
    d = dit.Diffusion()

    def run_to_end(cfg, kill_at=None):
        calls = {"n": 0}

        def loss_fn(m, xb, yb, step):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return d.loss(m, xb, yb)
        return train_tiny(cfg, loss_fn)

    _, ema_a, ck_a = run_to_end(tiny_cfg(tmp_path / "a", steps=24, ckpt_every=8))
    cfg_b = tiny_cfg(tmp_path / "b", steps=24, ckpt_every=8)
    with pytest.raises(SystemExit) as e:
        run_to_end(cfg_b, kill_at=13)
    assert e.value.code == 128 + signal.SIGTERM
    stopped = dit.load_checkpoint(cfg_b.out)
    assert stopped["step"] == 13 and stopped["train_s"] > 0
    _, ema_b, ck_b = run_to_end(cfg_b)
    assert ck_b["metrics"]["wall_s"] >= stopped["train_s"]  # the clock goes on, it does not restart
    for k in ck_a["model"]:
        assert torch.equal(ck_a["model"][k], ck_b["model"][k]), k
        assert torch.equal(ck_a["ema"][k], ck_b["ema"][k]), k


def test_a_finished_run_is_reused_whatever_its_optimizer_groups_and_a_stopped_one_says_so(tmp_path):
    """Reusing a finished checkpoint needs only its weights: a run whose optimizer has other parameter groups
    (a changed recipe with the same key) reuses it; resuming an unfinished one that way is one error line."""
    def split(model):  # two parameter groups: the blocks, and the rest
        return [dict(params=list(model.blocks.parameters())),
                dict(params=[p for n, p in model.named_parameters() if not n.startswith("blocks.")])]
    _, ema, _ = train_tiny(tiny_cfg(tmp_path / "a", steps=4))
    _, ema_again, _ = train_tiny(tiny_cfg(tmp_path / "a", steps=4), groups=split)
    assert all(torch.equal(a, b) for a, b in zip(ema.state_dict().values(), ema_again.state_dict().values()))
    with pytest.raises(SystemExit, match="optimizer state does not fit"):
        train_tiny(tiny_cfg(tmp_path / "a", steps=6), groups=split)


def test_grad_skip_drops_the_steps_whose_gradient_is_too_large(tmp_path):
    """--grad-skip (DyDiT's code): a step whose grad norm exceeds it leaves the weights as they were; below
    every norm, no step is taken at all, and without it every step moves the weights."""
    torch.manual_seed(0)
    start = dit.DiT(**dit.dit_config(tiny_cfg(tmp_path), 10)).state_dict()
    skipped = train_tiny(tiny_cfg(tmp_path / "a", steps=3, grad_skip=1e-9))[0].state_dict()
    moved = train_tiny(tiny_cfg(tmp_path / "b", steps=3))[0].state_dict()
    assert all(torch.equal(skipped[k], start[k]) for k in start)
    assert any(not torch.equal(moved[k], start[k]) for k in start)


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=10, ckpt_every=5)
    d, calls = dit.Diffusion(), {"n": 0}

    def loss_fn(m, xb, yb, step):
        calls["n"] += 1
        terms = d.loss(m, xb, yb)
        return dict(terms, loss=terms["loss"] * float("nan")) if calls["n"] == 8 else terms
    with pytest.raises(SystemExit) as e:
        train_tiny(cfg, loss_fn)
    assert "loss is nan" in str(e.value)
    assert dit.load_checkpoint(cfg.out)["step"] == 5


def official_space_timesteps(num_timesteps, section_counts):
    """The arithmetic of IDDPM / DiT respace.py space_timesteps, transcribed (sections of the process,
    a fractional stride per section, the index accumulated by repeated addition and rounded)."""
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, set()
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.add(start + round(cur))
            cur += stride
        start += size
    return steps


def test_respacing_equals_the_official_rule_for_every_k_and_refuses_others():
    for k in range(1, 1001):
        assert set(dit.Diffusion().respace(k).timestep_map.tolist()) == official_space_timesteps(1000, [k]), k
    for k in (0, 1001):
        with pytest.raises(SystemExit) as e:
            dit.Diffusion().respace(k)
        assert str(e.value).startswith("error:") and "\n" not in str(e.value)


def test_rng_state_round_trips_every_stream():
    """What the checkpoint stores restores the CPU stream (and the CUDA one where a GPU is present)."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(3)
    state = dit.rng_state(device)
    a = torch.rand(5), torch.rand(5, device=device)
    dit.set_rng_state(state, device)
    assert torch.equal(a[0], torch.rand(5)) and torch.equal(a[1], torch.rand(5, device=device))
    assert "cuda" in state or device.type == "cpu"
    dit.set_rng_state(state["cpu"], device)  # files written before the CUDA state was saved
    assert torch.equal(a[0], torch.rand(5))


def test_float16_training_uses_a_grad_scaler_and_small_data_sets_repeat(tmp_path):
    x, y, nc = dit.load_data("shapes", image_size=16)
    xb, yb = next(dit.batches(x[:5], y[:5], 8, 0))  # fewer images than a batch (distill.py --pairs 32)
    assert xb.shape[0] == 8 and set(yb.tolist()) <= set(y[:5].tolist())
    cfg = tiny_cfg(tmp_path, steps=2, batch_size=4, dtype="float16")
    ck = dit.train_base(cfg, quiet=True)
    assert dit.load_checkpoint(cfg.out)["scaler"]["scale"] > 0 and math.isfinite(ck["metrics"]["final_loss"])


def test_the_gate_and_dydit_emas_are_constant_from_the_first_step(tiny_teacher, tmp_path):
    """TinyFusion's gate EMA (0.999) and DyDiT's fine-tune EMA (0.99) use the papers' constant decay from
    step 0, not the cpu preset's warm-up: after one step the EMA has moved 1 - decay of the way."""
    ck, x, y = dit.load_checkpoint(tiny_teacher), *dit.load_data("shapes", image_size=16)[:2]
    pcfg = prune.PruneConfig(learn_steps=1, batch_size=8)
    prune.learn_mask(pcfg, ck, (x, y), str(tmp_path / "search.pt"))
    dcfg = dynamic.DyConfig(out=str(tmp_path / "dy.pt"), steps=1, batch_size=8, lam_hold=0, lam_ramp=1)
    dynamic.finetune(dcfg, ck, quiet=True)
    for path, prefix, decay in ((tmp_path / "search.pt", "model.", 0.999), (dcfg.out, "dit.", 0.99)):
        saved = dit.load_checkpoint(str(path))
        init = {prefix + k: v for k, v in dit.build_dit(ck).state_dict().items()}
        init["logits"] = torch.full_like(saved["model"].get("logits", torch.zeros(1)), pcfg.logit_init)
        moved = [(saved["ema"][k] - init[k]).abs().max() / (saved["model"][k] - init[k]).abs().max()
                 for k in saved["ema"] if k in init and (saved["model"][k] - init[k]).abs().max() > 1e-6]
        assert moved and max(moved) < 2 * (1 - decay), (path, max(moved))


def test_gpu_presets_use_the_papers_constant_ema_and_cpu_presets_the_warmup(tmp_path):
    assert dit.resolve(dit.TrainConfig(preset="cifar")).ema_warmup == 0
    assert dit.resolve(dit.TrainConfig(preset="cpu")).ema_warmup == 1
    x, y, nc = dit.load_data("shapes", image_size=16)
    d, emas = dit.Diffusion(), []
    for warm in (1, 0):
        cfg = tiny_cfg(tmp_path / str(warm), steps=1, batch_size=8, ema_decay=0.9999, ema_warmup=warm)
        torch.manual_seed(0)
        model = dit.DiT(**dit.dit_config(cfg, nc))
        init = copy.deepcopy(model.state_dict())
        _, ema, ck = dit.train(model, lambda m, xb, yb, s: d.loss(m, xb, yb), (x, y), cfg,
                               dict(kind="dit", config=dit.dit_config(cfg, nc)), quiet=True)
        emas.append(max((ck["ema"][k] - init[k]).abs().max().item() for k in init))
    # constant 0.9999 moves 1e-4 of the step away from the copy; the warm-up decay 0.1 moves 0.9 of it
    assert 0 < emas[1] < 1e-3 * emas[0]


def test_torchrun_unused_parameters_and_a_new_world_size(tmp_path, tiny_teacher):
    """Under torchrun (2 CPU processes): MI1 (stage A leaves the down/up projections of other stages
    unused) and a DyDiT ablation mode train; a 2-process dit.py checkpoint resumes in one process."""
    r = torchrun(["distill.py", "--method", "mi1", "--teacher", tiny_teacher, "--out", str(tmp_path),
                  "--width", "32", "--steps", "4", "--aux-steps", "2", "--teacher-steps", "2",
                  "--pairs", "16", "--batch-size", "8", "--sample-steps", "2", "--eval-n", "0",
                  "--bench-reps", "1", "--device", "cpu"], 29533)  # a port per call
    assert r.returncode == 0, r.stderr[-2000:]
    dy = str(tmp_path / "dy.pt")
    r = torchrun(["dynamic.py", "--mode", "tdw", "--teacher", tiny_teacher, "--out", dy,
                  "--steps", "2", "--batch-size", "8", "--eval-n", "2", "--eval-steps", "2",
                  "--bench-batches", "1", "--bench-reps", "1", "--device", "cpu"], 29534)
    assert r.returncode == 0, r.stderr[-2000:]
    assert dit.load_checkpoint(str(tmp_path / "dy.pt"))["step"] == 2
    out = str(tmp_path / "w.pt")
    r = torchrun(["dit.py", "--preset", "tiny", "--steps", "2", "--out", out, "--device", "cpu"], 29535)
    assert r.returncode == 0, r.stderr[-2000:]
    assert dit.load_checkpoint(out)["step"] == 2 and len(dit.load_checkpoint(out)["rng"]) == 2
    r = run(["dit.py", "--preset", "tiny", "--steps", "4", "--out", out, "--device", "cpu"])
    assert r.returncode == 0 and "new noise" in r.stdout and dit.load_checkpoint(out)["step"] == 4


def test_training_saves_the_final_state_once_and_syncs_the_host_once_per_step(tmp_path, monkeypatch):
    """The final checkpoint is written once (not at the last step and again after the loop), and a step
    reads its loss terms back with one .tolist() (the finite check and the log share it): the loop's own
    .item() / .tolist() calls are counted."""
    cfg = tiny_cfg(tmp_path, steps=4, batch_size=8, log_every=2, ckpt_every=100)
    saves, syncs = [], []
    save = dit.save_checkpoint
    monkeypatch.setattr(dit, "save_checkpoint", lambda obj, path: saves.append(path) or save(obj, path))
    for name in ("item", "tolist"):
        orig = getattr(torch.Tensor, name)
        def counted(t, *a, _o=orig, _n=name):  # count the reads made by the loop itself (not by AdamW)
            if sys._getframe(1).f_code.co_filename == dit.__file__:
                syncs.append(_n)
            return _o(t, *a)
        monkeypatch.setattr(torch.Tensor, name, counted)
    train_tiny(cfg)
    assert saves == [cfg.out] and len(syncs) == cfg.steps, (saves, syncs)


# --- dit.py: data ---------------------------------------------------------------------------------

def test_shapes_dataset_is_deterministic_and_balanced():
    x, y, nc = dit.load_data("shapes", image_size=32)
    x2, _ = dit.make_shapes.__wrapped__(seed=0)
    assert x.shape == (10000, 3, 32, 32) and x.dtype == torch.uint8 and nc == 10
    assert torch.equal(x, x2) and torch.equal(torch.bincount(y), torch.full((10,), 1000))


@pytest.mark.skipif(not os.path.isdir(SHARED_CIFAR), reason="../shared/data/cifar10-subset is absent")
def test_cifar10_loader_reads_the_shared_subset():
    x, y = dit.load_cifar10(SHARED_CIFAR, train=True)
    xt, yt = dit.load_cifar10(SHARED_CIFAR, train=False)
    assert x.shape == (5170, 3, 32, 32) and xt.shape == (1017, 3, 32, 32)
    assert set(y.tolist()) == set(range(10))
    with open(os.path.join(SHARED_CIFAR, "cifar-10-batches-py", "data_batch_1"), "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert torch.equal(x[0], torch.from_numpy(np.asarray(raw[b"data"][0], dtype=np.uint8).reshape(3, 32, 32)))


def test_cifar10_loader_reads_a_generated_tarball(tmp_path):
    """The official tarball layout (cifar-10-batches-py/data_batch_1..5, test_batch), any rows per batch."""
    rng = np.random.default_rng(0)
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        for name, n in [(f"data_batch_{k}", 7) for k in range(1, 6)] + [("test_batch", 5)]:
            blob = pickle.dumps({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                                 b"labels": list(rng.integers(0, 10, n))})
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            tar.addfile(info, io.BytesIO(blob))
    x, y = dit.load_cifar10(str(tmp_path), train=True)
    assert x.shape == (35, 3, 32, 32) and y.shape == (35,)
    x, y, nc = dit.load_data("cifar10", str(tmp_path), image_size=16, train=False)
    assert x.shape == (5, 3, 16, 16) and nc == 10


def test_imagenet64_loader_reads_a_generated_npz(tmp_path):
    """Downsampled-ImageNet layout: data uint8 (N, 12288) channel-major, labels 1..1000 -> 0..999."""
    data = np.random.default_rng(0).integers(0, 256, (6, 12288), dtype=np.uint8)
    np.savez(tmp_path / "train_data_batch_1.npz", data=data, labels=np.array([1, 2, 3, 1000, 5, 6]))
    x, y, nc = dit.load_data("imagenet64", str(tmp_path), image_size=64)
    assert x.shape == (6, 3, 64, 64) and nc == 1000 and y.tolist() == [0, 1, 2, 999, 4, 5]
    assert torch.equal(x[1, 2], torch.from_numpy(data[1, 2 * 4096:3 * 4096].reshape(64, 64)))


def test_imagenet64_loads_with_one_copy_and_each_rank_reads_its_files(tmp_path):
    """10 generated files: the peak RSS of loading grows by the data set plus about one file (the old
    list + concatenate doubled it), and rank r of w reads files r, r + w, ... only."""
    rng, f = np.random.default_rng(0), 10
    for k in range(f):
        data = rng.integers(0, 256, (1000, 12288), dtype=np.uint8)
        np.savez(tmp_path / f"train_data_batch_{k + 1}.npz", data=data, labels=np.full(1000, k + 1))
    code = ("import sys, dit\n"  # VmHWM = peak RSS; writing 5 to clear_refs resets it (Linux)
            "kb = lambda k: int(next(l for l in open('/proc/self/status') if l.startswith(k)).split()[1])\n"
            "open('/proc/self/clear_refs', 'w').write('5')\nbefore = kb('VmRSS')\n"
            "x, y = dit.load_imagenet64(sys.argv[1])\nprint((kb('VmHWM') - before) * 1024 / x.numel())")
    r = run(["-c", code, str(tmp_path)])
    ratio = float(r.stdout.split()[-1])
    print(f"imagenet64 loader: peak RSS growth = {ratio:.2f} x the data set ({f} files x 1000 images)")
    assert ratio < 1 + 1.5 / f, ratio
    shards = [set(dit.load_imagenet64(str(tmp_path), rank=r, world=3)[1].tolist()) for r in range(3)]
    assert [len(v) for v in shards] == [4, 3, 3] and set.union(*shards) == set(range(f))  # each file once


def test_missing_data_gives_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        dit.load_data("imagenet64", str(tmp_path / "nowhere"), 64)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


# --- dit.py: the reverse process (DDPM / DDIM + CFG); sample.py, its CLI --------------------------

class OracleEps(torch.nn.Module):
    """The exact eps of a one-image data set {x*}: eps = (x_t - sqrt(abar_t) x*) / sqrt(1 - abar_t)."""
    num_classes, in_channels, input_size = 10, 3, 8

    def __init__(self, xstar, learn_sigma):
        super().__init__()
        self.xstar, self.learn_sigma, self.w = xstar, learn_sigma, torch.nn.Parameter(torch.zeros(1))
        self.ac = torch.tensor(dit.Diffusion().ac, dtype=torch.float32)

    def forward(self, x, t, y):
        ab = self.ac[t].view(-1, 1, 1, 1)
        eps = (x - ab.sqrt() * self.xstar) / (1 - ab).sqrt()
        return torch.cat([eps, torch.zeros_like(eps)], 1) if self.learn_sigma else eps


def test_samplers_with_the_exact_eps_return_the_data_point():
    """With the oracle eps of a one-point data set, DDIM and DDPM (respaced, fixed or learned variance)
    both end exactly at that point: the update rules and the respacing are right."""
    xstar = torch.rand(1, 3, 8, 8) * 2 - 1
    for learn_sigma in (False, True):
        for method in ("ddim", "ddpm"):
            z, y = torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)
            out = dit.sample(OracleEps(xstar, learn_sigma), z, y, steps=40, method=method,
                             generator=torch.Generator().manual_seed(0))
            assert (out - xstar).abs().max() < 1e-4, (learn_sigma, method)


def test_same_seed_gives_bit_identical_samples(tiny_teacher):
    model = sample.load_model(tiny_teacher)
    labels = torch.arange(6) % 10
    for method in ("ddim", "ddpm"):
        a = dit.generate(model, labels, seed=3, steps=10, method=method, cfg_scale=2.0)
        torch.manual_seed(123)  # the global RNG must not matter
        b = dit.generate(model, labels, seed=3, steps=10, method=method, cfg_scale=2.0)
        c = dit.generate(model, labels, seed=4, steps=10, method=method, cfg_scale=2.0)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_eta0_is_deterministic_and_batch_independent(tiny_teacher):
    """DDIM with eta = 0 is a deterministic map of the noise: the same image whatever the batch split."""
    model = sample.load_model(tiny_teacher)
    labels = torch.arange(8) % 10
    a = dit.generate(model, labels, seed=0, steps=10, eta=0.0, batch_size=8)
    b = dit.generate(model, labels, seed=0, steps=10, eta=0.0, batch_size=3)
    assert_images_close(a, b)


def test_no_evaluation_noise_equals_any_training_noise(tiny_teacher, tmp_path, monkeypatch):
    """Trust rule: the noise a model is scored on (fid.evaluate and grids via dit.generate, the DiP-GO PSNR
    reference, sampler FLOPs: the "eval" stream) never appears in what a training stage draws (distillation
    pairs, fine-tuning, DiP-GO's pruner, calibration), at any seed, equal seeds included: no run of 7
    values of any evaluation draw occurs in any training draw (one generator's draws overlap in long runs)."""
    drawn, phase = {"train": [], "eval": []}, ["train"]
    real_randn, real_like = torch.randn, torch.randn_like
    monkeypatch.setattr(torch, "randn", lambda *a, **k: drawn[phase[0]].append(real_randn(*a, **k)) or
                        drawn[phase[0]][-1])
    monkeypatch.setattr(torch, "randn_like", lambda *a, **k: drawn[phase[0]].append(real_like(*a, **k)) or
                        drawn[phase[0]][-1])
    T = dit.build_dit(dit.load_checkpoint(tiny_teacher))
    data = dit.load_data("shapes", image_size=16)
    seeds = (0, 1, 2, dit.EVAL_BIT + 1)
    for s in seeds:
        distill.make_pairs(T, 12, 2, 1.5, s, str(tmp_path / f"pairs{s}.pt"))
        train_tiny(tiny_cfg(tmp_path / f"ft{s}", steps=2, seed=s))
        prune.learn_scores(T, prune.PruneConfig(eval_steps=3, dipgo_steps=2, dipgo_batch=2, seed=s), log=None)
        prune.calib_batch(data, 8, s, "cpu")
    phase[0] = "eval"
    for s in seeds:
        dit.generate(T, torch.arange(12) % 10, seed=s, steps=2)
    fid.sampler_gflops(T, 2)
    evals = [x.flatten().tolist() for x in drawn["eval"]]
    windows = {tuple(v[i:i + 4]) for v in evals for i in range(len(v) - 3)}
    assert len(drawn["train"]) > 20 and len(windows) > 20000
    for x in drawn["train"]:
        v = x.detach().flatten().tolist()
        assert not any(tuple(v[i:i + 4]) in windows for i in range(0, len(v) - 3, 4))  # a run of 7 holds one


def assert_images_close(a, b, levels=1, frac=0.01):
    """uint8 images made by the same computation on other batch shapes: matrix kernels pick other blockings
    for other shapes (and CPUs), so a pixel near a rounding boundary may land one grey level away. Allowed:
    at most `levels` grey levels anywhere, on at most `frac` of the pixels; a real bug moves far more."""
    d = (a.int() - b.int()).abs()
    moved = (d > 0).float().mean().item()
    assert d.max() <= levels and moved <= frac, (d.max().item(), moved)


def test_sample_cli_writes_grid_and_npz(tiny_teacher, tmp_path):
    sample.main(["--ckpt", tiny_teacher, "--grid", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                 "--n", "12", "--steps", "5", "--per-class", "2"])
    left = 6 * max(map(len, dit.SHAPE_NAMES)) + 6  # a label column: each row's class name (shapes)
    img = np.asarray(Image.open(tmp_path / "g.png"))
    assert img.shape == (10 * 18 + 2, left + 2 * 18 + 2, 3) and (img[:, :left] < 128).any()
    arr = np.load(tmp_path / "s.npz")["arr_0"]
    assert arr.shape == (12, 16, 16, 3) and arr.dtype == np.uint8


def test_bad_checkpoints_and_flags_give_one_clear_line(tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint")
    torch.save({"something": 1}, tmp_path / "other.pt")
    for path in [tmp_path / "missing.pt", bad, tmp_path / "other.pt"]:
        with pytest.raises(SystemExit) as e:
            sample.main(["--ckpt", str(path)])
        assert str(e.value).startswith("error:") and "\n" not in str(e.value)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(bad), "--no-such-flag", "1"])
    assert e.value.code == 2  # argparse: unknown flag
    with pytest.raises(SystemExit) as e:
        dit.main(["--preset", "huge"])
    assert "unknown --preset" in str(e.value)


def test_a_model_without_a_null_class_samples_without_guidance(tmp_path, cache):
    """--class-dropout 0: dit.py's grid (CFG 4), sample.py and fid.evaluate (CFG 1.5) run unguided."""
    out = str(tmp_path / "nonull.pt")
    dit.main(["--preset", "tiny", "--steps", "3", "--class-dropout", "0", "--out", out, "--device", "cpu"])
    model = dit.build_dit(dit.load_checkpoint(out))
    assert not model.has_null
    a = dit.generate(model, torch.arange(4), seed=0, steps=2, cfg_scale=4.0)
    assert torch.equal(a, dit.generate(model, torch.arange(4), seed=0, steps=2, cfg_scale=1.0))
    sample.main(["--ckpt", out, "--steps", "2", "--per-class", "1"])
    assert fid.evaluate(model, n=10, steps=2, cache_dir=cache, image_size=16)["n"] == 10


# --- fid.py ---------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def cache(tmp_path_factory):
    """A private FD-clf cache, with a cheaper classifier (40 steps) so the suite stays fast."""
    steps, fid.CLF_STEPS = fid.CLF_STEPS, 40
    yield str(tmp_path_factory.mktemp("fid_cache"))
    fid.CLF_STEPS = steps


@pytest.fixture(autouse=True)
def no_inception(monkeypatch, tmp_path):
    """Never find (or fetch) real Inception weights in tests: FD-clf is the metric unless a test says so."""
    monkeypatch.delenv("TINYDIT_INCEPTION", raising=False)
    monkeypatch.setattr(fid, "INCEPTION_CACHE", str(tmp_path / "absent.pth"))
    monkeypatch.setattr(fid, "download_inception", lambda *a: pytest.fail("tests must not download"))


# --- Frechet distance -----------------------------------------------------------------------------

# the distance itself (zero for one Gaussian, non-commuting and rank-deficient covariances, pytorch-fid's
# safeguards) is graded by course/graders.py grade_4, collected here


# --- Inception-v3 FID network ---------------------------------------------------------------------

def test_inception_parameter_names_and_shapes_match_the_fid_weights_file():
    """Names/shapes of pt_inception-2015-12-05-6726825d.pth (torchvision Inception3 names, no AuxLogits,
    1008-way fc): 94 conv-BN units x 6 entries + fc weight/bias = 566 entries, 23,850,960 parameters."""
    model = fid.FIDInception()
    sd = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "Conv2d_1a_3x3.conv.weight": (32, 3, 3, 3), "Conv2d_1a_3x3.bn.weight": (32,),
        "Conv2d_1a_3x3.bn.running_var": (32,), "Conv2d_1a_3x3.bn.num_batches_tracked": (),
        "Conv2d_2b_3x3.conv.weight": (64, 32, 3, 3), "Conv2d_3b_1x1.conv.weight": (80, 64, 1, 1),
        "Conv2d_4a_3x3.conv.weight": (192, 80, 3, 3),
        "Mixed_5b.branch1x1.conv.weight": (64, 192, 1, 1), "Mixed_5b.branch5x5_2.conv.weight": (64, 48, 5, 5),
        "Mixed_5b.branch_pool.conv.weight": (32, 192, 1, 1),
        "Mixed_5c.branch_pool.conv.weight": (64, 256, 1, 1),
        "Mixed_5d.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6a.branch3x3.conv.weight": (384, 288, 3, 3),
        "Mixed_6a.branch3x3dbl_3.conv.weight": (96, 96, 3, 3),
        "Mixed_6b.branch7x7_2.conv.weight": (128, 128, 1, 7),
        "Mixed_6c.branch7x7dbl_2.conv.weight": (160, 160, 7, 1),
        "Mixed_6e.branch7x7dbl_5.conv.weight": (192, 192, 1, 7),
        "Mixed_6e.branch_pool.conv.weight": (192, 768, 1, 1),
        "Mixed_7a.branch3x3_2.conv.weight": (320, 192, 3, 3),
        "Mixed_7a.branch7x7x3_4.conv.weight": (192, 192, 3, 3),
        "Mixed_7b.branch1x1.conv.weight": (320, 1280, 1, 1),
        "Mixed_7b.branch3x3dbl_1.conv.weight": (448, 1280, 1, 1),
        "Mixed_7c.branch3x3_2b.conv.weight": (384, 384, 3, 1),
        "Mixed_7c.branch3x3dbl_3a.conv.weight": (384, 384, 1, 3),
        "Mixed_7c.branch_pool.conv.weight": (192, 2048, 1, 1),
        "Mixed_7c.branch_pool.bn.running_mean": (192,), "fc.weight": (1008, 2048), "fc.bias": (1008,),
    }
    for k, shape in expected.items():
        assert sd.get(k) == shape, k
    assert not any(k.startswith("AuxLogits") for k in sd)
    assert len(sd) == 566
    assert sum(p.numel() for p in model.parameters()) == 23_850_960


def test_inception_loads_strict_from_a_legacy_format_file(tmp_path, monkeypatch):
    torch.manual_seed(0)
    ref = fid.FIDInception()
    sd = {k: v + torch.rand_like(v) if "running" in k else v + 7 if "tracked" in k else v  # BN stats != init
          for k, v in ref.state_dict().items()}
    path = str(tmp_path / "pt_inception-random.pth")
    torch.save(sd, path, _use_new_zipfile_serialization=False)
    assert not zipfile.is_zipfile(path)  # the legacy format, as the real file
    monkeypatch.setenv("TINYDIT_INCEPTION", path)
    assert fid.find_inception_weights() == path
    model = fid.load_inception(fid.find_inception_weights())
    assert all(torch.equal(model.state_dict()[k], v) for k, v in sd.items())
    torch.save({k: v for k, v in sd.items() if k != "fc.bias"}, path, _use_new_zipfile_serialization=False)
    with pytest.raises(SystemExit, match="fc.bias"):  # one error line naming the missing key
        fid.load_inception(path)
    with torch.no_grad():
        out = model.eval()(fid.inception_preprocess(torch.randint(0, 256, (1, 3, 32, 32), dtype=torch.uint8)))
    assert out.shape == (1, 2048) and torch.isfinite(out).all()


def test_inception_preprocessing_is_pytorch_fid_range_and_shape():
    x = torch.randint(0, 256, (3, 3, 32, 32), dtype=torch.uint8)
    x[0] = 0
    x[1] = 255
    y = fid.inception_preprocess(x)
    assert y.shape == (3, 3, 299, 299) and y.dtype == torch.float32
    assert (y[0] + 1).abs().max() < 1e-6 and (y[1] - 1).abs().max() < 1e-6  # constant images stay constant
    assert y.min() >= -1 - 1e-6 and y.max() <= 1 + 1e-6
    # bilinear, align_corners=False: the output corner pixel sits inside the input corner pixel
    assert y[2, :, 0, 0].tolist() == pytest.approx((x[2, :, 0, 0].float() / 127.5 - 1).tolist(), abs=1e-5)


# --- FD-clf, evaluate(), the CLI ------------------------------------------------------------------

def test_classifier_metric_ranks_real_data_far_better_than_noise(cache):
    scorer = fid.get_scorer("auto", "shapes", "data", 16, "cpu", cache)
    assert scorer["metric"] == "FD-clf"
    mu, sigma = fid.reference_stats(scorer, "shapes", "data", 16, verbose=False)
    real, yr, _ = dit.load_data("shapes", "data", 16, train=False)
    idx = torch.randperm(len(real), generator=torch.Generator().manual_seed(0))[:500]
    g = torch.Generator().manual_seed(0)
    noise = torch.randint(0, 256, (500, 3, 16, 16), generator=g, dtype=torch.uint8)
    fd_real = fid.frechet_distance(*fid.gaussian_stats(fid.extract(scorer["net"], real[idx])), mu, sigma)
    fd_noise = fid.frechet_distance(*fid.gaussian_stats(fid.extract(scorer["net"], noise)), mu, sigma)
    assert fd_noise > 20 * fd_real, (fd_real, fd_noise)
    with torch.no_grad():
        acc = (scorer["clf"](dit.to_float(real[idx])).argmax(1) == yr[idx]).float().mean()
    assert acc > 0.8


def test_evaluate_returns_the_documented_dict_deterministically(tiny_teacher, cache):
    model = sample.load_model(tiny_teacher)
    kw = dict(data="shapes", image_size=16, n=30, steps=3, cfg_scale=1.5, seed=0, batch_size=30,
              cache_dir=cache)
    r = fid.evaluate(model, **kw)
    assert set(r) == {"metric", "score", "acc", "n"}
    assert r["metric"] == "FD-clf" and r["n"] == 30 and isinstance(r["score"], float) and r["score"] > 0
    assert 0 <= r["acc"] <= 1
    assert fid.evaluate(model, **kw) == r  # same noise, cached classifier and reference: the same numbers


def test_cli_scores_npz_folder_and_stats_inputs(cache, tmp_path, capsys):
    x, _, _ = dit.load_data("shapes", "data", 16, train=False)
    a = str(tmp_path / "a.npz")
    np.savez(a, arr_0=x[:60].permute(0, 2, 3, 1).numpy())
    folder = tmp_path / "b"
    folder.mkdir()
    for k in range(60, 120):
        Image.fromarray(x[k].permute(1, 2, 0).numpy()).save(folder / f"{k}.png")
    common = ["--cache-dir", cache, "--device", "cpu"]
    fid.main([a, str(folder)] + common)
    out = capsys.readouterr().out
    assert "| FD-clf |" in out and "| FID |" not in out and "metric FD-clf" in out
    stats = str(tmp_path / "a_stats.npz")
    fid.main(["--save-stats", a, stats] + common)
    fid.main([stats, a] + common)  # a stats file against the images it was computed from: 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert abs(float(last.split("|")[4])) < 1e-6, last


# --- distill.py -----------------------------------------------------------------------------------

TINY = dict(dit.PRESETS["tiny"], in_channels=3, num_classes=10, mlp_ratio=4.0)


def nontrivial(model, seed=0):
    """Give every zero-initialised adaLN / output linear random weights so blocks are not the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "adaLN_modulation" in name or "final_layer.linear" in name or name == "c0":
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval()


def test_distill_loss_is_zero_when_student_equals_teacher():
    """Output + feature loss (every mapping) is exactly 0 for student == teacher (one-step models), and > 0
    once the student differs (the feature loss's formula, projector and per-channel scaling: grade_5)."""
    z, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 3, 5, 9])
    teacher = nontrivial(distill.OneStepDiT(**TINY))
    t_out, t_feats = teacher(z, y, return_features=True)
    for how in ("uniform", "first"):
        links = dit.block_map(4, 4, how)
        net = distill.Distiller(copy.deepcopy(teacher), 64, links)
        out, s_feats = net(z, y, t_feats)
        terms = distill.distill_loss(out, t_out, s_feats, t_feats, links, 1.0, net.up)
        assert terms["out"].item() < 1e-6 and terms["feat"].item() == 0 and terms["loss"].item() < 1e-6
    with torch.no_grad():
        net.student.dit.blocks[1].mlp.fc1.weight.add_(0.5)
    out, s_feats = net(z, y, t_feats)
    terms = distill.distill_loss(out, t_out, s_feats, t_feats, links, 1.0, net.up)
    assert terms["out"].item() > 1e-4 and terms["feat"].item() > 1e-4


def test_block_mappings_are_the_documented_ones():
    """uniform m(i) = round_half_up(i L_T / L_S); first m(i) = i; MI1 groups
    (m(j-1), m(j)]; the TA keeps teacher blocks m(i) - 1 (0-indexed)."""
    assert dit.block_map(3, 6) == [(1, 2), (2, 4), (3, 6)]
    assert dit.block_map(4, 6) == [(1, 2), (2, 3), (3, 5), (4, 6)]
    assert dit.block_map(2, 7) == [(1, 4), (2, 7)]
    assert dit.block_map(3, 6, "first") == [(1, 1), (2, 2), (3, 3)]
    def mi1(L_S):
        student = distill.OneStepDiT(**dict(TINY, depth=L_S))
        return distill.Distiller(student, 64, dit.block_map(L_S, 6), mi1=True).groups
    assert mi1(3) == [(0, 2), (2, 4), (4, 6)] and mi1(4) == [(0, 2), (2, 3), (3, 5), (5, 6)]
    # TA hop 1 init: TA block i is teacher block m(i) - 1, embeddings copied
    teacher = nontrivial(distill.OneStepDiT(**TINY))
    ta = distill.OneStepDiT(**dict(TINY, depth=2))
    keep = [j - 1 for _, j in dit.block_map(2, 4)]
    distill.init_from(ta, teacher, keep)
    assert keep == [1, 3]
    for i, k in enumerate(keep):
        for a, b in zip(ta.dit.blocks[i].parameters(), teacher.dit.blocks[k].parameters()):
            assert torch.equal(a, b)
    assert torch.equal(ta.c0, teacher.c0)
    assert torch.equal(ta.dit.x_embedder.proj.weight, teacher.dit.x_embedder.proj.weight)


def test_ta_slice_init_keeps_the_tas_largest_channels_heads_and_units():
    """The student cut from the TA (slice_width): at the TA's own width the cut student is the TA (bit for
    bit: every weight kept, in order); at half width it keeps the residual channels with the largest energy,
    drops a head and MLP units whose weights are 0, and its first output (the embedding h_0) is the TA's at
    the kept channels."""
    torch.manual_seed(0)
    ta = nontrivial(distill.OneStepDiT(**TINY))  # 64 wide, 2 heads of 32
    z, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    _, states = ta(z, y, return_features=True)
    same = distill.OneStepDiT(**TINY)
    distill.slice_width(same, ta, states)
    with torch.no_grad():
        assert torch.equal(same(z, y), ta(z, y))
        a, m = ta.dit.blocks[0].attn, ta.dit.blocks[0].mlp
        a.proj.weight[:, :32] = 0  # head 0 of block 0 writes nothing: it must be the head dropped
        m.fc2.weight[:, :128] = 0  # units 0..127 of block 0 write nothing: they must be dropped
    energy = torch.ones(64)
    energy[[3, 10, 50]] = 100.0  # three loud channels
    fake = [torch.randn(2, 16, 64) * energy.sqrt()]
    cut = distill.OneStepDiT(**dict(TINY, hidden_size=32, num_heads=1))
    distill.slice_width(cut, ta, fake)
    ch = (fake[0] ** 2).mean((0, 1)).topk(32).indices.sort().values
    assert {3, 10, 50} <= set(ch.tolist())
    blk = cut.dit.blocks[0]
    assert torch.equal(blk.attn.proj.weight, a.proj.weight[ch][:, 32:])  # head 1 kept
    assert torch.equal(blk.attn.qkv.weight[64:], a.qkv.weight[128 + 32:][:, ch])  # its v rows
    assert torch.equal(blk.mlp.fc2.weight, m.fc2.weight[ch][:, 128:])  # units 128..255 kept
    with torch.no_grad():
        assert torch.equal(cut.embed(z, y)[0], ta.embed(z, y)[0][..., ch])  # h_0: the kept channels


def test_mi1_local_stage_feeds_each_block_its_group_input():
    """MI1 stage A: with student == teacher (k = 1, one block per group) each locally run block, fed the
    teacher state at the start of its group, reproduces the teacher state at its end, so the loss is 0."""
    teacher = nontrivial(distill.OneStepDiT(**TINY))
    links = dit.block_map(4, 4)
    net = distill.Distiller(copy.deepcopy(teacher), 64, links, mi1=True)
    groups = net.groups
    z, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    _, t_feats = teacher(z, y, return_features=True)
    out, local = net(z, y, t_feats)
    assert out is None and len(local) == 4
    for (a, b), h in zip(groups, local):
        assert torch.allclose(h, t_feats[b], atol=1e-5)
    assert distill.distill_loss(None, None, local, t_feats, links, 1.0, net.up)["loss"].item() < 1e-8


def test_pairs_cache_round_trips(tmp_path, monkeypatch):
    """make_pairs writes (z, x, y) with x = the teacher's DDIM eta=0 sample of z as uint8; a second call loads
    the file (the sampler is not called) and returns identical tensors; so does a shipped PNG of x alone (a
    row of 100 padded; a PNG of other images, or a damaged one, is refused in one line)."""
    torch.manual_seed(0)
    teacher = nontrivial(dit.DiT(**TINY))
    path = str(tmp_path / "pairs.pt")
    p = distill.make_pairs(teacher, 12, 3, 1.5, seed=5, path=path, batch_size=5)
    assert p["z"].shape == (12, 3, 16, 16) and p["x"].shape == (12, 3, 16, 16)
    assert p["y"].tolist() == [i % 10 for i in range(12)]
    with torch.no_grad():
        ref = dit.sample(teacher, p["z"][:2], p["y"][:2], 3, "ddim", 0.0, 1.5).clamp(-1, 1)
    assert p["x"].dtype == torch.uint8 and torch.equal(dit.to_uint8(ref), p["x"][:2])
    monkeypatch.setattr(dit, "sample", lambda *a, **k: (_ for _ in ()).throw(AssertionError("not cached")))
    q = distill.make_pairs(teacher, 12, 3, 1.5, seed=5, path=path)
    assert all(torch.equal(p[k], q[k]) for k in ("z", "x", "y"))
    shipped = str(tmp_path / "x.png")  # a shipped file holds x only: z and y are remade from the seed
    distill.write_tiles(p["x"], shipped)
    r = distill.make_pairs(teacher, 12, 3, 1.5, seed=5, path=str(tmp_path / "b.pt"), shipped=shipped)
    assert all(torch.equal(p[k], r[k]) for k in ("z", "x", "y"))
    with pytest.raises(SystemExit, match="not 101 images"):
        distill.make_pairs(teacher, 101, 3, 1.5, seed=5, path=str(tmp_path / "c.pt"), shipped=shipped)
    raw = bytearray(open(shipped, "rb").read())
    raw[len(raw) // 2] ^= 0xFF  # its sha256 went into SHA256SUMS beside it
    open(shipped, "wb").write(bytes(raw))
    with pytest.raises(SystemExit, match="damaged"):
        distill.make_pairs(teacher, 12, 3, 1.5, seed=5, path=str(tmp_path / "d.pt"), shipped=shipped)


@pytest.mark.parametrize("args", [["--method", "kd"], ["--method", "fkd", "--mapping", "first"],
                                  ["--method", "ta", "--heads", "1"],  # slice: the TA's head width
                                  ["--method", "mi1"]])
def test_each_method_runs_end_to_end(tiny_teacher, tmp_path, args):
    """main() on the tiny teacher: every stage trains, the table has teacher + stage rows, the grid is
    written, and the student checkpoint loads with build_student into the same model."""
    out = str(tmp_path / "d")
    rows = distill.main(args + ["--teacher", tiny_teacher, "--out", out, "--width", "32", "--steps", "6",
                                "--aux-steps", "4", "--teacher-steps", "4", "--pairs", "32", "--eval-n", "0",
                                "--batch-size", "16", "--sample-steps", "2", "--log-every", "100"])
    assert rows[0]["model"] == "teacher" and rows[-1]["model"] == "student" and rows[-1]["train steps"] == 6
    assert os.path.exists(os.path.join(out, f"onestep_{args[args.index('--method') + 1]}_grid.png"))
    ckpts = [f for f in os.listdir(out)
             if f.startswith("student_") and f.endswith(".pt") and "_local" not in f]
    model = distill.build_student(dit.load_checkpoint(os.path.join(out, ckpts[0]), kinds=["student"]))
    assert model.one_step
    if "mi1" in args:  # stage B (end to end) runs as many steps as any student; stage A comes on top
        assert dit.load_checkpoint(os.path.join(out, ckpts[0]))["step"] == 6
        assert glob.glob(os.path.join(out, "student_*_local.pt"))
    imgs = dit.generate(model, torch.arange(3), seed=0, steps=2)
    assert imgs.shape == (3, 3, 16, 16) and imgs.dtype == torch.uint8


def test_curve_scores_the_student_during_training_without_changing_it(tiny_teacher, tmp_path):
    """--curve: the hook scores the EMA student at the asked steps without touching training (the student
    equals a run without --curve, bit for bit: same computation), its last point is the final student's
    score, and the table and PNG pool the seeds run into the same --out."""
    common = ["--teacher", tiny_teacher, "--method", "kd", "--width", "32", "--steps", "4", "--pairs", "16",
              "--batch-size", "8", "--sample-steps", "2", "--eval-n", "20", "--bench-reps", "1"]
    plain = distill.main(common + ["--out", str(tmp_path / "plain")])
    for seed in ("0", "1"):
        distill.main(common + ["--out", str(tmp_path / "c"), "--curve", "2,4", "--seed", seed])
    ck = [dit.load_checkpoint(p) for p in glob.glob(str(tmp_path / "*" / "student_*.pt"))]
    assert sorted(len(c.get("evals", [])) for c in ck) == [0, 2, 2]
    no_curve = next(c for c in ck if "evals" not in c)
    seed0 = next(c for c in ck if c.get("evals") and json.loads(c["key"])["seed"] == 0)
    assert all(torch.equal(seed0["ema"][k], v) for k, v in no_curve["ema"].items())
    assert [e["step"] for e in seed0["evals"]] == [2, 4]
    assert abs(seed0["evals"][-1]["score"] - float(plain[-1]["FD-clf (lower better)"])) < 0.006
    folder = glob.glob(str(tmp_path / "c" / "curves_*"))[0]
    assert sorted(os.listdir(folder)) == ["curves.png", "kd_seed0.json", "kd_seed1.json"]
    assert all(len(json.load(open(os.path.join(folder, f)))) == 2 for f in ("kd_seed0.json", "kd_seed1.json"))


def test_a_shipped_one_step_teacher_is_reused_only_with_equal_settings(tiny_teacher, tmp_path, capsys):
    """--ship writes the one-step teacher (EMA, float16) to --shipped; a fresh --out with the same settings
    reuses it instead of training one, another --teacher-steps trains its own."""
    common = ["--teacher", tiny_teacher, "--method", "fkd", "--width", "32", "--steps", "2", "--pairs", "16",
              "--batch-size", "8", "--sample-steps", "2", "--eval-n", "0", "--bench-reps", "1",
              "--shipped", str(tmp_path / "w")]
    distill.main(common + ["--teacher-steps", "3", "--out", str(tmp_path / "a"), "--ship"])
    shipped = glob.glob(str(tmp_path / "w" / "distill_onestep-teacher_*.pt"))
    assert len(shipped) == 1
    assert {v.dtype for v in torch.load(shipped[0], weights_only=True)["ema"].values()} == {torch.float16}
    capsys.readouterr()
    distill.main(common + ["--teacher-steps", "3", "--out", str(tmp_path / "b")])
    assert "reusing" in capsys.readouterr().out and not glob.glob(str(tmp_path / "b" / "onestep-teacher_*"))
    distill.main(common + ["--teacher-steps", "4", "--out", str(tmp_path / "c")])
    assert glob.glob(str(tmp_path / "c" / "onestep-teacher_*.pt"))


def test_one_step_teacher_starts_as_the_dits_first_step():
    """init_from gives the one-step model the DiT's eps rows of the learned-sigma output layer and
    c0 = t_emb(999): before any training it equals the DiT's eps prediction at t = 999."""
    torch.manual_seed(0)
    teacher = nontrivial(dit.DiT(**TINY))
    student = distill.OneStepDiT(**TINY)
    distill.init_from(student, teacher, list(range(len(teacher.blocks))))
    z, y = torch.randn(3, 3, 16, 16), torch.tensor([1, 2, 3])
    with torch.no_grad():
        ref = teacher(z, torch.full((3,), 999), y)[:, :3]
        assert torch.allclose(student.eval()(z, y), ref, atol=1e-5)


# --- prune.py, Section 1: TinyFusion --------------------------------------------------------------

def random_tiny_dit(depth=4, seed=0):
    """A tiny DiT whose blocks are not the identity (adaLN-Zero gates randomised)."""
    torch.manual_seed(seed)
    model = dit.DiT(**dict(dit.PRESETS["tiny"], depth=depth)).eval()
    for p in model.parameters():
        if p.abs().sum() == 0:
            torch.nn.init.normal_(p, std=0.05)
    return model


def inputs(B=3):
    return torch.randn(B, 3, 16, 16), torch.tensor([5, 500, 990])[:B], torch.tensor([1, 2, 3])[:B]


def test_keep_all_mask_reproduces_dense_model_exactly():
    """m = 1 for every block (with and without gradient) gives bit-identical outputs to DiT.forward."""
    model = random_tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        dense = model(x, t, y)
    ones = torch.ones(3, 4, requires_grad=True)
    assert torch.equal(prune.masked_forward(model, x, t, y, ones), dense)
    assert torch.equal(prune.masked_forward(model, x, t, y, torch.ones(4)), dense)


@pytest.mark.parametrize("pattern", ["1:2", "3:4"])  # 2:4: grade_6
def test_straight_through_sample_keeps_n_of_m_with_a_gradient_for_every_logit(pattern):
    """Other N:M patterns than the grader's: each group's choice is one-hot, the block mask keeps exactly N of
    every M blocks, and every pattern logit of every group receives a non-zero gradient."""
    options, groups = prune.parse_pattern(pattern, 4)
    torch.manual_seed(0)
    logits = torch.full((groups, len(options)), 0.02, requires_grad=True)
    mask, onehot = prune.st_gumbel_masks(logits, options, 64, tau=4.0, scale=100.0)
    assert torch.equal(onehot.sum(-1), torch.ones(64, groups)) and set(onehot.unique().tolist()) <= {0.0, 1.0}
    n = float(options[0].sum())
    assert torch.equal(mask.reshape(64, groups, -1).sum(-1), torch.full((64, groups), n))
    (mask * torch.randn(64, 4)).sum().backward()
    assert (logits.grad != 0).all(), logits.grad


def test_exported_pruned_dit_equals_masked_model():
    """export_pruned (a plain, shallower DiT from the original weights) == masked_forward with that mask,
    and sample.load_model-style loading (build_dit) accepts it as kind "dit"."""
    model = random_tiny_dit()
    ck = dict(kind="dit", config=dict(dit.PRESETS["tiny"]), ema=model.state_dict())
    x, t, y = inputs()
    for kept in ([0, 2], [1, 3], [3]):
        pruned = dit.build_dit(prune.export_pruned(ck, kept))
        assert len(pruned.blocks) == len(kept) and pruned.num_classes == model.num_classes
        mask = prune.keep_mask(kept, 4).expand(3, -1).clone().requires_grad_(True)
        with torch.no_grad():
            assert torch.equal(pruned(x, t, y), prune.masked_forward(model, x, t, y, mask))


def test_lora_with_zero_B_changes_nothing_and_only_lora_trains():
    model = random_tiny_dit()
    x, t, y = inputs()
    with torch.no_grad():
        ref = model(x, t, y)
    lora = prune.delta_w(model, "lora", rank=4, alpha=8)
    n_linear = sum(isinstance(m, prune.LoRALinear) for m in model.modules())
    assert n_linear == 4 * 5 + 4 and len(lora) == 2 * n_linear  # 5 per block + t-MLP (2), final (2)
    assert {p for p in model.parameters() if p.requires_grad} == set(lora)
    with torch.no_grad():
        assert torch.equal(model(x, t, y), ref)


def test_masked_rep_loss_ignores_massive_activations():
    """An outlier beyond k sigma in both models is masked out; without the mask it dominates."""
    h = torch.randn(2, 16, 64)
    hs, ht = h.clone(), h.clone()
    hs[0, 0, 0], ht[0, 0, 0] = 1000.0, 2000.0
    assert prune.masked_rep_loss(hs, ht, 2.0) == 0
    assert prune.masked_rep_loss(hs, ht, 0.0) > 100


def test_spearman_p_is_exact_for_few_masks():
    """3 masks in perfect order: 2 of the 3! orderings reach |rho| = 1, so p = 1/3 (not scipy's 0); rho
    itself and the large-n p agree with scipy."""
    assert prune.spearman([0.1, 0.2, 0.3], [5.0, 4.0, 3.0]) == (-1.0, 1 / 3)
    rho, p = prune.spearman([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])
    assert abs(rho - spearmanr([1, 2, 3, 4, 5], [2, 1, 4, 3, 5])[0]) < 1e-12 and 0.05 < p < 0.5
    xs, ys = np.arange(12.0), np.array([3, 1, 2, 6, 5, 4, 9, 7, 8, 12, 11, 10.0])
    assert prune.spearman(xs, ys) == tuple(spearmanr(xs, ys))


def test_every_method_runs_end_to_end_on_tiny(tiny_teacher, tmp_path, capsys):
    """All methods 4 -> 2 blocks with the same (tiny) recovery, one table; checkpoints are plain DiTs."""
    common = ["--teacher", tiny_teacher, "--preset", "tiny", "--out", str(tmp_path), "--batch-size", "8",
              "--learn-steps", "4", "--recover-steps", "2", "--calib-n", "8", "--eval-n", "0",
              "--eval-steps", "2", "--speed-batch", "2", "--speed-steps", "2", "--random-masks", "3"]
    results = prune.main(["--method", "all"] + common)
    assert [r["method"] for r in results] == [m for m in prune.DEPTH_METHODS if m != "index"]
    for r in results:
        assert len(r["kept"]) == 2 and r["recovered"]["config"]["depth"] == 2 and r["recovered"]["step"] == 2
    by = {r["method"]: r["kept"] for r in results}
    assert by["first"] == [0, 1] and by["last"] == [2, 3] and by["uniform"] == [0, 3]
    tf = next(r for r in results if r["method"] == "tinyfusion")["kept"]
    assert tf[0] in (0, 1) and tf[1] in (2, 3)  # 1:2: one block of each group
    assert os.path.exists(tmp_path / "kept_blocks.png") and os.path.exists(tmp_path / "samples.png")
    for rec, deltaw in (("kd", "full"), ("maskedkd", "frozen")):
        flags = ["--method", "tinyfusion", "--recover", rec, "--deltaw", deltaw, "--pattern", "2:4"]
        r = prune.main(flags + common)
        assert r[0]["recovered"]["step"] == 2 and len(r[0]["kept"]) == 2
    prune.main(["--method", "index", "--kept", "1,2"] + common)
    first = glob.glob(str(tmp_path / "d4_k1-2_finetune_*.pt"))
    assert len(first) == 1 and dit.load_checkpoint(first[0], kinds=["dit"])["kept"] == [1, 2]
    # no silent reuse: a changed recovery setting is a new run (a new file); the same settings, or a KD
    # weight that fine-tuning does not use, reuse it
    for flags in (["--recover-lr", "2e-3"], ["--recover-lr-end", "1.0"], ["--alpha-kd", "0.5"], []):
        prune.main(["--method", "index", "--kept", "1,2"] + common + flags)
    assert len(glob.glob(str(tmp_path / "d4_k1-2_finetune_*.pt"))) == 3
    capsys.readouterr()  # scored runs print the rank correlation of TinyFusion's point over distinct masks
    prune.main(["--method", "first,last,uniform"] + common + ["--eval-n", "6"])  # the last flag wins
    assert capsys.readouterr().out.count("Spearman(") == 2


def test_prune_curve_scores_recovery_without_changing_it(tiny_teacher, tmp_path, monkeypatch):
    """--curve: each mask's EMA model is scored at the asked recovery steps, off the training's random
    streams: the recovered weights equal a run without --curve bit for bit, the last point is the recovered
    model's score, and the points of every method land in one pooled folder."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "evaluate", lambda model, n=4, steps=2, cfg_scale=1.5, seed=0, **kw: dict(
        metric="FD-clf", acc=0.5, score=float(dit.generate(model, torch.arange(n) % 10, seed, steps,
                                                           cfg_scale=cfg_scale).float().std())))
    common = ["--teacher", tiny_teacher, "--preset", "tiny", "--method", "first,uniform", "--batch-size", "8",
              "--recover-steps", "4", "--calib-n", "8", "--eval-n", "4", "--eval-steps", "2",
              "--speed-batch", "2", "--speed-steps", "2"]
    plain = prune.main(common + ["--out", "plain"])
    curve = prune.main(common + ["--out", "curve", "--curve", "2,4"])
    for a, b in zip(plain, curve):
        assert "evals" not in a["recovered"] and [e["step"] for e in b["recovered"]["evals"]] == [2, 4]
        assert all(torch.equal(v, b["recovered"]["ema"][k]) for k, v in a["recovered"]["ema"].items())
        assert abs(b["recovered"]["evals"][-1]["score"] - a["recovered_score"]["score"]) < 1e-4
    folder, = glob.glob("out/prune_curves_*")
    assert sorted(os.listdir(folder)) == ["curves.png", "first_seed0.json", "uniform_seed0.json"]
    for bad in (["--curve", "9"], ["--curve", "2", "--method", "dipgo"]):  # past the steps; no recovery
        with pytest.raises(SystemExit):
            prune.main(common + ["--out", "bad"] + bad)


# --- prune.py, Section 2: DiP-GO ------------------------------------------------------------------

def tiny_base(path):
    return dit.build_dit(dit.load_checkpoint(path)).requires_grad_(False)


def test_dipgo_no_reuse_plan_is_the_plain_sampler_bit_for_bit(tiny_teacher):
    """A plan that computes every block (and the SuperNet with every gate at "keep") reproduces the plain
    DDIM + CFG sampler exactly."""
    base, K = tiny_base(tiny_teacher), 6
    z, y = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 1, 2])
    plain = dit.sample(base, z, y, K, cfg_scale=1.5)
    assert torch.equal(dit.sample(prune.CachedDiT(base, K), z, y, K, cfg_scale=1.5), plain)
    net = prune.CachedDiT(base, K)
    net.gates = prune.Pruner.gate(torch.tensor([0.0, 1.0]).repeat(K - 1, len(base.blocks), 1))
    assert torch.equal(dit.sample(net, z, y, K, cfg_scale=1.5), plain)
    with pytest.raises(ValueError):  # the plan knows its schedule: another step count is an error
        dit.sample(prune.CachedDiT(base, K), z, y, K + 1)


class ConstBlock(nn.Module):
    """A block whose residual update is the same at every step: h -> h + d."""
    def __init__(self, d):
        super().__init__()
        self.d = nn.Parameter(d, requires_grad=False)

    def forward(self, h, c):
        return h + self.d


def test_dipgo_reusing_an_exact_cached_update_changes_nothing(tiny_teacher):
    """Cache rule h <- h + D[t-1, b]: when block b's update does not change between steps, reusing it at
    every step >= 1 gives the computed output (exactly for D = 0, the adaLN-Zero fresh block; to float
    rounding for a constant D), while the other blocks still run."""
    base, K = tiny_base(tiny_teacher), 6
    z, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([3, 4])
    N = len(base.blocks)
    reuse_b1 = torch.ones(K, N, dtype=torch.bool)
    reuse_b1[1:, 1] = False
    base.blocks[1] = dit.DiT(**dit.PRESETS["tiny"]).blocks[1]  # adaLN-Zero fresh block: the identity, D = 0
    full = dit.sample(prune.CachedDiT(base, K), z, y, K, cfg_scale=1.5)
    assert torch.equal(dit.sample(prune.CachedDiT(base, K, reuse_b1), z, y, K, cfg_scale=1.5), full)
    base.blocks[1] = ConstBlock(0.1 * torch.randn(16, 64, generator=torch.Generator().manual_seed(2)))
    full = dit.sample(prune.CachedDiT(base, K), z, y, K, cfg_scale=1.5)
    cached = dit.sample(prune.CachedDiT(base, K, reuse_b1), z, y, K, cfg_scale=1.5)
    assert torch.allclose(cached, full, atol=1e-5)
    # ... whereas reusing a real block of the teacher does change the output
    base = tiny_base(tiny_teacher)
    assert not torch.allclose(dit.sample(prune.CachedDiT(base, K, reuse_b1), z, y, K, cfg_scale=1.5),
                              dit.sample(base, z, y, K, cfg_scale=1.5), atol=1e-3)


def test_dipgo_longest_reuse_counts_the_stale_steps_of_each_block():
    """longest_reuse: per block, the longest run of consecutive steps whose plan entry says reuse."""
    plan = torch.ones(8, 3, dtype=torch.bool)
    plan[1:4, 0], plan[[2, 5, 6], 2] = False, False
    assert prune.longest_reuse(plan) == [3, 0, 2]


def test_dipgo_postprocess_hits_the_ratio_and_reuses_the_highest_scores():
    """Greedy falling threshold: exactly round(r (K-1) N) reused slots (within 2% of r), step 0 computed,
    and every slot scoring above the last threshold used is reused before any below it."""
    g = torch.Generator().manual_seed(0)
    for K, N in ((20, 6), (10, 4), (50, 12)):
        score = torch.rand(K - 1, N, generator=g)
        for r in (0.3, 0.5, 0.7):
            plan = prune.postprocess(score, r)
            reused = ~plan[1:]
            assert plan.shape == (K, N) and plan[0].all()
            assert int(reused.sum()) == round(r * (K - 1) * N)
            assert abs(reused.float().mean().item() - r) <= 0.02
            # within 0.05 of the threshold band, nothing kept scores above a reused slot's band
            assert score[~reused].max() < score[reused].min() + 0.05 + 1e-6
    for K, N, r in ((20, 6, 0.5), (20, 6, 0.3), (11, 4, 0.7)):  # the baselines' budgets
        assert abs((~prune.random_plan(K, N, r)[1:]).float().mean().item() - r) <= 0.02
        u = prune.uniform_plan(K, N, r)
        assert u[0].all() and u[-1].all() and abs((~u[1:]).float().mean().item() - r) <= 0.5 / (K - 1) + 1e-6


def test_dipgo_pruner_gates_get_gradients(tiny_teacher):
    """Straight-through gates: the consistency loss through the whole K-step sampler sends a gradient to
    every gated (step, block) logit, to the heads, and through the SA+FFN encoder to the queries."""
    base, K = tiny_base(tiny_teacher), 4
    N = len(base.blocks)
    pruner = prune.Pruner(K, N, dim=32)
    logits0 = pruner()
    assert torch.allclose(logits0, torch.tensor([0.0, 1.0]).expand_as(logits0))  # starts at "keep"
    with torch.no_grad():
        pruner.w3.normal_(0, 0.5)  # as after a few steps: per-slot logits, some reuse
        pruner.b3[::2] = torch.tensor([1.0, 0.0])
    logits = pruner()
    logits.retain_grad()
    net = prune.CachedDiT(base, K)
    net.gates = prune.Pruner.gate(logits)
    assert set(net.gates.detach().unique().tolist()) == {0.0, 1.0}  # hard in the forward pass
    z, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 2])
    with torch.no_grad():
        ref = dit.sample(base, z, y, K, cfg_scale=1.5)
    loss = prune.dipgo_loss(dit.sample(net, z, y, K, cfg_scale=1.5), ref, logits, net.gates, 0.5, 0.0)[0]
    assert loss.item() > 0
    loss.backward()
    assert (logits.grad.abs().sum(-1) > 0).all()
    for p in (pruner.query.weight, pruner.q.weight, pruner.k.weight, pruner.ffn[0].weight, pruner.w1,
              pruner.w3):
        assert p.grad is not None and p.grad.abs().sum() > 0
    assert all(p.grad is None for p in base.parameters())  # the DiT stays frozen


def test_dipgo_verdict_names_the_strongest_equal_compute_baseline():
    """The verdict line of each ratio compares DiP-GO with the best baseline of that ratio only."""
    s = lambda v: {"score": v}  # noqa: E731
    scores = {"full": s(0.5), "DiP-GO r=0.5": s(1.5), "uniform r=0.5": s(1.7), "random r=0.5": s(8.0),
              "uniform-output r=0.5": s(1.4), "DDIM-10 r=0.5": s(1.45), "DiP-GO r=0.7": s(2.0),
              "uniform r=0.7": s(2.2), "uniform-output r=0.7": s(1.3), "DDIM-7 r=0.7": s(2.5)}
    assert "1.50 is worse than the strongest equal-compute baseline, uniform-output r=0.5 1.40" in \
        prune.strongest_baseline(scores, 0.5)
    scores["uniform-output r=0.7"] = s(3.0)
    assert "2.00 is better than the strongest equal-compute baseline, uniform r=0.7 2.20" in \
        prune.strongest_baseline(scores, 0.7)


def test_dipgo_end_to_end_tiny(tiny_teacher, tmp_path):
    """dipgo main on the tiny teacher: learns a plan, saves a kind "dipgo" checkpoint whose plan hits the
    ratio, build_dipgo rebuilds it, sample.generate runs it, and the table has DiP-GO + 4 baselines."""
    out = str(tmp_path)
    rows = prune.main(["--method", "dipgo", "--teacher", tiny_teacher, "--out", out, "--eval-steps", "5",
                       "--dipgo-steps", "2", "--dipgo-batch", "2", "--eval-n", "0", "--speed-batch", "2",
                       "--ratio", "0.5"])
    names = ["full", "DiP-GO", "uniform", "random", "uniform-output", "DDIM-3"]
    assert [r["variant"].split()[0] for r in rows] == names
    ck = dit.load_checkpoint(os.path.join(out, "dipgo_r0.5.pt"), kinds=["dipgo"])
    assert ck["steps"] == 5 and ck["plan"].shape == (5, 4) and int((~ck["plan"][1:]).sum()) == 8
    model = prune.build_dipgo(ck)
    imgs = dit.generate(model, torch.arange(3), seed=0, steps=5, cfg_scale=1.5)
    assert imgs.shape == (3, 3, 16, 16) and imgs.dtype == torch.uint8
    for f in ("dipgo_r0.5_plan.png", "dipgo_samples.png", "dipgo_results.json"):
        assert os.path.exists(os.path.join(out, f))


def test_dipgo_postprocess_visits_blocks_output_side_first():
    """Both official prune() functions walk block_names[::-1]: with equal scores and a budget of half the
    slots, the last block is the one reused."""
    plan = prune.postprocess(torch.full((3, 2), 0.99), 0.5)  # 3 gated steps x 2 blocks, 3 slots to reuse
    assert plan[0].all() and (~plan[1:, 1]).all() and plan[1:, 0].all()


def test_dipgo_output_rule_reuses_the_previous_output_and_cascades(tiny_teacher, monkeypatch):
    """The official output rule: a skipped block returns its output of the last step it ran, so reusing the
    last block reuses the whole step (the cascade: every earlier block is dead); the head then sees exactly
    the previous step's features (under our residual rule it does not). The gated SuperNet with the
    cascaded gates computes what the plan computes."""
    base, K = tiny_base(tiny_teacher), 5
    N = len(base.blocks)
    plan = torch.ones(K, N, dtype=torch.bool)
    plan[2, N - 1] = False  # reuse only the last block at step 2 ...
    net = prune.CachedDiT(base, K, plan, backup="output")
    assert (~net.plan[2]).all() and net.plan[[0, 1, 3, 4]].all()  # ... is the whole step under the cascade
    seen = []
    head = base.head
    monkeypatch.setattr(base, "head", lambda h, c: seen.append(h.clone()) or head(h, c))
    z, y = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(4)), torch.tensor([5, 6])
    x = dit.sample(net, z, y, K, cfg_scale=1.5)
    assert torch.equal(seen[2], seen[1]) and not torch.equal(seen[3], seen[2])
    seen.clear()
    dit.sample(prune.CachedDiT(base, K, plan), z, y, K, cfg_scale=1.5)  # residual rule: h_in + D
    assert not torch.allclose(seen[2], seen[1], atol=1e-4)
    logits = torch.tensor([0.0, 1.0]).repeat(K - 1, N, 1)
    logits[1, N - 1] = torch.tensor([1.0, 0.0])  # step 2 = gate row 1: the last block reuses
    logits.requires_grad_(True)
    gates = prune.BackupRule("output").cascade_gates(prune.Pruner.gate(logits))
    assert torch.equal(gates.detach()[..., 1] > 0.5, net.plan[1:])  # the cascade pushed reuse into 0..N-2
    supernet = prune.CachedDiT(base, K, backup="output")
    supernet.gates = gates
    xs = dit.sample(supernet, z, y, K, cfg_scale=1.5)
    assert torch.allclose(xs, x, atol=1e-5)
    prune.dipgo_loss(xs, x.flip(0), logits, gates, 0.5, 0.0)[0].backward()  # L_cons alone (alpha 0)
    assert logits.grad[1, :, 0].abs().sum() > 0  # the straight-through gradient reaches the reuse gates


def test_dipgo_official_optimiser_warms_up_then_anneals(tiny_teacher, tmp_path):
    """--dipgo-optim sgd: the official pruner optimiser, lr 0.2 unless --dipgo-lr is given, 10 linear warm-up
    steps, then a cosine to 0 over --dipgo-steps; Adam (the default) keeps its constant lr 0.005."""
    base = tiny_base(tiny_teacher)
    cfg = prune.PruneConfig(eval_steps=3, dipgo_steps=14, dipgo_batch=1, dipgo_dim=8, dipgo_optim="sgd",
                            dipgo_lr=0.2, backup="output")
    lrs = [r["lr"] for r in prune.learn_scores(base, cfg, log=None)[1]]
    assert lrs[0] == pytest.approx(0.02) and lrs[9] == pytest.approx(0.2) and lrs[-1] < 0.04
    assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and all(a < b for a, b in zip(lrs[:9], lrs[1:10]))
    adam = prune.learn_scores(base, dataclasses.replace(cfg, dipgo_steps=3, dipgo_optim="adam",
                                                        dipgo_lr=0.005), log=None)[1]
    assert [r["lr"] for r in adam] == [0.005] * 3
    common = ["--method", "dipgo", "--teacher", tiny_teacher, "--eval-steps", "3", "--dipgo-steps", "1",
              "--dipgo-batch", "1", "--dipgo-dim", "8", "--eval-n", "0", "--speed-batch", "1"]
    for extra, lr, first in ((["--dipgo-optim", "sgd"], 0.2, 0.02), ([], 0.005, 0.005),
                             (["--dipgo-optim", "sgd", "--dipgo-lr", "0.05"], 0.05, 0.005)):
        prune.main(common + ["--out", str(tmp_path / str(lr))] + extra)
        ck = dit.load_checkpoint(str(tmp_path / str(lr) / "dipgo_r0.5.pt"))
        assert ck["dipgo_config"]["dipgo_lr"] == lr and ck["metrics"]["log"][0]["lr"] == pytest.approx(first)


def test_dipgo_output_rule_plans_count_the_cascade():
    """Under the output rule every plan's reuse is a prefix of each step's blocks (the cascade), the budget
    round(r (K-1) N) counts the skipped blocks of the cascade and is never passed; the residual rule's random
    plan is the first round(r (K-1) N) slots of one random permutation."""
    g = torch.Generator().manual_seed(1)
    for K, N, r in ((20, 6, 0.5), (20, 6, 0.7), (50, 6, 0.3), (11, 4, 0.5)):
        target = round(r * (K - 1) * N)
        for plan in (prune.postprocess(torch.rand(K - 1, N, generator=g), r, "output"),
                     prune.random_plan(K, N, r, seed=3, backup="output")):
            assert plan[0].all() and torch.equal(plan, prune.BackupRule("output").cascade_plan(plan))
            assert target - N < int((~plan[1:]).sum()) <= target
        idx = torch.randperm((K - 1) * N, generator=dit.rng(3))[:target]
        want = torch.ones((K - 1) * N, dtype=torch.bool)
        want[idx] = False
        assert torch.equal(prune.random_plan(K, N, r, seed=3)[1:].flatten(), want)
    # equal scores: the output side first, so the plan is whole steps (uniform caching's shape)
    plan = prune.postprocess(torch.full((4, 3), 0.99), 0.5, "output")
    assert sorted(int((~row).sum()) for row in plan[1:]) == [0, 0, 3, 3]


# --- dynamic.py -----------------------------------------------------------------------------------

def mixed_dydit(ckpt, seed=0):
    """A DyDiT on the tiny teacher whose routers switch some heads / groups / tokens off: TDW biases
    N(0, 1) and SDT biases 0 instead of the +15 / +35 that keep everything on."""
    torch.manual_seed(seed)
    model = dynamic.DyDiT(dit.build_dit(ckpt), "dydit", 0.5).eval()
    with torch.no_grad():
        for lin in list(model.routers.attn) + list(model.routers.mlp):
            nn.init.xavier_uniform_(lin.weight)  # fresh routers have weight 0: the masks would ignore t
            lin.bias.normal_(0, 1.0)
        for r in model.routers.token:
            r[-1].bias.zero_()
    return model


def dy_inputs(B, t, seed=0):
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(B, 3, 16, 16, generator=g), torch.randint(0, 10, (B,), generator=g)
    return x, torch.full((B,), t), y


def test_sliced_gathered_equals_masked_at_batch_1_and_ragged_batch_16(tiny_teacher):
    """Deployment is exact (DyDiT Sec. 3, our sliced recipe): sliced weights + the flattened token gather
    give the masked training graph's output to fp32 rounding, at batch 1 and at batch 16 whose samples
    keep different numbers of tokens, over timesteps whose width patterns differ."""
    model = mixed_dydit(dit.load_checkpoint(tiny_teacher))
    H, patterns, worst = model.dit.num_heads, set(), 0.0
    with torch.no_grad():
        for B in (1, 16):
            for t in (999, 700, 400, 150, 0):
                x, tt, y = dy_inputs(B, t, seed=t)
                ref, model.trace = dynamic.masked_forward(model, x, tt, y)[0], []
                out = model(x, tt, y)
                worst = max(worst, (out - ref).abs().max().item())
                keep = model.trace[0]["keep"]  # (L, B, T)
                if B == 16:
                    counts = set(keep.sum((0, 2)).tolist())
                    assert len(counts) > 1, "samples should keep different token counts"
                    assert 0 < keep.float().mean() < 1
                patterns.add(tuple((w["k"], w["g"]) for w in model.slices(t)))
    model.trace = None
    assert worst < 1e-5, worst
    assert len(patterns) > 1 and any(k < H or g < H for p in patterns for k, g in p)


def test_all_on_routers_reproduce_the_base_dit(tiny_teacher):
    """Fresh routers (biases +15 / +35) keep every head, group and token on: the masked graph equals
    dit.DiT bit for bit, the sliced graph to fp32 rounding, and the FLOPs ratio is exactly 1."""
    ckpt = dit.load_checkpoint(tiny_teacher)
    base = dit.build_dit(ckpt)
    model = dynamic.DyDiT(dit.build_dit(ckpt), "dydit", 0.5).eval()
    x, t, y = dy_inputs(8, 0)
    t = torch.tensor([0, 100, 250, 400, 600, 750, 900, 999])
    with torch.no_grad():
        ref = base(x, t, y)
        out, ratio = dynamic.masked_forward(model, x, t, y)
        assert torch.equal(out, ref) and torch.equal(ratio, torch.ones(8))
        assert (model(x, t, y) - ref).abs().max() < 1e-5
        assert all(w["k"] == w["g"] == base.num_heads for tv in t.tolist() for w in model.slices(tv))


def test_fresh_routers_keep_every_unit_on_for_the_shipped_base():
    """On the shipped base (|E_t| ~ 60), fresh TDW routers (weights 0, bias +15) switch on every head and
    MLP group at every t; Xavier weights (the code's init) switch some off before any training."""
    ck = dit.load_checkpoint(os.path.join(HERE, "weights", "dit_shapes.pt"))
    for init, all_on in (("zero", True), ("xavier", False)):
        torch.manual_seed(0)
        model = dynamic.DyDiT(dit.build_dit(ck), "dydit", 0.5).eval()
        if init == "xavier":
            for lin in list(model.routers.attn) + list(model.routers.mlp):
                nn.init.xavier_uniform_(lin.weight)
        e = model.dit.t_embedder(torch.arange(0, 1000, 25))
        on = torch.cat([torch.cat(model.width_masks(l, e), 1) for l in range(len(model.dit.blocks))])
        assert bool(on.bool().all()) == all_on, (init, on.mean().item())


def test_flops_ratio_formula_equals_a_direct_count(tiny_teacher):
    """The Sec. 3.3 ratio r_b (MACs of attention and MLP from the masks) matches a direct count of the
    sliced model, torch's FLOP counter (every matmul, attention included):
    count(sliced) - count(dense DiT) = 2 B L (F_attn + F_mlp)(mean r - 1) + the SDT routers' matmuls."""
    ckpt = dit.load_checkpoint(tiny_teacher)
    model, base = mixed_dydit(ckpt, seed=1), dit.build_dit(ckpt)
    L = len(base.blocks)
    T, D = base.pos_embed.shape[1], base.pos_embed.shape[2]
    fa, fm = 4 * T * D * D + 2 * T * T * D, 2 * T * D * base.blocks[0].mlp.fc1.out_features  # attention, MLP
    for B, t in ((3, 999), (5, 300)):
        x, tt, y = dy_inputs(B, t, seed=B)
        model.trace = []
        with torch.no_grad():
            model(x, tt, y)  # builds the plan (the router / slicing work happens once per t, not per call)
        ratio = model.trace[0]["ratio"]
        model.trace = None
        counted = dit.count_flops(model, x, tt, y) - dit.count_flops(base, x, tt, y)
        routers = 2 * B * L * T * (D * (D // 16) + D // 16)
        expected = 2 * B * L * (fa + fm) * (ratio.mean().item() - 1) + routers
        assert ratio.min() < 1
        assert abs(counted - expected) < 1e-6 * 2 * B * L * (fa + fm), (counted, expected)


def test_straight_through_masks_give_every_router_a_gradient(tiny_teacher):
    """Gumbel-sigmoid STE (Sec. 3.1; the mask itself: grade_8): through the masked DyDiT, the FLOPs loss and
    the diffusion loss send finite, non-zero gradients to every router's weights and biases."""
    torch.manual_seed(0)
    model = mixed_dydit(dit.load_checkpoint(tiny_teacher)).train()
    x, _, y = dy_inputs(8, 0)
    out, ratio = model(x, dynamic.stratified_steps(8, "cpu"), y, return_ratio=True)
    (out.pow(2).mean() + 2 * (ratio.mean() - 0.3) ** 2).backward()
    for name, p in model.routers.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


def test_reorder_is_function_preserving_and_sorts_by_importance(tiny_teacher):
    """Importance re-ordering permutes Q/K/V/proj and fc1/fc2 together: same output; head 0 the largest."""
    ckpt = dit.load_checkpoint(tiny_teacher)
    base, net = dit.build_dit(ckpt), dynamic.reorder_(dit.build_dit(ckpt))
    x, t, y = dy_inputs(4, 500)
    with torch.no_grad():
        assert torch.allclose(net(x, t, y), base(x, t, y), atol=1e-5)
    fc2 = net.blocks[0].mlp.fc2.weight.abs().sum(0) + net.blocks[0].mlp.fc1.weight.abs().sum(1)
    assert (fc2[:-1] >= fc2[1:]).all()


def test_lambda_schedule_and_strata():
    """Target 1 for lam_hold steps, linear to lambda over lam_ramp; sample b's t lies in bin b mod 4."""
    cfg = dynamic.DyConfig(lam=0.5, lam_hold=10, lam_ramp=20)
    assert [dynamic.lam_target(s, cfg) for s in (0, 10, 20, 30, 99)] == [1.0, 1.0, 0.75, 0.5, 0.5]
    i = dynamic.stratified_steps(400, "cpu")
    assert ((i // 250) == torch.arange(400) % 4).all()


def test_main_end_to_end_on_tiny(tiny_teacher, tmp_path, monkeypatch):
    """python dynamic.py on the tiny preset: fine-tunes (the FLOPs term drives the ratio below 1), saves a
    "dydit" checkpoint that build_dydit rebuilds, samples, times and writes both pictures. fid.evaluate
    is replaced by a stub that only generates (its own tests live in fid's file)."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_evaluate(model, n=500, steps=50, cfg_scale=1.5, seed=0, **kw):
        imgs = dit.generate(model, torch.arange(n) % 10, seed, steps, cfg_scale=cfg_scale)
        calls.append(imgs.shape)
        return dict(metric="FD-clf", score=float(imgs.float().std()), acc=None, n=n)
    monkeypatch.setattr(fid, "evaluate", fake_evaluate)
    out = str(tmp_path / "dy.pt")
    dynamic.main(["--teacher", tiny_teacher, "--out", out, "--steps", "8", "--batch-size", "8",
                  "--lam-hold", "0", "--lam-ramp", "2", "--complete-steps", "2", "--router-lr", "1.0",
                  "--eval-n", "4", "--eval-steps", "3", "--bench-batches", "2,1", "--bench-reps", "1",
                  "--lam", "0.3"])
    ck = dit.load_checkpoint(out, kinds=["dydit"])
    assert ck["step"] == 8 and ck["lam"] == 0.3 and len(calls) == 3  # base, base at half the steps, DyDiT
    model = dynamic.build_dydit(ck)
    x, t, y = dy_inputs(8, 0)
    with torch.no_grad():
        _, ratio = dynamic.masked_forward(model, x, dynamic.stratified_steps(8, "cpu"), y)
    assert ratio.mean() < 0.95  # the FLOPs term switched units / tokens off
    for name in ("widths", "tokens"):
        assert os.path.exists(tmp_path / f"dy_{name}.png")
    # the samples grid: base and the DyDiT, one 16 px row each, 10 classes, labelled
    label = 6 * len("dydit 0.5") + 6  # the longest row label, 6 px a character
    assert Image.open(tmp_path / "dydit_samples.png").size == (label + 10 * 18 + 2, 2 * 18 + 2)


def test_dydit_curve_scores_while_fine_tuning_without_changing_the_model(tiny_teacher, tmp_path, monkeypatch):
    """--curve: the EMA model is scored at the asked steps as inference builds it (sliced DyDiT), off the
    training's random streams: the fine-tuned weights equal a run without --curve bit for bit, the last
    point is the final model's score, and one table pools every variant of the run."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(fid, "evaluate", lambda model, n=4, steps=3, cfg_scale=1.5, seed=0, **kw: dict(
        metric="FD-clf", acc=None, score=float(dit.generate(model, torch.arange(n) % 10, seed, steps,
                                                            cfg_scale=cfg_scale).float().std())))
    common = ["--teacher", tiny_teacher, "--sweep", "--variants", "static:1,dydit:0.5", "--steps", "4",
              "--batch-size", "8", "--lam-hold", "0", "--lam-ramp", "2", "--complete-steps", "1",
              "--eval-n", "4", "--eval-steps", "3", "--bench-batches", "2", "--bench-reps", "1"]
    dynamic.main(common + ["--out", "plain/dy"])
    dynamic.main(common + ["--out", "curve/dy", "--curve", "2,4"])
    for mode in ("static", "dydit"):
        (a,), (b,) = (glob.glob(f"{d}/dy_{mode}_*.pt") for d in ("plain", "curve"))
        a, b = dit.load_checkpoint(a), dit.load_checkpoint(b)
        assert "evals" not in a and [e["step"] for e in b["evals"]] == [2, 4]
        assert all(torch.equal(v, b["ema"][k]) for k, v in a["ema"].items())
        model = dynamic.build_dydit(b) if mode == "dydit" else dit.build_dit(b)
        assert abs(b["evals"][-1]["score"] - fid.evaluate(model)["score"]) < 1e-4
    folder, = glob.glob("out/dydit_curves_*")
    assert sorted(os.listdir(folder)) == ["curves.png", "dydit 0.5_seed0.json", "static 1.0_seed0.json"]


def kill_and_resume(tmp_path, make, loss_fn, data, meta, steps=6, kill_at=4):
    """Final weights of an uninterrupted run and of one stopped by SIGTERM after kill_at steps, resumed."""
    finals = []
    for name, kill in (("a", None), ("b", kill_at)):
        cfg = tiny_cfg(tmp_path / name, steps=steps, ckpt_every=100, batch_size=8)

        def fn(m, xb, yb, step, kill=kill):
            if step == kill:
                os.kill(os.getpid(), signal.SIGTERM)
            return loss_fn(m, xb, yb, step)
        if kill:
            with pytest.raises(SystemExit):
                dit.train(make(), fn, data, cfg, meta, quiet=True)
            assert dit.load_checkpoint(cfg.out)["step"] == kill + 1
        finals.append(dit.train(make(), fn, data, cfg, meta, quiet=True)[2]["model"])
    return finals


def test_masked_kd_recovery_and_dydit_finetune_resume_exactly(tiny_teacher, tmp_path):
    """The step reaches loss_fn, so Masked KD's beta decay and DyDiT's lambda ramp / complete-model
    warm-up continue where they stopped: killed + resumed == uninterrupted, bit for bit."""
    ck = dit.load_checkpoint(tiny_teacher)
    teacher = dit.build_dit(ck)
    x, y, _ = dit.load_data("shapes", image_size=16)
    d = dit.Diffusion()
    pcfg = prune.PruneConfig(recover="maskedkd", recover_steps=6)
    pruned = prune.export_pruned(ck, [0, 2])

    def make_student():
        torch.manual_seed(0)
        m = dit.build_dit(pruned).train()
        m.y_embedder.dropout_prob = 0.0
        return m
    kd = lambda m, xb, yb, step: prune.recovery_loss(m, teacher, d, xb, yb, step / 6, pcfg)  # noqa: E731
    meta = {k: pruned[k] for k in ("kind", "config")}
    a, b = kill_and_resume(tmp_path / "kd", make_student, kd, (x, y), meta)
    assert all(torch.equal(a[k], b[k]) for k in a)
    dcfg = dynamic.DyConfig(lam=0.5, lam_hold=1, lam_ramp=3, complete_steps=3)

    def make_dydit():
        torch.manual_seed(0)
        return dynamic.DyDiT(dit.build_dit(ck).train(), "dydit", 0.5)
    dy = lambda m, xb, yb, step: dynamic.dydit_loss(m, xb, yb, step, d, dcfg)  # noqa: E731
    a, b = kill_and_resume(tmp_path / "dy", make_dydit, dy, (x, y), dict(kind="dydit", config=ck["config"]))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_dydit_slices_follow_new_weights_and_report_the_ratio(tiny_teacher):
    ck = dit.load_checkpoint(tiny_teacher)
    model = dynamic.DyDiT(dit.build_dit(ck), "dydit", 0.5).eval()
    x, t, y = torch.randn(2, 3, 16, 16), torch.full((2,), 500), torch.tensor([1, 2])
    with torch.no_grad():
        model(x, t, y)  # fills the slice cache
        other = {k: v + 0.05 * torch.randn_like(v) if v.dtype.is_floating_point else v
                 for k, v in model.state_dict().items()}
        model.load_state_dict(other)
        fresh = dynamic.DyDiT(dit.DiT(**ck["config"]), "dydit", 0.5).eval()
        fresh.load_state_dict(other)
        assert torch.allclose(model(x, t, y), fresh(x, t, y), atol=1e-6)
        out, ratio = model(x, t, y, return_ratio=True)
        _, masked = dynamic.masked_forward(model, x, t, y)
    assert ratio.shape == (2,) and torch.allclose(ratio, masked, atol=1e-6)


def test_a_finished_dydit_checkpoint_is_reused_only_with_equal_settings(tiny_teacher, tmp_path):
    ck = dit.load_checkpoint(tiny_teacher)
    cfg = dynamic.DyConfig(out=str(tmp_path / "dy.pt"), steps=2, batch_size=8, lam_hold=0, lam_ramp=1)
    first = dynamic.finetune(cfg, ck, quiet=True)
    assert torch.equal(dynamic.finetune(cfg, ck, quiet=True)["ema"]["routers.attn.0.bias"],
                       first["ema"]["routers.attn.0.bias"])  # the same settings: reused
    with pytest.raises(SystemExit) as e:  # another lambda with the same --out: refused, nothing overwritten
        dynamic.finetune(dataclasses.replace(cfg, lam=0.3), ck, quiet=True)
    assert "other settings" in str(e.value) and dit.load_checkpoint(cfg.out)["lam"] == 0.5
    # without --out the name carries the settings hash: a changed setting is a new file
    a = dynamic.default_out(str(tmp_path / "p"), cfg, ck)
    assert a != dynamic.default_out(str(tmp_path / "p"), dataclasses.replace(cfg, router_lr=0.1), ck)


def test_token_routers_started_off_skip_every_mlp_and_leave_the_attention_share(tiny_teacher):
    net = dit.build_dit(dit.load_checkpoint(tiny_teacher))
    model = dynamic.DyDiT(net, "sdt").eval()
    for r in model.routers.token:  # routers that start off: every token skips the MLP
        nn.init.constant_(r[-1].bias, -35.0)
    x, t, y = torch.randn(2, 3, net.input_size, net.input_size), torch.tensor([10, 900]), torch.tensor([1, 2])
    with torch.no_grad():
        out, ratio = dynamic.masked_forward(model, x, t, y)
        h, c = net.embed(x, t, y)
        for block in net.blocks:  # the DiT with every MLP skipped: attention halves only
            m = block.modulation(c)
            h = h + m.gate_msa[:, None] * block.attn(dit.modulate(block.norm1(h), m.shift_msa, m.scale_msa))
        plain = net.head(h, c)
    (_, T, D), hidden = net.pos_embed.shape, net.blocks[0].mlp.fc1.out_features
    fa, fm = 4 * T * D * D + 2 * T * T * D, 2 * T * D * hidden  # MACs of attention, of the MLP
    assert torch.allclose(ratio, torch.full((2,), fa / (fa + fm)), atol=1e-6)
    assert torch.allclose(out, plain, atol=1e-5)


# --- jetson_bench.py ------------------------------------------------------------------------------

def analytic_forward_flops(cfg, B=1):
    """2*M*N*K of every matmul in one DiT forward, counted by hand (lookups and elementwise ops: 0)."""
    D, p, S, C = cfg["hidden_size"], cfg["patch_size"], cfg["input_size"], cfg["in_channels"]
    T, out_ch = (S // p) ** 2, C * (2 if cfg["learn_sigma"] else 1)
    f = 2 * T * (C * p * p) * D                      # patch-embed conv = (T, Cpp) @ (Cpp, D)
    f += 2 * 256 * D + 2 * D * D                     # timestep MLP
    per_block = (2 * D * 6 * D                       # adaLN modulation
                 + 2 * T * D * 3 * D                 # qkv
                 + 2 * T * T * D + 2 * T * T * D     # Q K^T and A V over all heads
                 + 2 * T * D * D                     # proj
                 + 2 * T * D * 4 * D * 2)            # fc1 + fc2
    f += cfg["depth"] * per_block
    f += 2 * D * 2 * D + 2 * T * D * p * p * out_ch  # final adaLN + linear
    return B * f


def pruned_copy(path, out, keep):
    """A TinyFusion-style pruned checkpoint: keep blocks `keep` of the DiT at `path`, renumbered."""
    ck = dit.load_checkpoint(path)

    def sub(state):
        new = {k: v for k, v in state.items() if not k.startswith("blocks.")}
        for j, b in enumerate(keep):
            new.update({f"blocks.{j}." + k[len(f"blocks.{b}."):]: v for k, v in state.items()
                        if k.startswith(f"blocks.{b}.")})
        return new
    dit.save_checkpoint(dict(kind="dit", config=dict(ck["config"], depth=len(keep)), model=sub(ck["ema"]),
                             ema=sub(ck["ema"]), kept=list(keep), method="tinyfusion"), out)
    return out


def test_peak_table_times_a_fresh_dit_against_the_matmul_peak(capsys):
    """jetson_bench.py --peak: train / forward / sampling speed of a fresh DiT against the matmul peak."""
    rows, peak = jetson_bench.peak_table("tiny", torch.device("cpu"), B=4)
    assert peak > 0 and len(rows) == 3 and all(gf > 0 for _, _, gf in rows)
    assert "fraction of peak" in capsys.readouterr().out


def test_flop_counter_matches_analytic_matmul_count():
    """dit.count_flops (torch.utils.flop_counter) on a tiny DiT forward == the hand count of its matmuls,
    and the per-image count of the sampler == steps x (CFG pair) x one forward."""
    cfg = dict(dit.PRESETS["tiny"], in_channels=3, num_classes=10, learn_sigma=True)
    torch.manual_seed(0)
    model = dit.DiT(**cfg).eval()
    x, t, y = torch.randn(1, 3, 16, 16), torch.tensor([500]), torch.tensor([3])
    assert dit.count_flops(lambda: model(x, t, y)) == analytic_forward_flops(cfg)
    per_img = dit.count_flops(lambda: dit.run_sampler(model, x, y, 3, 1.5))
    assert per_img == 3 * analytic_forward_flops(cfg, B=2)


def test_bench_runs_on_tiny_checkpoints_and_writes_outputs(tiny_teacher, tmp_path):
    pruned = pruned_copy(tiny_teacher, str(tmp_path / "tiny_pruned.pt"), keep=[0, 2])
    junk = tmp_path / "junk.pt"
    torch.save({"not": "a model"}, junk)
    out = tmp_path / "bench"
    rows = jetson_bench.main([tiny_teacher, pruned, str(junk), "--out", str(out), "--device", "cpu",
                              "--steps", "3", "--batch", "4", "--reps", "2", "--warmup", "1", "--n", "20"])
    assert [r["model"] for r in rows] == [os.path.relpath(tiny_teacher), os.path.relpath(pruned)]
    full, half = rows
    assert half["GFLOPs/img"] < full["GFLOPs/img"] and half["params (M)"] < full["params (M)"]
    assert full["calls/img"] == 3 and full["b4 img/s"] > 0 and full["score"] is not None
    assert full["b4 speed-up"] == "1.00x"  # against the first row; the pruned model's is its time ratio
    ratio = full["b4 ms/img p50"] / half["b4 ms/img p50"]
    assert float(half["b4 speed-up"][:-1]) == pytest.approx(ratio, 0.01)
    for name in ("bench.md", "bench.csv", "bench.json", "pareto.png"):
        assert (out / name).stat().st_size > 0
    md = (out / "bench.md").read_text()
    assert "torch " + torch.__version__ in md and "| model |" in md and "tiny_pruned" in md
    assert "summary:" in md
    assert len((out / "bench.csv").read_text().strip().splitlines()) == 3
    assert len(json.loads((out / "bench.json").read_text())["rows"]) == 2
    assert Image.open(out / "pareto.png").size == (760, 500)
    # a row per model, a class per column, a column of row labels (6 px per character of the longest name)
    label = 6 * max(len(os.path.basename(p)) - 3 for p in (tiny_teacher, pruned)) + 6
    assert Image.open(out / "samples.png").size == (label + 10 * 18 + 2, 2 * 18 + 2)


NO_CC = shutil.which("cc") is None and shutil.which("gcc") is None


@pytest.mark.skipif(NO_CC, reason="torch.compile needs a C compiler")
def test_bench_compile_rows_run_beside_eager(tiny_teacher, tmp_path):
    """--compile times a torch.compile'd copy next to the eager model (the GPU table's path, here on CPU)."""
    rows = jetson_bench.main([tiny_teacher, "--out", str(tmp_path), "--device", "cpu", "--compile",
                              "--no-quality", "--steps", "2", "--batch", "2", "--reps", "1", "--warmup", "1"])
    assert [r["mode"] for r in rows] == ["eager", "compile"]
    assert rows[1]["GFLOPs/img"] == rows[0]["GFLOPs/img"] and rows[1]["b2 img/s"] > 0


def test_every_kind_is_recognised_and_benchmarked(tiny_teacher, tmp_path):
    """dit, student (one-step), dipgo and dydit checkpoints are found, loaded by sample.load_model and
    measured with the right number of network calls per image."""
    ck = dit.load_checkpoint(tiny_teacher)
    paths = {k: str(tmp_path / f"{k}.pt") for k in ("dipgo", "dydit", "student")}
    plan = torch.ones(4, ck["config"]["depth"], dtype=torch.bool)
    plan[1:, 1:3] = False
    dit.save_checkpoint(dict(kind="dipgo", config=ck["config"], model=ck["ema"], ema=ck["ema"], plan=plan,
                             steps=4), paths["dipgo"])
    m = dynamic.DyDiT(dit.build_dit(ck), "dydit", 0.5, 5.0)
    dit.save_checkpoint(dict(kind="dydit", config=ck["config"], mode="dydit", lam=0.5, tau=5.0,
                             model=m.state_dict(), ema=m.state_dict()), paths["dydit"])
    conf = dict(ck["config"], depth=2)
    state = {"student." + k: v for k, v in distill.OneStepDiT(**conf).state_dict().items()}
    dit.save_checkpoint(dict(kind="student", config=dict(conf, arch="onestep"), model=state, ema=state),
                        paths["student"])
    paths = dict(dit=tiny_teacher, **paths)
    found = jetson_bench.find_checkpoints(list(paths.values()))
    assert [k for _, k in found] == list(paths)
    cfg = jetson_bench.BenchConfig(steps=3, batch=2, reps=1, warmup=0, quality=False)
    for p, kind in found:
        row = jetson_bench.bench_model(p, kind, sample.load_model(p), cfg, torch.device("cpu"))[0]
        want = {"dit": 3, "dipgo": 4, "dydit": 3, "student": 1}[kind]
        assert row["calls/img"] == want and row["GFLOPs/img"] > 0, (kind, row)
    # the plan skips blocks: fewer FLOPs per call than the full DiT on the same schedule
    z, y = torch.randn(1, 3, 16, 16), torch.zeros(1, dtype=torch.long)
    full = dit.count_flops(lambda: dit.run_sampler(sample.load_model(tiny_teacher), z, y, 4, 1.5))
    plan_flops = dit.count_flops(lambda: dit.run_sampler(sample.load_model(paths["dipgo"]), z, y, 4, 1.5))
    assert plan_flops < full


@pytest.mark.parametrize("kind", ["dipgo"])
def test_stack_tinyfusion_dipgo_builds_a_plan_checkpoint(tiny_teacher, tmp_path, kind):
    pruned = pruned_copy(tiny_teacher, str(tmp_path / "tf.pt"), keep=[0, 1, 3])
    cfg = jetson_bench.BenchConfig(out=str(tmp_path), steps=3, stack_steps=2, quality=False)
    new = jetson_bench.build_stacks([(pruned, "dit")], cfg, torch.device("cpu"))
    assert [k for _, k in new] == [kind]
    model = sample.load_model(new[0][0])
    assert len(model.dit.blocks) == 3 and model.steps == 3 and model.plan.shape == (3, 3)


# --- every script: flags, torchrun, GPU presets, keys, shipped files, the house rules --------------

BAD = [("dit", ["--steps", "-1"]), ("dit", ["--data", "mnist"]), ("sample", ["--steps", "0"]),
       ("sample", ["--steps", "1001"]), ("sample", ["--method", "euler"]),
       ("fid", ["--metric", "is", "a", "b"]),
       ("distill", ["--method", "bogus"]), ("distill", ["--depth", "0"]), ("distill", ["--heads", "3"]),
       ("prune", ["--method", "bogus"]), ("prune", ["--pattern", "5:2"]), ("prune", ["--recover", "x"]),
       ("dynamic", ["--mode", "wide"]), ("dynamic", ["--lam", "0"]), ("jetson_bench", ["--reps", "0"]),
       ("sample", ["--no-such-flag", "1"]), ("prune", ["--method", "dipgo", "--ratio", "1.5"]),
       ("dynamic", ["--lam", "1.7"])]


@pytest.mark.parametrize("script,args", BAD, ids=[f"{s} {' '.join(a)}" for s, a in BAD])
def test_every_script_refuses_bad_flags_in_one_line(tiny_teacher, tmp_path, script, args):
    """Exit != 0 with one 'error: ...' line and no traceback; nothing written under --out."""
    extra = {"dit": ["--out", str(tmp_path / "x.pt")], "sample": ["--ckpt", tiny_teacher],
             "distill": ["--teacher", tiny_teacher, "--out", str(tmp_path)],
             "prune": ["--teacher", tiny_teacher, "--out", str(tmp_path), "--eval-n", "0",
                       "--recover-steps", "1", "--learn-steps", "1"],
             "dynamic": ["--teacher", tiny_teacher, "--out", str(tmp_path / "d.pt")],
             "jetson_bench": [tiny_teacher, "--out", str(tmp_path)], "fid": []}[script]
    r = run([script + ".py"] + args + extra)
    lines = (r.stdout + r.stderr).strip().splitlines()
    assert r.returncode != 0 and "Traceback" not in r.stderr, r.stderr[-600:]
    assert lines[-1].startswith("error:"), lines[-3:]
    assert len(r.stderr.strip().splitlines()) == 1
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".pt")]


def torchrun(args, port):
    return run(["-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={port}"] + args)


def test_method_scripts_under_torchrun_print_one_table_and_match_one_process(tiny_teacher, tmp_path):
    """torchrun --nproc_per_node=2 (gloo on CPU): distill, prune (TinyFusion + DiP-GO) and dynamic each run to
    the end with one table; only rank 0 writes. The one-step student of a 2-process run equals the 1-process
    run: each rank takes half of each batch and DDP averages the gradients, so only float rounding of the
    summation differs (measured 1.5e-8 after 4 AdamW steps; allowed 1e-5, while a wrong shard moves ~1e-3)."""
    common = ["--teacher", tiny_teacher, "--device", "cpu"]
    kd = ["distill.py", "--method", "kd", "--width", "32", "--steps", "4", "--pairs", "16", "--sample-steps",
          "2", "--batch-size", "8", "--eval-n", "0", "--bench-reps", "1"] + common
    r = torchrun(kd + ["--out", str(tmp_path / "d2")], 29541)
    assert r.returncode == 0 and r.stdout.count("| model |") == 1, r.stderr[-2000:]
    assert run(kd + ["--out", str(tmp_path / "d1")]).returncode == 0
    (a,), (b,) = (glob.glob(str(tmp_path / d / "student_*[0-9a-f].pt")) for d in ("d1", "d2"))
    a, b = dit.load_checkpoint(a)["model"], dit.load_checkpoint(b)["model"]
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-5
    small = ["--eval-n", "4", "--eval-steps", "2", "--speed-batch", "2", "--speed-steps", "1"] + common
    r = torchrun(["prune.py", "--method", "tinyfusion,first", "--learn-steps", "2", "--recover-steps", "2",
                  "--batch-size", "8", "--calib-n", "8", "--out", str(tmp_path / "p")] + small, 29542)
    assert r.returncode == 0 and r.stdout.count("| method |") == 1, r.stderr[-2000:]
    assert len(glob.glob(str(tmp_path / "p" / "*_pruned.pt"))) == 2
    r = torchrun(["prune.py", "--method", "dipgo", "--dipgo-steps", "2", "--dipgo-batch", "2",
                  "--out", str(tmp_path / "g")] + small, 29543)
    assert r.returncode == 0 and r.stdout.count("| variant |") == 1, r.stderr[-2000:]
    r = torchrun(["dynamic.py", "--mode", "dydit", "--out", str(tmp_path / "dy.pt"), "--steps", "2",
                  "--batch-size", "8", "--eval-n", "2", "--eval-steps", "2", "--bench-batches", "1",
                  "--bench-reps", "1"] + common, 29544)
    assert r.returncode == 0 and r.stdout.count("| variant |") == 1, r.stderr[-2000:]


@pytest.mark.parametrize("script", ["distill", "prune", "dynamic"])
def test_method_scripts_on_a_gpu_preset_train_with_the_papers_ema_and_lr(tiny_teacher, tmp_path, monkeypatch,
                                                                           script):
    """--preset cifar: every stage trains with the paper's recipe (DiT Sec. 4: constant EMA 0.9999 from a
    copy, lr 1e-4; TinyFusion's recovery lr 2e-4), not the CPU preset's warm-up EMA."""
    seen = []

    def fake_train(model, loss_fn, data, cfg, meta, **kw):
        seen.append(dit.resolve(copy.copy(cfg)))
        raise SystemExit("stop")
    monkeypatch.setattr(dit, "train", fake_train)
    args = dict(distill=["--method", "kd", "--pairs", "8", "--sample-steps", "2", "--out", str(tmp_path)],
                prune=["--method", "first", "--calib-n", "8", "--out", str(tmp_path)],
                dynamic=["--sweep", "--variants", "static:1", "--out", str(tmp_path / "dy")])[script]
    with pytest.raises(SystemExit, match="stop"):
        globals()[script].main(args + ["--preset", "cifar", "--teacher", tiny_teacher, "--device", "cpu"])
    cfg = seen[0]
    assert cfg.ema_warmup == 0 and cfg.ema_decay == 0.9999 and cfg.lr == (2e-4 if script == "prune" else 1e-4)


def fake_cifar(folder, seed, n=6):
    rng = np.random.default_rng(seed)
    os.makedirs(os.path.join(folder, "cifar-10-batches-py"))
    for name in [f"data_batch_{k}" for k in range(1, 6)] + ["test_batch"]:
        with open(os.path.join(folder, "cifar-10-batches-py", name), "wb") as f:
            pickle.dump({b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                         b"labels": list(rng.integers(0, 10, n))}, f)
    return str(folder)


def test_results_are_keyed_on_the_data_they_came_from(tiny_teacher, tmp_path):
    """Another --data-dir with other images gives another key (so the stage retrains under a new file name);
    a byte-identical copy of the same images gives the same key (reused)."""
    ck = dit.load_checkpoint(tiny_teacher)
    a, b = fake_cifar(tmp_path / "a", 0), fake_cifar(tmp_path / "b", 1)
    shutil.copytree(a, tmp_path / "a_copy")
    cfg = dynamic.DyConfig(data="cifar10", steps=1)
    dirs = (a, b, str(tmp_path / "a_copy"))
    keys = [dynamic.run_key(dataclasses.replace(cfg, data_dir=d), ck) for d in dirs]
    assert keys[0] != keys[1] and keys[0] == keys[2]
    x, y, _ = dit.load_data("cifar10", a, 16)
    tag = dit.data_tag(x, y)
    assert tag != dit.data_tag(x.flip(0), y) and tag == dit.data_tag(x.clone(), y)


@pytest.mark.parametrize("script,out", [("dit", "f/x.pt"), ("distill", "f/d"), ("prune", "f/p"),
                                        ("dynamic", "f/dy.pt")])
def test_an_unwritable_out_fails_in_one_line_before_any_work(tmp_path, script, out):
    """--out below a file cannot be created: one error line, and no work started (the missing base is not
    trained first)."""
    (tmp_path / "f").write_text("a file, not a folder")
    missing = str(tmp_path / "no_base.pt")
    args = ["--out", str(tmp_path / out), "--device", "cpu"]
    args += [] if script == "dit" else ["--teacher", missing]
    with pytest.raises(SystemExit) as e:
        globals()[script].main(args)
    assert str(e.value.code).startswith("error: cannot write to") and not os.path.exists(missing)


CONFIGS = [(dit.TrainConfig, False), (distill.DistillConfig, False), (prune.PruneConfig, False),
           (dynamic.DyConfig, False), (fid.FIDConfig, True), (sample.SampleConfig, False),
           (jetson_bench.BenchConfig, True)]


def outside(text, integer):
    """Values just outside a declared range (">=1", ">0", "(0,1]", "(-inf,inf)") and its closed ends."""
    step = 1 if integer else 1e-3
    if text[0] == ">":
        b = float(text.lstrip(">="))
        return ([b - step] if text[1] == "=" else [b]), ([b] if text[1] == "=" else [])
    lo, hi = (float(v) for v in text[1:-1].split(","))
    out = [v for v in ([lo - step if text[0] == "[" else lo], [hi + step if text[-1] == "]" else hi])
           if math.isfinite(v[0])]
    ends = [v for v, closed in ((lo, text[0] == "["), (hi, text[-1] == "]")) if closed and math.isfinite(v)]
    return [v[0] for v in out], ends


@pytest.mark.parametrize("cls,paths", CONFIGS, ids=[c.__name__ for c, _ in CONFIGS])
def test_every_numeric_flag_declares_its_range_and_refuses_a_value_outside_it(cls, paths):
    """Each int / float field opens its comment with its range; the default lies inside; a value just outside
    each end (and nan, inf) ends in one 'error: --flag must be ...' line at parse time, before any work; a
    closed end itself is accepted."""
    ranges = dit.declared_ranges(cls)
    numeric = {f.name: f.type in (int, "int") for f in dataclasses.fields(cls)
               if f.type in (int, float, "int", "float")}
    assert set(ranges) == set(numeric), set(numeric) ^ set(ranges)
    for name, integer in numeric.items():
        flag = "--" + name.replace("_", "-")
        assert dit.in_range(getattr(cls(), name), ranges[name]), (name, ranges[name])
        bad, ends = outside(ranges[name], integer)
        for v in bad + ([] if integer else [float("nan"), float("inf")]):
            with pytest.raises(SystemExit) as e:
                dit.parse_args(cls, [flag, str(int(v) if integer else v)], paths=paths)
            assert str(e.value.code).startswith(f"error: {flag} must be ") and "\n" not in str(e.value.code)
        for v in ends:
            cfg = dit.parse_args(cls, [flag, str(int(v) if integer else v)], paths=paths)
            assert getattr(cfg[0] if paths else cfg, name) == v


def test_list_flags_check_each_number_against_its_fields_range(tiny_teacher, tmp_path):
    """--ratios and --variants hold numbers in --ratio's / --lam's ranges: each is checked before any work."""
    for args, said in [(["--method", "dipgo", "--ratios", "0.5,1.5"], "--ratios must be in (0, 1)"),
                       (["--method", "dipgo", "--ratios", "0.5,x"], "--ratios takes a comma list")]:
        with pytest.raises(SystemExit) as e:
            prune.main(args + ["--teacher", str(tmp_path / "none.pt"), "--out", str(tmp_path / "p")])
        assert str(e.value.code).startswith("error: " + said)
    for variants, said in [("static:1,dydit:1.7", "lambda must be in (0, 1]"), ("wide:0.5", "mode:lambda")]:
        with pytest.raises(SystemExit) as e:
            dynamic.main(["--sweep", "--variants", variants, "--teacher", str(tmp_path / "none.pt")])
        assert said in str(e.value.code)
    assert not os.path.exists(tmp_path / "none.pt") and not os.path.exists(tmp_path / "p")


def nan_copy(src, path, where="ema"):
    ck = torch.load(src, weights_only=True)
    name = sorted(ck[where])[-1]
    ck[where][name] = ck[where][name].clone().fill_(float("nan"))
    torch.save(ck, path)
    return str(path), f"{where}/{name}"


def refuses(fn, *args, said=""):
    with pytest.raises(SystemExit) as e:
        fn(*args)
    msg = str(e.value.code)
    assert msg.startswith("error:") and "\n" not in msg and said in msg, msg
    return msg


def test_non_finite_weights_are_refused_before_sampling_training_or_scoring(tiny_teacher, tmp_path, cache):
    """A checkpoint with a NaN (in the EMA, or in the optimizer state of a run to resume) is refused in one
    line naming the file and the tensor: sample.py writes no picture, fid.py scores nothing, dit.py does not
    resume from it, the bench skips it. The same file without the NaN loads."""
    bad, name = nan_copy(tiny_teacher, tmp_path / "nan.pt")
    grid = tmp_path / "g.png"
    refuses(sample.main, ["--ckpt", bad, "--grid", str(grid), "--steps", "2"],
            said=f"{bad} holds NaN or inf in {name}")
    refuses(fid.main, ["--ckpt", bad, "--n", "4", "--steps", "2", "--cache-dir", cache], said=name)
    assert not grid.exists()
    ck = torch.load(tiny_teacher, weights_only=True)
    ck["opt"]["state"][0]["exp_avg"] = ck["opt"]["state"][0]["exp_avg"].clone().fill_(float("inf"))
    torch.save(ck, tmp_path / "resume.pt")
    before = (tmp_path / "resume.pt").read_bytes()
    resume = ["--preset", "tiny", "--steps", "200", "--out", str(tmp_path / "resume.pt"), "--device", "cpu"]
    refuses(dit.main, resume, said="opt/state/0/exp_avg")
    assert (tmp_path / "resume.pt").read_bytes() == before
    assert jetson_bench.find_checkpoints([bad, tiny_teacher]) == [(tiny_teacher, "dit")]
    ck = torch.load(bad, weights_only=True)
    ck["ema"][name.split("/", 1)[1]].zero_()
    torch.save(ck, tmp_path / "fixed.pt")
    assert dit.load_checkpoint(str(tmp_path / "fixed.pt"))["kind"] == "dit"


def test_image_inputs_are_checked_before_any_work(tmp_path):
    """fid.py's inputs (.npz arrays, image folders, stats files, data:SPLIT) are all read and checked first:
    a wrong rank, channel count, dtype, missing key, unreadable or mixed-size image, or malformed statistics
    ends in one line naming the file; nothing is scored or written (the good input is not featurised)."""
    good = tmp_path / "good.npz"
    np.savez(good, arr_0=np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8))
    cases = {"gray.npz": dict(arr_0=np.zeros((4, 16, 16), np.uint8)),
             "nchw.npz": dict(arr_0=np.zeros((4, 3, 16, 16), np.uint8)),
             "float.npz": dict(arr_0=np.zeros((4, 16, 16, 3), np.float32)),
             "nokey.npz": dict(images=np.zeros((4, 16, 16, 3), np.uint8)),
             "stats.npz": dict(mu=np.zeros(4), sigma=np.zeros((3, 3))),
             "nanstats.npz": dict(mu=np.full(4, np.nan), sigma=np.eye(4))}
    for name, arrays in cases.items():
        np.savez(tmp_path / name, **arrays)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    (tmp_path / "corrupt").mkdir()
    (tmp_path / "corrupt" / "a.png").write_bytes(b"not a png")
    (tmp_path / "mixed").mkdir()
    Image.new("RGB", (16, 16)).save(tmp_path / "mixed" / "a.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "mixed" / "b.png")
    inputs = [str(tmp_path / n) for n in list(cases) + ["junk.npz", "corrupt", "mixed"]] + ["data:tran:5"]
    for bad in inputs:  # a fresh cache: scoring the good input would train a classifier into it
        refuses(fid.main, [str(good), bad, "--cache-dir", str(tmp_path / "cache")], said=bad)
    assert not (tmp_path / "cache").exists()
    refuses(fid.main, ["--save-stats", str(tmp_path / "gray.npz"), str(tmp_path / "out.npz")],
            said="gray.npz")
    assert not (tmp_path / "out.npz").exists()


def test_output_paths_and_inception_weights_are_checked_before_any_work(tiny_teacher, tmp_path, monkeypatch):
    """sample.py's --npz / --grid and fid.py --save-stats's OUT that cannot be written, and an Inception
    weights file that is not one: one line naming the flag or file, before anything is sampled or
    featurised."""
    monkeypatch.setattr(dit, "generate", lambda *a, **k: pytest.fail("sampled before the check"))
    monkeypatch.setattr(fid, "extract", lambda *a, **k: pytest.fail("featurised before the check"))
    (tmp_path / "afile").write_text("x")
    bad = str(tmp_path / "afile" / "x.npz")
    refuses(sample.main, ["--ckpt", tiny_teacher, "--npz", bad, "--n", "4", "--steps", "2"], said="--npz")
    refuses(sample.main, ["--ckpt", tiny_teacher, "--grid", str(tmp_path), "--steps", "2"], said="--grid")
    np.savez(tmp_path / "good.npz", arr_0=np.zeros((4, 16, 16, 3), np.uint8))
    refuses(fid.main, ["--save-stats", str(tmp_path / "good.npz"), bad], said="--save-stats")
    refuses(fid.load_inception, str(tmp_path / "afile"), said="is not the FID Inception weights")


def test_data_files_are_checked_for_what_the_loaders_assume(tmp_path):
    """A --data-dir that is a file, a CIFAR batch without its keys or with the wrong row size, an ImageNet-64
    npz without labels or with labels outside 1..1000: one line naming the file and what is wrong."""
    (tmp_path / "afile").write_text("x")
    for name in ("cifar10", "imagenet64"):
        refuses(dit.load_data, name, str(tmp_path / "afile"), 32, said="is a file, not a folder")
    folder = fake_cifar(tmp_path / "c", 0)
    batch = os.path.join(folder, "cifar-10-batches-py", "data_batch_2")
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 3072), np.uint8)}, f)
    refuses(dit.load_data, "cifar10", folder, 32, said=batch)
    with open(batch, "wb") as f:
        pickle.dump({b"data": np.zeros((4, 1024), np.uint8), b"labels": [0] * 4}, f)
    refuses(dit.load_data, "cifar10", folder, 32, said="uint8 rows of 3 x 32 x 32")
    (tmp_path / "in64").mkdir()
    np.savez(tmp_path / "in64" / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8))
    refuses(dit.load_data, "imagenet64", str(tmp_path / "in64"), 64, said="has no 'labels' array")
    np.savez(tmp_path / "in64" / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8),
             labels=np.array([1, 1001]))
    refuses(dit.load_data, "imagenet64", str(tmp_path / "in64"), 64, said="label in 1..1000")
    np.savez(tmp_path / "in64" / "train_data_batch_1.npz", data=np.zeros((2, 12288), np.uint8),
             labels=np.array([1, 1000]))
    x, y, nc = dit.load_data("imagenet64", str(tmp_path / "in64"), 64)
    assert x.shape == (2, 3, 64, 64) and y.tolist() == [0, 999] and nc == 1000


REMOVED = {distill.DistillConfig: ("setup", "ta", "ta_init", "out_loss", "feat_norm", "feat_loss"),
           dynamic.DyConfig: ("token_bias", "router_init", "ema_warmup", "recipe"),
           prune.PruneConfig: ("gate_ema_warmup", "dipgo_loss", "dipgo_encoder", "dipgo_grad_ckpt")}


def test_settled_options_left_the_code(tiny_teacher, tmp_path):
    """The options whose verdicts are settled (docs keep their numbers with the commit) are gone: no field, so
    no --help line, and the flags and the removed choices (--mapping last, --mode random, --aux-steps 0)
    end in one line."""
    for cls, names in REMOVED.items():
        assert not set(names) & {f.name for f in dataclasses.fields(cls)}, cls.__name__
    for main, args in ((distill.main, ["--setup", "multistep"]), (distill.main, ["--mapping", "last"]),
                       (distill.main, ["--aux-steps", "0"]),
                       (dynamic.main, ["--mode", "random"]), (dynamic.main, ["--token-bias", "5"]),
                       (prune.main, ["--no-dipgo-encoder"]), (dynamic.main, ["--recipe", "official"])):
        with pytest.raises(SystemExit) as e:
            main(args + ["--teacher", tiny_teacher, "--out", str(tmp_path / "x")])
        assert e.value.code == 2 or str(e.value.code).startswith("error:"), args


def test_a_damaged_shipped_file_is_refused_with_its_rebuild_command(tmp_path, monkeypatch):
    """ship_weights records sha256 + command in SHA256SUMS; load_checkpoint checks it. A byte flipped in the
    middle of the file (which torch.load may still read) ends in one line naming the file and the command.
    The repository's own shipped files match their list."""
    for name, (digest, _) in dit.read_sums(os.path.join(HERE, "weights")).items():
        assert dit.sha256(os.path.join(HERE, "weights", name)) == digest, name
    ck = dit.load_checkpoint(os.path.join(HERE, "weights", "dit_shapes.pt"))
    path = str(tmp_path / "w" / "base.pt")
    monkeypatch.setattr(sys, "argv", ["dit.py", "--ship", path])
    dit.ship_weights(dict(ck, model=ck["ema"]), path)
    assert dit.load_checkpoint(path)["kind"] == "dit"
    raw = bytearray(open(path, "rb").read())
    raw[len(raw) // 2] ^= 0xFF
    open(path, "wb").write(bytes(raw))
    with pytest.raises(SystemExit) as e:
        dit.load_checkpoint(path)
    msg = str(e.value.code)
    assert "damaged" in msg and path in msg and "python dit.py --ship" in msg


SCRIPTS = ("dit", "fid", "distill", "prune", "dynamic", "sample", "jetson_bench")


def test_imports_run_one_way_at_the_top_of_each_file():
    """Parse every script: sibling scripts are imported only at module level (never inside a function),
    and the import graph has no cycle."""
    graph = {}
    for name in SCRIPTS:
        tree = ast.parse(open(os.path.join(HERE, name + ".py")).read())
        top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
        top |= {n.module for n in tree.body if isinstance(n, ast.ImportFrom)}
        graph[name] = top & set(SCRIPTS)
        for fn in ast.walk(tree):
            if isinstance(fn, (ast.FunctionDef, ast.AsyncFunctionDef)):
                inner = [a.name for n in ast.walk(fn) if isinstance(n, ast.Import) for a in n.names]
                inner += [n.module for n in ast.walk(fn) if isinstance(n, ast.ImportFrom)]
                assert not set(inner) & set(SCRIPTS), f"{name}.{fn.name} imports {set(inner) & set(SCRIPTS)}"
    done = []
    while len(done) < len(SCRIPTS):  # peel off the scripts whose imports are all placed: fails on a cycle
        ready = [s for s in SCRIPTS if s not in done and graph[s] <= set(done)]
        assert ready, f"import cycle among {sorted(set(SCRIPTS) - set(done))}"
        done += ready
    assert done[0] == "dit" and done[-1] == "jetson_bench", done


def test_no_script_or_readme_cites_our_working_notes():
    """Citations name the paper's own sections; nothing points the reader at ../shared/specs."""
    for name in [s + ".py" for s in SCRIPTS] + ["README.md"]:
        text = open(os.path.join(HERE, name)).read()
        notes = "spec"  # spelled apart so that this line does not match itself
        pattern = rf"\b{notes}s?\b *(§|[0-9]|sec|section|part|claim|\))|\({notes}|{notes}s/|\bthe {notes}\b"
        hits = re.findall(pattern, text, re.I)
        assert not hits, (name, hits[:5])


def test_readme_files_table_lists_the_real_line_counts():
    """The README's Files table says "line counts from wc -l on this commit": keep it true."""
    text = open(os.path.join(HERE, "README.md")).read()
    listed = dict(re.findall(r"^\| `(\w+\.py)` \|.*\| (\d+) \|$", text, re.M))
    assert set(listed) == {s + ".py" for s in SCRIPTS} | {"test_all.py"}
    for name, n in listed.items():
        assert int(n) == len(open(os.path.join(HERE, name)).read().splitlines()), name


def test_every_readme_glance_number_is_in_the_page_it_links_to():
    """Each decimal number of a Results-at-a-glance row appears in the docs/ page that row links to."""
    table = open(os.path.join(HERE, "README.md")).read().split("## Results at a glance")[1].split("\n## ")[0]
    number = re.compile(r"(?<![\w.])\d+\.\d+(?!\.?\d)")
    rows = re.findall(r"^\|.*\(docs/[\w.]+\) \|$", table, re.M)
    assert len(rows) >= 6
    for row in rows:
        cells = row.strip("|").split(" | ")
        page = open(os.path.join(HERE, re.search(r"\((docs/[\w.]+)\)", cells[-1]).group(1))).read()
        missing = set(number.findall(cells[2])) - set(number.findall(page))
        assert not missing, (cells[0], sorted(missing))


def test_the_reading_limits_hold():
    """Lines <= 110 columns, functions <= 60 lines and classes <= 120 (STYLE.md), DiTBlock on dit.py's first
    screens, a README <= 300 lines whose docs/ links resolve."""
    for name in [s + ".py" for s in SCRIPTS] + ["test_all.py"]:
        text = open(os.path.join(HERE, name)).read()
        long = [k + 1 for k, line in enumerate(text.split("\n")) if len(line) > 110]
        limit = {ast.FunctionDef: 60, ast.ClassDef: 120}
        fns = [f"{f.name} {f.end_lineno - f.lineno + 1}" for f in ast.walk(ast.parse(text))
               if type(f) in limit and f.end_lineno - f.lineno + 1 > limit[type(f)] and name != "test_all.py"]
        assert not long and not fns, (name, long[:10], fns)
    assert re.search(r"^class DiTBlock", "".join(open(os.path.join(HERE, "dit.py")).readlines()[:150]), re.M)
    readme = open(os.path.join(HERE, "README.md")).read()
    links = re.findall(r"\]\((docs/[\w.]+)\)", readme)
    assert len(readme.splitlines()) <= 300 and links
    assert all(os.path.exists(os.path.join(HERE, p)) for p in links), links
