"""Offline preview of the docs site, built from the same processed notebooks as `nbdev_docs`.

The published site is built by `nbdev_docs` (Quarto) in GitHub Actions (`.github/workflows/deploy.yaml`). Quarto is a
standalone binary that is not on PyPI as a wheel (the `quarto-cli` package downloads it while installing), so this
script gives a preview that installs from PyPI and npm alone:

1. nbdev's docs processor (what `nbdev_proc_nbs` runs on each notebook) writes the processed notebooks to `_proc/`
   (what Quarto renders: `show_doc` outputs, doc links);
2. each processed notebook is turned into a plain notebook with what Quarto would do to it done by hand: the front
   matter becomes the title, cell directives (`#| echo: false`, `#| include: false`, ...) become Sphinx cell tags and
   are removed from the code, links to the site (`https://<doc_host>/<page>.html#name`) and to other notebooks
   (`04_scores.ipynb`) become relative links to the preview's pages, and links inside signature code blocks become
   their text;
3. Sphinx renders them with MyST-NB (stored outputs, nothing is executed) and the Furo theme; the sidebar is the
   toctree built from `nbs/sidebar.yml`; math is rendered by MathJax 3 unpacked from the npm registry into the build,
   so pages render TeX with the network off.

Usage: `python tools/docs_preview.py` (all pages, opens the browser unless `--no-open`);
`python tools/docs_preview.py --only index 04_scores --no-open` builds a few pages.
Needs the `docs` extra (`pip install -e ".[docs]"`) and `npm` for MathJax."""
import argparse, base64, configparser, json, os, re, shutil, subprocess, sys, tarfile, time, webbrowser
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NBS, PROC = ROOT/"nbs", ROOT/"_proc"
BUILD = ROOT/"_preview"
MATHJAX = "3.2.2"   # pinned npm version of MathJax
DIRECTIVE = re.compile(r"^\s*#\|\s*([\w-]+)\s*:?\s*(.*?)\s*$")


def site_url() -> str:
    "The published site's base URL from settings.ini (doc_host + doc_baseurl), with a trailing slash."
    cfg = configparser.ConfigParser(); cfg.read(ROOT/"settings.ini")
    d = cfg["DEFAULT"]
    return d["doc_host"].rstrip("/") + "/" + d.get("doc_baseurl", "").strip("/") + "/"


def page_name(nb: Path) -> str:
    "The page a notebook becomes, as nbdev names it: folder kept, leading number removed (`04_scores` -> `scores`)."
    rel = nb.relative_to(NBS) if nb.is_absolute() and NBS in nb.parents else Path(nb)
    stem = re.sub(r"^\d+[a-zA-Z0-9]*_", "", rel.stem)
    return (rel.parent/stem).as_posix()


def read_sidebar(path=NBS/"sidebar.yml") -> list:
    "[(section caption or None, [notebook paths relative to nbs/])] in the order of `sidebar.yml`."
    import yaml
    contents = yaml.safe_load(Path(path).read_text())["website"]["sidebar"]["contents"]
    out, top = [], []
    for item in contents:
        if isinstance(item, str): top.append(item)
        elif isinstance(item, dict) and "section" in item:
            out.append((item["section"], [c for c in item.get("contents", []) if isinstance(c, str)]))
        else: raise ValueError(f"sidebar.yml: unsupported entry {item!r}")
    return [(None, top)] + out


def make_id(anchor: str) -> str:
    "The HTML id docutils gives a heading or target (`group_stats` -> `group-stats`)."
    from docutils.nodes import make_id as _make_id
    return _make_id(anchor)


def _rel(target_page: str, from_page: str) -> str:
    return os.path.relpath(target_page + ".html", str(Path(from_page).parent) or ".").replace(os.sep, "/")


