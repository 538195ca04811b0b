"""Acceptance: bad input gets a clear error, not a traceback from deep inside.

Every case builds a broken copy of the official fixtures in tmp_path (the fixtures are read-only)
and checks that
  (a) the Python API raises an `LDMoleError` whose message names the problem (file, tensor, field,
      widths, ...), and, for representative cases,
  (b) the CLI exits with code 2 and prints one `ldmole <command>: error: ...` line, no traceback.
"""

# Over 400 lines on purpose: one catalogue of malformed inputs, a numbered section per kind, sharing
# the helpers that damage copies of the fixtures; split, the sections would each import them all.

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from ldmole_cli.main import main
from ldmole_runtime.adapters.adapter_set import CONFIG_NAME, WEIGHTS_NAME, AdapterSet, load_reference
from ldmole_runtime.adapters.reference import REFERENCE_CONFIG_NAME, REFERENCE_WEIGHTS_NAME
from ldmole_runtime.errors import AdapterMismatchError, CheckpointError, LDMoleError, UnsupportedModelError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.runtime import LDMoleRuntime
from ldmole_runtime.model.weights import load_base_model

GARBAGE = b"\x00\xffthis is not a checkpoint\x13\x37" * 20


# ---- helpers ------------------------------------------------------------------------------------
@pytest.fixture
def lm(official_fixtures) -> Path:
    return official_fixtures / "qwen3-lm"


def copy_dir(src: Path, dst: Path) -> Path:
    """A writable copy of a (read-only) fixture folder."""
    shutil.copytree(src, dst)
    for p in [dst, *dst.rglob("*")]:
        p.chmod(0o755 if p.is_dir() else 0o644)
    return dst


def truncate(path: Path, keep: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def damage_file(path: Path, damage: str) -> None:
    """"garbage", "truncated" or "empty"."""
    if damage == "garbage":
        path.write_bytes(GARBAGE)
    elif damage == "truncated":
        truncate(path)
    else:
        path.write_bytes(b"")


def edit_json(path: Path, edit) -> None:
    raw = json.loads(path.read_text())
    edit(raw)
    path.write_text(json.dumps(raw))


def edit_state_dict(path: Path, edit) -> None:
    """Rewrite a reference adapter_model.bin through `edit(state_dict)`."""
    sd = torch.load(str(path), map_location="cpu", weights_only=True)
    edit(sd)
    torch.save(sd, str(path))


def edit_safetensors(path: Path, edit) -> None:
    tensors = load_file(str(path))
    edit(tensors)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))


def native_copy(lm: Path, dst: Path) -> Path:
    """The qwen3-lm reference adapter converted to the native format."""
    return load_reference(lm / "adapter").save(dst)


def inputs_file(tmp_path: Path, **tensors: torch.Tensor) -> Path:
    path = tmp_path / "in.safetensors"
    save_file(tensors, str(path))
    return path


def run_cli(capsys, argv: list[str]) -> str:
    """Run the CLI, assert it failed cleanly (exit 2, one error line, no traceback); return the line."""
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 2, captured
    err = captured.err.strip()
    assert "Traceback" not in err and "Traceback" not in captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"ldmole {argv[0]}: error: "), err
    return err


def cli_forward(capsys, tmp_path: Path, base: Path, adapter: Path | None = None, inputs: Path | None = None) -> str:
    inputs = inputs or inputs_file(tmp_path, input_ids=torch.tensor([[1, 2, 3]]))
    argv = ["forward", "--base", str(base), "--inputs", str(inputs), "--out", str(tmp_path / "out.safetensors")]
    if adapter is not None:
        argv += ["--adapter", str(adapter)]
    return run_cli(capsys, argv)


# ---- 1. base model folder -------------------------------------------------------------------------
def test_base_folder_missing(tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"nope: base model folder does not exist"):
        load_base_model(tmp_path / "nope")
    err = cli_forward(capsys, tmp_path, tmp_path / "nope")
    assert "base model folder does not exist" in err


def test_base_config_missing(lm, tmp_path, capsys):
    base = copy_dir(lm / "base", tmp_path / "base")
    (base / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"no config\.json"):
        load_base_model(base)
    assert "no config.json" in cli_forward(capsys, tmp_path, base)


