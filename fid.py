"""
fid.py: one quality number for every tinydit model: the standard FID, or an honest offline stand-in.

Paper: "GANs Trained by a Two Time-Scale Update Rule Converge to a Local Nash Equilibrium", Heusel,
Ramsauer, Unterthiner, Nessler, Hochreiter, NeurIPS 2017, arXiv 1706.08500 (Sec. 3 / Eq. 6: FID). Fit a
Gaussian (mu, Sigma) to network features of real and of generated images; the score is the Frechet
distance between the two Gaussians. The network is the Inception-v3 graph of 2015-12-05 (Szegedy et al.,
arXiv 1512.00567) as ported by pytorch-fid (mseitzer/pytorch-fid), whose numbers the literature quotes.

    paper / reference -> here
    FID, Heusel et al. Eq. 6                          -> frechet_distance (scipy sqrtm, eps, imag check)
    Gaussian fit of the 2048-d pool3 features         -> gaussian_stats (float64)
    Inception-v3 "FID" variant (pytorch-fid)          -> FIDInception (Mixed_5b..7c pooling, 1008-way fc)
    pytorch-fid preprocessing                         -> inception_preprocess (bilinear 299, [-1, 1])
    offline metric (ours, [inferred] design)          -> Classifier, train_classifier: FD-clf, class acc
    the API every script scores its variants with     -> evaluate()

Which metric: "FID" when the Inception weights file is found (--inception-weights PATH, $TINYDIT_INCEPTION,
or ~/.cache/tinydit/); otherwise "FD-clf" ([inferred], ours, for offline machines): the same distance in the
128-d feature space of a small CNN trained once (deterministically, ~10-30 s) on the train split of the same
data set and cached under out/fid_cache/, plus that CNN's accuracy on class-conditional samples. FD-clf
ranks models of one data set; it is NOT comparable to published FIDs and never printed as "FID".

This file is also the measuring floor below the method scripts: the one interleaved sampling timer
(time_sampling), the heat-map picture (heatmap_png) and the quality-vs-latency Pareto plot (pareto_png).

Run:
    python fid.py --ckpt out/dit.pt              # 500 samples (50 DDIM, CFG 1.5) vs the train split
    python sample.py --ckpt ANY.pt --fid         # the same score for a checkpoint of any kind
    python fid.py data:test:500 data:train       # the real-data floor: 500 test images vs train
    python fid.py samples.npz ref_folder/        # folders of images | .npz (arr_0 uint8 NHWC) | stats .npz
    python fid.py --save-stats data:train out/shapes_stats.npz
    python fid.py --download                     # fetch the Inception weights once (online machines)
"""
import json
import math
import os
import statistics
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image, ImageDraw
from scipy import linalg
from tqdm import tqdm

import dit

# --- Config ---------------------------------------------------------------------------------------

INCEPTION_URL = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
                 "pt_inception-2015-12-05-6726825d.pth")
INCEPTION_SHA256 = "6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2"
INCEPTION_CACHE = os.path.join(os.path.expanduser("~"), ".cache", "tinydit", os.path.basename(INCEPTION_URL))
CLF_STEPS, CLF_BATCH, CLF_LR, CLF_WIDTH = 150, 64, 2e-3, 32  # the FD-clf classifier (part of its cache key)
IMAGE_EXTS = (".bmp", ".jpg", ".jpeg", ".pgm", ".png", ".ppm", ".tif", ".tiff", ".webp")


@dataclass
class FIDConfig:
    ckpt: str = ""                # score this checkpoint: generate --n samples vs the data set's train split
    save_stats: bool = False      # `fid.py --save-stats A out.npz`: write A's (mu, sigma) to out.npz
    download: bool = False        # fetch the Inception weights into ~/.cache/tinydit (sha256-checked) first
    metric: str = "auto"          # auto (FID when the weights are found, else FD-clf) | fid | clf
    inception_weights: str = ""   # pt_inception-2015-12-05-6726825d.pth ("" = $TINYDIT_INCEPTION, cache)
    data: str = ""                # data set of the reference / classifier; "" = the checkpoint's, else shapes
    data_dir: str = "data"        # where cifar10 / imagenet64 live
    image_size: int = 0           # >=0: classifier resolution; 0 = the model's (or the first input's)
    cache_dir: str = ""           # classifier + reference stats; "" = $TINYDIT_FID_CACHE or out/fid_cache
    n: int = 500                  # >=1: samples generated for --ckpt (labels cycle through the classes)
    steps: int = 50               # [1,1000]: sampling steps for --ckpt
    method: str = "ddim"          # ddim | ddpm
    cfg_scale: float = 1.5        # >=0: classifier-free guidance for --ckpt (DiT's FID setting)
    seed: int = 0                 # >=0: sampling noise; also the data:SPLIT:N subset
    batch_size: int = 100         # >=1: images per sampling / feature batch
    device: str = "auto"          # auto | cpu | cuda | mps


# --- Method: the Frechet distance between two Gaussians (Heusel et al. 2017, Eq. 6) ---------------

