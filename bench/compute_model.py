"""Compute model of every table and figure that needs a diffusion model: FLOPs of the paper's recipe vs ours.

For each item (attribution paper: ellipse Table 1/3/4 and Figs 3, 5, 10-12, the ellipse diffusion CE of Fig. 4,
brain Table 2 and Figs 6, 7, 13, 14, CelebA Fig. 9; regression paper: squares Table 1, CelebA-HQ Table 2) and each of
its stages (training a network, sampling, counterfactual search), the script counts the FLOPs of ONE unit of work --
one training step per image, one guided sampling step per sample (ε-model forward with gradients, the feature map /
classifier / decoder forward, backward to the input), one AC-RE PGD iteration, one Diff-AE-RE Adam step -- with
`torch.utils.flop_counter.FlopCounterMode` on meta tensors (no memory, no arithmetic: seconds on a laptop), for the
PAPER-size network and for the network of our `quick` profile. It multiplies each by how many units the recipe runs:

* paper:    the papers' recipe (steps, samples per target, targets) where the paper states it, else the library's
            `paper` profile (column `source` says which);
* few-step: the paper-size networks and data counts with our cheaper sampler setting (only sampling stages change;
            whether that setting is validated is read from the library's `SAMPLER_PROFILES` and printed);
* quick:    what our `quick` profile runs, with its smaller networks.

It prints per stage and per item the totals, the ratios paper/few-step and paper/quick, and the projected time on one
H200 (790 TFLOP/s bf16 dense) at a stated utilisation (default 35 %: U-Nets of 32-64 px with GroupNorm, SiLU and
attention, run in bf16 at batch >= 64, typically sustain 30-45 % of dense peak in matmul/conv FLOPs; the GPU campaign
`tools/gpu_campaign.py` measures the achieved rate on the ellipse DDPM to replace this assumption). The attribution
paper's own figure -- about 30 hours on one A100 for the brain ROI sampling (Sec. 5) -- is converted to FLOPs at the
same utilisation and printed beside our count.

FLOPs are those FlopCounterMode counts: matrix multiplies, convolutions (and their transposes) and attention, forward
and backward; normalisation and elementwise ops (a few per cent) are not counted. Costs are counted at batch 1 and
scaled linearly (every op here is linear in the batch; the test checks it).

    python bench/compute_model.py                         # all items -> bench/results/compute_model.{csv,md}
    python bench/compute_model.py --smoke --out /tmp/cm   # the ellipse item only, tiny U-Net (seconds; used by the tests)
    python bench/compute_model.py --utilisation 0.5       # another assumed utilisation
"""
import argparse, datetime, importlib, math, subprocess, sys, time
from pathlib import Path
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # the checkout's diffexplain, installed or not

H200_BF16_DENSE = 790e12   # FLOP/s, H200 SXM bf16 dense tensor-core peak
A100_BF16_DENSE = 312e12   # FLOP/s, A100 bf16 dense peak (the attribution paper's GPU)
PAPER_BRAIN_GPU_HOURS = 30 # attribution paper, Sec. 5: "~30 hours on a single A100 GPU on brain ROI data"
MODULES = ("ellipse_study", "square_study", "face_study", "brain_study", "scores", "guided_sampling", "diffusion",
           "counterfactuals", "models", "data")

def lib(name):
    "A name from the `diffexplain` package, wherever the current layout keeps it."
    for m in MODULES:
        try: mod = importlib.import_module(f"diffexplain.{m}")
        except ModuleNotFoundError as e:
            if e.name == f"diffexplain.{m}": continue   # a module the current layout does not have (yet)
            raise
        if hasattr(mod, name): return getattr(mod, name)
    raise ImportError(f"diffexplain has no {name!r} in {MODULES}")

# ---------------------------------------------------------------- counting
def count_flops(fn) -> int:
    "FLOPs that `FlopCounterMode` counts while `fn()` runs (forward and any backward inside it)."
    with FlopCounterMode(display=False) as fc: fn()
    return int(fc.get_total_flops())

def on_meta(build, train=False):
    "Build a network on the meta device (shapes only); frozen (inference / guidance) unless `train`."
    with torch.device("meta"): m = build()
    return m.train(train).requires_grad_(train)

def meta(*shape, grad=False): return torch.randn(*shape, device="meta", requires_grad=grad)
def tvec(n=1, t=500): return torch.full((n,), t, dtype=torch.long, device="meta")

