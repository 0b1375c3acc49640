"""Tests for `diffexplain.counterfactuals` (AC-RE, Diff-AE-RE, diffusion CE, sweeps, batched runs).

Tiny CPU fixtures: diffusers `UNet2DModel`s (untrained) for interface/shape behaviour, and an exact Gaussian
epsilon-model of a toy square dataset (known outputs) for behaviour that needs a model of the data.
Each behavioural test compares against the same procedure with the guidance switched off, so it fails if the
guidance does nothing."""
import warnings
import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, DDIMScheduler, DDIMInverseScheduler, UNet2DModel

from diffexplain.counterfactuals import (acre, diffae_re, diffusion_ce, flip_rate, reference_sweep, plot_reference_sweep,
                                         run_batched, change_mask, diffusion_filter, respaced_scheduler, last_timesteps,
                                         check_reference, check_differentiable, _same_norm)

torch.set_num_threads(1)


# ----------------------------------------------------------------------------------------------------------- fixtures
def ddpm():
    return DDPMScheduler(beta_schedule="linear", beta_start=0.0015, beta_end=0.0205)


class GaussianEps(torch.nn.Module):
    "Exact eps of a DDPM whose data are N(mu, U diag(lam) U^T + floor I)."
    def __init__(self, mu, U, lam, scheduler, floor=1e-4):
        super().__init__()
        self.mu, self.U, self.lam, self.floor = mu.flatten().double(), U.double(), torch.as_tensor(lam).double(), floor
        self.ab = scheduler.alphas_cumprod.double()

    def forward(self, x_t, t):
        ab = self.ab[t].view(-1, 1); v = x_t.flatten(1).double() - ab.sqrt() * self.mu
        shrink = lambda l: ab.sqrt() * l / (ab * l + 1 - ab)
        c = v @ self.U
        x0 = self.mu + (c * (shrink(self.lam + self.floor) - shrink(self.floor))) @ self.U.T + shrink(self.floor) * v
        return ((x_t.flatten(1).double() - ab.sqrt() * x0) / (1 - ab).sqrt()).to(x_t.dtype).view_as(x_t)


