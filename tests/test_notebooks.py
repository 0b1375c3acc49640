"""Run every library notebook through `nbdev_test` (which prints no summary of its own) and check that the
notebooks and the exported package agree, as CI's clean -> no diff -> export -> no diff order asks."""
import filecmp, shutil, subprocess, sys, pathlib
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
NBS = sorted(p.name for p in (ROOT/"nbs").glob("[0-9]*.ipynb")) + ["index.ipynb"]


@pytest.mark.parametrize("nb", NBS)
def test_notebook_runs(nb):
    "Each notebook executes top to bottom under nbdev_test (slow/cuda cells skipped)."
    r = subprocess.run(["nbdev_test", "--path", f"nbs/{nb}", "--do_print"], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 0, f"nbdev_test failed for {nb}:\n{r.stdout[-6000:]}\n{r.stderr[-6000:]}"


def _copy_repo(tmp_path):
    dst = tmp_path/"repo"
    shutil.copytree(ROOT, dst, ignore=shutil.ignore_patterns(".git", "cache", "results", "_proc", "_docs",
                                                                "__pycache__", "*.egg-info", ".whl", "data"))
    return dst


def _diff_trees(a, b):
    "Relative paths of files that differ between two folders (recursively)."
    out = []
    def walk(c, rel=""):
        out.extend(rel + f for f in c.diff_files + c.left_only + c.right_only)
        for name, sub in c.subdirs.items(): walk(sub, rel + name + "/")
    walk(filecmp.dircmp(a, b, ignore=["__pycache__"]))
    return out


def test_export_leaves_package_unchanged(tmp_path):
    "`nbdev_export` on a copy of the repo reproduces the committed `diffexplain/` byte for byte."
    dst = _copy_repo(tmp_path)
    r = subprocess.run(["nbdev_export"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diff = _diff_trees(ROOT/"diffexplain", dst/"diffexplain")
    assert not diff, f"nbdev_export changed these files; run it and commit the result: {diff}"


def test_notebooks_are_clean(tmp_path):
    "`nbdev_clean` changes nothing (no stray outputs metadata), and papermill `parameters` tags survive it."
    dst = _copy_repo(tmp_path)
    r = subprocess.run(["nbdev_clean", "--fname", "nbs"], cwd=dst, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    diff = _diff_trees(ROOT/"nbs", dst/"nbs")
    diff = [d for d in diff if d.endswith(".ipynb")]
    assert not diff, f"nbdev_clean changed these notebooks; run `nbdev_clean` and commit: {diff}"