def unet2d_call(m, x, t): return m(x, t).sample
def unet3d_call(m, x, t): return m(x, timesteps=t)

def eps_train_step(build, call, shape, batch=1):
    "One ε-model training step per `batch` images: forward, MSE loss, backward to the parameters."
    m = on_meta(build, train=True)
    def f():
        x = meta(batch, *shape); F.mse_loss(call(m, x, tvec(batch)), x).backward()
    return count_flops(f)

def net_train_step(build, shape, batch=1):
    "One classifier/regressor training step per `batch` images: forward, loss, backward to the parameters."
    m = on_meta(build, train=True)
    def f(): m(meta(batch, *shape)).float().pow(2).mean().backward()
    return count_flops(f)

def net_forward(build, shape, batch=1):
    "One forward pass (final decisions of the explained classifier)."
    m = on_meta(build)
    def f():
        with torch.no_grad(): m(meta(batch, *shape))
    return count_flops(f)

def guided_step(build_eps, call, shape, g_parts=(), batch=1):
    """One DPS / DVCE guided sampling step per sample: ε-model forward with gradients, x̂0, the feature chain
    `g_parts` ((build, is_decoder) networks applied in order: decoder, regressor/classifier), backward to x_t.
    Parameters are frozen, so the backward computes input gradients only (as the library's samplers do)."""
    eps = on_meta(build_eps); nets = [on_meta(b) for b in g_parts]
    def f():
        x = meta(batch, *shape, grad=True)
        e = call(eps, x, tvec(batch)); h = x - e
        for n in nets: h = n(h)
        h = h.sample if hasattr(h, "sample") else h
        h.float().sum().backward()   # x is the only leaf needing a gradient
    return count_flops(f)

def plain_step(build_eps, call, shape, batch=1):
    "One unguided step (forward only)."
    eps = on_meta(build_eps)
    def f():
        with torch.no_grad(): call(eps, meta(batch, *shape), tvec(batch))
    return count_flops(f)

def acre_iteration(build_eps, call, build_reg, shape, filter_steps, batch=1):
    """One AC-RE PGD iteration per image: the diffusion filter (`filter_steps` ε calls with gradients), the regressor, and
    the backward to the image. Counted as one ε call + regressor with input gradients, plus `filter_steps - 1` ε calls
    with input gradients (the cost of each call does not depend on the others; the test checks this against the unrolled
    filter), so a 200-iteration upper bound is counted in seconds."""
    return guided_step(build_eps, call, shape, (build_reg,), batch) + (filter_steps - 1)*guided_step(build_eps, call, shape, (), batch)

def _diffae_call(ae, shape, z_dim, x_grad, batch):
    "One Diff-AE decoder call conditioned on z_sem with the gradient flowing back to z (and to x_t if `x_grad`)."
    m = on_meta(ae)
    def f():
        z = meta(batch, z_dim, grad=True); x = meta(batch, *shape, grad=x_grad)
        m(x, tvec(batch), z).float().sum().backward()
    return count_flops(f)

def diffae_re_step(build_ae, build_reg, shape, decode_steps, z_dim, batch=1):
    """One Diff-AE-RE Adam step per image: `decode_steps` DDIM decoder calls conditioned on z_sem (the first from the fixed
    x_T, the others also passing the gradient back through x_t), the regressor, backward to z_sem. Counted per call
    (checked against the unrolled chain by the test)."""
    reg = on_meta(build_reg)
    def f(): reg(meta(batch, *shape, grad=True)).float().sum().backward()
    return (_diffae_call(build_ae, shape, z_dim, False, batch) + (decode_steps - 1)*_diffae_call(build_ae, shape, z_dim, True, batch)
            + count_flops(f))

def diffae_encode(build_ae, shape, encode_steps, z_dim=512, batch=1):
    "Diff-AE-RE's encoding of one image: semantic encoder + `encode_steps` stochastic-encoding decoder calls (no gradients)."
    ae = on_meta(build_ae)
    def enc():
        with torch.no_grad(): ae.encode(meta(batch, *shape))
    def step():
        with torch.no_grad(): ae(meta(batch, *shape), tvec(batch), meta(batch, z_dim))
    return count_flops(enc) + encode_steps*count_flops(step)

def n_params_meta(build): return sum(p.numel() for p in on_meta(build).parameters())