def toy_squares(n, size=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(1, 1, size, size, dtype=torch.bool); a, b = size // 4, size // 4 + size // 2; m[..., a:b, a:b] = True
    bg, red = torch.rand(n, generator=g) * 0.6 + 0.2, torch.rand(n, generator=g)
    x = bg.view(-1, 1, 1, 1) * (~m).float().expand(n, 3, size, size) + red.view(-1, 1, 1, 1) * (m & (torch.arange(3) == 0).view(1, 3, 1, 1))
    return x * 2 - 1, red, m


def square_eps(m, scheduler):
    B = (~m).float().expand(1, 3, *m.shape[-2:]).flatten(); R = (m & (torch.arange(3) == 0).view(1, 3, 1, 1)).float().flatten()
    mu = -(1 - B - R).clone()
    U = torch.stack([B / B.norm(), R / R.norm()], 1)
    return GaussianEps(mu, U, [4 * 0.36 / 12 * B.sum(), 4 / 12 * R.sum()], scheduler)


def square_regressor(m):
    return lambda x01: (x01[:, :1] * m).sum((1, 2, 3)) / m.sum()


class DDIMDiffAE:
    "Diffusion-autoencoder interface over a conditional eps-model eps_cond(x_t, t, z) and a semantic encoder."
    def __init__(self, encoder, eps_cond, scheduler): self.encoder, self.eps_cond, self.cfg = encoder, eps_cond, scheduler.config
    def encode_semantic(self, x): return self.encoder(x)
    def _t(self, x, t): return torch.full((x.shape[0],), int(t), dtype=torch.long)
    def encode_stochastic(self, x, z, steps):
        s = DDIMInverseScheduler.from_config(self.cfg); s.set_timesteps(steps)
        for t in s.timesteps: x = s.step(self.eps_cond(x, self._t(x, t), z), t, x).prev_sample
        return x
    def decode(self, x_T, z, steps):
        s = DDIMScheduler.from_config(self.cfg); s.set_timesteps(steps); x = x_T
        for t in s.timesteps: x = s.step(self.eps_cond(x, self._t(x, t), z), t, x, eta=0.).prev_sample
        return x


def square_diffae(sq_eps, sched, d=32, scale=3., seed=0):
    U, mu, sd = sq_eps.U.float(), sq_eps.mu.float(), sq_eps.lam.float().sqrt()
    A = torch.randn(2, d, generator=torch.Generator().manual_seed(seed)) * scale / d**0.5; Ap = torch.linalg.pinv(A)
    enc = lambda x: ((x.flatten(1) - mu) @ U / sd) @ Ap.T
    def eps_cond(x_t, t, z):
        ab = sq_eps.ab[t].float().view(-1, 1, 1, 1); m = (mu + (z @ A.T * sd) @ U.T).view_as(x_t); fl = sq_eps.floor
        x0 = m + ab.sqrt() * fl / (ab * fl + 1 - ab) * (x_t - ab.sqrt() * m)
        return (x_t - ab.sqrt() * x0) / (1 - ab).sqrt()
    return DDIMDiffAE(enc, eps_cond, sched)


def tiny_unet(ch=3, size=8, cond=False):
    torch.manual_seed(0)
    return UNet2DModel(sample_size=size, in_channels=ch, out_channels=ch, block_out_channels=(8, 16), layers_per_block=1,
                       norm_num_groups=4, down_block_types=("DownBlock2D", "DownBlock2D"),
                       up_block_types=("UpBlock2D", "UpBlock2D"), class_embed_type="identity" if cond else None).eval()


def unet_eps(unet):
    return lambda x_t, t: unet(x_t, t).sample


def tiny_regressor(ch=3):
    torch.manual_seed(1)
    net = torch.nn.Sequential(torch.nn.Conv2d(ch, 4, 3, padding=1), torch.nn.Tanh(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 1))
    return net.eval()


@pytest.fixture(scope="module")
def toy():
    s = ddpm(); xs, red, m = toy_squares(8, seed=1)
    return dict(sched=s, x=xs, m=m, eps=square_eps(m, s), f=square_regressor(m))


def g(seed=0): return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------------------- AC-RE
def test_filter_respacing_and_projection(toy):
    s = respaced_scheduler(toy["sched"], 50)
    assert last_timesteps(s, 5) == [80, 60, 40, 20, 0]
    assert toy["sched"].num_inference_steps is None            # the caller's scheduler is left untouched
    x = toy["x"]; nz = torch.randn(6, *x.shape, generator=g())
    pert = 0.2 * torch.randn(x.shape, generator=g(1))
    d_on = (diffusion_filter(x, toy["eps"], s, 5, nz) - x).abs().mean()
    d_off = (diffusion_filter((x + pert).clamp(-1, 1), toy["eps"], s, 5, nz) - x).abs().mean()
    assert d_on < 0.05 and d_off < 0.5 * pert.abs().mean()    # off-manifold perturbation removed


def test_acre_reaches_reference_only_with_guidance(toy):
    x, r = toy["x"], torch.tensor([0.1, 0.9, 0.3, 0.7, 0.5, 0.0, 0.95, 0.2])
    kw = dict(max_iter=100, dilation=1, progress=False)
    on = acre(x, toy["f"], toy["eps"], toy["sched"], r, generator=g(), **kw)
    off = acre(x, toy["f"], toy["eps"], toy["sched"], r, guidance=0., generator=g(), **kw)
    err_on, err_off = (on["y_filtered"] - r).abs(), (off["y_filtered"] - r).abs()
    assert (err_on <= 0.05 + 1e-6).all(), err_on                # every filtered pre-explanation F(x_adv) reached r (early stop)
    assert err_off.mean() > 0.2                                 # ... and not without the attack
    assert (on["n_iter"] < 100).all() and (off["n_iter"][err_off > 0.05] == 100).all()
    assert (on["y_cf"] - r).abs().mean() < 0.5 * err_off.mean()  # still close after refinement
    bg = ~toy["m"][0, 0]
    bg_mae = ((on["x_cf"] - x).abs() / 2)[:, :, bg].mean()
    assert bg_mae < 0.01, bg_mae                                # background preserved by the refinement
    # the refinement mask covers the square but leaves most of the background
    assert on["mask"][:, 0][:, toy["m"][0, 0]].mean() > 0.9 and on["mask"][:, 0][:, bg].mean() < 0.5


def test_acre_untrained_unet_guidance_moves_prediction():
    s = ddpm(); unet = tiny_unet(); f = lambda x01: x01[:, 0].mean((1, 2))     # "redness" regressor
    x = torch.rand(3, 3, 8, 8, generator=g()) * 1.6 - 0.8
    with torch.no_grad(): y0 = f((x + 1) / 2)
    r = y0 + 0.15
    kw = dict(respacing=50, steps=2, max_iter=30, progress=False, refine=False)
    on = acre(x, f, unet_eps(unet), s, r, generator=g(), **kw)
    off = acre(x, f, unet_eps(unet), s, r, guidance=0., generator=g(), **kw)
    assert ((on["y_filtered"] - r).abs() <= 0.05 + 1e-6).all() and ((off["y_filtered"] - r).abs() > 0.08).all()


def test_acre_seeded(toy):
    kw = dict(max_iter=5, dilation=1, progress=False)
    a = acre(toy["x"][:2], toy["f"], toy["eps"], toy["sched"], 0.5, generator=g(3), **kw)
    b = acre(toy["x"][:2], toy["f"], toy["eps"], toy["sched"], 0.5, generator=g(3), **kw)
    torch.testing.assert_close(a["x_cf"], b["x_cf"])


def test_change_mask():
    x = torch.zeros(2, 3, 8, 8); xp = x.clone(); xp[0, :, 4, 4] = 1.; xp[0, 0, 0, 0] = 0.1
    m = change_mask(x, xp, dilation=3, threshold=0.15)
    assert m.shape == (2, 1, 8, 8) and m[0].sum() == 9 and m[1].sum() == 0   # small change ignored; no change -> no mask


# --------------------------------------------------------------------------------------------------------- Diff-AE-RE
def test_diffae_re_exact_autoencoder(toy):
    ae = square_diffae(toy["eps"], toy["sched"]); x = toy["x"][:4]; r = torch.tensor([0.1, 0.9, 0.5, 0.3])
    on = diffae_re(x, toy["f"], ae, r, progress=False)
    off = diffae_re(x, toy["f"], ae, r, guidance=0., max_steps=20, progress=False)
    assert on["success"].all() and ((on["y_cf"] - r).abs() <= 0.05 + 1e-6).all()
    assert (off["y_cf"] - r).abs().mean() > 0.15
    torch.testing.assert_close(off["z_cf"], off["z_sem"])       # no regression term -> the code stays
    assert (on["x_rec"] - x).abs().mean() < 0.05                # the autoencoder reconstructs
    assert ((on["x_cf"] - on["x_rec"]).abs() / 2)[:, :, ~toy["m"][0, 0]].mean() < 0.05


def test_diffae_re_per_sample_stopping(toy):
    "A sample that starts at its reference is returned unchanged, whatever the rest of the batch does."
    ae = square_diffae(toy["eps"], toy["sched"]); x = toy["x"][:2]
    with torch.no_grad():
        z = ae.encode_semantic(x); y_rec = toy["f"]((ae.decode(ae.encode_stochastic(x, z, 20), z, 10) + 1) / 2)
    r = torch.stack([y_rec[0], torch.tensor(1.0) - y_rec[1]])
    out = diffae_re(x, toy["f"], ae, r, progress=False)
    assert out["n_iter"][0] == 0 and out["n_iter"][1] > 0
    torch.testing.assert_close(out["z_cf"][0], out["z_sem"][0])


def test_diffae_re_with_conditional_unet():
    "Interface with a tiny conditional UNet2DModel (class_embed_type='identity') and a conv encoder."
    s = ddpm(); unet = tiny_unet(cond=True)
    enc = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2, padding=1), torch.nn.SiLU(), torch.nn.Flatten(),
                              torch.nn.Linear(8 * 16, 32))
    ae = DDIMDiffAE(enc, lambda x_t, t, z: unet(x_t, t, class_labels=z).sample, s)
    f = tiny_regressor(); x = torch.rand(2, 3, 8, 8, generator=g()) * 2 - 1
    with torch.no_grad(): y0 = f((x + 1) / 2).flatten()
    r = y0 + 0.2
    kw = dict(max_steps=8, decode_steps=3, encode_steps=3, lr=0.05, progress=False)
    on, off = diffae_re(x, f, ae, r, **kw), diffae_re(x, f, ae, r, guidance=0., **kw)
    assert on["x_cf"].shape == x.shape and on["z_cf"].shape == (2, 32)
    assert (on["y_cf"] - r).abs().mean() < (off["y_cf"] - r).abs().mean()


