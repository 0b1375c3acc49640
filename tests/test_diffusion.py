"""Tests for diffexplain.diffusion: schedule, U-Nets, sampling, the resumable training loop (with a real SIGKILL),
the ellipse quality check, the diffusion autoencoder and 3D latent diffusion at tiny sizes."""
import os, signal, subprocess, sys, textwrap, time, json
from pathlib import Path
import numpy as np
import pytest
import torch
from skimage.draw import ellipse as sk_ellipse

from diffexplain.data import seed_everything
from diffexplain import diffusion as D
from diffexplain import ellipse_study as E
from diffexplain import square_study as SQ


def toy_ellipses(n, size=16, seed=0):
    "Fixture: anti-aliased filled ellipses in [0,1] (4x supersampled)."
    rng = np.random.default_rng(seed); s = 4*size; out = np.zeros((n, 1, size, size), np.float32)
    for i in range(n):
        b = rng.uniform(size/12, size/6); a = b*np.exp(rng.uniform(0.1, 1.0)); th = rng.uniform(0, np.pi)
        r, c = rng.uniform(a+1, size-a-1, 2)
        img = np.zeros((s, s), np.float32); rr, cc = sk_ellipse(4*r, 4*c, 4*a, 4*b, shape=img.shape, rotation=th); img[rr, cc] = 1
        out[i, 0] = img.reshape(size, 4, size, 4).mean((1, 3))
    return out


@pytest.fixture(autouse=True)
def one_thread():
    "Tiny models train several times faster on one torch thread than on two on a shared 2-core CPU (measured)."
    n = torch.get_num_threads(); torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def ellipses16():
    return toy_ellipses(128, 16)


def test_scheduler_matches_paper():
    s = D.make_scheduler()
    b, ab = s.betas.double(), s.alphas_cumprod.double()
    assert s.config.prediction_type == "epsilon" and s.config.beta_schedule == "linear"
    for t in (1, 10, 500, 999):
        assert abs(s._get_variance(t).item() - (b[t]*(1-ab[t-1])/(1-ab[t])).item()) < 1e-7
    with pytest.raises(ValueError, match="num_train_timesteps"): D.make_scheduler(num_train_timesteps=0)


@pytest.mark.parametrize("profile,c,size,paper", [("ellipse", 1, 32, 9.2e6), ("celeba", 3, 128, 35.7e6)])
def test_paper_sized_unets(profile, c, size, paper):
    n = D.n_params(D.make_unet2d(profile, c, size))
    assert abs(n - paper)/paper < 0.08, n


def test_unet_bad_input():
    with pytest.raises(ValueError, match="in_channels"): D.make_unet2d("tiny", 0, 16)
    with pytest.raises(ValueError, match="sample_size"): D.make_unet2d("square", 3, 20)


def test_sample_shape_range_and_seed():
    seed_everything(0); u = D.make_unet2d("tiny", 1, 16).eval()
    kw = dict(num_inference_steps=8, progress=False)
    a = D.sample(D.eps_fn(u), D.make_scheduler(), (2, 1, 16, 16), generator=torch.Generator().manual_seed(3), **kw)
    b = D.sample(D.eps_fn(u), D.make_scheduler(), (2, 1, 16, 16), generator=torch.Generator().manual_seed(3), **kw)
    assert a.shape == (2, 1, 16, 16) and torch.equal(a, b) and torch.isfinite(a).all()


def _fixed_batch_loss(unet, images, sched, seed=123):
    g = torch.Generator().manual_seed(seed)
    x0 = D.to_model_range(torch.from_numpy(images[:64])); noise = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (len(x0),), generator=g)
    with torch.no_grad():
        return torch.nn.functional.mse_loss(unet(sched.add_noise(x0, noise, t), t).sample, noise).item()


