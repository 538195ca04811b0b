"""The prepared device script runs as a dry run on a machine without a GPU: it prints its plan, runs
what needs no CUDA (parity through Triton's interpreter, the static-buffer decode step against
eager around a load and an unload, the cost model's estimates), lists the rest as skipped, and
writes one JSON file."""

import json

from ldmole_cli.main import main


def test_dry_run_prints_its_plan_and_writes_the_report(tmp_path, capsys):
    out = tmp_path / "gpu_check.json"
    assert main(["gpu-check", "--dry-run", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for step in ("parity:", "graphs:", "memcheck:", "bench:"):
        assert step in printed
    report = json.loads(out.read_text())
    steps = report["steps"]
    assert all(case["ok"] for key, case in steps["parity"].items() if key != "seconds")
    assert steps["parity"]["ldmole-qwen3-lm/float32"]["same_active_experts"]
    assert steps["graphs"]["ok"] and steps["graphs"]["after_load"]["equal"] and steps["graphs"]["after_unload"]["equal"]
    assert steps["memcheck"] == {"skipped": "needs CUDA", "seconds": 0.0}
    ratios = steps["bench"]["qwen3-1.7b/active2"]["estimate_h100"]
    assert set(ratios) == {"decode_b1", "decode_b8", "decode_b32", "decode_b128"}


def test_plan_only(capsys):
    assert main(["gpu-check", "--dry-run", "--plan-only"]) == 0
    assert "ldmole gpu-check --dry-run" in capsys.readouterr().out
