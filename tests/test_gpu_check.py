"""bench/gpu_check.sh --dry-run: every stage of the one-call GPU check, tiny and on the CPU."""

import os
import shutil
import subprocess

import pytest
from conftest import ROOT

STAGES = ["environment", "phantoms", "train", "resume", "cuda_tests", "bench_infer", "bench_train", "train_compile"]


@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None, reason="needs bash and timeout")
def test_gpu_check_dry_run_passes_every_stage(tmp_path):
    results = tmp_path / "results"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TMPDIR": str(tmp_path)}
    env.pop("OUT", None)
    r = subprocess.run(["bash", str(ROOT / "bench" / "gpu_check.sh"), "--dry-run", str(results)], cwd=tmp_path,
                       env=env, capture_output=True, text=True, timeout=900)
    summary = (results / "summary.txt").read_text()
    assert r.returncode == 0, summary + r.stderr[-2000:]
    rows = {line.split()[0]: line.split()[1] for line in summary.splitlines() if line and not line.startswith(" ")
            and len(line.split()) == 3}
    assert all(rows.get(s) == "ok" for s in STAGES), summary
    assert sorted(p.stem for p in results.glob("*.log")) == sorted(STAGES)
    assert "every stage ok" in summary
    assert [p.name for p in tmp_path.iterdir()] == ["results"]  # its working folder removed
