"""Tests for `diffexplain.scores`: closed-form checks, the bootstrap against brute force, bad input, plots."""
import numpy as np, pandas as pd, pytest, torch
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot as plt
from diffexplain.scores import (global_score, local_scores, balanced_global_score, bootstrap_scores, cace, linear_r2,
                                group_stats, quantile_bins, plot_local_scores, plot_feature_logit, scores_from_sweep,
                                BootstrapScores)


def mixture(n, pi, pg, seed=0):
    "Bernoulli mixture: V ~ Categorical(pi), Y | V=g ~ Bernoulli(pg[g])."
    rng = np.random.default_rng(seed)
    v = rng.choice(len(pi), size=n, p=pi)
    return (rng.random(n) < np.asarray(pg)[v]).astype(np.float64), v


def closed_form(pi, pg):
    pi, pg = np.asarray(pi), np.asarray(pg)
    pbar = (pi * pg).sum(); vy = pbar * (1 - pbar)
    return 1 - (pi * pg * (1 - pg)).sum() / vy, 1 - pg * (1 - pg) / vy


PI, PG = [.2, .3, .4, .1], [.05, .3, .7, .5]


def test_closed_form_bernoulli_mixture():
    y, v = mixture(1_000_000, PI, PG)
    g, l = closed_form(PI, PG)
    assert abs(global_score(y, v) - g) < 3e-3
    np.testing.assert_allclose(local_scores(y, v).score, l, atol=1e-2)


def test_law_of_total_variance_and_eq7():
    y, v = mixture(5000, PI, PG, seed=1)
    gs = group_stats(y, v); p = gs.n / gs.n.sum()
    assert abs((p * gs["var"]).sum() + (p * (gs["mean"] - y.mean()) ** 2).sum() - y.var()) < 1e-12
    ls = local_scores(y, v)
    assert abs((ls.weight * ls.score).sum() - global_score(y, v)) < 1e-12
    assert list(ls.v0) == sorted(ls.v0) and ls.score.max() <= 1


@pytest.mark.parametrize("weights", ["frequency", "equal", np.array([1., 2, 3, 4])])
def test_score_in_unit_interval(weights):
    for seed in range(5):
        y, v = mixture(300, PI, np.random.default_rng(seed).random(4), seed=seed)
        assert 0 <= global_score(y, v, weights=weights) <= 1


def test_extremes_and_negative_local():
    rng = np.random.default_rng(2)
    v = rng.integers(0, 5, 200_000)
    assert global_score(rng.integers(0, 2, v.size), v) < 1e-3
    assert global_score((v > 2).astype(float), v) == pytest.approx(1, abs=1e-9)
    vv = (rng.random(50_000) < .1).astype(int)
    y = np.where(vv == 1, rng.random(vv.size) < .5, rng.random(vv.size) < .02).astype(float)
    assert local_scores(y, vv).score.iloc[1] < 0


def test_matches_pandas_groupby_probabilities_and_strings():
    rng = np.random.default_rng(3)
    y = rng.random(10_000); v = rng.choice(["a", "b", "c"], 10_000)
    y = y + (v == "b") * .5
    g = pd.DataFrame(dict(y=y, v=v)).groupby("v").y.agg(["count", "mean", lambda s: s.var(ddof=0)])
    want = 1 - (g["count"] * g.iloc[:, 2]).sum() / len(y) / y.var()
    assert global_score(y, v) == pytest.approx(want, abs=1e-12)
    np.testing.assert_allclose(local_scores(y, v).score, 1 - g.iloc[:, 2] / y.var(), atol=1e-12)


def test_equal_weights_and_var_y():
    pg = np.array([.05, .5, .95]); v = np.repeat([0, 1, 2], [50, 400, 50])
    y = (np.random.default_rng(4).random(v.size) < pg[v]).astype(float)
    gs = group_stats(y, v); m = gs["mean"].mean()
    want = 1 - gs["var"].mean() / (gs["var"].mean() + ((gs["mean"] - m) ** 2).mean())
    assert global_score(y, v, weights="equal") == pytest.approx(want, abs=1e-12)
    assert global_score(y, v, var_y=.25) == pytest.approx(1 - (gs.n * gs["var"]).sum() / gs.n.sum() / .25, abs=1e-12)
    assert local_scores(y, v, var_y=.25).attrs["var_y"] == .25


