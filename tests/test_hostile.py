"""Hostile input for every public function: a clear error naming the argument, or a documented correct value.

Cases are generated from one table. A row names a function, a factory for a *valid* call and the kind of each argument
that gets attacked; every kind has a list of hostile variants (NaN, inf, wrong dtype, wrong rank, empty, out of range,
...). For each (row, argument, variant) the call must either

* raise ValueError / TypeError / FileNotFoundError / FloatingPointError whose message names the argument
  (`name`, or one of the row's aliases for it), or
* return a value that is in the row's `ok` table (a documented answer, with its reason) -- and never NaN.

Covering a new function means adding one row (or, for a driver that trains models, a `DRIVERS` entry whose bad
`profile` must be refused before anything runs). `test_every_public_function_is_covered` fails when a public function
of `scores`, `metrics`, `guided_sampling`, `counterfactuals`, `data`, `models` or `diffusion` is in no table.
Scenario tests below the table cover degenerate groups, stale or damaged stores and NaN inside sampling loops.
Everything is tiny (8x8 images, dummy epsilon-models): the module runs in well under 2 minutes on one thread.
"""
from __future__ import annotations
import inspect, json, math, shutil, warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable
import numpy as np, pandas as pd, pytest, torch
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from diffusers import DDPMScheduler
import diffexplain.scores as S, diffexplain.metrics as M, diffexplain.guided_sampling as G
import diffexplain.counterfactuals as C, diffexplain.data as D, diffexplain.models as MO, diffexplain.diffusion as DF
import diffexplain.ellipse_study as E
import diffexplain.square_study as SQ, diffexplain.face_study as FS, diffexplain.brain_study as BS

torch.set_num_threads(1)
CLEAR = (ValueError, TypeError, FileNotFoundError, FloatingPointError)

# --------------------------------------------------------------------------------------------- hostile variants
def _nan(a):
    a = np.array(a, dtype=np.float64, copy=True); a.reshape(-1)[0] = np.nan; return a
def _inf(a):
    a = np.array(a, dtype=np.float64, copy=True); a.reshape(-1)[-1] = np.inf; return a
def _t(f): return lambda a: torch.as_tensor(f(a.detach().cpu().numpy() if torch.is_tensor(a) else a), dtype=torch.float32)

VARIANTS = {   # kind -> {variant: valid value -> hostile value}
    "vec": {"nan": _nan, "inf": _inf, "str": lambda a: np.array(["a"] * len(a)), "2d": lambda a: np.stack([a, a], 1),
            "empty": lambda a: np.array([], dtype=np.float64), "ragged": lambda a: np.array([[1.0], 1.0] + [1.0] * (len(a) - 2), dtype=object),
            "none": lambda a: None},
    "groups": {"nan": lambda a: np.array([np.nan] + [1.0] * (len(a) - 1)), "2d": lambda a: np.stack([a, a], 1), "empty": lambda a: np.array([]),
               "none_in": lambda a: np.array([None] + list(a[1:]), dtype=object)},
    "feat": {"nan": _nan, "inf": _inf, "1d": lambda a: np.asarray(a)[:, 0], "empty": lambda a: np.zeros((0, np.shape(a)[1])),
             "str": lambda a: np.full(np.shape(a), "x")},
    "img": {"nan": _t(_nan), "inf": _t(_inf), "rank": lambda a: a[0], "empty": lambda a: a[:0], "str": lambda a: "images"},
    "int_pos": {"zero": lambda a: 0, "neg": lambda a: -1, "float": lambda a: 2.5, "str": lambda a: "abc"},
    "int_nonneg": {"neg": lambda a: -1, "float": lambda a: 2.5, "str": lambda a: "abc"},
    "frac": {"neg": lambda a: -0.1, "above": lambda a: 1.5, "nan": lambda a: float("nan"), "str": lambda a: "abc"},
    "pos": {"neg": lambda a: -1.0, "nan": lambda a: float("nan"), "inf": lambda a: float("inf"), "str": lambda a: "abc"},
    "nonneg": {"neg": lambda a: -1.0, "nan": lambda a: float("nan"), "inf": lambda a: float("inf"), "str": lambda a: "abc"},
    "seed": {"str": lambda a: "abc", "float": lambda a: 1.5},
    "choice": {"unknown": lambda a: "no-such-choice", "int": lambda a: 3},
    "path": {"missing": lambda a: "/nonexistent/diffexplain/file"},
    "dict": {"not_dict": lambda a: [1, 2], "empty": lambda a: {}},
    "number": {"nan": lambda a: float("nan"), "inf": lambda a: float("inf"), "str": lambda a: "abc"},
}

_BASE = {"vec": lambda: np.array([0.0, 1.0, 1.0, 0.0, 1.0]), "groups": lambda: np.array([0, 1, 1, 0, 1]),
         "feat": lambda: np.ones((5, 2)), "img": lambda: torch.zeros(2, 1, 8, 8)}   # for arguments the valid call leaves out
for _k, _b in _BASE.items():
    VARIANTS[_k] = {n: (lambda f, b: lambda a: f(b() if a is None else a))(f, _b) for n, f in VARIANTS[_k].items()}

# --------------------------------------------------------------------------------------------- tiny fixtures
def rng(): return np.random.default_rng(0)
def y01(n=40): return (rng().random(n) < 0.5).astype(np.float64)
def grp(n=40): return np.arange(n) % 4
def feats(n=30, d=3): return rng().normal(size=(n, d))
def imgs(n=2, c=1, s=8, lo=-1.0): return torch.rand(n, c, s, s, generator=torch.Generator().manual_seed(0)) * (1 - lo) + lo
def imgs01(n=2, c=3, s=8): return imgs(n, c, s, lo=0.0)
def sched(): return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02)
def geps(): return G.gaussian_eps(sched(), 0.2, 0.3)
def g_mean(x): return x.mean((1, 2, 3))
def sq_mask(n=2, s=8):
    m = torch.zeros(n, 1, s, s, dtype=torch.bool); m[..., 2:5, 2:5] = True; return m
def lin_f(x): return x.mean((1, 2, 3)) * 0.5 + 0.5                       # a differentiable "regressor" on [0, 1] images
def clf(x): return 20 * (x[:, :1].mean((1, 2, 3)) - 0.5)                  # binary logits


@dataclass
class Row:
    fn: Callable                                   # the public function
    valid: Callable[[], dict]                      # -> kwargs of a valid call
    specs: dict                                    # {argument: kind in VARIANTS}
    ok: dict = field(default_factory=dict)         # {(argument, variant): reason}: a returned value is the documented answer
    aliases: dict = field(default_factory=dict)    # {argument: [other words the message may use for it]}
    xfail: dict = field(default_factory=dict)      # {(argument, variant) or "*": reason}: known gaps, owned elsewhere
    check: Callable|None = None                    # extra property of a valid result

    @property
    def name(self): return f"{self.fn.__module__.split('.')[-1]}.{self.fn.__name__}"


