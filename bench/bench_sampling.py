"""Two ratios of constrained (DPS) sampling in one run, each comparing like with like.

(a) Engineering gain, SAME algorithm: the same number of steps, the same ρ, the same per-sample noise streams
    (`sample_seeds`: one torch.Generator per sample), so both produce the same samples (the script prints the largest
    difference). Reference: `constrained_sample` called one sample at a time in a Python loop. Ours: one batched call
    over all samples of all targets; on a GPU also with bf16 autocast and `torch.compile` of the U-Net (not measured on
    CPU: the script says so). The FLOPs of one guided step come from `compute_model.guided_step`, so each mode's
    achieved FLOP rate is printed too.

(b) Algorithmic gain, EQUAL ACCURACY: `sampling_study` on the exact Gaussian ε-model (`gaussian_eps`, data N(0, s² I)
    on 1×8×8 images, g = image mean, Y = a threshold on the top rows' mean, so the score is neither 0 nor 1), with a
    convergence chain at fixed total drift ρ·steps and cheaper settings. The reference is picked by convergence
    (`converged_reference`), the cheaper setting by the two-sided criterion of `few_step_matches` (score shown equal
    within ±0.1, constraint errors by g and by an independent measure, acceptance and clean share not worse), and the
    gain is the reference's cost over the validated setting's, in ε-evaluations and in measured seconds. The reverse-step
    variance is an axis: the reference is always the package's `fixed_small` (σ_t² = β̃_t) chain, and the cheaper
    candidates are tried with `fixed_small` and with `fixed_large` (σ_t² = β_t, Ho et al. 2020 §3.2: the optimal choice
    for N(0, I) data; with few respaced steps β̃_t shrinks the injected noise and contracts the samples, which the
    script measures too: unguided sample std / data std by steps and variance). β_t is optimal only for N(0, I) data and
    over-disperses narrower data, so the same candidates are also tried with Analytic-DPM's variance (Bao et al. 2022:
    β̃ + c0²·E[Var(x0 | x_t)] with E[Var(x0 | x_t)] from Γ_t = E‖ε(x_t, t)‖²/d, estimated by Monte Carlo over the data; here a
    DDPMScheduler subclass in this script, not in the package). On the trained ellipse models this needs
    the GPU campaign (`tools/gpu_campaign.py`): the chain alone is hours on two CPU cores.

(c) Optional (`--ellipse-cache DIR`): unguided samples of the trained quick ellipse DDPM with each variance (loaded from
    DIR, never trained; analytic's Γ_t from noised training images), `ellipse_quality` and per-image intensity std
    against the data.

    python bench/bench_sampling.py                       # both parts on CPU (paper-size 9.4 M ellipse U-Net for (a)); ~minutes
    python bench/bench_sampling.py --smoke               # tiny sizes, seconds (the tests run this)
    python bench/bench_sampling.py --model quick-ellipse --cache-dir cache   # (a) on the trained quick ellipse DDPM + regressor
    python bench/bench_sampling.py --device cuda --n 64 --targets 8          # on a GPU: adds bf16 + torch.compile to (a)
    python bench/bench_sampling.py --keep-a --ellipse-cache cache            # rerun (b) and (c), keep (a) with its own commit

Writes bench/results/bench_sampling.{md,json} and the studies' rows bench_sampling.csv (or --out), with the command and the
torch thread count.
"""
import argparse, datetime, json, subprocess, sys, time
from pathlib import Path
import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from compute_model import guided_step, lib, unet2d_call, _Clamp01   # FLOPs of one guided step; names wherever the library keeps them

# ---------------------------------------------------------------- (a) engineering gain
def image_mean(x): return x.mean((1, 2, 3))   # a differentiable feature for untrained networks

def setup_a(a, device):
    "U-Net, feature g (on model-range images), targets, sample shape, and a builder pair for the FLOP count."
    make_unet2d, EllipseCNN, from_model_range = lib("make_unet2d"), lib("EllipseCNN"), lib("from_model_range")
    if a.model == "quick-ellipse":   # the trained quick-profile models (loaded from the cache; trained there if missing)
        d = lib("ellipse_ddpm")("quick", cache_dir=a.cache_dir, seed=a.seed, progress=False)
        reg = lib("ellipse_models")("quick", cache_dir=a.cache_dir, seed=a.seed, which=("log_ar",), progress=False)["log_ar"]["model"]
        reg = reg.to(device).eval().requires_grad_(False)
        targets = np.linspace(-0.5, 0.5, a.targets).astype(np.float32)
        g = lambda x: reg(from_model_range(x)).reshape(len(x))
        build = (lambda: make_unet2d(lib("DDPM_PROFILES")["quick"]["unet"], 1, 32), lambda: _Clamp01(EllipseCNN()))
        return d["unet"].to(device).eval().requires_grad_(False), d["scheduler"], g, targets, (1, 32, 32), build
    torch.manual_seed(a.seed)
    unet = make_unet2d(a.model, 1, a.size).to(device).eval().requires_grad_(False)
    reg = EllipseCNN(img_size=a.size).to(device).eval().requires_grad_(False) if a.size % 16 == 0 else None
    g = (lambda x: reg(from_model_range(x, clamp=False)).reshape(len(x))) if reg is not None else image_mean
    build = (lambda: make_unet2d(a.model, 1, a.size), (lambda: _Clamp01(EllipseCNN(img_size=a.size))) if reg is not None else None)
    return unet, lib("make_scheduler")(), g, np.linspace(-0.2, 0.2, a.targets).astype(np.float32), (1, a.size, a.size), build