def test_base_config_not_json(lm, tmp_path):
    base = copy_dir(lm / "base", tmp_path / "base")
    (base / "config.json").write_text('{"model_type": "qwen3", ')
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable model config"):
        load_base_model(base)


@pytest.mark.parametrize("content", ["[1, 2, 3]", '"qwen3"', "null"])
def test_base_config_not_an_object(lm, tmp_path, content):
    base = copy_dir(lm / "base", tmp_path / "base")
    (base / "config.json").write_text(content)
    with pytest.raises(CheckpointError, match=r"config\.json: .*JSON object"):
        load_base_model(base)


def test_base_weights_missing(lm, tmp_path, capsys):
    base = copy_dir(lm / "base", tmp_path / "base")
    (base / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"no model\.safetensors or model\.safetensors\.index\.json"):
        load_base_model(base)
    assert "no model.safetensors" in cli_forward(capsys, tmp_path, base)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_base_weights_corrupt(lm, tmp_path, capsys, damage):
    base = copy_dir(lm / "base", tmp_path / "base")
    damage_file(base / "model.safetensors", damage)
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        load_base_model(base)
    assert "not a readable safetensors file" in cli_forward(capsys, tmp_path, base)


def test_base_weight_wrong_shape(lm, tmp_path, capsys):
    base = copy_dir(lm / "base", tmp_path / "base")
    name = "model.layers.1.self_attn.k_proj.weight"
    edit_safetensors(base / "model.safetensors", lambda t: t.__setitem__(name, torch.zeros(48, 64)))
    with pytest.raises(CheckpointError, match=rf"{name} has shape \(48, 64\), the config implies \(32, 64\)"):
        load_base_model(base)
    assert name in cli_forward(capsys, tmp_path, base)


def test_base_weight_missing_tensor(lm, tmp_path):
    base = copy_dir(lm / "base", tmp_path / "base")
    name = "model.layers.0.mlp.down_proj.weight"
    edit_safetensors(base / "model.safetensors", lambda t: t.pop(name))
    with pytest.raises(CheckpointError, match=rf"missing weights \['{name}'\]"):
        load_base_model(base)


@pytest.mark.parametrize("model_type", ["gpt2", "banana"])  # known to transformers / unknown to it
def test_base_unsupported_model_type(lm, tmp_path, capsys, model_type):
    base = copy_dir(lm / "base", tmp_path / "base")
    edit_json(base / "config.json", lambda c: c.update(model_type=model_type))
    with pytest.raises(
        UnsupportedModelError, match=rf"model_type '{model_type}' is not supported; supported: llama, qwen3"
    ):
        load_base_model(base)
    assert f"model_type '{model_type}' is not supported" in cli_forward(capsys, tmp_path, base)


def test_base_config_without_model_type(lm, tmp_path, capsys):
    base = copy_dir(lm / "base", tmp_path / "base")
    edit_json(base / "config.json", lambda c: c.pop("model_type"))
    with pytest.raises(CheckpointError, match=r"config\.json: not a readable model config .*model_type"):
        load_base_model(base)
    cli_forward(capsys, tmp_path, base)  # transformers' message is collapsed onto the one error line


def test_base_sliding_window_unsupported(lm, tmp_path):
    base = copy_dir(lm / "base", tmp_path / "base")
    edit_json(base / "config.json", lambda c: c.update(use_sliding_window=True, sliding_window=16))
    with pytest.raises(UnsupportedModelError, match=r"sliding-window"):
        ModelConfig.from_dir(base)


# ---- 2. reference adapter folder ----------------------------------------------------------------
def test_adapter_folder_missing(lm, tmp_path, capsys):
    with pytest.raises(CheckpointError, match=r"nope: adapter folder does not exist"):
        AdapterSet.load(tmp_path / "nope")
    assert "adapter folder does not exist" in cli_forward(capsys, tmp_path, lm / "base", tmp_path / "nope")


def test_adapter_folder_empty(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match=rf"neither {CONFIG_NAME} \(native\) nor {REFERENCE_CONFIG_NAME}"):
        AdapterSet.load(tmp_path / "empty")


