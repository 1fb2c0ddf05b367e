"""
course/graders.py: the graders of the eight assignments in course/README.md, collected by test_all.py.

    python -m pytest -q test_all.py -k assignment        # every assignment
    python -m pytest -q test_all.py -k assignment_3      # one

Each grader checks one marked region (`# assignment N begin` ... `# assignment N end`) through its public
function, on stated inputs (never through a training run that needs the other regions): properties from the
paper's equations and small reference values. A failure says which property broke, not the answer.
`test_graders_reject_planted_wrong_answers` patches classic mistakes into the full code and checks that each
grader refuses at least two of them.
"""
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import dit
import distill
import dynamic
import fid
import prune
from course import handout

__all__ = ["test_assignment_1_adaln_zero_modulation", "test_assignment_2_ddim_step",
           "test_assignment_3_iddpm_vb_term", "test_assignment_4_frechet_distance",
           "test_assignment_5_feature_kd_with_projector", "test_assignment_6_st_gumbel_nm_mask",
           "test_assignment_7_dipgo_loss", "test_assignment_8_dydit_router_and_flops_loss",
           "test_graders_reject_planted_wrong_answers",
           "test_handout_blanks_every_region_and_only_one_grader_fails_with_only"]


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


# --- assignment 1: adaLN-Zero modulation in the DiT block (DiT Sec. 3.2, Fig. 3) ----------------------

def grade_1():
    g = torch.Generator().manual_seed(0)
    x, shift, scale = torch.randn(2, 5, 8, generator=g), *torch.randn(2, 2, 8, generator=g)
    assert dit.modulate(x, shift, scale).shape == x.shape, "modulate must keep the (B, T, D) shape of x"
    assert close(dit.modulate(x, 0 * shift, 0 * scale), x), "modulate(x, 0, 0) must be the identity"
    one = dit.modulate(torch.ones(2, 1, 8), shift, scale)[:, 0]
    assert close(dit.modulate(x, shift, scale)[:, 3], x[:, 3] * (one - shift) + shift), \
        "modulate must be one affine map per sample and channel, the same for every token"
    assert close(one - shift, 1 + scale), "modulate's scale must be relative to 1 (zero scale keeps x)"
    block = dit.DiTBlock(8, 2)
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5, generator=g)
    c = torch.randn(2, 8, generator=g)
    m = block.modulation(c)
    h = x + m.gate_msa[:, None] * block.attn(block.norm1(x) * (1 + m.scale_msa[:, None])
                                             + m.shift_msa[:, None])
    ref = h + m.gate_mlp[:, None] * block.mlp(block.norm2(h) * (1 + m.scale_mlp[:, None])
                                              + m.shift_mlp[:, None])
    with torch.no_grad():
        assert close(block(x, c), ref), "DiTBlock.forward differs from DiT Fig. 3 (gated modulated residuals)"
        torch.nn.init.zeros_(block.adaLN_modulation[-1].weight)
        torch.nn.init.zeros_(block.adaLN_modulation[-1].bias)
        assert torch.equal(block(x, c), x), "with every gate at 0 (adaLN-Zero) a block must return its input"


def test_assignment_1_adaln_zero_modulation():
    grade_1()


# --- assignment 2: the DDIM step (Song et al. 2021, Eq. 12 and 16) ----------------------------------

