"""
course/graders.py: the graders of the eight assignments in course/README.md, collected by test_all.py.

    python -m pytest -q test_all.py -k assignment        # every assignment
    python -m pytest -q test_all.py -k assignment_3      # one

Each grader checks one marked region (`# assignment N begin` ... `# assignment N end`) through its public
function, on stated inputs (never through a training run that needs the other regions): the property the
paper defines, at non-default hyperparameters (eta strictly between 0 and 1, scale != 1, tau != 1), on generic
inputs (non-symmetric, non-commuting, a batch whose samples differ), at the boundaries and through the
gradients (they reach what must learn, with the right sign and the right scaling with the temperature).
Comparisons allow for floating point (a straight-through 1 may read 0.99999994). A failure says which property
broke, at which input.
`test_graders_reject_planted_wrong_answers` patches plausible mistakes into the full code and checks that each
grader refuses at least four of them; `test_graders_accept_correct_alternatives` checks that other correct
spellings pass.
"""
import math
import os
import re
import subprocess
import sys
from unittest import mock

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from scipy import linalg

import dit
import distill
import dynamic
import fid
import prune
from course import handout

__all__ = ["test_assignment_1_adaln_zero_modulation", "test_assignment_2_ddim_step",
           "test_assignment_3_iddpm_vb_term", "test_assignment_4_frechet_distance",
           "test_assignment_5_feature_kd_with_projector", "test_assignment_6_st_gumbel_nm_mask",
           "test_assignment_7_dipgo_loss", "test_assignment_8_dydit_router",
           "test_assignment_9_dydit_flops_loss",
           "test_graders_reject_planted_wrong_answers", "test_graders_accept_correct_alternatives",
           "test_every_grader_has_four_planted_mistakes_and_two_correct_alternatives",
           "test_handout_blanks_every_region_and_only_one_grader_fails_with_only"]


def close(a, b, tol=1e-5):
    return torch.allclose(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64),
                          atol=tol, rtol=tol)


def rel_close(a, b, tol):
    """|a - b| <= tol |b| in the Euclidean norm (for gradients, whose entries may all be small)."""
    return (a - b).double().norm().item() <= tol * b.double().norm().item()


def binary(m, tol=1e-6):
    """Is every entry 0 or 1 up to float rounding (hard + soft - soft.detach() may read 0.99999994)?"""
    return bool(((m - m.round()).abs() <= tol).all() and ((m.round() == 0) | (m.round() == 1)).all())


def grad_of(fn, *tensors):
    """Gradients of fn(*tensors).sum() w.r.t. copies of `tensors` (zeros where none flows)."""
    xs = [t.detach().clone().requires_grad_(True) for t in tensors]
    out = fn(*xs)
    out = out.sum() if torch.is_tensor(out) else sum(o.sum() for o in out)
    grads = torch.autograd.grad(out, xs, allow_unused=True) if out.requires_grad else [None] * len(xs)
    return [torch.zeros_like(x) if g is None else g for x, g in zip(xs, grads)]


def logistic_mean(fn, n=400_000):
    """E[fn(L)] for L ~ Logistic(0, 1): the grader's own seeded Monte Carlo, independent of the answer."""
    u = torch.rand(n, generator=torch.Generator().manual_seed(123), dtype=torch.float64)
    u = u.clamp(1e-12, 1 - 1e-12)
    return fn(u.log() - (-u).log1p()).mean().item()


# --- assignment 1: adaLN-Zero modulation in the DiT block (DiT Sec. 3.2, Fig. 3) ----------------------

def grade_1():
    g = torch.Generator().manual_seed(0)
    x, shift, scale = torch.randn(2, 5, 8, generator=g), *torch.randn(2, 2, 8, generator=g)
    assert dit.modulate(x, shift, scale).shape == x.shape, "modulate must keep the (B, T, D) shape of x"
    assert close(dit.modulate(x, 0 * shift, 0 * scale), x), "modulate(x, 0, 0) must be the identity"
    want = x * (1 + scale[:, None]) + shift[:, None]
    assert close(dit.modulate(x, shift, scale), want), \
        "modulate(x, shift, scale) must be x (1 + scale) + shift, per sample and channel, the same for " \
        "every token (at random shift, scale of 2 samples)"
    block = dit.DiTBlock(8, 2)
    torch.nn.init.normal_(block.adaLN_modulation[-1].weight, std=0.5, generator=g)
    torch.nn.init.normal_(block.adaLN_modulation[-1].bias, std=0.5, generator=g)
    c = torch.randn(2, 8, generator=g)
    m = block.modulation(c)
    h = x + m.gate_msa[:, None] * block.attn(block.norm1(x) * (1 + m.scale_msa[:, None])
                                             + m.shift_msa[:, None])
    mlp = m.gate_mlp[:, None] * block.mlp(block.norm2(h) * (1 + m.scale_mlp[:, None]) + m.shift_mlp[:, None])
    with torch.no_grad():
        assert close(block(x, c), h + mlp), "DiTBlock.forward must be x + gate_msa * Attn(modulate(LN(x), " \
            "shift_msa, scale_msa)), then + gate_mlp * MLP(modulate(LN(.), shift_mlp, scale_mlp)) (Fig. 3)"
    w = block.adaLN_modulation[-1].weight
    gw = torch.autograd.grad(block(x, c).sum(), w)[0].reshape(6, 8, 8).abs().sum((1, 2))
    assert (gw > 0).all(), "each of the six modulation vectors (shift, scale, gate of attention and MLP) " \
        "must receive a gradient: the adaLN weights learn through both branches"
    with torch.no_grad():
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
            f"eta = 0 with the true noise must land on sqrt(ab_prev) x0 + sqrt(1 - ab_prev) eps (ab {ab})"
        for eta in (1.0, 0.37):  # 0.37: eta's own role (sigma = eta * ..., not eta^2) is visible
            var = eta ** 2 * (1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)  # sigma^2, DDIM Eq. 16
            mean = dit.ddim_step(x0, eps, ab, ab_prev, eta, 0 * n)
            step = dit.ddim_step(x0, eps, ab, ab_prev, eta, n) - mean
            assert close(step, var ** 0.5 * n), \
                f"the noise must be scaled by sigma = eta sqrt((1-ab')/(1-ab)) sqrt(1-ab/ab') (eta {eta})"
            assert close(mean, ab_prev ** 0.5 * x0 + (1 - ab_prev - var) ** 0.5 * eps), \
                f"the eps coefficient must be sqrt(1 - ab_prev - sigma^2) (eta {eta}, ab {ab})"
        t = dit.ddim_step(x0, eps, torch.tensor(ab), torch.tensor(ab_prev), 0.37, n)  # as the sampler calls
        assert close(t, dit.ddim_step(x0, eps, ab, ab_prev, 0.37, n)), "0-d tensor alpha-bars must work too"
    assert close(dit.ddim_step(x0, eps, 0.9, 1.0, 0.0), x0), "the last step (ab_prev = 1) must return x0"
    gx, ge = grad_of(lambda a, b: dit.ddim_step(a, b, 0.3, 0.7, 0.37, n), x0, eps)
    var = 0.37 ** 2 * 0.3 / 0.7 * (1 - 0.3 / 0.7)
    assert close(gx, torch.full_like(x0, 0.7 ** 0.5)) and close(ge, torch.full_like(eps, (.3 - var) ** .5)), \
        "the gradients w.r.t. x0 and eps must be the step's coefficients (DiP-GO backpropagates through it)"


