"""GPU campaign: the paper-size ellipse DDPM, its classifiers, the sampler study and Table 1 in one timed, resumable run.

What it does, stage by stage (each writes `OUT/stages/<stage>.json` when it finishes; a rerun skips finished stages
and resumes unfinished ones from their checkpoints / per-setting / per-target files in `OUT/cache`):

1. `env`          GPU, torch, diffusers versions.
2. `data`         the attribution paper's 10,000 ellipse images (32×32) and the train/val/test split.
3. `classifiers`  the ellipse classifier and the log-aspect-ratio and area regressors (the paper's Table 6 CNN) with
                  their test metrics.
4. `ddpm`         the PAPER-size ε-model (`make_unet2d("ellipse")`, 9.4 M parameters; the paper's lucidrains U-Net has
                  9.2 M) trained for a fixed wall-clock budget: a short calibration run measures the step time, then
                  training resumes from its checkpoint up to the number of steps that fits the budget (constant
                  learning rate after warm-up, EMA, bf16 autocast on a GPU). Achieved FLOP rate = counted FLOPs of a
                  training step (FlopCounterMode) × steps / seconds, against 790 TFLOP/s (H200 bf16 dense).
5. `quality`      unguided samples and `ellipse_quality` (share of clean single ellipses, KS distances of the moment
                  features to the data).
6. `sampler_study` the convergence chain at the paper's total drift ρ·steps = 100 (250, 500, 1000, 2000 steps) and the
                  cheaper settings, on 6 targets × 128 samples, one setting at a time while the study's time share
                  lasts; `converged_reference` + `few_step_matches` (two-sided) pick the validated sampler. The chain
                  (the reference) uses the package's reverse variance (diffusers "fixed_small", σ_t² = β̃_t); the cheaper
                  settings are tried with it and with "fixed_large" (σ_t² = β_t, Ho et al. 2020 §3.2), since few
                  respaced β̃_t steps contract the samples (bench/bench_sampling.py measures it on an exact ε-model),
                  and with Analytic-DPM's estimated optimal variance (Bao et al. 2022; β_t over-disperses data narrower
                  than N(0, I));
                  the cheapest passing setting of either variance is validated, and Table 1 samples with its variance.
7. `table1`       Table 1 (global score of the classifier for the aspect ratio and the size) at the paper's recipe of
                  200 samples per target and the library's paper profile's target count (every test value, 2,000),
                  with the validated sampler (or, if none validated, the quick profile's setting, flagged). Targets
                  are done in interleaved shards while the time budget lasts, so a partial run still spans the whole
                  feature range, and a rerun continues where it stopped.

The sampler runs in bf16 autocast on a GPU, without `torch.compile` (its compile time, and a recompile for each new batch
shape, would eat a 9-minute budget). With the paper's 2,000 targets × 200 samples per feature, Table 1 may not finish
inside one 9-minute window after training: the table then says how many targets it covers, and the same command run
again continues it.

Everything lands in one folder: `campaign.json` (stages, wall time of each, FLOP rates, sampler, verdicts),
`table1.csv` / `table1.md`, `study.csv`, `classifiers.csv`, and `stages/*.json`.

Running it on a fresh GPU machine without network: install the wheels the machine lacks (diffusers, monai, ...) from a
wheel folder copied next to the checkout, then run from the repository root:

    python3 -m pip install -q --no-index --no-deps --target /tmp/site WHEELS/*.whl && export PYTHONPATH=/tmp/site:$PWD
    python3 tools/gpu_campaign.py --out campaign_out        # stages get 480 s (--budget); rerun the same line to resume

On CPU, `python tools/gpu_campaign.py --size smoke --out /tmp/campaign` runs every stage on tiny sizes in well under a
minute (tests/test_campaign.py runs it twice and checks that the second run skips every stage).
"""
import argparse, json, math, os, platform, sys, time
from pathlib import Path
import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"bench"))
from compute_model import H200_BF16_DENSE, eps_train_step, guided_step, lib, unet2d_call, _Clamp01   # FLOP counts; library names wherever they live
from bench_sampling import ALL_VARIANCES, sampler_scheduler, matches_by_variance   # reverse variance as a sampler-study axis (one fixed_small reference)