# ------------------------------------------------------------------------------------------------------ diffusion CE
def test_diffusion_ce_flips_only_with_classifier_guidance(toy):
    xs, _, _ = toy_squares(24, seed=2)
    clf = lambda x01: 20 * (toy["f"](x01) - 0.5)
    kw = dict(num_steps=20, progress=False)
    on = diffusion_ce(xs, toy["eps"], toy["sched"], clf, generator=g(), **kw)
    off = diffusion_ce(xs, toy["eps"], toy["sched"], clf, classifier_weight=0., generator=g(), **kw)
    assert flip_rate(on) > 0.7 and flip_rate(on) > flip_rate(off) + 0.3
    assert (on["target"] == 1 - on["decision_orig"]).all()
    # the L1 term keeps the counterfactual closer to the original
    far = diffusion_ce(xs, toy["eps"], toy["sched"], clf, dist_weight=0., generator=g(), **kw)
    assert (on["x_cf"] - xs).abs().mean() < (far["x_cf"] - xs).abs().mean()


def test_diffusion_ce_multiclass_and_latent_decoder(toy):
    "Multi-class logits with explicit targets; a latent-diffusion decoder (here a fixed linear map) is used."
    xs, _, _ = toy_squares(4, seed=3)
    clf = lambda x01: torch.stack([toy["f"](x01), 1 - toy["f"](x01), x01.mean((1, 2, 3))], 1) * 20
    out = diffusion_ce(xs, toy["eps"], toy["sched"], clf, target=torch.tensor([0, 1, 0, 1]), num_steps=10,
                       decoder=lambda z: z.clamp(-1, 1), generator=g(), progress=False)
    assert out["logits_cf"].shape == (4, 3) and out["flipped"].dtype == torch.bool


