"""Tests for diffexplain.guided_sampling: Eq. 8 against diffusers' own sampling, guidance, rejection, inpainting
(pixel and latent), bad input, and sweeps that survive `kill -9` and shard over two processes (gloo)."""
import os, signal, subprocess, sys, textwrap, time, warnings
from pathlib import Path
import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from diffexplain.guided_sampling import (acceptance_rates, constrained_sample, constrained_sweep, downsample_mask,
                                         dps_direction, feature_stats, gaussian_eps, load_sweep, reject, rho_schedule,
                                         target_file)

ROOT = Path(__file__).resolve().parents[1]

def make_scheduler(**kw):
    try:
        from diffexplain.diffusion import make_scheduler as mk # the diffusion chapter's factory, once it exists
        return mk(**kw)
    except ImportError:
        return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=0.0015, beta_end=0.0205,
                             variance_type="fixed_small", **kw)

def make_unet(seed=0):
    torch.manual_seed(seed)
    return UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16), layers_per_block=1,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4).eval()

def unet_eps(unet): return lambda x, t: unet(x, t).sample

g_mean = lambda x: x.mean((1, 2, 3))

def g_moments(x):
    "Differentiable size and log aspect ratio from intensity-weighted second moments, images in [-1,1]."
    w = (x[:, 0] + 1)/2 + 1e-3; n, h, wd = w.shape
    yy, xx = torch.meshgrid(torch.arange(h, dtype=x.dtype), torch.arange(wd, dtype=x.dtype), indexing="ij")
    m = w.sum((1, 2)); my, mx = (w*yy).sum((1, 2))/m, (w*xx).sum((1, 2))/m
    cyy = (w*(yy - my[:, None, None])**2).sum((1, 2))/m; cxx = (w*(xx - mx[:, None, None])**2).sum((1, 2))/m
    cxy = (w*(yy - my[:, None, None])*(xx - mx[:, None, None])).sum((1, 2))/m
    tr, det = cyy + cxx, cyy*cxx - cxy**2
    disc = (tr**2/4 - det).clamp_min(1e-8).sqrt()
    return torch.stack([m/(h*wd), torch.log((tr/2 + disc)/(tr/2 - disc).clamp_min(1e-6))], 1)


# --- Eq. 8 with rho = 0 is diffusers' own sampler -------------------------------------------------------------------
@pytest.mark.parametrize("steps", [10, 100]) # respaced chains: same code path as 1000 steps, which takes minutes on a shared CPU
def test_rho0_reproduces_ddpm_pipeline_exactly(steps):
    unet, sched = make_unet(), make_scheduler()
    pipe = DDPMPipeline(unet=unet, scheduler=make_scheduler()); pipe.set_progress_bar_config(disable=True)
    ref = pipe(batch_size=2, generator=torch.Generator().manual_seed(7), num_inference_steps=steps or 1000,
               output_type="np").images # (n, H, W, C) in [0, 1]
    x = constrained_sample(unet_eps(unet), sched, (2, 1, 8, 8), g_mean, 0.5, rho=0.0,
                           generator=torch.Generator().manual_seed(7), num_steps=steps)
    ours = (x/2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).numpy()
    assert np.array_equal(ours, ref)
    assert sched.num_inference_steps is None # the caller's scheduler is not mutated


def test_guidance_shrinks_constraint_error_tiny_unet():
    "An untrained tiny U-Net (x̂0 clipped by the scheduler, as diffusers does by default), 50 respaced steps."
    unet, sched = make_unet(), make_scheduler()
    c0 = torch.tensor([0.3, -0.2, 0.1, 0.25])
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    errs = {}
    for rho in (0.0, 0.3):
        x = constrained_sample(unet_eps(unet), sched, (4, 1, 8, 8), g_mean, c0, rho=rho, generator=gens(), num_steps=50)
        errs[rho] = (g_mean(x) - c0).abs().mean().item()
    assert errs[0.3] < 0.25*errs[0.0], errs