def test_torch_and_numpy_agree():
    y, v = mixture(2000, PI, PG, seed=5)
    assert global_score(torch.tensor(y, dtype=torch.float32), torch.tensor(v)) == pytest.approx(global_score(y, v), abs=1e-6)


def test_quantile_bins():
    v = np.random.default_rng(6).standard_normal(10_000)
    codes, centres = quantile_bins(v, 10)
    np.testing.assert_array_equal(np.bincount(codes), np.full(10, 1000))
    assert np.all(np.diff(centres) > 0)
    codes, centres = quantile_bins(np.repeat([0., 1.], 500), 10)   # ties merge bins
    assert len(centres) == 2


def test_balanced_score_closed_form():
    rng = np.random.default_rng(7); n = 400_000
    c = (rng.random(n) < .1).astype(int); v = rng.integers(0, 2, n)
    p = np.array([[.1, .3], [.5, .95]]); y = (rng.random(n) < p[c, v]).astype(float)
    e = (.5 * p * (1 - p)).sum(1); m = p.mean(1)
    truth = 1 - e.mean() / ((m * (1 - m)).mean() + ((m - m.mean()) ** 2).mean())
    assert balanced_global_score(y, v, c) == pytest.approx(truth, abs=5e-3)
    pooled = 1 - e.mean() / y.var()
    assert balanced_global_score(y, v, c, var_y="pooled") == pytest.approx(pooled, abs=5e-3)


def test_bootstrap_matches_python_loop_and_brute_force():
    pi, pg = [.3, .3, .4], [.1, .5, .8]
    y, v = mixture(2000, pi, pg, seed=8)
    bs = bootstrap_scores(y, v, n_boot=3000, seed=0)
    assert isinstance(bs, BootstrapScores)
    rng = np.random.default_rng(1)
    loop = [global_score(y[i], v[i]) for i in (rng.integers(0, len(y), len(y)) for _ in range(1000))]
    assert bs.var_global / np.var(loop, ddof=1) == pytest.approx(1, abs=0.25)
    rng2 = np.random.default_rng(9)
    brute = [global_score(*mixture(2000, pi, pg, seed=s)) for s in rng2.integers(0, 2**31, 300)]
    assert bs.var_global / np.var(brute) == pytest.approx(1, abs=0.35)
    g, _ = closed_form(pi, pg)
    assert bs.ci_global[0] < g < bs.ci_global[1]
    assert bs.local_samples.shape == (3000, 3) and np.isfinite(bs.mean_var_local)
    # the same resamples for the same seed; a different path (continuous y) agrees statistically
    np.testing.assert_array_equal(bootstrap_scores(y, v, n_boot=50, seed=3).global_samples,
                                  bootstrap_scores(y, v, n_boot=50, seed=3).global_samples)
    yc = np.clip(y + np.random.default_rng(0).normal(0, .01, y.size), 0, 1)
    assert bootstrap_scores(yc, v, n_boot=3000, seed=0).var_global / bs.var_global == pytest.approx(1, abs=0.2)


def test_bootstrap_stratified_keeps_group_sizes():
    y, v = mixture(3000, PI, PG, seed=10)
    yc = y + np.random.default_rng(0).normal(0, .01, y.size)
    for yy in (y, yc):   # tabular and index paths
        bs = bootstrap_scores(yy, v, n_boot=500, stratified=True, weights="equal", seed=0)
        assert np.isfinite(bs.local_samples).all() and bs.var_global > 0   # no group ever empties
    # against a Python loop that resamples within each group
    rng = np.random.default_rng(1); groups = [np.flatnonzero(v == g) for g in range(4)]
    loop = [global_score(y[np.concatenate([rng.choice(ix, len(ix)) for ix in groups])],
                         v[np.concatenate(groups)], weights="equal") for _ in range(500)]
    bs = bootstrap_scores(y, v, n_boot=2000, stratified=True, weights="equal", seed=0)
    assert bs.var_global / np.var(loop, ddof=1) == pytest.approx(1, abs=0.3)