def test_reference_weights_missing(lm, tmp_path, capsys):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    (adapter / REFERENCE_WEIGHTS_NAME).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {REFERENCE_WEIGHTS_NAME}"):
        AdapterSet.load(adapter)
    err = run_cli(capsys, ["import", str(adapter), "--out", str(tmp_path / "native")])
    assert f"missing {REFERENCE_WEIGHTS_NAME}" in err


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_reference_weights_corrupt(lm, tmp_path, capsys, damage):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    damage_file(adapter / REFERENCE_WEIGHTS_NAME, damage)
    with pytest.raises(CheckpointError, match=rf"{REFERENCE_WEIGHTS_NAME}: not a readable torch state dict"):
        AdapterSet.load(adapter)
    assert "not a readable torch state dict" in cli_forward(capsys, tmp_path, lm / "base", adapter)


def test_reference_config_not_json(lm, tmp_path, capsys):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    (adapter / REFERENCE_CONFIG_NAME).write_text("r: 4\nlora_alpha: 8\n")
    with pytest.raises(CheckpointError, match=rf"{REFERENCE_CONFIG_NAME}: not valid JSON"):
        AdapterSet.load(adapter)
    err = run_cli(capsys, ["import", str(adapter), "--out", str(tmp_path / "native")])
    assert "not valid JSON" in err


@pytest.mark.parametrize("field", ["r", "lora_alpha", "target_modules"])
def test_reference_config_missing_field(lm, tmp_path, field):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    edit_json(adapter / REFERENCE_CONFIG_NAME, lambda c: c.pop(field))
    with pytest.raises(CheckpointError, match=rf"{REFERENCE_CONFIG_NAME}: missing field '{field}'"):
        AdapterSet.load(adapter)


def test_reference_config_unknown_target_module(lm, tmp_path):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    edit_json(adapter / REFERENCE_CONFIG_NAME, lambda c: c["target_modules"].append("foo_proj"))
    with pytest.raises(CheckpointError, match=r"target_modules \['foo_proj'\] are not supported"):
        AdapterSet.load(adapter)


# ---- 3. a pickle that is not a plain tensor dict ------------------------------------------------
EXECUTED: list[str] = []


def record_execution(what: str) -> None:
    EXECUTED.append(what)


class Payload:
    """Unpickling this calls `record_execution`: arbitrary code, exactly what weights_only=True must refuse."""

    def __reduce__(self):
        return (record_execution, ("payload ran",))


class Opaque:
    """An arbitrary (harmless) custom object: not allowed in a weights-only pickle either."""

    def __init__(self):
        self.value = 42


@pytest.mark.parametrize("obj", [Payload, Opaque])
def test_reference_weights_with_custom_object_refused(lm, tmp_path, capsys, obj):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    edit_state_dict(adapter / REFERENCE_WEIGHTS_NAME, lambda sd: sd.__setitem__("evil", obj()))
    EXECUTED.clear()
    with pytest.raises(CheckpointError, match=rf"{REFERENCE_WEIGHTS_NAME}: not a readable torch state dict"):
        AdapterSet.load(adapter)
    assert "not a readable torch state dict" in cli_forward(capsys, tmp_path, lm / "base", adapter)
    assert EXECUTED == [], "the pickle's payload was executed"
    if obj is Payload:  # control: the payload is live, a plain (unsafe) unpickling does run it
        torch.load(str(adapter / REFERENCE_WEIGHTS_NAME), weights_only=False)
        assert EXECUTED == ["payload ran"]


