"""
jetson_bench.py: every tinydit variant measured side by side: size, FLOPs, latency, memory and quality.

Context: "Designing Parameter and Compute Efficient Diffusion Transformers using Distillation" (Sundaresha
2025, arXiv 2502.14226) reports its students on a Jetson Orin Nano with torch.compile and FP16. The other
three papers (TinyFusion arXiv 2412.01199, DiP-GO arXiv 2410.16942, DyDiT arXiv 2410.03456) each report
only their own axis. This script puts every checkpoint the repository writes into ONE table and ONE
quality-vs-latency Pareto plot, on whatever device it runs on (an Orin, a desktop GPU, a laptop CPU).

What is measured, per checkpoint (any kind sample.load_model knows: dit, student, dipgo, dydit):
    params                       dit.param_count
    GFLOPs/img                   torch.utils.flop_counter (dit.count_flops) over the WHOLE sampler for one
                                 image: every step, CFG pair, DiP-GO cache hit and DyDiT slice as it runs
                                 (SDPA on its math backend while counting: the fused kernels are uncounted)
    calls/img, GFLOPs/call       network calls per image (one-step student: 1; diffusion: --steps, a DiP-GO
                                 plan: its own K); a call under CFG carries the cond + uncond rows (NFE = 2x)
    ms/call p50/p90              each network call timed inside real sampling (CUDA events on GPU)
    ms/img p50/p90, img/s        whole generations at batch 1 and at --batch; warm-up runs excluded
    peak MB                      CUDA: torch.cuda.max_memory_allocated at --batch; CPU: n/a (not measured)
    quality                      fid.evaluate with one shared setting (--n, --steps, --cfg-scale, --seed)
Stacking (--stack): a DiP-GO plan learned on each TinyFusion-pruned DiT (prune.learn_scores +
postprocess). (The student + DyDiT stack, for multi-step students only, left with the multi-step student; a
one-step student has no timestep input, so DyDiT's timestep-wise width has nothing to route on.)

Choices here ([inferred], no paper specifies them): per-call latency is the median over all calls of a
trajectory (DyDiT and DiP-GO calls differ in cost by step); quality is always scored in float32 eager.

Run:
    python jetson_bench.py                                  # weights/ + every checkpoint under out/
    python jetson_bench.py out/dit.pt out/prune/dipgo_r0.5.pt --no-quality --reps 3
    python jetson_bench.py --stack                          # build the stacked variants first
    python jetson_bench.py --device cuda --compile --dtype float16   # the GPU table (eager + compile rows)
    python jetson_bench.py --peak                           # train / forward / sampling speed vs matmul peak
Writes out/bench/bench.md, bench.csv, bench.json, pareto.png and samples.png (one row per model, same noise).
Measured tables: docs/jetson_bench.md.
"""
import csv
import glob
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn

import dit
import fid
import prune
import sample

# --- Config ---------------------------------------------------------------------------------------

KINDS = ("dit", "student", "dipgo", "dydit")


@dataclass
class BenchConfig:
    out: str = "out/bench"        # folder for bench.md / .csv / .json, pareto.png and stacked checkpoints
    steps: int = 20               # [1,1000]: DDIM steps of each diffusion model (a DiP-GO plan keeps its K)
    cfg_scale: float = 1.5        # >=0: classifier-free guidance for timing, FLOPs and quality (fid default)
    batch: int = 64               # >=1: throughput batch (batch 1 is always measured too)
    reps: int = 5                 # >=1: timed generations per (model, batch) after the warm-up
    warmup: int = 1               # >=0: untimed generations first (torch.compile traces here)
    compile: bool = False         # also time a torch.compile'd copy (rows "compile" beside "eager")
    dtype: str = "float32"        # float32 | float16 | bfloat16 (autocast); on CPU only when asked
    device: str = "auto"          # auto | cpu | cuda | mps
    quality: bool = True          # score with fid.evaluate (--no-quality skips it)
    n: int = 100                  # >=1: samples per quality score (shared by every model)
    data: str = "shapes"          # data set of the quality metric
    data_dir: str = "data"        # where cifar10 / imagenet64 live
    seed: int = 0                 # >=0: noise of the timed inputs and of the quality samples
    stack: bool = False           # first build the stacked variants (TinyFusion + DiP-GO)
    stack_ratio: float = 0.5      # (0,1): DiP-GO reuse ratio for the stacked plan
    stack_steps: int = 30         # >=1: DiP-GO pruner steps of the stack (prune.py's default recipe)
    peak: bool = False            # only time a fresh --preset DiT (train, forward, sampling) vs matmul peak
    preset: str = "cpu"           # model size for --peak (dit.PRESETS)