def engineering(a, device):
    constrained_sample, sample_seeds = lib("constrained_sample"), lib("sample_seeds")
    unet, sched, g, targets, shape, (b_eps, b_g) = setup_a(a, device)
    N = len(targets)*a.n
    seeds = [int(s) for j in range(len(targets)) for s in sample_seeds(a.seed, j, a.n)]
    c0 = torch.as_tensor(np.repeat(targets, a.n), device=device)
    gens = lambda: [torch.Generator(device).manual_seed(s) for s in seeds]
    step_flops = guided_step(b_eps, unet2d_call, shape, (b_g,) if b_g is not None else ())
    def run(kind):
        cuda = device.type == "cuda"
        net = torch.compile(unet) if kind == "batched+bf16+compile" else unet
        eps = lambda x, t: net(x, t).sample
        amp = torch.bfloat16 if kind == "batched+bf16+compile" else None
        if kind == "loop":
            gl = gens()
            return torch.cat([constrained_sample(eps, sched, (1, *shape), g, c0[i:i + 1], a.rho, generator=[gl[i]], num_steps=a.steps)
                              for i in range(N)])
        return constrained_sample(eps, sched, (N, *shape), g, c0, a.rho, generator=gens(), num_steps=a.steps, amp_dtype=amp)
    kinds = ["loop", "batched"] + (["batched+bf16+compile"] if device.type == "cuda" else [])
    out, xs = {}, {}
    for k in kinds:
        if device.type == "cuda": run(k); torch.cuda.synchronize()   # warm-up (compile, cuDNN autotune)
        t0, c0_ = time.perf_counter(), time.process_time()
        xs[k] = run(k)
        if device.type == "cuda": torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0_
        out[k] = dict(seconds=dt, cpu_s=cpu, samples_per_s=N/dt, gflop_per_s=step_flops*N*a.steps/dt/1e9)
    ref = xs["loop"].float()
    for k in kinds:
        out[k]["max_abs_diff_vs_loop"] = float((xs[k].float() - ref).abs().max())
        out[k]["gain_vs_loop"] = out["loop"]["seconds"]/out[k]["seconds"]
    if device.type != "cuda": out["batched+bf16+compile"] = "not measured: no GPU (bf16 autocast and torch.compile are GPU-only here)"
    return dict(model=a.model, params_M=sum(p.numel() for p in unet.parameters())/1e6, size=shape[-1], targets=len(targets),
                n_per_target=a.n, samples=N, steps=a.steps, rho=a.rho, gflop_per_sample_step=step_flops/1e9, modes=out)

# ---------------------------------------------------------------- (b) algorithmic gain at equal accuracy
TOY = dict(std=0.5, size=8, top_rows=4, n_targets=6, n=256, drift=10.0, chain=(50, 100, 200, 400, 1000),
           steps=(5, 10, 25, 50), n_boot=1000,
           rhos={5: [1.0], 10: [0.0, 0.5, {0: 0.1, 100: 1.0}], 25: [0.4, {0: 0.1, 100: 0.8}, {0: 0.2, 200: 0.8}],
                 50: [0.3, {0: 0.1, 100: 0.4}]},   # constant ρ and two-piece ρ (large early, Table 9's 0.1 late), as chapter 03 tries
           # the same candidates sampled with σ_t² = β_t ("fixed_large", Ho et al. 2020 §3.2: optimal for N(0, I) data), plus
           # ρ·steps = drift at 25 steps (0.4 above) and 50 steps (0.2) and a stronger 10-step ρ; the reference stays fixed_small.
           # The same grid again with Analytic-DPM's variance (between the two; exact for Gaussian data up to Γ_t's Monte Carlo)
           rhos_large={5: [1.0], 10: [0.0, 0.5, 1.0, {0: 0.1, 100: 1.0}], 25: [0.2, 0.4, {0: 0.1, 100: 0.8}, {0: 0.2, 200: 0.8}],
                       50: [0.2, 0.3, {0: 0.1, 100: 0.4}]},
           contraction=dict(steps=(5, 10, 25, 50, 100, 1000), n=2048, stds=(1.0, 0.5)))