def grade_2():
    g = torch.Generator().manual_seed(1)
    x0, eps, n = (torch.randn(3, 3, 4, 4, generator=g) for _ in range(3))
    for ab, ab_prev in ((0.3, 0.7), (0.02, 0.5), (0.9, 0.95)):
        want = ab_prev ** 0.5 * x0 + (1 - ab_prev) ** 0.5 * eps  # q(x_prev | x0) with the same noise
        assert close(dit.ddim_step(x0, eps, ab, ab_prev, 0.0), want), \
            "eta = 0 with the true noise must land on sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps"
        var = (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)  # DDPM's posterior variance (Eq. 16, eta = 1)
        step = dit.ddim_step(x0, eps, ab, ab_prev, 1.0, n) - dit.ddim_step(x0, eps, ab, ab_prev, 1.0, 0 * n)
        assert close(step, var ** 0.5 * n), "eta = 1 must add noise with DDPM's posterior variance"
        mean = dit.ddim_step(x0, eps, ab, ab_prev, 1.0, 0 * n)
        assert close(mean, ab_prev ** 0.5 * x0 + (1 - ab_prev - var) ** 0.5 * eps), \
            "the eps coefficient must shrink as sigma grows: x_prev keeps unit total variance"
    assert close(dit.ddim_step(x0, eps, 0.9, 1.0, 0.0), x0), "the last step (ab_prev = 1) must return x0"


def test_assignment_2_ddim_step():
    grade_2()


# --- assignment 3: the L_vb term of IDDPM's hybrid loss (Nichol & Dhariwal 2021, Sec. 2 and 3.1) -----

def grade_3():
    d, g = dit.Diffusion(), torch.Generator().manual_seed(2)
    x0 = (torch.rand(4, 3, 4, 4, generator=g) * 2 - 1)
    noise = torch.randn(4, 3, 4, 4, generator=g)
    i = torch.tensor([0, 10, 500, 999])
    xt = d.q_sample(x0, i, noise)
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)  # true eps, v = -1: the posterior variance
    vb = d.vb_terms(exact, x0, xt, i)
    assert vb.shape == (4,), "vb_terms must return one value per sample (mean over the dimensions)"
    assert vb[1:].abs().max() < 1e-4, "the KL must vanish when p(x_{t-1} | x_t) equals the true posterior"
    mean, logvar, _, _ = d.p_mean_variance(exact, xt, i)
    nll = -dit.discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2)
    assert close(vb[0], nll[0], 1e-4), "at t = 0 the term must be the decoder's NLL, in bits per dimension"
    wide = torch.cat([noise, torch.ones_like(noise)], 1)  # v = +1: variance beta_t, larger than the posterior
    q_mean, q_logvar = d.q_posterior(x0, xt, i)
    p_logvar = d.p_mean_variance(wide, xt, i)[1]
    kl = 0.5 * (p_logvar - q_logvar + torch.exp(q_logvar - p_logvar) - 1)  # same means: variance part only
    assert close(d.vb_terms(wide, x0, xt, i)[1:], kl.mean(dim=(1, 2, 3))[1:] / math.log(2), 1e-4), \
        "for i > 0 the term must be KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension"


def test_assignment_3_iddpm_vb_term():
    grade_3()


# --- assignment 4: the Frechet distance (Heusel et al. 2017, Eq. 6) ---------------------------------

def grade_4():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 4))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6, "a Gaussian must be at distance 0"
    va, vb = np.array([1.0, 4.0, 9.0]), np.array([4.0, 1.0, 0.25])
    want = 3 * 2.0 ** 2 + ((np.sqrt(va) - np.sqrt(vb)) ** 2).sum()  # diagonal: |dmu|^2 + sum (sa - sb)^2
    got = fid.frechet_distance(np.zeros(3), np.diag(va), 2 * np.ones(3), np.diag(vb))
    assert abs(got - want) < 1e-6, "two diagonal Gaussians must match |mu1 - mu2|^2 + sum (s1 - s2)^2"
    shifted = fid.frechet_distance(mu, sigma, mu + 0.5, sigma)
    assert abs(shifted - 4 * 0.25) < 1e-6, "equal covariances: the distance must be |mu1 - mu2|^2"


def test_assignment_4_frechet_distance():
    grade_4()


# --- assignment 5: feature KD with its projector (BK-SDM Sec. 3.2; Sundaresha 2025) ------------------

