"""Run each task guide (nbs/guides/) in its smoke size through `nbdev_test`, with a fresh model cache.

The guides choose their size from `DIFFEXPLAIN_GUIDE_SIZE` (smoke | quick); under `nbdev_test` the default is smoke.
Each smoke run trains its models for a few steps and checks real things (classifier accuracy, the shear test of the
slant feature, guidance moving the feature towards its targets, counterfactuals moving f(x') towards r)."""
import os, subprocess, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
GUIDES = sorted(p.name for p in (ROOT/"nbs"/"guides").glob("*.ipynb"))


def test_guides_exist():
    assert {"attribution_own_model.ipynb", "counterfactuals_own_regressor.ipynb"} <= set(GUIDES), GUIDES


@pytest.mark.parametrize("nb", GUIDES)
def test_guide_smoke(nb, tmp_path):
    "The guide runs top to bottom at smoke size (its own asserts pass) with an empty cache."
    env = dict(os.environ, DIFFEXPLAIN_GUIDE_SIZE="smoke", DIFFEXPLAIN_CACHE=str(tmp_path/"cache"), OMP_NUM_THREADS="1")
    r = subprocess.run(["nbdev_test", "--path", f"nbs/guides/{nb}", "--do_print"], cwd=ROOT, env=env,
                       capture_output=True, text=True)
    assert r.returncode == 0, f"nbdev_test failed for guides/{nb}:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"


@pytest.mark.parametrize("nb", GUIDES)
def test_guide_imports_core_only(nb):
    "A guide shows the methods on your own model: it imports diffexplain's core modules, never a study module."
    import json
    src = "\n".join("".join(c["source"]) for c in json.loads((ROOT/"nbs"/"guides"/nb).read_text())["cells"]
                    if c["cell_type"] == "code")
    for study in ("ellipse_study", "square_study", "brain_study", "face_study", "reproduce"):
        assert f"diffexplain.{study}" not in src and f"from .{study}" not in src, f"guides/{nb} imports {study}"
    assert "diffexplain." in src