SMOKE_TOY = dict(TOY, n_targets=3, n=32, chain=(20, 40), drift=4.0, steps=(5, 10), rhos={5: [0.8], 10: [0.0, 0.4]},
                 rhos_large={5: [0.8], 10: [0.4]}, n_boot=200, contraction=dict(steps=(5, 40), n=64, stds=(1.0, 0.5)))
VARIANCES = ("fixed_small", "fixed_large")   # diffusers DDPMScheduler variance_type: β̃_t (the package's) and β_t
ALL_VARIANCES = VARIANCES + ("analytic",)    # + Analytic-DPM's estimated optimal variance (Bao et al. 2022), bench only

def with_variance(sched, variance):
    "The same noise schedule with another reverse-step variance (diffusers `variance_type`)."
    return type(sched).from_config(sched.config, variance_type=variance)

def _analytic_class():
    from diffusers import DDPMScheduler
    class AnalyticVarianceDDPM(DDPMScheduler):
        """DDPM step (the same posterior mean from x̂0) with Analytic-DPM's optimal reverse variance (Bao et al. 2022, Thm 1):
        σ*²_{t→s} = β̃ + c0²·E[Var(x0 | x_t)], c0 = √ᾱ_s·β/(1 − ᾱ_t), E[Var(x0 | x_t)] per dimension = (1 − ᾱ_t)/ᾱ_t·(1 − Γ_t),
        Γ_t = E‖ε(x_t, t)‖²/d over x_t ~ q(x_t); clipped to [β̃, β] (their bounds). Γ (`gamma`, {t: value}) is
        estimated by `estimate_gamma`. For N(0, I) data it gives β (fixed_large), for a point mass β̃ (fixed_small)."""
        gamma: dict = {}
        def _get_variance(self, t, predicted_variance=None, variance_type=None):
            prev_t = self.previous_timestep(t)
            ab_t = self.alphas_cumprod[t]; ab_s = self.alphas_cumprod[prev_t] if prev_t >= 0 else self.one
            beta = 1 - ab_t/ab_s; small = ((1 - ab_s)/(1 - ab_t)*beta).clamp(min=1e-20)
            if int(t) not in self.gamma: raise KeyError(f"no Γ_t estimated for t={int(t)}: run estimate_gamma over this step grid")
            var_x0 = (1 - ab_t)/ab_t*(1 - self.gamma[int(t)])
            return torch.minimum(torch.maximum(small + (ab_s.sqrt()*beta/(1 - ab_t))**2*var_x0, small), beta)
    return AnalyticVarianceDDPM

def estimate_gamma(eps, # eps(x_t, t)
                   sched, # the noise schedule
                   x0, # (N, ...) data in the model's range
                   ts, # timesteps to estimate Γ_t at
                   n_mc: int = 256, # Monte Carlo draws (data × noise) per timestep
                   seed: int = 0, batch: int = 256,
                   device=None, # where eps runs (default: CPU)
                  ) -> dict: # {t: Γ_t = E‖ε(x_t, t)‖²/d}
    "Analytic-DPM's Monte Carlo moment Γ_t of the ε-model over noised data."
    g = torch.Generator().manual_seed(seed); ab = sched.alphas_cumprod; out = {}
    x0 = torch.as_tensor(x0).float()
    for t in sorted({int(t) for t in ts}):
        acc = 0.0
        for i in range(0, n_mc, batch):
            m = min(batch, n_mc - i)
            x = x0[torch.randint(len(x0), (m,), generator=g)]; z = torch.randn(x.shape, generator=g)
            xt = ab[t].sqrt()*x + (1 - ab[t]).sqrt()*z
            with torch.no_grad(): acc += float(eps(xt.to(device), torch.full((m,), t, dtype=torch.long, device=device)).float().pow(2).sum())
        out[t] = acc/(n_mc*x0[0].numel())
    return out

def sampler_scheduler(variance, # one of ALL_VARIANCES
                      sched, # the model's scheduler (its config is kept)
                      eps=None, x0=None, steps=(), # "analytic": ε-model, data (model range) and the step counts to estimate Γ for
                      n_mc: int = 256, seed: int = 0, device=None):
    "`sched` with the given reverse variance; for 'analytic', Γ_t estimated at every timestep of `steps`' respaced grids."
    if variance in VARIANCES: return with_variance(sched, variance)
    if variance != "analytic": raise ValueError(f"`variance` must be one of {ALL_VARIANCES}, got {variance!r}")
    S = _analytic_class().from_config(sched.config, variance_type="fixed_small")
    ts = [int(t) for k in steps for t in lib("respaced")(S, int(k)).timesteps]
    S.gamma = estimate_gamma(eps, S, x0, ts, n_mc, seed, device=device)
    S.register_to_config(analytic_gamma=lib("config_hash")({str(k): round(v, 4) for k, v in S.gamma.items()}))   # keys caches on Γ
    return S