def grade_5(monkeypatch):
    g = torch.Generator().manual_seed(4)
    t_feats = [torch.randn(2, 5, 16, generator=g) * torch.rand(16, generator=g) * 9 for _ in range(3)]
    pairs = [(0, 1), (1, 2)]
    terms = distill.distill_loss(None, None, [t_feats[1].clone(), t_feats[2].clone()], t_feats, pairs)
    assert terms["feat"].item() < 1e-8, "a student feature equal to its target must cost 0"
    s_feats = [torch.randn(2, 5, 16, generator=g) for _ in pairs]
    mu_sd = lambda t: (t.mean((0, 1)), t.std((0, 1)))
    want = sum((((s - t_feats[j]) / mu_sd(t_feats[j])[1]) ** 2).mean() for s, (_, j) in zip(s_feats, pairs))
    assert close(distill.distill_loss(None, None, s_feats, t_feats, pairs)["feat"], want / len(pairs), 1e-4), \
        "the loss must be the mean over pairs of the MSE after standardising each channel with the target's " \
        "mean and std over the batch and the tokens"
    a = torch.rand(16, generator=g) * 5 + 0.1  # one scale per channel, on student and teacher alike
    scaled = distill.distill_loss(None, None, [s * a for s in s_feats], [t * a for t in t_feats], pairs)
    assert close(scaled["feat"], want / len(pairs), 1e-3), "rescaling a channel must not change its weight"
    student = dit.DiT(input_size=8, patch_size=4, hidden_size=8, depth=3, num_heads=2)
    net = distill.Distiller(student, 16, pairs)
    feats = [torch.randn(2, 4, 8, generator=g) for _ in range(3)]
    monkeypatch.setattr(distill, "features", lambda *a: (None, feats))
    _, proj = net(torch.zeros(2, 3, 8, 8), torch.zeros(2, dtype=torch.long))
    assert len(proj) == len(pairs) and all(p.shape == (2, 4, 16) for p in proj), \
        "the student's mapped features must be projected to the teacher's width"
    assert all(close(p, w(feats[i])) for p, w, (i, _) in zip(proj, net.up, pairs)), \
        "feature k must be projector k applied to the student block of pair k"


def test_assignment_5_feature_kd_with_projector(monkeypatch):
    grade_5(monkeypatch)


# --- assignment 6: TinyFusion's straight-through Gumbel-softmax N:M mask (TinyFusion Sec. 3) ---------

def grade_6():
    options, groups = prune.parse_pattern("2:4", 8)  # 6 options per group of 4, 2 groups
    torch.manual_seed(5)
    logits = torch.zeros(groups, len(options), requires_grad=True)
    mask, onehot = prune.st_gumbel_masks(logits, options, 64, tau=1.0, scale=1.0)
    assert mask.shape == (64, 8) and onehot.shape == (64, groups, len(options)), "shapes (B, L) and (B, G, K)"
    assert set(mask.unique().tolist()) <= {0.0, 1.0}, "the forward mask must be exactly 0 / 1"
    assert torch.equal(mask.reshape(64, groups, 4).sum(-1), torch.full((64, groups), 2.0)), \
        "the forward mask must keep exactly N of every M blocks"
    assert mask.requires_grad, "the mask must carry a gradient to the logits (straight-through estimator)"
    (mask * torch.randn(64, 8)).sum().backward()
    assert (logits.grad != 0).all(), "every logit must receive a gradient (straight-through estimator)"
    z = torch.tensor([[math.log(0.6), math.log(0.3), math.log(0.1)]])  # categorical draws: softmax(s z)
    _, onehot = prune.st_gumbel_masks(z, torch.eye(3), 20000, tau=0.5, scale=1.0)
    freq = onehot.detach().mean(0)[0]
    assert (freq - torch.tensor([0.6, 0.3, 0.1])).abs().max() < 0.02, \
        "the choices must be Gumbel-max draws from softmax(scale * logits)"


def test_assignment_6_st_gumbel_nm_mask():
    grade_6()


# --- assignment 7: DiP-GO's consistency + sparsity loss (DiP-GO Sec. 3) -----------------------------

