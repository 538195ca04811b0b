"""Tiny random Llama / Qwen3 checkpoints written with transformers' own classes, for fidelity tests."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, LlamaConfig, Qwen3Config


def tiny_config(arch: str = "qwen3", *, tie: bool = False, kv_heads: int = 2, **extra):
    common = dict(vocab_size=300, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=kv_heads, max_position_embeddings=256, tie_word_embeddings=tie,
                  rms_norm_eps=1e-6, pad_token_id=0, bos_token_id=1, eos_token_id=2) | extra
    if arch == "llama":
        return LlamaConfig(**common)
    return Qwen3Config(**({"head_dim": 16} | common))


def write_tiny_model(
    path: Path, config, *, classifier: bool = False, seed: int = 0, shard_size: str | None = None
) -> Path:
    """transformers' model with random weights (norms perturbed too, so they matter), saved as an HF folder."""
    torch.manual_seed(seed)
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    model = cls.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    model.save_pretrained(path, **({"max_shard_size": shard_size} if shard_size else {}))
    return path


def hf_logits(path: Path, input_ids: torch.Tensor, *, classifier: bool = False) -> torch.Tensor:
    cls = AutoModelForSequenceClassification if classifier else AutoModelForCausalLM
    # transformers' default attention (sdpa); its eager path differs from it by ~2e-4 on SmolLM2's
    # 30 layers, and is the farther of the two from an fp64 forward
    model = cls.from_pretrained(path, attn_implementation="sdpa", dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids).logits


def write_char_tokenizer(path: Path) -> Path:
    """A character-level fast tokenizer (ids < 100) saved beside a tiny model, so that text tasks
    (training, report, generation) run end to end without a real tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<unk>"]
    chars = [chr(c) for c in range(32, 127)] + ["\n"]
    vocab = {tok: i for i, tok in enumerate(specials + chars)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(pattern="", behavior="isolated")
    tok.decoder = decoders.Fuse()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                   unk_token="<unk>")
    fast.save_pretrained(path)
    return path


def two_set_runtime(root: Path):
    """A tiny Llama runtime with two adapter sets of different shapes: "a" (sparsegen, E 4, every
    projection) and "b" (softmax, E 3, q/v/down): with the bare base, every kind of row a step mixes."""
    from ldmole_runtime import LDMoleRuntime, new_adapter_set

    rt = LDMoleRuntime.from_pretrained(write_tiny_model(root / "llama", tiny_config("llama", kv_heads=2)))
    rt.load_adapter("a", new_adapter_set(rt.cfg, num_experts=4, rank=4, lambda_hidden=16, seed=1, b_std=0.05))
    rt.load_adapter("b", new_adapter_set(rt.cfg, num_experts=3, rank=2, router="softmax", seed=2, b_std=0.05,
                                         target_modules=["q_proj", "v_proj", "down_proj"]))
    return rt