def contraction(C, seed):
    """Std of unguided samples of the exact ε-model of N(0, s² I) data (1×8×8 images, all pixels pooled) by steps and
    reverse variance: a contracting sampler gives std/s < 1 at few steps. The ε-model is exact, so any gap is the sampler's."""
    make_scheduler, gaussian_eps, constrained_sample = lib("make_scheduler"), lib("gaussian_eps"), lib("constrained_sample")
    rows = []
    for s in C["stds"]:
        base = make_scheduler(clip_sample=False); eps = gaussian_eps(base, 0.0, s)
        x0 = s*torch.randn((C["n"], 1, 8, 8), generator=torch.Generator().manual_seed(seed + 1))   # data draws for Γ_t
        for var in ALL_VARIANCES:
            sched = sampler_scheduler(var, base, eps, x0, C["steps"], seed=seed)
            for k in C["steps"]:
                x = constrained_sample(eps, sched, (C["n"], 1, 8, 8), generator=torch.Generator().manual_seed(seed), num_steps=k)
                rows.append(dict(data_std=s, variance=var, steps=k, sample_std=float(x.std()), ratio=float(x.std())/s))
    return rows

def toy_score(s, n_boot):
    "The library's global score of the accepted samples (equal weight per target) with its bootstrap interval."
    try: r = lib("scores_from_sweep")(s, n_boot=n_boot)
    except ValueError: return dict(score=np.nan, score_lo=np.nan, score_hi=np.nan)
    lo, hi = r["bootstrap"].ci_global
    return dict(score=r["global_score"], score_lo=lo, score_hi=hi)

def matches_by_variance(parts, # {variance: `sampling_study` DataFrame}; parts["fixed_small"] holds the reference row
                        ref, # index of the reference row in parts["fixed_small"] (from `converged_reference`)
                        **margins, # `few_step_matches`' margins
                       ): # (matches of every variance's cheaper rows, {variance: cheapest passing row or None}, cheapest passing row or None)
    """`few_step_matches` of each variance's cheaper settings against ONE reference (a fixed_small row): the reference row
    is put next to the other variance's rows, so the library's check runs unchanged; the verdicts are combined with a
    `variance` column and the cheapest passing setting (fewest steps, then lowest error) is picked over all variances."""
    import pandas as pd
    small = parts["fixed_small"]; rs, rl = int(small.loc[ref, "steps"]), small.loc[ref, "rho_pieces"]
    fsm = lib("few_step_matches")
    ms = [fsm(small if v == "fixed_small" else pd.concat([small.loc[[ref]], st[st["steps"] < rs]]), rs, rl, **margins).assign(variance=v)
          for v, st in parts.items()]
    m = pd.concat(ms, ignore_index=True).sort_values(["steps", "err"], kind="stable").reset_index(drop=True)
    ok = m[m["ok"]]
    by = {v: (None if ok[ok["variance"] == v].empty else ok[ok["variance"] == v].iloc[0]) for v in parts}
    return m, by, (None if ok.empty else ok.iloc[0])