# ---------------------------------------------------------------- the items
def stage(item, paper, name, unit, flops_paper_unit, flops_quick_unit, n_paper, n_few, n_quick, source, params=None):
    "One row: FLOPs per unit (paper-size / quick network) and how many units each recipe runs."
    return dict(item=item, paper=paper, stage=name, unit=unit, params_M=params, unit_gflop_paper=flops_paper_unit/1e9,
                unit_gflop_quick=flops_quick_unit/1e9, units_paper=n_paper, units_few=n_few, units_quick=n_quick,
                flops_paper=flops_paper_unit*n_paper, flops_few=flops_paper_unit*n_few, flops_quick=flops_quick_unit*n_quick,
                source=source)

def dvce_steps(num_steps, start=0.5):
    "Number of DVCE steps run from t = start·T on a `num_steps` respaced schedule (the steps `diffusion_ce` runs)."
    sched = lib("respaced_scheduler")(lib("make_scheduler")(), num_steps); T = sched.config.num_train_timesteps
    return int(sum(int(t) <= round(start*T) for t in sched.timesteps))

def ellipse_items(smoke=False):
    make_unet2d, EllipseCNN = lib("make_unet2d"), lib("EllipseCNN")
    DDPM, STUDY, SAMPLER, EP = lib("DDPM_PROFILES"), lib("STUDY_PROFILES"), lib("SAMPLER_PROFILES"), lib("ELLIPSE_PROFILES")
    big = "tiny" if smoke else DDPM["paper"]["unet"]; small = "tiny" if smoke else DDPM["quick"]["unet"]
    U = lambda p: (lambda: make_unet2d(p, 1, 32)); shape = (1, 32, 32)
    n_test = len(lib("split_indices")(EP["paper"]["n"])["test"]); n_train = len(lib("split_indices")(EP["paper"]["n"])["train"])
    rows, item = [], "Ellipse: Table 1, Tables 3-4 (ellipse rows), Figs 3, 5, 10-12"
    dp, dq = DDPM["paper"], DDPM["quick"]
    rows.append(stage(item, "attribution", "train DDPM", "image-step", eps_train_step(U(big), unet2d_call, shape),
                      eps_train_step(U(small), unet2d_call, shape), dp["steps"]*dp["batch_size"], dp["steps"]*dp["batch_size"],
                      dq["steps"]*dq["batch_size"], f"paper: 'until full convergence', lr 1e-5 (App. C.3); steps {dp['steps']:,} x batch "
                      f"{dp['batch_size']} from the library's paper profile", n_params_meta(U(big))/1e6))
    clf = lambda: EllipseCNN()
    ep_paper = 100   # the paper trains with early stopping and gives no epoch count: an assumption, stated
    rows.append(stage(item, "attribution", "train classifier + 2 regressors", "image-step", 3*net_train_step(clf, shape),
                      3*net_train_step(clf, shape), ep_paper*n_train, ep_paper*n_train, EP["quick"]["max_epochs"]*n_train,
                      f"paper: early stopping, epochs not given (assumed {ep_paper}); quick: max_epochs {EP['quick']['max_epochs']}",
                      n_params_meta(clf)/1e6))
    sp, sq, st = SAMPLER["paper"], SAMPLER["quick"], STUDY["paper"]
    n_t = min(st["n_targets"], n_test)
    g = lambda p: guided_step(U(p), unet2d_call, shape, (lambda: _Clamp01(EllipseCNN()),))
    per = lambda k, nt, n: 2*k*nt*n   # 2 features (aspect ratio, size)
    rows.append(stage(item, "attribution", "guided sampling (2 features)", "sample-step", g(big), g(small),
                      per(sp["num_steps"], n_t, st["n_per_target"]), per(sq["num_steps"], n_t, st["n_per_target"]),
                      per(sq["num_steps"], STUDY["quick"]["n_targets"], STUDY["quick"]["n_per_target"]),
                      f"paper: 1000 steps, rho 0.1 (Table 9), 200 samples per target (App. D.1), targets 'sampled from the "
                      f"test data' (count not given; the library's paper profile: {n_t}); few-step: {sq['num_steps']} steps rho "
                      f"{sq['rho']} (validated: {sq['validated']})"))
    if smoke: return rows
    item = "Ellipse diffusion CE: Fig. 4 (flip rate 82.5 %)"
    cp, cq = lib("ELLIPSE_CE_PROFILES")["paper"], lib("ELLIPSE_CE_PROFILES")["quick"]
    gc = lambda p: guided_step(U(p), unet2d_call, shape, (lambda: _Clamp01(EllipseCNN()),))
    rows.append(stage(item, "attribution", "DVCE (t <= T/2)", "image-step", gc(big), gc(small), n_test*dvce_steps(cp["num_steps"]),
                      n_test*dvce_steps(cp["num_steps"]), cq["n"]*dvce_steps(cq["num_steps"]),
                      f"paper: start at t = 500 (App. D.2; DVCE respacing {cp['num_steps']}); all {n_test} test images (library)"))
    return rows