def test_training_lowers_loss(ellipses16):
    seed_everything(0); u = D.make_unet2d("tiny", 1, 16); s = D.make_scheduler()
    before = _fixed_batch_loss(u.eval(), ellipses16, s)
    r = D.train_diffusion(u, ellipses16, s, steps=40, batch_size=16, lr=3e-3, progress=False)
    after = _fixed_batch_loss(r["model"].eval(), ellipses16, s)
    assert after < 0.8*before, (before, after)
    assert r["losses"].shape == (40,) and np.isfinite(r["losses"]).all()
    # EMA weights differ from the raw weights but stay finite
    assert any(not torch.equal(a, b) for a, b in zip(r["model"].parameters(), r["ema"].parameters()))


def test_bad_arguments(ellipses16):
    u = D.make_unet2d("tiny", 1, 16)
    with pytest.raises(ValueError, match="images"): D.train_diffusion(u, ellipses16*2, steps=1, progress=False)
    with pytest.raises(ValueError, match="steps"): D.train_diffusion(u, ellipses16, steps=0, progress=False)
    with pytest.raises(ValueError, match="mixed_precision"):
        D.train_diffusion(u, ellipses16, steps=1, device="cpu", mixed_precision="bf16", progress=False)


def test_mismatched_checkpoint_is_refused(ellipses16, tmp_path):
    seed_everything(0)
    D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, steps=2, batch_size=4, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration.*model"):
        D.train_diffusion(D.make_unet2d("small", 1, 16), ellipses16, steps=2, batch_size=4, ckpt_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="different configuration.*data"):
        D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16[:64], steps=2, batch_size=4, ckpt_dir=tmp_path, progress=False)


CHILD = """
import sys, time, numpy as np, torch
torch.set_num_threads(int(sys.argv[3]))
from diffexplain.data import seed_everything
from diffexplain import diffusion as D
images = np.load(sys.argv[1]); seed_everything(0)
D.train_diffusion(D.make_unet2d("tiny", 1, 16), images, steps={steps}, batch_size=8, lr=1e-3, ckpt_dir=sys.argv[2],
                  ckpt_every=2, progress=False, callback=stop_at)
"""
# the child blocks at step KILL_AT after writing a marker: the kill lands at a known step (checkpoints at 2, 4, 6 exist)
STOP = """
import sys, time
from pathlib import Path
def stop_at(step, loss):
    if step == {kill_at}: Path(sys.argv[2] + ".killpoint").write_text(str(step)); time.sleep(3600)
"""


def test_kill_and_resume_gives_same_weights(ellipses16, tmp_path):
    steps = 14
    np.save(tmp_path/"x.npy", ellipses16)
    (tmp_path/"child.py").write_text(STOP.format(kill_at=7) + CHILD.format(steps=steps))
    ck = tmp_path/"ckpt"
    p = subprocess.Popen([sys.executable, str(tmp_path/"child.py"), str(tmp_path/"x.npy"), str(ck),
                          str(torch.get_num_threads())], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    marker = Path(str(ck) + ".killpoint")
    while not marker.exists():  # the child writes it at step 7 and then blocks
        assert p.poll() is None, p.stderr.read().decode()[-3000:]
        time.sleep(0.05)  # polling interval only; no deadline (pytest's own timeout covers a hang)
    os.kill(p.pid, signal.SIGKILL); p.wait()
    assert p.returncode == -signal.SIGKILL
    kw = dict(steps=steps, batch_size=8, lr=1e-3, progress=False)
    seed_everything(0)
    resumed = D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, ckpt_dir=ck, ckpt_every=2, **kw)
    assert resumed["start_step"] == 6  # the last checkpoint before the kill at step 7
    seed_everything(0)
    straight = D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, **kw)
    for a, b in zip(resumed["model"].parameters(), straight["model"].parameters()):
        assert torch.equal(a, b), (a - b).abs().max()
    for a, b in zip(resumed["ema"].parameters(), straight["ema"].parameters()): assert torch.equal(a, b)