def test_assignment_2_ddim_step():
    grade_2()


# --- assignment 3: the L_vb term of IDDPM's hybrid loss (Nichol & Dhariwal 2021, Sec. 2 and 3.1) -----

def reference_vb(d, out, x0, xt, i):
    """The grader's own L_vb in bits per dimension: the Gaussian KL written out, the decoder NLL at i = 0."""
    q_mean, q_logvar = d.q_posterior(x0, xt, i)
    mean, logvar = d.p_mean_variance(out, xt, i)[:2]
    kl = 0.5 * (-1 + logvar - q_logvar + torch.exp(q_logvar - logvar)
                + (q_mean - mean) ** 2 * torch.exp(-logvar))
    nll = -dit.discretized_gaussian_loglik(x0, mean, 0.5 * logvar)
    return torch.where(i == 0, nll.mean(dim=(1, 2, 3)), kl.mean(dim=(1, 2, 3))) / math.log(2)


def grade_3():
    d, g = dit.Diffusion(), torch.Generator().manual_seed(2)
    x0 = torch.rand(5, 3, 4, 4, generator=g) * 2 - 1
    noise = torch.randn(5, 3, 4, 4, generator=g)
    i = torch.tensor([0, 1, 10, 500, 999])  # i = 0 is the paper's t = 1 (the decoder term)
    xt = d.q_sample(x0, i, noise)
    exact = torch.cat([noise, -torch.ones_like(noise)], 1)  # true eps, v = -1: the posterior variance
    vb = d.vb_terms(exact, x0, xt, i)
    assert vb.shape == (5,), "vb_terms must return one value per sample (mean over the dimensions)"
    assert vb[1:].abs().max() < 1e-4, "the KL must vanish when p(x_{t-1} | x_t) equals the true posterior"
    out = torch.cat([noise + 0.5 * torch.randn(noise.shape, generator=g),  # a wrong eps: the means differ
                     torch.rand(noise.shape, generator=g) * 2 - 1], 1)  # and a variance between the bounds
    got, want = d.vb_terms(out, x0, xt, i), reference_vb(d, out, x0, xt, i)
    assert close(got[0], want[0], 1e-4), \
        "at i = 0 (the paper's t = 1) the term must be the decoder's NLL -log p(x0 | x1) in bits per dim"
    assert close(got[1:], want[1:], 1e-4), \
        "for i > 0 the term must be KL(q(x_{t-1} | x_t, x0) || p(x_{t-1} | x_t)) in bits per dimension, " \
        "mean and variance parts both (at a model whose eps is wrong and whose variance is interpolated)"
    (g_got,), (g_want,) = grad_of(lambda o: d.vb_terms(o, x0, xt, i), out), grad_of(
        lambda o: reference_vb(d, o, x0, xt, i), out)
    assert g_got[:, 3:].abs().sum() > 0 and rel_close(g_got, g_want, 1e-4), \
        "the gradient of L_vb w.r.t. the model output (eps and variance channels) must be the KL's / NLL's"


def test_assignment_3_iddpm_vb_term():
    grade_3()


# --- assignment 4: the Frechet distance (Heusel et al. 2017, Eq. 6) ---------------------------------

def reference_fd(mu1, s1, mu2, s2):
    """The grader's own distance: Tr((S1 S2)^(1/2)) = Tr((S1^(1/2) S2 S1^(1/2))^(1/2)), a symmetric root."""
    w, v = np.linalg.eigh(s1)
    r1 = (v * np.sqrt(w.clip(0))) @ v.T
    inner = np.linalg.eigvalsh(r1 @ s2 @ r1).clip(0)
    return float((mu1 - mu2) @ (mu1 - mu2) + np.trace(s1) + np.trace(s2) - 2 * np.sqrt(inner).sum())


def sqrtm_calls(replies):
    """linalg.sqrtm answering from `replies` (a function of the call's index and matrix), counting calls."""
    calls, real = [], linalg.sqrtm

    def sqrtm(m, *a, **k):
        calls.append(m)
        root = real(m, *a, **k) if np.isfinite(m).all() else np.full(np.shape(m), np.nan)
        return replies(len(calls) - 1, m, root)
    return calls, sqrtm