class _Clamp01(torch.nn.Module):
    "[-1, 1] -> [0, 1] before a network trained on [0, 1] (costs no counted FLOPs)."
    def __init__(self, net): super().__init__(); self.net = net
    def forward(self, x): return self.net((x + 1)/2)

def brain_items():
    B, make_unet3d, make_ldm_unet = lib("BRAIN_STUDY_PROFILES"), lib("make_unet3d"), lib("make_ldm_unet")
    make_ae, resnet3d = lib("make_autoencoder3d"), lib("resnet10t_3d")
    P, Q = B["paper"], B["quick"]
    ae = lambda c: (lambda: make_ae(tuple(c["channels"]), num_res_blocks=c["num_res_blocks"], norm_num_groups=c["norm_num_groups"]))
    lat, vol = (1, 32, 32, 32), (1, 64, 64, 64)
    rows, item = [], "Brain: Table 2, Tables 3-4 (brain rows), Figs 6, 7, 13, 14"
    class _AE(torch.nn.Module):   # the VAE's training forward: encode, sample, decode
        def __init__(s, a): super().__init__(); s.a = a
        def forward(s, x): return s.a(x)[0]
    tv = lambda c: net_train_step(lambda: _AE(ae(c)()), vol)
    rows.append(stage(item, "attribution", "train VAE", "volume-step", tv(P["vae"]), tv(Q["vae"]),
                      P["vae"]["steps"]*P["vae"]["batch_size"], P["vae"]["steps"]*P["vae"]["batch_size"], Q["vae"]["steps"]*Q["vae"]["batch_size"],
                      "paper: L1 + KL + perceptual (App. C.4), steps not given: library paper profile (perceptual loss not counted)",
                      n_params_meta(ae(P["vae"]))/1e6))
    L = lambda name: (lambda: make_ldm_unet(name))
    rows.append(stage(item, "attribution", "train latent U-Net", "latent-step", eps_train_step(L(P["ldm"]["unet"]), unet3d_call, lat),
                      eps_train_step(L(Q["ldm"]["unet"]), unet3d_call, lat), P["ldm"]["steps"]*P["ldm"]["batch_size"],
                      P["ldm"]["steps"]*P["ldm"]["batch_size"], Q["ldm"]["steps"]*Q["ldm"]["batch_size"],
                      f"paper: 424.3 M U-Net (App. B.4), steps not given: library paper profile {P['ldm']['steps']:,} x {P['ldm']['batch_size']}",
                      n_params_meta(L(P["ldm"]["unet"]))/1e6))
    class _Dec(torch.nn.Module):
        def __init__(s, a): super().__init__(); s.a = a
        def forward(s, z): return s.a.decode_stage_2_outputs(z)
    dec = lambda c: (lambda: _Dec(ae(c)()))
    reg = lambda: resnet3d(1, 1)
    n_test_roi = 186*2   # 186 test subjects x 2 hippocampal ROIs (Sec. 4.1)
    sp, sq = P["sample"], Q["sample"]
    nt_q = sq["n_targets"]
    gv = lambda name, c: guided_step(L(name), unet3d_call, lat, (dec(c), reg))
    gh = lambda name, c: guided_step(L(name), unet3d_call, lat, (dec(c),))
    for nm, fn in (("volume sweep (DPS via decoder + regressor)", gv), ("hippocampus sweep (DPS via decoder)", gh)):
        rows.append(stage(item, "attribution", nm, "sample-step", fn(P["ldm"]["unet"], P["vae"]), fn(Q["ldm"]["unet"], Q["vae"]),
                          sp["num_steps"]*n_test_roi*sp["n"], sq["num_steps"]*n_test_roi*sp["n"], sq["num_steps"]*nt_q*sq["n"],
                          f"paper: 1000 steps, rho Table 9, 200 samples per target (App. D.1), targets: every test ROI ({n_test_roi}; "
                          f"the library's paper profile); few-step: {sq['num_steps']} steps (validated: no)"))
    clf3 = lambda: resnet3d(1, 1)
    gce = lambda name, c: guided_step(L(name), unet3d_call, lat, (dec(c), clf3))
    rows.append(stage(item, "attribution", "diffusion CE via decoder (Fig. 7)", "volume-step", gce(P["ldm"]["unet"], P["vae"]),
                      gce(Q["ldm"]["unet"], Q["vae"]), n_test_roi*dvce_steps(sp["ce_steps"]), n_test_roi*dvce_steps(sq["ce_steps"]),
                      sq["n_ce"]*dvce_steps(sq["ce_steps"]), "paper: start at t = 500 (App. D.2), every test ROI (library)"))
    return rows