def test_same_norm():
    a, b = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4) * 5
    torch.testing.assert_close(_same_norm(a, b).flatten(1).norm(dim=1), b.flatten(1).norm(dim=1))


def test_with_diffusion_module_objects():
    "The agreed diffexplain.diffusion helpers (make_scheduler, make_unet2d, eps_fn) plug in unchanged."
    from diffexplain.diffusion import make_scheduler, make_unet2d, eps_fn
    torch.manual_seed(0)
    unet = make_unet2d("tiny", in_channels=1, sample_size=8).eval(); s = make_scheduler()
    x = torch.rand(2, 1, 8, 8, generator=g()) * 2 - 1
    clf = lambda x01: (x01.mean((1, 2, 3)) - 0.5) * 10
    out = diffusion_ce(x, eps_fn(unet), s, clf, num_steps=10, generator=g(), progress=False)
    assert out["x_cf"].shape == x.shape and np.isfinite(out["x_cf"].numpy()).all()
    res = acre(x, lambda x01: x01.mean((1, 2, 3)), eps_fn(unet), s, 0.5, respacing=50, steps=2, max_iter=3,
               dilation=3, progress=False, generator=g())
    assert res["x_cf"].shape == x.shape


# ------------------------------------------------------------------------------------------------ sweeps and runner
def test_reference_sweep_and_figure(toy):
    import matplotlib; matplotlib.use("Agg")
    ae = square_diffae(toy["eps"], toy["sched"])
    sw = reference_sweep(toy["x"][0], diffae_re, [0.1, 0.5, 0.9], f=toy["f"], ae=ae, progress=False)
    red = (sw["x_cf"] - sw["x_rec"])[:, 0][:, toy["m"][0, 0]].mean(1)
    assert (red.diff() > 0).all()                               # higher reference -> redder square
    fig = plot_reference_sweep(sw, "t")
    assert len(fig.axes) >= 8
    sw2 = reference_sweep(toy["x"][0], acre, [0.2, 0.8], f=toy["f"], eps=toy["eps"], scheduler=toy["sched"],
                          max_iter=3, dilation=1, progress=False)
    torch.testing.assert_close(sw2["x_rec"][1], toy["x"][0])