SWEEP = lambda: dict(y=y01(), group=grp(), target=grp() / 4.0)
ROWS = [
    # ------------------------------------------------------------------ scores
    Row(S.quantile_bins, lambda: dict(v=rng().normal(size=50), n_bins=5), {"v": "vec", "n_bins": "int_pos"}, ok={("v", "none"): ""}),
    Row(S.group_stats, lambda: dict(y=y01(), v=grp()), {"y": "vec", "v": "groups", "bins": "int_pos"}),
    Row(S.global_score, lambda: dict(y=y01(), v=grp()), {"y": "vec", "v": "groups", "weights": "choice", "var_y": "pos", "bins": "int_pos"}),
    Row(S.local_scores, lambda: dict(y=y01(), v=grp()), {"y": "vec", "v": "groups", "weights": "choice", "var_y": "pos", "bins": "int_pos"}),
    Row(S.balanced_global_score, lambda: dict(y=y01(), v=grp(), cls=np.arange(40) % 2),
        {"y": "vec", "v": "groups", "cls": "groups", "weights": "choice", "var_y": "pos", "bins": "int_pos"}),
    Row(S.bootstrap_scores, lambda: dict(y=y01(), v=grp(), n_boot=20),
        {"y": "vec", "v": "groups", "n_boot": "int_pos", "weights": "choice", "var_y": "pos", "level": "frac", "seed": "seed", "bins": "int_pos"}),
    Row(S.bootstrap_balanced_score, lambda: dict(y=y01(), v=grp(), cls=np.arange(40) % 2, n_boot=20),
        {"y": "vec", "v": "groups", "cls": "groups", "n_boot": "int_pos", "weights": "choice", "var_y": "pos", "level": "frac",
         "seed": "seed", "bins": "int_pos"}),
    Row(S.null_floor, lambda: dict(n=np.array([10, 10, 10])), {"weights": "choice"}),
    Row(S.corrected_global_score, lambda: dict(y=y01(), v=grp()), {"y": "vec", "v": "groups", "weights": "choice", "var_y": "pos"}),
    Row(S.score_test, lambda: dict(y=y01(), v=grp(), n_perm=100, n_boot=100),
        {"y": "vec", "v": "groups", "n_perm": "int_pos", "n_boot": "int_pos", "level": "frac", "seed": "seed"}),
    Row(S.interval_coverage, lambda: dict(p=[0.2, 0.5, 0.8], n_per_group=4, n_draws=3, n_boot=100),
        {"p": "vec", "n_per_group": "int_pos", "n_draws": "int_pos", "n_boot": "int_pos", "level": "frac", "seed": "seed"}),
    Row(S.cace, lambda: dict(y=y01(), v=np.arange(40) % 2), {"y": "vec", "v": "groups"}),
    Row(S.linear_r2, lambda: dict(logits=rng().normal(size=40), v=rng().normal(size=40)), {"logits": "vec", "v": "vec"}),
    Row(S.plot_local_scores, lambda: dict(scores=S.local_scores(y01(), grp()), feature=rng().normal(size=40)),
        {"feature": "vec", "hist_bins": "int_pos"}, ok={("feature", "none"): "the histogram panel is optional"}),
    Row(S.plot_feature_logit, lambda: dict(v=rng().normal(size=40), logits=rng().normal(size=40)), {"v": "vec", "logits": "vec", "max_points": "int_pos"}),
    Row(S.scores_from_sweep, lambda: dict(sweep=SWEEP()), {"sweep": "dict", "weights": "choice", "var_y": "pos", "n_boot": "int_nonneg", "seed": "seed"}),
    Row(S.study_targets, lambda: dict(values=rng().normal(size=20), n_targets=5), {"values": "vec", "n_targets": "int_pos"},
        ok={("n_targets", "none"): "None: every value is a target"}),
    Row(S.constraint_errors, lambda: dict(v=rng().normal(size=5), target=np.zeros(5), accepted=np.ones(5, bool), sigma_v=1.0),
        {"v": "vec", "target": "vec", "accepted": "vec", "sigma_v": "pos"}),
    Row(S.sampler_feature, lambda: dict(model=g_mean), {}),   # `model` must be callable (chapter 04 tests it)
    Row(S.sampler_decision, lambda: dict(model=clf), {"output": "choice"}),
    Row(S.toy_decision, lambda: dict(tau=0.1), {"tau": "pos", "c": "number"}),
    Row(S.sample_rows, lambda: dict(result=dict(sweep=dict(SWEEP(), accepted=np.ones(40, bool), images=imgs(40).numpy())), n_rows=2, n_cols=3),
        {"n_rows": "int_pos", "n_cols": "int_pos"}),
    Row(S.plot_sample_rows, lambda: dict(images=np.zeros((2, 3, 8, 8)), targets=[0., 1.]), {"size": "pos"}),
    Row(S.accepted_images, lambda: dict(result=dict(sweep=dict(SWEEP(), accepted=np.ones(40, bool), images=imgs(40).numpy()))), {}),
    Row(S.plot_target_vs_result, lambda: dict(result=dict(sweep=dict(SWEEP(), v=grp() / 4.0, accepted=np.ones(40, bool)), sigma_v=1.0)), {}),
    # ------------------------------------------------------------------ metrics
    Row(M.coverage_table, lambda: dict(real=imgs01(n=20, c=1), generated={"a": imgs01(n=20, c=1)}, encoder=torch.nn.Flatten(), n=10),
        {"generated": "dict", "n": "int_pos", "seed": "seed"}),
    Row(M.knn_radii, lambda: dict(features=feats()), {"features": "feat", "k": "int_pos", "batch_size": "int_pos"}),
    Row(M.prdc_metrics, lambda: dict(real_features=feats(), fake_features=feats(20)),
        {"real_features": "feat", "fake_features": "feat", "k": "int_pos", "batch_size": "int_pos", "metrics": "choice"}),
    *[Row(f, lambda: dict(real_features=feats(), fake_features=feats(20)), {"real_features": "feat", "fake_features": "feat", "k": "int_pos"})
      for f in (M.coverage, M.precision, M.recall, M.density)],
    Row(M.to_rgb, lambda: dict(x=imgs01(c=1)), {"x": "img"}),
    Row(M.frechet_distance, lambda: dict(mu1=np.zeros(2), sigma1=np.eye(2), mu2=np.ones(2), sigma2=np.eye(2)),
        {"mu1": "vec", "mu2": "vec", "sigma1": "feat", "sigma2": "feat"}),
    Row(M.gaussian_stats, lambda: dict(features=feats()), {"features": "feat"}),
    Row(M.fid_from_features, lambda: dict(real_features=feats(), fake_features=feats(20)), {"real_features": "feat", "fake_features": "feat"}),
    Row(M.to_uint8, lambda: dict(x=imgs01()), {"x": "img"}, ok={("x", "rank"): "any shape of values in [0, 1] is documented"}),
    Row(M.fid_images, lambda: dict(real_images=imgs01(), fake_images=imgs01(), feature_extractor=lambda x: x.flatten(1)[:, :4]),
        {"real_images": "img", "fake_images": "img", "weights_path": "path", "batch_size": "int_pos"},
        ok={("weights_path", "missing"): "a feature_extractor is given, so the weights file is not used"}),
    Row(M.oracle_mae, lambda: dict(oracle_pred=rng().random(5), regressor_pred=rng().random(5), target=rng().random(5)),
        {"oracle_pred": "vec", "regressor_pred": "vec", "target": "vec"}, ok={("target", "none"): "target is optional"}),
    Row(M.face_similarity, lambda: dict(features_orig=feats(), features_cf=feats()), {"features_orig": "feat", "features_cf": "feat", "threshold": "number"}),
    Row(M.mnac, lambda: dict(probs_orig=rng().random((5, 3)), probs_cf=rng().random((5, 3))), {"probs_orig": "feat", "probs_cf": "feat", "threshold": "frac"}),
    Row(M.square_mae, lambda: dict(x_cf=imgs01(), mask=sq_mask(), target=rng().random(2)), {"x_cf": "img", "mask": "img", "target": "vec"}),
    Row(M.background_mae, lambda: dict(x=imgs01(), x_cf=imgs01(), mask=sq_mask()), {"x": "img", "x_cf": "img", "mask": "img"}),
    Row(M.background_l1, lambda: dict(x=imgs01(), x_cf=imgs01(), mask=sq_mask()), {"x": "img", "x_cf": "img", "mask": "img"}),
    Row(M.flip_rate, lambda: dict(pred_orig=rng().random(5), pred_cf=rng().random(5)), {"pred_orig": "vec", "pred_cf": "vec", "target": "vec"},
        ok={("target", "none"): "target is optional", ("pred_orig", "2d"): "(n, C) scores are documented (arg-max)",
            ("pred_cf", "2d"): "(n, C) scores are documented (arg-max)"}),
    Row(M.metrics_table, lambda: dict(results={"A": {"m": 1.0}}), {"results": "dict"}),
    Row(M.to_markdown, lambda: dict(df=M.metrics_table({"A": {"m": 1.0}})), {"digits": "int_nonneg"}),
    # ------------------------------------------------------------------ guided sampling
    Row(G.gaussian_eps, lambda: dict(scheduler=sched()), {"mean": "number", "std": "pos"}),
    Row(G.rho_schedule, lambda: dict(rho=0.1), {"rho": "nonneg"}),
    Row(G.x0_from_eps, lambda: dict(x_t=imgs(), eps=imgs(), alpha_bar_t=0.5), {"x_t": "img", "eps": "img", "alpha_bar_t": "frac"}),
    Row(G.dps_direction, lambda: dict(x_t=imgs(), t=500, eps_fn=geps(), g=g_mean, c0=0.3, alpha_bar_t=sched().alphas_cumprod[500]),
        {"x_t": "img", "c0": "number", "t": "int_nonneg", "norm": "choice"}),
    Row(G.downsample_mask, lambda: dict(mask=torch.ones(1, 1, 8, 8), size=(4, 4)), {"mask": "img", "mode": "choice"}),
    Row(G.respaced, lambda: dict(scheduler=sched(), num_steps=10), {"num_steps": "int_pos"}),
    Row(G.constrained_sample, lambda: dict(eps_fn=geps(), scheduler=sched(), shape=(2, 1, 8, 8), g=g_mean, c0=0.3, rho=0.1, num_steps=4,
                                          generator=torch.Generator().manual_seed(0)),
        {"c0": "number", "rho": "nonneg", "num_steps": "int_pos", "x_T": "img"}, ok={("x_T", "none"): "x_T is optional"}),
    Row(G.plain_samples, lambda: dict(eps=geps(), scheduler=sched(), n=2, sample_shape=(1, 8, 8), num_steps=2, progress=False),
        {"n": "int_pos", "batch_size": "int_pos", "seed": "seed"}),
    Row(G.reject, lambda: dict(v=rng().random(5), c0=0.5, sigma_v=0.2), {"v": "vec", "sigma_v": "pos", "tol": "pos", "c0": "number"},
        ok={("v", "2d"): "(n, k) vector features are documented"}),
    Row(G.acceptance_rates, lambda: dict(accepted=np.ones(4, bool), group=np.array([0, 0, 1, 1])), {"accepted": "vec", "group": "vec"}),
    Row(G.feature_stats, lambda: dict(v_data=rng().normal(size=20)), {"v_data": "vec", "targets": "vec"},
        ok={("targets", "none"): "optional", ("v_data", "2d"): "(N, k) vector features are documented"}),
    Row(G.sample_seeds, lambda: dict(seed=0, j=1, n=3), {"seed": "seed", "j": "int_nonneg", "n": "int_pos"}),
    Row(G.load_sweep, lambda: dict(out_dir="/nonexistent/sweep", targets=[0]), {"out_dir": "path", "targets": "int_pos"}),
    Row(G.parse_rho, lambda: dict(label="0.4"), {"label": "choice"}),
    Row(G.ddim_invert, lambda: dict(eps_fn=geps(), scheduler=sched(), x0=imgs(), num_steps=4), {"x0": "img", "num_steps": "int_pos"}),
    Row(G.guided_edit, lambda: dict(eps_fn=geps(), scheduler=sched(), x0=imgs(), g=g_mean, c0=0.3, num_steps=4),
        {"x0": "img", "c0": "number", "rho": "nonneg", "num_steps": "int_pos"}),
    # ------------------------------------------------------------------ counterfactuals
    Row(C.to_f_range, lambda: dict(x=imgs()), {"x": "img", "f_range": "vec"}),
    Row(C.check_differentiable, lambda: dict(f=lin_f, x=imgs01()), {"x": "img", "kind": "choice"}),
    Row(C.check_reference, lambda: dict(r=rng().random(3), n=3), {"r": "vec", "n": "int_pos"}),
    Row(C.respaced_scheduler, lambda: dict(scheduler=sched(), num_steps=10), {"num_steps": "int_pos"}),
    Row(C.change_mask, lambda: dict(x=imgs(), x_pre=imgs()), {"x": "img", "x_pre": "img", "dilation": "int_nonneg", "threshold": "nonneg"}),
    Row(C.sample_streams, lambda: dict(generator=torch.Generator().manual_seed(0), n=3), {"n": "int_pos"}),
    Row(C.acre, lambda: dict(x=imgs(c=3), f=lin_f, eps=geps(), scheduler=sched(), r=torch.tensor([0.2, 0.8]), max_iter=2, respacing=10, steps=2),
        {"x": "img", "r": "vec", "respacing": "int_pos", "steps": "int_pos", "step_size": "pos", "max_iter": "int_pos",
         "threshold": "nonneg", "dilation": "int_nonneg", "mask_threshold": "frac", "linf": "pos"},
        ok={("linf", "none"): "optional", ("max_iter", "zero"): "max_iter=0 is the documented guidance-off control (x_adv = x)"}),
    Row(C.diffusion_ce, lambda: dict(x=imgs(c=1), eps=geps(), scheduler=sched(), classifier=clf, num_steps=20, progress=False,
                                     generator=torch.Generator().manual_seed(0)),
        {"x": "img", "target": "vec", "classifier_weight": "number", "dist_weight": "number", "start": "frac", "num_steps": "int_pos"},
        ok={("target", "none"): "default: the other class"}),
    Row(C.flip_rate, lambda: dict(res={"flipped": torch.tensor([True, False])}), {"res": "dict"}),
    Row(C.run_batched, lambda: dict(fn=lambda x, generator=None, progress=False: dict(y=x * 2), inputs=dict(x=torch.arange(4.)), progress=False),
        {"inputs": "dict", "batch_size": "int_pos", "seed": "seed", "on_mismatch": "choice"}),
    Row(C.ce_summary, lambda: dict(res=dict(target=[1, 0], logits_orig=[-1.0, 1.0], logits_cf=[1.0, -1.0], flipped=[True, True])), {"res": "dict"}),
    Row(M.mean_ci, lambda: dict(v=rng().random(10), n_boot=20), {"v": "vec", "n_boot": "int_pos", "level": "frac", "seed": "seed"}),
    # ------------------------------------------------------------------ data
    Row(D.seed_everything, lambda: dict(seed=0), {"seed": "seed"}),
    Row(D.get_device, lambda: dict(device="cpu"), {"device": "choice"}),
    Row(D.config_hash, lambda: dict(config={"a": 1}), {"config": "dict"}, ok={("config", "not_dict"): "any JSON value hashes", ("config", "empty"): "{} is a config"}),
    Row(D.load_arrays, lambda: dict(path="x.npz"), {"path": "path"}),
    Row(D.check_int, lambda: dict(v=3, name="v", lo=1), {"v": "int_pos"}),
    Row(D.check_number, lambda: dict(v=0.5, name="v", lo=0, hi=1), {"v": "frac"}),
    Row(D.check_seed, lambda: dict(seed=3), {"seed": "seed"}),
    Row(D.check_choice, lambda: dict(v="a", name="v", choices=("a", "b")), {"v": "choice"}),
    Row(D.open_store, lambda: dict(folder="/tmp/diffexplain-hostile-store", fingerprints={"a": "1"}), {"fingerprints": "dict", "on_mismatch": "choice"}),
    Row(D.check_tensor, lambda: dict(x=imgs(), name="x", ndim=4, value_range=(-1, 1)), {"x": "img"}),
    Row(D.render_ellipses, lambda: dict(row=[10.], col=[10.], a=[5.], b=[3.], theta=[0.]), {"row": "vec", "a": "vec", "img_size": "int_pos", "downsample_factor": "int_pos"}),
    Row(D.sample_ellipse_params, lambda: dict(n=4), {"n": "int_pos", "img_size": "int_pos", "seed": "seed", "margin": "nonneg"}),
    Row(D.split_indices, lambda: dict(n=20), {"n": "int_pos", "val_frac": "frac", "test_frac": "frac", "seed": "seed"}),
    Row(D.moment_area, lambda: dict(images=imgs01(c=1)), {"images": "img"}, ok={("images", "rank"): "(n, H, W) is a documented input"}),
    Row(D.phantom_ad_probability, lambda: dict(scale=np.array([0.8, 0.9])), {"scale": "vec", "width": "pos"},
        ok={("scale", "2d"): "any array shape of scales is a documented input"}),
    Row(D.moment_log_ar, lambda: dict(images=imgs01(c=1)), {"images": "img", "eps": "nonneg"}, ok={("images", "rank"): "(n, H, W) is a documented input"}),
    Row(D.reference_value, lambda: dict(target=0.3), {"target": "frac"}),
    Row(D.read_attr_file, lambda: dict(path="x"), {"path": "path"}),
    Row(D.load_face_image, lambda: dict(path="x", size=8), {"path": "path"}),
    Row(D.read_subject_table, lambda: dict(table="x"), {"table": "path"}),
    Row(D.subject_split, lambda: dict(subject=np.repeat(list("abcdefgh"), 2), label=np.repeat([0, 1] * 4, 2)),
        {"subject": "groups", "label": "vec", "test_frac": "frac", "val_frac": "frac", "seed": "seed"}),
    Row(D.class_weights, lambda: dict(label=np.array([0, 1, 1, 0])), {"label": "vec"}),
    Row(D.extract_hippocampus_rois, lambda: dict(t1=rng().random((20, 20, 20)), aseg=_aseg(), size=8, dilate=1),
        {"t1": "feat", "aseg": "feat", "size": "int_pos", "dilate": "int_nonneg"}),
    # ------------------------------------------------------------------ models
    Row(MO.accuracy, lambda: dict(y_true=np.array([0, 1, 1]), y_pred=np.array([0, 1, 0])), {"y_true": "vec", "y_pred": "vec"}),
    Row(MO.balanced_accuracy, lambda: dict(y_true=np.array([0, 1, 1]), y_pred=np.array([0, 1, 0])), {"y_true": "vec", "y_pred": "vec"}),
    Row(MO.r2_score, lambda: dict(v_true=rng().random(5), v_pred=rng().random(5)), {"v_true": "vec", "v_pred": "vec"}),
    Row(MO.predict, lambda: dict(model=MO.EllipseCNN(), data=imgs01(c=1, s=32)), {"data": "img", "batch_size": "int_pos"},
        aliases={"data": ["`x`"]}),                              # the model's own check names its input `x`
    Row(MO.evaluate, lambda: dict(model=MO.EllipseCNN(), data=(imgs01(c=1, s=32), torch.tensor([0., 1.]))), {"task": "choice", "batch_size": "int_pos"}),
    Row(MO.train_model, lambda: dict(model=MO.EllipseCNN(), train_data=(imgs01(4, 1, 32), torch.tensor([0., 1, 0, 1])),
                                     val_data=(imgs01(2, 1, 32), torch.tensor([0., 1.])), max_epochs=1, batch_size=2, progress=False),
        {"task": "choice", "lr": "pos", "batch_size": "int_pos", "max_epochs": "int_pos", "patience": "int_pos", "l2": "nonneg", "seed": "seed"}),
    Row(MO.load_checkpoint, lambda: dict(model=MO.EllipseCNN(), path="/nonexistent/ckpt"), {"path": "path"}),
    Row(MO.EllipseCNN, lambda: dict(), {"n_out": "int_pos", "in_channels": "int_pos", "img_size": "int_pos"}),
    Row(MO.Rescaled, lambda: dict(net=torch.nn.Linear(1, 1)), {"mean": "number", "std": "pos"}),
    # ------------------------------------------------------------------ diffusion (chapter 02, another owner)
    Row(DF.make_scheduler, lambda: dict(num_train_timesteps=10), {"num_train_timesteps": "int_pos", "beta_start": "pos", "beta_end": "pos"}),
    Row(DF.linear_schedule, lambda: dict(), {"name": "choice", "chain": "int_pos"}),
    Row(DF.make_unet2d, lambda: dict(profile="tiny", sample_size=8) if "tiny" in getattr(DF, "UNET_PROFILES", {}) else dict(),
        {"profile": "choice", "in_channels": "int_pos", "sample_size": "int_pos"}),
    Row(DF.to_model_range, lambda: dict(x01=imgs01()), {"x01": "img"}),
    Row(DF.from_model_range, lambda: dict(x=imgs()), {"x": "img"}),
    Row(DF.sample, lambda: dict(eps=geps(), scheduler=sched(), shape=(2, 1, 8, 8), num_inference_steps=4, progress=False),
        {"num_inference_steps": "int_pos", "x_T": "img"}, ok={("x_T", "none"): "optional"}),
    Row(DF.data_fingerprint, lambda: dict(images=imgs01()), {"images": "img"}),
    Row(E.ellipse_check, lambda: dict(images01=imgs01(c=1)), {"images01": "img", "threshold": "frac", "min_area": "int_nonneg"}),
    Row(E.ellipse_quality, lambda: dict(samples01=D.make_ellipses(8, cache_dir=False)["images"], real01=D.make_ellipses(8, seed=1, cache_dir=False)["images"]),
        {"samples01": "img", "real01": "img", "floor": "nonneg"}),
    Row(DF.ddim_timesteps, lambda: dict(num_train_timesteps=100, num_steps=10), {"num_train_timesteps": "int_pos", "num_steps": "int_pos"}),
    Row(DF.ddim_encode, lambda: dict(eps=lambda x, t: geps()(x, t), x0=imgs(), scheduler=sched(), num_steps=4), {"x0": "img", "num_steps": "int_pos"}),
    Row(DF.ddim_decode, lambda: dict(eps=lambda x, t: geps()(x, t), x_T=imgs(), scheduler=sched(), num_steps=4), {"x_T": "img", "num_steps": "int_pos"}),
    Row(DF.monai_scheduler, lambda: dict(num_train_timesteps=10), {"num_train_timesteps": "int_pos", "beta_start": "pos", "beta_end": "pos"}),
]