def celeba_items():
    make_unet2d, resnet10t = lib("make_unet2d"), lib("resnet10t")
    C, CP = lib("CELEBA_CE_PROFILES"), lib("CELEBA_PROFILES")
    cp, cq = C["paper"], C["quick"]
    sp, sq = CP["paper"]["size"], CP["quick"]["size"]
    U = lambda p, s: (lambda: make_unet2d(p, 3, s))
    item = "CelebA: Fig. 9 (diffusion CE; Table 5 needs no diffusion model)"
    rows = [stage(item, "attribution", "train DDPM", "image-step", eps_train_step(U(cp["unet"], sp), unet2d_call, (3, sp, sp)),
                  eps_train_step(U(cq["unet"], sq), unet2d_call, (3, sq, sq)), cp["ddpm_steps"]*cp["ddpm_batch"],
                  cp["ddpm_steps"]*cp["ddpm_batch"], cq["ddpm_steps"]*cq["ddpm_batch"],
                  f"paper: 35.7 M U-Net at 128 px (App. B.3), steps not given: library paper profile", n_params_meta(U(cp["unet"], sp))/1e6)]
    gc = lambda p, s: guided_step(U(p, s), unet2d_call, (3, s, s), (lambda: _Clamp01(resnet10t(3, 1)),))
    rows.append(stage(item, "attribution", "DVCE (t <= T/2)", "image-step", gc(cp["unet"], sp), gc(cq["unet"], sq),
                      cp["n"]*dvce_steps(cp["num_steps"]), cp["n"]*dvce_steps(cp["num_steps"]), cq["n"]*dvce_steps(cq["num_steps"]),
                      f"paper: images not given (library paper profile {cp['n']})"))
    return rows