def test_load_or_train_reuses_cache(ellipses16, tmp_path):
    m1, _ = D.load_or_train_ddpm(ellipses16, "tiny", "t", steps=2, cache_dir=tmp_path, batch_size=4, progress=False)
    m2, _ = D.load_or_train_ddpm(ellipses16, "tiny", "t", steps=2, cache_dir=tmp_path, batch_size=4, progress=False)
    for a, b in zip(m1.parameters(), m2.parameters()): assert torch.equal(a, b)
    assert len(list(tmp_path.glob("t-*/ema-step2/*.safetensors"))) == 1


def test_ellipse_quality_check(ellipses16):
    x = toy_ellipses(64, 32, seed=1)
    assert E.ellipse_check(x).mean() > 0.9
    two = np.clip(x[:32] + x[32:], 0, 1)  # two ellipses in one image (mostly separate)
    assert E.ellipse_check(two).mean() < 0.5
    assert E.ellipse_check(np.zeros((4, 1, 32, 32), np.float32)).sum() == 0
    q = E.ellipse_quality(x[:32], x[32:])
    assert q["frac_single_ellipse"] > 0.9 and 0 <= q["ks_log_ar"] <= 1
    noise = np.random.default_rng(0).random((32, 1, 32, 32), dtype=np.float32)
    assert E.ellipse_quality(noise, x)["ks_size"] > 0.9
    empty = np.zeros((4, 1, 32, 32), np.float32)  # all-black samples have no moments: failures, not a crash
    q = E.ellipse_quality(np.concatenate([x[:4], empty]), x[32:])
    assert q["frac_empty"] == 0.5 and q["frac_single_ellipse"] <= 0.5
    q = E.ellipse_quality(empty, x)
    assert q["frac_empty"] == 1 and q["ks_log_ar"] == 1 and q["frac_single_ellipse"] == 0


def test_diffae_encode_decode_and_gradients(ellipses16):
    seed_everything(0); s = D.make_scheduler()
    dae = D.DiffAE("tiny", 1, 16, enc_channels=(8, 16))
    dae = D.train_diffusion(dae, ellipses16[:96], s, steps=40, batch_size=16, lr=2e-3, ema_decay=0.9, objective="v",
                            progress=False)["model"].eval()
    x0 = D.to_model_range(torch.from_numpy(ellipses16[96:104]))
    with torch.no_grad(): z = dae.encode(x0)
    assert z.shape == (8, 512)
    xT = D.ddim_encode(D.eps_fn(dae, z), x0, s, num_steps=10)
    z = z.clone().requires_grad_(True)
    rec = D.ddim_decode(D.eps_fn(dae, z), xT, s, num_steps=10)
    with torch.no_grad():
        rnd = D.ddim_decode(D.eps_fn(dae, z), torch.randn(xT.shape, generator=torch.Generator().manual_seed(0)), s, num_steps=10)
    assert torch.nn.functional.mse_loss(rec, x0) < 0.5*torch.nn.functional.mse_loss(rnd, x0)
    rec.sum().backward(); assert z.grad.abs().sum() > 0
    # with a zero eps-model, DDIM encode/decode is an exact inverse
    zero = lambda x, t: torch.zeros_like(x)
    assert torch.allclose(D.ddim_decode(zero, D.ddim_encode(zero, x0, s, 10), s, 10), x0, atol=1e-4)


def test_diffae_v_prediction_and_encoder_head():
    "DiffAE(prediction='v') returns eps = sqrt(ab) v + sqrt(1-ab) x_t of the same U-Net; the flatten head sees position."
    seed_everything(0)
    v, e = D.DiffAE("tiny", 1, 16, enc_channels=(8, 16), prediction="v"), D.DiffAE("tiny", 1, 16, enc_channels=(8, 16), prediction="eps")
    e.load_state_dict(v.state_dict())
    x_t, z, t = torch.randn(3, 1, 16, 16), torch.randn(3, 512), torch.tensor([0, 500, 999])
    ab = D.make_scheduler().alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad(): assert torch.allclose(v(x_t, t, z), ab.sqrt()*e(x_t, t, z) + (1 - ab).sqrt()*x_t, atol=1e-6)
    assert v.config["prediction"] == "v" and v.config["enc_pool"] == "flatten"
    enc = D.SemanticEncoder(1, 4, (8, 16), sample_size=16)
    assert enc.net[-1].in_features == 16*4*4 and enc(torch.randn(2, 1, 16, 16)).shape == (2, 4)
    assert D.SemanticEncoder(1, 4, (8, 16)).net[-1].in_features == 16 # global average pool
    with pytest.raises(ValueError, match="sample_size"): D.SemanticEncoder(1, 4, (8, 16), sample_size=18)
    with pytest.raises(ValueError, match="prediction"): D.DiffAE("tiny", 1, 16, prediction="x0")
    with pytest.raises(ValueError, match="enc_pool"): D.DiffAE("tiny", 1, 16, enc_pool="max")


