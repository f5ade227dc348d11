"""benchmarks/gpu_check.sh's CPU fallback (CI size): it runs the parts that need no CUDA,
skips the others with a line each, and writes one JSON that says which is which."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.sh"


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                    reason="needs bash and coreutils' timeout")
def test_cpu_smoke_writes_one_record_with_the_cuda_parts_skipped(tmp_path):
    out = tmp_path / "gpu-check"
    environment = {**os.environ, "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(SCRIPT), "--cpu-smoke", str(out)], capture_output=True,
                          text=True, env=environment, timeout=240, check=False)
    assert done.returncode == 0, done.stdout + done.stderr
    record = json.loads((out / "gpu-check.json").read_text())
    assert record["mode"] == "cpu" and not record["cuda"] and record["failed"] == []
    assert "cuda_tests" in record["skipped"] and "epoch.bf16" in record["skipped_inside"]
    for name in record["skipped"]:
        assert f"skipped {name}: " in done.stdout           # one line per skipped part
    assert "skipped bf16: " in (out / "parts" / "epoch.log").read_text()
    parts = record["parts"]
    assert {parts[name]["status"] for name in ("epoch", "bench", "context")} == {"ok"}
    epoch = parts["epoch"]["result"]
    assert epoch["modes"]["fp32"]["finite"] and "bf16" in epoch["skipped"]
    assert parts["bench"]["result"]["bk"]["causal"]["max_abs_diff"] < 1e-5
    context = parts["context"]["result"]
    assert [row["n"] for row in context["rows"]] == [32, 128]
    assert all(cell["status"] == "ok" for row in context["rows"]
               for cell in row["models"].values())
