"""Thorough checks of `diffexplain.data` (the notebook holds the quick examples)."""
import os, time
import numpy as np
import pytest
import torch
import ellipse as ellipse_pkg
from diffexplain.data import *


# ---------------------------------------------------------------- ellipses
def test_renderer_matches_ellipse_package_on_50_random_ellipses():
    p = sample_ellipse_params(50, seed=123)
    mine = render_ellipses(p["row"], p["col"], p["a"], p["b"], p["theta"])
    for i in range(50):
        ref = ellipse_pkg.get_ellipse(32, p["row"][i], p["col"][i], p["a"][i], p["b"][i], p["theta"][i], downsample_factor=4)
        np.testing.assert_allclose(mine[i], ref, atol=1e-6, rtol=0)


def test_renderer_matches_package_for_any_angle_and_other_sizes():
    rng = np.random.default_rng(7)
    for size, f in [(32, 4), (48, 2), (64, 4)]:
        a = rng.uniform(2, size/4, 10); b = a*rng.uniform(0.2, 1, 10); th = rng.uniform(-7, 7, 10)
        r = rng.uniform(a + 1, size - 1 - a); c = rng.uniform(a + 1, size - 1 - a)
        mine = render_ellipses(r, c, a, b, th, img_size=size, downsample_factor=f)
        for i in range(10):
            ref = ellipse_pkg.get_ellipse(size, r[i], c[i], a[i], b[i], th[i], downsample_factor=f)
            np.testing.assert_allclose(mine[i], ref, atol=1e-6, rtol=0)


@pytest.fixture(scope="module")
def ellipses(tmp_path_factory):
    d = tmp_path_factory.mktemp("cache")
    return make_ellipses(10_000, cache_dir=d), d


def test_make_ellipses_full_size(ellipses):
    e, d = ellipses
    test_keys = {"images", "log_ar", "area", "theta", "row", "col", "label"}
    assert test_keys <= set(e)
    assert e["images"].shape == (10_000, 1, 32, 32) and e["images"].dtype == np.float32
    assert e["label"].dtype == np.int64 and e["label"].sum() == 5_000
    assert 0 <= e["images"].min() and e["images"].max() <= 1
    # every ellipse lies fully inside, with a 1-px margin at least partly empty
    assert e["images"][:, 0, [0, -1], :].max() == 0 and e["images"][:, 0, :, [0, -1]].max() == 0
    # label is a threshold on the aspect ratio, and the factors are independent of it except log_ar
    assert ((e["log_ar"] >= 0.75) == e["label"].astype(bool)).all()
    assert abs(np.corrcoef(e["area"], e["label"])[0, 1]) < 0.05
    assert abs(np.corrcoef(e["area"], e["log_ar"])[0, 1]) < 0.05
    # log_ar roughly uniform on (0, 1.5)
    hist, _ = np.histogram(e["log_ar"], bins=6, range=(0, 1.5))
    assert hist.min() > 0.8*10_000/6
    # pixel sums equal the area to within anti-aliasing error
    np.testing.assert_allclose(e["images"].sum((1, 2, 3)), e["area"], rtol=0.05)


def test_make_ellipses_cached_and_deterministic(ellipses, monkeypatch):
    e, d = ellipses
    assert len(list(d.iterdir())) == 1
    import diffexplain.data as data_mod
    with monkeypatch.context() as mp: # the second call must load, not draw again (no wall-clock threshold)
        mp.setattr(data_mod, "render_ellipses", lambda *a, **k: pytest.fail("cached ellipses were rendered again"))
        e2 = make_ellipses(10_000, cache_dir=d)
    for k in e: np.testing.assert_array_equal(e[k], e2[k])
    small = make_ellipses(300, seed=0, cache_dir=False)
    assert not np.array_equal(small["images"], make_ellipses(300, seed=5, cache_dir=False)["images"])
    # a different option is a different cache entry
    make_ellipses(300, cache_dir=d, log_ar_range=(0.0, 1.0))
    assert len(list(d.iterdir())) == 2


