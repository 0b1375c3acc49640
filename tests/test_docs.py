"""Docs: the README/index reproductions table agrees with the result files, tables are not broken, the layout table in
the index matches the package's imports, and the offline preview of the site builds without raw directives, raw front
matter or broken local links (tools/docs_preview.py; skipped with the reason when its `docs` extra or npm is missing)."""
import ast, importlib.util, json, re, shutil, sys
from pathlib import Path
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT/"tools"))
import results_table, make_readme  # noqa: E402

MODULES = sorted(p.stem for p in (ROOT/"diffexplain").glob("*.py") if not p.stem.startswith("_"))


def index_cells():
    return [("".join(c["source"]), c) for c in json.loads((ROOT/"nbs"/"index.ipynb").read_text())["cells"]]


# --- reproductions table from the result files ---------------------------------------------------------------------

def test_index_and_readme_match_result_files():
    "The index's reproductions section is the template filled from the committed results, and README.md is the index."
    text = results_table.render()
    cells = [s for s, c in index_cells() if c["cell_type"] == "markdown" and s.startswith(results_table.MARK)]
    assert cells == [text], "nbs/index.ipynb disagrees with reproductions/results/: run python tools/make_readme.py"
    assert (ROOT/"README.md").read_text() == make_readme.render(), "README.md is stale: run python tools/make_readme.py"


def test_table_changes_with_the_result_files(tmp_path):
    "A number in a result file reaches the table; a missing file or row is an error naming the placeholder."
    res = tmp_path/"quick"; shutil.copytree(results_table.RESULTS, res)
    before = results_table.render(results=res)
    assert "ellipse acc. 0.974" in before
    f = res/"table8"/"table8.csv"
    f.write_text(f.read_text().replace("ellipse accuracy,0.9735", "ellipse accuracy,0.5123"))
    after = results_table.render(results=res)
    assert "ellipse acc. 0.512" in after and "ellipse acc. 0.974" not in after
    (res/"figure10"/"figure10.csv").unlink()
    with pytest.raises(ValueError, match="figure10/figure10.csv"): results_table.render(results=res)


def test_placeholder_formats():
    f = results_table.fmt
    assert (f(9.999e-5, "p"), f(0.479, "p"), f(0.00642, "e1"), f(3.4e-7, "e2")) == ("< 0.001", "0.48", "6.4e-3", "3.40e-7")
    assert (f("0.278 – 0.300", "ci"), f(True, "bool:yes/no"), f("False", "bool:yes/no"), f(0.2414, "+.2f")) == \
           ("[0.278, 0.300]", "yes", "no", "+0.24")
    assert (f(-0.0003, ".2f"), f(-0.013, ".2f")) == ("0.00", "-0.01")
    with pytest.raises(ValueError): f(float("nan"), ".3f")


def test_template_numbers_come_from_files():
    "In the ours and paper columns of the template every decimal number is a placeholder (no hand-typed results)."
    rows = [l for l in results_table.TEMPLATE.read_text().splitlines() if l.startswith("| `")]
    assert len(rows) >= 25
    for row in rows:
        cells = re.split(r"(?<!\\)\|(?![^{]*\}\})", row)[1:-1]
        assert len(cells) == 6, row[:60]
        for cell in cells[3:5]:
            bare = results_table.PLACEHOLDER.sub("", cell)
            assert not re.search(r"\d\.\d|\d+e-\d", bare), f"hand-typed number in {row[:40]}: {bare}"


def test_tables_are_not_broken():
    "Every markdown table row in the index and README has as many cells as its header (no unescaped |)."
    assert results_table.table_problems("| a | b |\n|---|---|\n| \\|x\\| | y |") == []
    assert results_table.table_problems("| a | b |\n|---|---|\n| |x| | y |")       # the check can fail
    for s, c in index_cells():
        if c["cell_type"] == "markdown": assert results_table.table_problems(s) == [], s[:60]
    assert results_table.table_problems((ROOT/"README.md").read_text()) == []