def algorithmic(T, seed):
    """Two studies on the same toy, targets and noise streams: the fixed_small one holds the convergence chain (the reference)
    and the cheaper candidates; the fixed_large one the same candidates (and its own chain, as a check that it converges to
    the same score). Every candidate of both is checked two-sidedly against the one fixed_small reference."""
    import pandas as pd
    make_scheduler, gaussian_eps = lib("make_scheduler"), lib("gaussian_eps")
    sampling_study, convergence_chain = lib("sampling_study"), lib("convergence_chain")
    converged_reference, few_step_matches, validated_sampler = lib("converged_reference"), lib("few_step_matches"), lib("validated_sampler")
    s = T["size"]
    sigma_v = T["std"]/s   # V = mean of s² iid N(0, std²) pixels
    targets = (np.linspace(-1.5, 1.5, T["n_targets"])*sigma_v).astype(np.float32)
    top = T["top_rows"]
    clf = lambda x: (x[..., :top, :].mean((1, 2, 3)) > 0).float()                  # Y: depends on V only partly
    median = lambda x: x.flatten(1).median(1).values                               # an independent measure of the constraint
    clean = lambda x: (x.flatten(1).std(1) - T["std"]).abs() < 0.5*T["std"]          # "looks like the data": pixel spread near s
    studies, walls, base = {}, {}, make_scheduler(clip_sample=False)
    eps = gaussian_eps(base, 0.0, T["std"])
    x0 = T["std"]*torch.randn((T["contraction"]["n"], 1, s, s), generator=torch.Generator().manual_seed(seed + 1))   # data draws for Γ_t
    for var, rhos in (("fixed_small", T["rhos"]), ("fixed_large", T["rhos_large"]), ("analytic", T["rhos_large"])):
        grid = {k: list(v) for k, v in rhos.items()}
        for k, (r,) in convergence_chain(T["drift"], T["chain"]).items():
            if all(lib("_rho_label")(x) != lib("_rho_label")(r) for x in grid.get(k, [])): grid.setdefault(k, []).append(r)
        t0 = time.perf_counter()
        sched = sampler_scheduler(var, base, eps, x0, list(grid), seed=seed)
        studies[var] = sampling_study(eps, sched, image_mean, targets, T["n"], (1, s, s), sigma_v, steps=sorted(grid, reverse=True),
                                      rhos=grid, seed=seed, classifier=clf, score_fn=lambda sw: toy_score(sw, T["n_boot"]),
                                      measures=dict(median=median), quality=clean).assign(variance=var)
        walls[var] = time.perf_counter() - t0
    study = studies["fixed_small"]
    ref, chain = converged_reference(study, T["drift"], chain_steps=T["chain"])
    val = validated_sampler(study, T["drift"], dict(chain_steps=T["chain"]))
    chain_other = {v: converged_reference(studies[v], T["drift"], chain_steps=T["chain"])[1] for v in ALL_VARIANCES[1:]}
    cc = ["steps", "rho", "err", "accept", "score", "score_lo", "score_hi", "still_moving", "narrow"]
    res = dict(toy={k: (v if not isinstance(v, dict) else {str(kk): ([lib("_rho_label")(r) for r in vv] if isinstance(vv, list) else vv)
                                                           for kk, vv in v.items()}) for k, v in T.items()},
               seed=seed, study_wall_s=walls, samples_per_setting=int(len(targets)*T["n"]),
               chain=chain[cc].to_dict("records"), chain_other={v: c[cc].to_dict("records") for v, c in chain_other.items()},
               reference=None, validated=None, validated_by_variance={v: None for v in ALL_VARIANCES})
    if ref is not None:
        r = study.loc[ref]; rs, rl = int(r["steps"]), r["rho_pieces"]
        res["reference"] = dict(steps=rs, rho=rl, variance="fixed_small", seconds=float(r["seconds"]), score=float(r["score"]),
                                err=float(r["err"]), accept=float(r["accept"]))
        m, by, best = matches_by_variance(studies, ref)
        res["matches"] = m[["variance", "steps", "rho_pieces", "err", "err_median", "accept", "clean", "score", "d_lo", "d_hi", "seconds",
                            "score_ok", "err_ok", "accept_ok", "clean_ok", "ok"]].to_dict("records")
        res["validated_by_variance"] |= {v: dict(steps=int(r["steps"]), rho=r["rho_pieces"]) for v, r in by.items() if r is not None}
        if best is not None:
            res["validated"] = dict(steps=int(best["steps"]), rho=best["rho_pieces"], variance=best["variance"], seconds=float(best["seconds"]),
                                    score=float(best["score"]), err=float(best["err"]), accept=float(best["accept"]))
            res["gain_eps_evals"] = rs/res["validated"]["steps"]
            res["gain_seconds"] = res["reference"]["seconds"]/res["validated"]["seconds"]
        fs = res["validated_by_variance"]["fixed_small"]
        assert (fs is None) == (val is None) and (val is None or fs["steps"] == val["num_steps"]), "the library's verdict and the bench's disagree"
    res["contraction"] = contraction(T["contraction"], seed)
    return res, pd.concat(studies.values(), ignore_index=True)

# ---------------------------------------------------------------- (c) reverse variance on the trained ellipse DDPM
def load_cached_quick_ddpm(cache_dir, seed=0):
    "The quick ellipse DDPM from `cache_dir`, or FileNotFoundError: never trains (the cache lookup is guarded)."
    import diffexplain.diffusion as dd
    steps, orig = lib("DDPM_PROFILES")["quick"]["steps"], dd.cache_path
    def guarded(name, config, cache_dir=None):
        r = orig(name, config, cache_dir)
        if name == "ellipse-ddpm-quick" and not (r/f"ema-step{steps}"/"config.json").exists():
            raise FileNotFoundError(f"no trained quick ellipse DDPM at {r}/ema-step{steps} (this benchmark does not train it)")
        return r
    dd.cache_path = guarded
    try: return lib("ellipse_ddpm")("quick", cache_dir=cache_dir, seed=seed, progress=False)
    finally: dd.cache_path = orig