def test_run_batched_resumes(toy, tmp_path):
    calls = []
    def counted(**kw): calls.append(len(kw["x"])); return acre(**kw)
    counted.__name__ = "acre"
    xb, rb = toy["x"][:5], torch.linspace(0.1, 0.9, 5)
    kw = dict(f=toy["f"], eps=toy["eps"], scheduler=toy["sched"], max_iter=5, dilation=1)
    full = run_batched(counted, dict(x=xb, r=rb), batch_size=2, store_dir=tmp_path, progress=False, **kw)
    assert calls == [2, 2, 1] and len(list(tmp_path.glob("batch_*.npz"))) == 3
    (tmp_path/"batch_00001.npz").unlink()
    again = run_batched(counted, dict(x=xb, r=rb), batch_size=2, store_dir=tmp_path, progress=False, **kw)
    assert calls == [2, 2, 1, 2]                                 # only the missing batch was recomputed
    np.testing.assert_allclose(again["x_cf"], full["x_cf"], atol=1e-6)
    mem = run_batched(counted, dict(x=xb, r=rb), batch_size=2, progress=False, **kw)
    np.testing.assert_allclose(mem["y_cf"], full["y_cf"], atol=1e-6)
    with pytest.raises(ValueError, match="different run"):
        run_batched(counted, dict(x=xb, r=rb), batch_size=3, store_dir=tmp_path, progress=False, **kw)
    with pytest.raises(ValueError, match="share their first dimension"):
        run_batched(counted, dict(x=xb, r=rb[:2]), progress=False, **kw)


