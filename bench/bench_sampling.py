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
    gain is the reference's cost over the validated setting's, in ε-evaluations and in measured seconds. On the trained
    ellipse models this needs the GPU campaign (`tools/gpu_campaign.py`): the chain alone is hours on two CPU cores.

    python bench/bench_sampling.py                       # both parts on CPU (paper-size 9.4 M ellipse U-Net for (a)); ~minutes
    python bench/bench_sampling.py --smoke               # tiny sizes, seconds (the tests run this)
    python bench/bench_sampling.py --model quick-ellipse --cache-dir cache   # (a) on the trained quick ellipse DDPM + regressor
    python bench/bench_sampling.py --device cuda --n 64 --targets 8          # on a GPU: adds bf16 + torch.compile to (a)

Writes bench/results/bench_sampling.{md,json} (or --out), with the command and the torch thread count.
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
TOY = dict(std=0.5, size=8, top_rows=4, n_targets=6, n=256, drift=10.0, chain=(50, 100, 200, 400),
           steps=(5, 10, 25, 50), n_boot=1000,
           rhos={5: [1.0], 10: [0.0, 0.5, {0: 0.1, 100: 1.0}], 25: [0.4, {0: 0.1, 100: 0.8}, {0: 0.2, 200: 0.8}],
                 50: [0.3, {0: 0.1, 100: 0.4}]})   # constant ρ and two-piece ρ (large early, Table 9's 0.1 late), as chapter 03 tries
SMOKE_TOY = dict(TOY, n_targets=3, n=32, chain=(20, 40), drift=4.0, steps=(5, 10), rhos={5: [0.8], 10: [0.0, 0.4]}, n_boot=200)

def toy_score(s, n_boot):
    "The library's global score of the accepted samples (equal weight per target) with its bootstrap interval."
    try: r = lib("scores_from_sweep")(s, n_boot=n_boot)
    except ValueError: return dict(score=np.nan, score_lo=np.nan, score_hi=np.nan)
    lo, hi = r["bootstrap"].ci_global
    return dict(score=r["global_score"], score_lo=lo, score_hi=hi)