def grade_4():
    rng = np.random.default_rng(3)
    a = rng.normal(size=(50, 4))
    mu, sigma = a.mean(0), np.cov(a, rowvar=False)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6, "a Gaussian must be at distance 0"
    mix = rng.normal(size=(6, 6))  # correlated features: S1 and S2 do not commute, S1 S2 is not symmetric
    s1, s2 = (np.cov(rng.normal(size=(80, 6)) @ mix * k, rowvar=False) for k in (1.0, 1.7))
    m1, m2 = rng.normal(size=6), rng.normal(size=6)
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 1
    got = fid.frechet_distance(m1, s1, m2, s2)
    assert isinstance(got, float) and abs(got - reference_fd(m1, s1, m2, s2)) < 1e-6 * (1 + abs(got)), \
        "non-commuting covariances: the distance must use Tr((S1 S2)^(1/2)), the root of the product " \
        "(not sqrt(S1) sqrt(S2), not the eigenvalues of S1 S2 from a symmetric solver), as a float"
    low1, low2 = (np.cov(rng.normal(size=(4, 6)) @ mix, rowvar=False) for _ in range(2))  # rank 3 of 6
    got = fid.frechet_distance(m1, low1, m2, low2)
    assert math.isfinite(got) and abs(got - reference_fd(m1, low1, m2, low2)) < 1e-4 * (1 + abs(got)), \
        "rank-deficient covariances (fewer samples than features) must still give the finite distance"
    # the pytorch-fid safeguards, when the answer takes the root with linalg.sqrtm
    calls, bad_first = sqrtm_calls(lambda k, m, root: root * np.nan if k == 0 else root)
    with mock.patch.object(linalg, "sqrtm", bad_first):
        got = fid.frechet_distance(m1, s1, m2, s2)
    if calls:
        off = np.eye(6) * 1e-6
        want = reference_fd(m1, s1 + off, m2, s2 + off)
        assert len(calls) >= 2 and abs(got - want) < 1e-6 * (1 + abs(got)), \
            "when sqrtm's result is not finite, the root must be taken again with eps = 1e-6 on the diagonals"
        calls, tiny = sqrtm_calls(lambda k, m, root: root + 1e-9j)
        with mock.patch.object(linalg, "sqrtm", tiny):
            try:
                got = fid.frechet_distance(m1, s1, m2, s2)
            except Exception as e:
                raise AssertionError(f"a root with a negligible imaginary part must be accepted, not {e!r}")
        assert isinstance(got, float) and abs(got - reference_fd(m1, s1, m2, s2)) < 1e-6 * (1 + abs(got)), \
            "a root with a negligible imaginary part (1e-9) must be accepted: its real part, as a float"
        calls, big = sqrtm_calls(lambda k, m, root: root + 0.5j * np.eye(len(m)))
        with mock.patch.object(linalg, "sqrtm", big):
            try:
                fid.frechet_distance(m1, s1, m2, s2)
            except ValueError:
                pass
            except Exception as e:
                raise AssertionError(f"a root with a large imaginary part must raise ValueError, not {e!r}")
            else:
                raise AssertionError("a root whose diagonal has an imaginary part above 1e-3 (here 0.5) must "
                                     "raise ValueError")


def test_assignment_4_frechet_distance():
    grade_4()


# --- assignment 5: feature KD with its projector (BK-SDM Sec. 3.2; Sundaresha 2025) ------------------

def reference_feat(s_feats, t_feats, links):
    """The grader's own feature loss: each channel standardised by the target's batch-and-token statistics."""
    out = 0
    for s, (_, j) in zip(s_feats, links):
        sd = t_feats[j].reshape(-1, t_feats[j].shape[-1]).std(0)  # (D,): the mean cancels in s - t
        out = out + (((s - t_feats[j]) / sd) ** 2).mean()
    return out / len(links)


def grade_5():
    g = torch.Generator().manual_seed(4)
    scales = torch.rand(16, generator=g) * 9 + 0.05  # channels of very different size
    size = torch.arange(1.0, 5.0)[:, None, None]  # the 4 samples differ in scale: pooled != per-sample stats
    t_feats = [torch.randn(4, 32, 16, generator=g) * scales * size + torch.randn(16, generator=g)
               for _ in range(3)]
    links = [(0, 2), (1, 1)]  # student block i -> teacher block j: not the identity map
    terms = distill.distill_loss(None, None, [t_feats[2].clone(), t_feats[1].clone()], t_feats, links)
    assert terms["feat"].item() < 1e-8, "a student feature equal to its target must cost 0"
    s_feats = [t_feats[j] + torch.randn(4, 32, 16, generator=g) * scales * (1 + k)
               for k, (_, j) in enumerate(links)]
    want = reference_feat(s_feats, t_feats, links)
    loss = lambda *s: distill.distill_loss(None, None, list(s), t_feats, links)["feat"]  # noqa: E731
    assert close(loss(*s_feats), want, 2e-2), \
        "the loss must be the mean over links (i, j) of the MSE after standardising every channel with the " \
        "target h_T,j's mean and std over the batch and the tokens (4 samples x 32 tokens, 2 links)"
    a = torch.rand(16, generator=g) * 5 + 0.1  # one scale per channel, on student and teacher alike
    rescaled = distill.distill_loss(None, None, [s * a for s in s_feats], [t * a for t in t_feats], links)
    assert close(rescaled["feat"], want, 2e-2), \
        "rescaling a channel on both sides must not change the loss (no channel dominates)"
    got, ref = grad_of(loss, *s_feats), grad_of(lambda *s: reference_feat(list(s), t_feats, links), *s_feats)
    assert all(r.abs().sum() > 0 and rel_close(a_, r, 3e-2) for a_, r in zip(got, ref)), \
        "the gradient must reach every projected student feature and equal the standardised MSE's"
    student = dit.DiT(input_size=8, patch_size=4, hidden_size=8, depth=3, num_heads=2)
    up = distill.Distiller(student, 16, links).up  # the projectors W_k: width 8 -> 16
    raw = [torch.randn(4, 32, 8, generator=g) for _ in links]  # the outputs of student blocks i_k (width 8)
    why = "feature k must be projector W_k (student width 8 -> teacher width 16) applied to h_S,i_k"
    try:
        got = distill.distill_loss(None, None, raw, t_feats, links, up=up)["feat"]
    except RuntimeError as e:  # an unprojected feature does not match the teacher's width
        raise AssertionError(f"{why}: {e}") from e
    assert close(got, reference_feat([w(s) for w, s in zip(up, raw)], t_feats, links), 2e-2), why


def test_assignment_5_feature_kd_with_projector():
    grade_5()


# --- assignment 6: TinyFusion's straight-through Gumbel-softmax N:M mask (TinyFusion Sec. 3) ---------