def ellipse_variance(cache_dir, n, steps, seed, n_mc=128):
    """Unguided samples of the quick ellipse DDPM with each reverse variance (same per-sample noise streams, the model's
    own scheduler otherwise, clip_sample included): `ellipse_quality` and the per-image intensity std against the data."""
    d = load_cached_quick_ddpm(cache_dir, seed)
    real = lib("make_ellipses")(lib("DDPM_PROFILES")["quick"]["n"], seed=seed, cache_dir=cache_dir)["images"][:2000]
    real_std = np.asarray(real, np.float32).reshape(len(real), -1).std(1)
    eps, rows = lib("eps_fn")(d["unet"].eval().requires_grad_(False)), []
    t0 = time.perf_counter()
    scheds = {v: sampler_scheduler(v, d["scheduler"], eps, lib("to_model_range")(torch.as_tensor(real)), steps, n_mc=n_mc, seed=seed)
              for v in ALL_VARIANCES}
    gamma_s = time.perf_counter() - t0
    for k in steps:
        for var in ALL_VARIANCES:
            t0 = time.perf_counter()
            with torch.no_grad():
                x = lib("plain_samples")(eps, scheds[var], n, (1, 32, 32), num_steps=k, seed=seed, progress=False)
            dt = time.perf_counter() - t0
            x01 = lib("from_model_range")(x.float()).numpy()
            q = lib("ellipse_quality")(x01, real)
            sd = x01.reshape(n, -1).std(1)
            rows.append(dict(variance=var, steps=k, n=n, seconds=dt, img_std_mean=float(sd.mean()), img_std_sd=float(sd.std()),
                             **{kk: q[kk] for kk in ("frac_single_ellipse", "frac_empty", "ks_log_ar", "ks_size", "size_mean", "size_mean_real")}))
    return dict(rows=rows, real_img_std_mean=float(real_std.mean()), real_img_std_sd=float(real_std.std()), model=str(d["path"]),
                gamma_n_mc=n_mc, gamma_s=gamma_s, gamma={str(t): v for t, v in scheds["analytic"].gamma.items()},
                note=f"Quick ellipse DDPM loaded from the cache ({Path(d['path']).parent.name}, never trained here); {n} unguided samples per row "
                     f"from the same per-sample noise streams (`plain_samples`, seed {seed}); the model's scheduler (clip_sample="
                     f"{d['scheduler'].config.clip_sample}) with variance_type switched; per-image std of the [0, 1] intensities vs the first "
                     "2,000 training images; clean = `ellipse_quality`'s share of single ellipses. analytic: Γ_t from "
                     f"{n_mc} noised training images per timestep ({gamma_s:.0f} s).")

# ---------------------------------------------------------------- report
def _sha():
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "status", "--porcelain", "--", "bench", "diffexplain"], capture_output=True, text=True).stdout.strip())
        return sha + ("+dirty" if dirty else "")
    except OSError: return "?"