# --------------------------------------------------------------------------------------------------------- bad input
def test_bad_inputs(toy):
    s, f, x = toy["sched"], toy["f"], toy["x"][:2]
    unet1 = tiny_unet(ch=1)
    with pytest.raises(ValueError, match="`eps` could not process"):         # 3-channel images, 1-channel model
        acre(x, f, unet_eps(unet1), s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`eps` must return"):
        acre(x, f, lambda x_t, t: x_t[:, :1], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`f` could not process"):
        acre(x, tiny_regressor(ch=1), toy["eps"], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="one value per image"):
        acre(x, lambda z: z.mean((2, 3)), toy["eps"], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`x` contains NaN"):
        acre(x * float("nan"), f, toy["eps"], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`x` must have 4 dimensions"):
        acre(x[0], f, toy["eps"], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`x` must lie in"):
        acre(x * 3, f, toy["eps"], s, 0.5, progress=False)
    with pytest.raises(ValueError, match="`r` contains NaN"):
        acre(x, f, toy["eps"], s, float("nan"), progress=False)
    with pytest.raises(ValueError, match="`r` must be a scalar or have shape"):
        acre(x, f, toy["eps"], s, [0.1, 0.2, 0.3], progress=False)
    with pytest.raises(ValueError, match="not differentiable"):
        acre(x, lambda z: f(z).detach(), toy["eps"], s, 0.5, progress=False)
    def nograd(z):
        with torch.no_grad(): return f(z)
    with pytest.raises(ValueError, match="not differentiable"):
        diffae_re(x, nograd, square_diffae(toy["eps"], s), 0.5, progress=False)
    with pytest.raises(ValueError, match="not differentiable"):
        diffusion_ce(x, toy["eps"], s, lambda z: torch.from_numpy(z.detach().numpy().mean((1, 2, 3))), progress=False)
    ae = square_diffae(toy["eps"], s)
    class NoGradAE(DDIMDiffAE):
        def decode(self, x_T, z, steps): return super().decode(x_T, z.detach(), steps)
    bad = NoGradAE(ae.encoder, ae.eps_cond, s)
    with pytest.raises(ValueError, match="not differentiable w.r.t. `z_sem`"):
        diffae_re(x, f, bad, 0.9, progress=False)
    with pytest.raises(ValueError, match="`ae` must have"):
        diffae_re(x, f, object(), 0.5, progress=False)
    with pytest.raises(ValueError, match="`target` is required"):
        diffusion_ce(x, toy["eps"], s, lambda z: z.mean((2, 3)), progress=False)
    with pytest.raises(ValueError, match="`scheduler` must be a diffusers scheduler"):
        acre(x, f, toy["eps"], object(), 0.5, progress=False)
    with pytest.warns(UserWarning, match="training range"):
        acre(x[:1], f, toy["eps"], s, 1.3, max_iter=1, train_range=(0, 1), dilation=1, progress=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error"); check_reference(0.5, 2, train_range=(0, 1))


# ------------------------------------------------------------------------------- real square data (smoke-size models)
from diffexplain.square_study import (square_setup, square_counterfactual_eval, square_eval_set, downsample_squares,
                                      SQUARE_CF_PROFILES)


def test_downsample_squares_keeps_square_and_twins():
    g = square_eval_set(32, n=6)
    assert g["images"].shape == (6, 3, 32, 32)
    np.testing.assert_array_equal(g["mask"].reshape(6, -1).sum(1), 16)          # 8x8 -> exactly 4x4 at even positions
    red = (g["images"][:, 0] * g["mask"][:, 0]).sum((1, 2)) / 16
    assert np.abs(red - g["target"]).max() < 0.05                              # pooled noise sigma 10/255 over 16 px
    np.testing.assert_allclose(g["reference"], g["target"][[3, 4, 5, 0, 1, 2]], atol=1e-6)
    with pytest.raises(ValueError, match="`size`"):
        downsample_squares(g, 24)
    with pytest.raises(ValueError, match="`n` must be in"):
        square_eval_set(16, n=0)


@pytest.fixture(scope="module")
def square_smoke(tmp_path_factory):
    "The smoke profile's trained regressor and (truncated-chain) DDPM on real 16x16 squares."
    return square_setup("smoke", cache_dir=tmp_path_factory.mktemp("sq"), progress=False)


def test_square_setup_smoke(square_smoke, tmp_path):
    s = square_smoke
    assert s["hp"]["size"] == 16 and s["scheduler"].config.num_train_timesteps == SQUARE_CF_PROFILES["smoke"]["T"]
    x = torch.rand(2, 3, 16, 16)
    assert s["f"](x).shape == (2, 1) and s["eps"](x * 2 - 1, 10).shape == x.shape
    with pytest.raises(ValueError, match="`profile`"):
        square_setup("huge", cache_dir=tmp_path)


def test_square_acre_guidance_moves_prediction_and_keeps_background(square_smoke):
    "On real grid squares, AC-RE reaches the reference only with guidance; refinement restores the background."
    full = square_eval_set(16)
    idx = np.flatnonzero((full["row"] == 26) & (full["col"] == 26) & (full["background"] > 0.1) & (full["background"] < 0.9))[::8]
    n = len(idx)
    m = torch.from_numpy(full["mask"][idx[:1]]).float()           # one square position: one mask for every image
    oracle = lambda x01: (x01[:, :1] * m).sum((1, 2, 3)) / m.sum()  # the regressor the smoke CNN cannot yet be
    setup = {**square_smoke, "f": oracle}
    ev = square_counterfactual_eval(setup, indices=idx, progress=False, batch_size=n, max_iter=8, step_size=16 / 255)
    t = ev["table"]
    on, off = t["AC-RE filtered F(x_adv)"], t["AC-RE filtered F(x_adv) (guidance 0)"]
    assert off["|f - r|"] > 0.3                                   # the filter alone does not change the colour
    assert on["|f - r|"] < off["|f - r|"] - 0.2, t                # the guidance moves f towards r
    assert on["square MAE"] < off["square MAE"] - 0.2, t
    # refinement keeps the original exactly outside its change mask, and the mask covers the (changed) square; how
    # small the background MAE gets then depends on the DDPM (the quick profile's number is in the reproduction)
    res, x = ev["raw"]["AC-RE"], ev["x01"].numpy() * 2 - 1
    assert np.abs((res["x_cf"] - x) * (1 - res["mask"])).max() < 1e-5
    assert (res["mask"] * m.numpy()).sum() / (m.numpy().sum() * n) > 0.9
    assert t["AC-RE"]["background L1"] <= res["mask"].sum() / ((1 - m.numpy()).sum() * n) + 1e-6   # |change| <= 1 in the mask
    # no attack, no change: the authors' mask |x - x_adv| is empty and the counterfactual is the original, bit for bit
    assert (ev["raw"]["AC-RE (guidance 0)"]["mask"] == 0).all() and np.array_equal(ev["raw"]["AC-RE (guidance 0)"]["x_cf"], x.astype(np.float32))
    assert t["AC-RE (guidance 0)"]["background MAE"] < 1e-6 and t["AC-RE (guidance 0)"]["background L1"] < 1e-6   # [-1,1] -> [0,1] round-off
    assert (ev["raw"]["AC-RE"]["n_iter"] > 0).all() and (ev["raw"]["AC-RE (guidance 0)"]["n_iter"] == 0).all()


def test_square_diffae_re_rows(square_smoke, tmp_path):
    "Diff-AE-RE through `DiffAECodec` over the squares study's Diff-AE (smoke size): rows and control."
    from diffexplain.square_study import square_diffae as sd    # not the exact toy Diff-AE of this file
    from diffexplain.counterfactuals import DiffAECodec
    dae = sd("smoke", cache_dir=tmp_path, progress=False)
    codec = DiffAECodec(dae["model"], dae["scheduler"])
    x = torch.rand(2, 3, 16, 16) * 2 - 1
    z = codec.encode_semantic(x).detach().requires_grad_(True)
    out = codec.decode(codec.encode_stochastic(x, z.detach(), 3), z, 3)
    g, = torch.autograd.grad(out.sum(), z)
    assert out.shape == x.shape and g.abs().sum() > 0                     # decoding is differentiable w.r.t. z_sem
    ev = square_counterfactual_eval({**square_smoke, "ae": codec}, n_eval=2, methods=("Diff-AE-RE",), progress=False,
                                    ae_max_steps=3)
    assert set(ev["table"]) == {"Diff-AE-RE", "Diff-AE-RE (guidance 0)"}
    raw0 = ev["raw"]["Diff-AE-RE (guidance 0)"]
    np.testing.assert_allclose(raw0["z_cf"], raw0["z_sem"])            # control: the code does not move
    assert (ev["raw"]["Diff-AE-RE"]["n_iter"] > 0).any()
    with pytest.raises(ValueError, match="no diffusion autoencoder"):
        square_counterfactual_eval(square_smoke, n_eval=2, methods=("Diff-AE-RE",), progress=False)


# ------------------------------------------------------------------- diffusion CEs of the ellipse / CelebA classifiers
from diffexplain.counterfactuals import ce_summary, plot_ce_pairs
from diffexplain.face_study import celeba_ce
from diffexplain.ellipse_study import ellipse_ce, ellipse_ce_metrics
from diffexplain.data import make_ellipses, render_ellipses, moment_log_ar


@pytest.fixture(scope="module")
def ellipse_gauss():
    "Exact eps of a Gaussian fitted to 400 ellipse images (top 100 PCs) and a moment-based oracle classifier."
    from diffexplain.diffusion import make_scheduler
    s = make_scheduler()
    xe = torch.from_numpy(make_ellipses(400, cache_dir=False)["images"]).flatten(1).double() * 2 - 1
    U, S, _ = torch.linalg.svd((xe - xe.mean(0)).T, full_matrices=False)
    return dict(eps=GaussianEps(xe.mean(0), U[:, :100], S[:100] ** 2 / (len(xe) - 1), s, floor=1e-3), sched=s,
                clf=lambda x01: 10 * (moment_log_ar(x01) - 0.75))


def test_ellipse_ce_metrics_known_geometry():
    c = render_ellipses([16, 16], [16, 16], [4, 6], [4, 8 / 3], [0, 0.5])[:, None]    # circle -> same-area ellipse
    res = dict(target=np.array([1]), flipped=np.array([True]), logits_orig=np.array([[-2.]]), logits_cf=np.array([[1.]]))
    m = ellipse_ce_metrics(c[:1], c[1:], res)
    assert abs(m["Δ log AR towards target"] - np.log(2.25)) < 0.1 and m["|Δ size| / size"] < 0.03
    assert m["flip rate"] == 1 and m["single ellipse"] == 1 and m["L1 per pixel"] > 0
    m0 = ellipse_ce_metrics(c[:1], c[1:], {**res, "target": np.array([0])})
    assert abs(m0["Δ log AR towards target"] + np.log(2.25)) < 0.1                      # away from class 0
    same = ellipse_ce_metrics(c[:1], c[:1], res)
    assert same["L1 per pixel"] == 0 and abs(same["|Δ log AR|"]) < 1e-6


def test_ce_summary_binary_and_multiclass():
    b = ce_summary(dict(target=torch.tensor([1, 0]), flipped=torch.tensor([True, False]),
                        logits_orig=torch.tensor([[-1.], [2.]]), logits_cf=torch.tensor([[1.], [1.]])))
    assert b["flip rate"] == 0.5
    np.testing.assert_allclose(b["p(target) before"], (torch.sigmoid(torch.tensor(-1.)) + torch.sigmoid(torch.tensor(-2.))).item() / 2, rtol=1e-5)
    mc = ce_summary(dict(target=np.array([2]), flipped=np.array([True]), logits_orig=np.zeros((1, 3)), logits_cf=np.array([[0., 0., 5.]])))
    assert abs(mc["p(target) before"] - 1 / 3) < 1e-6 and mc["Δ log p(target)"] > 0


def test_ellipse_ce_guidance_beats_control(ellipse_gauss, tmp_path):
    "The driver on real ellipse test images: with classifier guidance the CEs move towards the target class more."
    G = ellipse_gauss
    ev = ellipse_ce("smoke", cache_dir=tmp_path, eps=G["eps"], scheduler=G["sched"], classifier=G["clf"], n=40,
                    batch_size=20, num_steps=20, progress=False)
    on, off = ev["table"]["diffusion CE"], ev["table"]["diffusion CE (classifier weight 0)"]
    assert on["Δ log p(target)"] > off["Δ log p(target)"] + 0.4
    assert on["Δ log AR towards target"] > off["Δ log AR towards target"] + 0.1
    assert on["flip rate"] >= off["flip rate"]
    assert ev["raw"]["diffusion CE"]["x_cf01"].shape == (40, 1, 32, 32) and ev["n"] == 40 and ev["classifier_metrics"] is None
    np.testing.assert_array_equal(ev["raw"]["diffusion CE"]["target"], 1 - ev["raw"]["diffusion CE"]["decision_orig"])


def test_ellipse_ce_bad_args(ellipse_gauss, tmp_path):
    G = ellipse_gauss
    with pytest.raises(ValueError, match="`profile` must be one of"):
        ellipse_ce("huge")
    with pytest.raises(ValueError, match="must be given together"):
        ellipse_ce("smoke", eps=G["eps"])
    with pytest.raises(ValueError, match=r"`n` must be in \[1, 80\]"):
        ellipse_ce("smoke", cache_dir=tmp_path, eps=G["eps"], scheduler=G["sched"], classifier=G["clf"], n=1000, progress=False)


def test_plot_ce_pairs():
    import matplotlib; matplotlib.use("Agg")
    x = np.random.default_rng(0).uniform(size=(3, 3, 8, 8))
    fig = plot_ce_pairs(x, 1 - x, [0.1, 0.2, 0.3], [0.9, 0.8, 0.7], k=5, title="t")
    assert len(fig.axes) == 6 and fig.axes[3].get_title() == "p=0.90"
    with pytest.raises(ValueError, match="no images"):
        plot_ce_pairs(x[:0], x[:0], [], [])


def test_celeba_ce_needs_real_data(tmp_path):
    with pytest.raises(FileNotFoundError, match="list_attr_celeba.txt"):
        celeba_ce("quick", data_dir=tmp_path, cache_dir=tmp_path, progress=False)
