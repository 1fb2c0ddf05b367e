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


# --------------------------------------------------------------------------------------------------
# dit.py: diffusion and training
# --------------------------------------------------------------------------------------------------

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
    x, y, nc = dit.load_data("shapes", image_size=16)
    d = dit.Diffusion()

    def run_to_end(cfg, kill_at=None):
        torch.manual_seed(0)
        model = dit.DiT(**dit.dit_config(cfg, nc))
        calls = {"n": 0}

        def loss_fn(m, xb, yb):
            calls["n"] += 1
            if calls["n"] == kill_at:
                os.kill(os.getpid(), signal.SIGTERM)
            return d.loss(m, xb, yb)
        return dit.train(model, loss_fn, (x, y), cfg, dict(kind="dit", config=dit.dit_config(cfg, nc)), quiet=True)

    _, ema_a, ck_a = run_to_end(tiny_cfg(tmp_path / "a", steps=24, ckpt_every=8))
    cfg_b = tiny_cfg(tmp_path / "b", steps=24, ckpt_every=8)
    with pytest.raises(SystemExit) as e:
        run_to_end(cfg_b, kill_at=13)
    assert e.value.code == 128 + signal.SIGTERM
    assert dit.load_checkpoint(cfg_b.out)["step"] == 13
    _, ema_b, ck_b = run_to_end(cfg_b)
    for k in ck_a["model"]:
        assert torch.equal(ck_a["model"][k], ck_b["model"][k]), k
        assert torch.equal(ck_a["ema"][k], ck_b["ema"][k]), k


def test_nan_loss_stops_with_one_line_and_keeps_the_good_checkpoint(tmp_path):
    cfg = tiny_cfg(tmp_path, steps=10, ckpt_every=5)
    x, y, nc = dit.load_data("shapes", image_size=16)
    d, calls = dit.Diffusion(), {"n": 0}

    def loss_fn(m, xb, yb):
        calls["n"] += 1
        terms = d.loss(m, xb, yb)
        return dict(terms, loss=terms["loss"] * float("nan")) if calls["n"] == 8 else terms
    with pytest.raises(SystemExit) as e:
        dit.train(dit.DiT(**dit.dit_config(cfg, nc)), loss_fn, (x, y), cfg,
                  dict(kind="dit", config=dit.dit_config(cfg, nc)), quiet=True)
    assert "loss is nan" in str(e.value)
    assert dit.load_checkpoint(cfg.out)["step"] == 5


def test_torchrun_ddp_two_processes_train(tmp_path):
    """torchrun --nproc_per_node=2 runs the same loop under DDP (gloo on CPU)."""
    out = tmp_path / "ddp.pt"
    r = run(["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29517", "dit.py",
             "--preset", "tiny", "--steps", "4", "--log-every", "2", "--out", str(out), "--device", "cpu"])
    assert r.returncode == 0, r.stderr[-2000:]
    ck = dit.load_checkpoint(str(out))
    assert ck["step"] == 4 and len(ck["rng"]) == 2


# --------------------------------------------------------------------------------------------------
# dit.py: data
# --------------------------------------------------------------------------------------------------

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


def test_missing_data_gives_one_clear_line(tmp_path):
    with pytest.raises(SystemExit) as e:
        dit.load_data("imagenet64", str(tmp_path / "nowhere"), 64)
    assert str(e.value).startswith("error:") and "\n" not in str(e.value)


# --------------------------------------------------------------------------------------------------
# sample.py
# --------------------------------------------------------------------------------------------------

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
            out = sample.sample(OracleEps(xstar, learn_sigma), torch.randn(4, 3, 8, 8), torch.zeros(4, dtype=torch.long),
                                steps=40, method=method, generator=torch.Generator().manual_seed(0))
            assert (out - xstar).abs().max() < 1e-4, (learn_sigma, method)


def test_same_seed_gives_bit_identical_samples(tiny_teacher):
    model = sample.load_model(tiny_teacher)
    labels = torch.arange(6) % 10
    for method in ("ddim", "ddpm"):
        a = sample.generate(model, labels, seed=3, steps=10, method=method, cfg_scale=2.0)
        torch.manual_seed(123)  # the global RNG must not matter
        b = sample.generate(model, labels, seed=3, steps=10, method=method, cfg_scale=2.0)
        c = sample.generate(model, labels, seed=4, steps=10, method=method, cfg_scale=2.0)
        assert torch.equal(a, b) and not torch.equal(a, c)


def test_ddim_eta0_is_deterministic_and_batch_independent(tiny_teacher):
    """DDIM with eta = 0 is a deterministic map of the noise: the same image whatever the batch split."""
    model = sample.load_model(tiny_teacher)
    labels = torch.arange(8) % 10
    a = sample.generate(model, labels, seed=0, steps=10, eta=0.0, batch_size=8)
    b = sample.generate(model, labels, seed=0, steps=10, eta=0.0, batch_size=3)
    assert torch.equal(a, b)


def test_sample_cli_writes_grid_and_npz(tiny_teacher, tmp_path):
    sample.main(["--ckpt", tiny_teacher, "--grid", str(tmp_path / "g.png"), "--npz", str(tmp_path / "s.npz"),
                 "--n", "12", "--steps", "5", "--per-class", "2"])
    from PIL import Image
    assert Image.open(tmp_path / "g.png").size == (2 * 18 + 2, 10 * 18 + 2)
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