@pytest.mark.parametrize("content", [[torch.zeros(2)], {"a": 1, "b": torch.zeros(2)}, {"a": {"b": torch.zeros(2)}}])
def test_reference_weights_not_a_flat_tensor_dict(lm, tmp_path, content):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    torch.save(content, str(adapter / REFERENCE_WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=rf"{REFERENCE_WEIGHTS_NAME}: expected a flat dict of tensors"):
        AdapterSet.load(adapter)


def test_reference_weights_without_lora_experts(lm, tmp_path):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    torch.save({"something.else": torch.zeros(2)}, str(adapter / REFERENCE_WEIGHTS_NAME))
    with pytest.raises(CheckpointError, match=r"no LoRA expert weights found"):
        AdapterSet.load(adapter)


# ---- 4. unequal λ copies ------------------------------------------------------------------------
def test_unequal_lambda_copies(lm, tmp_path, capsys):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    owner = "base_model.model.model.layers.1.mlp.up_proj"
    key = f"{owner}.sparsegen.mlp.proj_layers.64.0.weight"

    def perturb(sd):
        assert key in sd
        sd[key] = sd[key].clone()
        sd[key][0, 0] += 1e-3

    edit_state_dict(adapter / REFERENCE_WEIGHTS_NAME, perturb)
    with pytest.raises(CheckpointError, match=rf"λ-network copies differ: .*{owner}\.64\.0\.weight"):
        AdapterSet.load(adapter)
    err = run_cli(capsys, ["import", str(adapter), "--out", str(tmp_path / "native")])
    assert "λ-network copies differ" in err and owner in err


def test_lambda_copy_missing_a_part(lm, tmp_path):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")
    owner = "base_model.model.model.layers.0.self_attn.v_proj"
    edit_state_dict(
        adapter / REFERENCE_WEIGHTS_NAME, lambda sd: sd.pop(f"{owner}.sparsegen.mlp.proj_layers.128.2.bias")
    )
    with pytest.raises(CheckpointError, match=rf"λ-network copy in {owner} has parts"):
        AdapterSet.load(adapter)


# ---- 5./6. adapters that do not fit the base ----------------------------------------------------
def test_adapter_layer_count_mismatch(lm, tmp_path, capsys):
    adapter = copy_dir(lm / "adapter", tmp_path / "adapter")

    def drop_layer_1(sd):
        for k in [k for k in sd if ".layers.1." in k]:
            del sd[k]

    edit_state_dict(adapter / REFERENCE_WEIGHTS_NAME, drop_layer_1)
    assert load_reference(adapter).config.num_layers == 1  # on its own it is a valid 1-layer adapter
    with pytest.raises(AdapterMismatchError, match=r"x: adapter has 1 layers, base model has 2"):
        LDMoleRuntime.from_pretrained(lm / "base", adapters={"x": adapter})
    assert "adapter has 1 layers, base model has 2" in cli_forward(capsys, tmp_path, lm / "base", adapter)
    err = run_cli(capsys, ["import", str(adapter), "--out", str(tmp_path / "native"), "--base", str(lm / "base")])
    assert "adapter has 1 layers, base model has 2" in err


def test_adapter_widths_mismatch(official_fixtures, lm, tmp_path, capsys):
    cls_adapter = official_fixtures / "qwen3-cls" / "adapter"  # intermediate 192, kv width 64
    match = r"x: k_proj is \(in=64, out=64\) in the adapter but \(in=64, out=32\) in the base model"
    with pytest.raises(AdapterMismatchError, match=match):
        LDMoleRuntime.from_pretrained(lm / "base", adapters={"x": cls_adapter})
    err = cli_forward(capsys, tmp_path, lm / "base", cls_adapter)
    assert "k_proj is (in=64, out=64) in the adapter but (in=64, out=32) in the base model" in err


def test_adapter_mlp_widths_mismatch(official_fixtures, lm, tmp_path):
    """Only the MLP targeted: the intermediate width (192 vs 128) is what does not fit."""
    cls_native = load_reference(official_fixtures / "qwen3-cls" / "adapter").save(tmp_path / "cls")
    edit_json(cls_native / CONFIG_NAME, lambda c: c.update(target_modules=["gate_proj", "up_proj", "down_proj"]))
    attention = (".q_proj.", ".k_proj.", ".v_proj.", ".o_proj.")
    edit_safetensors(cls_native / WEIGHTS_NAME, lambda t: [t.pop(k) for k in list(t) if any(p in k for p in attention)])
    rt = LDMoleRuntime.from_pretrained(lm / "base")
    with pytest.raises(AdapterMismatchError, match=r"cls: gate_proj is \(in=64, out=192\) .* \(in=64, out=128\)"):
        rt.load_adapter("cls", cls_native)


def test_adapter_hidden_size_mismatch(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    adapter = AdapterSet.load(native)
    adapter.config.hidden_size = 96
    rt = LDMoleRuntime.from_pretrained(lm / "base")
    with pytest.raises(AdapterMismatchError, match=r"y: adapter hidden size 96 != base hidden size 64"):
        rt.load_adapter("y", adapter)


# ---- 7. target modules (native format) ----------------------------------------------------------
def test_native_unknown_target_module(lm, tmp_path, capsys):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.update(target_modules=["q_proj", "foo_proj"]))
    with pytest.raises(CheckpointError, match=r"target_modules \['foo_proj'\] are not projections"):
        AdapterSet.load(native)
    assert "foo_proj" in cli_forward(capsys, tmp_path, lm / "base", native)


def test_native_empty_target_modules(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.update(target_modules=[]))
    with pytest.raises(CheckpointError, match=r"target_modules \[\] are not projections"):
        AdapterSet.load(native)


def test_native_target_module_without_tensors(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    edit_safetensors(native / WEIGHTS_NAME, lambda t: [t.pop(k) for k in list(t) if ".down_proj." in k])
    with pytest.raises(
        CheckpointError, match=r"adapter\.safetensors: missing tensors \['layers\.0\.down_proj\.lora_A'"
    ):
        AdapterSet.load(native)


def test_native_target_module_without_projection_shape(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c["projection_shapes"].pop("down_proj"))
    with pytest.raises(CheckpointError, match=r"projection_shapes has no \[in, out\] for .*down_proj"):
        AdapterSet.load(native)


def test_native_tensors_not_in_target_modules(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c["target_modules"].remove("o_proj"))
    with pytest.raises(CheckpointError, match=r"unexpected tensors \['layers\.0\.o_proj\.lora_A'"):
        AdapterSet.load(native)


# ---- 8. router kind -----------------------------------------------------------------------------
def test_native_unknown_router_kind(lm, tmp_path, capsys):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.update(router="banana"))
    known = r"\['none', 'softmax', 'sparsegen', 'threshold', 'topk'\]"
    with pytest.raises(CheckpointError, match=r"unknown router kind 'banana'; known: " + known):
        AdapterSet.load(native)
    with pytest.raises(CheckpointError, match=r"unknown router kind 'banana'"):
        LDMoleRuntime.from_pretrained(lm / "base", adapters={"x": native})
    err = cli_forward(capsys, tmp_path, lm / "base", native)
    assert "unknown router kind 'banana'" in err and "sparsegen" in err


# ---- 9. native files ----------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_native_weights_corrupt(lm, tmp_path, capsys, damage):
    native = native_copy(lm, tmp_path / "native")
    damage_file(native / WEIGHTS_NAME, damage)
    with pytest.raises(CheckpointError, match=rf"{WEIGHTS_NAME}: not a readable safetensors file"):
        AdapterSet.load(native)
    assert "not a readable safetensors file" in cli_forward(capsys, tmp_path, lm / "base", native)


@pytest.mark.parametrize("name", [CONFIG_NAME, WEIGHTS_NAME])
def test_native_file_missing(lm, tmp_path, name):
    native = native_copy(lm, tmp_path / "native")
    (native / name).unlink()
    with pytest.raises(CheckpointError, match=rf"missing {name}"):
        AdapterSet.load_native(native)


def test_native_config_not_json(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    (native / CONFIG_NAME).write_text("{'router': 'sparsegen'}")
    with pytest.raises(CheckpointError, match=rf"{CONFIG_NAME}: not valid JSON"):
        AdapterSet.load(native)


def test_native_config_unknown_field(lm, tmp_path, capsys):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.update(expert_capacity=2))
    with pytest.raises(CheckpointError, match=r"unknown fields \['expert_capacity'\]"):
        AdapterSet.load(native)
    assert "unknown fields ['expert_capacity']" in cli_forward(capsys, tmp_path, lm / "base", native)


def test_native_config_missing_field(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.pop("num_experts"))
    with pytest.raises(CheckpointError, match=r"num_experts"):
        AdapterSet.load(native)


@pytest.mark.parametrize("field, value", [("num_experts", "8"), ("rank", 4.5), ("alpha", "eight"),
                                          ("target_modules", "q_proj"), ("num_layers", None)])
def test_native_config_wrong_type(lm, tmp_path, field, value):
    native = native_copy(lm, tmp_path / "native")
    edit_json(native / CONFIG_NAME, lambda c: c.update({field: value}))
    with pytest.raises(CheckpointError, match=rf"field\(s\) \['{field}'\] have the wrong type"):
        AdapterSet.load(native)


def test_native_tensor_wrong_shape(lm, tmp_path, capsys):
    native = native_copy(lm, tmp_path / "native")
    name = "layers.1.v_proj.lora_B"
    edit_safetensors(native / WEIGHTS_NAME, lambda t: t.__setitem__(name, torch.zeros(8, 32, 5)))
    with pytest.raises(CheckpointError, match=rf"tensor {name} has shape \(8, 32, 5\), config implies \(8, 32, 4\)"):
        AdapterSet.load(native)
    assert name in cli_forward(capsys, tmp_path, lm / "base", native)


def test_native_tensor_not_float(lm, tmp_path):
    native = native_copy(lm, tmp_path / "native")
    name = "layers.0.q_proj.router"
    edit_safetensors(native / WEIGHTS_NAME, lambda t: t.__setitem__(name, t[name].long()))
    with pytest.raises(CheckpointError, match=rf"tensor {name} is torch.int64"):
        AdapterSet.load(native)


# ---- 10. `ldmole forward` inputs ----------------------------------------------------------------
def test_cli_inputs_without_input_ids(lm, tmp_path, capsys):
    inputs = inputs_file(tmp_path, tokens=torch.tensor([[1, 2, 3]]))
    err = cli_forward(capsys, tmp_path, lm / "base", inputs=inputs)
    assert "no 'input_ids' tensor (found ['tokens'])" in err


@pytest.mark.parametrize("ids", [torch.tensor([[1.0, 2.0, 3.0]]), torch.tensor([1, 2, 3])], ids=["float", "1-D"])
def test_cli_inputs_bad_input_ids(lm, tmp_path, capsys, ids):
    err = cli_forward(capsys, tmp_path, lm / "base", inputs=inputs_file(tmp_path, input_ids=ids))
    assert "input_ids must be an integer tensor [B, T]" in err


@pytest.mark.parametrize("content", [None, GARBAGE])
def test_cli_inputs_unreadable(lm, tmp_path, capsys, content):
    inputs = tmp_path / "in.safetensors"
    if content is not None:
        inputs.write_bytes(content)
    err = cli_forward(capsys, tmp_path, lm / "base", inputs=inputs)
    assert "in.safetensors: not a readable safetensors file" in err


def test_cli_token_ids_out_of_range(lm, tmp_path, capsys):
    err = cli_forward(capsys, tmp_path, lm / "base", inputs=inputs_file(tmp_path, input_ids=torch.tensor([[1, 512]])))
    assert "token ids must lie in [0, 512)" in err


# ---- 11. runtime forward ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def runtime(official_fixtures) -> LDMoleRuntime:
    root = official_fixtures / "qwen3-lm"
    return LDMoleRuntime.from_pretrained(root / "base", adapters={"math": root / "adapter"})


@pytest.mark.parametrize("ids", [[[1, 2, 512]], [[-1, 2, 3]]])
def test_forward_token_ids_out_of_range(runtime, ids):
    with pytest.raises(LDMoleError, match=r"token ids must lie in \[0, 512\)"):
        runtime.forward(torch.tensor(ids), "math")


def test_forward_unknown_adapter_name(runtime):
    with pytest.raises(LDMoleError, match=r"unknown adapter set 'physics'; loaded: \['math'\]"):
        runtime.forward(torch.tensor([[1, 2, 3]]), "physics")
    with pytest.raises(LDMoleError, match=r"unknown adapter set 'physics'"):
        runtime.forward(torch.tensor([[1, 2, 3], [4, 5, 6]]), ["math", "physics"])


def test_forward_bad_arguments(runtime):
    with pytest.raises(LDMoleError, match=r"input_ids must be \[batch, tokens\], got shape \(3,\)"):
        runtime.forward(torch.tensor([1, 2, 3]))
    with pytest.raises(LDMoleError, match=r"got 1 adapter names for 2 rows"):
        runtime.forward(torch.tensor([[1, 2], [3, 4]]), ["math"])
    with pytest.raises(LDMoleError, match=r"unknown lora_backend 'fast'"):
        runtime.forward(torch.tensor([[1, 2]]), mode="fast")


def test_unknown_dtype(lm):
    with pytest.raises(LDMoleError, match=r"unknown dtype 'fp8'"):
        LDMoleRuntime.from_pretrained(lm / "base", dtype="fp8")


def test_duplicate_adapter_name_and_bad_set_index(runtime, lm):
    with pytest.raises(LDMoleError, match=r"adapter set named 'math' is already loaded"):
        runtime.load_adapter("math", lm / "adapter")
    with pytest.raises(LDMoleError, match=r"adapter-set index 3 names no loaded set \(loaded: \[0\]"):
        runtime.forward(torch.tensor([[1, 2, 3]]), torch.tensor([3]))