def test_baselines():
    rng = np.random.default_rng(11)
    v = rng.integers(0, 2, 20_000); y = (rng.random(v.size) < np.where(v == 1, .9, .3)).astype(float)
    assert cace(y, v) == pytest.approx(.6, abs=.03) and cace(y, v.astype(bool)) == cace(y, v)
    assert cace(1 - y, v) == pytest.approx(-cace(y, v))
    x = rng.normal(size=5000); lg = 2 * x + rng.normal(size=5000)
    assert linear_r2(lg, x) == pytest.approx(np.corrcoef(x, lg)[0, 1] ** 2, abs=1e-12)


def test_scores_from_sweep():
    rng = np.random.default_rng(12)
    targets = np.linspace(-1, 1, 5); grp = np.repeat(np.arange(5), 100)
    acc = rng.random(500) < .7
    sweep = dict(target=torch.tensor(targets[grp]), group=grp, y=(rng.random(500) < .5 + .4 * targets[grp]).astype(float),
                 accepted=acc, v=targets[grp])
    r = scores_from_sweep(sweep, n_boot=20)
    np.testing.assert_allclose(r["local"].v0, targets)
    assert r["n_accepted"] == acc.sum() and r["bootstrap"].local_samples.shape == (20, 5)
    assert r["global_score"] == pytest.approx(global_score(sweep["y"][acc], grp[acc], weights="equal"))
    with pytest.raises(ValueError, match="lacks the keys"): scores_from_sweep(dict(y=sweep["y"]))
    with pytest.raises(ValueError, match="no accepted"): scores_from_sweep({**sweep, "accepted": np.zeros(500, bool)})


def test_plots_return_figures():
    rng = np.random.default_rng(13)
    f = rng.normal(size=2000); d = (f + rng.normal(size=2000) > 0).astype(float)
    for s in (local_scores(d, f, bins=10), bootstrap_scores(d, f, n_boot=50, bins=10)):
        fig = plot_local_scores(s, feature=f, cls=d)
        assert isinstance(fig, plt.Figure) and len(fig.axes) == 2; plt.close(fig)
    fig = plot_local_scores(local_scores(d, f, bins=10)); assert len(fig.axes) == 1; plt.close(fig)
    fig = plot_feature_logit(f, 2 * f + rng.normal(size=2000)); assert isinstance(fig, plt.Figure); plt.close(fig)
    with pytest.raises(ValueError, match="scores"): plot_local_scores(np.zeros(3))


@pytest.mark.parametrize("call, msg", [
    (lambda y, v: global_score(y, v[:-1]), "same length"),
    (lambda y, v: global_score(np.where(y == 1, np.inf, y), v), "NaN or inf"),
    (lambda y, v: local_scores(y, np.where(v == 0, np.nan, v)), "`v` contains NaN"),
    (lambda y, v: global_score(np.zeros_like(y), v), "constant classifier has no variance"),
    (lambda y, v: bootstrap_scores(np.ones_like(y), v, n_boot=10), "no variance to explain"),
    (lambda y, v: global_score(y, np.zeros_like(v)), "single value"),
    (lambda y, v: bootstrap_scores(y, v, n_boot=0), "n_boot"),
    (lambda y, v: bootstrap_scores(y, v, n_boot=10, level=1.5), "level"),
    (lambda y, v: balanced_global_score(y, v, v % 2, classes=[0, 1, 5]), "empty class"),
    (lambda y, v: balanced_global_score(y, v, np.zeros_like(v)), "single class"),
    (lambda y, v: balanced_global_score(y, v, v[:-1]), "`cls`"),
    (lambda y, v: global_score(y, v, weights=np.ones(2)), "one entry per group"),
    (lambda y, v: global_score(y, v, weights="uniform"), "`weights`"),
    (lambda y, v: global_score(y, v, var_y=-1.), "`var_y`"),
    (lambda y, v: global_score(y, v, bins=1), "`n_bins`"),
    (lambda y, v: global_score(y[:, None], v), "1-D"),
    (lambda y, v: cace(y, v), "binary feature"),
    (lambda y, v: linear_r2(y, np.ones_like(y)), "`v` is constant"),
])
def test_bad_input(call, msg):
    y, v = mixture(200, PI, PG, seed=14)
    with pytest.raises(ValueError, match=msg): call(y, v)