# --- Method: one generation, timed per call -------------------------------------------------------

class Timed(nn.Module):
    """Wraps a model so that every network call the sampler makes is timed (CUDA events on GPU, else
    perf_counter). `fn` is what actually runs (the model, or its torch.compile'd copy)."""
    def __init__(self, model, fn=None):
        super().__init__()
        # not `fn or model`: a torch.compile'd module has no len(), so its truth value raises
        self.inner, self.fn, self.marks = model, model if fn is None else fn, []
        dit.samples_like(self, model)

    def forward(self, *args):
        self.marks.append(clock(args[0].device))
        out = self.fn(*args)
        self.marks.append(clock(args[0].device))
        return out

    def call_ms(self):
        return [elapsed_ms(a, b) for a, b in zip(self.marks[::2], self.marks[1::2])]


def clock(device):
    if device.type == "cuda":
        e = torch.cuda.Event(enable_timing=True)
        e.record()
        return e
    return time.perf_counter()


def elapsed_ms(a, b):
    return a.elapsed_time(b) if isinstance(a, torch.cuda.Event) else (b - a) * 1000


def sampler_steps(model, steps):
    """(steps the sampler is run with, network calls per image) for this model."""
    if getattr(model, "one_step", False):
        return 1, 1
    s = model.steps if hasattr(model, "plan") else steps  # a DiP-GO plan runs only on the K steps it learned
    return s, s


