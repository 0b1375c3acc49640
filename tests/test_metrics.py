"""Thorough checks of `diffexplain.metrics` against the reference implementations (prdc, torch-fidelity,
scikit-learn) and against cases computed by hand. CPU, < 2 min."""
import contextlib, io, pickle
import numpy as np
import pandas as pd
import pytest
import torch
import torchvision
import prdc
from torch_fidelity.metric_fid import fid_features_to_statistics, fid_statistics_to_metric, KEY_METRIC_FID

from diffexplain.metrics import *
from diffexplain.metrics import r2_score, balanced_accuracy, to_uint8


def ref_prdc(real, fake, k):
    with contextlib.redirect_stdout(io.StringIO()):
        return {m: float(v) for m, v in prdc.compute_prdc(np.asarray(real), np.asarray(fake), nearest_k=k).items()}


# ----------------------------------------------------------------------------------------------- prdc
@pytest.mark.parametrize("N,M,d,k,shift,bs", [(100, 100, 16, 5, 0.0, 1024), (80, 120, 4, 3, 0.5, 17),
                                              (150, 60, 32, 1, 1.0, 1), (64, 64, 2, 10, 0.2, 33)])
def test_prdc_matches_reference(N, M, d, k, shift, bs):
    rng = np.random.default_rng(N + M + d + k)
    real = rng.normal(size=(N, d)).astype(np.float32)
    fake = (rng.normal(size=(M, d)) * 1.2 + shift).astype(np.float32)
    ours, ref = prdc_metrics(real, fake, k=k, batch_size=bs), ref_prdc(real, fake, k)
    for m in ("precision", "recall", "coverage"): assert ours[m] == pytest.approx(ref[m], abs=1e-12), m
    assert ours["density"] == pytest.approx(ref["density"], abs=1e-9)


def test_prdc_duplicates_and_ties_match_reference():
    "Integer points on a small grid: many exact ties and duplicate points; distances are exact in float64."
    rng = np.random.default_rng(0)
    real = rng.integers(0, 4, size=(60, 2)).astype(np.float32)
    fake = rng.integers(0, 4, size=(40, 2)).astype(np.float32)
    for k in (1, 2, 3, 5):
        ours, ref = prdc_metrics(real, fake, k=k, batch_size=7), ref_prdc(real, fake, k)
        for m in ref: assert ours[m] == pytest.approx(ref[m], abs=1e-12), (k, m)


def test_prdc_hand_case_2d():
    "Unit square corners as real set: every NND_1 is 1; a fake at the centre (distance 0.707) is in all four balls."
    real = torch.tensor([[0., 0.], [1., 0.], [0., 1.], [1., 1.]])
    r = prdc_metrics(real, torch.tensor([[0.5, 0.5], [3., 3.]]), k=1)
    assert r == pytest.approx(dict(precision=0.5, recall=1.0, density=4 / 2, coverage=1.0))
    # a fake at (1, 0.) + (1, 0) is at distance exactly 1 from (1, 0): on the sphere, hence not covered
    assert coverage(real, torch.tensor([[2., 0.]]), k=1) == 0.0
    assert coverage(real, torch.tensor([[1.999, 0.]]), k=1) == 0.25


def test_several_k_in_one_pass_and_chunking():
    g = torch.Generator().manual_seed(3)
    real, fake = torch.randn(90, 5, generator=g), torch.randn(70, 5, generator=g)
    many = prdc_metrics(real, fake, k=[5, 3, 1], batch_size=11)
    for k in (5, 3, 1):
        assert many[k] == prdc_metrics(real, fake, k=k, batch_size=1000)
        assert coverage(real, fake, k=[5, 3, 1])[k] == many[k]["coverage"]
    assert precision(real, fake, 3) == many[3]["precision"] and recall(real, fake, 3) == many[3]["recall"]
    assert density(real, fake, 3) == many[3]["density"]
    radii = knn_radii(real, k=3)
    d = torch.cdist(real.double(), real.double()); d.fill_diagonal_(float("inf"))
    torch.testing.assert_close(radii, d.sort(1).values[:, 2])