def test_moment_features_agree_with_true_factors(ellipses):
    e, _ = ellipses
    x = torch.tensor(e["images"])
    lar, area = moment_log_ar(x).numpy(), moment_area(x).numpy()
    assert np.corrcoef(lar, e["log_ar"])[0, 1] > 0.999
    assert np.abs(lar - e["log_ar"]).mean() < 0.03
    assert ((lar >= 0.75) == e["label"].astype(bool)).mean() > 0.98
    assert np.corrcoef(area, e["area"])[0, 1] > 0.9999
    # 3-d input and float64 work the same
    np.testing.assert_allclose(moment_log_ar(x[:10, 0].double()).numpy(), lar[:10], atol=1e-4)


def test_moment_log_ar_is_rotation_and_translation_invariant():
    a, b = 9.0, 3.0
    imgs = render_ellipses(np.full(8, 15.0), np.full(8, 15.0), a, b, np.linspace(0, np.pi, 8, endpoint=False))
    lar = moment_log_ar(torch.tensor(imgs)).numpy()
    np.testing.assert_allclose(lar, np.log(a/b), atol=0.03)
    shifted = render_ellipses(np.array([11.0, 20.0]), np.array([20.0, 12.0]), a, b, 0.3)
    np.testing.assert_allclose(moment_log_ar(torch.tensor(shifted)).numpy(), lar[0], atol=0.03)


def test_moment_features_gradients_push_the_right_way():
    img = torch.tensor(render_ellipses(16.0, 16.0, 6.0, 3.0, 0.0), requires_grad=True)
    moment_log_ar(img).sum().backward()
    g = img.grad[0]
    # brightening just beyond the tips of the major (row) axis lengthens the ellipse (raises log a/b), just beyond the
    # minor axis fattens it (lowers it); the straight-through clamp gives black pixels a gradient too
    assert g[16 + 7, 16] > 0 and g[16 - 8, 16] > 0 and g[16, 16 + 4] < 0 and g[16, 16 - 4] < 0
    assert moment_log_ar(img.detach() + 0.1*(g > 0)).item() > moment_log_ar(img.detach()).item()


def test_splits():
    s = split_indices(10_000)
    assert [len(s[k]) for k in ("train", "val", "test")] == [7_000, 1_000, 2_000]
    assert len(np.intersect1d(s["train"], s["test"])) == 0 and len(np.intersect1d(s["val"], s["test"])) == 0
    for bad in [dict(n=0), dict(n=10, val_frac=-0.1), dict(n=10, test_frac=1.0)]:
        with pytest.raises(ValueError): split_indices(**bad)


def test_tensor_dataset_with_split(ellipses):
    e, _ = ellipses
    tr = split_indices(len(e["label"]))["train"]
    ds = tensor_dataset(e, ("images", "label"), idx=tr, dtypes={"label": torch.float32})
    assert len(ds) == 7_000 and ds[0][1].dtype == torch.float32
    x, y = ds[0]; np.testing.assert_array_equal(x.numpy(), e["images"][tr[0]])


@pytest.mark.parametrize("kw,msg", [(dict(n=1), "`n`"), (dict(n=10, log_ar_range=(1, 0.5)), "log_ar_range"),
                                    (dict(n=10, area_range=(-1, 5)), "area_range"), (dict(n=10, img_size=10), "too small")])
def test_ellipse_param_errors(kw, msg):
    with pytest.raises(ValueError, match=msg): sample_ellipse_params(**kw)


def test_renderer_errors():
    with pytest.raises(ValueError, match="`row`"): render_ellipses(np.array([np.nan]), 1, 1, 1, 0)
    with pytest.raises(ValueError, match="positive"): render_ellipses(10, 10, 3, 0, 0)
    with pytest.raises(ValueError, match="`images`"): moment_area(torch.zeros(4, 4))