def test_train_diffusion_v_objective(ellipses16, tmp_path):
    "objective='v' weights each sample's eps error by 1/alpha_bar_t, is recorded in the checkpoint config, and is validated."
    seed_everything(0); s = D.make_scheduler()
    r = D.train_diffusion(D.DiffAE("tiny", 1, 16, enc_channels=(8, 16)), ellipses16[:32], s, steps=3, batch_size=8, objective="v",
                          ckpt_dir=tmp_path/"v", progress=False)
    assert np.isfinite(r["losses"]).all() and json.loads((tmp_path/"v"/"config.json").read_text())["objective"] == "v"
    D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16[:32], s, steps=1, batch_size=8, ckpt_dir=tmp_path/"eps", progress=False)
    assert "objective" not in json.loads((tmp_path/"eps"/"config.json").read_text()) # eps runs keep their old config
    with pytest.raises(ValueError, match="objective"): D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, steps=1, objective="x0")
    # the weight: a model predicting eps = 0 has eps-loss |noise|^2 ~ 1, v-loss ~ mean 1/alpha_bar_t >> 1
    class Zero(torch.nn.Module):
        def __init__(self): super().__init__(); self.w = torch.nn.Parameter(torch.zeros(()))
        def forward(self, x_t, t): return torch.zeros_like(x_t) + 0*self.w
    le = D.train_diffusion(Zero(), ellipses16, s, steps=20, batch_size=8, lr=0., progress=False)["losses"].mean()
    lv = D.train_diffusion(Zero(), ellipses16, s, steps=20, batch_size=8, lr=0., objective="v", progress=False)["losses"].mean()
    assert 0.8 < le < 1.2 and lv > 100*le


def test_ddim_clip_x0():
    "With clipping, a decoder whose eps implies an out-of-range x0 still lands in [-1, 1]; without, it does not."
    s = D.make_scheduler(); x_T = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    bad = lambda x, t: -2*x                                    # implies |x0_hat| far above 1
    assert D.ddim_decode(bad, x_T, s, 10).abs().max() <= 1 + 1e-5
    assert D.ddim_decode(bad, x_T, s, 10, clip_x0=False).abs().max() > 2


def test_latent_diffusion_3d_end_to_end():
    seed_everything(0); vol = torch.rand(4, 1, 16, 16, 16)
    with pytest.warns(UserWarning, match="WITHOUT"): assert D.make_perceptual_loss(None) is None
    ae = D.make_autoencoder3d(channels=(8, 16), norm_num_groups=4, num_res_blocks=1)
    ae = D.train_autoencoder3d(ae, vol, steps=2, batch_size=2, progress=False)["model"]
    sf = D.latent_scale_factor(ae, vol); assert sf > 0
    lt = D.LatentTransform(ae, sf)
    r = D.train_diffusion(D.make_unet3d("tiny"), vol, steps=2, batch_size=2, transform=lt, progress=False)
    x = D.sample_latent(ae, r["ema"], sf, (1, 1, 8, 8, 8), num_inference_steps=3, progress=False)
    assert x.shape == (1, 1, 16, 16, 16) and 0 <= x.min() and x.max() <= 1
    z = torch.randn(1, 1, 8, 8, 8, requires_grad=True)
    D.decode_latent(ae, z, sf).mean().backward(); assert z.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="norm_num_groups"): D.make_autoencoder3d(channels=(8, 12), norm_num_groups=8)
    assert abs(D.n_params(D.make_autoencoder3d()) - 1.2e6) < 0.1e6


