"""Tests of `diffexplain.models`: architectures, the training loop, metrics and checkpoints (tiny, CPU, < 2 min)."""
import json
from pathlib import Path
import numpy as np
import pytest
import torch
import torch.nn as nn
from diffexplain.models import (EllipseCNN, resnet10t, to_3d, resnet10t_3d, square_resnet18, densenet121_regressor,
                                age_oracle, Rescaled, accuracy, balanced_accuracy, r2_score, l2_penalty, predict,
                                evaluate, train_model, save_checkpoint, load_checkpoint, load_or_train, ellipse_models)

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