def grade_7():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    logits = torch.randn(4, 3, 2, generator=g, requires_grad=True)
    gates = prune.st_gate(logits)
    kept = gates[..., 1].mean().item()
    p_keep = logits.softmax(-1)[..., 1].mean()
    loss, cons, sparse, _ = prune.dipgo_loss(x, x, logits, gates, ratio=0.0, alpha=1.0)
    assert cons.item() < 1e-5, "the consistency term must be 0 when the pruned sampler equals the full one"
    assert close(sparse, p_keep), "the sparsity term must be the mean keep probability over (step, block)"
    on, *_ = prune.dipgo_loss(x, x, logits, gates, ratio=1 - kept + 0.01, alpha=0.5)
    off, *_ = prune.dipgo_loss(x, x, logits, gates, ratio=1 - kept - 0.01, alpha=0.5)
    assert close(on, cons + 0.5 * p_keep) and close(off, cons), \
        "the sparsity term must count only while the hard plan keeps more than 1 - r"
    on.backward()
    assert (logits.grad[..., 1] > 0).all(), "the sparsity gradient must push every keep logit down"
    y = x.flip(-1)
    assert prune.dipgo_loss(y, x, logits, gates, 0.0)[1].item() > 0.05, \
        "the consistency term (1 - SSIM) must grow when the images differ"


def test_assignment_7_dipgo_loss():
    grade_7()


# --- assignment 8: DyDiT's Gumbel-sigmoid router and FLOPs-ratio loss (DyDiT Sec. 3.1 and 3.3) -------

def grade_8():
    torch.manual_seed(7)
    logits = torch.tensor([-1.0, 0.0, 2.0]).repeat(20000, 1).requires_grad_(True)
    m = dynamic.gumbel_sigmoid(logits, tau=5.0, training=True)
    assert set(m.unique().tolist()) <= {0.0, 1.0}, "the training mask must be exactly 0 / 1 going forward"
    assert (m.mean(0) - torch.sigmoid(torch.tensor([-1.0, 0.0, 2.0]))).abs().max() < 0.02, \
        "a unit must be on with probability sigmoid(logit) (logistic noise before the threshold)"
    assert m.requires_grad, "the training mask must carry a gradient back to the logits (straight-through)"
    (m * torch.randn_like(m)).sum().backward()
    assert (logits.grad != 0).float().mean() > 0.99, "gradients must reach the logits (straight-through)"
    infer = dynamic.gumbel_sigmoid(torch.tensor([-0.1, 0.1]), 5.0, False)
    assert torch.equal(infer, torch.tensor([0.0, 1.0])), \
        "at inference the mask must be 1[logit > 0]"
    r = torch.tensor([0.2, 0.6, 1.0], requires_grad=True)
    loss = dynamic.flops_loss(r, 0.5, 2.0)
    assert close(loss, 2.0 * (0.6 - 0.5) ** 2), "the FLOPs loss must be w (mean_b r_b - lambda)^2"
    loss.backward()
    assert close(r.grad, torch.full((3,), 2.0 * 2 * 0.1 / 3)), "the FLOPs loss must act on the batch mean"


def test_assignment_8_dydit_router_and_flops_loss():
    grade_8()


# --- the graders themselves: each refuses classic wrong answers --------------------------------------

def wrong_block_no_gate(self, x, mod):
    return self.attn(dit.modulate(self.norm1(x), mod.shift_msa, mod.scale_msa))


def wrong_vb_nats(self, out, x0, xt, i):
    mean, logvar, _, _ = self.p_mean_variance(out, xt, i)
    q_mean, q_logvar = self.q_posterior(x0, xt, i)
    kl = dit.normal_kl(q_mean, q_logvar, mean, logvar).mean(dim=(1, 2, 3))
    nll = -dit.discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3))
    return torch.where(i == 0, nll, kl)


