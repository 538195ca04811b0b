"""`ldmole bench --estimate`: the roofline estimate of a GPU decode step works on a machine without a
GPU, says it is an estimate, carries the measured run's ratio keys, and counts the work from the
launches the backend really issues (so it moves when that work moves)."""

import json

from ldmole_cli.cost_model import GPUS, estimate, record_decode_step
from ldmole_cli.main import main


def test_the_documented_command_runs_without_a_gpu(capsys):
    assert main(["bench", "--json", "--device", "cuda", "--estimate", "h100", "--shape", "qwen3-1.7b",
                 "--dtype", "bfloat16", "--target-experts", "2"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert "estimate" in out["estimate"] and "not measured" in out["estimate"]
    for b in (1, 8, 32, 128):
        ratio = out["ratios"][f"decode_b{b}"]["sparse_over_base"]
        assert 0 < ratio < 1.5
        step = out["decode_step_ms"][f"b{b}"]
        assert step["ldmole_sparse"] > step["base"] > 0
    # the bare base at batch 1 cannot beat reading its weights once
    assert out["decode_step_ms"]["b1"]["base"] >= out["base_b1_hbm_bound_ms"] > 0
    # issue 21's goal for this shape, as estimated: >= 0.8x the base, routing <= 10% of the step
    for b in (1, 8, 32):
        assert out["ratios"][f"decode_b{b}"]["sparse_over_base"] >= 0.8
        assert out["routing_share"][f"decode_b{b}"] <= 0.10


def test_the_estimate_follows_the_recorded_launches():
    """One decode step records the backend's 3 launches per group per layer, and the routing work
    grows with the λ-network the routing kernel's programs run over (its time need not: the
    programs run side by side)."""
    kernels, cfg = record_decode_step("smollm2-135m", "bfloat16", 1, True, 8, 8, 256, 2.0)
    names = [k.name for k in kernels]
    for kernel in ("triton.route", "triton.shrink", "triton.expand"):
        assert names.count(kernel) == 4  # qkv, o, gate_up, down (each counted num_layers times)
    assert all(k.count == cfg.num_layers for k in kernels if k.name.startswith("triton."))
    def routing_work(hidden):
        kernels, _ = record_decode_step("smollm2-135m", "bfloat16", 1, True, 8, 8, hidden, 2.0)
        route = [k for k in kernels if k.name == "triton.route"]
        return sum(k.mma + k.fma for k in route), sum(k.programs for k in route)

    (work_small, programs_small), (work_large, programs_large) = routing_work(64), routing_work(512)
    assert work_large > 4 * work_small and programs_large > programs_small
    small = estimate("smollm2-135m", "bfloat16", "h100", (1,), 8, 8, 64, 2.0)
    large = estimate("smollm2-135m", "bfloat16", "h100", (1,), 8, 8, 512, 2.0)
    assert large["decode_step_ms"]["b1"]["base"] == small["decode_step_ms"]["b1"]["base"]
    assert set(GPUS) == {"h100", "a100"}


def test_the_estimate_counts_the_routing_precision_the_kernel_runs(monkeypatch):
    """tf32x3 routing GEMMs are tensor-core work (3 tf32 MMAs per product); "ieee" ones are CUDA-core
    FMAs, which the estimate finds slower."""
    from ldmole_kernels.triton import routing

    def route_kernels():
        kernels, _ = record_decode_step("smollm2-135m", "bfloat16", 1, True, 8, 8, 256, 2.0)
        return [k for k in kernels if k.name == "triton.route"]

    tensor_cores = route_kernels()
    assert all(k.fma == 0 and k.mma > 0 and k.mma_rate == "tf32_flops" for k in tensor_cores)
    monkeypatch.setattr(routing, "ROUTE_PRECISION", "ieee")
    cuda_cores = route_kernels()
    assert all(k.mma == 0 and k.fma > 0 for k in cuda_cores)
    assert [3 * k.fma for k in cuda_cores] == [k.mma for k in tensor_cores]
    h100 = GPUS["h100"]
    assert sum(k.seconds(h100) for k in cuda_cores) > sum(k.seconds(h100) for k in tensor_cores)


def test_weight_tiles_reread_by_blocks_of_one_set_count_once_while_they_fit_in_l2():
    """At batch 32 two blocks of one set read the same routing and expert weights: HBM serves them
    once (the launch's working set is far below L2), and each block's programs still pay their own
    reads where the per-SM bandwidth bounds them."""
    kernels, _ = record_decode_step("smollm2-135m", "bfloat16", 32, True, 8, 8, 256, 2.0)
    adapter = [k for k in kernels if k.name.startswith("triton.")]
    assert all(k.unique_bytes is not None and 0 < k.unique_bytes < k.bytes for k in adapter)
    h100 = GPUS["h100"]
    no_l2 = dict(h100, l2_bytes=0)
    assert all(k.seconds(no_l2) >= k.seconds(h100) for k in adapter)
    assert sum(k.seconds(no_l2) for k in adapter) > sum(k.seconds(h100) for k in adapter)