def test_cosine_lr_and_ema_warmup_resume_exactly(ellipses16, tmp_path):
    "An interrupted run with a decaying lr and EMA warm-up resumes to the weights of an uninterrupted one."
    kw = dict(steps=6, batch_size=8, lr=1e-3, lr_schedule="cosine", lr_warmup=2, ema_power=2/3, progress=False)
    def boom(step, loss):
        if step == 4: raise RuntimeError("killed")
    seed_everything(0)
    with pytest.raises(RuntimeError, match="killed"):
        D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, ckpt_dir=tmp_path, ckpt_every=3, callback=boom, **kw)
    seed_everything(0); resumed = D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, ckpt_dir=tmp_path, ckpt_every=3, **kw)
    assert resumed["start_step"] == 3
    seed_everything(0); straight = D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, **kw)
    for a, b in zip(list(resumed["model"].parameters()) + list(resumed["ema"].parameters()),
                    list(straight["model"].parameters()) + list(straight["ema"].parameters())):
        assert torch.equal(a, b)
    with pytest.raises(ValueError, match="lr_schedule"): D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, steps=2, lr_schedule="step")
    with pytest.raises(ValueError, match="lr_warmup"): D.train_diffusion(D.make_unet2d("tiny", 1, 16), ellipses16, steps=2, lr_warmup=5)


def test_ellipse_ddpm_smoke_profile(tmp_path):
    r = E.ellipse_ddpm("smoke", cache_dir=tmp_path, progress=False)
    assert r["samples"].shape == (16, 1, 32, 32) and 0 <= r["samples"].min() and r["samples"].max() <= 1
    q = r["quality"]
    assert {"frac_single_ellipse", "frac_empty", "ks_log_ar", "ks_size", "log_ar_mean_real"} <= set(q)
    assert 0 <= q["ks_log_ar"] <= 1 and q["frac_single_ellipse_real"] > 0.8 and not r["loaded"] and r["train_s"] > 0
    again = E.ellipse_ddpm("smoke", cache_dir=tmp_path, progress=False)
    assert again["loaded"] and np.array_equal(again["samples"], r["samples"]) and json.dumps(again["quality"]) == json.dumps(q)
    for a, b in zip(again["unet"].parameters(), r["unet"].parameters()): assert torch.equal(a, b)
    with pytest.raises(ValueError, match="profile"): E.ellipse_ddpm("fast", cache_dir=tmp_path)
    with pytest.raises(ValueError, match="num_threads"): E.ellipse_ddpm("smoke", cache_dir=tmp_path, num_threads=0)


def test_square_diffae_smoke_profile(tmp_path):
    r = SQ.square_diffae("smoke", cache_dir=tmp_path, progress=False)
    m = r["metrics"]
    assert r["interp"].shape == (5, 3, 16, 16) and len(m["red"]) == 5 and np.isfinite(m["mse_rec"])
    assert m["red_bright"] > m["red_dark"] + 0.5  # the dark/bright pair differs in red inside the mask
    again = SQ.square_diffae("smoke", cache_dir=tmp_path, progress=False)
    assert again["loaded"] and again["metrics"] == m
    for a, b in zip(again["model"].parameters(), r["model"].parameters()): assert torch.equal(a, b)
    with pytest.raises(ValueError, match="profile"): SQ.square_diffae("big", cache_dir=tmp_path)


