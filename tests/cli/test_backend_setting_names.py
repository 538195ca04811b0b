"""The setting that picks the LoRA backend is `lora_backend` everywhere; `mode`, its older name, is
still accepted by every entry point a user could have passed it to, and a conflict is refused."""

import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import tiny_config, write_tiny_model

from ldmole_cli.main import main
from ldmole_eval.model_args import parse_model_args
from ldmole_runtime.adapters.init import new_adapter_set
from ldmole_runtime.engine.llm import LLM
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.runtime import LDMoleRuntime


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("names") / "base", tiny_config("llama"))


@pytest.fixture(scope="module")
def runtime(base):
    rt = LDMoleRuntime.from_pretrained(base)
    rt.load_adapter("a", new_adapter_set(rt.cfg, num_experts=4, rank=2, lambda_hidden=8, seed=1, b_std=0.05))
    return rt


def test_runtime_forward_takes_both_names(runtime):
    ids = torch.randint(0, 300, (2, 7), generator=torch.Generator().manual_seed(0))
    new = runtime.forward(ids, "a", lora_backend="torch").logits
    old = runtime.forward(ids, "a", mode="torch").logits
    assert torch.equal(new, old)
    assert torch.equal(runtime.forward(ids, "a", lora_backend="cpu", mode="cpu").logits,
                       runtime.forward(ids, "a", lora_backend="cpu").logits)
    with pytest.raises(LDMoleError, match="lora_backend='cpu' and mode='torch' disagree"):
        runtime.forward(ids, "a", lora_backend="cpu", mode="torch")


def test_llm_takes_both_names(runtime):
    assert LLM(runtime, mode="dense").engine.config.lora_backend == "dense"
    assert LLM(runtime, lora_backend="torch").engine.runner.lora_backend.name == "torch"
    assert LLM(runtime, mode="cpu").engine.runner.lora_backend.name == "cpu"
    with pytest.raises(LDMoleError, match="disagree"):
        LLM(runtime, lora_backend="cpu", mode="dense")


def test_lm_eval_model_args_take_both_names(base):
    assert parse_model_args({"base": str(base), "lora_backend": "dense"}).lora_backend == "dense"
    assert parse_model_args({"base": str(base), "mode": "dense"}).lora_backend == "dense"
    assert parse_model_args({"base": str(base)}).lora_backend == "sparse"
    with pytest.raises(LDMoleError, match="lora_backend must be one of"):
        parse_model_args({"base": str(base), "lora_backend": "fast"})


def test_forward_command_takes_both_flags(base, tmp_path):
    save_file({"input_ids": torch.tensor([[1, 5, 9, 4]])}, str(tmp_path / "in.safetensors"))
    logits = {}
    for flag in ("--lora-backend", "--mode"):
        out = tmp_path / f"{flag.strip('-')}.safetensors"
        assert main(["forward", "--base", str(base), "--inputs", str(tmp_path / "in.safetensors"),
                     "--out", str(out), flag, "dense"]) == 0
        logits[flag] = load_file(str(out))["logits"]
    assert torch.equal(logits["--lora-backend"], logits["--mode"])