def test_chapter_tables_are_not_broken():
    "No markdown table in a chapter or guide has a row with an unescaped | (e.g. |x| inside math: use \\lvert x \\rvert)."
    bad = {}
    for f in sorted((ROOT/"nbs").rglob("*.ipynb")):
        if ".ipynb_checkpoints" in f.parts: continue
        for c in json.loads(f.read_text())["cells"]:
            if c["cell_type"] == "markdown":
                b = results_table.table_problems("".join(c["source"]))
                if b: bad[f.name] = b
    assert not bad, bad


# --- layout: one-way imports ---------------------------------------------------------------------------------------

def layout_table() -> dict:
    "module -> set of modules it may import, from the index's layout table."
    text = next(s for s, c in index_cells() if s.startswith("## Layout"))
    allowed = {}
    for line in text.splitlines():
        m = re.match(r"\|[^|]*\|\s*`diffexplain\.(\w+)`\s*\|[^|]*\|(.*)\|\s*$", line)
        if m: allowed[m.group(1)] = set(re.findall(r"`(\w+)`", m.group(2)))
    return allowed


def imports_of(path: Path) -> set:
    "The diffexplain modules a file imports, anywhere in it (module level or inside functions)."
    out = set()
    for n in ast.walk(ast.parse(path.read_text())):
        if isinstance(n, ast.ImportFrom):
            mod = n.module or ""
            if n.level: out |= {mod.split(".")[0]} if mod else {a.name for a in n.names}
            elif mod.startswith("diffexplain."): out.add(mod.split(".")[1])
            elif mod == "diffexplain": out |= {a.name for a in n.names}
        elif isinstance(n, ast.Import):
            out |= {a.name.split(".")[1] for a in n.names if a.name.startswith("diffexplain.")}
    return out & set(MODULES)


def test_layout_table_lists_every_module():
    assert sorted(layout_table()) == MODULES


def test_layout_imports_are_one_way():
    "No module imports one that the index's layout table does not allow (core modules never import a study)."
    allowed = layout_table()
    bad = {m: sorted(imports_of(ROOT/"diffexplain"/f"{m}.py") - allowed.get(m, set()) - {m}) for m in MODULES}
    bad = {m: v for m, v in bad.items() if v}
    assert not bad, f"imports the layout table does not allow: {bad}"


def test_layout_check_can_fail(tmp_path):
    f = tmp_path/"m.py"
    f.write_text("from .ellipse_study import x\ndef g():\n    from diffexplain.face_study import y\nimport diffexplain.data\n")
    assert imports_of(f) == {"ellipse_study", "face_study", "data"}


# --- the site --------------------------------------------------------------------------------------------------------

def _docs_tools():
    for mod in ("sphinx", "myst_nb", "furo", "bs4", "yaml"):
        if importlib.util.find_spec(mod) is None:
            pytest.skip(f"{mod} is not installed: pip install -e '.[docs]'")
    import docs_preview
    return docs_preview


def test_site_checker_finds_problems(tmp_path):
    "check_site reports raw directives, front matter, show_doc calls, broken links and anchors, remote scripts."
    dp = _docs_tools()
    (tmp_path/"ok.html").write_text('<html><body><article><h2 id="x">x</h2></article></body></html>')
    assert dp.check_site(tmp_path) == []
    (tmp_path/"bad.html").write_text(
        '<html><head><script src="https://cdn.example/mj.js"></script></head><body><article>'
        '<pre>#| export\nx = 1</pre><p>--- output-file: scores.html title: Scores ---</p><p>show_doc(f)</p>'
        '<p>the noisy image $x_t$ at step t</p><p>use <code>#| slow</code> and the title: of a plot</p>'
        '<a href="missing.html">m</a><a href="ok.html#nope">n</a><a href="ok.html#x">fine</a>'
        '<a href="gone.html">skipped</a></article></body></html>')
    got = "\n".join(dp.check_site(tmp_path, unbuilt={"gone"}))
    for what in ["raw nbdev directive in a code block", "raw front matter", "visible show_doc", "TeX outside math", "$x_t$",
                 "remote script", "broken link missing.html", "broken anchor ok.html#nope"]:
        assert what in got, what
    assert "raw nbdev directive:" not in got          # `#| slow` in inline code and a prose "title:" are not problems
    assert "gone.html" not in got and "ok.html#x" not in got