def time_generation(model, fn, device, dtype, batch, steps, cfg_scale, reps, warmup, seed):
    """Latencies (ms) of whole generations of `batch` images (fid.time_sampling, warm-up excluded) and of
    every network call inside the timed ones; peak CUDA memory (MB) over all runs, None elsewhere."""
    timed = Timed(model, fn)
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(device)
    secs = fid.time_sampling({"m": timed}, batch, steps, cfg_scale, reps, warmup, seed, dtype)["m"]
    calls = timed.call_ms()
    calls = calls[len(calls) // (warmup + reps) * warmup:]  # the calls of the timed generations
    peak = torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else None
    return [1000 * t for t in secs], calls, peak


def pct(xs, q):
    """q-th percentile (nearest rank) of a list."""
    s = sorted(xs)
    return s[min(len(s) - 1, max(0, math.ceil(q / 100 * len(s)) - 1))]


# --- Apply: find checkpoints, build the stacked variants ------------------------------------------

def find_checkpoints(paths, root="out"):
    """[(path, kind)] of the tinydit checkpoints among `paths` (default: the shipped weights/*.pt and every
    *.pt under root); others are skipped with a one-line note."""
    paths = paths or sorted(glob.glob("weights/*.pt")) + sorted(glob.glob(os.path.join(root, "**", "*.pt"),
                                                                          recursive=True))
    found = []
    for p in paths:
        try:
            ck = torch.load(p, map_location="cpu", weights_only=True)
        except Exception as e:
            print(f"skip {p}: not readable ({type(e).__name__})")
            continue
        kind = ck.get("kind") if isinstance(ck, dict) else None
        if kind in KINDS and "config" in ck and dit.nonfinite(ck):
            print(f"skip {p}: NaN or inf in {dit.nonfinite(ck)}")
        elif kind in KINDS and "config" in ck:
            found.append((p, kind))
        else:
            print(f"skip {p}: not a model checkpoint (kind {kind!r})")
    return found


def stack_dipgo(path, cfg, device):
    """TinyFusion + DiP-GO: learn a DiP-GO plan (pruner + falling threshold) on a pruned DiT checkpoint
    and save it as a kind "dipgo" checkpoint. Returns its path."""
    ck = dit.load_checkpoint(path, kinds=["dit"])
    base = dit.build_dit(ck).to(device).requires_grad_(False)
    dcfg = prune.PruneConfig(teacher=path, eval_steps=cfg.steps, cfg_scale=cfg.cfg_scale,
                             ratio=cfg.stack_ratio, dipgo_steps=cfg.stack_steps, seed=cfg.seed,
                             device=str(device), data=cfg.data)
    score, _ = prune.learn_scores(base, dcfg, log=None)
    plan = prune.postprocess(score, cfg.stack_ratio, dcfg.backup)
    name = os.path.splitext(os.path.basename(path))[0]
    out = os.path.join(cfg.out, "stack", f"{name}+dipgo_r{cfg.stack_ratio}.pt")
    prune.save_dipgo(ck, plan, score, dcfg, cfg.stack_ratio, out)
    return out


def build_stacks(found, cfg, device):
    """The stacked checkpoints (a DiP-GO plan on each TinyFusion-pruned DiT) of `found`."""
    new = []
    for p, kind in found:
        ck = torch.load(p, map_location="cpu", weights_only=True)
        if kind == "dit" and ck.get("method") == "tinyfusion":
            print(f"stack: learning a DiP-GO plan on {p} ({cfg.stack_steps} pruner steps)")
            new.append((stack_dipgo(p, cfg, device), "dipgo"))
    if not new:
        print("stack: no TinyFusion checkpoint (kind dit, method tinyfusion): nothing to stack with DiP-GO")
    return new


# --- Evaluate: one row per (checkpoint, mode), the table, CSV / JSON, the Pareto plot -------------

def bench_model(path, kind, model, cfg, device):
    """The rows (eager, and compile with --compile) of one checkpoint, loaded as `model`."""
    steps, calls = sampler_steps(model, cfg.steps)
    flops = fid.sampler_gflops(model, steps, cfg.cfg_scale, cfg.seed) * 1e9
    q = dict(score=None, acc=None, metric="-")
    if cfg.quality:
        q = fid.evaluate(model, cfg.data, cfg.data_dir, model.input_size, n=cfg.n, steps=steps,
                         cfg_scale=cfg.cfg_scale, seed=cfg.seed, batch_size=min(100, cfg.n), device=device)
    rows = []
    for mode in ("eager", "compile") if cfg.compile else ("eager",):
        fn = torch.compile(model) if mode == "compile" else model
        timing = (steps, cfg.cfg_scale, cfg.reps, cfg.warmup, cfg.seed)
        r1, c1, _ = time_generation(model, fn, device, cfg.dtype, 1, *timing)
        rb, cb, peak = time_generation(model, fn, device, cfg.dtype, cfg.batch, *timing)
        B = cfg.batch
        rows.append({"model": os.path.relpath(path), "kind": kind, "mode": mode,
                     "params (M)": round(dit.param_count(model) / 1e6, 3), "steps": steps, "calls/img": calls,
                     "GFLOPs/call": round(flops / calls / 1e9, 4), "GFLOPs/img": round(flops / 1e9, 3),
                     "b1 ms/call p50": round(pct(c1, 50), 2), "b1 ms/call p90": round(pct(c1, 90), 2),
                     "b1 ms/img p50": round(pct(r1, 50), 1), "b1 ms/img p90": round(pct(r1, 90), 1),
                     f"b{B} ms/call p50": round(pct(cb, 50), 2), f"b{B} ms/call p90": round(pct(cb, 90), 2),
                     f"b{B} ms/img p50": round(pct(rb, 50) / B, 2),
                     f"b{B} ms/img p90": round(pct(rb, 90) / B, 2),
                     f"b{B} img/s": round(1000 * B / statistics.median(rb), 1),
                     "peak MB": "n/a" if peak is None else round(peak, 1),
                     "quality": "-" if q["score"] is None else f"{q['metric']} {q['score']:.2f}",
                     "class acc": "-" if q["acc"] is None else round(q["acc"], 3),
                     "score": q["score"]})
    return rows


def pareto_points(rows, batch):
    """(ms per image at the throughput batch, quality, "model params") for the eager rows with a score."""
    return [(r[f"b{batch} ms/img p50"], r["score"], f"{os.path.basename(r['model'])[:-3]} {r['params (M)']}M")
            for r in rows if r["mode"] == "eager" and r["score"] is not None]


def peak_table(preset, device, B=64):
    """Train img/s, forward and sampling img/s of a fresh `preset` DiT at batch B, and their achieved GFLOP/s
    as a fraction of this device's fp32 matmul peak (a 1024^3 GEMM, measured in the same run)."""
    tc = dit.resolve(dit.TrainConfig(preset=preset))
    model, diffusion, S = dit.DiT(**dit.dit_config(tc)).to(device), dit.Diffusion(), tc.image_size
    x, y = torch.randn(B, 3, S, S, device=device), torch.randint(0, 10, (B,), device=device)
    t = torch.randint(0, 1000, (B,), device=device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def train_step():
        loss = diffusion.loss(model, x, y)["loss"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    fwd_flops = dit.count_flops(model.eval(), x, t, y)
    with torch.no_grad():
        fwd_s = fid.timeit(lambda: model(x, t, y), device, reps=10) / 10
        cfg_s = fid.timeit(lambda: dit.forward_with_cfg(model, x, t, y, 4.0), device, reps=5) / 5
    model.train()
    train_s = fid.timeit(train_step, device, reps=5) / 5
    a, b = torch.randn(1024, 1024, device=device), torch.randn(1024, 1024, device=device)
    peak = 2 * 1024 ** 3 * 20 / fid.timeit(lambda: a @ b, device, 20) / 1e9  # fp32 GEMM GFLOP/s
    rows = [("train step (fwd+bwd+AdamW)", f"{B / train_s:.0f} img/s", 3 * fwd_flops / train_s / 1e9),
            ("forward", f"{B / fwd_s:.0f} img/s", fwd_flops / fwd_s / 1e9),
            ("sampling, 50 DDIM steps + CFG", f"{B / (50 * cfg_s):.1f} img/s", 2 * fwd_flops / cfg_s / 1e9)]
    print(f"\n{device.type}, torch {torch.__version__}, float32, batch {B}, preset {preset}, "
          f"{torch.get_num_threads()} threads; matmul peak {peak:.0f} GFLOP/s; "
          f"forward {fwd_flops / B / 1e9:.3f} GFLOPs/img")
    table = [{"what": n, "speed": v, "GFLOP/s (fraction of peak)": f"{g:.1f} ({g / peak:.2f})"}
             for n, v, g in rows]
    print(dit.markdown_table(table))
    return rows, peak


# --- main -----------------------------------------------------------------------------------------

def main(argv=None):
    cfg, paths = dit.parse_args(BenchConfig, argv, paths=True)
    dit.check(cfg, dict(dtype=dit.DTYPES))
    print(json.dumps(asdict(cfg)))
    device = dit.pick_device(cfg.device)
    if cfg.peak:
        return peak_table(cfg.preset, device)
    if device.type == "cpu" and cfg.dtype != "float32":
        print(f"note: {cfg.dtype} autocast on CPU, as asked; on many CPUs half precision is SLOWER than fp32")
    os.makedirs(cfg.out, exist_ok=True)
    found = find_checkpoints(paths)
    if cfg.stack:
        found += build_stacks(found, cfg, device)
    if not found:
        sys.exit("error: no tinydit checkpoints to benchmark (train some, or pass paths)")
    rows, models = [], []
    for p, kind in found:
        print(f"bench {p} ({kind})")
        models.append(sample.load_model(p, device))
        rows += bench_model(p, kind, models[-1], cfg, device)
    header = dit.run_header(device, cfg.dtype, f"1 and {cfg.batch}", cfg.seed)
    note = (f"{cfg.steps} DDIM steps (DiP-GO: its plan's K), CFG {cfg.cfg_scale}; latency: p50/p90 of "
            f"{cfg.reps} runs "
            f"after {cfg.warmup} warm-up; quality: fid.evaluate n={cfg.n}, float32 eager; peak MB: "
            + ("torch.cuda.max_memory_allocated" if device.type == "cuda" else "n/a on CPU (not measured)")
            + ("; CPU half precision as asked (often slower than fp32)"
               if device.type == "cpu" and cfg.dtype != "float32" else ""))
    B = cfg.batch
    for r in rows:  # throughput against the first row of the same mode (list the base first)
        first = next(f for f in rows if f["mode"] == r["mode"])
        r[f"b{B} speed-up"] = f"{first[f'b{B} ms/img p50'] / r[f'b{B} ms/img p50']:.2f}x"
    table = dit.markdown_table([{k: v for k, v in r.items() if k != "score"} for r in rows])
    short = ["model", "mode", "params (M)", "calls/img", "GFLOPs/img", "b1 ms/img p50", f"b{B} ms/img p50",
             f"b{B} speed-up", "quality", "class acc"]
    summary = dit.markdown_table([{k: r[k] for k in short} for r in rows])
    text = f"{header}\n\n{note}; speed-up: vs the first row\n\n{table}\n\nsummary:\n\n{summary}\n"
    print("\n" + text)
    with open(os.path.join(cfg.out, "bench.md"), "w") as f:
        f.write(text)
    with open(os.path.join(cfg.out, "bench.csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    with open(os.path.join(cfg.out, "bench.json"), "w") as f:
        json.dump(dict(header=header, note=note, config=asdict(cfg), rows=rows), f, indent=1)
    fid.pareto_png(pareto_points(rows, cfg.batch), os.path.join(cfg.out, "pareto.png"),
                   f"ms per image (batch {cfg.batch})")
    for (p, _), m in zip(found, models):
        m.name = os.path.splitext(os.path.basename(p))[0]  # the grid's row label
    dit.save_rows(models, os.path.join(cfg.out, "samples.png"), cfg.seed,
                  [sampler_steps(m, cfg.steps)[0] for m in models], cfg.cfg_scale)
    order = "\n".join(f"  row {k + 1}: {os.path.relpath(p)}" for k, (p, _) in enumerate(found))
    print(f"wrote {cfg.out}/bench.md, bench.csv, bench.json, pareto.png, samples.png (same noise per "
          f"column):\n{order}")
    return rows


if __name__ == "__main__":
    main()
