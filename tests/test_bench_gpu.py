"""benchmarks/bench_gpu.sh keeps working without an accelerator: its reduced CPU mode
(16 tiny JPEGs, KERAS_BACKEND=jax on CPU) runs end to end and prints every figure."""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_bench_gpu_reduced_mode_runs_on_cpu_and_prints_its_figures(tmp_path):
    pytest.importorskip("jax")
    out = subprocess.run(["bash", str(REPO / "benchmarks" / "bench_gpu.sh"), "--cpu",
                          "--workdir", str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-3000:]
    text = out.stdout
    for precision in ("float32", "bfloat16"):
        assert re.search(rf"{precision}\s*: [\d.]+ img/s end to end", text), text
    assert "device cpu" in text and "decode alone:" in text
    assert re.search(r"bfloat16 vs float32: max relative L2 [\d.]+ \(tolerance 0.02\): ok", text)