def _aseg():
    a = np.zeros((20, 20, 20), np.int32); a[3:6, 8:12, 8:12] = 17; a[14:17, 8:12, 8:12] = 53; return a


# drivers that train models or read real data: a bad profile / choice must be refused before anything runs
DRIVERS = {
    E.ellipse_models: dict(profile="nope"), FS.celeba_classifier: dict(profile="nope"), BS.brain_table: dict(profile="nope"),
    BS.brain_models: dict(profile="nope"), E.ellipse_ddpm: dict(profile="nope"), SQ.square_diffae: dict(profile="nope"),
    E.ellipse_ce: dict(profile="nope"), FS.celeba_ce: dict(profile="nope"), SQ.square_setup: dict(profile="nope"),
    E.ellipse_sampling_study: dict(profile="nope"),
    S.gaussian_toy_study: dict(out_dir="/tmp/diffexplain-hostile-toy", decision="nope"),
    S.attribution_study: dict(eps=geps(), scheduler=sched(), g=g_mean, decide=g_mean, targets=np.zeros((2, 2)), v_data=np.zeros(5),
                              n_per_target=1, sample_shape=(1, 8, 8), out_dir="/tmp/diffexplain-hostile-attribution"),
    D.make_ellipses: dict(n=1, cache_dir=False), D.make_squares: dict(n=-1),
    D.square_eval_grid: dict(seed="abc"), SQ.square_eval_set: dict(size=-1), D.make_brain_phantoms: dict(out_dir="/tmp/x", n_subjects=1),
    D.load_brain_rois: dict(table="/nonexistent/subjects.csv"), D.write_tiny_celeba: dict(root="/tmp/diffexplain-hostile-celeba", n=0),
    D.CelebA: dict(root="/nonexistent/celeba"), D.CelebAHQ: dict(root="/nonexistent/celebahq"), D.AgeTable: dict(csv="/nonexistent/ages.csv"),
    M.load_vgg16: dict(weights_path="/nonexistent/vgg16.pth"), M.vgg16_embedding: dict(weights_path="/nonexistent/vgg16.pth"),
    M.load_vggface2_resnet50: dict(weights_path="/nonexistent/face.pth"), MO.densenet121_regressor: dict(weights_path="/nonexistent/d.pth"),
    MO.age_oracle: dict(weights_path="/nonexistent/d.pth"), DF.load_or_train_ddpm: dict(images=torch.zeros(0, 1, 8, 8)),
    DF.train_diffusion: dict(model=torch.nn.Identity(), images=torch.zeros(0, 1, 8, 8)), G.constrained_sweep: dict(
        eps_fn=lambda x, t: x, scheduler=sched(), g=g_mean, targets=[0.1], n=1, sample_shape=(1, 8, 8), out_dir="/tmp/diffexplain-hostile-sweep",
        v_data=np.ones(10)), G.accelerate_sweep: dict(cpu=True, eps_fn=lambda x, t: x, scheduler=sched(), g=g_mean, targets=[0.1], n=0,
        sample_shape=(1, 8, 8), out_dir="/tmp/diffexplain-hostile-sweep2", v_data=rng().random(10)),
    G.sampling_study: dict(eps_fn=lambda x, t: x, scheduler=sched(), g=g_mean, c0=[np.nan], n=1, sample_shape=(1, 8, 8), sigma_v=0.1),
    SQ.square_counterfactual_eval: dict(setup={}, n_eval=1), C.reference_sweep: dict(x=torch.zeros(2, 3, 8, 8), method=C.acre, refs=[0.5]),
    SQ.downsample_squares: dict(data={}, size=0), E.ellipse_ce_metrics: dict(x01=torch.zeros(2, 1, 8, 8), x_cf01=torch.zeros(3, 1, 8, 8), res={}),
    C.tint_sensitivity: dict(f=lin_f, x01=torch.full((2, 3, 8, 8), float("nan")), mask=sq_mask()),
    C.diffae_re: dict(x=torch.full((2, 3, 8, 8), 2.0), f=lin_f, ae=None, r=[0.5, 0.5]),
    C.repaint_refine: dict(x=torch.zeros(2, 1, 8, 8), x_pre=torch.zeros(2, 1, 8, 8), mask=torch.ones(3, 1, 8, 8), eps=geps(), sched=sched(), steps=[1]),
    C.diffusion_filter: dict(x=torch.zeros(2, 1, 8, 8), eps=geps(), sched=sched(), steps=[], noise=[]),
    DF.train_autoencoder3d: dict(ae=torch.nn.Identity(), volumes=torch.zeros(0, 1, 8, 8, 8), steps=1),
    DF.latent_scale_factor: dict(ae=torch.nn.Identity(), volumes=torch.zeros(0, 1, 8, 8, 8)),
    DF.vae_loss: dict(ae=torch.nn.Identity(), x=torch.zeros(2, 1, 8, 8)), DF.make_unet3d: dict(profile="nope"),
    DF.sample_latent: dict(ae=torch.nn.Identity(), unet=torch.nn.Identity(), scale_factor=float("nan"), latent_shape=(1, 1, 4, 4, 4)),
    DF.decode_latent: dict(ae=torch.nn.Identity(), z_scaled=torch.zeros(1, 1, 4, 4, 4), scale_factor=0.0),
    DF.DiffAE: dict(profile="nope"), DF.SemanticEncoder: dict(in_channels=0), DF.make_autoencoder3d: dict(channels=()),
    DF.LatentTransform: dict(ae=torch.nn.Identity(), scale_factor=float("nan")), DF.save_grid: dict(images01=torch.zeros(0, 1, 8, 8), path="/tmp/x.png"),
    C.plot_ce_pairs: dict(x01=torch.zeros(2, 1, 8, 8), x_cf01=torch.zeros(3, 1, 8, 8), p_orig=[0.1, 0.2], p_cf=[0.9, 0.8]),
    C.plot_reference_sweep: dict(sweep={}), G.plot_sampling_study: dict(study=pd.DataFrame()), G.best_rho: dict(study=pd.DataFrame()),
    G.few_step_matches: dict(study=pd.DataFrame(dict(steps=[1]))), G.validated_setting: dict(study=pd.DataFrame(dict(steps=[1]))),
    G.validated_sampler: dict(study=pd.DataFrame(dict(steps=[1])), drift=float("nan")), G.converged_reference: dict(study=pd.DataFrame(), drift=-1.0),
    G.convergence_chain: dict(drift=float("nan")), G.check_mask: dict(mask=torch.ones(2, 1, 8, 8), known=None, shape=(2, 1, 8, 8)),
    G.ddim_scheduler: dict(scheduler="ddpm"), G.target_file: dict(out_dir="/tmp", j=-1), C.last_timesteps: dict(sched=sched(), k=0),
    C.posterior_variance: dict(sched=sched(), t=5000), C.ddpm_step: dict(sched=sched(), eps_t=torch.zeros(2, 1, 8, 8), t=5000,
                                                                        x_t=torch.zeros(2, 1, 8, 8), z=torch.zeros(2, 1, 8, 8)),
    MO.save_checkpoint: dict(model=torch.nn.Linear(1, 1), path="/tmp/diffexplain-hostile-ckpt", config="not a dict"),
    MO.load_or_train: dict(name="", config={}, build_fn=None, train_fn=None), MO.to_3d: dict(model="resnet"),
    MO.cnn_block: dict(c_in=0, c_out=1), MO.resnet10t: dict(in_chans=0), MO.resnet10t_3d: dict(in_chans=0), MO.square_resnet18: dict(num_outputs=0),
    M.embed: dict(images=torch.zeros(0, 1, 8, 8), encoder=lambda x: x), M.VGG16Features: dict(vgg=torch.nn.Identity(), layer="nope"),
    M.FaceEmbedding: dict(net=torch.nn.Identity(), size=0), M.vggface2_resnet50: dict(num_classes=0),
    M.save_metrics_table: dict(df="not a table", path="/tmp/x"), D.tensor_dataset: dict(data={}, keys=("images",)),
    D.render_squares: dict(a=np.array([300.]), background=np.array([30.]), row=np.array([5]), col=np.array([40]), noise=np.zeros((1, 3, 64, 64))),
    D.BrainROIDataset: dict(data={"image": np.zeros((2, 1, 4, 4, 4))}, target="nope"), D.cache_path: dict(name="", config={}), D.use_shipped: dict(shipped="yes"), D.from_shipped: dict(entry="/nonexistent/e", sub="../outside"),
    D.code_version: dict(), D.atomic_write: dict(path="/tmp/diffexplain-hostile-aw", write_fn=None), D.save_arrays: dict(path=None),
    D.load_entry: dict(path="/nonexistent/x.npz", key=3), D.save_entry: dict(path=None, key="k"), D.clean_stale_tmp: dict(folder="/tmp", min_age_s=-1.0),
    D.fingerprint: dict(), DF.n_params: dict(model="unet"), DF.model_config: dict(model="unet"), DF.eps_fn: dict(unet="unet"),
    DF.make_perceptual_loss: dict(hub_dir="/nonexistent/hub"), C.check_reference: dict(r=[np.nan], n=1),
}
# drivers whose "refusal" is a documented non-error (None result, or nothing to refuse for this input)
DRIVER_OK = {D.load_entry: "a missing entry is None: it must be computed", D.fingerprint: "needs an object; TypeError from Python's call",
             D.code_version: "raises ValueError", DF.make_perceptual_loss: "needs local weights"}
