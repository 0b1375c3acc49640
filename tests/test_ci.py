"""The README's test command is exactly what CI runs."""
import pathlib, re

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT/"README.md").read_text()
    ci = (ROOT/".ci/run").read_text()
    m = re.search(r"^TEST_COMMAND='(.+)'$", ci, re.M)
    assert m, ".ci/run must define TEST_COMMAND='...'"
    assert m.group(1) in readme, f"README.md does not show the test command CI runs: {m.group(1)}"


def test_readme_is_generated_from_index():
    "Every markdown cell of nbs/index.ipynb appears in README.md (run tools/make_readme.py after editing it)."
    import json
    nb = json.loads((ROOT/"nbs/index.ipynb").read_text())
    readme = (ROOT/"README.md").read_text()
    for c in nb["cells"]:
        if c["cell_type"] == "markdown":
            assert "".join(c["source"]).strip() in readme, "README.md is stale: run `python tools/make_readme.py`"


def test_sidebar_lists_every_chapter():
    "nbs/sidebar.yml (used by Quarto for the docs site) names every chapter notebook, and only files that exist."
    import re
    side = (ROOT/"nbs"/"sidebar.yml").read_text()
    listed = re.findall(r"-\s+([\w.-]+\.ipynb)", side)
    chapters = sorted(p.name for p in (ROOT/"nbs").glob("*.ipynb"))
    assert sorted(set(listed)) == chapters, f"sidebar.yml lists {sorted(set(listed))}, nbs/ holds {chapters}"
