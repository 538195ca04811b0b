"""`ldmole bench-hf`: our engine and transformers' generate on one base, interleaved; the greedy tokens
of a single prompt must be the same in fp32 (transformers' own model is the oracle)."""

import json
import subprocess
import sys

from tiny_models import tiny_config, write_tiny_model


def test_bench_hf_times_both_and_their_greedy_tokens_agree(tmp_path):
    base = write_tiny_model(tmp_path / "base", tiny_config("llama"))
    proc = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "bench-hf", "--base", str(base), "--dtype",
                           "float32", "--batch-sizes", "1,3", "--prompt-len", "12", "--new-tokens", "6",
                           "--rounds", "2", "--text", "none"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["dtype"] == "float32" and set(result["tokens_per_s"]) == {"1", "3"}
    for figures in result["tokens_per_s"].values():
        assert figures["ldmole"] > 0 and figures["hf"] > 0
    assert result["identical_outputs"]["1"] == "1/1"


def test_bench_hf_refuses_bad_flags(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "bench-hf", "--batch-sizes", "1,x"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "--batch-sizes takes comma-separated integers" in proc.stderr