SIZES = {
    # data: images; clf_profile: `ELLIPSE_PROFILES` recipe of the Table 6 CNNs; unet: `make_unet2d` profile; train_*: DDPM recipe
    # for the budget; study: sampler study (targets, samples, chain at drift ρ·steps, cheaper settings); table1: targets (None:
    # every test value, the library's paper profile), samples per target, targets per batch; cheap_large: the cheaper settings
    # again with the reverse variance σ_t² = β_t (diffusers "fixed_large") instead of the package's β̃_t ("fixed_small"); cheap_analytic:
    # with Analytic-DPM's variance (Bao et al. 2022), Γ_t from n_mc noised training images per timestep
    "smoke": dict(n_data=400, clf_profile="smoke", unet="tiny", batch=8, lr=2e-3, warmup=1, calib_steps=3, ckpt_every=3,
                  max_steps=6, train_share=0.25, n_quality=8, quality_steps=5,
                  study=dict(n_targets=2, n=4, drift=2.0, chain=(4, 8), cheap={2: [0.5]}, cheap_large={2: [0.5]}, cheap_analytic={2: [0.5]},
                             n_mc=8, n_boot=100, share=0.25),
                  table1=dict(n_targets=4, n=3, targets_per_batch=2, shards=2, n_boot=100, steps=4, y="probability", tol=1e6),
                  budget=120.0),
    "full": dict(n_data=10_000, clf_profile="quick", unet="ellipse", batch=128, lr=2e-4, warmup=100, calib_steps=200,
                 ckpt_every=500, max_steps=200_000, train_share=0.40, n_quality=512, quality_steps=100,
                 study=dict(n_targets=6, n=128, drift=100.0, chain=(250, 500, 1000, 2000),
                            cheap={25: [0.4, 0.8], 50: [0.2, 0.4], 100: [0.1, 0.2]},
                            cheap_large={25: [0.4, 0.8], 50: [0.2, 0.4], 100: [0.1, 0.2]},
                            cheap_analytic={25: [0.4, 0.8], 50: [0.2, 0.4], 100: [0.1, 0.2]}, n_mc=256, n_boot=2000, share=0.15),
                 table1=dict(n_targets=None, n=200, targets_per_batch=8, shards=40, n_boot=5000, steps=None, y="decision", tol=0.3),
                 budget=480.0),   # 8 minutes from the first stage: with the wheel install and imports, the command ends inside 9
}
FEATURES = {"aspect_ratio": "log_ar", "size": "area"}   # Table 1's two features -> data column / regressor key
PAPER_TABLE1 = {"aspect_ratio": 0.871, "size": 0.049}  # attribution paper, Table 1

class Campaign:
    "Stage bookkeeping: skip finished stages, time the others, keep everything in one folder."
    def __init__(self, out, size, budget):
        self.out, self.size, self.t0 = Path(out), size, time.perf_counter()
        (self.out/"stages").mkdir(parents=True, exist_ok=True)
        self.budget = budget
    def elapsed(self): return time.perf_counter() - self.t0
    def left(self): return self.budget - self.elapsed()
    def done(self, name):
        f = self.out/"stages"/f"{name}.json"
        return json.loads(f.read_text()) if f.exists() else None
    def run(self, name, fn):
        prev = self.done(name)
        if prev is not None:
            log(f"[{name}] skipped (done in an earlier run, {prev['wall_s']:.1f} s)"); return prev
        log(f"[{name}] start ({self.elapsed():.0f} s elapsed, {self.left():.0f} s of the budget left)")
        t = time.perf_counter(); res = fn()
        res = dict(res, wall_s=time.perf_counter() - t)
        if res.pop("_partial", False):   # not finished (budget): leave it resumable, do not mark it done
            log(f"[{name}] stopped at the budget after {res['wall_s']:.1f} s (rerun to continue)"); return res
        tmp = self.out/"stages"/f".{name}.json.tmp"
        tmp.write_text(json.dumps(res, indent=1, default=_plain)); tmp.replace(self.out/"stages"/f"{name}.json")
        log(f"[{name}] done in {res['wall_s']:.1f} s"); return res