EXEMPT = {   # public names that are not functions to attack, with the reason
    "CorruptFileError": "an exception class", "Store": "made by open_store (covered)", "BootstrapScores": "a result dataclass", "BalancedBootstrapScores": "a result dataclass",
    "ScoreTest": "a result dataclass", "DiffAECodec": "a thin wrapper over DiffAE methods", "default_cache_dir": "takes no input", "shipped_dir": "takes no input",
    "l2_penalty": "any nn.Module is valid input",
}


KNOWN_GAPS = {   # (row, argument, variant): reason -- xfail(strict=True): fixing one makes its case XPASS and fail, so remove it here
}
DRIVER_GAPS = {   # driver: reason (xfail strict)
    'diffusion.SemanticEncoder': '`SemanticEncoder(in_channels=0)` is not refused up front; its source is hashed into the cache key of the '
                                  'trained Diff-AE models (`square_diffae`), so validating it would orphan them: left for a retraining',
}


# --------------------------------------------------------------------------------------------- the generated cases
def _cases():
    for row in ROWS:
        for arg, kind in row.specs.items():
            for var in VARIANTS[kind]:
                marks = []
                why = row.xfail.get((arg, var)) or row.xfail.get("*") or KNOWN_GAPS.get((row.name, arg, var))
                if why: marks = [pytest.mark.xfail(strict=True, reason=f"{row.name}: {why}")]
                yield pytest.param(row, arg, var, id=f"{row.name}-{arg}-{var}", marks=marks)