def wrong_vb_swapped(self, out, x0, xt, i):
    mean, logvar, _, _ = self.p_mean_variance(out, xt, i)
    q_mean, q_logvar = self.q_posterior(x0, xt, i)
    kl = dit.normal_kl(mean, logvar, q_mean, q_logvar).mean(dim=(1, 2, 3)) / math.log(2)
    nll = -dit.discretized_gaussian_loglik(x0, mean, 0.5 * logvar).mean(dim=(1, 2, 3)) / math.log(2)
    return torch.where(i == 0, nll, kl)


def wrong_fd(root):
    def fd(mu1, s1, mu2, s2):
        d = np.atleast_1d(mu1) - np.atleast_1d(mu2)
        return float(d @ d + np.trace(s1) + np.trace(s2) - 2 * np.trace(root(np.atleast_2d(s1) @ s2)))
    return fd


def wrong_feat_loss(norm, reduce=sum):
    def loss(out, target, s_feats, t_feats, pairs, out_loss="huber", feat_weight=1.0):
        f = reduce([F.mse_loss(*norm(s, t_feats[j])) for s, (_, j) in zip(s_feats, pairs)])
        return dict(feat=f, loss=f)
    return loss


def own_stats(s, t):
    return distill.standardise(s, s), distill.standardise(t, t)


def token_ln(s, t):
    return F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])


def wrong_nm(mode):
    def sampler(logits, options, batch, tau, scale):
        G, K = logits.shape
        noise = -torch.empty(batch, G, K).exponential_().log()
        noise = torch.zeros_like(noise) if mode == "no_noise" else noise
        soft = torch.softmax((scale * logits + noise) / tau, -1)
        hard = F.one_hot(soft.argmax(-1), K).to(soft.dtype)
        onehot = soft if mode == "soft" else hard if mode == "no_st" else hard + soft - soft.detach()
        return (onehot @ options).reshape(batch, -1), onehot
    return sampler


def wrong_dipgo(mode):
    def loss(x, ref, logits, gates, ratio, alpha=1.0, kind="ssim"):
        cons = 1 - prune.ssim(x, ref) if mode != "plus" else 1 + prune.ssim(x, ref)
        sparse = logits.softmax(-1)[..., 0 if mode == "reuse" else 1].mean()
        on = (gates[..., 1].detach().mean() > 1 - ratio).float() if mode != "always" else 1.0
        return cons + alpha * sparse * on, cons, sparse, gates[..., 1].mean()
    return loss


def wrong_router(mode):
    def router(logits, tau, training):
        if not training:
            return (logits > 0).float()
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        soft = torch.sigmoid(logits / tau if mode == "no_noise" else (logits + u.log() - (-u).log1p()) / tau)
        hard = (soft > 0.5).float()
        return hard if mode == "no_st" else hard - soft.detach() + soft
    return router