def test_prdc_errors():
    x = torch.randn(10, 3)
    with pytest.raises(ValueError, match="same feature dimension"): coverage(x, torch.randn(10, 4), 3)
    with pytest.raises(ValueError, match="too few samples for k=10.*`real_features`"): coverage(x, x, 10)
    with pytest.raises(ValueError, match="too few samples for k=3.*`fake_features`"): prdc_metrics(x, x[:3], 3)
    assert 0 <= coverage(x, x[:1], 3) <= 1                       # coverage needs no radii of the fake set
    bad = x.clone(); bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="`fake_features` contains NaN"): coverage(x, bad, 3)
    with pytest.raises(ValueError, match="`real_features` must have 2 dimensions"): coverage(x[0], x, 3)
    with pytest.raises(ValueError, match="`k` must be a positive int"): coverage(x, x, 2.5)
    with pytest.raises(ValueError, match="`k` must be a positive int"): coverage(x, x, True)
    with pytest.raises(ValueError, match="`metrics` must be"): prdc_metrics(x, x, 3, metrics=("fid",))
    with pytest.raises(ValueError, match="`batch_size`"): prdc_metrics(x, x, 3, batch_size=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prdc_cuda_matches_cpu():
    g = torch.Generator().manual_seed(0)
    real, fake = torch.randn(3000, 64, generator=g), torch.randn(2500, 64, generator=g) + 0.1
    assert prdc_metrics(real, fake, k=[1, 3, 5], device="cuda", batch_size=512) == prdc_metrics(real, fake, k=[1, 3, 5])


# ----------------------------------------------------------------------------------------------- FID
def _with_moments(n, mu, cov, seed):
    "n samples whose sample mean and (unbiased) sample covariance are exactly `mu` and `cov`."
    z = torch.randn(n, len(mu), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    z = z - z.mean(0)
    lam, V = torch.linalg.eigh(torch.cov(z.T))
    w = z @ V @ torch.diag(lam.rsqrt()) @ V.T
    return w @ torch.linalg.cholesky(torch.as_tensor(cov, dtype=torch.float64)).T + torch.as_tensor(mu, dtype=torch.float64)


def test_fid_closed_forms():
    # commuting covariances (common eigenbasis, rotated): ||dmu||^2 + sum (sqrt a - sqrt b)^2
    Q = torch.linalg.qr(torch.randn(3, 3, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    a, b = torch.tensor([1., 4., 9.], dtype=torch.float64), torch.tensor([4., 1., 16.], dtype=torch.float64)
    s1, s2 = Q @ torch.diag(a) @ Q.T, Q @ torch.diag(b) @ Q.T
    mu1, mu2 = torch.tensor([1., 2., 3.]), torch.tensor([0., 0., 1.])
    expected = 1 + 4 + 4 + (1 + 1 + 1)
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-9)
    assert fid_from_features(_with_moments(40, mu1, s1, 0), _with_moments(25, mu2, s2, 1)) == pytest.approx(expected, abs=1e-8)
    # one dimension: (m1 - m2)^2 + (s1 - s2)^2
    assert frechet_distance([0.], [[4.]], [1.], [[9.]]) == pytest.approx(1 + 1, abs=1e-12)
    # a pure shift: FID = ||c||^2
    x = torch.randn(50, 6, dtype=torch.float64)
    c = torch.arange(6, dtype=torch.float64)
    assert fid_from_features(x, x + c) == pytest.approx(float(c @ c), abs=1e-8)


@pytest.mark.parametrize("n,d", [(300, 8), (40, 64)])         # the second is rank-deficient, as FID often is
def test_fid_matches_torch_fidelity(n, d):
    g = torch.Generator().manual_seed(d)
    a = torch.randn(n, d, generator=g, dtype=torch.float64)
    b = torch.randn(n + 7, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64) * 0.5 + 0.2
    ref = fid_statistics_to_metric(fid_features_to_statistics(a), fid_features_to_statistics(b), verbose=False)[KEY_METRIC_FID]
    assert fid_from_features(a, b) == pytest.approx(ref, rel=1e-6)


def _random_inception_weights(path):
    "A torch-fidelity Inception-v3 state dict with random weights (the real one is downloaded, which we don't)."
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(fe, "load_state_dict_from_url", lambda *a, **k: {})
        mp.setattr(fe.FeatureExtractorInceptionV3, "load_state_dict", lambda self, sd, *a, **k: None)
        torch.manual_seed(0)
        m = fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"])
    for mod in m.modules():       # He init keeps the activations' scale through the 90-odd layers (PyTorch's default shrinks it)
        if isinstance(mod, torch.nn.Conv2d): torch.nn.init.kaiming_normal_(mod.weight, nonlinearity="relu")
    torch.save(m.state_dict(), path)
    return fe.FeatureExtractorInceptionV3("inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path))


def test_fid_images_uses_torch_fidelity_with_local_weights(tmp_path):
    extractor = _random_inception_weights(tmp_path/"inception.pth")
    g = torch.Generator().manual_seed(0)
    real, fake = torch.rand(2, 1, 16, 16, generator=g), torch.rand(2, 1, 16, 16, generator=g) ** 3
    ours = fid_images(real, fake, weights_path=tmp_path/"inception.pth", batch_size=2)
    with torch.no_grad():
        fr, ff = extractor(to_uint8(torch.cat([real, fake]).expand(-1, 3, -1, -1)))[0].double().split(2)
    assert fr.std(0).mean() > 1e-2                                   # features that vary between images
    assert ours == pytest.approx(fid_from_features(fr, ff), rel=1e-4)
    assert ours > 1e-2
    with pytest.raises(FileNotFoundError, match="weights-inception-2015-12-05-6726825d.pth"):
        fid_images(real, fake, weights_path=tmp_path/"missing.pth")
    with pytest.raises(ValueError, match="at least 2 images"): fid_images(real[:1], fake, weights_path=tmp_path/"inception.pth")
    with pytest.raises(ValueError, match="channels"): fid_images(torch.rand(3, 2, 8, 8), fake, weights_path=tmp_path/"inception.pth")


# ----------------------------------------------------------------------------------------------- embeddings
def test_vgg16_features_match_torch_fidelity(tmp_path):
    "Our float pipeline equals torch-fidelity's uint8 VGG16 fc2 extractor on uint8-representable images."
    from torch_fidelity.feature_extractor_vgg16 import FeatureExtractorVGG16
    torch.manual_seed(0)
    torch.save(torchvision.models.vgg16(weights=None).state_dict(), tmp_path/"vgg16.pth")
    ref = FeatureExtractorVGG16("vgg16", ["fc2", "fc2_relu"], feature_extractor_weights_path=str(tmp_path/"vgg16.pth"))
    emb = vgg16_embedding(tmp_path/"vgg16.pth")
    pre = VGG16Features(torch.nn.ModuleDict(dict(features=emb.features, avgpool=emb.avgpool, classifier=emb.fc)), layer="fc2")
    x = to_uint8(torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(1)))
    with torch.no_grad(): fc2, fc2_relu = ref(x)
    assert fc2.std() > 1e-3 and (fc2 < 0).any()
    ours = embed(x, pre, progress=False)                            # uint8 is accepted too
    torch.testing.assert_close(ours, fc2, rtol=1e-3, atol=1e-5)
    torch.testing.assert_close(embed(x[:1].float() / 255, emb, progress=False), fc2_relu[:1], rtol=1e-3, atol=1e-5)
    with pytest.raises(ValueError, match="not a torchvision VGG16"):
        torch.save({"weight": torch.zeros(2)}, tmp_path/"bad.pth"); load_vgg16(tmp_path/"bad.pth")
    with pytest.raises(FileNotFoundError, match="vgg16-397923af.pth"): load_vgg16(tmp_path/"nope.pth")
    with pytest.raises(ValueError, match="`layer`"): vgg16_embedding(tmp_path/"vgg16.pth", layer="fc1")


def test_embed_hooks_for_vae_encoders():
    "The brain VAE hook: MONAI's AutoencoderKL.encode returns (z_mu, z_sigma); diffusers' returns a posterior."
    from monai.networks.nets import AutoencoderKL
    torch.manual_seed(0)
    vae = AutoencoderKL(spatial_dims=3, in_channels=1, out_channels=1, channels=(4, 8), latent_channels=1,
                        num_res_blocks=(1, 1), norm_num_groups=4, attention_levels=(False, False),
                        with_encoder_nonlocal_attn=False, with_decoder_nonlocal_attn=False).eval()
    x = torch.rand(5, 1, 8, 8, 8)
    f = embed(x, vae.encode, batch_size=2, progress=False)     # a bound method: its module goes to `device`
    with torch.no_grad(): z_mu = vae.encode(x)[0]
    assert f.shape == (5, z_mu[0].numel())
    torch.testing.assert_close(f, z_mu.flatten(1), rtol=1e-5, atol=1e-6)
    from diffusers import AutoencoderKL as DAE
    dae = DAE(in_channels=3, out_channels=3, block_out_channels=(8,), layers_per_block=1, latent_channels=2, norm_num_groups=4).eval()
    x2 = torch.rand(3, 3, 8, 8)
    with torch.no_grad(): mean = dae.encode(x2).latent_dist.mean
    torch.testing.assert_close(embed(x2, dae.encode, progress=False), mean.flatten(1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="`images` contains NaN"): embed(torch.full((2, 1, 4, 4), float("nan")), vae.encode)
    with pytest.raises(ValueError, match="must return a tensor"): embed(x, lambda b: "z", progress=False)


def test_vggface2_resnet50_architecture_and_preprocessing(tmp_path):
    torch.manual_seed(0)
    net = vggface2_resnet50().eval()
    # Caffe layout: stride on the 1x1 conv of downsampling blocks; max-pool without padding, ceil mode
    assert net.layer3[0].conv1.stride == (2, 2) and net.layer3[0].conv2.stride == (1, 1)
    assert net.layer1[0].conv1.stride == (1, 1)
    assert net.maxpool.padding == 0 and net.maxpool.ceil_mode
    x = torch.rand(1, 3, 224, 224)
    with torch.no_grad():
        s = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        assert s.shape[-1] == 56 and net.layer4(net.layer3(net.layer2(net.layer1(s)))).shape[-1] == 7
        assert net(x).shape == (1, 8631)
    face = FaceEmbedding(net)
    img = torch.rand(1, 3, 224, 224, generator=torch.Generator().manual_seed(2))    # already 224: resize is identity
    manual = img[:, [2, 1, 0]] * 255 - torch.tensor([91.4953, 103.8827, 131.0912]).view(1, 3, 1, 1)
    net_nofc = torchvision.models.resnet50(num_classes=8631); net_nofc.load_state_dict(net.state_dict())
    net_nofc.maxpool, net_nofc.fc = net.maxpool, torch.nn.Identity()
    for l in (net_nofc.layer2, net_nofc.layer3, net_nofc.layer4): l[0].conv1.stride, l[0].conv2.stride = (2, 2), (1, 1)
    with torch.no_grad(): torch.testing.assert_close(face(img), net_nofc.eval()(manual), rtol=1e-4, atol=1e-4)
    # weights files: .pth and .safetensors with the same names load; incomplete ones are refused
    from safetensors.torch import save_file
    sd = {k: v for k, v in net.state_dict().items() if "num_batches" not in k}
    torch.save(sd, tmp_path/"w.pth"); save_file(sd, str(tmp_path/"w.safetensors"))
    for p in ("w.pth", "w.safetensors"):
        assert torch.equal(load_vggface2_resnet50(tmp_path/p).fc.weight, net.fc.weight)
    sd.pop("layer4.2.bn3.running_var"); torch.save(sd, tmp_path/"partial.pth")
    with pytest.raises(ValueError, match="missing keys.*layer4.2.bn3.running_var"): load_vggface2_resnet50(tmp_path/"partial.pth")
    with pytest.raises(ValueError, match="conv1.weight has shape"):
        with open(tmp_path/"w.pkl", "wb") as fh:
            pickle.dump({k: v.numpy() if k != "conv1.weight" else np.zeros((3, 3)) for k, v in net.state_dict().items()
                         if "num_batches" not in k}, fh)
        load_vggface2_resnet50(tmp_path/"w.pkl")


# ----------------------------------------------------------------------------------------------- CF metrics
def test_face_similarity_random_against_numpy():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(50, 16)), rng.normal(size=(50, 16))
    b[:25] = a[:25] + 0.1 * b[:25]
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    r = face_similarity(a, b)
    assert r["fs"] == pytest.approx(cos.mean(), abs=1e-12) and r["fva"] == pytest.approx((cos > 0.5).mean())
    assert face_similarity(a, b, threshold=-1.0)["fva"] == 1.0


def test_oracle_mnac_flip_against_numpy():
    rng = np.random.default_rng(1)
    o, f, r = rng.random(30), rng.random(30), rng.random(30)
    res = oracle_mae(torch.tensor(o)[:, None], f, target=r)
    assert res["oracle_mae"] == pytest.approx(np.abs(o - f).mean()) and res["oracle_target_mae"] == pytest.approx(np.abs(o - r).mean())
    assert set(oracle_mae(o, f)) == {"oracle_mae"}
    p, q = rng.random((20, 40)), rng.random((20, 40))
    assert mnac(p, q) == pytest.approx(((p > 0.5) != (q > 0.5)).sum(1).mean())
    assert mnac(p, p) == 0.0
    assert mnac(p, q, exclude=[3, 7]) == pytest.approx(np.delete((p > 0.5) != (q > 0.5), [3, 7], axis=1).sum(1).mean())
    with pytest.raises(ValueError, match="same shape"): mnac(p, q[:, :39])
    y0, y1 = rng.random(100), rng.random(100)
    assert flip_rate(y0, y1) == pytest.approx(((y0 > 0.5) != (y1 > 0.5)).mean())
    s = rng.normal(size=(100, 3)); t = rng.integers(0, 3, 100)
    assert flip_rate(y0, s, target=t) == pytest.approx((s.argmax(1) == t).mean())
    with pytest.raises(ValueError, match="same length"): flip_rate(y0, y1[:5])


def test_r2_and_balanced_accuracy_against_sklearn():
    from sklearn.metrics import r2_score as sk_r2, balanced_accuracy_score
    rng = np.random.default_rng(2)
    y, p = rng.normal(size=200), rng.normal(size=200)
    assert r2_score(y, y + 0.3 * p) == pytest.approx(sk_r2(y, y + 0.3 * p))
    c, d = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert balanced_accuracy(c, d) == pytest.approx(balanced_accuracy_score(c, d))


def test_square_metrics_on_the_squares_data():
    "Real squares data: an unchanged image has background MAE 0 and square MAE = |noise mean| (small)."
    from diffexplain.data import make_squares
    d = make_squares(n=16, seed=0)
    x, mask, target = (torch.as_tensor(d[k]) for k in ("images", "mask", "target"))
    assert background_mae(x, x, mask) == 0.0
    red = np.array([d["images"][i, 0][d["mask"][i, 0]].mean() for i in range(16)])
    assert square_mae(x, mask, target) == pytest.approx(np.abs(red - d["target"]).mean(), abs=1e-6)
    assert square_mae(x, mask, target) < 0.03
    xc = x.clone(); xc[:, 0][mask[:, 0]] = 1.0                      # paint the square full red: MAE = mean |1 - r|
    assert square_mae(xc, mask, target) == pytest.approx(float((1 - target).abs().mean()), abs=1e-6)
    assert background_mae(x, xc, mask) == 0.0                      # only the square changed
    xb = x.clone(); xb[~mask.expand_as(x)] = (xb[~mask.expand_as(x)] + 0.01).clamp(max=1)
    assert 0 < background_mae(x, xb, mask) <= 0.01 + 1e-6
    with pytest.raises(ValueError, match="`mask` must have shape"): square_mae(x, mask[:, :, :32], target)
    with pytest.raises(ValueError, match="`target` must have 16 entries"): square_mae(x, mask, target[:3])
    with pytest.raises(ValueError, match="`x_cf` must have 3 channels"): square_mae(x[:, :1], mask, target)


# ----------------------------------------------------------------------------------------------- tables
def test_metrics_table_layout_and_files(tmp_path):
    ours = {"AC-RE": {"Square MAE": 0.1234, "Background MAE": 0.0119}, "Diff-AE-RE": {"Square MAE": 0.2}}
    paper = {"AC-RE": {"Square MAE": 0.13, "Background MAE": 0.012}, "Diff-AE-RE": {"Square MAE": 0.167, "Background MAE": 0.032}}
    assert list(metrics_table(ours, {"AC-RE": {"FID": 38.1}}).columns) == ["Square MAE", "Background MAE", "FID (paper)"]
    t = metrics_table(ours, paper)
    assert list(t.columns) == ["Square MAE", "Square MAE (paper)", "Background MAE", "Background MAE (paper)"]
    assert list(t.index) == ["AC-RE", "Diff-AE-RE"] and np.isnan(t.loc["Diff-AE-RE", "Background MAE"])
    md = to_markdown(t)
    assert md.splitlines()[0] == "| Method | Square MAE | Square MAE (paper) | Background MAE | Background MAE (paper) |"
    assert md.splitlines()[3] == "| Diff-AE-RE | 0.2 | 0.167 |  | 0.032 |"
    csv, mdp = save_metrics_table(t, tmp_path/"sub"/"table1")
    back = pd.read_csv(csv, index_col=0)
    pd.testing.assert_frame_equal(back, t, check_names=False)
    assert mdp.read_text() == md
    with pytest.raises(ValueError, match="`results`"): metrics_table({})


def test_pipes_in_names_do_not_split_columns():
    "A `|f - r|` header or cell is escaped, so every row of the markdown table has as many cells as the header."
    import re
    md = to_markdown(metrics_table({"AC-RE | fresh": {"|f - r|": 0.05, "success rate": 0.9}}))
    cells = lambda line: len(re.split(r"(?<!\\)\|", line)) - 2
    assert [cells(l) for l in md.splitlines()] == [3, 3, 3] and md.splitlines()[0] == r"| Method | \|f - r\| | success rate |"


def test_committed_result_tables_render():
    "Every markdown table under reproductions/results has the same number of cells in each row (no unescaped `|`)."
    import re
    from pathlib import Path
    root = Path(__file__).resolve().parents[1]/"reproductions"/"results"
    bad = []
    for f in sorted(root.rglob("*.md")):
        for block in f.read_text().split("\n\n"):
            rows = [l for l in block.splitlines() if l.startswith("|")]
            if len({len(re.split(r"(?<!\\)\|", l)) for l in rows}) > 1: bad.append(str(f.relative_to(root)))
    assert not bad, f"tables with a row of another width (escape '|' as '\\|'): {sorted(set(bad))}"