_FENCE = re.compile(r"```.*?```", re.S)
_MDLINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def fix_markdown(text: str, page: str, nb_dir: Path, files: dict) -> str:
    """Rewrite one markdown text of page `page` for the preview: links to the site and to notebooks become relative
    page links, markdown links inside code fences become their text, Pandoc link attributes are dropped, and images
    with relative paths are collected in `files` (source -> path in the build)."""
    base = site_url()
    def unlink(m): return m.group(1).strip("`")
    text = _FENCE.sub(lambda f: _MDLINK.sub(unlink, f.group(0)), text)
    text = re.sub(r"(\]\([^)\s]+\))\{[^}]*\}", r"\1", text)          # [source](url){target="_blank" ...}
    def link(m):
        label, url = m.group(1), m.group(2)
        img = m.start() > 0 and m.string[m.start() - 1] == "!"
        if url.startswith(base):
            tgt, _, anchor = url[len(base):].partition("#")
            tgt = re.sub(r"\.html$", "", tgt) or "index"
            return f"[{label}]({_rel(tgt, page)}" + (f"#@@{anchor}@@)" if anchor else ")")
        if re.match(r"^[a-z][a-z0-9+.-]*:", url) or url.startswith("#"): return m.group(0)
        path, _, anchor = url.partition("#")
        if path.endswith(".ipynb"):
            tgt = page_name((nb_dir/path).resolve())
            return f"[{label}]({_rel(tgt, page)}" + (f"#@@{anchor}@@)" if anchor else ")")
        src = (nb_dir/path).resolve()
        if img and src.is_file():
            dest = "_files/" + src.relative_to(ROOT).as_posix()
            files[src] = dest
            return f"[{label}]({os.path.relpath(dest, str(Path(page).parent) or '.')})"
        return m.group(0)
    return _MDLINK.sub(link, text)


def convert(proc_nb: Path, src_dir: Path, files: dict) -> str:
    "Write the preview notebook for one processed notebook into `src_dir`; returns its page name."
    import yaml
    rel = proc_nb.relative_to(PROC)
    page, nb_dir = page_name(NBS/rel), (NBS/rel).parent
    nb = json.loads(proc_nb.read_text())
    cells, title, desc = [], None, None
    for c in nb["cells"]:
        src = "".join(c["source"])
        if c["cell_type"] == "raw":
            if src.lstrip().startswith("---"):
                fm = yaml.safe_load(src.strip().strip("-")) or {}
                title, desc = fm.get("title"), fm.get("description")
                of = fm.get("output-file")
                if of and (Path(page).parent/Path(of).stem).as_posix() != page:
                    raise ValueError(f"{rel}: output-file {of} is not the page name {page}")
            continue
        c = {k: v for k, v in c.items() if k in ("cell_type", "id", "metadata", "source", "outputs", "execution_count", "attachments")}
        c["metadata"] = dict(c.get("metadata", {}))
        if c["cell_type"] == "markdown":
            if src.startswith("<!-- WARNING: THIS FILE WAS AUTOGENERATED"): continue
            for name, data in c.pop("attachments", {}).items():      # cell attachments become files next to the page
                mime = next((m for m in data if m.startswith("image/")), None)
                if mime is None: continue
                dest = f"_files/{page}-{name}"
                files[base64.b64decode(data[mime])] = dest
                src = src.replace(f"attachment:{name}", os.path.relpath(dest, str(Path(page).parent) or "."))
            c["source"] = fix_markdown(src, page, nb_dir, files)
        elif c["cell_type"] == "code":
            lines, opts = src.splitlines(), {}
            while lines and DIRECTIVE.match(lines[0]):
                k, v = DIRECTIVE.match(lines.pop(0)).groups(); opts[k] = v.strip().lower()
            if opts.get("include") == "false" or "hide" in opts or opts.get("output") == "false" and opts.get("echo") == "false":
                continue
            tags = list(c["metadata"].get("tags", []))
            if opts.get("echo") == "false": tags.append("remove-input")
            if opts.get("output") == "false": tags.append("remove-output")
            c["metadata"]["tags"] = tags
            c["source"] = "\n".join(lines)
            outs = []
            for o in c.get("outputs", []):
                o = json.loads(json.dumps(o))
                if o.get("output_type") == "execute_result": o.setdefault("execution_count", None)
                md = o.get("data", {}).get("text/markdown")
                if md is not None:
                    md = re.sub(r"^\s*---\s*\n", "", "".join(md))   # show_doc's leading rule: a transition docutils rejects
                    o["data"]["text/markdown"] = fix_markdown(md, page, nb_dir, files)
                    o["data"].pop("text/plain", None)
                outs.append(o)
            c["outputs"] = outs
        cells.append(c)
    head = f"# {title or page}\n\n" + (f"> {desc}\n" if desc else "")
    cells.insert(0, {"cell_type": "markdown", "id": "preview-title", "metadata": {}, "source": head})
    out = src_dir/(page + ".ipynb")
    out.parent.mkdir(parents=True, exist_ok=True)
    nb["cells"] = cells
    out.write_text(json.dumps(nb, indent=1, ensure_ascii=False))
    return page


