"""`ldmole bench --json --quick` runs end to end in CI time and prints one complete JSON object."""

import json
import subprocess
import sys
import time


def test_bench_quick_json():
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "ldmole_cli.main", "bench", "--json", "--quick"],
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


def test_target_experts_calibrates_real_sparsegen_routing():
    """The calibrated adapter routes each token to a varying number of experts whose mean is the
    target, counted here on the dense path's routing of the same prompts."""
    import torch

    from ldmole_cli.bench import BenchSettings, _setup

    for target in (2.0, 5.0):
        s = BenchSettings(shape="tiny", target_experts=target)
        rt, _, _ = _setup(s)
        ids = torch.tensor(s.prompts(4, 64, s.seed + 3))
        routing = rt.forward(ids, "bench", lora_backend="dense", capture_routing=True).routing
        counts = torch.stack([(p > 0).sum(-1).float() for p in routing.values()])
        assert abs(counts.mean().item() - target) <= 0.1
        assert counts.min() < counts.max()  # per-token, per-layer counts still vary


def test_bench_takes_a_real_adapter_on_its_base(tmp_path):
    from tiny_models import tiny_config, write_char_tokenizer, write_tiny_model

    from ldmole_cli.bench import BenchSettings, run
    from ldmole_runtime import LDMoleRuntime, new_adapter_set

    base = write_char_tokenizer(write_tiny_model(tmp_path / "base", tiny_config("llama", vocab_size=100,
                                                                                   max_position_embeddings=512)))
    rt = LDMoleRuntime.from_pretrained(base)
    new_adapter_set(rt.cfg, num_experts=4, rank=2, lambda_hidden=8, target_modules=["q_proj", "v_proj"],
                    seed=2, b_std=0.1).save(tmp_path / "adapter")
    s = BenchSettings(base=str(base), adapter=str(tmp_path / "adapter"), batch_sizes=(1, 2), prompt_len=8,
                      decode_steps=2, prefill_prompts=1, prefill_len=32)
    result = run(s)
    assert result["shape"] == "base" and result["adapter"]["experts"] == 4
    assert result["adapter"]["target_modules"] == ["q_proj", "v_proj"]
    assert 1.0 <= result["mean_active_experts_per_token"] <= 4.0
    assert set(result["ratios"]) == {"decode_b1", "decode_b2", "prefill"}
    # the prompts are real text (SocialIQA's validation contexts) in the base's tokenizer
    from transformers import AutoTokenizer

    text = AutoTokenizer.from_pretrained(str(base)).decode(s.prompts(1, 32, 0)[0])
    assert sum(ch.isalpha() or ch == " " for ch in text) > 24


def test_bench_train_times_ldmole_against_lora_on_shared_batches():
    from ldmole_cli.bench_train import TrainBenchSettings, run

    result = run(TrainBenchSettings(shape="tiny", steps=2, seq_len=32, batch_size=2, lambda_hidden=16))
    assert result["lora_rank"] == 64 and set(result["train_tokens_per_s"]) == {"ldmole", "lora"}
    assert all(v > 0 for v in result["train_tokens_per_s"].values())
    assert result["ldmole_over_lora"] == round(result["train_tokens_per_s"]["ldmole"]
                                               / result["train_tokens_per_s"]["lora"], 3)


def test_bench_runs_the_gpu_configuration_on_cpu():
    """What `ldmole bench --device cuda` runs (triton backend, static decode steps, batch-1 bytes and
    bandwidth), on the tiny shape with Triton's interpreter and the static step run eagerly."""
    from ldmole_cli.bench import BenchSettings, run

    s = BenchSettings(shape="tiny", batch_sizes=(1, 3), prompt_len=8, decode_steps=2, prefill_prompts=1,
                      prefill_len=24, experts=4, lambda_hidden=16, lora_backend="triton", decode_graphs="eager")
    result = run(s)
    assert result["lora_backend"] == "triton" and result["decode_graphs"] == "eager"
    for name in ("base", "ldmole_sparse", "ldmole_dense"):
        assert set(result["decode_tokens_per_s"][name]) == {"1", "3"}
        assert result["decode_b1_gb_per_s"][name] > 0
    # tiny: untied 512 x 64 LM head, 2 layers of 64-wide attention (q 64, k/v 32 each, o 64) and a
    # 128-wide MLP, norms and q/k norms; fp32; KV of 9 tokens
    layer = 64 * (64 + 32 + 32) + 64 * 64 + 3 * 64 * 128 + 2 * 64 + 2 * 16
    weights = 4 * (512 * 64 + 2 * layer + 64)
    kv = 4 * 2 * 2 * 9 * 2 * 16
    assert result["decode_b1_bytes_per_step"] == weights + kv
