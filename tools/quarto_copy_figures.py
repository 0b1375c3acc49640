"""Quarto pre-render step (nbs/_quarto.yml: project.pre-render). Chapters embed the committed result figures with links
such as ../reproductions/results/quick/figure5/figure5.png, which lie outside the Quarto project (nbdev renders _proc/,
a copy of nbs/), so Quarto would not publish them. This copies every PNG under reproductions/results/ into the
project; the filter nbs/unlink_code.lua points the links at the copies. (It lives in tools/ because nbdev copies
nbs/*.py into _proc/ without their suffix.)"""
import os, shutil
from pathlib import Path

project = Path(os.environ.get("QUARTO_PROJECT_DIR", ".")).resolve()
results = project.parent/"reproductions"/"results"
for png in sorted(results.rglob("*.png")):
    dest = project/"reproductions"/"results"/png.relative_to(results)
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy2(png, dest)
