"""Throughput of constrained sampling: the paper's recipe as a plain loop vs diffexplain's sampler, side by side.

Reference: attribution Eq. 8 written out directly -- fp32, all 1000 DDPM steps (rho = 0.1, Table 9), one target value
at a time. Ours: `constrained_sample` batched across all targets, respaced to the few-step setting validated in
chapter 03 (`SAMPLER_PROFILES["quick"]`: the fewest steps whose constraint error and global score stayed within the
1000-step sampler's bootstrap intervals on the trained quick ellipse models), and on a GPU bf16 autocast +
`torch.compile` of the U-Net. Both use the same U-Net, scheduler, feature g and targets; the script prints samples/s,
the speed-up, the mean constraint error |g(x) - c0| of each with a 95% bootstrap interval, their ratio, and whether
ours is at equal accuracy (its error no larger than the upper end of the reference's interval).

    python bench/bench_sampling.py                                  # small CPU config (untrained tiny U-Net, 8x8, g = image mean)
    python bench/bench_sampling.py --model quick-ellipse --cache-dir /work/cache --targets 2 --n 4
                                                                    # trained quick ellipse DDPM, g = log-aspect-ratio regressor
    python bench/bench_sampling.py --model ellipse --size 32 --targets 8 --n 200 --device cuda   # GPU: the 9.2 M U-Net
"""
import argparse, time
import numpy as np
import torch
from diffexplain.data import get_device
from diffexplain.diffusion import from_model_range, make_scheduler, make_unet2d, n_params
from diffexplain.guided_sampling import SAMPLER_PROFILES, constrained_sample, parse_rho, sample_seeds

def image_mean(x): return x.mean((1, 2, 3)) # differentiable feature of the synthetic configs, in [-1, 1]

def reference(unet, sched, g, targets, n, rho, shape, device, seed):
    "The paper's recipe, plainly: one target at a time, 1000 steps, fp32 (Eq. 8)."
    sched = make_scheduler(clip_sample=sched.config.clip_sample); sched.set_timesteps(1000)
    out = []
    for j, c0 in enumerate(targets):
        gen = torch.Generator(device).manual_seed(seed + j)
        x = torch.randn((n, *shape), generator=gen, device=device)
        for t in sched.timesteps:
            x = x.detach().requires_grad_(True)
            eps = unet(x, t).sample
            ab = sched.alphas_cumprod[t].to(device)
            x0_hat = (x - (1 - ab).sqrt()*eps)/ab.sqrt()
            loss = (float(c0) - g(x0_hat)).pow(2).sum()
            grad, = torch.autograd.grad(loss, x)
            x_prev = sched.step(eps.detach(), t, x.detach(), generator=gen).prev_sample
            norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
            x = x_prev - rho*grad/norm
        with torch.no_grad(): out.append(g(x.detach()).float().cpu())
    return torch.cat(out)

def ours(unet, sched, g, targets, n, rho, shape, device, seed, steps):
    cuda = device.type == "cuda"
    net = torch.compile(unet) if cuda else unet
    eps = lambda x, t: net(x, t).sample
    gens = [torch.Generator(device).manual_seed(int(s)) for j in range(len(targets)) for s in sample_seeds(seed, j, n)]
    c0 = torch.as_tensor(np.repeat(targets, n), device=device, dtype=torch.float32)
    x = constrained_sample(eps, sched, (len(gens), *shape), g, c0, rho, generator=gens, num_steps=steps,
                           amp_dtype=torch.bfloat16 if cuda else None)
    with torch.no_grad(): return g(x.float()).float().cpu()

def boot_ci(e, n_boot=2000, seed=0):
    "95% percentile bootstrap interval of the mean of the per-sample errors `e`."
    e = np.asarray(e, np.float64); idx = np.random.default_rng(seed).integers(0, len(e), (n_boot, len(e)))
    return tuple(np.percentile(e[idx].mean(1), [2.5, 97.5]))