# ------------------------------------------------------------------------------------- schedules as a profile property
def test_linear_schedules_and_truncation():
    "guided-diffusion's linear beta (1e-4 -> 0.02 at T=1000, scaled by 1000/T); ACE's 500-step CelebA-HQ schedule; truncation keeps the betas."
    gd = D.make_scheduler(**D.linear_schedule("guided-diffusion"))
    assert gd.betas[0].item() == pytest.approx(1e-4) and gd.betas[-1].item() == pytest.approx(0.02)
    assert (1 - gd.alphas_cumprod[80]).sqrt().item() == pytest.approx(0.27, abs=0.01)            # the squares' filter depth
    assert (1 - D.make_scheduler().alphas_cumprod[80]).sqrt().item() == pytest.approx(0.41, abs=0.01)
    ace = D.linear_schedule("guided-diffusion", chain=500)
    assert ace == dict(num_train_timesteps=500, beta_start=pytest.approx(2e-4), beta_end=pytest.approx(0.04))
    short = D.make_scheduler(**D.linear_schedule("guided-diffusion", T=100))
    np.testing.assert_allclose(short.alphas_cumprod.numpy(), gd.alphas_cumprod[:100].numpy(), rtol=1e-5)
    with pytest.raises(ValueError, match="`name`"): D.linear_schedule("cosine")
    with pytest.raises(ValueError, match="`T`"): D.linear_schedule("guided-diffusion", chain=500, T=501)


def test_diffae_converts_v_with_its_own_schedule():
    "v -> eps uses the model's alpha_bar, not the attribution default (the two differ by ~0.3 in sqrt(ab) at t=500)."
    seed_everything(0); sk = D.linear_schedule("guided-diffusion")
    v = D.DiffAE("tiny", 1, 16, enc_channels=(8, 16), prediction="v", schedule=sk)
    e = D.DiffAE("tiny", 1, 16, enc_channels=(8, 16), prediction="eps"); e.load_state_dict(v.state_dict())
    x_t, z, t = torch.randn(3, 1, 16, 16), torch.randn(3, 512), torch.tensor([0, 500, 999])
    ab = D.make_scheduler(**sk).alphas_cumprod[t].float().view(-1, 1, 1, 1)
    with torch.no_grad(): assert torch.allclose(v(x_t, t, z), ab.sqrt()*e(x_t, t, z) + (1 - ab).sqrt()*x_t, atol=1e-6)
    assert v.config["schedule"] == sk and not torch.allclose(v.alpha_bar, D.DiffAE("tiny", 1, 16, enc_channels=(8, 16)).alpha_bar)


def test_ddim_grid_spans_the_chain():
    "Diff-AE's grids: the 20-step encoding ends at T-1 and the 10-step decoding starts there (x_T pure noise)."
    for T, n in ((1000, 20), (1000, 10), (500, 20), (100, 7)):
        ts = D.ddim_timesteps(T, n)
        assert ts[0] == 0 and ts[-1] == T - 1 and len(ts.unique()) == n
    assert D.ddim_timesteps(1000, 10).tolist() == [0, 111, 222, 333, 444, 555, 666, 777, 888, 999]
    with pytest.raises(ValueError, match="num_steps"): D.ddim_timesteps(10, 0)


def test_ddpm_cache_key_holds_schedule_and_code(ellipses16, tmp_path, monkeypatch):
    "Another schedule, or another version of the model/training code, is another cache entry (retrained, never a stale load)."
    kw = dict(steps=1, cache_dir=tmp_path, batch_size=4, progress=False)
    D.load_or_train_ddpm(ellipses16[:8], "tiny", "k", **kw)
    D.load_or_train_ddpm(ellipses16[:8], "tiny", "k", scheduler_kwargs=D.linear_schedule("guided-diffusion"), **kw)
    assert len(list(tmp_path.glob("k-*"))) == 2
    D.load_or_train_ddpm(ellipses16[:8], "tiny", "k", **kw)                    # same schedule, same code: loaded
    assert len(list(tmp_path.glob("k-*"))) == 2
    monkeypatch.setattr(D, "code_version", lambda *objs: "changed000")      # as if train_diffusion had been edited
    D.load_or_train_ddpm(ellipses16[:8], "tiny", "k", **kw)
    assert len(list(tmp_path.glob("k-*"))) == 3