def _plain(o):
    if hasattr(o, "item"): return o.item()
    if hasattr(o, "tolist"): return o.tolist()
    return str(o)

def log(msg): print(msg, file=sys.stderr, flush=True)

def sync(dev):
    if dev.type == "cuda": torch.cuda.synchronize()

# ---------------------------------------------------------------- stages
def stage_env(dev):
    import diffusers
    out = dict(python=platform.python_version(), torch=torch.__version__, diffusers=diffusers.__version__, device=str(dev),
               threads=torch.get_num_threads())
    if dev.type == "cuda": out |= dict(gpu=torch.cuda.get_device_name(dev), gpu_mem_gb=torch.cuda.get_device_properties(dev).total_memory/2**30)
    return out

def stage_data(S, cache, seed):
    d = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache); sp = lib("split_indices")(S["n_data"], seed=seed)
    return dict(n=int(len(d["images"])), split={k: int(len(v)) for k, v in sp.items()})

def classifiers(S, cache, seed, dev):
    return lib("ellipse_models")(S["clf_profile"], cache_dir=cache, seed=seed, device=str(dev), progress=False,
                                  which=("classifier", "log_ar", "area"))

def stage_classifiers(S, cache, seed, dev, out):
    ms = classifiers(S, cache, seed, dev)
    rows = {k: dict(metrics=v["metrics"], epochs=v.get("epochs"), train_s=v.get("train_time"), loaded=v["loaded"]) for k, v in ms.items()}
    import pandas as pd
    pd.DataFrame([dict(model=k, **{m: x for m, x in r["metrics"].items() if np.isscalar(x)}) for k, r in rows.items()]).to_csv(out/"classifiers.csv", index=False)
    return dict(profile=S["clf_profile"], models=rows)

def _ddpm(S, images, cache, seed, dev, steps, ckpt_every, callback=None):
    kw = dict(batch_size=S["batch"], lr=S["lr"], lr_schedule="constant", lr_warmup=S["warmup"], ema_decay=0.999, ema_power=2/3)
    return lib("load_or_train_ddpm")(images, S["unet"], "campaign-ellipse-ddpm", steps=steps, cache_dir=cache, seed=seed,
                                      with_info=True, device=str(dev), progress=False, ckpt_every=ckpt_every, callback=callback, **kw)

def stage_ddpm(S, C, cache, seed, dev):
    images = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache)["images"]
    stamps = []
    cb = lambda step, loss: stamps.append((step, time.perf_counter(), float(loss)))
    t = time.perf_counter()
    _ddpm(S, images, cache, seed, dev, S["calib_steps"], S["calib_steps"], cb)     # calibration (cached: free on rerun)
    calib_s = time.perf_counter() - t
    plan = C.out/"stages"/"ddpm_plan.json"
    if plan.exists(): p = json.loads(plan.read_text())
    else:
        dts = np.diff([s[1] for s in stamps])[len(stamps)//4:] if len(stamps) > 4 else np.array([calib_s/max(S["calib_steps"], 1)])
        step_s = float(np.median(dts))
        train_budget = S["train_share"]*C.budget - calib_s
        extra = int(max(0.0, train_budget)/step_s) // S["ckpt_every"] * S["ckpt_every"]
        p = dict(step_s_calibration=step_s, calib_s=calib_s, steps=int(min(S["max_steps"], S["calib_steps"] + extra)))
        plan.write_text(json.dumps(p))
    stamps.clear(); t = time.perf_counter()
    unet, sched, info = _ddpm(S, images, cache, seed, dev, p["steps"], S["ckpt_every"], cb)
    sync(dev); wall = time.perf_counter() - t
    ran = len(stamps)
    fl = eps_train_step(lambda: lib("make_unet2d")(S["unet"], 1, 32), unet2d_call, (1, 32, 32))*S["batch"]
    rate = fl*ran/wall if ran and wall > 0 else float("nan")
    return dict(unet=S["unet"], params_M=sum(q.numel() for q in unet.parameters())/1e6, steps=p["steps"], batch=S["batch"],
                lr=S["lr"], steps_this_run=ran, train_s_this_run=wall, step_s_calibration=p["step_s_calibration"],
                final_loss=stamps[-1][2] if stamps else None, flops_per_step=fl, achieved_tflops=rate/1e12,
                share_of_h200_peak=rate/H200_BF16_DENSE, path=str(info["path"]))

def load_ddpm(C, S, cache, seed, dev):
    d = C.done("ddpm"); images = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache)["images"]
    unet, sched, _ = _ddpm(S, images, cache, seed, dev, d["steps"], S["ckpt_every"])
    return unet.to(dev).eval().requires_grad_(False), sched