def _has_nan(o, depth=0) -> bool:
    if depth > 3: return False
    if torch.is_tensor(o): return o.is_floating_point() and bool(torch.isnan(o).any())
    if isinstance(o, np.ndarray): return o.dtype.kind == "f" and bool(np.isnan(o).any())
    if isinstance(o, float): return math.isnan(o)
    if isinstance(o, pd.DataFrame): return any(_has_nan(o[c].to_numpy(), depth + 1) for c in o.columns if o[c].dtype.kind == "f")
    if isinstance(o, dict): return any(_has_nan(v, depth + 1) for v in o.values())
    if isinstance(o, (list, tuple)): return any(_has_nan(v, depth + 1) for v in o)
    return False


def _call(fn, kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = fn(**kw)
    plt.close("all")
    return out


def _names_arg(msg: str, arg: str, aliases) -> bool:
    return any(a in msg for a in [arg, *aliases])


@pytest.fixture(autouse=True, scope="module")
def _in_tmp(tmp_path_factory):
    "Every case runs in one scratch folder (files some calls write land there)."
    old = Path.cwd(); d = tmp_path_factory.mktemp("hostile"); import os; os.chdir(d)
    yield d
    os.chdir(old)


@pytest.mark.parametrize("row", [pytest.param(r, id=r.name) for r in ROWS])
def test_valid_call(row):
    "The table's valid call works (so the hostile cases test the argument, not a broken fixture)."
    if row.fn in (G.load_sweep, D.load_arrays, D.read_attr_file, D.load_face_image, D.read_subject_table, MO.load_checkpoint):
        pytest.skip("its valid call needs a file; the hostile case is a missing one")
    out = _call(row.fn, row.valid())
    if row.check is not None: assert row.check(out)


@pytest.mark.parametrize("row,arg,var", list(_cases()))
def test_hostile(row, arg, var):
    "A hostile value for one argument: a clear error that names it, or the documented answer -- never NaN or a foreign error."
    kw = row.valid()
    kw[arg] = VARIANTS[row.specs[arg]][var](kw.get(arg, inspect.signature(row.fn).parameters[arg].default
                                                  if arg in inspect.signature(row.fn).parameters else None))
    try: out = _call(row.fn, kw)
    except CLEAR as e:       # a missing file may be named by its path instead of the argument
        names = [*row.aliases.get(arg, ())] + ([str(kw[arg])] if isinstance(e, FileNotFoundError) else [])
        assert _names_arg(str(e), arg, names), f"{type(e).__name__} does not name `{arg}`: {e}"
        return
    except Exception as e:  # a foreign traceback: the user cannot tell what is wrong
        pytest.fail(f"foreign error {type(e).__name__}: {str(e)[:200]}")
    assert (arg, var) in row.ok, f"returned {type(out).__name__} without a word for {arg}={var}"
    assert not _has_nan(out), "silent NaN"


def _dname(f): return f"{f.__module__.split('.')[-1]}.{f.__name__}"

@pytest.mark.parametrize("fn", [pytest.param(f, id=_dname(f), marks=[pytest.mark.xfail(strict=True, reason=f"{_dname(f)}: {DRIVER_GAPS[_dname(f)]}")]
                                             if _dname(f) in DRIVER_GAPS else []) for f in DRIVERS])
def test_driver_refuses(fn):
    "Drivers and constructors refuse bad settings up front with a clear error."
    try: out = _call(fn, dict(DRIVERS[fn]))
    except CLEAR: return
    except Exception as e: pytest.fail(f"foreign error {type(e).__name__}: {str(e)[:200]}")
    assert fn in DRIVER_OK, f"accepted bad input and returned {type(out).__name__}"


def test_every_public_function_is_covered():
    covered = {r.fn for r in ROWS} | set(DRIVERS)
    missing = []
    for mod in (S, M, G, C, D, MO, DF, SQ):
        for n in mod.__all__:
            o = getattr(mod, n)
            if callable(o) and o not in covered and n not in EXEMPT: missing.append(f"{mod.__name__}.{n}")
    assert not missing, f"add a ROWS/DRIVERS entry (or an EXEMPT reason) for {missing}"


# --------------------------------------------------------------------------------------------- issue 19's examples
def test_balanced_score_with_constant_decisions_within_classes():
    cls = np.array([0, 0, 0, 0, 1, 1, 1, 1])                  # decisions constant within each class: a perfect classifier
    assert S.balanced_global_score(cls.astype(float), np.array([0, 1] * 4), cls) == 1.0


@pytest.mark.parametrize("y", [np.array([0, [1], 0, 1], dtype=object), np.array(["0", "1", "1", "0"])])
def test_scores_refuse_object_and_string_decisions(y):
    with pytest.raises(ValueError, match="`y` must"): S.global_score(y, [0, 0, 1, 1])


def test_bootstrap_seed_named():
    with pytest.raises(ValueError, match="`seed`"): S.bootstrap_scores(y01(), grp(), n_boot=5, seed="abc")


def _sweep(out_dir, eps=None, **kw):
    args = dict(n=2, sample_shape=(1, 8, 8), out_dir=out_dir, v_data=rng().normal(0.2, 0.04, 50), rho=0.1, num_steps=4,
                targets_per_batch=2, progress=False, classifier=lambda x: (x.mean((1, 2, 3)) > 0.2).float())
    return G.constrained_sweep(eps or geps(), sched(), g_mean, [0.15, 0.25], **{**args, **kw})


def test_sweep_store_refuses_or_recomputes_for_another_model(tmp_path):
    first = _sweep(tmp_path)
    other = G.gaussian_eps(sched(), 0.0, 0.5)
    with pytest.raises(ValueError, match=r"\['eps_fn'\] differ"): _sweep(tmp_path, other)
    with pytest.raises(ValueError, match=r"\['classifier'\] differ"): _sweep(tmp_path, classifier=None)
    with pytest.warns(UserWarning, match="recomputing"): new = _sweep(tmp_path, other, on_mismatch="recompute")
    assert not np.array_equal(new["v"], first["v"]) and np.isfinite(new["y"]).all()


def test_sweep_checks_before_sampling(tmp_path):
    calls = []
    def eps(x, t): calls.append(1); return geps()(x, t)
    with pytest.raises(ValueError, match="`v_data` is constant"): _sweep(tmp_path, eps, v_data=np.full(10, 0.2))
    assert not calls                                          # refused before a single network call


def test_sweep_recomputes_damaged_and_copied_files(tmp_path):
    first = _sweep(tmp_path)
    f0, f1 = G.target_file(tmp_path, 0), G.target_file(tmp_path, 1)
    shutil.copy(f0, f1)                                       # a valid file copied from another target
    with pytest.warns(UserWarning, match="target-00001.npz"): again = _sweep(tmp_path)
    f0.write_bytes(f0.read_bytes()[:50])                      # a truncated file
    with pytest.warns(UserWarning, match="target-00000.npz"): again = _sweep(tmp_path)
    for k in first: np.testing.assert_array_equal(again[k], first[k])
    assert not list(Path(tmp_path).glob(".*.tmp"))


def _double(x, generator=None, progress=False, scale=None):
    return dict(y=x * scale.weight.detach().reshape(()))


def test_run_batched_keys_on_inputs_models_and_files(tmp_path):
    lin = torch.nn.Linear(1, 1, bias=False); torch.nn.init.constant_(lin.weight, 2.0)
    x = torch.arange(6.)
    out = C.run_batched(_double, dict(x=x), batch_size=2, store_dir=tmp_path, progress=False, scale=lin)
    np.testing.assert_array_equal(out["y"], 2 * x.numpy())
    with pytest.raises(ValueError, match=r"\['inputs.x'\] differ"):                 # other inputs: never the old results
        C.run_batched(_double, dict(x=-x), batch_size=2, store_dir=tmp_path, progress=False, scale=lin)
    with torch.no_grad(): lin.weight.fill_(3.0)
    with pytest.raises(ValueError, match=r"\['kwargs.scale'\] differ"):             # a retrained model
        C.run_batched(_double, dict(x=x), batch_size=2, store_dir=tmp_path, progress=False, scale=lin)
    with torch.no_grad(): lin.weight.fill_(2.0)
    b1, b2 = tmp_path/"batch_00001.npz", tmp_path/"batch_00002.npz"
    b1.write_bytes(b1.read_bytes()[:60]); shutil.copy(tmp_path/"batch_00000.npz", b2)
    with pytest.warns(UserWarning) as w:
        again = C.run_batched(_double, dict(x=x), batch_size=2, store_dir=tmp_path, progress=False, scale=lin)
    assert {"batch_00001.npz", "batch_00002.npz"} <= {m.message.args[0].split()[1].rstrip(":").split("/")[-1] for m in w}
    np.testing.assert_array_equal(again["y"], out["y"])
    json.loads((tmp_path/"meta.json").read_text())          # complete (written atomically)


def test_stale_tmp_leftovers_are_cleaned(tmp_path):
    left = tmp_path/".a.npz.abc.tmp"; left.write_bytes(b"partial"); import os; os.utime(left, (0, 0))
    D.save_arrays(tmp_path/"b.npz", x=np.zeros(1))
    assert not left.exists()


@pytest.mark.parametrize("bad,match", [(dict(c0=float("nan")), "`c0` contains NaN"), (dict(rho=float("inf")), "`rho` must be"),
                                       (dict(eps_fn=lambda x, t: geps()(x, t) * float("nan")), "step 0 .*(ε-model output|`eps`) contains NaN"),
                                       (dict(g=lambda x: x.mean((1, 2, 3)) * float("nan")), "feature g\\(x̂0\\) contains NaN"),
                                       (dict(eps_fn=lambda x, t: geps()(x, t)[:1]), "step 0 .*(the batch's shape|the shape of `x_t`)")])
def test_sampling_loop_stops_at_the_first_bad_step(bad, match):
    kw = dict(eps_fn=geps(), scheduler=sched(), shape=(2, 1, 8, 8), g=g_mean, c0=0.3, rho=0.1, num_steps=4,
              generator=torch.Generator().manual_seed(0))
    with pytest.raises((ValueError, FloatingPointError), match=match): G.constrained_sample(**{**kw, **bad})


def test_bool_inpainting_mask():
    m = torch.zeros(1, 1, 8, 8, dtype=torch.bool); m[..., :3, :] = True
    known = torch.full((1, 1, 8, 8), -0.8)
    x = G.constrained_sample(geps(), sched(), (2, 1, 8, 8), known=known, mask=m, num_steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(x[:, :, :3], known.expand(2, 1, 8, 8)[:, :, :3])


def test_feature_stats_of_constant_data():
    with pytest.raises(ValueError, match="`v_data` is constant"): G.feature_stats(np.ones(8))


@pytest.mark.parametrize("target", [[5, 5], [-1, -1], 0.7])
def test_diffusion_ce_targets_of_a_binary_classifier(target):
    with pytest.raises(ValueError, match="`target` must"):
        C.diffusion_ce(imgs(), geps(), sched(), clf, target=target, num_steps=20, progress=False)


@pytest.mark.parametrize("kw,match", [(dict(linf=-0.1), "`linf`"), (dict(mask_threshold=2.0), "`mask_threshold`")])
def test_acre_out_of_range_parameters(kw, match):
    with pytest.raises(ValueError, match=match):
        C.acre(imgs(c=3), lin_f, geps(), sched(), torch.tensor([0.2, 0.8]), max_iter=2, respacing=10, steps=2, progress=False, **kw)


def test_acre_empty_batch():
    with pytest.raises(ValueError, match="empty batch"):
        C.acre(imgs(c=3)[:0], lin_f, geps(), sched(), torch.tensor([]), max_iter=2, respacing=10, steps=2, progress=False)


@pytest.mark.parametrize("y", [torch.tensor([-1., 0, -1, 0]), torch.tensor([0., 2, 0, 2])])
def test_binary_training_labels(y):
    with pytest.raises(ValueError, match="`train_data` labels must be 0/1"):
        MO.train_model(MO.EllipseCNN(), (imgs01(4, 1, 32), y), (imgs01(2, 1, 32), torch.tensor([0., 1])), max_epochs=1, progress=False)


def test_background_mae_mask_covering_the_image():
    with pytest.raises(ValueError, match="`mask` must leave at least one background pixel"):
        M.background_mae(imgs01(), imgs01(), torch.ones(2, 1, 8, 8, dtype=torch.bool))


def test_truncated_checkpoint_names_the_file(tmp_path):
    p = MO.save_checkpoint(torch.nn.Linear(2, 1), tmp_path/"ck", {"a": 1})
    w = p/"model.safetensors"; w.write_bytes(w.read_bytes()[:40])
    with pytest.raises(ValueError, match="model.safetensors is truncated"): MO.load_checkpoint(torch.nn.Linear(2, 1), p, {"a": 1})


def test_corrupt_cache_is_recomputed_with_a_warning(tmp_path):
    e = D.make_ellipses(16, cache_dir=tmp_path)
    f = next(Path(tmp_path).glob("*.npz")); f.write_bytes(b"PK\x03\x04garbage")
    with pytest.warns(UserWarning, match=f.name): e2 = D.make_ellipses(16, cache_dir=tmp_path)
    np.testing.assert_array_equal(e2["images"], e["images"])


def test_truncated_nifti_names_file_and_subject(tmp_path):
    tab = D.make_brain_phantoms(tmp_path, n_subjects=2, shape=(32, 40, 32))
    t1 = tmp_path/"sub-0001"/"aseg.nii.gz"; t1.write_bytes(t1.read_bytes()[:300])
    with pytest.raises(ValueError, match="aseg.nii.gz of subject sub-0001 is truncated"): D.load_brain_rois(tab, size=16, cache_dir=False)


def test_fingerprints_are_stable_across_processes():
    "A store made by one process must be accepted by the next: fingerprints cannot depend on addresses or set order."
    import subprocess, sys
    make = ("import torch; from diffusers import DDPMScheduler; torch.manual_seed(0); lin = torch.nn.Linear(2, 1); "
            "s = DDPMScheduler(num_train_timesteps=1000, beta_schedule='linear', beta_start=1e-4, beta_end=0.02); "
            "objs = (s, dict(m=lin, g=torch.Generator().manual_seed(1), f=lambda x: lin(x)))")
    code = "from diffexplain.data import fingerprint; " + make + "; print(*map(fingerprint, objs))"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    ns = {}; exec(make, ns)
    assert other == [D.fingerprint(o) for o in ns["objs"]]
