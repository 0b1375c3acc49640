"The GPU campaign's smoke size on CPU: every stage runs, a rerun skips them all, a lost stage resumes from its files."
import json, sys
from pathlib import Path
import pytest, torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]/"tools"))
import gpu_campaign as gc

def test_campaign_smoke_and_resume(tmp_path, capsys):
    old = torch.get_num_threads(); torch.set_num_threads(1)
    try:
        out = tmp_path/"c"
        s = gc.main(["--size", "smoke", "--out", str(out), "--device", "cpu"])
        assert s["complete"] and set(s["stage_wall_s"]) == {"env", "data", "classifiers", "ddpm", "quality", "sampler_study", "table1"}
        t1 = s["stages"]["table1"]["rows"]
        assert [r["feature"] for r in t1] == ["aspect_ratio", "size"] and all(r["targets_done"] == r["targets"] for r in t1)
        assert s["stages"]["ddpm"]["steps"] >= gc.SIZES["smoke"]["calib_steps"] and s["stages"]["ddpm"]["achieved_tflops"] > 0
        assert (out/"table1.md").exists() and (out/"study.csv").exists() and (out/"campaign.json").exists()
        capsys.readouterr()
        gc.main(["--size", "smoke", "--out", str(out), "--device", "cpu"])                       # rerun: nothing to do
        err = capsys.readouterr().err
        assert err.count("skipped (done in an earlier run") == 7 and "start (" not in err
        files = sorted((out/"cache"/"table1-size").glob("target-*.npz"))
        tpb = gc.SIZES["smoke"]["table1"]["targets_per_batch"]                                  # targets are redone by batch
        keep = {f: f.stat().st_mtime_ns for f in files[tpb:]}
        files[0].unlink(); (out/"stages"/"table1.json").unlink()                                 # lose one target and the stage's record
        s2 = gc.main(["--size", "smoke", "--out", str(out), "--device", "cpu"])
        err = capsys.readouterr().err
        assert "[table1] start" in err and err.count("skipped (done in an earlier run") == 6
        assert files[0].exists() and all(f.stat().st_mtime_ns == t for f, t in keep.items())   # only the lost target's batch was redone
        assert s2["stages"]["table1"]["rows"][1]["global_score"] == pytest.approx(t1[1]["global_score"])   # same streams, same score
        assert [r["samples_this_run"] for r in s2["stages"]["table1"]["rows"]] == [0, gc.SIZES["smoke"]["table1"]["n"]]
    finally: torch.set_num_threads(old)
