"""`ldmole bench --json --quick` runs end to end in CI time and prints one complete JSON object."""

import json
import subprocess
import sys
import time


def test_bench_quick_json():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ldmole_runtime.cli", "bench", "--json", "--quick"],
                          capture_output=True, text=True, timeout=600)
    elapsed = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    assert len(lines) == 1
    result = json.loads(lines[0])
    print(f"bench --quick took {elapsed:.1f} s: {lines[0]}")
    variants = ("base", "ldmole_sparse", "ldmole_dense")
    for name in variants:
        assert set(result["decode_tokens_per_s"][name]) == {"1", "8", "32"}
        assert all(v > 0 for v in result["decode_tokens_per_s"][name].values())
        assert result["prefill_tokens_per_s"][name] > 0
    assert set(result["ratios"]) == {"decode_b1", "decode_b8", "decode_b32", "prefill"}
    assert 1.0 <= result["mean_active_experts_per_token"] <= 8.0
    assert result["adapter"]["experts"] == 8 and result["adapter"]["rank"] == 8