def markdown(R):
    L = ["# Sampling benchmark: engineering gain and algorithmic gain, each like with like", "",
         f"Regenerate: `{R['command']}` (commit {R['commit']}, {R['date']}, device {R['device']}, torch threads {R['threads']}).", ""]
    if "engineering" in R:
        A = R["engineering"]
        L += ["## (a) Engineering gain at the same steps and ρ", ""]
        if A.get("kept_from"):
            k = A["kept_from"]
            L += [f"Not rerun: kept from `{k['command']}` (commit {k['commit']}, {k['date']}, device {k['device']}, torch threads {k['threads']}).", ""]
        L += [
              f"Model: {A['model']} U-Net ({A['params_M']:.2f} M params, {A['size']}×{A['size']}), {A['targets']} targets × {A['n_per_target']} samples = "
              f"{A['samples']}, {A['steps']} steps, ρ = {A['rho']}, per-sample noise streams; {A['gflop_per_sample_step']:.3g} GFLOP per guided "
              "sample-step (FlopCounterMode).", "", "| mode | seconds | samples/s | GFLOP/s | gain vs loop | max |x − x_loop| |", "|---|---|---|---|---|---|"]
        for k, v in A["modes"].items():
            if isinstance(v, str): L.append(f"| {k} | {v} | | | | |"); continue
            L.append(f"| {k} | {v['seconds']:.2f} | {v['samples_per_s']:.3g} | {v['gflop_per_s']:.3g} | {v['gain_vs_loop']:.2f}× | {v['max_abs_diff_vs_loop']:.2e} |")
        L.append("")
    if "algorithmic" in R:
        B = R["algorithmic"]
        L += ["## (b) Algorithmic gain at equal accuracy (exact Gaussian ε-model)", "",
              f"{B['samples_per_setting']} samples per setting; chain at ρ·steps = {B['toy']['drift']} over {B['toy']['chain']} steps; "
              f"cheaper settings {B['toy']['rhos']} with the package's reverse variance (fixed_small, σ_t² = β̃_t) and "
              f"{B['toy']['rhos_large']} with fixed_large (σ_t² = β_t) and with analytic (Analytic-DPM's σ*², Bao et al. 2022, Γ_t by Monte "
              "Carlo over the data); studies " + ", ".join(f"{v} {w:.1f} s" for v, w in B["study_wall_s"].items()) + ".", "",
              "Convergence chain, fixed_small (picks the reference):", "",
              "| steps | ρ | err | accept | score [95% CI] | still moving | narrow |", "|---|---|---|---|---|---|---|"]
        row = lambda c: (f"| {c['steps']} | {c['rho']:g} | {c['err']:.4f} | {c['accept']:.3f} | {c['score']:.3f} [{c['score_lo']:.3f}, "
                         f"{c['score_hi']:.3f}] | {c['still_moving']} | {c['narrow']} |")
        L += [row(c) for c in B["chain"]]
        for v, ch in B.get("chain_other", {}).items():
            L += ["", f"The same chain with {v} (a check only: the reference is the fixed_small one):", "",
                  "| steps | ρ | err | accept | score [95% CI] | still moving | narrow |", "|---|---|---|---|---|---|---|"]
            L += [row(c) for c in ch]
        if B.get("matches"):
            L += ["", f"Against the converged reference ({B['reference']['steps']} steps, ρ {B['reference']['rho']}, fixed_small; score "
                      f"{B['reference']['score']:.3f}); ok = score shown equal within ±0.1 (90% CI of Δ inside) and error, acceptance, clean "
                      "share not worse by more than their margins:", "",
                  "| variance | steps | ρ | err | err (median) | accept | clean | score | Δscore 90% CI | seconds | failed on | ok |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|"]
            for m in B["matches"]:
                why = ", ".join(k[:-3] for k in ("score_ok", "err_ok", "accept_ok", "clean_ok") if k in m and not m[k]) or "–"
                L.append(f"| {m.get('variance', 'fixed_small')} | {m['steps']} | {m['rho_pieces']} | {m['err']:.4f} | {m['err_median']:.4f} | "
                         f"{m['accept']:.3f} | {m['clean']:.3f} | {m['score']:.3f} | [{m['d_lo']:.3f}, {m['d_hi']:.3f}] | {m['seconds']:.2f} | "
                         f"{why} | {m['ok']} |")
        if B.get("contraction"):
            C = B["contraction"]; steps = sorted({c["steps"] for c in C})
            L += ["", f"Unguided sample std / data std of the exact ε-model (N(0, s² I) data, {B['toy']['contraction']['n']} samples of 1×8×8, "
                      "pixels pooled; 1.000 = no contraction):", "",
                  "| data std s | variance | " + " | ".join(f"{k} steps" for k in steps) + " |", "|---|---|" + "---|"*len(steps)]
            for s_ in sorted({c["data_std"] for c in C}, reverse=True):
                for var in ALL_VARIANCES:
                    by = {c["steps"]: c["ratio"] for c in C if c["data_std"] == s_ and c["variance"] == var}
                    L.append(f"| {s_:g} | {var} | " + " | ".join(f"{by[k]:.3f}" for k in steps) + " |")
        L.append("")
    if "ellipse_variance" in R:
        E = R["ellipse_variance"]
        L += ["## (c) Reverse variance on the trained quick ellipse DDPM (unguided)", "", E["note"], "",
              "| variance | steps | samples | clean single ellipses | empty | per-image std (mean ± sd) | real data | KS log AR | KS size | seconds |",
              "|---|---|---|---|---|---|---|---|---|---|"]
        for r in E["rows"]:
            L.append(f"| {r['variance']} | {r['steps']} | {r['n']} | {r['frac_single_ellipse']:.3f} | {r['frac_empty']:.3f} | "
                     f"{r['img_std_mean']:.4f} ± {r['img_std_sd']:.4f} | {E['real_img_std_mean']:.4f} ± {E['real_img_std_sd']:.4f} | "
                     f"{r['ks_log_ar']:.3f} | {r['ks_size']:.3f} | {r['seconds']:.1f} |")
        L.append("")
    L += ["## The two ratios", ""] + R["summary"] + [""]
    return "\n".join(L)

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="ellipse", help="(a): tiny | quick | ellipse (untrained U-Net of that size: throughput only) "
                                                       "or quick-ellipse (the trained quick models from --cache-dir)")
    p.add_argument("--size", type=int, default=32); p.add_argument("--cache-dir", default=None)
    p.add_argument("--targets", type=int, default=2); p.add_argument("--n", type=int, default=4, help="(a): samples per target")
    p.add_argument("--steps", type=int, default=None, help="(a): steps of both modes (default: SAMPLER_PROFILES['quick'])")
    p.add_argument("--rho", type=float, default=None, help="(a): ρ of both modes (default: SAMPLER_PROFILES['quick'])")
    p.add_argument("--device", default="auto"); p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0); p.add_argument("--out", default="bench/results")
    p.add_argument("--smoke", action="store_true", help="tiny U-Net and a small toy study: seconds")
    p.add_argument("--skip", choices=("a", "b"), default=None, help="leave one part out")
    p.add_argument("--keep-a", action="store_true", help="do not rerun (a): keep it from the existing OUT/bench_sampling.json, marked with its commit")
    p.add_argument("--ellipse-cache", default=None, help="(c): the cache holding the trained quick ellipse DDPM (loaded, never trained)")
    p.add_argument("--ellipse-n", type=int, default=64); p.add_argument("--ellipse-steps", type=int, nargs="+", default=[25])
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    q = lib("SAMPLER_PROFILES")["quick"]
    a.steps = a.steps or (4 if a.smoke else q["num_steps"]); a.rho = q["rho"] if a.rho is None else a.rho
    if a.smoke: a.model, a.size, a.targets, a.n = "tiny", 16, 2, 2
    device = lib("get_device")(a.device)
    R = dict(command="python bench/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]), commit=_sha(),
             date=str(datetime.date.today()), device=str(device), threads=torch.get_num_threads())
    out = Path(a.out)
    summary = []
    if a.keep_a and a.skip != "a":
        old = json.loads((out/"bench_sampling.json").read_text())
        if "engineering" not in old: raise ValueError(f"--keep-a: {out}/bench_sampling.json has no part (a) to keep")
        k = old["engineering"].get("kept_from") or {f: old[f] for f in ("command", "commit", "date", "device", "threads")}
        R["engineering"] = dict(old["engineering"], kept_from=k)
    elif a.skip != "a": R["engineering"] = engineering(a, device)
    if "engineering" in R:
        A = R["engineering"]; b = A["modes"]["batched"]; bc = A["modes"].get("batched+bf16+compile")
        summary.append(f"- (a) engineering gain, same {A['steps']} steps and ρ {A['rho']}: batched {b['gain_vs_loop']:.2f}× the one-at-a-time loop "
                       f"({A['samples']} samples, identical noise, max |difference| {b['max_abs_diff_vs_loop']:.1e})"
                       + (f"; with bf16 + torch.compile {bc['gain_vs_loop']:.2f}×" if isinstance(bc, dict) else "; bf16 and torch.compile: not measured (no GPU)")
                       + (f" [kept from commit {A['kept_from']['commit']}]" if A.get("kept_from") else ""))
    if a.skip != "b":
        R["algorithmic"], study = algorithmic(SMOKE_TOY if a.smoke else TOY, a.seed)
        B = R["algorithmic"]
        out.mkdir(parents=True, exist_ok=True); study.to_csv(out/"bench_sampling.csv", index=False, float_format="%.6g")
        if B["validated"] is None:
            why = "no converged reference" if B["reference"] is None else "no cheaper setting passes the two-sided check, with either reverse variance"
            summary.append(f"- (b) algorithmic gain at equal accuracy: none ({why})")
        else:
            summary.append(f"- (b) algorithmic gain at equal accuracy (Gaussian ε-model): {B['validated']['steps']} steps ρ {B['validated']['rho']} "
                           f"{B['validated']['variance']} vs the converged {B['reference']['steps']}-step ρ {B['reference']['rho']} fixed_small reference: "
                           f"{B['gain_eps_evals']:.0f}× fewer ε-evaluations, {B['gain_seconds']:.1f}× less time")
        if B["reference"] is not None:
            for var, v in B["validated_by_variance"].items():
                summary.append(f"- (b) {var}: " + ("no cheaper setting passes" if v is None else
                               f"cheapest passing {v['steps']} steps ρ {v['rho']} ({B['reference']['steps']/v['steps']:.0f}× fewer ε-evaluations)"))
        C = B["contraction"]; by = lambda var, k, s_: next(c["ratio"] for c in C if c["variance"] == var and c["steps"] == k and c["data_std"] == s_)
        s0, ks = max(c["data_std"] for c in C), sorted({c["steps"] for c in C})
        for s_ in sorted({c["data_std"] for c in C}, reverse=True):
            summary.append(f"- unguided sample std / data std (exact ε-model, data std {s_:g}) at {'/'.join(map(str, ks))} steps: "
                           + "; ".join(f"{v} " + "/".join(f"{by(v, k, s_):.3f}" for k in ks) for v in ALL_VARIANCES))
        summary.append("- (b) on the trained ellipse DDPM needs the GPU campaign (tools/gpu_campaign.py): not measured here")
    if a.ellipse_cache:
        try: R["ellipse_variance"] = E = ellipse_variance(a.ellipse_cache, a.ellipse_n, a.ellipse_steps, a.seed)
        except FileNotFoundError as e: summary.append(f"- (c) not measured: {e}")
        else:
            for k in a.ellipse_steps:
                r = {x["variance"]: x for x in E["rows"] if x["steps"] == k}
                summary.append(f"- (c) quick ellipse DDPM, {k} unguided steps, {a.ellipse_n} samples: clean single ellipses "
                               + ", ".join(f"{v} {r[v]['frac_single_ellipse']:.3f}" for v in r) + "; per-image std "
                               + ", ".join(f"{v} {r[v]['img_std_mean']:.4f}" for v in r) + f" (data {E['real_img_std_mean']:.4f})")
    R["summary"] = summary
    out.mkdir(parents=True, exist_ok=True)
    (out/"bench_sampling.json").write_text(json.dumps(R, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    (out/"bench_sampling.md").write_text(markdown(R))
    print("\n".join(summary)); print(f"wrote {out}/bench_sampling.md and .json (torch threads {torch.get_num_threads()}, device {device})")
    return R

if __name__ == "__main__": main()