def stage_quality(S, C, cache, seed, dev):
    unet, sched = load_ddpm(C, S, cache, seed, dev)
    t = time.perf_counter()
    xs = lib("sample")(lib("eps_fn")(unet), sched, (S["n_quality"], 1, 32, 32), num_inference_steps=S["quality_steps"],
                       generator=torch.Generator().manual_seed(seed + 1), device=dev, progress=False)
    sync(dev); s = time.perf_counter() - t
    samples = lib("from_model_range")(xs.float()).cpu().numpy()
    data = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache)["images"][:2000]
    return dict(n=S["n_quality"], steps=S["quality_steps"], sample_s=s, quality=lib("ellipse_quality")(samples, data))

def _models(S, cache, seed, dev):
    ms = classifiers(S, cache, seed, dev)
    return {k: v["model"].to(dev).eval().requires_grad_(False) for k, v in ms.items()}

def _score_ci(sw, n_boot):
    try: r = lib("scores_from_sweep")(sw, n_boot=n_boot)
    except ValueError: return dict(score=np.nan, score_lo=np.nan, score_hi=np.nan)
    lo, hi = r["bootstrap"].ci_global
    return dict(score=r["global_score"], score_lo=lo, score_hi=hi)

def stage_study(S, C, cache, seed, dev):
    T = S["study"]; unet, sched = load_ddpm(C, S, cache, seed, dev); m = _models(S, cache, seed, dev)
    data = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache)
    test = lib("split_indices")(S["n_data"], seed=seed)["test"]
    targets = np.sort(np.random.default_rng(seed).choice(data["log_ar"][test], T["n_targets"], replace=False)).astype(np.float32)
    sigma_v = float(lib("feature_stats")(data["log_ar"], targets))
    g, decide = lib("sampler_feature")(m["log_ar"]), lib("sampler_decision")(m["classifier"])
    moment_log_ar, ellipse_check = lib("moment_log_ar"), lib("ellipse_check")
    def moment(x):   # the data chapter's moment feature: no network, so it cannot share the regressor's blind spots
        x01 = ((x.float() + 1)/2).clamp(0, 1); x01 = x01.where(x01 > 0.05, 0)
        out = torch.full((len(x),), float("nan")); ok = (x01.sum((1, 2, 3)) >= 1).cpu()
        if ok.any(): out[ok] = moment_log_ar(x01[ok.to(x01.device)].cpu()).float()
        return out
    clean = lambda x: ellipse_check(((x.float() + 1)/2).clamp(0, 1).cpu())
    N = T["n_targets"]*T["n"]
    kw = dict(classifier=decide, score_fn=lambda sw: _score_ci(sw, T["n_boot"]), measures=dict(moment=moment), quality=clean,
              out_dir=C.out/"cache"/"sampler_study", seed=seed)
    if dev.type == "cuda":   # sampling_study samples where x_T lives: start on the GPU, from streams independent of the step noise
        kw |= dict(x_T=torch.randn((N, 1, 32, 32), generator=torch.Generator().manual_seed(seed + 7919)).to(dev), amp_dtype=torch.bfloat16)
    chain = lib("convergence_chain")(T["drift"], T["chain"])
    ch_ = [("fixed_small", k, r) for k in sorted(chain) for r in chain[k]]   # the chain's longest setting last: the others can already decide
    cheap = [("fixed_small", k, r) for k in sorted(T["cheap"]) for r in T["cheap"][k]]
    for v in ALL_VARIANCES[1:]:
        key = "cheap_" + v.replace("fixed_", "")
        cheap += [(v, k, r) for k in sorted(T.get(key, {})) for r in T[key][k]]
    grid = ch_[:-1] + cheap + ch_[-1:]
    x0 = lib("to_model_range")(torch.as_tensor(data["images"]))   # the images the DDPM was trained on
    scheds = {v: sampler_scheduler(v, sched, unet_eps(unet), x0, sorted({k for w, k, _ in grid if w == v}), n_mc=T.get("n_mc", 256),
                                   seed=seed, device=dev) for v in ALL_VARIANCES if any(w == v for w, _, _ in grid)}
    kws = {v: dict(kw, out_dir=C.out/"cache"/("sampler_study" if v == "fixed_small" else f"sampler_study-{v}")) for v in scheds}
    stop = C.elapsed() + T["share"]*C.budget
    done = []
    for var, k, r in grid:   # one setting at a time (each cached), while the study's share of the budget lasts
        if C.elapsed() > stop: break
        t = time.perf_counter()
        lib("sampling_study")(unet_eps(unet), scheds[var], g, targets, T["n"], (1, 32, 32), sigma_v, steps=(k,), rhos={k: [r]}, **kws[var])
        done.append(dict(variance=var, steps=k, rho=r, seconds=time.perf_counter() - t))
        log(f"  study setting {var} {k} steps rho {r:g}: {done[-1]['seconds']:.1f} s")
    import pandas as pd
    parts = {}
    for var in scheds:   # reload every finished setting of each variance (cached: no sampling)
        have = {}
        for d in done:
            if d["variance"] == var: have.setdefault(d["steps"], []).append(d["rho"])
        if have:
            parts[var] = lib("sampling_study")(unet_eps(unet), scheds[var], g, targets, T["n"], (1, 32, 32), sigma_v,
                                               steps=sorted(have, reverse=True), rhos=have, **kws[var]).assign(variance=var)
    study = pd.concat(parts.values(), ignore_index=True) if parts else pd.DataFrame()
    study.to_csv(C.out/"study.csv", index=False, float_format="%.6g")
    small = parts.get("fixed_small", pd.DataFrame(columns=["steps", "rho", "rho_max", "rho_pieces", "err", "sigma_v"]))
    ref, ch = lib("converged_reference")(small, T["drift"], chain_steps=T["chain"]) if len(small) else (None, small)
    res = dict(targets=targets.tolist(), n=T["n"], sigma_v=sigma_v, settings_done=done, settings_planned=len(grid),
               reference=None if ref is None else dict(steps=int(small.loc[ref, "steps"]), rho=small.loc[ref, "rho_pieces"], variance="fixed_small"),
               validated=None, validated_by_variance={v: None for v in scheds}, chain=ch.to_dict("records"))
    if ref is not None:   # one fixed_small reference; each variance's cheaper settings checked two-sidedly against it
        m, by, best = matches_by_variance(parts, ref)
        res["matches"] = m.to_dict("records")
        res["validated_by_variance"] |= {v: dict(num_steps=int(r["steps"]), rho=lib("parse_rho")(r["rho_pieces"])) for v, r in by.items() if r is not None}
        if best is not None:   # the cheapest passing setting over both variances; the algorithmic gain at equal accuracy on the ellipse models
            res["validated"] = dict(num_steps=int(best["steps"]), rho=lib("parse_rho")(best["rho_pieces"]), variance=best["variance"])
            res["gain_eps_evals"] = res["reference"]["steps"]/res["validated"]["num_steps"]
            res["gain_seconds"] = float(small.loc[ref, "seconds"])/float(best["seconds"])
    if len(done) < len(grid): res["_partial"] = True
    return res

