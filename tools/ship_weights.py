"""Make the shipped-weights store `diffexplain/weights/` from the project's own code.

Trains (or, with `--cache-dir cache`, reuses) the quick-profile ellipse models of the attribution paper's study
(classifier, log-aspect-ratio and area regressors: `ellipse_models("quick")`; the small DDPM: `ellipse_ddpm("quick")`),
then copies into the store only what the loaders read, under the cache entries' own names (name + config hash, the hash
covering the code version of builder and training loop):

- classifier / regressors: `model.safetensors`, `config.json`, `meta.json` (training history);
- DDPM: `ema-step<N>/` with the EMA weights (`diffusion_pytorch_model.safetensors`), `config.json`, `train.json` and the
  quality samples `ellipse_ddpm` would otherwise regenerate on first use (256 samples x 100 steps, ~4 min on one CPU
  thread); no optimizer state, no training checkpoints.

Each entry gets a `shipped.json` (what the loaders report as `shipped=True`), and the store a `MANIFEST.json`: per entry
its config, code version, training and test metrics, and sha256 of every file; plus the command, versions and timings.
tests/test_weights.py checks the store against the current code.

    python tools/ship_weights.py                       # from scratch in a fresh temporary cache (the reproducible way)
    python tools/ship_weights.py --cache-dir cache     # reuse entries already trained under the current code keys

Measured from scratch (`--out /tmp/ship_fresh/weights`, 1 thread, a 2-core machine shared with other jobs): 2175 s
(classifier + two regressors 997 s, DDPM training 959 s, its quality samples 214 s); all four weight files came out
bit-identical to the committed ones (sha256), and so did the quality samples (the .npz differs only in its recorded
sampling time).
"""
from __future__ import annotations
import argparse, hashlib, json, os, platform, shutil, subprocess, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DDPM_CHECK = dict(n=16, seed=0) # the fixed batch of `ddpm_check`


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""): h.update(b)
    return h.hexdigest()


def ddpm_check(unet, scheduler, images, n: int = DDPM_CHECK["n"], seed: int = DDPM_CHECK["seed"]) -> dict:
    "ε-prediction of `unet` on a fixed seeded batch: the first `n` images noised at evenly spaced timesteps."
    import torch
    from diffexplain.diffusion import to_model_range
    g = torch.Generator().manual_seed(seed)
    x0 = to_model_range(torch.as_tensor(images[:n]).float())
    noise = torch.randn(x0.shape, generator=g)
    t = torch.linspace(0, scheduler.config.num_train_timesteps - 1, n).round().long()
    with torch.no_grad(): e = unet(scheduler.add_noise(x0, noise, t), t).sample.double()
    return dict(n=n, seed=seed, eps_mse=float((e - noise.double()).pow(2).mean()), eps_mean=float(e.mean()),
                eps_abs_mean=float(e.abs().mean()))


