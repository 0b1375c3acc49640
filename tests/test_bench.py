"The compute model's FLOP counter against closed forms, and the smoke paths of the two benchmark scripts."
import json, sys
from pathlib import Path
import pytest, torch
import torch.nn as nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"bench"))
import compute_model as cm
import bench_sampling as bs

@pytest.fixture(autouse=True)
def one_thread():
    old = torch.get_num_threads(); torch.set_num_threads(1); yield; torch.set_num_threads(old)

def test_linear_closed_form():
    B, I, O = 5, 7, 3
    test = cm.net_forward(lambda: nn.Linear(I, O), (I,), batch=B)
    assert test == 2*B*I*O                                              # forward: one (B, I) x (I, O) matmul
    assert cm.net_train_step(lambda: nn.Linear(I, O), (I,), batch=B) == 4*B*I*O   # + weight gradient (input needs none)

def test_conv_closed_form():
    B, Ci, Co, H, k = 2, 3, 4, 8, 3                                     # padding 1: output H x H
    assert cm.net_forward(lambda: nn.Conv2d(Ci, Co, k, padding=1), (Ci, H, H), batch=B) == 2*B*Co*H*H*Ci*k*k

def test_guided_step_counts_input_gradient_only():
    I = 6   # "ε-model" Linear on (n, 1, 1, I) images, regressor Linear(I, 1): forward 2I² + 2I, backward to x the same again
    eps = lambda: nn.Linear(I, I); reg = lambda: nn.Sequential(nn.Flatten(), nn.Linear(I, 1))
    call = lambda m, x, t: m(x)
    assert cm.guided_step(eps, call, (1, 1, I), (reg,)) == 2*(2*I*I + 2*I)

def test_costs_are_linear_in_the_batch():
    U = lambda: cm.lib("make_unet2d")("tiny", 1, 16)
    assert cm.eps_train_step(U, cm.unet2d_call, (1, 16, 16), batch=3) == 3*cm.eps_train_step(U, cm.unet2d_call, (1, 16, 16))

def test_compute_model_smoke(tmp_path):
    df, dt = cm.main(["--smoke", "--out", str(tmp_path)])
    assert (tmp_path/"compute_model.csv").exists() and "Regenerate" in (tmp_path/"compute_model.md").read_text()
    S = cm.lib("SAMPLER_PROFILES")
    row = df[df["stage"].str.startswith("guided sampling")].iloc[0]
    assert row["flops_paper"]/row["flops_few"] == pytest.approx(S["paper"]["num_steps"]/S["quick"]["num_steps"])   # same model, fewer steps
    tr = df[df["stage"] == "train DDPM"].iloc[0]
    P = cm.lib("DDPM_PROFILES")["paper"]
    assert tr["flops_paper"] == pytest.approx(tr["unit_gflop_paper"]*1e9*P["steps"]*P["batch_size"])
    assert dt["flops_paper"].iloc[0] == pytest.approx(df["flops_paper"].sum())

def test_bench_sampling_smoke(tmp_path):
    R = bs.main(["--smoke", "--out", str(tmp_path)])
    m = R["engineering"]["modes"]
    assert m["batched"]["max_abs_diff_vs_loop"] < 1e-3                  # same algorithm, same streams: same samples (float32 batch effects only)
    assert m["loop"]["seconds"] > 0 and m["batched"]["gflop_per_s"] > 0
    assert isinstance(m["batched+bf16+compile"], str) or torch.cuda.is_available()
    B = R["algorithmic"]
    assert B["samples_per_setting"] > 0 and len(R["summary"]) >= 2
    assert json.loads((tmp_path/"bench_sampling.json").read_text())["threads"] == 1
    import pandas as pd
    st = pd.read_csv(tmp_path/"bench_sampling.csv")                    # both variances' studies, same grid sizes as configured
    assert set(st["variance"]) == set(bs.ALL_VARIANCES) and (st["variance"] == "fixed_large").sum() >= len(bs.SMOKE_TOY["rhos_large"])
    C = {(c["variance"], c["steps"]): c["ratio"] for c in B["contraction"] if c["data_std"] == 1.0}
    k = min(s for _, s in C)                                             # exact ε-model: at few steps β̃_t contracts, β_t does not
    assert C[("fixed_small", k)] < 0.8 and abs(C[("fixed_large", k)] - 1) < 0.05
    assert abs(C[("fixed_small", max(s for _, s in C))] - 1) < abs(C[("fixed_small", k)] - 1)   # and the contraction shrinks with steps
    H = {(c["variance"], c["steps"]): c["ratio"] for c in B["contraction"] if c["data_std"] == 0.5}
    assert H[("fixed_large", k)] > 1.2 and abs(H[("analytic", k)] - 1) < 0.1   # β_t over-disperses narrower data; Analytic-DPM does not