def unet_eps(unet): return lib("eps_fn")(unet)

def stage_table1(S, C, cache, seed, dev):
    T = S["table1"]; unet, sched = load_ddpm(C, S, cache, seed, dev); m = _models(S, cache, seed, dev)
    st = C.done("sampler_study")
    val = st and st.get("validated")
    sp = (dict(num_steps=val["num_steps"], rho=val["rho"], variance=val.get("variance", "fixed_small"), validated=True) if val
          else dict(lib("SAMPLER_PROFILES")["quick"], variance="fixed_small", validated=False))
    if sp["variance"] != "fixed_small":   # the validated setting's reverse variance (analytic: Γ_t for its steps, as in the study)
        data = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache)
        x0 = lib("to_model_range")(torch.as_tensor(data["images"]))   # the images the DDPM was trained on
        sched = sampler_scheduler(sp["variance"], sched, unet_eps(unet), x0, [sp["num_steps"]], n_mc=S["study"].get("n_mc", 256), seed=seed, device=dev)
    if isinstance(sp["rho"], dict): sp["rho"] = {int(k): float(v) for k, v in sp["rho"].items()}   # pieces read back from JSON: int keys
    if T["steps"] is not None and not val: sp["num_steps"] = T["steps"]   # smoke: fewer steps still
    data = lib("make_ellipses")(S["n_data"], seed=seed, cache_dir=cache); test = lib("split_indices")(S["n_data"], seed=seed)["test"]
    rows, fl_step = [], guided_step(lambda: lib("make_unet2d")(S["unet"], 1, 32), unet2d_call, (1, 32, 32),
                                                 (lambda: _Clamp01(lib("EllipseCNN")()),))
    sweep_fn, load_sweep, study_targets = lib("constrained_sweep"), lib("load_sweep"), lib("study_targets")
    partial, jobs = False, {}
    for f, key in FEATURES.items():
        v_test = data[key][test]
        targets = study_targets(v_test, len(v_test) if T["n_targets"] is None else T["n_targets"])
        args = (unet_eps(unet), sched, lib("sampler_feature")(m[key]), targets, T["n"], (1, 32, 32), C.out/"cache"/f"table1-{f}", v_test)
        jobs[f] = dict(args=args, v_test=v_test, targets=targets, shards=0, wall=0.0)
    kw = dict(classifier=lib("sampler_decision")(m["classifier"], T["y"]), rho=sp["rho"], num_steps=sp["num_steps"], tol=T["tol"], seed=seed,
              targets_per_batch=T["targets_per_batch"], device=dev, progress=False, amp_dtype=torch.bfloat16 if dev.type == "cuda" else None)
    lt = lib("target_file")
    before = {f: sum(lt(j["args"][6], i).exists() for i in range(len(j["targets"]))) for f, j in jobs.items()}
    for r in range(T["shards"]):   # interleaved shards of the sorted targets, both features in turn: a partial run spans both ranges
        for f, j in jobs.items():
            if C.left() < 15: partial = True; break
            t = time.perf_counter(); sweep_fn(*j["args"], rank=r, world_size=T["shards"], **kw); sync(dev)
            j["wall"] += time.perf_counter() - t; j["shards"] += 1
        if partial: break
    for f, j in jobs.items():
        out_dir, v_test, targets, wall, shards = j["args"][6], j["v_test"], j["targets"], j["wall"], j["shards"]
        have = [i for i in range(len(targets)) if lt(out_dir, i).exists()]
        if not have: rows.append(dict(feature=f, targets_done=0, targets=len(targets))); continue
        sw = load_sweep(out_dir, have); acc = sw["accepted"].astype(bool)
        try: sc = lib("scores_from_sweep")(sw, n_boot=T["n_boot"], seed=seed)
        except ValueError as e:   # e.g. no accepted sample: say so in the table instead of losing the run
            rows.append(dict(feature=f, targets_done=len(have), targets=len(targets), error=str(e), samples_this_run=(len(have) - before[f])*T["n"],
                             sampling_wall_s_this_run=wall)); continue
        ce = lib("constraint_errors")(sw["v"], sw["target"], acc, float(lib("feature_stats")(v_test)))
        lo, hi = sc["bootstrap"].ci_global
        rows.append(dict(feature=f, global_score=sc["global_score"], ci_lo=lo, ci_hi=hi, paper=PAPER_TABLE1[f],
                         no_effect_floor=(len(have) - 1)/max(int(acc.sum()) - 1, 1), acceptance=float(acc.mean()),
                         targets_done=len(have), targets=len(targets), samples=int(len(acc)),
                         err_mae_sigma=ce["mae_sigma"], shards_this_run=shards, sampling_wall_s_this_run=wall,
                         samples_this_run=(len(have) - before[f])*T["n"]))
    import pandas as pd
    df = pd.DataFrame(rows); df.to_csv(C.out/"table1.csv", index=False, float_format="%.6g")
    md = ["| feature | global score [95% CI] | paper | no-effect floor (G−1)/(N−1) | acceptance | targets done | samples |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "global_score" not in r:
            md.append(f"| {r['feature']} | {r.get('error', 'not reached')} | {PAPER_TABLE1[r['feature']]} | | | {r['targets_done']} of {r['targets']} | |"); continue
        md.append(f"| {r['feature']} | {r['global_score']:.3f} [{r['ci_lo']:.3f}, {r['ci_hi']:.3f}] | {r['paper']} | {r['no_effect_floor']:.4f} | "
                  f"{r['acceptance']:.3f} | {r['targets_done']} of {r['targets']} | {r['samples']} |")
    md += ["", f"Sampler: {sp['num_steps']} steps, ρ {sp['rho']}, reverse variance {sp['variance']} ({'validated by the sampler study' if sp['validated'] else 'NOT validated: quick profile setting'}); "
           f"{T['n']} samples per target; rejection at {T['tol']:g} σ_V (paper: 0.3, App. D.1); Y = classifier {T['y']}."]
    (C.out/"table1.md").write_text("\n".join(md) + "\n")
    new_steps, wall = sum(r.get("samples_this_run", 0) for r in rows)*sp["num_steps"], sum(r.get("sampling_wall_s_this_run", 0) for r in rows)
    return dict(rows=rows, sampler=sp, flops_per_sample_step=fl_step, _partial=partial, sample_steps_this_run=new_steps,
                achieved_tflops_sampling_this_run=fl_step*new_steps/wall/1e12 if new_steps and wall > 0 else None)

# ---------------------------------------------------------------- main
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=list(SIZES), default="full")
    p.add_argument("--out", default="campaign_out", help="output folder (everything, including the model cache)")
    p.add_argument("--budget", type=float, default=None, help="wall-clock seconds for the whole run (default: the size's)")
    p.add_argument("--device", default="auto"); p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: leave as is)")
    a = p.parse_args(argv)
    S = SIZES[a.size]
    if a.threads: torch.set_num_threads(a.threads)
    dev = lib("get_device")(a.device)
    if a.size == "full" and dev.type != "cuda": log("warning: --size full on a CPU will not fit any sensible budget")
    C = Campaign(a.out, a.size, a.budget or S["budget"]); cache = C.out/"cache"
    stages = {}
    stages["env"] = C.run("env", lambda: stage_env(dev))
    stages["data"] = C.run("data", lambda: stage_data(S, cache, a.seed))
    stages["classifiers"] = C.run("classifiers", lambda: stage_classifiers(S, cache, a.seed, dev, C.out))
    stages["ddpm"] = C.run("ddpm", lambda: stage_ddpm(S, C, cache, a.seed, dev))
    stages["quality"] = C.run("quality", lambda: stage_quality(S, C, cache, a.seed, dev))
    stages["sampler_study"] = C.run("sampler_study", lambda: stage_study(S, C, cache, a.seed, dev))
    stages["table1"] = C.run("table1", lambda: stage_table1(S, C, cache, a.seed, dev))
    summary = dict(size=a.size, budget_s=C.budget, wall_s_this_run=C.elapsed(), device=str(dev),
                   stage_wall_s={k: v.get("wall_s") for k, v in stages.items()},
                   train_tflops=stages["ddpm"].get("achieved_tflops"), train_share_of_790=stages["ddpm"].get("share_of_h200_peak"),
                   sampling_tflops=stages["table1"].get("achieved_tflops_sampling_this_run"),
                   complete=all(C.done(k) is not None for k in stages), stages=stages)
    (C.out/"campaign.json").write_text(json.dumps(summary, indent=1, default=_plain))
    log(f"campaign {'complete' if summary['complete'] else 'partial (rerun to continue)'} in {C.elapsed():.0f} s; see {C.out}/campaign.json, table1.md")
    if (C.out/"table1.md").exists(): print((C.out/"table1.md").read_text())
    return summary

if __name__ == "__main__": main()
