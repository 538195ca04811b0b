"""Plain PEFT LoRA adapters, built and saved by the `peft` library itself, served as E = 1 sets: our
logits equal peft's own PeftModel (1e-4) on tiny Llama and Qwen3 bases, for different ranks, target
subsets, rslora, rank/alpha patterns and skipped layers; sets of ranks 64/32/16/8 share one batch;
what PEFT can express and we cannot is refused with one line."""

import json

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import tiny_config, write_tiny_model
from transformers import AutoModelForCausalLM

from ldmole_runtime import LDMoleRuntime
from ldmole_runtime.adapters.adapter_set import AdapterSet
from ldmole_runtime.errors import CheckpointError

TOL = 1e-4


@pytest.fixture(scope="module", params=["llama", "qwen3"])
def base(request, tmp_path_factory):
    return write_tiny_model(tmp_path_factory.mktemp("base") / request.param, tiny_config(request.param, kv_heads=2))


def make_peft(base, out, seed, safe=True, **lora):
    """A PEFT LoRA on the base, its B drawn at random (peft starts B at zero), saved by peft."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", lora_dropout=0.0, **lora))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)
    peft_model.save_pretrained(out, safe_serialization=safe)
    return out


def peft_logits(base, adapter, ids):
    model = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")
    return PeftModel.from_pretrained(model, adapter).eval()(ids).logits


CASES = {
    "all-r8": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                         "up_proj", "down_proj"]),
    "qv-r4": dict(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj"]),
    "rslora": dict(r=16, lora_alpha=8, use_rslora=True, target_modules=["k_proj", "down_proj"]),
    "patterns": dict(r=8, lora_alpha=16, target_modules=["q_proj", "o_proj", "up_proj"],
                     rank_pattern={"o_proj": 2, "layers.1.self_attn.q_proj": 12}, alpha_pattern={"up_proj": 3}),
    "one-layer": dict(r=6, lora_alpha=6, target_modules=["v_proj", "gate_proj"], layers_to_transform=[1]),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_equal_peft(base, tmp_path, case):
    adapter = make_peft(base, tmp_path / case, seed=1, safe=case != "rslora", **CASES[case])
    ids = torch.randint(3, 300, (2, 9), generator=torch.Generator().manual_seed(0))
    want = peft_logits(base, adapter, ids)
    rt = LDMoleRuntime.from_pretrained(base, adapters={"p": adapter})
    for mode in ("cpu", "torch"):
        got = rt.forward(ids, "p", lora_backend=mode).logits
        assert (got - want).abs().max() <= TOL
    plain = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")(ids).logits
    assert (want - plain).abs().max() > 1e-2  # the adapter matters


def test_ranks_64_32_16_8_share_one_batch(base, tmp_path):
    """MoLE's four task LoRAs of different ranks (and the bare base) in one mixed batch."""
    ranks = [64, 32, 16, 8]
    targets = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["gate_proj", "up_proj", "down_proj"],
               ["v_proj"]]
    paths = {f"r{r}": make_peft(base, tmp_path / f"r{r}", seed=r, r=r, lora_alpha=2 * r, target_modules=t)
             for r, t in zip(ranks, targets, strict=True)}
    rt = LDMoleRuntime.from_pretrained(base, adapters=paths)
    ids = torch.randint(3, 300, (5, 8), generator=torch.Generator().manual_seed(1))
    rows = ["r64", "r32", None, "r16", "r8"]
    for mode in ("cpu", "torch", "triton"):
        mixed = rt.forward(ids, rows, lora_backend=mode).logits
        for i, name in enumerate(rows):
            if name is None:
                want = AutoModelForCausalLM.from_pretrained(base, attn_implementation="eager")(ids[i:i + 1]).logits
            else:
                want = peft_logits(base, paths[name], ids[i:i + 1])
            assert (mixed[i] - want[0]).abs().max() <= TOL, (mode, name)


@pytest.mark.parametrize("change,message", [
    (dict(use_dora=True), "DoRA"),
    (dict(bias="all"), "bias 'all'"),
    (dict(modules_to_save=["lm_head"]), "modules_to_save"),
    (dict(fan_in_fan_out=True), "fan_in_fan_out"),
    (dict(r=5), "rank 4 in the weights"),
])
def test_unsupported_or_inconsistent_peft_folders_are_refused(base, tmp_path, change, message):
    adapter = make_peft(base, tmp_path / "a", seed=2, r=4, lora_alpha=8, target_modules=["q_proj"])
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg.update(change)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match=message):
        AdapterSet.load(adapter)