def git_commit() -> str|None:
    try:
        c = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=REPO, capture_output=True, text=True).stdout.strip()
        return c + ("+dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError): return None


def files_of(folder: Path, root: Path) -> dict:
    return {str(f.relative_to(root)): dict(sha256=sha256(f), bytes=f.stat().st_size) for f in sorted(folder.rglob("*")) if f.is_file()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cache-dir", default=None, help="where the models are trained/looked up (default: a fresh temporary folder)")
    ap.add_argument("--out", default=str(REPO/"diffexplain"/"weights"), help="the store to (re)write")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    a = ap.parse_args(argv)
    os.environ["DIFFEXPLAIN_SHIPPED"] = "0" # never take models from the store we are making
    import torch
    torch.set_num_threads(a.threads)
    from diffexplain.data import make_ellipses
    from diffexplain.ellipse_study import ellipse_models, ellipse_ddpm, ELLIPSE_PROFILES, DDPM_PROFILES
    tmp_cache = None
    if a.cache_dir is None: tmp_cache = a.cache_dir = tempfile.mkdtemp(prefix="ship-weights-cache-")
    cache, out = Path(a.cache_dir), Path(a.out)
    log = lambda s: print(f"[ship_weights {time.strftime('%H:%M:%S')}] {s}", file=sys.stderr, flush=True)
    log(f"cache {cache}, out {out}, {a.threads} thread(s)")
    timings, t0 = {}, time.time()
    ms = ellipse_models("quick", cache_dir=cache, device=a.device, progress=True)
    timings["ellipse_models_s"] = time.time() - t0
    loaded = ", ".join(f"{k}: loaded {v['loaded']}" for k, v in ms.items())
    log(f"ellipse models ({loaded}) in {timings['ellipse_models_s']:.0f} s")
    t1 = time.time()
    d = ellipse_ddpm("quick", cache_dir=cache, device=a.device, num_threads=a.threads, progress=True)
    timings["ellipse_ddpm_s"] = time.time() - t1
    log(f"DDPM (loaded {d['loaded']}) in {timings['ellipse_ddpm_s']:.0f} s (training {d['train_s']} s, quality samples {d['sample_s']:.0f} s)")
    images = make_ellipses(DDPM_PROFILES["quick"]["n"], seed=0, cache_dir=cache)["images"]
    unet = d["unet"].cpu().eval()
    common = dict(command="python tools/ship_weights.py " + " ".join(argv if argv is not None else sys.argv[1:]),
                  commit=git_commit(), created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    new = out.parent/f".{out.name}.new"; shutil.rmtree(new, ignore_errors=True); new.mkdir(parents=True)
    entries = {}
    for key, m in ms.items():
        src = Path(m["path"]); dst = new/src.name; dst.mkdir()
        for f in ("model.safetensors", "config.json", "meta.json"): shutil.copyfile(src/f, dst/f)
        rec = dict(kind="checkpoint", loader="diffexplain.models.load_or_train", model=key,
                   config=json.loads((src/"config.json").read_text()), code=m["config"]["code"],
                   test_metrics=m["metrics"], train_time_s=m["train_time"], epochs=m["epochs"],
                   data=dict(profile="quick", n=ELLIPSE_PROFILES["quick"]["n"], seed=0, split="test"))
        (dst/"shipped.json").write_text(json.dumps(dict(rec, **common), indent=1))
        entries[src.name] = dict(rec, files=files_of(dst, new))
    final = Path(d["path"]); root = final.parent; dst = new/root.name/final.name; dst.mkdir(parents=True)
    for f in sorted(final.iterdir()):
        if f.is_file() and (f.suffix in (".json", ".safetensors") or f.name.startswith("quality-")): shutil.copyfile(f, dst/f.name)
    cfg = json.loads((root/"config.json").read_text()) if (root/"config.json").exists() else None
    from diffexplain.diffusion import make_unet2d, train_diffusion, _call
    from diffexplain.data import code_version
    rec = dict(kind="ddpm", loader="diffexplain.diffusion.load_or_train_ddpm", model="ddpm", sub=final.name, train_config=cfg,
               code=code_version(make_unet2d, train_diffusion, _call),   # the code part of load_or_train_ddpm's cache key unet_config=json.loads((final/"config.json").read_text()),
               train=json.loads((final/"train.json").read_text()), quality=d["quality"],
               ddpm_check=ddpm_check(unet, d["scheduler"], images), profile=dict(d["config"]))
    (dst/"shipped.json").write_text(json.dumps(dict(rec, **common), indent=1, default=str))
    entries[root.name] = dict(rec, files=files_of(new/root.name, new))
    timings["total_s"] = time.time() - t0
    manifest = dict(common, threads=a.threads, device=a.device, timings=timings, python=platform.python_version(),
                    torch=torch.__version__, diffusers=__import__("diffusers").__version__,
                    total_bytes=sum(f["bytes"] for e in entries.values() for f in e["files"].values()), entries=entries)
    (new/"MANIFEST.json").write_text(json.dumps(manifest, indent=1, default=str) + "\n")
    old = out.parent/f".{out.name}.old"; shutil.rmtree(old, ignore_errors=True)
    if out.exists(): os.rename(out, old)
    os.rename(new, out); shutil.rmtree(old, ignore_errors=True)
    if tmp_cache: shutil.rmtree(tmp_cache, ignore_errors=True)
    log(f"wrote {out}: {len(entries)} entries, {manifest['total_bytes']/1e6:.2f} MB, {timings['total_s']:.0f} s in all")
    return manifest


if __name__ == "__main__": main()