def test_estimate_gamma_closed_form():
    "Γ_t = E‖ε‖²/d of the exact ε-model of N(0, s² I) data is (1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t)."
    base = bs.lib("make_scheduler")(clip_sample=False); s = 0.5
    x0 = s*torch.randn((2048, 1, 4, 4), generator=torch.Generator().manual_seed(0))
    G = bs.estimate_gamma(bs.lib("gaussian_eps")(base, 0.0, s), base, x0, [5, 100, 400], n_mc=2048)
    ab = base.alphas_cumprod.double()
    for t, v in G.items(): assert v == pytest.approx(float((1 - ab[t])/(ab[t]*s**2 + 1 - ab[t])), rel=0.03)
    S = bs.sampler_scheduler("analytic", base, bs.lib("gaussian_eps")(base, 0.0, s), x0, [10], n_mc=2048)
    S.set_timesteps(10)
    for t in S.timesteps[:-1]:   # the exact optimum for N(0, s² I) data: β̃ + c0²·Var(x0 | x_t), Var(x0 | x_t) = s²(1 − ᾱ_t)/(ᾱ_t s² + 1 − ᾱ_t)
        a, p = ab[int(t)], ab[int(S.previous_timestep(t))]; b = 1 - a/p
        exact = (1 - p)/(1 - a)*b + (p.sqrt()*b/(1 - a))**2*s**2*(1 - a)/(a*s**2 + 1 - a)
        assert float(S._get_variance(t)) == pytest.approx(float(exact), rel=0.02)

def test_bench_sampling_keeps_a_with_its_commit(tmp_path):
    R0 = bs.main(["--smoke", "--skip", "b", "--out", str(tmp_path)])
    R1 = bs.main(["--smoke", "--skip", "b", "--keep-a", "--out", str(tmp_path)])
    A = R1["engineering"]
    assert A["modes"] == R0["engineering"]["modes"] and A["kept_from"]["command"] == R0["command"] and A["kept_from"]["commit"] == R0["commit"]
    assert "Not rerun: kept from" in (tmp_path/"bench_sampling.md").read_text()

def test_ellipse_variance_never_trains(tmp_path, monkeypatch):
    import numpy as np
    import diffexplain.ellipse_study as es
    monkeypatch.setattr(es, "make_ellipses", lambda n, seed=0, cache_dir=None: dict(images=np.zeros((4, 1, 32, 32), np.float32)))
    with pytest.raises(FileNotFoundError, match="does not train"): bs.load_cached_quick_ddpm(tmp_path)
    assert not list(tmp_path.glob("ellipse-ddpm-*"))                    # nothing was started in the cache

def _unrolled_acre(build_eps, build_reg, shape, k):   # the filter written out: k ε calls, regressor, backward to x
    eps, reg = cm.on_meta(build_eps), cm.on_meta(build_reg)
    def f():
        x = cm.meta(1, *shape, grad=True); h = x
        for _ in range(k): h = h - cm.unet2d_call(eps, h, cm.tvec())
        reg(h).float().sum().backward()
    return cm.count_flops(f)

def _unrolled_diffae_re(build_ae, build_reg, shape, k, z_dim):   # k decoder calls from a fixed x_T, regressor, backward to z
    ae, reg = cm.on_meta(build_ae), cm.on_meta(build_reg)
    def f():
        z = cm.meta(1, z_dim, grad=True); h = cm.meta(1, *shape)
        for _ in range(k): h = h - ae(h, cm.tvec(), z)
        reg(h).float().sum().backward()
    return cm.count_flops(f)

def test_per_call_counts_match_the_unrolled_chains():
    U = lambda: cm.lib("make_unet2d")("tiny", 3, 16)
    R = lambda: cm.lib("EllipseCNN")(1, in_channels=3, img_size=16)
    assert cm.acre_iteration(U, cm.unet2d_call, R, (3, 16, 16), 3) == _unrolled_acre(U, R, (3, 16, 16), 3)
    A = lambda: cm.lib("DiffAE")("tiny", 3, 16, z_dim=32, enc_channels=(8, 16))
    assert cm.diffae_re_step(A, R, (3, 16, 16), 3, 32) == _unrolled_diffae_re(A, R, (3, 16, 16), 3, 32)

def test_matches_by_variance_one_reference_either_verdict():
    "Each variance's cheaper rows are judged against the one fixed_small reference; the verdict can go either way."
    import pandas as pd
    row = lambda steps, rho, score, accept=0.95, err=0.01: dict(steps=steps, rho=float(rho), rho_max=float(rho), rho_pieces=f"{rho:g}", sigma_v=0.1,
                                                               err=err, accept=accept, clean=1.0, score=score, score_lo=score - 0.02, score_hi=score + 0.02, seconds=steps/10)
    small = pd.DataFrame([row(100, 0.1, 0.44), row(200, 0.05, 0.45), row(25, 0.4, 0.56)])
    large = pd.DataFrame([row(100, 0.1, 0.44), row(25, 0.4, 0.45), row(10, 0.5, 0.65), row(5, 1.0, 0.44, accept=0.5)])
    m, by, best = bs.matches_by_variance(dict(fixed_small=small, fixed_large=large), 0)
    assert len(m) == 4 and set(m["variance"]) == set(bs.VARIANCES)      # large's 100-step row is not cheaper: left out
    assert by["fixed_small"] is None and best["variance"] == "fixed_large" and best["steps"] == 25
    v = m.set_index(["variance", "steps"])["ok"]
    assert not v[("fixed_small", 25)] and not v[("fixed_large", 10)] and not v[("fixed_large", 5)]   # score off; acceptance short
    large.loc[1, "score"] = 0.60                                        # the good fixed_large row made bad: nothing passes
    assert bs.matches_by_variance(dict(fixed_small=small, fixed_large=large), 0)[2] is None
