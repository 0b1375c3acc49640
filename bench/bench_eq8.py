"""Eq. 8's choices on the trained quick ellipse models: the gradient norm (per sample vs over the whole batch, as DPS's
released code does) and x̂0 clipping (scheduler `clip_sample`, guidance on the clipped x̂0 or not).

For each setting it prints one JSON line: constraint error |g(x) − c0| by the guiding log-aspect-ratio regressor (and in
units of σ_V) and by the moment feature `moment_log_ar`, acceptance at 0.3 σ_V, the share of clean single ellipses
(`ellipse_quality`), KS distances of the log aspect ratio and size to the test images, pixel std, the share of pixels
outside [-1, 1] and, unguided, k-NN coverage (k = 5, pixel features) of the test images. Torch runs on 1 thread.

    python bench/bench_eq8.py norm --cache-dir cache            # 1 target (75th percentile), 200 samples in one batch
    python bench/bench_eq8.py clip --cache-dir cache            # unguided 50 steps ± clip_sample; guided 25 steps, 3 clip choices
    python bench/bench_eq8.py norm --models models.pt           # modules saved with torch.save(dict(unet, sched, clf, reg, ...))
"""
import argparse, json, subprocess, time
from pathlib import Path
import numpy as np
import torch
from diffusers import DDPMScheduler
from diffexplain.data import make_ellipses, moment_log_ar, split_indices
from diffexplain.diffusion import from_model_range
from diffexplain.ellipse_study import ellipse_quality
from diffexplain.guided_sampling import constrained_sample, feature_stats, reject, sample_seeds
from diffexplain.metrics import coverage

def load(args):
    if args.models:
        M = torch.load(args.models, weights_only=False)
        return M["unet"].eval(), dict(M["sched"]), M["clf"].eval(), M["reg"].eval(), dict(ddpm=M.get("ddpm_path"), models=M.get("paths"))
    from diffexplain.ellipse_study import ellipse_ddpm, ellipse_models
    d = ellipse_ddpm("quick", cache_dir=args.cache_dir, progress=False)
    ms = ellipse_models("quick", cache_dir=args.cache_dir, which=("classifier", "log_ar"), progress=False)
    return (d["unet"].eval(), dict(d["scheduler"].config), ms["classifier"]["model"].eval(), ms["log_ar"]["model"].eval(),
            dict(ddpm=str(d["path"]), models=[str(m["path"]) for m in ms.values()]))

def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("part", choices=["norm", "clip"]); p.add_argument("--cache-dir", default="cache"); p.add_argument("--models")
    p.add_argument("--n", type=int, default=200, help="samples per target (norm: also the batch size B)")
    p.add_argument("--out", help="append the JSON lines to this file too")
    args = p.parse_args(); torch.set_num_threads(1)
    unet, sched_cfg, clf, reg, prov = load(args)
    for m in (unet, clf, reg): m.requires_grad_(False)
    eps = lambda x, t: unet(x, t).sample
    data = make_ellipses(10_000, seed=0, cache_dir=args.cache_dir); test = split_indices(10_000, seed=0)["test"]
    real = torch.from_numpy(data["images"][test])
    sigma_v = float(feature_stats(data["log_ar"]))
    g = lambda x: reg(from_model_range(x)).reshape(len(x))
    targets = np.quantile(data["log_ar"][test], [0.25, 0.75]).astype(np.float32)
    if args.part == "norm": targets = targets[1:]
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=Path(__file__).parent).stdout.strip()
    def run(n, steps, rho, norm="sample", clip=True, clip_x0=False, batch=None, guided=True):
        batch = batch or n
        out = dict(part=args.part, n_per_target=n, targets=len(targets), steps=steps, rho=rho, norm=norm, clip_sample=clip,
                   clip_x0=clip_x0, batch=batch, guided=guided)
        sched = DDPMScheduler.from_config({**sched_cfg, "clip_sample": clip})
        xs, tg, t0 = [], [], time.time()
        for j, c in enumerate(targets if guided else targets[:1]):
            seeds = sample_seeds(0, j, n)
            for b in range(0, n, batch):
                gens = [torch.Generator().manual_seed(int(s)) for s in seeds[b:b + batch]]
                xs.append(constrained_sample(eps, sched, (len(gens), 1, 32, 32), g if guided else None, float(c) if guided else None,
                                             rho if guided else 0.0, generator=gens, num_steps=steps, norm=norm, clip_x0=clip_x0))
                tg += [c]*len(gens)
        x, tg = torch.cat(xs), np.array(tg); out["seconds"] = round(time.time() - t0, 1)
        with torch.no_grad(): v = g(x).numpy()
        x01 = from_model_range(x).clamp(0, 1)
        q = ellipse_quality(x01, real)
        out.update(frac_single_ellipse=q["frac_single_ellipse"], ks_log_ar=q["ks_log_ar"], ks_size=q["ks_size"],
                   pixel_std=float(x.std()), frac_outside=float((x.abs() > 1).float().mean()))
        if guided:
            xf = x01.where(x01 > 0.05, 0); ok = (xf.sum((1, 2, 3)) >= 1).numpy()
            mom = np.full(len(x), np.nan); mom[ok] = moment_log_ar(xf[torch.from_numpy(ok)]).numpy()
            out.update(err=float(np.abs(v - tg).mean()), err_sigma=float(np.abs(v - tg).mean()/sigma_v),
                       accept=float(reject(v, tg, sigma_v).mean()), err_moment=float(np.nanmean(np.abs(mom - tg))))
        else: out["coverage_pixels_k5"] = float(coverage(real.flatten(1), x01.flatten(1), k=5))
        out.update(commit=commit, threads=torch.get_num_threads(), **prov)
        line = json.dumps(out); print(line, flush=True)
        if args.out: open(args.out, "a").write(line + "\n")
    if args.part == "norm": # the paper's 200 samples per target in one batch
        B = args.n
        run(B, 25, 0.8)                                   # per sample (quick profile's setting)
        run(B, 25, 0.8, norm="batch", batch=B)            # DPS's code: each sample moves ≈ 0.8/√B
        run(B, 25, 0.8, norm="batch", batch=16)           # ... batch-size dependent
        run(B, 25, 0.8*B**0.5, norm="batch", batch=B)     # batch norm with ρ·√B: the per-sample step size again
    else:
        for clip in (True, False): run(args.n, 50, 0.0, clip=clip, guided=False)
        for kw in (dict(clip=True), dict(clip=True, clip_x0=True), dict(clip=False)): run(args.n//2, 25, 0.8, **kw)

if __name__ == "__main__": main()