def square_items():
    make_unet2d, DiffAE, r18 = lib("make_unet2d"), lib("DiffAE"), lib("square_resnet18")
    S, A = lib("SQUARE_CF_PROFILES"), lib("SQUARE_DIFFAE_PROFILES")
    P, Q, AP, AQ = S["paper"], S["quick"], A["paper"], A["quick"]
    n_grid = 630   # evaluation grid of the authors' code: 9 positions x 10 colours x 7 backgrounds
    U = lambda p, s: (lambda: make_unet2d(p, 3, s)); sh = lambda s: (3, s, s)
    item = "Squares: regression Table 1 (AC-RE + Diff-AE-RE), Figs 2, 4, 5"
    rows = [stage(item, "regression", "train DDPM", "image-step", eps_train_step(U(P["unet"], P["size"]), unet2d_call, sh(P["size"])),
                  eps_train_step(U(Q["unet"], Q["size"]), unet2d_call, sh(Q["size"])), P["ddpm_steps"]*P["ddpm_batch"],
                  P["ddpm_steps"]*P["ddpm_batch"], Q["ddpm_steps"]*Q["ddpm_batch"],
                  "authors: guided-diffusion 128-channel DDPM, steps not given; library paper profile (our 'square' U-Net)",
                  n_params_meta(U(P["unet"], P["size"]))/1e6)]
    ae = lambda c: (lambda: DiffAE(c["unet"], 3, c["size"], enc_channels=tuple(c["enc_channels"]), schedule=None))
    ae_call = lambda m, x, t: m(x, t, meta(x.shape[0], 3, x.shape[-1], x.shape[-1]))
    rows.append(stage(item, "regression", "train Diff-AE", "image-step", eps_train_step(ae(AP), ae_call, sh(AP["size"])),
                      eps_train_step(ae(AQ), ae_call, sh(AQ["size"])), AP["steps"]*AP["batch_size"], AP["steps"]*AP["batch_size"],
                      AQ["steps"]*AQ["batch_size"], "library paper profile (the authors train their own square Diff-AE; steps not given)",
                      n_params_meta(ae(AP))/1e6))
    cnn = lib("EllipseCNN")
    reg = lambda s, kind: ((lambda: r18(1)) if kind == "resnet18" else (lambda: cnn(1, in_channels=3, img_size=s)))
    rows.append(stage(item, "regression", "train regressor", "image-step", net_train_step(reg(64, P["regressor"]), sh(P["size"])),
                      net_train_step(reg(32, Q["regressor"]), sh(Q["size"])), P["reg_epochs"]*P["n_train"], P["reg_epochs"]*P["n_train"],
                      Q["reg_epochs"]*Q["n_train"], f"ResNet-18, AdamW lr 1e-5, batch 32 (authors' code); epochs: library max {P['reg_epochs']} (early stopping: an upper bound)",
                      n_params_meta(reg(64, P["regressor"]))/1e6))
    ac = lambda c, s: acre_iteration(U(c["unet"], s), unet2d_call, reg(s, c["regressor"]), sh(s), c["steps"])
    rows.append(stage(item, "regression", "AC-RE PGD iterations (upper bound)", "image-iteration", ac(P, P["size"]), ac(Q, Q["size"]),
                      n_grid*P["max_iter"], n_grid*P["max_iter"], Q["n_eval"]*Q["max_iter"],
                      f"authors: <= {P['max_iter']} PGD iterations, filter {P['steps']} steps with gradients; {n_grid} grid images"))
    dre = lambda c, a: diffae_re_step(ae(a), reg(a["size"], c["regressor"]), sh(a["size"]), c["ae_decode_steps"], 512)
    rows.append(stage(item, "regression", "Diff-AE-RE Adam steps (upper bound)", "image-step", dre(P, AP), dre(Q, AQ),
                      n_grid*P["ae_max_steps"], n_grid*P["ae_max_steps"], Q["n_eval"]*Q["ae_max_steps"],
                      f"authors: <= {P['ae_max_steps']} Adam steps, decode {P['ae_decode_steps']} DDIM steps with gradients"))
    enc = lambda c, a: diffae_encode(ae(a), sh(a["size"]), c["ae_encode_steps"], 512)
    rows.append(stage(item, "regression", "Diff-AE-RE encoding", "image", enc(P, AP), enc(Q, AQ), n_grid, n_grid, Q["n_eval"],
                      f"semantic encoder + {P['ae_encode_steps']}-step stochastic encoding"))
    return rows

def face_items():
    make_unet2d, DiffAE, dn = lib("make_unet2d"), lib("DiffAE"), lib("densenet121_regressor")
    FP = lib("FACE_PROFILES"); P, Q = FP["paper"], FP["quick"]
    per = 1000   # the paper does not say how many CelebA-HQ images it explains: costs are given per 1,000 images
    U = lambda p, s: (lambda: make_unet2d(p, 3, s)); sh = lambda s: (3, s, s)
    reg = lambda: dn(None)
    item = f"CelebA-HQ: regression Table 2 (per {per:,} images; pretrained diffusion models)"
    ac = lambda c: acre_iteration(U(c["unet"], c["size"]), unet2d_call, reg, sh(c["size"]), c["steps"])
    rows = [stage(item, "regression", "AC-RE PGD iterations (upper bound)", "image-iteration", ac(P), ac(Q), per*P["max_iter"],
                  per*P["max_iter"], Q["n_eval"]*Q["max_iter"],
                  f"<= {P['max_iter']} iterations, filter {P['steps']} steps of respacing {P['respacing']} (Sec. 4.3.1); our "
                  f"'{P['unet']}' U-Net at {P['size']} px stands in for ACE's larger guided-diffusion model",
                  n_params_meta(U(P["unet"], P["size"]))/1e6)]
    ae = lambda c: (lambda: DiffAE(c["ae_unet"], 3, c["size"], enc_channels=tuple(c["ae_enc"])))
    dre = lambda c: diffae_re_step(ae(c), reg, sh(c["size"]), c["ae_decode_steps"], 512)
    rows.append(stage(item, "regression", "Diff-AE-RE Adam steps (upper bound)", "image-step", dre(P), dre(Q), per*P["ae_max_steps"],
                      per*P["ae_max_steps"], Q["n_eval"]*Q["ae_max_steps"],
                      f"<= {P['ae_max_steps']} Adam steps, {P['ae_decode_steps']} decoding steps (Sec. 4.3.1); our Diff-AE stands in "
                      "for the pretrained FFHQ-256 one", n_params_meta(ae(P))/1e6))
    rows.append(stage(item, "regression", "train DDPM + Diff-AE (ours; the paper reuses pretrained ones)", "image-step",
                      eps_train_step(U(P["unet"], P["size"]), unet2d_call, sh(P["size"])) * 2,
                      eps_train_step(U(Q["unet"], Q["size"]), unet2d_call, sh(Q["size"])) * 2,
                      0, 0, Q["ddpm_steps"]*Q["ddpm_batch"], "paper: none (ACE's DDPM, Diff-AE's FFHQ model); quick: DDPM + "
                      "Diff-AE of about the same cost each, counted as 2 x the DDPM's step"))
    return rows