def st_gradient(sampler, tau, scale, batch=50000):
    """Mean over a batch of d(onehot[option 1]) / d(logit 1) for two options with equal logits (1:2)."""
    logits = torch.zeros(1, 2, requires_grad=True)
    _, onehot = sampler(logits, torch.eye(2), batch, tau=tau, scale=scale)
    onehot[..., 1].sum().backward()
    return logits.grad[0, 1].item() / batch, logits.grad[0, 0].item() / batch


def grade_6():
    options, groups = prune.parse_pattern("2:4", 8)  # 6 options per group of 4, 2 groups
    torch.manual_seed(5)
    logits = torch.zeros(groups, len(options), requires_grad=True)
    mask, onehot = prune.st_gumbel_masks(logits, options, 64, tau=0.7, scale=3.0)
    assert mask.shape == (64, 8) and onehot.shape == (64, groups, len(options)), "shapes (B, L) and (B, G, K)"
    assert binary(mask) and binary(onehot), "the forward mask must be 0 / 1 (up to float rounding)"
    assert torch.equal(mask.round().reshape(64, groups, 4).sum(-1), torch.full((64, groups), 2.0)), \
        "the forward mask must keep exactly N of every M blocks (2:4)"
    assert len({tuple(r) for r in mask.round().tolist()}) > 10, \
        "each example of the batch must draw its own mask (independent Gumbel noise per example and group)"
    assert mask.requires_grad, "the mask must carry a gradient to the logits (straight-through estimator)"
    (mask * torch.randn(64, 8)).sum().backward()
    assert (logits.grad != 0).all(), "every logit must receive a gradient (straight-through estimator)"
    p = torch.tensor([0.6, 0.3, 0.1])
    for scale in (1.0, 2.5):
        z = (p.log() / scale)[None]  # categorical draws from softmax(scale * z) = p
        _, onehot = prune.st_gumbel_masks(z, torch.eye(3), 20000, tau=0.5, scale=scale)
        freq = onehot.detach().round().mean(0)[0]
        assert (freq - p).abs().max() < 0.02, \
            f"the choices must be Gumbel-max draws from softmax(scale * logits) (scale {scale}: {freq})"
    for tau, scale in ((0.5, 2.0), (4.0, 2.0), (4.0, 0.5)):
        g1, g0 = st_gradient(prune.st_gumbel_masks, tau, scale)
        want = scale / tau * logistic_mean(lambda v: torch.sigmoid(v / tau) * torch.sigmoid(-v / tau))
        assert abs(g1 - want) < 0.05 * want and abs(g0 + want) < 0.05 * want, \
            f"the straight-through gradient must be that of softmax((scale z + g) / tau): at tau {tau}, " \
            f"scale {scale}: d onehot_1 / d z_1 averages {want:.4f} (z_0: minus that); got {g1:.4f}, {g0:.4f}"


def test_assignment_6_st_gumbel_nm_mask():
    grade_6()


# --- assignment 7: DiP-GO's consistency + sparsity loss (DiP-GO Sec. 3) -----------------------------