_HEAD = re.compile(r"^#{1,6}\s+(.+?)\s*$", re.M)
_ANCHOR = re.compile(r"\(([^()\s]*?)#@@(.+?)@@\)")


def resolve_anchors(src_dir: Path, pages: set) -> list:
    """Second pass over the converted pages: a link to `page#name` points at the heading `name` on that page (its
    docutils id), or at `Class` for an undocumented `Class.method`, or else at the page itself. Returns the links
    whose anchor had no heading (`page#name`), which Quarto would leave dangling too."""
    heads = {}
    for pg in pages:
        nb = json.loads((src_dir/(pg + ".ipynb")).read_text())
        texts = [c["source"] for c in nb["cells"] if c["cell_type"] == "markdown"]
        texts += [o["data"]["text/markdown"] for c in nb["cells"] for o in c.get("outputs", []) if "text/markdown" in o.get("data", {})]
        heads[pg] = {make_id(h) for t in texts for h in _HEAD.findall(t if isinstance(t, str) else "".join(t))}
    dangling = []
    for pg in pages:
        f = src_dir/(pg + ".ipynb")
        def fix(m):
            url, name = m.group(1), m.group(2)
            tgt = (Path(pg).parent/url).as_posix() if url else pg + ".html"
            tgt = re.sub(r"\.html$", "", os.path.normpath(tgt))
            known = heads.get(tgt)
            if known is None or make_id(name) in known: return f"({url}#{make_id(name)})"
            if "." in name and make_id(name.split(".")[0]) in known: return f"({url}#{make_id(name.split('.')[0])})"
            dangling.append(f"{tgt}#{name}")
            return f"({url or _rel(pg, pg)})"
        f.write_text(_ANCHOR.sub(fix, f.read_text()))
    return sorted(set(dangling))


def toctree(pages: set) -> str:
    "Hidden toctrees from sidebar.yml (only the pages being built), appended to the index page."
    parts = []
    for caption, nbs in read_sidebar():
        entries = [page_name(Path(n)) for n in nbs if page_name(Path(n)) in pages and page_name(Path(n)) != "index"]
        if not entries: continue
        parts.append("```{toctree}\n:hidden:\n" + (f":caption: {caption}\n" if caption else "") + "\n" + "\n".join(entries) + "\n```")
    return "\n\n".join(parts)


def mathjax(dest: Path, cache=BUILD/"npm") -> Path:
    "Unpack MathJax (npm package `mathjax@MATHJAX`, via `npm pack`) into `dest`; returns the path of tex-chtml.js."
    tgz = cache/f"mathjax-{MATHJAX}.tgz"
    if not tgz.exists():
        if shutil.which("npm") is None: raise RuntimeError("npm is needed to fetch MathJax (apt-get install npm)")
        cache.mkdir(parents=True, exist_ok=True)
        subprocess.run(["npm", "pack", f"mathjax@{MATHJAX}", "--silent"], cwd=cache, check=True, capture_output=True)
    with tarfile.open(tgz) as t:
        members = [m for m in t.getmembers() if m.name.startswith("package/es5/")]
        for m in members: m.name = m.name[len("package/"):]
        t.extractall(dest, members=members, filter="data")
    return dest/"es5"/"tex-chtml.js"


PREVIEW_CSS = """/* wide tables scroll inside the text column instead of spilling out of it */
article table.docutils, article .output table { display: block; overflow-x: auto; font-size: 0.8em; }
article .output table td, article .output table th { padding: 0.2em 0.5em; }
/* wide display equations scroll instead of being cut off */
article mjx-container[display="true"] { overflow-x: auto; overflow-y: hidden; max-width: 100%; }
/* show_doc's [source] link floats right of the function heading, as on the Quarto site */
article p:has(> a.reference.external[href*="/blob/"]:only-child) { float: right; font-size: smaller; margin: 0.2em 0 0 1em; }
"""

CONF = '''
project = {title!r}
extensions = ["myst_nb"]
html_theme = "furo"
html_title = {title!r}
html_static_path = ["_static"]
html_css_files = ["styles.css", "preview.css"]
nb_execution_mode = "off"
nb_render_markdown_format = "myst"
nb_merge_streams = True
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_dmath_double_inline = True
myst_all_links_external = True
mathjax_path = "mathjax/es5/tex-chtml.js"
exclude_patterns = ["_build", "_static", "_files", "**.ipynb_checkpoints"]
suppress_warnings = ["myst.header", "mystnb.unknown_mime_type", "misc.highlighting_failure"]
'''


FAILED = []   # the notebooks the last build could not process

