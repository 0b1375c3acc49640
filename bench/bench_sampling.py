"""Throughput of constrained sampling: the paper's recipe as a plain loop vs diffexplain's sampler, side by side.

Reference: attribution Eq. 8 written out directly -- fp32, all 1000 DDPM steps, one target value at a time.
Ours: `constrained_sample` batched across all targets, respaced to `--steps` steps with a re-tuned rho, and on a GPU
bf16 autocast + `torch.compile` of the U-Net. Both use the same untrained U-Net, scheduler, feature (image mean) and
targets, and print samples/s, the speed-up and the mean constraint error |g(x) - c0|.

    python bench/bench_sampling.py                                 # small CPU config (tiny U-Net, 8x8)
    python bench/bench_sampling.py --profile ellipse --size 32 --targets 8 --n 200 --device cuda   # the paper's setting
"""
import argparse, time
import numpy as np
import torch
from diffexplain.data import get_device
from diffexplain.diffusion import make_scheduler, make_unet2d, n_params
from diffexplain.guided_sampling import constrained_sample, sample_seeds

def g(x): return x.mean((1, 2, 3)) # differentiable feature: image mean, in [-1, 1]

def reference(unet, sched, targets, n, rho, shape, device, seed):
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
            loss = (c0 - g(x0_hat)).pow(2).sum()
            grad, = torch.autograd.grad(loss, x)
            x_prev = sched.step(eps.detach(), t, x.detach(), generator=gen).prev_sample
            norm = grad.flatten(1).norm(dim=1).view(-1, 1, 1, 1).clamp_min(1e-12)
            x = x_prev - rho*grad/norm
        out.append(g(x.detach()).cpu())
    return torch.cat(out)

def ours(unet, sched, targets, n, rho, shape, device, seed, steps):
    cuda = device.type == "cuda"
    net = torch.compile(unet) if cuda else unet
    eps = lambda x, t: net(x, t).sample
    gens = [torch.Generator(device).manual_seed(int(s)) for j in range(len(targets)) for s in sample_seeds(seed, j, n)]
    c0 = torch.as_tensor(np.repeat(targets, n), device=device, dtype=torch.float32)
    x = constrained_sample(eps, sched, (len(gens), *shape), g, c0, rho, generator=gens, num_steps=steps,
                           amp_dtype=torch.bfloat16 if cuda else None)
    return g(x).float().cpu()

def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--profile", default="tiny"); p.add_argument("--size", type=int, default=8)
    p.add_argument("--targets", type=int, default=2); p.add_argument("--n", type=int, default=2)
    p.add_argument("--steps", type=int, default=50); p.add_argument("--rho", type=float, default=0.1)
    p.add_argument("--rho-fast", type=float, default=0.3); p.add_argument("--device", default="auto")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    device = get_device(a.device); torch.manual_seed(a.seed)
    unet = make_unet2d(a.profile, 1, a.size).to(device).eval().requires_grad_(False)
    sched = make_scheduler()
    targets = np.linspace(-0.2, 0.2, a.targets).astype(np.float32)
    shape, m = (1, a.size, a.size), a.targets*a.n
    print(f"U-Net {a.profile} ({n_params(unet)/1e6:.2f} M params), {a.size}x{a.size}, {a.targets} targets x {a.n} samples, "
          f"device {device}, torch threads {torch.get_num_threads()}")
    res = {}
    for name, fn in [("reference (fp32, 1000 steps, per target)", lambda: reference(unet, sched, targets, a.n, a.rho, shape, device, a.seed)),
                     (f"ours (batched, {a.steps} steps{', bf16+compile' if device.type == 'cuda' else ''})",
                      lambda: ours(unet, sched, targets, a.n, a.rho_fast, shape, device, a.seed, a.steps))]:
        if device.type == "cuda" and name.startswith("ours"): fn(); torch.cuda.synchronize() # compile warm-up
        t0 = time.perf_counter(); v = fn()
        if device.type == "cuda": torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        err = (v - torch.as_tensor(np.repeat(targets, a.n))).abs().mean().item()
        res[name] = (m/dt, err)
        print(f"{name:45s} {m/dt:9.2f} samples/s   {dt:8.1f} s   mean |g(x) - c0| = {err:.4f}")
    (r_sps, r_err), (o_sps, o_err) = res.values()
    print(f"speed-up {o_sps/r_sps:.1f}x   constraint error ours/reference {o_err/max(r_err, 1e-12):.2f}")

if __name__ == "__main__": main()