# ---------------------------------------------------------------- report
def hours(flops, util, peak=H200_BF16_DENSE): return flops/(peak*util)/3600

def fmt(x):
    if x is None or (isinstance(x, float) and not math.isfinite(x)): return "-"
    return f"{x:.2e}" if abs(x) >= 1e4 or (0 < abs(x) < 1e-2) else f"{x:.3g}"

def totals(rows):
    "Per-item sums (and a grand total) of the three FLOP columns."
    out = {}
    for r in rows:
        t = out.setdefault(r["item"], dict(item=r["item"], paper=r["paper"], stage="TOTAL", flops_paper=0, flops_few=0, flops_quick=0))
        for k in ("flops_paper", "flops_few", "flops_quick"): t[k] += r[k]
    return list(out.values())

def ratio(a, b): return a/b if b else float("nan")

def report(rows, util, out_dir, argv, wall):
    import pandas as pd
    for r in rows + (tot := totals(rows)):
        r["paper_over_few"], r["paper_over_quick"] = ratio(r["flops_paper"], r["flops_few"]), ratio(r["flops_paper"], r["flops_quick"])
        for k in ("paper", "few", "quick"): r[f"h200_h_{k}"] = hours(r[f"flops_{k}"], util)
    df = pd.DataFrame(rows); dt = pd.DataFrame(tot)
    out_dir = Path(out_dir); out_dir.mkdir(parents=True, exist_ok=True)
    pd.concat([df, dt]).to_csv(out_dir/"compute_model.csv", index=False, float_format="%.6g")
    brain = dt[dt["item"].str.startswith("Brain")]
    sampling = df[df["item"].str.startswith("Brain") & ~df["stage"].str.startswith("train")]
    paper_flops = PAPER_BRAIN_GPU_HOURS*3600*A100_BF16_DENSE*util
    cmd = "python " + " ".join(argv)
    try: sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    except OSError: sha = "?"
    L = [f"# Compute model: FLOPs of each table's recipe, paper vs ours", "",
         f"Regenerate: `{cmd}` (commit {sha}, {datetime.date.today()}, {wall:.0f} s on CPU, torch threads {torch.get_num_threads()}; "
         "FLOPs counted on meta tensors, so the machine does not matter).", "",
         f"Units are FLOPs counted by `torch.utils.flop_counter.FlopCounterMode` (matmul, conv, attention; forward + backward). "
         f"H200 hours assume {H200_BF16_DENSE/1e12:.0f} TFLOP/s bf16 dense at {util:.0%} utilisation. `paper`: the paper's recipe "
         "(the library's `paper` profile where the paper is silent: see `source`); `few`: paper-size networks and data with our "
         "few-step sampler; `quick`: our quick profile as run.", "",
         "## Per item", "", "| item | FLOPs paper | FLOPs few-step | FLOPs quick | paper/few | paper/quick | H200 h paper | H200 h few | H200 h quick |",
         "|---|---|---|---|---|---|---|---|---|"]
    for r in tot:
        L.append(f"| {r['item']} | {fmt(r['flops_paper'])} | {fmt(r['flops_few'])} | {fmt(r['flops_quick'])} | {fmt(r['paper_over_few'])} | "
                 f"{fmt(r['paper_over_quick'])} | {fmt(r['h200_h_paper'])} | {fmt(r['h200_h_few'])} | {fmt(r['h200_h_quick'])} |")
    L += ["", "## Per stage", "", "| item | stage | params (M) | GFLOP/unit paper | GFLOP/unit quick | unit | units paper | units few | units quick | "
          "H200 h paper | H200 h few | H200 h quick | source |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        L.append(f"| {r['item'].split(':')[0]} | {r['stage']} | {fmt(r['params_M'])} | {fmt(r['unit_gflop_paper'])} | {fmt(r['unit_gflop_quick'])} | "
                 f"{r['unit']} | {fmt(r['units_paper'])} | {fmt(r['units_few'])} | {fmt(r['units_quick'])} | {fmt(r['h200_h_paper'])} | "
                 f"{fmt(r['h200_h_few'])} | {fmt(r['h200_h_quick'])} | {r['source']} |")
    if len(brain):
        s = sampling["flops_paper"].sum()
        vol = df[df["item"].str.startswith("Brain") & df["stage"].str.startswith("volume")].iloc[0]
        per_target = vol["unit_gflop_paper"]*1e9*vol["units_paper"]/vol["units_paper"]*200*1000   # one target: 200 samples x 1000 steps
        L += ["", "## The paper's own figure", "",
              f"The attribution paper (Sec. 5) reports about {PAPER_BRAIN_GPU_HOURS} hours on one A100 for generating samples on the brain "
              f"ROI data. At {A100_BF16_DENSE/1e12:.0f} TFLOP/s bf16 dense and the same {util:.0%} utilisation that is {fmt(paper_flops)} FLOPs. "
              f"Our count of the brain sampling recipe (volume and hippocampus sweeps with every test ROI as a target, 200 samples, 1000 "
              f"steps, and the diffusion CE) is {fmt(s)} FLOPs, {s/paper_flops:.0f}x more ({hours(s, util, A100_BF16_DENSE):,.0f} A100-hours "
              f"at that utilisation). One guided step of the 3-D latent U-Net with the decoder and regressor costs "
              f"{vol['unit_gflop_paper']/1e3:.1f} TFLOP per sample, so one target (200 samples x 1000 steps) costs {fmt(per_target)} FLOPs "
              f"and the paper's 30 hours buy about {paper_flops/per_target:.1f} such targets in all (at 100 % utilisation, "
              f"{paper_flops/util/per_target:.0f}). So the paper's brain sweeps must have used far fewer targets, samples or steps than "
              "every test ROI with 200 samples at 1000 steps; the paper does not give its brain target count."]
    (out_dir/"compute_model.md").write_text("\n".join(L) + "\n")
    return df, dt

