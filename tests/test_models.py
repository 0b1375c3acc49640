"""Tests of `diffexplain.models`: architectures, the training loop, metrics and checkpoints (tiny, CPU, < 2 min)."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn as nn
from diffexplain.models import (EllipseCNN, resnet10t, to_3d, resnet10t_3d, square_resnet18, densenet121_regressor,
                                age_oracle, Rescaled, accuracy, balanced_accuracy, r2_score, l2_penalty, predict,
                                evaluate, train_model, save_checkpoint, load_checkpoint, load_or_train)
from diffexplain.face_study import celeba_classifier, CELEBA_PROFILES
from diffexplain.brain_study import brain_models, brain_table, BRAIN_PROFILES
from diffexplain.data import read_attr_file, make_brain_phantoms
from diffexplain.ellipse_study import ellipse_models

torch.set_num_threads(1)  # tiny models: one thread is faster than two on a shared CPU


def n_params(m): return sum(p.numel() for p in m.parameters())
def same_weights(a, b): return all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def tiny_images(n=96, seed=0):
    "Binary label = brighter image; regression target = mean intensity (exactly learnable)."
    g = torch.Generator().manual_seed(seed)
    y = (torch.rand(n, generator=g) > 0.5).float()
    x = torch.rand(n, 1, 32, 32, generator=g) * 0.5 + 0.5 * y[:, None, None, None]
    return x, y


# ---------------------------------------------------------------- architectures
def test_ellipse_cnn_matches_tables_6_and_7():
    m = EllipseCNN()
    convs = [c for c in m.modules() if isinstance(c, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels, c.kernel_size, c.padding) for c in convs] == \
        [(1, 32, (3, 3), (1, 1)), (32, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1)), (64, 64, (3, 3), (1, 1))]
    lins = [l for l in m.modules() if isinstance(l, nn.Linear)]
    assert [(l.in_features, l.out_features) for l in lins] == [(256, 64), (64, 1)]
    assert n_params(m) == 109_185
    assert EllipseCNN(n_out=3)(torch.rand(2, 1, 32, 32)).shape == (2, 3)
    with pytest.raises(ValueError, match="`x` must have shape"): m(torch.rand(2, 1, 28, 28))
    with pytest.raises(ValueError, match="`img_size`"): EllipseCNN(img_size=30)


def test_resnet10t_3d_is_timm_resnet10t_in_3d():
    m2, m3 = resnet10t(in_chans=1), resnet10t_3d(in_chans=1)
    mods2 = [m for m in m2.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.MaxPool2d, nn.AvgPool2d))]
    mods3 = [m for m in m3.modules() if isinstance(m, (nn.Conv3d, nn.BatchNorm3d, nn.MaxPool3d, nn.AvgPool3d))]
    assert len(mods2) == len(mods3) > 20
    for a, b in zip(mods2, mods3):
        for attr in ("in_channels", "out_channels", "groups", "num_features", "eps", "momentum", "ceil_mode"):
            assert getattr(a, attr, None) == getattr(b, attr, None), (a, b, attr)
        for attr in ("kernel_size", "stride", "padding"):
            if hasattr(a, attr):
                va, vb = getattr(a, attr), getattr(b, attr)
                va = va if isinstance(va, tuple) else (va,) * 2
                vb = vb if isinstance(vb, tuple) else (vb,) * 3
                assert vb == (va[0],) * 3, (a, b, attr)
    assert not any("2d" in type(m).__name__.lower() for m in m3.modules())
    # same channels everywhere → parameter count grows only by the extra kernel dimension of the 3×3 convs
    assert n_params(m3) > n_params(m2)
    m3.train()
    out = m3(torch.rand(2, 1, 32, 32, 32))
    assert out.shape == (2, 1)
    out.sum().backward()
    assert m3.conv1[0].weight.grad is not None


def test_to_3d_refuses_unknown_2d_layers():
    with pytest.raises(NotImplementedError, match="no 3D counterpart"):
        to_3d(nn.Sequential(nn.Conv2d(1, 2, 3), nn.InstanceNorm2d(2)))
    with pytest.raises(NotImplementedError, match="square"):
        to_3d(nn.Conv2d(1, 2, (3, 5)))
    c = to_3d(nn.Conv2d(1, 2, 5, stride=2, padding=2, bias=False))
    assert isinstance(c, nn.Conv3d) and c.kernel_size == (5, 5, 5) and c.stride == (2, 2, 2) and c.bias is None


def test_celeba_and_square_models():
    assert resnet10t()(torch.rand(2, 3, 128, 128)).shape == (2, 1)
    m = square_resnet18()
    assert (m.conv1.kernel_size, m.conv1.stride, m.conv1.padding) == ((4, 4), (1, 1), (2, 2))
    assert m(torch.rand(2, 3, 64, 64)).shape == (2, 1)


def test_densenet_regressor_weights_freezing_and_missing_file(tmp_path):
    ref = __import__("torchvision").models.densenet121(weights=None, num_classes=40)
    torch.save(ref.state_dict(), tmp_path/"dn.pth")
    d = densenet121_regressor(tmp_path/"dn.pth")
    assert all(torch.equal(a, b) for a, b in zip(ref.features.state_dict().values(), d.features.state_dict().values()))
    assert all(not p.requires_grad for p in d.features.parameters())
    assert all(p.requires_grad for p in d.classifier.parameters()) and d.classifier.out_features == 1
    o = age_oracle(tmp_path/"dn.pth")
    assert all(p.requires_grad for p in o.parameters())
    with pytest.raises(FileNotFoundError, match="`weights_path`: no file"):
        densenet121_regressor(tmp_path/"missing.pth")


# ---------------------------------------------------------------- metrics and penalty
def test_metrics_against_hand_values():
    y = [1, 1, 1, 1, 1, 1, 1, 1, 0, 0]; p = [1] * 10
    assert accuracy(y, p) == pytest.approx(0.8) and balanced_accuracy(y, p) == pytest.approx(0.5)
    v = np.array([1., 2., 3., 4.]); vp = np.array([1.5, 2., 2.5, 4.])
    assert r2_score(v, vp) == pytest.approx(1 - 0.5 / 5.0)
    with pytest.raises(ValueError, match="`v_true` is constant"): r2_score([1., 1.], [1., 2.])
    with pytest.raises(ValueError, match="`y_pred` must have the shape"): accuracy([1, 0], [1])


def test_l2_penalty_counts_weights_not_biases():
    m = nn.Sequential(nn.Conv2d(1, 1, 2), nn.BatchNorm2d(1), nn.Linear(3, 1))
    for p in m.parameters(): nn.init.constant_(p, 1.)
    assert l2_penalty(m).item() == pytest.approx(4 + 3)   # 2×2 conv kernel + 3 linear weights


# ---------------------------------------------------------------- training loop
def test_regression_training_learns_and_rescaled_predicts_in_feature_units():
    x, _ = tiny_images(128)
    v = x.mean((1, 2, 3)) * 100 + 50          # "feature units"
    mean, std = float(v.mean()), float(v.std())
    m = Rescaled(EllipseCNN(), mean, std)
    torch.manual_seed(0)
    vt = (v - mean) / std
    net, hist = train_model(m.net, (x[:96], vt[:96]), (x[96:], vt[96:]), task="regression", lr=3e-3,
                            batch_size=16, max_epochs=8, patience=8, progress=False)
    assert hist[-1]["train_loss"] < 0.5 * hist[0]["train_loss"]
    res = evaluate(m, (x[96:], v[96:]), task="regression")
    assert res["r2"] > 0.5, res
    assert predict(m, x[96:]).shape == (32, 1)
    assert abs(float(predict(m, x[96:]).mean()) - float(v[96:].mean())) < 0.3 * std


def test_early_stopping_and_best_weights():
    x, y = tiny_images(64)
    # validating on flipped labels: the validation loss only gets worse, so patience 2 stops after epoch 3
    # and the weights of the first epoch are restored
    m, hist = train_model(EllipseCNN(), (x, y), (x, 1 - y), lr=3e-3, batch_size=16, max_epochs=50, patience=2,
                          progress=False)
    assert len(hist) == 3 and hist[0]["val_loss"] < hist[1]["val_loss"] < hist[2]["val_loss"]
    assert evaluate(m, (x, 1 - y))["loss"] == pytest.approx(hist[0]["val_loss"], abs=1e-5)
    _, hist = train_model(EllipseCNN(), (x, y), (x, y), lr=1e-3, max_epochs=50, patience=50, time_limit=0.,
                          progress=False)
    assert len(hist) == 1


def test_same_seed_same_model_and_l2_changes_it():
    x, y = tiny_images(64)
    def run(seed, l2=0.):
        torch.manual_seed(0)
        return train_model(EllipseCNN(), (x, y), (x, y), lr=1e-3, batch_size=16, max_epochs=1, seed=seed, l2=l2,
                           progress=False)[0]
    a, b, c, d = run(0), run(0), run(1), run(0, l2=10.)
    assert same_weights(a, b) and not same_weights(a, c)
    assert l2_penalty(d) < l2_penalty(a)


def test_weighted_sampler_draws_only_weighted_samples():
    seen = []
    class Spy(nn.Module):
        def __init__(self): super().__init__(); self.lin = nn.Linear(1, 1)
        def forward(self, x):
            if self.training: seen.append(x[:, 0].clone())
            return self.lin(x)
    x = torch.arange(20.)[:, None]; y = (x[:, 0] > 9).float()
    w = torch.zeros(20); w[:5] = 1.
    train_model(Spy(), (x, y), (x, y), max_epochs=2, batch_size=4, sample_weights=w, progress=False)
    drawn = torch.cat(seen)
    assert len(drawn) == 40 and drawn.max() < 5
    with pytest.raises(ValueError, match="`sample_weights` must have shape"):
        train_model(Spy(), (x, y), (x, y), sample_weights=torch.ones(3), progress=False)


def test_train_model_bad_input():
    x, y = tiny_images(16)
    m = EllipseCNN()
    with pytest.raises(ValueError, match="`task`"): train_model(m, (x, y), (x, y), task="multi")
    with pytest.raises(ValueError, match="`lr`"): train_model(m, (x, y), (x, y), lr=0)
    with pytest.raises(ValueError, match="`train_data`: x and y must have the same length"):
        train_model(m, (x, y[:3]), (x, y))
    with pytest.raises(ValueError, match="`val_data` must be"): train_model(m, (x, y), x)
    xn = x.clone(); xn[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"): train_model(m, (xn, y), (x, y))


# ---------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_and_config_mismatch(tmp_path):
    m = Rescaled(EllipseCNN(), 2., 3.)
    save_checkpoint(m, tmp_path/"ck", {"a": 1, "t": (1, 2)}, {"history": [1]})
    m2, meta = load_checkpoint(Rescaled(EllipseCNN()), tmp_path/"ck", {"a": 1, "t": [1, 2]})
    assert same_weights(m, m2) and float(m2.std) == 3. and meta == {"history": [1]}
    with pytest.raises(ValueError, match="different config"): load_checkpoint(EllipseCNN(), tmp_path/"ck", {"a": 2})
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"): load_checkpoint(m, tmp_path/"none")
    assert not list((tmp_path/"ck").glob("*.tmp"))


def test_load_or_train_reuses_and_refuses(tmp_path):
    calls = []
    def train_fn(m, cfg): calls.append(cfg); return m
    cfg = {"lr": 1e-3}
    a, ma = load_or_train("t", cfg, lambda c: EllipseCNN(), train_fn, tmp_path)
    b, mb = load_or_train("t", cfg, lambda c: EllipseCNN(), train_fn, tmp_path)
    assert len(calls) == 1 and not ma["loaded"] and mb["loaded"] and same_weights(a, b)
    c, _ = load_or_train("t", {"lr": 1e-4}, lambda c: EllipseCNN(), train_fn, tmp_path)
    assert len(calls) == 2 and not same_weights(a, c)
    (Path(ma["path"])/"config.json").write_text(json.dumps({"lr": 5}))
    with pytest.raises(ValueError, match="different config"):
        load_or_train("t", cfg, lambda c: EllipseCNN(), train_fn, tmp_path)


# ---------------------------------------------------------------- ellipse driver
def test_ellipse_models_smoke(tmp_path):
    res = ellipse_models("smoke", cache_dir=tmp_path, progress=False)
    assert set(res) == {"classifier", "log_ar", "area"}
    assert 0 <= res["classifier"]["metrics"]["accuracy"] <= 1
    cfg = res["area"]["config"]
    assert cfg["l2"] == 1.0 and cfg["l2_effective"] == pytest.approx(1 / cfg["std"] ** 2)
    assert isinstance(res["area"]["model"], Rescaled) and float(res["area"]["model"].std) == pytest.approx(cfg["std"])
    again = ellipse_models("smoke", cache_dir=tmp_path, which=("classifier",), progress=False)
    assert again["classifier"]["loaded"] and same_weights(again["classifier"]["model"], res["classifier"]["model"])
    with pytest.raises(ValueError, match="`which`"): ellipse_models("smoke", cache_dir=tmp_path, which=("volume",))


def test_ellipse_models_initial_weights_come_from_the_seed(tmp_path):
    "The same seed gives the same model whatever ran before in the process (the build is seeded)."
    a = ellipse_models("smoke", cache_dir=tmp_path/"a", which=("classifier",), progress=False)["classifier"]
    torch.manual_seed(123); torch.rand(7)                       # disturb the global RNG
    b = ellipse_models("smoke", cache_dir=tmp_path/"b", which=("classifier",), progress=False)["classifier"]
    assert not b["loaded"] and same_weights(a["model"], b["model"])
    assert len(a["history"]) == a["epochs"] and "val_loss" in a["history"][0]


# ---------------------------------------------------------------- CelebA driver
@pytest.fixture(scope="module")
def celeba_smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("celeba")
    return d, celeba_classifier("smoke", data_dir=d/"data", cache_dir=d/"cache", progress=False)


def test_celeba_classifier_smoke_learns_the_stand_in_cue(celeba_smoke):
    d, r = celeba_smoke
    assert r["synthetic"] and "not CelebA" in r["data"] and r["n"] == dict(train=400, val=50, test=50)
    assert Path(r["root"]).parent == d/"data"
    assert r["logits"].shape == (50,) and r["decisions"].dtype == np.int64
    np.testing.assert_array_equal(r["decisions"], (r["logits"] > 0).astype(np.int64))
    # the attributes are the test images' rows of the attribute file, in the file's column order
    files, names, vals = read_attr_file(Path(r["root"])/"list_attr_celeba.txt")
    rows = [files.index(f) for f in r["files"]]
    np.testing.assert_array_equal(r["attrs"], vals[rows]); assert r["attr_names"] == names
    np.testing.assert_array_equal(r["target"], r["attrs"][:, names.index("Male")])
    assert r["metrics"]["accuracy"] >= 0.8 and 0.2 < r["decisions"].mean() < 0.8, r["metrics"]
    assert r["config"]["size"] == 32 and r["config"]["target"] == "Male" and len(r["history"]) == r["epochs"] <= 3


def test_celeba_classifier_reuses_and_reproduces(celeba_smoke, tmp_path):
    d, r = celeba_smoke
    again = celeba_classifier("smoke", data_dir=d/"data", cache_dir=d/"cache", progress=False)
    assert again["loaded"] and np.array_equal(again["logits"], r["logits"])
    torch.manual_seed(99)
    fresh = celeba_classifier("smoke", data_dir=d/"data", cache_dir=tmp_path, progress=False)   # retrained
    assert not fresh["loaded"] and same_weights(fresh["model"], r["model"])


def test_celeba_classifier_real_layout_partition_and_subsets(tmp_path, monkeypatch):
    from diffexplain.data import write_tiny_celeba
    write_tiny_celeba(tmp_path/"data"/"celeba", n=60, img_shape=(40, 32), seed=1)     # a "real" folder at data_dir/celeba
    monkeypatch.setitem(CELEBA_PROFILES, "quick", dict(CELEBA_PROFILES["quick"], size=16, n_train=20, max_epochs=1))
    r = celeba_classifier("quick", data_dir=tmp_path/"data", cache_dir=tmp_path/"cache", attribute="Wearing_Lipstick",
                          progress=False)
    assert r["data"] == "CelebA" and not r["synthetic"]
    assert r["n"] == dict(train=20, val=6, test=6)              # the partition file's valid/test, a seeded train subset
    np.testing.assert_array_equal(r["target"], r["attrs"][:, r["attr_names"].index("Wearing_Lipstick")])
    assert Path(r["path"]).name.startswith("celeba-Wearing_Lipstick-")


def test_celeba_classifier_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e: celeba_classifier("paper", data_dir=tmp_path)
    for f in ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt", str(tmp_path/"celeba")):
        assert f in str(e.value)
    with pytest.raises(ValueError, match="`profile`"): celeba_classifier("tiny", data_dir=tmp_path)
    with pytest.raises(ValueError, match="`attribute`"): celeba_classifier("smoke", data_dir=tmp_path, attribute="male")


# ---------------------------------------------------------------- brain driver
@pytest.fixture(scope="module")
def brain_smoke(tmp_path_factory):
    d = tmp_path_factory.mktemp("brain")
    return d, brain_models("smoke", data_dir=d/"data", cache_dir=d/"cache", progress=False)


def test_brain_models_smoke_on_phantoms(brain_smoke):
    import pandas as pd
    d, b = brain_smoke
    assert b["synthetic"] and "not OASIS-3" in b["data"] and Path(b["table"]).parent.parent == d/"data"
    info = pd.read_csv(b["table"]).set_index("subject")
    assert len(info) == 12 and b["n"] == dict(train=16, val=2, test=6)
    # test outputs line up with the test ROIs: labels and exact phantom volumes
    np.testing.assert_array_equal(b["label"], (info.loc[b["subject"], "diagnosis"] == "AD").to_numpy(np.int64))
    want = np.where(b["hemisphere"] == 0, info.loc[b["subject"], "volume_left_mm3"], info.loc[b["subject"], "volume_right_mm3"])
    np.testing.assert_allclose(b["volume"], want, rtol=1e-6)
    assert b["logits"].shape == b["volume_pred"].shape == (6,) and np.isfinite(b["logits"]).all()
    assert set(b["label"]) == {0, 1} and 0 <= b["balanced_accuracy"] <= 1 and np.isfinite(b["r2"])
    clf, reg = b["classifier"], b["regressor"]
    assert clf["config"]["n_aug"] == 2 and clf["config"]["max_deg"] == 10.0 and clf["config"]["task"] == "binary"
    assert isinstance(reg["model"], Rescaled) and reg["config"]["target"] == "volume"
    # the regressor predicts in mm³: standardisation statistics come from the training ROIs
    assert float(reg["model"].mean) == pytest.approx(reg["config"]["mean"]) and 500 < reg["config"]["mean"] < 5000
    assert np.abs(b["volume_pred"] - reg["config"]["mean"]).max() < 10*reg["config"]["std"]
    assert b["r2"] == pytest.approx(r2_score(b["volume"], b["volume_pred"]))


def test_brain_models_reuse_and_same_seed(brain_smoke, tmp_path):
    d, b = brain_smoke
    again = brain_models("smoke", data_dir=d/"data", cache_dir=d/"cache", progress=False)
    assert again["classifier"]["loaded"] and again["regressor"]["loaded"]
    np.testing.assert_allclose(again["volume_pred"], b["volume_pred"], rtol=1e-6)
    torch.manual_seed(5)
    fresh = brain_models("smoke", data_dir=d/"data", cache_dir=tmp_path, progress=False)
    assert not fresh["classifier"]["loaded"] and same_weights(fresh["classifier"]["model"], b["classifier"]["model"])


def test_brain_models_weighted_sampler_balances_classes(monkeypatch, tmp_path):
    "The classifier draws AD and CN ROIs about equally often although only a quarter of the subjects are AD."
    import diffexplain.brain_study as M    # brain_models calls train_model from its own module
    seen = {}
    real = M.train_model
    def spy(model, train_data, val_data, task="binary", sample_weights=None, **kw):
        seen[task] = (train_data, sample_weights)
        return real(model, train_data, val_data, task=task, sample_weights=sample_weights, **kw)
    monkeypatch.setattr(M, "train_model", spy)
    monkeypatch.setitem(BRAIN_PROFILES, "smoke", dict(BRAIN_PROFILES["smoke"], max_epochs=1))
    brain_models("smoke", data_dir=tmp_path/"data", cache_dir=tmp_path/"cache", progress=False)
    ds, w = seen["binary"]
    labels = np.array([int(ds[i][1]) for i in range(len(ds))])
    assert len(w) == len(ds) == 32 and labels.mean() < 0.3
    assert float(w[labels == 1].sum()) == pytest.approx(float(w[labels == 0].sum()))
    assert seen["regression"][1] is None


def test_brain_models_real_data_path(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="oasis3/subjects.csv not found"):
        brain_models("quick", data_dir=tmp_path/"data", cache_dir=tmp_path/"cache")
    assert brain_table("paper", tmp_path) == tmp_path/"oasis3"/"subjects.csv"
    make_brain_phantoms(tmp_path/"data"/"oasis3", n_subjects=10, seed=2, shape=(48, 64, 48))    # stands in for OASIS-3
    monkeypatch.setitem(BRAIN_PROFILES, "quick", dict(BRAIN_PROFILES["quick"], roi_size=32, n_aug=1, max_epochs=1))
    b = brain_models("quick", data_dir=tmp_path/"data", cache_dir=tmp_path/"cache", progress=False)
    assert b["data"] == "OASIS-3" and not b["synthetic"] and len(b["volume"]) == b["n"]["test"] > 0
    (tmp_path/"data"/"oasis3"/"sub-0003"/"T1.nii.gz").unlink()
    with pytest.raises(FileNotFoundError, match="sub-0003/T1.nii.gz"):
        brain_models("quick", data_dir=tmp_path/"data", cache_dir=tmp_path/"cache2", progress=False)
    with pytest.raises(ValueError, match="`profile`"): brain_models("big", data_dir=tmp_path)
