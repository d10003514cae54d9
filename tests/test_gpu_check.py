"""benchmarks/gpu_check.py keeps working: its CPU run at tiny size, its measure of difference, its exit status."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import gpu_check  # noqa: E402

RAN_ON_CPU = {"ddp/gloo_2procs", "train/demo_digits/bf16", "train/demo_digits/fp16", "train/demo_digits/channels_last"}


def test_tiny_cpu_run_writes_one_report_and_never_passes_a_cuda_check(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.run([sys.executable, str(BENCHMARKS / "gpu_check.py"), "--device", "cpu", "--tiny", "--out",
                           str(out)], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads(out.read_text())
    checks = {c["name"]: c for c in report["checks"]}
    assert report["device"] == "cpu" and report["tiny"] is True

    cuda = [n for n in checks if n.startswith(("zoo/", "ddp/nccl", "nccl/"))]
    assert len(cuda) == 2 * len(gpu_check.TINY_ZOO) + 2
    assert all(checks[n]["status"] == "skipped" and checks[n]["note"] == gpu_check.NO_CUDA for n in cuda)

    ran = {n for n, c in checks.items() if c["status"] != "skipped"}
    assert ran == RAN_ON_CPU
    for name in ran:
        c = checks[name]
        assert c["status"] == "pass" and c["device"] == "cpu", c
        assert 0 <= c["rel"] <= c["tol"] and c["max_abs"] >= 0 and c["worst"], c
    # Mixed precision really rounded (float32 would differ from itself by nothing), within its stated tolerance.
    for amp in ("bf16", "fp16"):
        c = checks[f"train/demo_digits/{amp}"]
        assert gpu_check.AMP_FLOOR[amp] <= c["rel"] and c["tol"] == gpu_check.TOLERANCES[amp].rel
    assert checks["train/demo_digits/compile"]["status"] == "skipped"
    assert checks["fashion/full"]["status"] == "skipped"
    assert report["summary"] == {"pass": len(ran), "fail": 0, "skipped": len(checks) - len(ran)}

    rows = report["throughput"]["rows"]
    assert set(rows) == {"slim", "slim_memorydata", "hand_loop", "paper_pipeline"}
    assert all(r["images_per_s_median"] > 0 and len(r["rounds"]) == report["throughput"]["rounds"]
               for r in rows.values())
    assert set(report["throughput"]["ratios"]) == {"slim / paper_pipeline", "slim / hand_loop",
                                                   "slim_memorydata / hand_loop"}


def test_a_check_beyond_its_tolerance_fails_the_run(tmp_path, monkeypatch):
    # bfloat16 rounding always moves the update by more than 1e-9 (the run's own check requires >= 1e-6).
    monkeypatch.setitem(gpu_check.TOLERANCES, "bf16", gpu_check.Tolerance(1e-9, "impossible on purpose"))
    threads = torch.get_num_threads()
    out = tmp_path / "r.json"
    try:
        status = gpu_check.main(["--device", "cpu", "--tiny", "--skip", "zoo", "ddp", "throughput", "--out", str(out)])
    finally:
        torch.set_num_threads(threads)
    checks = {c["name"]: c for c in json.loads(out.read_text())["checks"]}
    assert status == 1
    assert checks["train/demo_digits/bf16"]["status"] == "fail"
    assert checks["train/demo_digits/bf16"]["note"].startswith("rel ")
    assert checks["train/demo_digits/fp16"]["status"] == "pass"


def test_difference_is_relative_to_the_reference_norm_and_nan_fails():
    a, b = torch.tensor([3.3, 4.4], dtype=torch.float64), torch.tensor([3.0, 4.0], dtype=torch.float64)
    d = gpu_check.diff({"x": (a, b), "y": (torch.zeros(2), torch.zeros(2))})
    assert d.rel == pytest.approx(0.5 / 5.0) and d.max_abs == pytest.approx(0.4) and d.worst == "x"
    assert gpu_check.Check.measured("c", d, 0.1 + 1e-9, torch.device("cpu")).status == "pass"
    assert gpu_check.Check.measured("c", d, 0.09, torch.device("cpu")).status == "fail"
    nan = gpu_check.diff({"x": (torch.tensor([float("nan"), 4.0]), b)})
    assert gpu_check.Check.measured("c", nan, 1e9, torch.device("cpu")).status == "fail"
    with pytest.raises(ValueError, match="shape"):
        gpu_check.diff({"x": (torch.zeros(3), torch.zeros(2))})