def test_preview_builds_clean(tmp_path, monkeypatch):
    """A partial preview as on a fresh clone (index + chapter 07: ~15 s on 1 thread) renders math with the local MathJax,
    show_doc headings as anchors, the sidebar's sections, and passes check_site."""
    dp = _docs_tools()
    if shutil.which("npm") is None and not (dp.BUILD/"npm"/f"mathjax-{dp.MATHJAX}.tgz").exists():
        pytest.skip("npm is needed to fetch MathJax")
    monkeypatch.setattr(dp, "PROC", tmp_path/"_proc")      # process from scratch, as CI does
    only = ["index", "07_reproduce"]
    index = dp.build(only, out=tmp_path/"site")
    html = index.parent
    assert dp.FAILED == [] and dp.check_site(html, dp.unbuilt_pages(only)) == []
    assert (html/"_static"/"mathjax"/"es5"/"tex-chtml.js").exists()
    page = index.read_text()
    assert 'class="math' in page and "_static/mathjax/es5/tex-chtml.js" in page
    assert "Library" in page and "reproduce.html" in page                   # sidebar sections from sidebar.yml
    assert 'id="run-record"' in (html/"reproduce.html").read_text()         # show_doc headings become anchors


def test_quarto_filter_unlinks_signature_names():
    "The published site's Lua filter turns nbdev's [`name`](url) inside code blocks into `name`, leaving code alone."
    import subprocess, yaml
    assert "unlink_code.lua" in yaml.safe_load((ROOT/"nbs"/"_quarto.yml").read_text())["filters"]
    lua = shutil.which("lua5.4") or shutil.which("lua")
    if lua is None: pytest.skip("no lua interpreter (apt-get install lua5.4) to run nbs/unlink_code.lua")
    src = "x, # defaults to [`default_cache_dir()`](https://h/data.html#d) and [`a.b`](u#c)\ny = f[0](z)"
    out = subprocess.run([lua, "-e", f'dofile("nbs/unlink_code.lua"); io.write(unlink_code_names([[{src}]]))'],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out == "x, # defaults to default_cache_dir() and a.b\ny = f[0](z)"
    paths = ["../reproductions/results/quick/figure5/figure5.png", "../../reproductions/results/a.png", "attachment:x.png"]
    out = subprocess.run([lua, "-e", 'dofile("nbs/unlink_code.lua"); for _, p in ipairs({' + ", ".join(f'"{p}"' for p in paths)
                          + '}) do io.write(results_image_path(p), "\\n") end'], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    assert out.split() == ["reproductions/results/quick/figure5/figure5.png", "../reproductions/results/a.png", "attachment:x.png"]


def test_quarto_pre_render_copies_result_figures(tmp_path):
    "The pre-render step copies reproductions/results/**/*.png into the Quarto project (the rendered _proc/)."
    import subprocess, yaml
    assert yaml.safe_load((ROOT/"nbs"/"_quarto.yml").read_text())["project"]["pre-render"] == "../tools/quarto_copy_figures.py"
    (tmp_path/"_proc").mkdir(); fig = tmp_path/"reproductions"/"results"/"quick"/"figure5"/"figure5.png"
    fig.parent.mkdir(parents=True); fig.write_bytes(b"png")
    subprocess.run([sys.executable, str(ROOT/"tools"/"quarto_copy_figures.py")], cwd=tmp_path/"_proc", check=True,
                   env={"QUARTO_PROJECT_DIR": str(tmp_path/"_proc"), "PATH": "/usr/bin:/bin"})
    assert (tmp_path/"_proc"/"reproductions"/"results"/"quick"/"figure5"/"figure5.png").read_bytes() == b"png"