def gaussian_stats(feats):
    """(mu, Sigma) of (N, D) features, in float64; Sigma is the unbiased sample covariance."""
    feats = np.asarray(feats, dtype=np.float64)
    return feats.mean(axis=0), np.cov(feats, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
    """Frechet distance between N(mu1, S1) and N(mu2, S2), FID Heusel et al. Eq. 6, computed as pytorch-fid:
    scipy sqrtm of S1 S2; if that is not finite, add eps*I to both covariances; a complex result is accepted
    only when its diagonal is real to 1e-3 (else ValueError)."""
    mu1, mu2 = np.atleast_1d(mu1).astype(np.float64), np.atleast_1d(mu2).astype(np.float64)
    s1, s2 = np.atleast_2d(sigma1).astype(np.float64), np.atleast_2d(sigma2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape:
        raise ValueError(f"statistics of different dimensions: {mu1.shape} vs {mu2.shape}")
    # assignment 4 begin: the Frechet distance
    diff = mu1 - mu2
    covmean = linalg.sqrtm(s1 @ s2)
    if not np.isfinite(covmean).all():
        print(f"fid: S1 S2 is near-singular; adding {eps} to the covariance diagonals")
        offset = np.eye(s1.shape[0]) * eps
        covmean = linalg.sqrtm((s1 + offset) @ (s2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"sqrtm has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    # d^2 = |mu1 - mu2|^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^(1/2))
    return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    # assignment 4 end


# --- Method: the Inception-v3 FID network (state-dict names as torchvision / pt_inception-2015-12-05) ---

class BasicConv2d(nn.Module):
    """conv (no bias) -> BatchNorm(eps 1e-3) -> ReLU."""
    def __init__(self, cin, cout, kernel_size, stride=1, padding=0):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel_size, stride=stride, padding=padding, bias=False)
        self.bn = nn.BatchNorm2d(cout, eps=0.001)

    def forward(self, x):
        return F.relu(self.bn(self.conv(x)))


def avg_pool(x):
    """The FID graph's 3x3 average pool: padding not counted (TF 'SAME'), unlike torchvision."""
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)


class InceptionA(nn.Module):  # Mixed_5b..5d: 35x35
    def __init__(self, cin, pool_features):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 64, 1)
        self.branch5x5_1, self.branch5x5_2 = BasicConv2d(cin, 48, 1), BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(cin, pool_features, 1)

    def forward(self, x):
        return torch.cat([self.branch1x1(x), self.branch5x5_2(self.branch5x5_1(x)),
                          self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          self.branch_pool(avg_pool(x))], 1)


class InceptionB(nn.Module):  # Mixed_6a: 35x35 -> 17x17
    def __init__(self, cin):
        super().__init__()
        self.branch3x3 = BasicConv2d(cin, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(cin, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x):
        return torch.cat([self.branch3x3(x), self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x))),
                          F.max_pool2d(x, 3, stride=2)], 1)


class InceptionC(nn.Module):  # Mixed_6b..6e: 17x17, factorised 7x7
    def __init__(self, cin, c7):
        super().__init__()
        self.branch1x1 = BasicConv2d(cin, 192, 1)
        self.branch7x7_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7_3 = BasicConv2d(c7, 192, (7, 1), padding=(3, 0))
        self.branch7x7dbl_1 = BasicConv2d(cin, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, (1, 7), padding=(0, 3))
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, (7, 1), padding=(3, 0))
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, (1, 7), padding=(0, 3))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        d = x
        for k in range(1, 6):
            d = getattr(self, f"branch7x7dbl_{k}")(d)
        return torch.cat([self.branch1x1(x), b7, d, self.branch_pool(avg_pool(x))], 1)