# --- bias-aware scores (issue 15, item 3) ---
from diffexplain.scores import null_floor, corrected_global_score, score_test, interval_coverage, ScoreTest


def test_null_floor_analytic_and_brute_force():
    assert abs(null_floor(np.full(20, 16)) - 19 / 319) < 1e-12                 # quick study: (G - 1)/(n - 1)
    sizes = np.array([3, 10, 30]); v = np.repeat(np.arange(3), sizes); rng = np.random.default_rng(0)
    for w in ("frequency", "equal"):
        brute = np.mean([global_score(rng.normal(size=v.size), v, w) for _ in range(3000)])
        assert abs(brute - null_floor(sizes, w)) < 0.006, (w, brute, null_floor(sizes, w))


def test_corrected_score_unbiased_with_unequal_variances_and_frequency_weights():
    pi, pg = [.2, .3, .4, .1], [.05, .3, .7, .5]
    truth, _ = closed_form(pi, pg)
    v = np.repeat(np.arange(4), [8, 12, 16, 4])                                  # fixed group sizes ∝ pi
    rng = np.random.default_rng(1)
    draws = [(rng.random(v.size) < np.asarray(pg)[v]).astype(float) for _ in range(4000)]
    corr = np.mean([corrected_global_score(y, v) for y in draws])
    plug = np.mean([global_score(y, v) for y in draws])
    assert abs(corr - truth) < 0.01 < plug - truth, (truth, corr, plug)
    y = draws[0]                                                                  # var_y fixed: 1 - Û/var_y
    s2 = pd.Series(y).groupby(v).var(ddof=1).values
    assert abs(corrected_global_score(y, v, var_y=0.25) - (1 - (np.array([8, 12, 16, 4]) / 40 * s2).sum() / 0.25)) < 1e-12


def test_score_test_null_calibrated_and_power():
    rng = np.random.default_rng(2); v = np.repeat(np.arange(10), 12)
    ps = np.array([score_test(rng.integers(0, 2, v.size), v, n_perm=200, n_boot=100, seed=i).p_value for i in range(300)])
    assert abs((ps < 0.1).mean() - 0.1) < 0.05
    t = score_test((rng.random(v.size) < np.linspace(.05, .95, 10)[v]).astype(float), v, seed=0)
    assert isinstance(t, ScoreTest) and t.differs_from_no_effect and t.ci[0] > 0.2
    assert "differs from no effect" in t.verdict()


def test_interval_coverage_shows_percentile_failure_at_no_effect():
    cov = interval_coverage(np.full(20, .5), n_draws=80, n_boot=200, seed=3).set_index("interval")
    old, new = cov.iloc[0], cov.iloc[1]
    assert old.coverage < 0.1 and new.coverage > 0.85, cov


@pytest.mark.parametrize("call, msg", [
    (lambda: corrected_global_score([0., 1, 1, 0, 1], [0, 0, 1, 1, 2]), "at least 2 samples"),
    (lambda: null_floor([5]), "group sizes"),
    (lambda: score_test([0., 1, 1, 0], [0, 0, 1, 1], n_boot=5), "n_boot"),
    (lambda: score_test([0., 1, 1, 0], [0, 0, 1, 1], level=1.5), "level"),
    (lambda: interval_coverage([0., 0.]), "constant"),
])
def test_bias_aware_bad_input(call, msg):
    with pytest.raises(ValueError, match=msg): call()