def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--utilisation", type=float, default=0.35, help="assumed share of the H200's bf16 dense peak")
    p.add_argument("--out", default="bench/results", help="folder for compute_model.csv / .md")
    p.add_argument("--smoke", action="store_true", help="ellipse item only, tiny U-Net (seconds)")
    p.add_argument("--items", default="ellipse,brain,celeba,squares,celebahq", help="comma-separated subset")
    a = p.parse_args(argv)
    if not 0 < a.utilisation <= 1: raise ValueError(f"--utilisation must be in (0, 1], got {a.utilisation}")
    torch.set_num_threads(1); t0 = time.perf_counter()
    builders = dict(ellipse=ellipse_items, brain=brain_items, celeba=celeba_items, squares=square_items, celebahq=face_items)
    want = ["ellipse"] if a.smoke else [s.strip() for s in a.items.split(",") if s.strip()]
    bad = set(want) - set(builders)
    if bad: raise ValueError(f"--items must be among {sorted(builders)}, got {sorted(bad)}")
    rows = []
    for k in want:
        t = time.perf_counter()
        rows += ellipse_items(smoke=True) if a.smoke else builders[k]()
        print(f"[{k}] counted in {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)
    df, dt = report(rows, a.utilisation, a.out, ["bench/compute_model.py", *(argv if argv is not None else sys.argv[1:])],
                    time.perf_counter() - t0)
    import pandas as pd
    with pd.option_context("display.width", 250, "display.max_colwidth", 60, "display.float_format", "{:.3g}".format):
        print(dt[["item", "flops_paper", "flops_few", "flops_quick", "paper_over_few", "paper_over_quick",
                  "h200_h_paper", "h200_h_few", "h200_h_quick"]].to_string(index=False))
    print(f"utilisation {a.utilisation:.0%} of {H200_BF16_DENSE/1e12:.0f} TFLOP/s; wrote {a.out}/compute_model.csv and .md")
    return df, dt

if __name__ == "__main__": main()