def setup(a, device):
    "U-Net, scheduler, feature g, targets and sample shape of the chosen model."
    if a.model == "quick-ellipse": # the trained quick-profile models the few-step setting was validated on
        from diffexplain.data import make_ellipses, split_indices
        from diffexplain.diffusion import ellipse_ddpm
        from diffexplain.models import ELLIPSE_PROFILES, ellipse_models
        d = ellipse_ddpm("quick", cache_dir=a.cache_dir, seed=a.seed, progress=False)
        reg = ellipse_models("quick", cache_dir=a.cache_dir, seed=a.seed, which=("log_ar",), progress=False)["log_ar"]["model"]
        reg = reg.to(device).eval().requires_grad_(False)
        data = make_ellipses(ELLIPSE_PROFILES["quick"]["n"], seed=a.seed, cache_dir=a.cache_dir)
        test = data["log_ar"][split_indices(len(data["log_ar"]), seed=a.seed)["test"]]
        targets = np.sort(np.random.default_rng(a.seed).choice(test, a.targets, replace=False)).astype(np.float32)
        g = lambda x: reg(from_model_range(x)).reshape(len(x))
        return d["unet"].to(device).requires_grad_(False), d["scheduler"], g, targets, (1, 32, 32)
    torch.manual_seed(a.seed)
    unet = make_unet2d(a.model, 1, a.size).to(device).eval().requires_grad_(False)
    return unet, make_scheduler(), image_mean, np.linspace(-0.2, 0.2, a.targets).astype(np.float32), (1, a.size, a.size)

def main():
    q = SAMPLER_PROFILES["quick"]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="tiny | quick | ellipse (untrained U-Net profiles, g = image mean) or quick-ellipse (trained)")
    p.add_argument("--size", type=int, default=8); p.add_argument("--cache-dir", default=None)
    p.add_argument("--targets", type=int, default=2); p.add_argument("--n", type=int, default=4)
    p.add_argument("--steps", type=int, default=q["num_steps"], help="few-step sampler (default: SAMPLER_PROFILES['quick'])")
    p.add_argument("--rho", type=float, default=0.1, help="reference rho (Table 9)")
    p.add_argument("--rho-fast", type=parse_rho, default=q["rho"],
                   help="few-step rho: 0.4, or pieces 0.1@0_0.8@100 (rho 0.1 below t=100, 0.8 from it); default SAMPLER_PROFILES['quick']")
    p.add_argument("--device", default="auto"); p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    if a.threads: torch.set_num_threads(a.threads)
    device = get_device(a.device)
    unet, sched, g, targets, shape = setup(a, device)
    m = len(targets)*a.n
    print(f"model {a.model} ({n_params(unet)/1e6:.2f} M params), {shape[-1]}x{shape[-1]}, {len(targets)} targets x {a.n} samples, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    res = {}
    for name, fn in [(f"reference (fp32, 1000 steps, rho={a.rho:g}, per target)",
                      lambda: reference(unet, sched, g, targets, a.n, a.rho, shape, device, a.seed)),
                     (f"ours (batched, {a.steps} steps, rho={a.rho_fast}{', bf16+compile' if device.type == 'cuda' else ''})",
                      lambda: ours(unet, sched, g, targets, a.n, a.rho_fast, shape, device, a.seed, a.steps))]:
        if device.type == "cuda" and name.startswith("ours"): fn(); torch.cuda.synchronize() # compile warm-up
        t0, c0 = time.perf_counter(), time.process_time(); v = fn()
        if device.type == "cuda": torch.cuda.synchronize()
        dt, cpu = time.perf_counter() - t0, time.process_time() - c0
        e = (v - torch.as_tensor(np.repeat(targets, a.n))).abs().numpy()
        lo, hi = boot_ci(e)
        res[name] = (m/dt, e.mean(), hi)
        print(f"{name:58s} {m/dt:9.3f} samples/s  {dt:8.1f} s wall  {cpu:8.1f} s CPU   mean |g(x) - c0| = {e.mean():.4f} "
              f"[{lo:.4f}, {hi:.4f}]", flush=True)
    (r_sps, r_err, r_hi), (o_sps, o_err, _) = res.values()
    print(f"speed-up {o_sps/r_sps:.1f}x   constraint error: reference {r_err:.4f}, ours {o_err:.4f}, "
          f"ours/reference {o_err/max(r_err, 1e-12):.2f}   equal accuracy (ours <= reference CI upper end {r_hi:.4f}): "
          f"{'yes' if o_err <= r_hi else 'no'}")

if __name__ == "__main__": main()