class InceptionD(nn.Module):  # Mixed_7a: 17x17 -> 8x8
    def __init__(self, cin):
        super().__init__()
        self.branch3x3_1, self.branch3x3_2 = BasicConv2d(cin, 192, 1), BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(cin, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, (1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, (7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x):
        b7 = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([self.branch3x3_2(self.branch3x3_1(x)), b7, F.max_pool2d(x, 3, stride=2)], 1)


class InceptionE(nn.Module):  # Mixed_7b (avg pool, padding not counted) and Mixed_7c (max pool): 8x8
    def __init__(self, cin, max_pool):
        super().__init__()
        self.max_pool = max_pool
        self.branch1x1 = BasicConv2d(cin, 320, 1)
        self.branch3x3_1 = BasicConv2d(cin, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3_2b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch3x3dbl_1 = BasicConv2d(cin, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, (1, 3), padding=(0, 1))
        self.branch3x3dbl_3b = BasicConv2d(384, 384, (3, 1), padding=(1, 0))
        self.branch_pool = BasicConv2d(cin, 192, 1)

    def forward(self, x):
        a = self.branch3x3_1(x)
        d = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        pool = F.max_pool2d(x, 3, stride=1, padding=1) if self.max_pool else avg_pool(x)
        return torch.cat([self.branch1x1(x), self.branch3x3_2a(a), self.branch3x3_2b(a),
                          self.branch3x3dbl_3a(d), self.branch3x3dbl_3b(d), self.branch_pool(pool)], 1)


class FIDInception(nn.Module):
    """Inception-v3 as the TF FID graph (pytorch-fid's fid_inception_v3): torchvision names, no AuxLogits,
    a 1008-way fc (unused by FID, kept so the weights file loads strict). forward -> (B, 2048) pool3."""
    def __init__(self):
        super().__init__()
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.Mixed_5b, self.Mixed_5c = InceptionA(192, 32), InceptionA(256, 64)
        self.Mixed_5d = InceptionA(288, 64)
        self.Mixed_6a = InceptionB(288)
        self.Mixed_6b, self.Mixed_6c = InceptionC(768, 128), InceptionC(768, 160)
        self.Mixed_6d, self.Mixed_6e = InceptionC(768, 160), InceptionC(768, 192)
        self.Mixed_7a = InceptionD(768)
        self.Mixed_7b, self.Mixed_7c = InceptionE(1280, max_pool=False), InceptionE(2048, max_pool=True)
        self.fc = nn.Linear(2048, 1008)

    def forward(self, x):  # x: (B, 3, 299, 299) in [-1, 1]
        x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
        x = F.max_pool2d(x, 3, stride=2)  # (B, 64, 73, 73)
        x = F.max_pool2d(self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x)), 3, stride=2)  # (B, 192, 35, 35)
        for name in ["5b", "5c", "5d", "6a", "6b", "6c", "6d", "6e", "7a", "7b", "7c"]:
            x = getattr(self, "Mixed_" + name)(x)  # ... -> (B, 2048, 8, 8)
        return x.mean(dim=(2, 3))  # (B, 2048)


def inception_preprocess(images):
    """uint8 (B, 3, H, W) -> float (B, 3, 299, 299) in [-1, 1], as pytorch-fid: [0, 1], bilinear resize
    with align_corners=False (no antialias), then 2x - 1."""
    x = images.float() / 255
    x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
    return 2 * x - 1


def find_inception_weights(path=""):
    """The weights file: `path`, else $TINYDIT_INCEPTION, else the cache file; None when none exists."""
    for p in (path, os.environ.get("TINYDIT_INCEPTION", ""), INCEPTION_CACHE):
        if p and os.path.exists(p):
            return p
    if path:
        sys.exit(f"error: --inception-weights {path} does not exist")
    return None


def download_inception(dest=INCEPTION_CACHE):
    """Fetch the pytorch-fid release file (sha256-checked, dit.download)."""
    return dit.download(INCEPTION_URL, dest, ("sha256", INCEPTION_SHA256))


def load_inception(path, device="cpu"):
    """FIDInception with the file's weights: torch.load(weights_only=True) reads the legacy (non-zip)
    format too; strict=True so a wrong file fails loudly."""
    model = FIDInception()
    try:
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    except Exception as e:  # not a torch file, or not the FID Inception's weights
        why = " ".join(str(e).split())[:160]  # one line: load_state_dict lists the keys over several
        sys.exit(f"error: {path} is not the FID Inception weights ({type(e).__name__}: {why}); get "
                 f"{INCEPTION_URL}")
    return model.to(device).eval()


# --- Method: the offline metric's classifier ([inferred]: our design, not from a paper) -----------

class Classifier(nn.Module):
    """A small CNN: three stride-2 conv-BN-ReLU stages (w, 2w, 4w channels), global average pool -> 4w-d
    features -> linear class logits. ~5 MFLOPs per 32x32 image; works at any resolution >= 8."""
    def __init__(self, num_classes, width=CLF_WIDTH):
        super().__init__()
        w = width

        def stage(cin, cout):
            return [nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        self.features = nn.Sequential(*stage(3, w), *stage(w, 2 * w), *stage(2 * w, 4 * w),
                                      nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x, features=False):  # x: (B, 3, S, S) in [-1, 1]
        f = self.features(x)  # (B, 4w)
        return f if features else self.fc(f)


def train_classifier(images, labels, num_classes, steps=None, batch_size=CLF_BATCH, lr=CLF_LR, seed=0):
    """Adam on cross-entropy, cosine lr decay, a fixed number of steps, on one CPU thread from fixed
    seeds: the same data gives the same classifier on any machine (one thread = one reduction order;
    it is also the fastest for convs this small when other processes share the cores)."""
    steps = steps or CLF_STEPS
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.random.fork_rng():
            torch.manual_seed(dit.seed_of(seed))
            model = Classifier(num_classes)
            opt = torch.optim.Adam(model.parameters(), lr=lr)
            it = dit.batches(images, labels, batch_size, seed)
            model.train()
            for step in range(steps):
                xb, yb = next(it)
                for g in opt.param_groups:  # lr_k = lr * (1 + cos(pi k / steps)) / 2
                    g["lr"] = lr * 0.5 * (1 + np.cos(np.pi * step / steps))
                loss = F.cross_entropy(model(xb), yb)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


# --- Apply: features, cached classifier / reference statistics ------------------------------------

@torch.no_grad()
def extract(net, images, batch_size=100, device="cpu", verbose=False):
    """Run net over uint8 images in batches on `device` -> float64 numpy features (N, D)."""
    t0, out = time.perf_counter(), []
    for k in tqdm(range(0, len(images), batch_size), disable=not verbose, desc="features", leave=False):
        out.append(net(images[k:k + batch_size].to(device)).double().cpu())
    feats = torch.cat(out).numpy()
    if verbose:
        rate = len(feats) / (time.perf_counter() - t0)
        print(f"fid: {len(feats)} x {feats.shape[1]}-d features at {rate:.0f} images/s")
    return feats


def resize_uint8(images, size):
    """uint8 (N, 3, H, W) -> (N, 3, size, size): area when shrinking (as dit.load_data), else bilinear."""
    if images.shape[-1] == size:
        return images
    mode = dict(mode="area") if images.shape[-1] > size else dict(mode="bilinear", align_corners=False)
    return F.interpolate(images.float(), size=(size, size), **mode).round().clamp(0, 255).to(torch.uint8)


def get_scorer(metric="auto", data="shapes", data_dir="data", image_size=32, device="cpu", cache_dir="",
               inception_weights=""):
    """The feature network for `metric`: dict(metric, key (what the statistics depend on), net (uint8
    images -> features), clf (FD-clf: the classifier, whose .fc turns features into logits), ref (the
    cache file of the reference statistics)). Trains and caches the FD-clf classifier on first use."""
    cache_dir = cache_dir or os.environ.get("TINYDIT_FID_CACHE", os.path.join("out", "fid_cache"))
    folder = os.path.basename(os.path.normpath(data_dir))
    tag = f"{data}-{image_size}" if data == "shapes" else f"{data}-{folder}-{image_size}"
    weights = find_inception_weights(inception_weights) if metric in ("auto", "fid") else None
    if metric == "fid" and weights is None:  # asked for FID explicitly: fetch the weights (online machines)
        weights = download_inception()
    if metric == "fid" and weights is None:
        sys.exit(f"error: --metric fid needs the Inception weights; offline? get {INCEPTION_URL} "
                 f"and pass --inception-weights PATH")
    if weights is not None:
        print(f"fid: metric FID (Inception-v3 pool3 features, {weights})")
        inception = load_inception(weights, device)
        return dict(metric="FID", key="FID", clf=None, ref=os.path.join(cache_dir, f"ref_FID_{tag}.npz"),
                    net=lambda imgs: inception(inception_preprocess(imgs)))
    if metric not in ("auto", "clf"):
        sys.exit(f"error: --metric must be auto, fid or clf, not {metric!r}")
    name = f"{tag}_s{CLF_STEPS}w{CLF_WIDTH}"
    path = os.path.join(cache_dir, f"clf_{name}.pt")
    if os.path.exists(path):
        ck = torch.load(path, map_location="cpu", weights_only=True)
        clf = Classifier(ck["num_classes"])
        clf.load_state_dict(ck["model"])
    else:
        t0 = time.perf_counter()
        x, y, nc = dit.load_data(data, data_dir, image_size)
        clf = train_classifier(x, y, nc)
        xt, yt, _ = dit.load_data(data, data_dir, image_size, train=False)
        with torch.no_grad():
            acc = float((clf(dit.to_float(xt[:2000])).argmax(1) == yt[:2000]).float().mean())
        dit.save_checkpoint(dict(model=clf.state_dict(), num_classes=nc, test_acc=acc), path)
        print(f"fid: trained the FD-clf classifier in {time.perf_counter() - t0:.1f} s (test acc {acc:.3f})")
    print(f"fid: metric FD-clf (no Inception weights found; NOT comparable to published FIDs; {path})")
    clf = clf.eval().to(device)
    return dict(metric="FD-clf", key=f"FD-clf/{tag}", clf=clf, ref=os.path.join(cache_dir, f"ref_{name}.npz"),
                net=lambda imgs: clf(dit.to_float(resize_uint8(imgs, image_size)), features=True))


def reference_stats(scorer, data="shapes", data_dir="data", image_size=32, batch_size=100, device="cpu",
                    verbose=True):
    """(mu, sigma) of the whole train split of the data set in the scorer's feature space, cached."""
    if os.path.exists(scorer["ref"]):
        d = np.load(scorer["ref"])
        return d["mu"], d["sigma"]
    x, _, _ = dit.load_data(data, data_dir, image_size)
    mu, sigma = gaussian_stats(extract(scorer["net"], x, batch_size, device, verbose))
    os.makedirs(os.path.dirname(scorer["ref"]) or ".", exist_ok=True)
    np.savez(scorer["ref"], mu=mu, sigma=sigma, metric=scorer["key"])
    return mu, sigma


# --- Evaluate: the API every script scores its variants with --------------------------------------

def evaluate(model, data="shapes", data_dir="data", image_size=32, n=500, steps=50, method="ddim",
             cfg_scale=1.5, seed=0, batch_size=100, device=None, cache_dir="", metric="auto", verbose=False):
    """Score a model: n class-conditional samples (labels arange(n) % num_classes, noise from `seed`, via
    sample.generate, so every variant sees the same noise) against the data set's train split.
    Returns dict(metric="FID" | "FD-clf", score (lower is better), acc (FD-clf: classifier accuracy on
    the samples w.r.t. the asked labels; None for FID), n)."""
    device = torch.device(device) if device is not None else next(model.parameters()).device
    if model.input_size != image_size:
        print(f"fid: the model makes {model.input_size}px images; scoring at that size, not {image_size}")
        image_size = model.input_size
    scorer = get_scorer(metric, data, data_dir, image_size, device, cache_dir)
    mu_r, sigma_r = reference_stats(scorer, data, data_dir, image_size, batch_size, device, verbose)
    labels = torch.arange(n) % model.num_classes
    imgs = dit.generate(model, labels, seed, steps, method, 0.0, cfg_scale, batch_size, progress=verbose)
    feats = extract(scorer["net"], imgs, batch_size, device, verbose)
    acc = None
    if scorer["clf"] is not None:
        with torch.no_grad():
            logits = scorer["clf"].fc(torch.from_numpy(feats).float().to(device))
        acc = float((logits.argmax(1).cpu() == labels).float().mean())
    score = frechet_distance(*gaussian_stats(feats), mu_r, sigma_r)
    return dict(metric=scorer["metric"], score=score, acc=acc, n=n)


def load_images(source, data, data_dir, image_size, seed):
    """uint8 (N, 3, H, W) from a folder of images, an .npz with arr_0 (N, H, W, 3) uint8, or
    `data:SPLIT[:N]` (the --data set's train/test split, N random images of it)."""
    if source.startswith("data:"):
        parts = source.split(":")
        if parts[1] not in ("train", "test") or len(parts) > 3 or not all(p.isdigit() for p in parts[2:]):
            sys.exit(f"error: {source}: write data:train, data:test or data:SPLIT:N (N a count)")
        size = image_size or (64 if data == "imagenet64" else 32)
        x, _, _ = dit.load_data(data, data_dir, size, train=parts[1] == "train")
        if len(parts) > 2:
            x = x[torch.randperm(len(x), generator=dit.rng(seed))[:int(parts[2])]]
        return x
    if os.path.isdir(source):
        files = sorted(f for f in os.listdir(source) if f.lower().endswith(IMAGE_EXTS))
        if not files:
            sys.exit(f"error: no images in {source}")
        arr = [read_image(os.path.join(source, f)) for f in files]
        if len({a.shape for a in arr}) > 1:
            sys.exit(f"error: the images in {source} differ in size: {sorted({a.shape for a in arr})}")
        arr = np.stack(arr)
    elif source.endswith(".npz"):
        arr = dit.npz_arrays(source, ("arr_0",))["arr_0"]
    else:
        sys.exit(f"error: {source} is not a folder, an .npz or data:SPLIT")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or not len(arr):
        sys.exit(f"error: {source}: arr_0 must hold uint8 RGB images (N, H, W, 3) in 0..255, not "
                 f"{arr.dtype} {arr.shape}")
    return torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)


def read_image(path):
    """One RGB image file as uint8 (H, W, 3); one error line when it is not a readable image."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))
    except (OSError, ValueError) as e:
        sys.exit(f"error: {path} is not a readable image ({type(e).__name__}: {str(e)[:80]})")


def load_input(path, data, data_dir, image_size, seed):
    """An input of `fid.py A B`, checked before any work: a --save-stats .npz -> (mu, sigma, metric), with mu
    finite (D,) and sigma finite (D, D); else images (load_images)."""
    d = dit.npz_arrays(path, (), ("mu", "sigma", "metric")) if path.endswith(".npz") else {}
    if "mu" not in d:
        return load_images(path, data, data_dir, image_size, seed)
    mu, sigma = d["mu"], d.get("sigma", np.zeros(0))
    finite = np.isfinite(mu).all() and np.isfinite(sigma).all()
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not finite:
        sys.exit(f"error: {path}: mu must be finite (D,), sigma finite (D, D); not {mu.shape}, {sigma.shape}")
    return mu, sigma, str(d["metric"]) if "metric" in d else "?"


# --- Measure: the one sampling timer and the pictures every script shares -------------------------

def timeit(fn, device, reps=10, warmup=2):
    """Seconds for `reps` calls of fn after `warmup` calls (synchronised on CUDA)."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(reps):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t


@torch.no_grad()
def time_sampling(models, batch, steps, cfg_scale=1.5, reps=3, warmup=1, seed=0, dtype="float32"):
    """Seconds per generation of `batch` images for every model of {name: model}, interleaved: each round
    runs every model once (a, b, c, a, b, c, ...) so machine noise hits them alike; the first `warmup`
    rounds (compilation, caches) are dropped. steps: one DDIM step count or {name: steps}; a one-step
    model makes one call. Returns {name: [seconds of each timed round]}: report the median or the min."""
    times = {name: [] for name in models}
    for r in range(warmup + reps):
        for name, m in models.items():
            device, k = next(m.parameters()).device, steps[name] if isinstance(steps, dict) else steps
            z = torch.randn(batch, m.in_channels, m.input_size, m.input_size,
                            generator=dit.rng(seed, "eval")).to(device)
            y = (torch.arange(batch) % m.num_classes).to(device)
            with dit.autocast(device, dtype):
                s = timeit(lambda: dit.run_sampler(m, z, y, k, cfg_scale), device, 1, 0)
            if r >= warmup:
                times[name].append(s)
    return times


def sampler_gflops(model, steps, cfg_scale=1.5, seed=0):
    """GFLOPs to generate one image: dit.count_flops over the whole sampler (every step, both CFG halves,
    cache hits and slices included; one call for a one-step model), from seeded noise (SDT masks see it)."""
    device = next(model.parameters()).device
    z = torch.randn(1, model.in_channels, model.input_size, model.input_size,
                    generator=dit.rng(seed, "eval")).to(device)
    y = torch.zeros(1, dtype=torch.long, device=device)
    return dit.count_flops(lambda: dit.run_sampler(model, z, y, steps, cfg_scale)) / 1e9


def heat(a, cell):
    """(R, C) values in [0, 1] -> a uint8 (3, R cell, C cell) grey picture, white = 1."""
    img = (a.float().clamp(0, 1) * 255).round().to(torch.uint8).repeat_interleave(cell, 0)
    return img.repeat_interleave(cell, 1).expand(3, -1, -1)


def heatmap_png(a, path, cell=12, row_labels=None, bar=""):
    """(R, C) values in [0, 1] -> PNG (white = 1, black = 0), with a text label left of each row and, when
    `bar` names the value, a colour bar below it (0, 0.5, 1)."""
    img = Image.fromarray(heat(a, cell).permute(1, 2, 0).contiguous().numpy())
    left = 7 * max(len(s) for s in row_labels) + 8 if row_labels else 0
    canvas = Image.new("RGB", (max(img.width + left, 140 + 6 * len(bar) if bar else 0),
                               img.height + (44 if bar else 0)), "white")
    canvas.paste(img, (left, 0))
    draw = ImageDraw.Draw(canvas)
    for r, s in enumerate(row_labels or []):
        draw.text((4, r * cell + (cell - 10) // 2), s, fill="black")
    if bar:  # a 0 -> 1 ramp, its ends and middle labelled, and what the value means
        y = img.height + 6
        ramp = heat(torch.linspace(0, 1, 120)[None], 1)[:, :, :].repeat_interleave(10, 1)
        canvas.paste(Image.fromarray(ramp.permute(1, 2, 0).contiguous().numpy()), (8, y))
        draw.rectangle([7, y - 1, 128, y + 10], outline="black")
        for v, dx in ((0, 0), (0.5, 54), (1, 114)):
            draw.text((8 + dx, y + 13), f"{v:g}", fill="black")
        draw.text((136, y), bar, fill="black")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    canvas.save(path)


def nice_ticks(lo, hi, log=False):
    """Round tick values in [lo, hi]: 1-2-5 per decade on a log axis, else steps of 1, 2 or 5 x 10^k."""
    if log:  # 1-2-5, or every integer multiple when that leaves fewer than 4 ticks
        ticks = [[d * 10.0 ** k for k in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)
                  for d in ds if lo <= d * 10.0 ** k <= hi] for ds in ((1, 2, 5), range(1, 10))]
        return ticks[0] if len(ticks[0]) >= 4 else ticks[1]
    step = 10 ** math.floor(math.log10((hi - lo) / 5))
    step *= next(f for f in (1, 2, 5, 10) if (hi - lo) / (step * f) <= 8)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def axes(d, xs, ys, size, m, ylog=False):
    """A frame with a log x axis and a linear (ylog: log) y axis around the values, round ticks; returns
    X(v), Y(v)."""
    (W, H), x0, x1 = size, min(xs) / 1.3, max(xs) * 1.3
    pad = 0.1 * (max(ys) - min(ys)) + 1e-3
    y0, y1 = max(0.0, min(ys) - pad), max(ys) + pad
    if ylog:  # values spanning decades; a bar's lower end below 0 is cut at the axis
        y0, y1 = min(v for v in ys if v > 0) / 1.2, max(ys) * 1.2
    X = lambda v: m + math.log(max(v, 1e-6) / x0) / math.log(x1 / x0) * (W - 1.5 * m)  # noqa: E731
    Y = ((lambda v: H - m - math.log(max(v, y0) / y0) / math.log(y1 / y0) * (H - 1.5 * m)) if ylog
         else (lambda v: H - m - (v - y0) / (y1 - y0) * (H - 1.5 * m)))
    for xv in nice_ticks(x0, x1, log=True):
        d.line([(X(xv), H - m), (X(xv), H - m + 4)], fill="black")
        d.text((X(xv) - 8, H - m + 8), f"{xv:g}", fill="black")
    for yv in nice_ticks(y0, y1, log=ylog):
        d.line([(m - 4, Y(yv)), (m, Y(yv))], fill="black")
        d.text((m - 8 - 6 * len(f"{yv:g}"), Y(yv) - 6), f"{yv:g}", fill="black")
    return X, Y


def frame(size, m, xlabel, title, right=0):
    """A white canvas with the plot's box, the x axis title and the title above, `right` more pixels on
    the right (a legend): (image, draw)."""
    (W, H), img = size, Image.new("RGB", (size[0] + right, size[1]), "white")
    d = ImageDraw.Draw(img)
    d.rectangle([m, m // 2, W - m // 2, H - m], outline="black")
    d.text((W // 2 - 90, H - m + 28), xlabel + " (log scale)", fill="black")
    d.text((8, m // 2 - 25), title, fill="black")
    return img, d


def curves_png(series, path, xlabel, ylabel="FD-clf (lower is better)", size=(760, 500), m=70, ylog=False):
    """Quality against training on a log x axis: per label {label: [(x, mean, sd)]} a line through the
    means, a bar of +- 1 sd at each point (series nudged apart by a few pixels), a legend right of the box."""
    img, d = frame(size, m, xlabel, ylabel + (" (log scale)" if ylog else "") +
                   "  vs  training;  bars: +- 1 sd over seeds", right=6 * max(map(len, series)) + 16)
    pts = [p for s in series.values() for p in s]
    # the axis spans every bar; on a log axis a bar longer than half its mean runs off the bottom
    ys = [v for _, y, sd in pts for v in (max(y - sd, y / 2) if ylog else y - sd, y + sd)]
    X, Y = axes(d, [p[0] for p in pts], ys, size, m, ylog)
    colours = [(0, 70, 200), (200, 0, 0), (0, 140, 0), (150, 0, 150), (200, 120, 0), (0, 150, 150),
               (110, 110, 110), (120, 60, 0), (0, 0, 0), (230, 60, 150)]
    for k, (label, s) in enumerate(series.items()):
        c, dx = colours[k % len(colours)], 4 * k - 2 * (len(series) - 1)
        d.line([(X(x) + dx, Y(y)) for x, y, _ in s], fill=c, width=2)
        for x, y, sd in s:
            d.line([(X(x) + dx, Y(y - sd)), (X(x) + dx, Y(y + sd))], fill=c)
            d.ellipse([X(x) + dx - 3, Y(y) - 3, X(x) + dx + 3, Y(y) + 3], fill=c)
        d.text((size[0] - m // 2 + 10, m // 2 + 8 + 14 * k), label, fill=c)  # the legend, right of the box
    img.save(path)


def pool_curves(folder, name, evals, heads=("run", "steps"), extra=(), xlabel="training steps"):
    """Keep one run's quality-during-training points (evals: [{step, score, acc, train_s, *extra}]) as
    <folder>/<name>.json, name = <series>_seed<S>; then one table over every run kept there (per series and
    step: each seed's score, mean +- sd, the means of the other fields) and <folder>/curves.png."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, name + ".json"), "w") as f:
        json.dump(evals, f)
    runs, rows, series = {}, [], {}
    for fname in sorted(n for n in os.listdir(folder) if n.endswith(".json")):
        label, seed = fname[:-5].rsplit("_seed", 1)
        with open(os.path.join(folder, fname)) as f:
            runs.setdefault(label, {})[int(seed)] = {e["step"]: e for e in json.load(f)}
    for label, by_seed in runs.items():
        for step in sorted(set.intersection(*(set(ev) for ev in by_seed.values()))):
            got = [ev[step] for ev in by_seed.values()]
            sc = [e["score"] for e in got]
            mean, sd = statistics.mean(sc), statistics.stdev(sc) if len(sc) > 1 else 0.0
            series.setdefault(f"{label} ({len(sc)} seeds)", []).append((step, mean, sd))
            row = {heads[0]: label, heads[1]: step, "seeds": ", ".join(map(str, by_seed)),
                   "FD-clf per seed": " / ".join(f"{v:.2f}" for v in sc),
                   "mean ± sd": f"{mean:.2f} ± {sd:.2f}"}
            for key, head, form in (("acc", "class acc", ".3f"), *extra, ("train_s", "train s", ".0f")):
                vals = [e.get(key) for e in got]  # FID: no classifier, no accuracy
                row[head + " (mean)"] = "-" if None in vals else f"{statistics.mean(vals):{form}}"
            rows.append(row)
    png, means = os.path.join(folder, "curves.png"), [p[1] for pts in series.values() for p in pts]
    curves_png(series, png, xlabel, ylog=max(means) > 5 * min(means))  # log y when the means span > 5x
    return rows, png


def pareto_png(points, path, xlabel, ylabel="FD-clf (lower is better)", size=(760, 500), m=70):
    """Quality (lower is better) vs latency on a log axis with round ticks, one labelled dot per (latency,
    quality, label), the Pareto front (points no faster point beats on quality) joined in red. Every label
    is drawn, beside its dot where it fits, else moved up, with a grey line to its dot. PNG via pillow."""
    (W, H) = size
    img, d = frame(size, m, xlabel, ylabel + "  vs  latency;  red: the Pareto front")
    if not points:
        d.text((W // 2 - 60, H // 2), "no quality scores", fill="black")
        return img.save(path)
    X, Y = axes(d, [max(p[0], 1e-6) for p in points], [p[1] for p in points], size, m)
    front, best = [], float("inf")
    for p in sorted(points):
        if p[1] < best:
            front.append(p)
            best = p[1]
    if len(front) > 1:
        d.line([(X(p[0]), Y(p[1])) for p in front], fill=(200, 0, 0), width=2)
    r = 10  # a label keeps this far from every other dot
    boxes = [(X(x) - r, Y(y) - r, X(x) + r, Y(y) + r) for x, y, _ in points]  # the dots, then the labels
    for x, y, label in front + [p for p in points if p not in front]:
        colour = (200, 0, 0) if (x, y, label) in front else (0, 70, 200)
        d.ellipse([X(x) - 4, Y(y) - 4, X(x) + 4, Y(y) + 4], fill=colour)
        w, px, py = 6 * len(label), X(x), Y(y)
        spots = [(px + 7, py - 12), (px + 7, py + 1), (px - 7 - w, py - 12), (px - 7 - w, py + 1)]
        spots += [(x0, py - 12 - 14 * k * s) for k in range(1, 12) for s in (1, -1)  # then up / down
                  for x0 in (px + 7, px - 7 - w)]
        own = boxes[points.index((x, y, label))]
        free = lambda a, b: not any(a < c[2] and c[0] < a + w and b < c[3] and c[1] < b + 11  # noqa: E731
                                    for c in boxes if c is not own)
        inside = lambda a, b: m < a and a + w < W - m // 2 and m // 2 < b and b + 11 < H - m  # noqa: E731
        bx, by = next((s for s in spots if free(*s) and inside(*s)), spots[0])
        d.line([(px, py), (bx if bx > px else bx + w, by + 6)], fill=(160, 160, 160))  # dot -> its label
        d.text((bx, by), label, fill="black")
        boxes.append((bx, by, bx + w, by + 11))
    img.save(path)


def main(argv=None):
    cfg, paths = dit.parse_args(FIDConfig, argv, paths=True)
    dit.check(cfg, dict(metric=("auto", "fid", "clf"), method=("ddim", "ddpm")))
    device = dit.pick_device(cfg.device)
    if cfg.download and find_inception_weights(cfg.inception_weights) is None:
        download_inception()
    rows = []
    if cfg.ckpt:  # kind "dit" here (fid.py sits below the method scripts); any kind: sample.py --fid
        ck = dit.load_checkpoint(cfg.ckpt)
        if ck["kind"] != "dit":
            sys.exit(f"error: {cfg.ckpt} holds a {ck['kind']!r} model; score it with python sample.py "
                     f"--ckpt {cfg.ckpt} --fid")
        model = dit.build_dit(ck).to(device)
        tc = ck.get("train_config", {})
        data = cfg.data or tc.get("data", "shapes")
        data_dir = cfg.data_dir if cfg.data else tc.get("data_dir", cfg.data_dir)
        t0 = time.perf_counter()
        r = evaluate(model, data, data_dir, model.input_size, cfg.n, cfg.steps, cfg.method, cfg.cfg_scale,
                     cfg.seed, cfg.batch_size, device, cfg.cache_dir, cfg.metric, verbose=True)
        rows.append({"A": cfg.ckpt, "B": f"{data} train", "metric": r["metric"], "score": f"{r['score']:.3f}",
                     "class acc": "-" if r["acc"] is None else f"{r['acc']:.3f}", "n": r["n"],
                     "sampler": f"{cfg.steps} {cfg.method}, cfg {cfg.cfg_scale}",
                     "wall": f"{time.perf_counter() - t0:.0f} s"})
    else:
        if len(paths) != 2:
            sys.exit("error: give two inputs (A B), or --save-stats A OUT.npz, or --ckpt PATH")
        data = cfg.data or "shapes"
        if cfg.save_stats:
            dit.check_writable(paths[1], flag="--save-stats's OUT")
        inputs = [load_input(p, data, cfg.data_dir, cfg.image_size, cfg.seed)  # all checked before any work
                  for p in (paths[:1] if cfg.save_stats else paths)]
        stats, scorer = [], None
        for imgs in inputs:
            if isinstance(imgs, tuple):  # a stats file
                stats.append(imgs + ("stats",))
                continue
            if scorer is None:
                scorer = get_scorer(cfg.metric, data, cfg.data_dir, cfg.image_size or imgs.shape[-1], device,
                                    cfg.cache_dir, cfg.inception_weights)
            mu, sigma = gaussian_stats(extract(scorer["net"], imgs, cfg.batch_size, device, verbose=True))
            stats.append((mu, sigma, scorer["key"], len(imgs)))
        if cfg.save_stats:
            mu, sigma, key, n = stats[0]
            with open(paths[1] + ".tmp", "wb") as f:  # written whole, then renamed: never half a file
                np.savez(f, mu=mu, sigma=sigma, metric=key)
            os.replace(paths[1] + ".tmp", paths[1])
            return print(f"fid: wrote {key} statistics of {n} images of {paths[0]} to {paths[1]}")
        if "?" not in (stats[0][2], stats[1][2]) and stats[0][2] != stats[1][2]:
            sys.exit(f"error: the inputs were featurised differently ({stats[0][2]} vs {stats[1][2]})")
        score = frechet_distance(stats[0][0], stats[0][1], stats[1][0], stats[1][1])
        rows.append({"A": paths[0], "B": paths[1], "metric": stats[0][2].split("/")[0],
                     "score": f"{score:.3f}", "n A": stats[0][3], "n B": stats[1][3]})
    print("\n" + dit.run_header(device, "float32", cfg.batch_size, cfg.seed))
    print(dit.markdown_table(rows))


if __name__ == "__main__":
    main()