def algorithmic(T, seed):
    make_scheduler, gaussian_eps = lib("make_scheduler"), lib("gaussian_eps")
    sampling_study, convergence_chain = lib("sampling_study"), lib("convergence_chain")
    converged_reference, few_step_matches, validated_sampler = lib("converged_reference"), lib("few_step_matches"), lib("validated_sampler")
    sched = make_scheduler(clip_sample=False); eps = gaussian_eps(sched, 0.0, T["std"]); s = T["size"]
    sigma_v = T["std"]/s   # V = mean of s² iid N(0, std²) pixels
    targets = (np.linspace(-1.5, 1.5, T["n_targets"])*sigma_v).astype(np.float32)
    grid = {k: list(v) for k, v in T["rhos"].items()}
    for k, (r,) in convergence_chain(T["drift"], T["chain"]).items(): grid.setdefault(k, []).append(r)
    top = T["top_rows"]
    clf = lambda x: (x[..., :top, :].mean((1, 2, 3)) > 0).float()                  # Y: depends on V only partly
    median = lambda x: x.flatten(1).median(1).values                               # an independent measure of the constraint
    clean = lambda x: (x.flatten(1).std(1) - T["std"]).abs() < 0.5*T["std"]          # "looks like the data": pixel spread near s
    t0 = time.perf_counter()
    study = sampling_study(eps, sched, image_mean, targets, T["n"], (1, s, s), sigma_v, steps=sorted(grid, reverse=True), rhos=grid,
                           seed=seed, classifier=clf, score_fn=lambda sw: toy_score(sw, T["n_boot"]), measures=dict(median=median),
                           quality=clean)
    wall = time.perf_counter() - t0
    ref, chain = converged_reference(study, T["drift"], chain_steps=T["chain"])
    val = validated_sampler(study, T["drift"], dict(chain_steps=T["chain"]))
    res = dict(toy={k: (v if not isinstance(v, dict) else {str(kk): [lib("_rho_label")(r) for r in vv] for kk, vv in v.items()}) for k, v in T.items()},
               seed=seed, study_wall_s=wall, samples_per_setting=int(len(targets)*T["n"]),
               chain=chain[["steps", "rho", "err", "accept", "score", "score_lo", "score_hi", "still_moving", "narrow"]].to_dict("records"),
               reference=None, validated=None)
    if ref is not None:
        r = study.loc[ref]
        res["reference"] = dict(steps=int(r["steps"]), rho=r["rho_pieces"], seconds=float(r["seconds"]), score=float(r["score"]),
                                err=float(r["err"]), accept=float(r["accept"]))
        m = few_step_matches(study, int(r["steps"]), r["rho_pieces"])
        res["matches"] = m[["steps", "rho_pieces", "err", "err_median", "accept", "clean", "score", "d_lo", "d_hi", "seconds", "ok"]].to_dict("records")
    if val is not None:
        v = study[(study["steps"] == val["num_steps"]) & (study["rho_pieces"] == lib("_rho_label")(val["rho"]))].iloc[0]
        res["validated"] = dict(steps=int(v["steps"]), rho=v["rho_pieces"], seconds=float(v["seconds"]), score=float(v["score"]),
                                err=float(v["err"]), accept=float(v["accept"]))
        rr = res["reference"]
        res["gain_eps_evals"] = rr["steps"]/res["validated"]["steps"]
        res["gain_seconds"] = rr["seconds"]/res["validated"]["seconds"]
    return res, study

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
        L += ["## (a) Engineering gain at the same steps and ρ", "",
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
              f"cheaper settings {B['toy']['rhos']}; study {B['study_wall_s']:.1f} s.", "",
              "| steps | ρ | err | accept | score [95% CI] | still moving | narrow |", "|---|---|---|---|---|---|---|"]
        for c in B["chain"]:
            L.append(f"| {c['steps']} | {c['rho']:g} | {c['err']:.4f} | {c['accept']:.3f} | {c['score']:.3f} [{c['score_lo']:.3f}, {c['score_hi']:.3f}] | "
                     f"{c['still_moving']} | {c['narrow']} |")
        if B.get("matches"):
            L += ["", f"Against the converged reference ({B['reference']['steps']} steps, ρ {B['reference']['rho']}):", "",
                  "| steps | ρ | err | err (median) | accept | clean | score | Δscore 90% CI | seconds | ok |", "|---|---|---|---|---|---|---|---|---|---|"]
            for m in B["matches"]:
                L.append(f"| {m['steps']} | {m['rho_pieces']} | {m['err']:.4f} | {m['err_median']:.4f} | {m['accept']:.3f} | {m['clean']:.3f} | {m['score']:.3f} | "
                         f"[{m['d_lo']:.3f}, {m['d_hi']:.3f}] | {m['seconds']:.2f} | {m['ok']} |")
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
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    q = lib("SAMPLER_PROFILES")["quick"]
    a.steps = a.steps or (4 if a.smoke else q["num_steps"]); a.rho = q["rho"] if a.rho is None else a.rho
    if a.smoke: a.model, a.size, a.targets, a.n = "tiny", 16, 2, 2
    device = lib("get_device")(a.device)
    R = dict(command="python bench/bench_sampling.py " + " ".join(argv if argv is not None else sys.argv[1:]), commit=_sha(),
             date=str(datetime.date.today()), device=str(device), threads=torch.get_num_threads())
    summary = []
    if a.skip != "a":
        R["engineering"] = A = engineering(a, device)
        b = A["modes"]["batched"]
        summary.append(f"- (a) engineering gain, same {A['steps']} steps and ρ {A['rho']}: batched {b['gain_vs_loop']:.2f}× the one-at-a-time loop "
                       f"({A['samples']} samples, identical noise, max |difference| {b['max_abs_diff_vs_loop']:.1e})"
                       + (f"; with bf16 + torch.compile {A['modes']['batched+bf16+compile']['gain_vs_loop']:.2f}×" if device.type == "cuda"
                          else "; bf16 and torch.compile: not measured (no GPU)"))
    if a.skip != "b":
        R["algorithmic"], study = algorithmic(SMOKE_TOY if a.smoke else TOY, a.seed)
        B = R["algorithmic"]
        if B["validated"] is None:
            why = "no converged reference" if B["reference"] is None else "no cheaper setting passes the two-sided check"
            summary.append(f"- (b) algorithmic gain at equal accuracy: none ({why})")
        else:
            summary.append(f"- (b) algorithmic gain at equal accuracy (Gaussian ε-model): {B['validated']['steps']} steps ρ {B['validated']['rho']} "
                           f"vs the converged {B['reference']['steps']}-step ρ {B['reference']['rho']} reference: {B['gain_eps_evals']:.0f}× fewer "
                           f"ε-evaluations, {B['gain_seconds']:.1f}× less time")
        summary.append("- (b) on the trained ellipse DDPM needs the GPU campaign (tools/gpu_campaign.py): not measured here")
    R["summary"] = summary
    out = Path(a.out); out.mkdir(parents=True, exist_ok=True)
    (out/"bench_sampling.json").write_text(json.dumps(R, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o)) + "\n")
    (out/"bench_sampling.md").write_text(markdown(R))
    print("\n".join(summary)); print(f"wrote {out}/bench_sampling.md and .json (torch threads {torch.get_num_threads()}, device {device})")
    return R

if __name__ == "__main__": main()
