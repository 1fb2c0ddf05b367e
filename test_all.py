"""
test_all.py: fast CPU tests of tinydit, each asserting a property of a method (python -m pytest -q test_all.py).
"""
import io
import os
import pickle
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
import torch

import dit
import sample

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_CIFAR = os.path.join(HERE, "..", "shared", "data", "cifar10-subset")
torch.set_num_threads(2)


def tiny_cfg(tmp, **kw):
    return dit.resolve(dit.TrainConfig(**dict(dict(preset="tiny", out=os.path.join(str(tmp), "dit.pt"),
                                                   steps=30, log_every=10, ckpt_every=10), **kw)))


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Path of a tiny-preset base checkpoint (16x16, 4 blocks, width 64), trained 150 steps."""
    cfg = tiny_cfg(tmp_path_factory.mktemp("teacher"), steps=150, log_every=50, ckpt_every=150)
    dit.train_base(cfg, quiet=True)
    return cfg.out


def run(args, **kw):
    """Run a script in a subprocess from the repo root; returns CompletedProcess."""
    return subprocess.run([sys.executable] + args, cwd=HERE, capture_output=True, text=True, timeout=300, **kw)


# --------------------------------------------------------------------------------------------------
# dit.py: the model
# --------------------------------------------------------------------------------------------------

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
    sd = dit.DiT(input_size=32, patch_size=2, hidden_size=384, depth=12, num_heads=6, num_classes=1000).state_dict()
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
            f"blocks.{i}.adaLN_modulation.1.weight": (2304, 384), f"blocks.{i}.adaLN_modulation.1.bias": (2304,),
        })
    assert {k: tuple(v.shape) for k, v in sd.items()} == expected


def reference_dit_forward(sd, x, t, y, p, heads):
    """An independent, functional DiT forward straight from the paper's equations and the official
    state-dict names (eager attention, explicit unpatchify), to check DiT.forward against."""
    import torch.nn.functional as F
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
    i = 0
    while f"blocks.{i}.attn.qkv.weight" in sd:
        b = f"blocks.{i}."
        s1, c1, g1, s2, c2, g2 = lin(F.silu(c), b + "adaLN_modulation.1").chunk(6, 1)
        a = ln(h) * (1 + c1[:, None]) + s1[:, None]
        q, k, v = lin(a, b + "attn.qkv").reshape(B, -1, 3, heads, D // heads).permute(2, 0, 3, 1, 4)
        att = torch.softmax(q @ k.transpose(-1, -2) / (D // heads) ** 0.5, -1) @ v
        h = h + g1[:, None] * lin(att.transpose(1, 2).reshape(B, -1, D), b + "attn.proj")
        m = ln(h) * (1 + c2[:, None]) + s2[:, None]
        h = h + g2[:, None] * lin(F.gelu(lin(m, b + "mlp.fc1"), approximate="tanh"), b + "mlp.fc2")
        i += 1
    sh, sc = lin(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, 1)
    o = lin(ln(h) * (1 + sc[:, None]) + sh[:, None], "final_layer.linear")
    g = int(o.shape[1] ** 0.5)
    o = o.reshape(B, g, g, p, p, -1).permute(0, 5, 1, 3, 2, 4)  # (B, C, g, p, g, p)
    return o.reshape(B, o.shape[1], g * p, g * p)


def test_forward_matches_independent_reference_with_official_names():
    """A state dict with random values in every parameter (zero-init gates replaced) loads strict=True
    and DiT.forward equals an independent functional forward written from the paper, to fp32 rounding."""
    torch.manual_seed(0)
    model = dit.DiT(input_size=16, patch_size=4, hidden_size=64, depth=2, num_heads=4, num_classes=10).eval()
    sd = {k: torch.randn_like(v) * 0.2 for k, v in model.state_dict().items()}
    model.load_state_dict(sd, strict=True)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([3.0, 700.0]), torch.tensor([1, 10])
    with torch.no_grad():
        ours = model(x, t.long(), y)
    ref = reference_dit_forward(sd, x, t, y, 4, 4)
    assert torch.allclose(ours, ref, atol=1e-4, rtol=1e-4), (ours - ref).abs().max()


def test_return_features_gives_each_block_output():
    model = dit.DiT(**dit.PRESETS["tiny"]).eval()
    for b in model.blocks:  # make the blocks non-trivial
        torch.nn.init.normal_(b.adaLN_modulation[1].weight, std=0.1)
    x, t, y = torch.randn(2, 3, 16, 16), torch.tensor([10, 900]), torch.tensor([3, 4])
    out, feats = model(x, t, y, return_features=True)
    h, c = model.embed(x, t, y)
    for b, f in zip(model.blocks, feats):
        mod = b.modulation(c)
        h = h + b.attn_branch(h, mod)
        h = h + b.mlp_branch(h, mod)
        assert torch.allclose(h, f, atol=1e-6)
    assert len(feats) == 4 and torch.allclose(model.head(h, c), out, atol=1e-6)