_PROC_SCRIPT = """import sys
from pathlib import Path
from nbdev.serve import FilterDefaults
import nbdev.serve_drv as drv
for src, dst in zip(sys.argv[1::2], sys.argv[2::2]):
    Path(dst).parent.mkdir(parents=True, exist_ok=True)
    try: drv.main((Path(src), Path(dst), FilterDefaults))
    except Exception as e: print(f"FAILED {src}: {type(e).__name__}: {e}", file=sys.stderr)
"""


def process(notebooks, quiet=True) -> list:
    """Run nbdev's docs processor on the notebooks (paths relative to nbs/) whose `_proc/` copy is missing or older.
    This is what `nbdev_proc_nbs` does for each notebook, without its other steps (it first tries to install Quarto
    and re-processes every changed notebook whatever `--file_re` says). Returns the notebooks that failed, with the
    error (a chapter whose code is broken must not stop the preview of the others)."""
    todo = []
    for n in notebooks:
        src, dst = NBS/n, PROC/n
        if not src.exists(): raise FileNotFoundError(f"{src} (listed in sidebar.yml) does not exist")
        if not dst.exists() or dst.stat().st_mtime < src.stat().st_mtime: todo += [str(src), str(dst)]
    failed = []
    if todo:
        env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
        r = subprocess.run([sys.executable, "-c", _PROC_SCRIPT, *todo], cwd=NBS, env=env, capture_output=True, text=True)
        if r.returncode: raise RuntimeError("processing the notebooks failed:\n" + r.stderr[-3000:])
        failed = [l[len("FAILED "):] for l in r.stderr.splitlines() if l.startswith("FAILED ")]
    return failed


def listed_notebooks(only=None) -> list:
    "The notebooks of sidebar.yml (relative to nbs/), or only those whose file stem is in `only` (plus the index)."
    listed = [n for _, nbs in read_sidebar() for n in nbs]
    return [n for n in listed if Path(n).stem in set(only) | {"index"}] if only else listed


def unbuilt_pages(only=None) -> set:
    "Pages of the full site that a build with `only` leaves out (links to them are not checked)."
    return {page_name(Path(n)) for n in listed_notebooks()} - {page_name(Path(n)) for n in listed_notebooks(only)}


def build(only=None, out=BUILD, proc=True, quiet=True) -> Path:
    """Process (unless `proc` is False), convert and render the notebooks of `sidebar.yml` (or only those whose file
    stem is in `only`, plus the index) into `out/html`; returns the path of index.html."""
    listed = listed_notebooks(only)
    t0 = time.time()
    failed = process(listed, quiet=quiet) if proc else []
    FAILED[:] = failed
    for f in failed: print(f"not processed (its last processed copy is used, if any): {f}", file=sys.stderr)
    if any(Path(f.split(":")[0]).name == "index.ipynb" for f in failed): raise RuntimeError(f"index.ipynb: {failed}")
    t1 = time.time()
    src, html = Path(out)/"src", Path(out)/"html"
    shutil.rmtree(src, ignore_errors=True); shutil.rmtree(html, ignore_errors=True)
    src.mkdir(parents=True)
    files, pages = {}, set()
    for n in listed:
        p = PROC/n
        if not p.exists():
            if failed: print(f"left out (never processed): {n}", file=sys.stderr); continue
            raise FileNotFoundError(f"{p} is missing: build without --no-proc")
        pages.add(convert(p, src, files))
    dangling = resolve_anchors(src, pages)
    idx = json.loads((src/"index.ipynb").read_text())
    idx["cells"].append({"cell_type": "markdown", "id": "preview-toctree", "metadata": {}, "source": toctree(pages)})
    (src/"index.ipynb").write_text(json.dumps(idx, indent=1, ensure_ascii=False))
    for s, d in files.items():                                     # a source path, or the bytes of an attachment
        (src/d).parent.mkdir(parents=True, exist_ok=True)
        (src/d).write_bytes(s) if isinstance(s, bytes) else shutil.copy2(s, src/d)
    static = src/"_static"; static.mkdir()
    shutil.copy2(NBS/"styles.css", static/"styles.css")
    (static/"preview.css").write_text(PREVIEW_CSS)
    mathjax(static/"mathjax")
    cfg = configparser.ConfigParser(); cfg.read(ROOT/"settings.ini")
    (src/"conf.py").write_text(CONF.format(title=cfg["DEFAULT"]["lib_name"]))
    (src/"index.ipynb").touch()
    r = subprocess.run([sys.executable, "-m", "sphinx", "-b", "html", "-q", "-j", "1", str(src), str(html)],
                       cwd=ROOT, capture_output=True, text=True)
    (Path(out)/"sphinx.log").write_text("links to names without a heading (linked to the page instead):\n"
                                        + "\n".join(dangling) + "\n\n" + r.stdout + r.stderr)
    if r.returncode: raise RuntimeError("sphinx-build failed:\n" + r.stderr[-3000:])
    print(f"preview: {len(pages)} pages, processing {t1 - t0:.0f} s, render {time.time() - t1:.0f} s "
          f"-> {html/'index.html'} (warnings in {Path(out)/'sphinx.log'})", file=sys.stderr)
    return html/"index.html"


