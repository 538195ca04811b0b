"""S-LoRA's workload: the trace's statistics, and the open-loop run against a real server whose sets
outnumber its slots (every request completes; the report counts the loads and evictions it caused)."""

import numpy as np
import pytest
from live_server import LiveServer, write_model

from ldmole_cli.main import main
from ldmole_cli.slora_workload import run_slora, slora_trace
from ldmole_runtime.adapters.adapter_set import AdapterSet


def test_the_trace_follows_s_lora_s_generator():
    uniform = slora_trace(100, 1.0, rate=50, cv=1.0, duration=200, input_range=(8, 512), output_range=(8, 512))
    assert len(uniform) == 10_000
    gaps = np.diff([0.0] + [r.at for r in uniform])
    assert abs(gaps.mean() - 1 / 50) < 0.002 and abs(gaps.std() / gaps.mean() - 1.0) < 0.05  # Poisson: cv 1
    counts = np.bincount([r.adapter for r in uniform], minlength=100)
    assert counts.min() > 50 and counts.max() < 150  # power(1) is uniform over the sets
    skewed = slora_trace(100, 0.3, rate=50, cv=1.0, duration=200, input_range=(8, 512), output_range=(8, 512))
    ids = np.array([r.adapter for r in skewed])
    assert abs((ids < 10).mean() - 0.1 ** 0.3) < 0.02  # P(floor(100 U^(1/0.3)) < 10) = 0.1^0.3 ≈ 0.50
    bursty = slora_trace(10, 1.0, rate=50, cv=3.0, duration=200, input_range=(8, 9), output_range=(8, 9))
    gaps = np.diff([0.0] + [r.at for r in bursty])
    assert abs(gaps.std() / gaps.mean() - 3.0) < 0.4 and {r.input_len for r in bursty} == {8}


def test_open_loop_run_over_more_sets_than_slots(tmp_path):
    base, adapters = write_model(tmp_path)
    assert main(["make-adapters", "--like", str(adapters["math"]), "--num", "6", "--out", str(tmp_path / "sets"),
                 "--noise", "0.1"]) == 0
    copies = [AdapterSet.load(tmp_path / "sets" / f"set-{i:04d}") for i in range(6)]
    key = "layers.0.q_proj.lora_A"
    assert not np.allclose(copies[0].tensors[key], copies[1].tensors[key])
    options = dict(max_loras=2, max_cpu_loras=2, adapter_dir=str(tmp_path / "sets"))
    with LiveServer(base, {}, engine_options=options) as server:
        report = run_slora(server.url, 6, 1.0, rate=20, cv=1.0, duration=1.5, input_range=(4, 12),
                           output_range=(2, 6), api_key=None)
    assert report["failed"] == 0 and report["completed"] == report["workload"]["requests"] == 30
    assert report["loads_disk"] >= 6 and report["evictions"] >= 4
    assert 0.0 <= report["slot_hit_rate"] < 1.0 and report["ttft_p50_s"] > 0


def test_the_flags_check_their_values(capsys):
    assert main(["bench-serve", "--workload", "slora", "--input-range", "9,3"]) == 2
    assert "--input-range takes LOW,HIGH" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["make-adapters", "--num", "3"])  # --out is required