def test_vector_constraint_moment_features():
    "Several features at once (vector c0): size and log aspect ratio from image moments, exact Gaussian ε."
    sched = make_scheduler(clip_sample=False); eps = gaussian_eps(sched, -0.3, 0.4)
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(6)]
    x_free = constrained_sample(eps, sched, (6, 1, 8, 8), generator=gens(), num_steps=200)
    c0 = g_moments(x_free).mean(0) + torch.tensor([0.1, 0.3])
    x = constrained_sample(eps, sched, (6, 1, 8, 8), g_moments, c0, rho=0.1, generator=gens(), num_steps=400)
    e_free, e = (g_moments(x_free) - c0).abs().mean(0), (g_moments(x) - c0).abs().mean(0)
    assert (e < 0.25*e_free).all(), (e, e_free)


def test_direction_is_per_sample_not_per_batch():
    "DPS's code normalises over the batch; ours gives each sample the same unit step whatever the batch size."
    unet, sched = make_unet(), make_scheduler()
    x = torch.randn(5, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    d5, e5, _ = dps_direction(x, 300, unet_eps(unet), g_mean, 0.2, sched.alphas_cumprod[300])
    d1, _, _ = dps_direction(x[2:3], 300, unet_eps(unet), g_mean, 0.2, sched.alphas_cumprod[300])
    torch.testing.assert_close(d5.flatten(1).norm(dim=1), torch.ones(5))
    torch.testing.assert_close(d1, d5[2:3], atol=1e-5, rtol=1e-4)
    with torch.no_grad(): torch.testing.assert_close(e5, unet_eps(unet)(x, torch.full((5,), 300)))


def test_piecewise_rho_and_respaced_schedule_use_training_timesteps():
    r = rho_schedule({0: 0.04, 401: 0.03})   # Table 9, hippocampal volume
    assert [r(t) for t in (999, 401, 400, 0)] == [0.03, 0.03, 0.04, 0.04]
    seen = []
    rec = lambda t: seen.append(t) or 0.0
    constrained_sample(gaussian_eps(make_scheduler()), make_scheduler(), (1, 1, 4, 4), g_mean, 0.0, rho=rec, num_steps=10)
    assert seen == list(range(900, -1, -100))


# --- latent diffusion: guidance through a decoder, latent inpainting -----------------------------------------------
def test_latent_guidance_and_inpainting_with_downsampled_mask():
    sched = make_scheduler(clip_sample=False); eps = gaussian_eps(sched, 0.0, 0.5)
    decode = lambda z: torch.nn.functional.interpolate(z, scale_factor=2, mode="bilinear", align_corners=False)
    c0 = 0.4
    gens = lambda: [torch.Generator().manual_seed(i) for i in range(4)]
    z0 = constrained_sample(eps, sched, (4, 1, 4, 4), generator=gens(), num_steps=100)
    z = constrained_sample(eps, sched, (4, 1, 4, 4), g_mean, c0, rho=0.1, decode=decode, generator=gens(), num_steps=100)
    assert (g_mean(decode(z)) - c0).abs().mean() < 0.2*(g_mean(decode(z0)) - c0).abs().mean()
    pix_mask = torch.zeros(1, 1, 8, 8); pix_mask[..., 2:5, 2:5] = 1 # known region in pixel space
    known = torch.full((1, 1, 4, 4), 0.7)
    with pytest.raises(ValueError, match="use `downsample_mask`"):
        constrained_sample(eps, sched, (4, 1, 4, 4), known=known, mask=pix_mask, num_steps=10)
    lat_mask = downsample_mask(pix_mask, (4, 4))
    assert lat_mask[0, 0].nonzero().tolist() == [[1, 1], [1, 2], [2, 1], [2, 2]]
    z = constrained_sample(eps, sched, (4, 1, 4, 4), known=known, mask=lat_mask, generator=gens(), num_steps=50)
    assert torch.equal(z[:, :, 1:3, 1:3], known[:, :, 1:3, 1:3].expand(4, 1, 2, 2))
    assert not torch.allclose(z[:, :, 0], known[:, :, 0].expand(4, 1, 4)) # the rest is generated


# --- rejection -----------------------------------------------------------------------------------------------------
def test_rejection_and_out_of_range_warning():
    assert reject([0.0, 0.29, -0.31], 0.0, 1.0).tolist() == [True, True, False]
    assert acceptance_rates([True, False, False, True], [0, 0, 1, 1]).tolist() == [0.5, 0.5]
    with pytest.warns(UserWarning, match=r"targets \[0\] lie outside"):
        feature_stats(np.linspace(0, 1, 50), [-0.5, 0.5])
    with warnings.catch_warnings():
        warnings.simplefilter("error"); feature_stats(np.linspace(0, 1, 50), [0.2, 0.5])


# --- bad input -----------------------------------------------------------------------------------------------------
def test_bad_input_gives_clear_errors(tmp_path):
    sched = make_scheduler(); eps = gaussian_eps(sched)
    with pytest.raises(ValueError, match="`rho` must be ≥ 0"):
        constrained_sample(eps, sched, (2, 1, 4, 4), g_mean, 0.0, rho=-0.1, num_steps=5)
    with pytest.raises(ValueError, match="`rho` must be ≥ 0"):
        constrained_sample(eps, sched, (2, 1, 4, 4), g_mean, 0.0, rho={0: 0.1, 500: -1.0}, num_steps=5)
    with pytest.raises(ValueError, match="`g` must be differentiable"):
        constrained_sample(eps, sched, (2, 1, 4, 4), lambda x: x.detach().mean((1, 2, 3)), 0.0, rho=0.1, num_steps=5)
    with pytest.raises(ValueError, match="`g` must return a tensor of shape"):
        constrained_sample(eps, sched, (2, 1, 4, 4), lambda x: x.mean(), 0.0, rho=0.1, num_steps=5)
    with pytest.raises(ValueError, match="`mask` must have shape"):
        constrained_sample(eps, sched, (2, 1, 4, 4), known=torch.zeros(1, 1, 4, 4), mask=torch.ones(3, 1, 4, 4), num_steps=5)
    with pytest.raises(ValueError, match="`mask` and `known` must be given together"):
        constrained_sample(eps, sched, (2, 1, 4, 4), mask=torch.ones(1, 1, 4, 4), num_steps=5)
    with pytest.raises(ValueError, match="`num_steps` must be an int"):
        constrained_sample(eps, sched, (2, 1, 4, 4), num_steps=0)
    kw = dict(sample_shape=(1, 4, 4), out_dir=tmp_path, v_data=np.linspace(-1, 1, 10), num_steps=5, progress=False)
    for n in (0, -3, 1.5):
        with pytest.raises(ValueError, match="`n` must be an int ≥ 1"): constrained_sweep(eps, sched, g_mean, [0.0], n=n, **kw)
    with pytest.raises(ValueError, match="`targets` must be a finite"): constrained_sweep(eps, sched, g_mean, [np.nan], n=2, **kw)
    with pytest.raises(ValueError, match="`rho` must be ≥ 0"): constrained_sweep(eps, sched, g_mean, [0.0], n=2, rho=-1, **kw)


# --- sweeps: resume after kill -9, two-process sharding -------------------------------------------------------------
WORKER = textwrap.dedent('''
    import sys, time, numpy as np, torch
    sys.path.insert(0, {tests!r})
    from test_guided_sampling import make_unet, make_scheduler, unet_eps, g_mean
    from diffexplain.guided_sampling import constrained_sweep, accelerate_sweep
    from pathlib import Path
    out, mode = sys.argv[1], sys.argv[2]
    unet = make_unet()
    targets = np.linspace(-0.15, 0.15, 8)
    def classifier(x): # called once per chunk, before its files are written: a checkpoint to stop at (same code every run)
        import os
        if os.environ.get("SWEEP_KILL_AT") and len(list(Path(out).glob("target-*.npz"))) >= int(os.environ["SWEEP_KILL_AT"]):
            Path(out + ".killpoint").write_text("ready"); time.sleep(3600) # the test kills us here
        return torch.sigmoid(10*x.mean((1, 2, 3)))
    kw = dict(n=3, sample_shape=(1, 8, 8), out_dir=out, v_data=np.linspace(-0.4, 0.4, 100), rho=0.3, num_steps=40,
              targets_per_batch=2, seed=3, progress=False, classifier=classifier)
    if mode == "accelerate": accelerate_sweep(unet_eps(unet), make_scheduler(), g_mean, targets, **kw)
    else: constrained_sweep(unet_eps(unet), make_scheduler(), g_mean, targets, **kw)
    print("done", flush=True)
''')
M = 8

def _run(args, tmp_path, env_extra=None):
    script = tmp_path/"worker.py"; script.write_text(WORKER.format(tests=str(ROOT/"tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env_extra or {})}
    return subprocess.Popen(args[:-2] + [str(script)] + args[-2:] if args[0] == "torchrun" else [sys.executable, str(script), *args],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

def _free_port():
    "A TCP port nothing listens on now (the OS picks it), so parallel runs never collide on a fixed one."
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0)); return s.getsockname()[1]

def _finish(p, timeout=300):
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, err[-3000:]

@pytest.fixture(scope="module")
def reference_sweep(tmp_path_factory):
    "One uninterrupted single-process sweep, the ground truth for resume and sharding."
    d = tmp_path_factory.mktemp("ref")
    _finish(_run([str(d/"out"), "plain"], d))
    return load_sweep(d/"out", M)

def test_sweep_output_is_what_scores_consume(reference_sweep):
    r = reference_sweep
    assert {"target", "v", "y", "accepted", "group"} <= set(r)
    assert r["group"].tolist() == np.repeat(np.arange(M), 3).tolist()
    assert r["accepted"].dtype == bool and r["v"].shape == r["y"].shape == r["target"].shape == (3*M,)
    assert ((r["y"] > 0) & (r["y"] < 1)).all() and len(np.unique(r["seed"])) == 3*M
    assert np.abs(r["v"] - r["target"]).mean() < 0.05 # guided: the untrained U-Net alone spreads g over ±0.3
    assert np.isclose(r["accepted"].mean(), (np.abs(r["v"] - r["target"]) <= 0.3*np.linspace(-0.4, 0.4, 100).std(ddof=1)).mean())

def test_sweep_resumes_after_sigkill_with_identical_results(tmp_path, reference_sweep):
    out = tmp_path/"out"
    p = _run([str(out), "plain"], tmp_path, {"SWEEP_KILL_AT": "2"}) # the worker blocks once 2 target files exist, after writing a marker
    marker = Path(str(out) + ".killpoint")
    while not marker.exists():
        assert p.poll() is None, "worker ended before it could be killed: " + p.stderr.read()[-2000:]
        time.sleep(0.02) # polling interval only; no deadline (pytest's own timeout covers a hang)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    done = sorted(out.glob("target-*.npz"))
    assert len(done) == 2, "the kill lands at the marker: after the first chunk's two files"
    mtimes = {f.name: f.stat().st_mtime_ns for f in done}
    _finish(_run([str(out), "plain"], tmp_path))
    assert {f.name: f.stat().st_mtime_ns for f in done} == mtimes, "finished targets must be skipped, not recomputed"
    resumed = load_sweep(out, M)
    for k in reference_sweep: np.testing.assert_array_equal(resumed[k], reference_sweep[k], err_msg=k)

def test_two_process_sharding_matches_one_process(tmp_path, reference_sweep):
    out = tmp_path/"out"
    p = _run(["torchrun", "--nproc_per_node", "2", "--master_port", str(_free_port()), str(out), "accelerate"], tmp_path)
    _finish(p)
    sharded = load_sweep(out, M)
    for k in reference_sweep: np.testing.assert_array_equal(sharded[k], reference_sweep[k], err_msg=k)


# --- one DDIM encoder in the package: chapter 03's inversion is chapter 02's ----------------------------------------
@pytest.mark.parametrize("model", ["gaussian", "tiny_unet"])
def test_ddim_invert_matches_diffusion_ddim_encode(model):
    from diffexplain.diffusion import ddim_decode, ddim_encode
    from diffexplain.guided_sampling import constrained_sample, ddim_invert, ddim_scheduler
    sched = make_scheduler(clip_sample=False)
    eps = gaussian_eps(sched, 0.1, 0.4)
    if model == "tiny_unet": # a network's output around the exact ε: an untrained U-Net alone blows DDIM up to ~1e4
        unet, exact = make_unet(), eps
        eps = lambda x, t: exact(x, t) + 0.05*unet(x, t).sample
    x0 = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0)).clamp(-1, 1)
    with torch.no_grad():
        x_T = ddim_invert(eps, sched, x0, 25)
        torch.testing.assert_close(x_T, ddim_encode(eps, x0, sched, 25, clip_x0=False, spacing="leading"), atol=1e-6, rtol=0)
        assert not torch.allclose(x_T, x0, atol=1e-2) # it did encode
        dec = constrained_sample(eps, ddim_scheduler(sched), x0.shape, x_T=x_T, num_steps=25, step_kwargs=dict(eta=0.0))
        torch.testing.assert_close(dec, ddim_decode(eps, x_T, sched, 25, clip_x0=False, spacing="leading"), atol=1e-5, rtol=1e-5)


# --- the few-step validation can reject (issue 15) ------------------------------------------------------------------
def _toy_study(n):
    "Exact Gaussian ε (N(0, 0.5²) on 4×4), g = image mean, Y = top half's mean > 0, chapter 04's global score."
    from diffexplain.guided_sampling import sampling_study
    from diffexplain.scores import scores_from_sweep
    def score(s): # the global score of the accepted samples, NaN when none are accepted (a NaN score never passes)
        try: r = scores_from_sweep(s, n_boot=500)
        except ValueError: return dict(score=np.nan, score_lo=np.nan, score_hi=np.nan)
        return dict(score=r["global_score"], score_lo=r["bootstrap"].ci_global[0], score_hi=r["bootstrap"].ci_global[1])
    sched = make_scheduler(clip_sample=False)
    return sampling_study(gaussian_eps(sched, 0.0, 0.5), sched, g_mean, [-0.3, -0.15, 0.15, 0.3], n, (1, 4, 4), 0.5/4,
                          steps=(100, 50, 5, 1), rhos={100: [0.1], 50: [0.2, {0: 0.15, 100: 0.3}], 5: [0.0, 2.0], 1: [10.0]},
                          classifier=lambda x: (x[..., :2, :].mean((1, 2, 3)) > 0).float(), score_fn=score,
                          measures=dict(median=lambda x: x.flatten(1).median(1).values),
                          quality=lambda x: (x.flatten(1).std(1) - 0.5).abs() < 0.25)

def test_sampler_validation_rejects_bad_settings_and_accepts_a_good_one():
    from diffexplain.guided_sampling import converged_reference, few_step_matches, validated_sampler
    study = _toy_study(256)
    ref, chain = converged_reference(study, 10, chain_steps=(50, 100))
    assert ref is not None and study.loc[ref, "steps"] == 100, chain
    m = few_step_matches(study, 100, 0.1).set_index("rho_pieces")
    assert not m.loc["0", "ok"] and not m.loc["0", "score_ok"] and not m.loc["0", "err_ok"] # ρ = 0: no guidance
    assert not m.loc["2", "ok"] and not m.loc["10", "ok"] # 5 steps and 1 step at the chain's drift
    assert m.loc["0.15@0_0.3@100", "ok"], m # a re-tuned 50-step setting passes: the rule is not "reject everything"
    assert validated_sampler(study, 10, dict(chain_steps=(50, 100))) == dict(num_steps=50, rho={0: 0.15, 100: 0.3})
    # the verdict depends on the evidence: with 8 samples per target no reference is narrow enough, so nothing passes
    assert validated_sampler(_toy_study(8), 10, dict(chain_steps=(50, 100))) is None