PLANTED = {  # assignment -> [(mistake, module, attribute, wrong value)]
    1: [("modulate without the 1 + scale", dit, "modulate", lambda x, sh, sc: x * sc[:, None] + sh[:, None]),
        ("attention branch without its gate", dit.DiTBlock, "attn_branch", wrong_block_no_gate)],
    2: [("a sign error on eps", dit, "ddim_step",
         lambda x0, e, ab, abp, eta=0.0, n=0: abp ** 0.5 * x0 - (1 - abp) ** 0.5 * e),
        ("a missing square root", dit, "ddim_step",
         lambda x0, e, ab, abp, eta=0.0, n=0: abp * x0 + (1 - abp) * e + eta * n)],
    3: [("nats instead of bits", dit.Diffusion, "vb_terms", wrong_vb_nats),
        ("KL(p || q) instead of KL(q || p)", dit.Diffusion, "vb_terms", wrong_vb_swapped)],
    4: [("no matrix square root", fid, "frechet_distance", wrong_fd(lambda m: m)),
        ("an elementwise square root", fid, "frechet_distance", wrong_fd(lambda m: np.sqrt(np.abs(m))))],
    5: [("a LayerNorm per token instead of a standardisation per channel", distill, "distill_loss",
         wrong_feat_loss(token_ln, lambda m: sum(m) / len(m))),
        ("the student standardised with its own statistics", distill, "distill_loss",
         wrong_feat_loss(own_stats, lambda m: sum(m) / len(m))),
        ("a sum over pairs instead of a mean", distill, "distill_loss",
         wrong_feat_loss(lambda s, t: (distill.standardise(s, t), distill.standardise(t, t))))],
    6: [("no straight-through gradient", prune, "st_gumbel_masks", wrong_nm("no_st")),
        ("a soft mask in the forward pass", prune, "st_gumbel_masks", wrong_nm("soft")),
        ("no Gumbel noise", prune, "st_gumbel_masks", wrong_nm("no_noise"))],
    7: [("1 + SSIM", prune, "dipgo_loss", wrong_dipgo("plus")),
        ("sparsity on the reuse probability", prune, "dipgo_loss", wrong_dipgo("reuse")),
        ("sparsity always on", prune, "dipgo_loss", wrong_dipgo("always"))],
    8: [("no straight-through gradient", dynamic, "gumbel_sigmoid", wrong_router("no_st")),
        ("no logistic noise", dynamic, "gumbel_sigmoid", wrong_router("no_noise")),
        ("the mean of squared errors", dynamic, "flops_loss", lambda r, lam, w: w * ((r - lam) ** 2).mean())],
}
GRADERS = {1: grade_1, 2: grade_2, 3: grade_3, 4: grade_4, 5: grade_5, 6: grade_6, 7: grade_7, 8: grade_8}
CASES = [(n, *case) for n, cases in PLANTED.items() for case in cases]


@pytest.mark.parametrize("n,mistake,owner,name,wrong", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_graders_reject_planted_wrong_answers(monkeypatch, n, mistake, owner, name, wrong):
    monkeypatch.setattr(owner, name, wrong)
    with pytest.raises(AssertionError):
        GRADERS[n](monkeypatch) if n == 5 else GRADERS[n]()


# --- the handout: every region blanked, or only those chosen ------------------------------------------

def grade_tree(tree):
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_all.py", "-k",
                        "assignment"], cwd=tree, capture_output=True, text=True, timeout=300)
    failed = set(map(int, re.findall(r"FAILED test_all.py::test_assignment_(\d+)_", r.stdout)))
    assert all(f"NotImplementedError: assignment {n}: see course/README.md" in r.stdout for n in failed), \
        r.stdout
    return failed, r.stdout


def test_handout_blanks_every_region_and_only_one_grader_fails_with_only(tmp_path):
    """course/handout.py: with every region blanked, every assignment fails with its NotImplementedError; with
    --only 3, assignment 3 alone fails. Outside the blanked regions every byte is the repository's own."""
    root = handout.ROOT
    found = handout.regions()
    assert sorted(found) == list(range(1, 9))
    handout.make_handout(str(tmp_path / "all"), None)
    failed, out = grade_tree(tmp_path / "all")
    assert failed == set(range(1, 9)), out[-3000:]
    handout.make_handout(str(tmp_path / "only3"), [3])
    failed, out = grade_tree(tmp_path / "only3")
    assert failed == {3} and "1 failed, 7 passed" in out, out[-3000:]
    for name in ("dit.py", "fid.py", "prune.py", "weights/dit_shapes.pt", "course/README.md"):
        a, b = open(os.path.join(root, name), "rb").read(), open(tmp_path / "all" / name, "rb").read()
        if name.endswith(".py"):
            drop = re.compile(rb"(# assignment \d+ begin: .*\n)(?:.*\n)*?(\s*# assignment \d+ end\n)")
            a = drop.sub(rb"\1\2", a)
            b = re.sub(rb'\s*raise NotImplementedError\("assignment \d+: see course/README.md"\)\n', b"\n", b)
            b = drop.sub(rb"\1\2", b)
        assert a == b, name
