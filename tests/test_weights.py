"""The shipped weights (`diffexplain/weights/`, made by `tools/ship_weights.py`) match the current code and reproduce
their recorded numbers; with the store off the loaders train. Each test takes seconds (1 thread); nothing here trains a
quick model: a would-be training run is replaced by a stub that fails or records the call."""
import hashlib, importlib.util, json, os
from pathlib import Path
import numpy as np
import pytest
import torch
import diffexplain.diffusion
import diffexplain.ellipse_study as es
from diffexplain.data import shipped_dir, make_ellipses
from diffexplain.ellipse_study import ellipse_models, ellipse_ddpm, DDPM_PROFILES

torch.set_num_threads(1)
REPO = Path(__file__).resolve().parents[1]
STORE = REPO/"diffexplain"/"weights"
MANIFEST = json.loads((STORE/"MANIFEST.json").read_text())
_spec = importlib.util.spec_from_file_location("ship_weights", REPO/"tools"/"ship_weights.py")
ship_weights = importlib.util.module_from_spec(_spec); _spec.loader.exec_module(ship_weights)
RETRAIN = "re-ship the weights: python tools/ship_weights.py (see its docstring)"


class WouldTrain(Exception): pass

def _no_training(*a, **k): raise WouldTrain("a shipped model was not found under the current code's cache key; " + RETRAIN)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    "An empty cache with the quick ellipse data regenerated from its seed (no models)."
    d = tmp_path_factory.mktemp("cache"); make_ellipses(DDPM_PROFILES["quick"]["n"], seed=0, cache_dir=d); return d


@pytest.fixture
def store_on(monkeypatch):
    monkeypatch.delenv("DIFFEXPLAIN_SHIPPED", raising=False); monkeypatch.delenv("DIFFEXPLAIN_WEIGHTS", raising=False)


def test_manifest_hashes_match_files():
    assert shipped_dir().resolve() == STORE.resolve()                # the package's own store is the one the loaders read
    listed = {p for e in MANIFEST["entries"].values() for p in e["files"]}
    on_disk = {str(f.relative_to(STORE)) for f in STORE.rglob("*") if f.is_file() and f.name != "MANIFEST.json"}
    assert listed == on_disk, (listed ^ on_disk)
    for e in MANIFEST["entries"].values():
        for p, f in e["files"].items():
            assert hashlib.sha256((STORE/p).read_bytes()).hexdigest() == f["sha256"], p
    assert MANIFEST["total_bytes"] == sum((STORE/p).stat().st_size for p in listed) < 8e6   # a few MB
    assert {e["model"] for e in MANIFEST["entries"].values()} == {"classifier", "log_ar", "area", "ddpm"}


def test_classifiers_are_current_and_reproduce_test_metrics(cache, store_on, monkeypatch):
    "The current code's cache keys are the shipped entries' names, and the loaded models give the recorded test metrics."
    monkeypatch.setattr(es, "train_model", _no_training)
    ms = ellipse_models("quick", cache_dir=cache, progress=False)
    for key, m in ms.items():
        name = Path(m["path"]).name
        assert name in MANIFEST["entries"], f"{name} is not shipped; " + RETRAIN
        assert m["loaded"] and (Path(m["path"])/"shipped.json").exists()   # copied from the store, not trained
        rec = MANIFEST["entries"][name]
        assert rec["model"] == key and rec["config"] == json.loads(json.dumps(m["config"], sort_keys=True, default=str))
        for k, v in rec["test_metrics"].items():                     # on test images regenerated from the seed
            assert abs(m["metrics"][k] - v) <= 1e-4 * max(1, abs(v)), (key, k, m["metrics"][k], v)
    assert ms["classifier"]["metrics"]["accuracy"] > 0.9 and min(ms[k]["metrics"]["r2"] for k in ("log_ar", "area")) > 0.9


def test_ddpm_is_current_and_reproduces_its_check(cache, store_on, monkeypatch):
    monkeypatch.setattr(diffexplain.diffusion, "seed_everything", _no_training)  # the first call of a training run (train_diffusion is in the key)
    d = ellipse_ddpm("quick", cache_dir=cache, progress=False)
    name = Path(d["path"]).parent.name
    assert name in MANIFEST["entries"], f"{name} is not shipped; " + RETRAIN
    rec = MANIFEST["entries"][name]
    assert (d["loaded"], rec["sub"]) == (True, Path(d["path"]).name) and (Path(d["path"])/"shipped.json").exists()
    assert d["quality"] == rec["quality"]
    images = make_ellipses(DDPM_PROFILES["quick"]["n"], seed=0, cache_dir=cache)["images"]
    got = ship_weights.ddpm_check(d["unet"].cpu(), d["scheduler"], images, n=rec["ddpm_check"]["n"], seed=rec["ddpm_check"]["seed"])
    for k in ("eps_mse", "eps_mean", "eps_abs_mean"):
        assert abs(got[k] - rec["ddpm_check"][k]) <= 1e-4 * max(1e-2, abs(rec["ddpm_check"][k])), (k, got[k], rec["ddpm_check"][k])
    assert rec["ddpm_check"]["eps_mse"] < 0.1                         # a trained ε-model (an untrained one: ~1)


def test_store_off_trains(tmp_path, monkeypatch):
    "`DIFFEXPLAIN_SHIPPED=0` and an empty cache: the loaders train, for the quick keys too."
    monkeypatch.setenv("DIFFEXPLAIN_SHIPPED", "0")
    calls = []
    def fake_train(net, *a, **k): calls.append(1); return net, []
    monkeypatch.setattr(es, "train_model", fake_train)                # the quick classifier would train (stubbed: seconds)
    m = ellipse_models("quick", cache_dir=tmp_path/"q", which=("classifier",), progress=False)["classifier"]
    assert (len(calls), m["loaded"], Path(m["path"]).name in MANIFEST["entries"]) == (1, False, True)
    monkeypatch.setattr(diffexplain.diffusion, "seed_everything", _no_training)  # the first call of a training run (train_diffusion is in the key)
    with pytest.raises(WouldTrain): ellipse_ddpm("quick", cache_dir=tmp_path/"q", progress=False)
    monkeypatch.undo(); monkeypatch.setenv("DIFFEXPLAIN_SHIPPED", "0")
    m = ellipse_models("smoke", cache_dir=tmp_path/"s", which=("classifier",), progress=False)["classifier"]   # real training
    assert (m["loaded"], len(m["history"])) == (False, 2)