def grade_7():
    g = torch.Generator().manual_seed(6)
    x = torch.rand(2, 3, 16, 16, generator=g) * 2 - 1
    logits = torch.randn(4, 3, 2, generator=g, requires_grad=True)
    gates = prune.Pruner.gate(logits)
    kept = gates[..., 1].mean().item()
    p_keep = logits.softmax(-1)[..., 1].mean()
    loss, cons, sparse, _ = prune.dipgo_loss(x, x, logits, gates, ratio=0.0, alpha=1.0)
    assert cons.item() < 1e-5, "the consistency term must be 0 when the pruned sampler equals the full one"
    assert close(sparse, p_keep), "the sparsity term must be the mean keep probability over (step, block)"
    on, *_ = prune.dipgo_loss(x, x, logits, gates, ratio=1 - kept + 0.01, alpha=0.3)
    off, *_ = prune.dipgo_loss(x, x, logits, gates, ratio=1 - kept - 0.01, alpha=0.3)
    assert close(on, cons + 0.3 * p_keep) and close(off, cons), \
        "the sparsity term (weight alpha = 0.3) must count only while the hard plan keeps more than 1 - r"
    w = torch.tensor([1.0, 2.0, 3.0])  # the output rule's cascade: a reuse of block b skips b + 1 blocks
    on_w, *_ = prune.dipgo_loss(x, x, logits, gates, ratio=1 - kept + 0.01, alpha=0.3, cascade=w)
    assert close(on_w, cons + 0.3 * (logits.softmax(-1)[..., 1] * w).mean()), \
        "with cascade weights w[b] the sparsity term must be mean_{t, b} w[b] P_keep[t, b] (here w = 1, 2, 3)"
    half = torch.tensor([[2.0, -1.0], [-1.0, 2.0]]).repeat(6, 1).reshape(4, 3, 2).requires_grad_(True)
    hg = prune.Pruner.gate(half)  # exactly half of the calls kept
    at, *_ = prune.dipgo_loss(x, x, half, hg, ratio=0.5, alpha=0.3)
    assert close(at, prune.dipgo_loss(x, x, half, hg, ratio=0.5, alpha=0.0)[0]), \
        "at the boundary, a plan that keeps exactly 1 - r (0.5) of the calls has met the target: no sparsity"
    on.backward()
    assert (logits.grad[..., 1] > 0).all() and (logits.grad[..., 0] < 0).all(), \
        "the sparsity gradient must push every keep logit down and every reuse logit up"
    y = (x.flip(-1) + 0.3 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    loss, cons, *_ = prune.dipgo_loss(y, x, logits, gates, 0.0)
    assert close(cons, 1 - prune.ssim(y, x), 1e-5) and cons.item() > 0.05, \
        "the consistency term must be 1 - SSIM(x, ref) (here different images)"
    (gy,) = grad_of(lambda a: prune.dipgo_loss(a, x, logits.detach(), gates.detach(), 0.0)[0], y)
    assert gy.abs().sum() > 0, "the consistency gradient must reach the pruned sampler's images"


def test_assignment_7_dipgo_loss():
    grade_7()


# --- assignment 8: DyDiT's Gumbel-sigmoid router (DyDiT Sec. 3.1) ---------------------------------------

def grade_8():
    torch.manual_seed(7)
    base = torch.tensor([-1.0, 0.0, 2.0])
    for tau in (5.0, 0.5):
        logits = base.repeat(50000, 1).requires_grad_(True)
        m = dynamic.gumbel_sigmoid(logits, tau=tau, training=True)
        assert binary(m), f"the training mask must be 0 / 1 going forward (up to float rounding; tau {tau})"
        assert (m.detach().round().mean(0) - torch.sigmoid(base)).abs().max() < 0.02, \
            f"a unit must be on with probability sigmoid(logit), whatever tau (logistic noise; tau {tau})"
        assert m.requires_grad, "the training mask must carry a gradient to the logits (straight-through)"
        m.sum().backward()
        got = logits.grad.mean(0)
        for k, l in enumerate(base.tolist()):
            want = logistic_mean(lambda v: torch.sigmoid((l + v) / tau) * torch.sigmoid(-(l + v) / tau)) / tau
            assert abs(got[k] - want) < 0.05 * want, \
                f"the straight-through gradient must be that of sigmoid((l + logistic noise) / tau): at " \
                f"tau {tau}, logit {l}, d mask / d l averages {want:.4f}, got {got[k]:.4f}"
    infer = dynamic.gumbel_sigmoid(torch.tensor([-0.1, 0.1]), 5.0, False)
    assert torch.equal(infer, torch.tensor([0.0, 1.0])), "at inference the mask must be 1[logit > 0]"


def test_assignment_8_dydit_router():
    grade_8()

# --- assignment 9: DyDiT's FLOPs-ratio loss (DyDiT Sec. 3.3) --------------------------------------------

def grade_9():
    r = torch.tensor([0.2, 0.65, 1.0, 0.31], requires_grad=True)
    loss = dynamic.flops_loss(r, 0.45, 2.5)
    assert loss.dim() == 0, "the FLOPs loss must be one number for the batch"
    assert close(loss, 2.5 * (r.mean() - 0.45) ** 2), "the FLOPs loss must be w (mean_b r_b - lambda)^2 " \
        "(at w 2.5, lambda 0.45, four samples)"
    assert loss.requires_grad, "the FLOPs loss must carry a gradient to the ratios (the routers learn by it)"
    loss.backward()
    assert close(r.grad, torch.full((4,), 2.5 * 2 * (r.mean().item() - 0.45) / 4)), \
        "the FLOPs loss must act on the batch mean (each sample's gradient 2 w (mean - lambda) / B)"
    at = torch.tensor([0.3, 0.7])
    assert close(dynamic.flops_loss(at, 0.5, 3.0), torch.tensor(0.0)), "a batch mean at lambda must cost 0"


def test_assignment_9_dydit_flops_loss():
    grade_9()


# --- the graders themselves: each refuses plausible wrong answers and accepts other correct ones -------

def block_forward(gate, which, modulation=None):
    """DiTBlock.forward with one half (`which`) changed: gate(mod) -> its gate (None: none); modulation(mod)
    -> its (shift, scale)."""
    def forward(self, x, c):
        mod = self.modulation(c)
        for half, norm, net in (("attn", self.norm1, self.attn), ("mlp", self.norm2, self.mlp)):
            own = (mod.shift_msa, mod.scale_msa, mod.gate_msa) if half == "attn" else \
                (mod.shift_mlp, mod.scale_mlp, mod.gate_mlp)
            shift, scale = modulation(mod) if modulation and half == which else own[:2]
            h = net(dit.modulate(norm(x), shift, scale))
            g = (gate(mod) if gate else None) if half == which else own[2]
            x = x + (h if g is None else g[:, None] * h)
        return x
    return forward


def forward_unpacked(self, x, c):
    """A correct DiTBlock.forward spelled as DiT's models.py: six chunks unpacked by position."""
    shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
    x = x + self.attn(dit.modulate(self.norm1(x), shift_msa, scale_msa)) * gate_msa.unsqueeze(1)
    return x + self.mlp(dit.modulate(self.norm2(x), shift_mlp, scale_mlp)) * gate_mlp.unsqueeze(1)


def ddim(sigma_fn, eps_coef=None, noise_coef=None):
    def step(x0, eps, ab, ab_prev, eta=0.0, noise=0):
        s = sigma_fn(eta, ab, ab_prev)
        c = (1 - ab_prev - s ** 2) ** 0.5 if eps_coef is None else eps_coef(ab_prev, s)
        return ab_prev ** 0.5 * x0 + c * eps + (s if noise_coef is None else noise_coef(s)) * noise
    return step


def sigma(eta, ab, ab_prev):
    return eta * ((1 - ab_prev) / (1 - ab)) ** 0.5 * (1 - ab / ab_prev) ** 0.5


def vb(kl_args=None, nll_at=0, log_scale=0.5, bits=True, x0_from_model=False, reduce="mean"):
    def terms(self, out, x0, xt, i):
        mean, logvar, x0_pred, _ = self.p_mean_variance(out, xt, i)
        q_mean, q_logvar = self.q_posterior(x0_pred if x0_from_model else x0, xt, i)
        args = (q_mean, q_logvar, mean, logvar)
        args = args if kl_args is None else kl_args(*args)
        dims = (1, 2, 3)
        red = (lambda v: v.mean(dim=dims)) if reduce == "mean" else (lambda v: v.sum(dim=dims))
        kl = red(dit.normal_kl(*args))
        nll = red(-dit.discretized_gaussian_loglik(x0, mean, log_scale * logvar))
        k = math.log(2.0) if bits else 1.0
        return torch.where(i == nll_at, nll, kl) / k
    return terms


def fd(root, safeguard=True, imag_check=True):
    """A Frechet distance whose Tr((S1 S2)^(1/2)) is root(s1, s2) (a matrix, or a number: its trace)."""
    def distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
        mu1, mu2, s1, s2 = (np.atleast_1d(v).astype(np.float64) for v in (mu1, mu2, sigma1, sigma2))
        s1, s2 = np.atleast_2d(s1), np.atleast_2d(s2)
        covmean = root(s1, s2)
        if safeguard and not np.isfinite(covmean).all():
            off = np.eye(s1.shape[0]) * eps
            covmean = root(s1 + off, s2 + off)
        if np.iscomplexobj(covmean):
            if imag_check and not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
                raise ValueError("imaginary component")
            covmean = covmean.real
        tr = np.trace(covmean) if np.ndim(covmean) == 2 else covmean
        diff = mu1 - mu2
        return float(np.einsum("i,i->", diff, diff) + np.trace(s1) + np.trace(s2) - 2 * tr)
    return distance


def sandwich(s1, s2):  # (S1^(1/2) S2 S1^(1/2))^(1/2) has the trace of (S1 S2)^(1/2)
    r = linalg.sqrtm(s1)
    return linalg.sqrtm(r @ s2 @ r)


def feat_loss(norm=None, reduce="mean", detach=False, target_index=1, project=True):
    """distill_loss's feature term with a mistake: norm(s, t) -> (s', t'); target_index 0 takes t_feats[i]."""
    norm = norm or (lambda s, t: (distill.standardise(s, t), distill.standardise(t, t)))

    def loss(out, target, s_feats, t_feats, links, feat_weight=1.0, up=None):
        up = up if up is not None and project else [torch.nn.Identity()] * len(links)
        mse = [F.mse_loss(*norm(w(s).detach() if detach else w(s), t_feats[p[target_index]]))
               for w, s, p in zip(up, s_feats, links)]
        f = sum(mse) / (len(mse) if reduce == "mean" else 1)
        return dict(feat=f, loss=feat_weight * f)
    return loss


def per_sample(s, t):
    mu, sd = t.mean(1, keepdim=True), t.std(1, keepdim=True)
    return (s - mu) / sd, (t - mu) / sd


def loop_standardised(s, t):  # a correct spelling: channel by channel, population std over B * T
    cols = [(s[..., c] - t[..., c].mean()) / t[..., c].std(unbiased=False) for c in range(t.shape[-1])]
    return torch.stack(cols, -1), torch.stack([(t[..., c] - t[..., c].mean()) / t[..., c].std(unbiased=False)
                                               for c in range(t.shape[-1])], -1)


def einsum_standardised(s, t):  # a correct spelling: statistics via einsum over (B, T)
    n = t.shape[0] * t.shape[1]
    mu = torch.einsum("btd->d", t) / n
    sd = (torch.einsum("btd,btd->d", t - mu, t - mu) / (n - 1)).sqrt()
    return (s - mu) / sd, (t - mu) / sd


def nm(noise="gumbel", st="plus", scale_in=True, tau_in=True, shared=False):
    def sampler(logits, options, batch, tau, scale):
        G, K = logits.shape
        u = torch.rand(1 if shared else batch, G, K).clamp(1e-10, 1 - 1e-10)
        g = -torch.log(-torch.log(u)) if noise == "gumbel" else torch.zeros(batch, G, K)
        a = (scale * logits if scale_in else logits) + g
        soft = torch.softmax(a / tau if tau_in else a, -1).expand(batch, G, K)
        hard = F.one_hot(soft.argmax(-1), K).to(soft.dtype)
        onehot = {"plus": hard + soft - soft.detach(), "minus": hard - soft.detach() + soft,
                  "flipped": hard - soft + soft.detach(), "none": hard, "soft": soft}[st]
        return (onehot @ options).reshape(batch, -1), onehot
    return sampler


def builtin_gumbel(logits, options, batch, tau, scale):  # a correct spelling: torch's own gumbel_softmax
    onehot = F.gumbel_softmax((scale * logits).expand(batch, *logits.shape), tau=tau, hard=True)
    return (onehot @ options).reshape(batch, -1), onehot


def dipgo(cons=lambda x, r: 1 - prune.ssim(x.clamp(-1, 1), r.clamp(-1, 1)), cond=lambda kept, r: kept > 1 - r,
          which=1, hard=False, weighted=True):
    def loss(x, ref, logits, gates, ratio, alpha=1.0, cascade=1):
        kept = gates[..., 1].detach().mean()
        w = cascade if weighted else 1
        p_keep = (gates[..., 1] * w).mean() if hard else (logits.softmax(-1)[..., which] * w).mean()
        c = cons(x, ref)
        return c + alpha * p_keep * float(cond(kept, ratio)), c, p_keep, kept
    return loss


def where_dipgo(x, ref, logits, gates, ratio, alpha=1.0, cascade=1):  # correct: torch.where, no float cast
    c = 1 - prune.ssim(x.clamp(-1, 1), ref.clamp(-1, 1))
    kept, p = gates[..., 1].detach().mean(), (logits.softmax(-1)[..., 1] * cascade).mean()
    return c + alpha * torch.where(kept > 1 - ratio, p, 0 * p), c, p, kept


def sigmoid_dipgo(x, ref, logits, gates, ratio, alpha=1.0, cascade=1):  # correct: P_keep as a sigmoid
    c = 1 - prune.ssim(x.clamp(-1, 1), ref.clamp(-1, 1))
    kept = gates[..., 1].detach().mean()
    p = (torch.sigmoid(logits[..., 1] - logits[..., 0]) * cascade).mean()
    return c + alpha * (p if kept > 1 - ratio else 0 * p), c, p, kept


def router(noise=True, tau_in=True, st="minus", threshold=0.5):
    def fn(logits, tau, training):
        if not training:
            return (logits > 0).float()
        u = torch.rand_like(logits).clamp(1e-6, 1 - 1e-6)
        a = logits + (torch.log(u) - torch.log1p(-u) if noise else 0)
        soft = torch.sigmoid(a / tau if tau_in else a)
        hard = (soft > threshold).float()
        return {"minus": hard - soft.detach() + soft, "plus": hard + soft - soft.detach(), "none": hard,
                "flipped": hard + soft.detach() - soft}[st]
    return fn


def two_gumbels(logits, tau, training):  # a correct spelling: logistic noise as g1 - g2, threshold on a > 0
    if not training:
        return (logits > 0).float()
    g1, g2 = (-torch.log(-torch.log(torch.rand_like(logits).clamp(1e-10, 1 - 1e-10))) for _ in range(2))
    a = (logits + g1 - g2) / tau
    soft = torch.sigmoid(a)
    return torch.where(a > 0, 1.0, 0.0) + soft - soft.detach()


PLANTED = {  # assignment -> [(mistake, module, attribute, wrong value)]
    1: [("modulate without the 1 + scale", dit, "modulate", lambda x, sh, sc: x * sc[:, None] + sh[:, None]),
        ("shift and scale swapped", dit, "modulate", lambda x, sh, sc: x * (1 + sh[:, None]) + sc[:, None]),
        ("attention branch without its gate", dit.DiTBlock, "forward", block_forward(None, "attn")),
        ("MLP branch gated by the attention's gate", dit.DiTBlock, "forward",
         block_forward(lambda m: m.gate_msa, "mlp")),
        ("MLP branch modulated with the attention's shift and scale", dit.DiTBlock, "forward",
         block_forward(lambda m: m.gate_mlp, "mlp", lambda m: (m.shift_msa, m.scale_msa))),
        ("the gate detached", dit.DiTBlock, "forward", block_forward(lambda m: m.gate_msa.detach(), "attn"))],
    2: [("a sign error on eps", dit, "ddim_step", ddim(sigma, lambda abp, s: -(1 - abp - s ** 2) ** 0.5)),
        ("missing square roots", dit, "ddim_step",
         lambda x0, e, ab, abp, eta=0.0, n=0: abp * x0 + (1 - abp) * e + eta * n),
        ("eta squared in sigma", dit, "ddim_step", ddim(lambda eta, ab, abp: eta * sigma(eta, ab, abp))),
        ("the eps coefficient ignores sigma", dit, "ddim_step", ddim(sigma, lambda abp, s: (1 - abp) ** 0.5)),
        ("the noise scaled by sigma^2", dit, "ddim_step", ddim(sigma, noise_coef=lambda s: s ** 2))],
    3: [("nats instead of bits", dit.Diffusion, "vb_terms", vb(bits=False)),
        ("KL(p || q) instead of KL(q || p)", dit.Diffusion, "vb_terms",
         vb(lambda qm, qv, m, v: (m, v, qm, qv))),
        ("x0 overwritten by the model's prediction", dit.Diffusion, "vb_terms", vb(x0_from_model=True)),
        ("the decoder term at i = 1 (the paper's t = 1 is i = 0)", dit.Diffusion, "vb_terms", vb(nll_at=1)),
        ("the decoder's log-scale taken as the log-variance", dit.Diffusion, "vb_terms", vb(log_scale=1.0)),
        ("a sum over the dimensions", dit.Diffusion, "vb_terms", vb(reduce="sum"))],
    4: [("no matrix square root", fid, "frechet_distance", fd(lambda a, b: a @ b)),
        ("an elementwise square root", fid, "frechet_distance", fd(lambda a, b: np.sqrt(np.abs(a @ b)))),
        ("sqrt(S1) sqrt(S2)", fid, "frechet_distance", fd(lambda a, b: linalg.sqrtm(a) @ linalg.sqrtm(b))),
        ("eigenvalues of S1 S2 from a symmetric solver", fid, "frechet_distance",
         fd(lambda a, b: np.sqrt(np.abs(np.linalg.eigvalsh(a @ b))).sum())),
        ("no eps retry when the root is not finite", fid, "frechet_distance",
         fd(lambda a, b: linalg.sqrtm(a @ b), safeguard=False)),
        ("a large imaginary part accepted", fid, "frechet_distance",
         fd(lambda a, b: linalg.sqrtm(a @ b), imag_check=False))],
    5: [("a LayerNorm per token instead of a standardisation per channel", distill, "distill_loss",
         feat_loss(lambda s, t: (F.layer_norm(s, s.shape[-1:]), F.layer_norm(t, t.shape[-1:])))),
        ("the student standardised with its own statistics", distill, "distill_loss",
         feat_loss(lambda s, t: (distill.standardise(s, s), distill.standardise(t, t)))),
        ("a sum over the links instead of a mean", distill, "distill_loss", feat_loss(reduce="sum")),
        ("statistics per sample (over the tokens only)", distill, "distill_loss", feat_loss(per_sample)),
        ("the student feature detached", distill, "distill_loss", feat_loss(detach=True)),
        ("the target of pair (i, j) taken from teacher block i", distill, "distill_loss",
         feat_loss(target_index=0)),
        ("the projector forgotten", distill, "distill_loss", feat_loss(project=False))],
    6: [("no straight-through gradient", prune, "st_gumbel_masks", nm(st="none")),
        ("a soft mask in the forward pass", prune, "st_gumbel_masks", nm(st="soft")),
        ("no Gumbel noise", prune, "st_gumbel_masks", nm(noise="none")),
        ("the logit scale forgotten", prune, "st_gumbel_masks", nm(scale_in=False)),
        ("tau dropped from the soft path", prune, "st_gumbel_masks", nm(tau_in=False)),
        ("the straight-through sign flipped", prune, "st_gumbel_masks", nm(st="flipped")),
        ("one noise draw shared by the batch", prune, "st_gumbel_masks", nm(shared=True))],
    7: [("1 + SSIM", prune, "dipgo_loss", dipgo(lambda x, r: 1 + prune.ssim(x, r))),
        ("the consistency detached", prune, "dipgo_loss", dipgo(lambda x, r: 1 - prune.ssim(x.detach(), r))),
        ("sparsity on the reuse probability", prune, "dipgo_loss", dipgo(which=0)),
        ("sparsity always on", prune, "dipgo_loss", dipgo(cond=lambda kept, r: True)),
        ("sparsity on at the boundary (>= instead of >)", prune, "dipgo_loss",
         dipgo(cond=lambda kept, r: kept >= 1 - r)),
        ("sparsity on the hard gates", prune, "dipgo_loss", dipgo(hard=True)),
        ("the cascade weights ignored", prune, "dipgo_loss", dipgo(weighted=False))],
    8: [("no straight-through gradient", dynamic, "gumbel_sigmoid", router(st="none")),
        ("no logistic noise", dynamic, "gumbel_sigmoid", router(noise=False)),
        ("tau dropped from the soft path", dynamic, "gumbel_sigmoid", router(tau_in=False)),
        ("the straight-through sign flipped", dynamic, "gumbel_sigmoid", router(st="flipped")),
        ("the threshold at 0 instead of 0.5 on the sigmoid", dynamic, "gumbel_sigmoid",
         router(threshold=0.0))],
    9: [("the mean of squared errors", dynamic, "flops_loss", lambda r, lam, w: w * ((r - lam) ** 2).mean()),
        ("the weight forgotten", dynamic, "flops_loss", lambda r, lam, w: (r.mean() - lam) ** 2),
        ("the absolute error", dynamic, "flops_loss", lambda r, lam, w: w * (r.mean() - lam).abs()),
        ("the sum over the batch", dynamic, "flops_loss", lambda r, lam, w: w * (r.sum() - lam) ** 2),
        ("the ratio detached", dynamic, "flops_loss", lambda r, lam, w: w * (r.detach().mean() - lam) ** 2)],
}
CORRECT = {  # assignment -> [(spelling, module, attribute, correct value)]
    1: [("addcmul", dit, "modulate",
         lambda x, sh, sc: torch.addcmul(sh.unsqueeze(1), x, 1 + sc.unsqueeze(1))),
        ("einsum", dit, "modulate", lambda x, sh, sc: x + torch.einsum("btd,bd->btd", x, sc) + sh[:, None]),
        ("six vectors unpacked by position, gate on the right", dit.DiTBlock, "forward", forward_unpacked)],
    2: [("the variance form", dit, "ddim_step",
         lambda x0, e, ab, abp, eta=0.0, n=0: abp ** 0.5 * x0
         + (1 - abp - sigma(eta, ab, abp) ** 2) ** 0.5 * e
         + (eta ** 2 * (1 - abp) / (1 - ab) * (1 - ab / abp)) ** 0.5 * n),
        ("math.sqrt", dit, "ddim_step", ddim(lambda eta, ab, abp: eta * math.sqrt((1 - abp) / (1 - ab))
                                             * math.sqrt(1 - ab / abp)))],
    3: [("as written", dit.Diffusion, "vb_terms", vb()),
        ("KL by hand", dit.Diffusion, "vb_terms",
         lambda self, out, x0, xt, i: reference_vb(self, out, x0, xt, i))],
    4: [("the symmetric sandwich", fid, "frechet_distance", fd(sandwich)),
        ("einsum and the product root", fid, "frechet_distance", fd(lambda a, b: linalg.sqrtm(np.einsum(
            "ij,jk->ik", a, b))))],
    5: [("channel by channel, population std", distill, "distill_loss", feat_loss(loop_standardised)),
        ("einsum statistics", distill, "distill_loss", feat_loss(einsum_standardised))],
    6: [("hard + soft - soft.detach()", prune, "st_gumbel_masks", nm(st="plus")),
        ("hard - soft.detach() + soft", prune, "st_gumbel_masks", nm(st="minus")),
        ("F.gumbel_softmax(hard=True)", prune, "st_gumbel_masks", builtin_gumbel)],
    7: [("torch.where", prune, "dipgo_loss", where_dipgo),
        ("a sigmoid of the logit difference", prune, "dipgo_loss", sigmoid_dipgo)],
    8: [("hard + soft - soft.detach()", dynamic, "gumbel_sigmoid", router(st="plus")),
        ("two Gumbels, threshold on the logit", dynamic, "gumbel_sigmoid", two_gumbels)],
    9: [("(mean of r - lambda)^2", dynamic, "flops_loss", lambda r, lam, w: w * (r - lam).mean().pow(2)),
        ("F.mse_loss of the mean", dynamic, "flops_loss",
         lambda r, lam, w: w * torch.nn.functional.mse_loss(r.mean(), torch.tensor(lam)))],
}
GRADERS = {1: grade_1, 2: grade_2, 3: grade_3, 4: grade_4, 5: grade_5, 6: grade_6, 7: grade_7, 8: grade_8,
           9: grade_9}
CASES = [(n, *case) for n, cases in PLANTED.items() for case in cases]
GOOD = [(n, *case) for n, cases in CORRECT.items() for case in cases]


@pytest.mark.parametrize("n,mistake,owner,name,wrong", CASES, ids=[f"{c[0]}: {c[1]}" for c in CASES])
def test_graders_reject_planted_wrong_answers(monkeypatch, n, mistake, owner, name, wrong):
    monkeypatch.setattr(owner, name, wrong)
    with pytest.raises(AssertionError):
        GRADERS[n]()


@pytest.mark.parametrize("n,spelling,owner,name,right", GOOD, ids=[f"{c[0]}: {c[1]}" for c in GOOD])
def test_graders_accept_correct_alternatives(monkeypatch, n, spelling, owner, name, right):
    monkeypatch.setattr(owner, name, right)
    GRADERS[n]()


def test_every_grader_has_four_planted_mistakes_and_two_correct_alternatives():
    assert all(len(PLANTED[n]) >= 4 and len(CORRECT[n]) >= 2 for n in GRADERS)
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
    assert sorted(found) == list(range(1, 10))
    handout.make_handout(str(tmp_path / "all"), None)
    failed, out = grade_tree(tmp_path / "all")
    assert failed == set(range(1, 10)), out[-3000:]
    handout.make_handout(str(tmp_path / "only3"), [3])
    failed, out = grade_tree(tmp_path / "only3")
    assert failed == {3} and "1 failed, 8 passed" in out, out[-3000:]
    for name in ("dit.py", "fid.py", "prune.py", "weights/dit_shapes.pt", "course/README.md"):
        a, b = open(os.path.join(root, name), "rb").read(), open(tmp_path / "all" / name, "rb").read()
        if name.endswith(".py"):
            drop = re.compile(rb"(# assignment \d+ begin: .*\n)(?:.*\n)*?(\s*# assignment \d+ end\n)")
            a = drop.sub(rb"\1\2", a)
            b = re.sub(rb'\s*raise NotImplementedError\("assignment \d+: see course/README.md"\)\n', b"\n", b)
            b = drop.sub(rb"\1\2", b)
        assert a == b, name