# ---------------------------------------------------------------- squares
def test_make_squares_design():
    n = 2_000
    s = make_squares(n, seed=1)
    assert s["images"].shape == (n, 3, 64, 64) and s["images"].dtype == np.float32
    assert s["mask"].shape == (n, 1, 64, 64) and s["mask"].dtype == bool
    a = np.round(s["target"]*255); b = np.round(s["background"]*255)
    np.testing.assert_allclose(a, s["target"]*255, atol=1e-9)          # integer colours
    assert (a[::2] >= 128).all() and (a[1::2] < 128).all()
    i = np.arange(n)
    assert ((b >= 128) == ((i//2) % 2 == 0)).all()
    assert ((s["row"] >= 26) == ((i//4) % 2 == 0)).all() and ((s["col"] >= 26) == ((i//8) % 2 == 0)).all()
    assert s["row"].min() >= 0 and s["row"].max() <= 51 and s["col"].max() <= 51
    assert abs(np.corrcoef(a, b)[0, 1]) < 0.1 and abs(np.corrcoef(a, s["row"])[0, 1]) < 0.1
    # the mask is the 8×8 square at (row+2, col+2)
    for k in range(0, n, 397):
        m = np.zeros((64, 64), bool); m[s["row"][k] + 2:s["row"][k] + 10, s["col"][k] + 2:s["col"][k] + 10] = True
        np.testing.assert_array_equal(s["mask"][k, 0], m)
    # image statistics: red inside the mask ≈ a, green/blue ≈ 0 (clipped noise), border ≈ 127, background ≈ b
    img = s["images"]*255; m = s["mask"][:, 0]
    red = (img[:, 0]*m).sum((1, 2))/64
    mid = (a > 40) & (a < 215)          # away from clipping the mean is unbiased; noise of the mean is 20/8
    assert np.abs(red[mid] - a[mid]).max() < 12 and abs((red[mid] - a[mid]).mean()) < 0.5
    assert img[:, 1][m].mean() < 10
    k = 0; r, c = s["row"][k], s["col"][k]
    border = np.zeros((64, 64), bool); border[r:r + 12, c:c + 12] = True; border &= ~m[k]
    assert abs(img[k, :, border].mean() - 127) < 4
    outside = ~np.pad(np.ones((12, 12), bool), ((r, 52 - r), (c, 52 - c)))
    if 50 < b[k] < 205: assert abs(img[k, :, outside].mean() - b[k]) < 2
    # noise σ = 20 on a mid-grey background
    sel = (b > 80) & (b < 175) & (s["row"] >= 26) & (s["col"] >= 26)   # block away from the top-left corner
    flat = img[sel][:, :, :8, :8]
    assert 18 < flat.std(axis=(1, 2, 3)).mean() < 22
    np.testing.assert_array_equal(make_squares(n, seed=1)["images"][-16:], s["images"][-16:])


def test_square_eval_grid_and_reference():
    g = square_eval_grid()
    assert len(g["images"]) == 630 and g["mask"].shape == (630, 1, 64, 64)
    np.testing.assert_allclose(g["reference"], reference_value(g["target"]))
    # same noise for the two halves: outside the mask the images are identical
    out = ~g["mask"][:315]
    assert (g["images"][:315] == g["images"][315:])[np.broadcast_to(out, (315, 3, 64, 64))].all()
    np.testing.assert_allclose(reference_value(np.arange(256)/255), np.r_[np.arange(128, 256), np.arange(0, 128)]/255)
    t = torch.linspace(0, 1, 11, dtype=torch.float64)
    np.testing.assert_allclose(reference_value(t).numpy(), reference_value(t.numpy()))
    assert isinstance(reference_value(0.2), float)
    np.testing.assert_array_equal(square_eval_grid(seed=0)["images"], g["images"])


def test_square_errors():
    with pytest.raises(ValueError, match="`n`"): make_squares(0)
    z = np.zeros((1, 3, 64, 64), np.float32)
    with pytest.raises(ValueError, match="`row`"): render_squares([10.], [10.], [60], [0], z)
    with pytest.raises(ValueError, match="`noise`"): render_squares([10.], [10.], [0], [0], z[:, :2])
    with pytest.raises(ValueError, match="`target`"): reference_value(np.array([0.5, np.nan]))


# ---------------------------------------------------------------- faces
def test_celeba_layout_and_errors(tmp_path):
    with pytest.raises(FileNotFoundError) as e: CelebA(tmp_path/"none")
    for f in ("img_align_celeba", "list_attr_celeba.txt", "list_eval_partition.txt"): assert f in str(e.value)
    root = write_tiny_celeba(tmp_path/"c", n=6, img_shape=(60, 40))
    files, names, vals = read_attr_file(root/"list_attr_celeba.txt")
    assert len(names) == 40 and vals.shape == (6, 40) and set(np.unique(vals)) <= {0, 1}
    ds = CelebA(root, split="all", size=16, attrs=["Male", "Young"])
    x, y = ds[2]
    assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y.tolist() == vals[2, [20, 39]].tolist()
    assert [len(CelebA(root, split=s)) for s in ("train", "valid", "test")] == [4, 1, 1]
    with pytest.raises(ValueError, match="`split`"): CelebA(root, split="dev")
    (root/"img_align_celeba"/"000002.jpg").unlink()
    with pytest.raises(FileNotFoundError, match="000002.jpg"): CelebA(root, split="all")[1]
    (root/"list_eval_partition.txt").unlink()
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt"): CelebA(root)


def test_tiny_celeba_partition_is_80_10_10_at_any_size(tmp_path):
    "The old stand-in wrote codes 0,0,0,1,2,3,4,… so only 5 images ever landed in a split."
    root = write_tiny_celeba(tmp_path/"c", n=50, img_shape=(20, 16))
    codes = [int(l.split()[1]) for l in (root/"list_eval_partition.txt").read_text().splitlines()]
    assert set(codes) == {0, 1, 2} and np.bincount(codes).tolist() == [40, 5, 5]
    assert [len(CelebA(root, split=s)) for s in ("train", "valid", "test")] == [40, 5, 5]
    for n, want in [(3, [1, 1, 1]), (10, [8, 1, 1]), (123, [97, 13, 13])]:
        r = write_tiny_celeba(tmp_path/f"n{n}", n=n, img_shape=(8, 8))
        assert [len(CelebA(r, split=s)) for s in ("train", "valid", "test")] == want


def test_tiny_celeba_has_a_learnable_male_cue_and_gender_correlated_attributes(tmp_path):
    root = write_tiny_celeba(tmp_path/"c", n=400, img_shape=(24, 20), seed=3)
    ds = CelebA(root, split="all", size=8)
    a = ds.attrs.numpy(); col = {k: ds.attr_names.index(k) for k in ds.attr_names}
    male = a[:, col["Male"]]
    assert 0.4 < male.mean() < 0.6
    x = torch.stack([ds[i][0] for i in range(len(ds))])
    cue = (x[:, 2] - x[:, 0]).mean((1, 2)).numpy()                       # blue minus red
    assert ((cue > 0) == (male == 1)).mean() == 1.0                          # one threshold separates the genders
    corr = lambda k: np.corrcoef(male, a[:, col[k]])[0, 1]
    assert corr("Wearing_Lipstick") < -0.6 and corr("Heavy_Makeup") < -0.5 and corr("Arched_Eyebrows") < -0.2
    assert corr("No_Beard") < -0.4 and corr("5_o_Clock_Shadow") > 0.3
    assert abs(corr("Blurry")) < 0.15 and 0.35 < a[:, col["Blurry"]].mean() < 0.65   # unrelated: both values occur
    # signal=0: no cue left
    r0 = write_tiny_celeba(tmp_path/"c0", n=200, img_shape=(24, 20), seed=3, signal=0.0)
    d0 = CelebA(r0, split="all", size=8); x0 = torch.stack([d0[i][0] for i in range(len(d0))])
    cue0 = (x0[:, 2] - x0[:, 0]).mean((1, 2)).numpy(); m0 = d0.attrs[:, col["Male"]].numpy()
    assert abs(np.corrcoef(cue0, m0)[0, 1]) < 0.3
    with pytest.raises(ValueError, match="`n`"): write_tiny_celeba(tmp_path/"bad", n=0)
    with pytest.raises(ValueError, match="`signal`"): write_tiny_celeba(tmp_path/"bad", signal=-1.0)


def test_centre_crop_keeps_the_middle(tmp_path):
    from PIL import Image
    a = np.zeros((40, 20, 3), np.uint8); a[10:30] = 255          # white band = the central square of a 40×20 image
    Image.fromarray(a).save(tmp_path/"x.png")
    x = load_face_image(tmp_path/"x.png", 8)
    assert x.shape == (3, 8, 8) and x.min() > 0.99


def test_celeba_hq_and_malformed_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="CelebAMask-HQ-attribute-anno.txt"): CelebAHQ(tmp_path)
    root = write_tiny_celeba(tmp_path/"hq", n=10, hq=True, img_shape=(64, 64))
    ds = CelebAHQ(root, size=32)
    assert len(ds) == 10 and ds[9][0].shape == (3, 32, 32) and ds[9][1].shape == (40,)
    assert len(CelebAHQ(root, split="test")) == 2
    bad = root/"CelebAMask-HQ-attribute-anno.txt"; lines = bad.read_text().splitlines(); lines[3] += " 1"
    bad.write_text("\n".join(lines))
    with pytest.raises(ValueError, match="expected a file name and 40 values"): CelebAHQ(root)


def test_age_table(tmp_path):
    import pandas as pd
    from PIL import Image
    (tmp_path/"imgs").mkdir()
    for i in range(3): Image.fromarray(np.full((30, 50, 3), 40*i, np.uint8)).save(tmp_path/"imgs"/f"{i}.jpg")
    pd.DataFrame(dict(full_path=[f"imgs/{i}.jpg" for i in range(3)], age=[20, 35.5, 80])).to_csv(tmp_path/"t.csv", index=False)
    ds = AgeTable(tmp_path/"t.csv", size=24)
    x, y = ds[1]
    assert len(ds) == 3 and x.shape == (3, 24, 24) and abs(y.item() - 0.355) < 1e-6
    with pytest.raises(FileNotFoundError, match="age table"): AgeTable(tmp_path/"nope.csv")
    pd.DataFrame(dict(full_path=["imgs/9.jpg"], age=[3])).to_csv(tmp_path/"m.csv", index=False)
    with pytest.raises(FileNotFoundError, match="9.jpg"): AgeTable(tmp_path/"m.csv")
    pd.DataFrame(dict(full_path=["imgs/0.jpg"], years=[3])).to_csv(tmp_path/"c.csv", index=False)
    with pytest.raises(ValueError, match="`age`"): AgeTable(tmp_path/"c.csv")


# ---------------------------------------------------------------- brain
@pytest.fixture(scope="module")
def phantoms(tmp_path_factory):
    d = tmp_path_factory.mktemp("brain")
    tab = make_brain_phantoms(d, n_subjects=8, seed=1, shape=(72, 80, 72), voxel_size=(1.0, 1.0, 1.0))
    return d, tab


def test_phantom_extraction_recovers_volumes(phantoms):
    import pandas as pd
    d, tab = phantoms
    info = pd.read_csv(tab)
    assert (info.diagnosis == "AD").sum() == 2
    rois = load_brain_rois(tab, size=64, cache_dir=d/"cache")
    assert rois["image"].shape == (16, 1, 64, 64, 64) and rois["image"].dtype == np.float32
    assert rois["image"].min() == 0 and rois["image"].max() == 1
    np.testing.assert_allclose(rois["volume"], info[["volume_left_mm3", "volume_right_mm3"]].to_numpy().ravel(), rtol=1e-6)
    np.testing.assert_allclose(rois["mask"].sum((1, 2, 3, 4)), rois["volume"], rtol=1e-6)   # 1 mm voxels, mask fits the ROI
    assert (rois["mask_dilated"] >= rois["mask"]).all()
    assert (rois["mask_dilated"].sum((1, 2, 3, 4)) > 1.5*rois["mask"].sum((1, 2, 3, 4))).all()
    # mirrored right ROIs look like left ones: the ventricle next to the hippocampus is on the same side
    left, right = rois["mask"][0::2, 0], rois["mask"][1::2, 0]
    img = rois["image"][:, 0]
    lo_side = img[:, :28].mean((1, 2, 3)); hi_side = img[:, 36:].mean((1, 2, 3))
    assert (np.sign(lo_side - hi_side)[0::2] == np.sign(lo_side - hi_side)[1::2]).all()
    # hippocampus is centred in its ROI
    c = np.argwhere(left[0]).mean(0); assert np.abs(c - 31.5).max() < 1.5
    # LAS subjects (odd) give the same ROIs as a RAS one of the same geometry up to noise: masks agree in shape
    assert left.sum((1, 2, 3)).min() > 0 and right.sum((1, 2, 3)).min() > 0
    # cached second call
    again = load_brain_rois(tab, size=64, cache_dir=d/"cache")
    np.testing.assert_array_equal(again["image"], rois["image"]); assert again["subject"][0] == "sub-0000"


def test_brain_split_sampler_augmentation(phantoms):
    d, tab = phantoms
    rois = load_brain_rois(tab, size=32, cache_dir=False)
    sp = subject_split(rois["subject"], rois["label"], test_frac=0.25, seed=0)
    assert not set(rois["subject"][sp["train"]]) & set(rois["subject"][sp["test"]])
    assert rois["label"][sp["test"]].sum() == 2 and len(sp["test"]) == 6     # 1 of 2 AD and 2 of 6 CN subjects
    w = class_weights(rois["label"][sp["train"]])
    assert abs(w[rois["label"][sp["train"]] == 1].sum() - w[rois["label"][sp["train"]] == 0].sum()) < 1e-9
    sampler = torch.utils.data.WeightedRandomSampler(w, 2_000, generator=torch.Generator().manual_seed(0))
    drawn = rois["label"][sp["train"]][list(sampler)]
    assert 0.4 < drawn.mean() < 0.6
    ds = BrainROIDataset(rois, sp["train"], target="volume", n_aug=10, with_masks=True, seed=3)
    assert len(ds) == 10*len(sp["train"])
    x0, m0, _, v0 = ds[0]; x1, m1, _, v1 = ds[1]
    assert v0 == v1 and not torch.equal(x0, x1) and x0.min() >= 0 and x0.max() <= 1
    # a ≤10° rotation about the ROI centre keeps most of the hippocampus mask in place
    m = torch.as_tensor(rois["mask"][sp["train"][0]])
    assert (m0 & m).sum() > 0.5*m.sum() and abs(int(m0.sum()) - int(m.sum())) < 0.25*m.sum()
    plain = BrainROIDataset(rois, sp["train"])
    assert torch.equal(plain[0][0], torch.as_tensor(rois["image"][sp["train"][0]]))
    with pytest.raises(ValueError, match="`target`"): BrainROIDataset(rois, target="age")


def test_brain_errors(tmp_path, phantoms):
    import pandas as pd, nibabel as nib
    d, tab = phantoms
    with pytest.raises(FileNotFoundError, match="subject table"): load_brain_rois(tmp_path/"x.csv")
    df = pd.read_csv(tab)
    df.assign(diagnosis="CN").to_csv(tmp_path/"cn.csv", index=False)
    with pytest.raises(ValueError, match="no AD subjects"): read_subject_table(tmp_path/"cn.csv")
    df.assign(diagnosis="MCI").to_csv(tmp_path/"mci.csv", index=False)
    with pytest.raises(ValueError, match="CN or AD"): read_subject_table(tmp_path/"mci.csv")
    df.assign(t1=str(d/df.t1[0])).iloc[:0].to_csv(tmp_path/"empty.csv", index=False)
    with pytest.raises(ValueError, match="no CN subjects"): read_subject_table(tmp_path/"empty.csv")
    # an aseg without the right hippocampus
    seg = nib.load(str(d/df.aseg[0])); a = np.asarray(seg.dataobj).copy(); a[a == 53] = 0
    nib.save(nib.Nifti1Image(a, seg.affine), str(tmp_path/"aseg.nii.gz"))
    df2 = df.iloc[:2].assign(t1=[str(d/p) for p in df.t1[:2]], aseg=[str(tmp_path/"aseg.nii.gz"), str(d/df.aseg[1])],
                             diagnosis=["AD", "CN"])
    df2.to_csv(tmp_path/"noh.csv", index=False)
    with pytest.raises(ValueError, match="sub-0000: `aseg` has no right hippocampus"): load_brain_rois(tmp_path/"noh.csv", cache_dir=False)
    df2.assign(t1=str(tmp_path/"missing.nii.gz")).to_csv(tmp_path/"miss.csv", index=False)
    with pytest.raises(FileNotFoundError, match="missing.nii.gz"): load_brain_rois(tmp_path/"miss.csv", cache_dir=False)
    with pytest.raises(ValueError, match="NaN"): extract_hippocampus_rois(np.full((8, 8, 8), np.nan), np.zeros((8, 8, 8), int))
    with pytest.raises(ValueError, match="`n_subjects`"): make_brain_phantoms(tmp_path, n_subjects=1)