def check_site(html_dir, unbuilt=()) -> list:
    """Problems a reader would see in the built pages: raw nbdev directives, raw front matter, visible `show_doc` calls,
    markdown links inside code blocks, TeX outside math, remote scripts, and local links (files and #anchors) that
    do not resolve (links to the `unbuilt` pages of a partial build are skipped). Returns a list of strings; empty
    when the site is clean."""
    from bs4 import BeautifulSoup
    from urllib.parse import urlsplit, unquote
    html_dir, problems, ids = Path(html_dir), [], {}
    pages = [p for p in html_dir.rglob("*.html") if "_static" not in p.parts and p.name not in ("genindex.html", "search.html")]
    soups = {p: BeautifulSoup(p.read_text(), "html.parser") for p in pages}
    def ids_of(p):
        if p not in ids:
            s = soups.get(p) or BeautifulSoup(p.read_text(), "html.parser")
            ids[p] = {t["id"] for t in s.find_all(id=True)}
        return ids[p]
    for p, soup in soups.items():
        name = p.relative_to(html_dir).as_posix()
        main = soup.find("article") or soup.body
        for s in main(["script", "style"]): s.extract()
        for tag in main.find_all(class_="math"): tag.extract()
        for pre in main.find_all("pre"):
            code = pre.get_text()
            if re.search(r"^\s*#\|", code, re.M): problems.append(f"{name}: raw nbdev directive in a code block")
            if re.search(r"\]\((https?:|[\w./-]+\.html)", code): problems.append(f"{name}: markdown link in a code block")
        for code in main.find_all(["pre", "code"]): code.extract()     # the prose a reader sees, without code
        text = main.get_text(" ")
        for pat, what in [(r"(^|\s)#\|\s*[\w-]+", "raw nbdev directive"),
                          (r"output-file:\s*\S+\.html", "raw front matter"),
                          (r"show_doc\(", "visible show_doc call"),
                          (r"\$\$|\\(mathrm|frac|mathbb|operatorname|hat|sum)\b|\$[^$\n]{0,60}[\\_^][^$\n]{0,60}\$", "TeX outside math")]:
            m = re.search(pat, text)
            if m: problems.append(f"{name}: {what}: {text[max(0, m.start() - 40):m.end() + 40]!r}")
        for s in soup.find_all("script", src=True):
            if urlsplit(s["src"]).scheme: problems.append(f"{name}: remote script {s['src']}")
        for tag, attr in [("a", "href"), ("img", "src"), ("link", "href"), ("script", "src")]:
            for t in soup.find_all(tag, **{attr: True}):
                u = urlsplit(t[attr])
                if u.scheme or u.netloc or t[attr].startswith("mailto:"): continue
                target = (p.parent/unquote(u.path)).resolve() if u.path else p
                if target.suffix == ".html" and html_dir.resolve() in target.parents and \
                   target.relative_to(html_dir.resolve()).with_suffix("").as_posix() in unbuilt: continue
                if not target.exists(): problems.append(f"{name}: broken link {t[attr]}"); continue
                if u.fragment and target.suffix == ".html" and u.fragment not in ids_of(target):
                    problems.append(f"{name}: broken anchor {t[attr]}")
    return problems


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", help="notebook stems to build (the index is always built)")
    ap.add_argument("--no-proc", action="store_true", help="reuse _proc/ as it is")
    ap.add_argument("--no-open", action="store_true", help="do not open the browser")
    a = ap.parse_args()
    index = build(a.only, proc=not a.no_proc)
    bad = check_site(index.parent, unbuilt_pages(a.only))
    for b in bad: print("problem:", b, file=sys.stderr)
    if not a.no_open: webbrowser.open(index.as_uri())
    sys.exit(1 if bad or FAILED else 0)
