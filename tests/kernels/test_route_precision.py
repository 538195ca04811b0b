"""The routing GEMMs run on tensor cores as tf32x3 (kernels/triton/routing.py, ROUTE_PRECISION). Triton's
interpreter computes every tl.dot in fp32 whatever its input_precision, so here its dot is replaced by
the arithmetic a GPU does: Triton splits each fp32 operand into a tf32 part (cvt.rna, round half away)
and the remainder, the tensor core reads its operands' top 10 mantissa bits (the low 13 are dropped),
and  a·b = a_small·b_big + a_big·b_small + a_big·b_big  accumulates in fp32. Under that emulation the
reference code's fixtures must still hold on the triton backend: the same tolerance and the same
selected experts as in fp32 (tests/model/test_reference_fidelity.py, test_adamole.py). A single tf32
pass does not hold them, which shows that the check can fail."""

from contextlib import contextmanager

import numpy as np
import pytest
from safetensors.torch import load_file, save_file

from ldmole_cli.main import main
from ldmole_kernels.triton import routing

TOL = 1e-4
LOW_BITS = np.uint32(0xFFFFE000)  # tf32 keeps fp32's sign, exponent and top 10 mantissa bits


def _finite(x):
    return (x.view(np.uint32) & np.uint32(0x7F800000)) != np.uint32(0x7F800000)


def _tf32_round(x):  # cvt.rna.tf32.f32
    bits = x.view(np.uint32)
    return np.where(_finite(x), (bits + np.uint32(0x1000)) & LOW_BITS, bits).view(np.float32)


def _tf32_read(x):  # how a tf32 MMA reads an fp32 register
    return (x.view(np.uint32) & LOW_BITS).view(np.float32)


def _dot_tf32x3(a, b):
    a_big, b_big = _tf32_round(a), _tf32_round(b)
    a_small, b_small = _tf32_read(a - a_big), _tf32_read(b - b_big)
    return (np.matmul(a_small, b_big, dtype=np.float32) + np.matmul(a_big, b_small, dtype=np.float32)
            + np.matmul(a_big, b_big, dtype=np.float32))


def _dot_tf32(a, b):
    return np.matmul(_tf32_read(_tf32_round(a)), _tf32_read(_tf32_round(b)), dtype=np.float32)


@contextmanager
def gpu_dot_arithmetic():
    """The interpreter's tl.dot with fp32 operands, as a GPU computes each input_precision."""
    from triton._C.libtriton import ir
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    emulated = {ir.INPUT_PRECISION.TF32x3: _dot_tf32x3, ir.INPUT_PRECISION.TF32: _dot_tf32}
    calls = {name: 0 for name in emulated}

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        dot = emulated.get(input_precision)
        if dot is None or a.data.dtype != np.float32 or b.data.dtype != np.float32:
            return original(self, a, b, d, input_precision, max_num_imprecise_acc)
        calls[input_precision] += 1
        return interpreter.TensorHandle(dot(a.data, b.data) + d.data, d.dtype.scalar)

    builder.create_dot = create_dot
    try:
        yield calls
    finally:
        builder.create_dot = original


def _forward(root, tmp_path):
    expected = load_file(str(root / "expected.safetensors"))
    save_file({"input_ids": expected["input_ids"]}, str(tmp_path / "in.safetensors"))
    assert main(["forward", "--base", str(root / "base"), "--adapter", str(root / "adapter"), "--inputs",
                 str(tmp_path / "in.safetensors"), "--out", str(tmp_path / "out.safetensors"),
                 "--dtype", "float32", "--lora-backend", "triton"]) == 0
    return load_file(str(tmp_path / "out.safetensors")), expected


def _mismatches(got, expected) -> list[str]:
    """What differs from the reference code's outputs beyond the fp32 tolerance, or in the experts chosen."""
    bad = []
    for key in sorted(expected):
        if key.startswith(("logits", "routing.", "lambda.", "threshold.")):
            if (got[key] - expected[key]).abs().max() > TOL:
                bad.append(f"{key}: {(got[key] - expected[key]).abs().max():.2e}")
            if key.startswith("routing.") and not ((got[key] > 0) == (expected[key] > 0)).all():
                bad.append(f"{key}: active experts differ")
    return bad


CASES = {"ldmole": ("official-ldmole", "qwen3-lm"), "adamole": ("official-adamole", "llama-lm")}


@pytest.mark.parametrize("case", sorted(CASES))
def test_fixtures_hold_with_routing_on_tensor_cores(official_fixtures, tmp_path, case):
    root = official_fixtures.parent.joinpath(*CASES[case])
    assert routing.ROUTE_PRECISION == "tf32x3"
    with gpu_dot_arithmetic() as calls:
        got, expected = _forward(root, tmp_path)
    assert sum(calls.values()) > 0, "the routing GEMMs never reached the emulated tf32x3 dot"
    assert any(k.startswith("routing.") for k in expected)
    assert _mismatches(got, expected) == []



def test_one_tf32_pass_would_not_hold_them(official_fixtures, tmp_path, monkeypatch):
    """The check above can fail: routing GEMMs in a single tf32 pass (~1e-3 relative per product) miss
    the AdaMoLE fixture by ~1e-2 (and flip an expert of the LD-MoLE one)."""
    monkeypatch.setattr(routing, "ROUTE_PRECISION", "tf32")
    with gpu_dot_arithmetic() as calls:
        got, expected = _forward(official_fixtures.parent.joinpath(*CASES["adamole"]), tmp_path)
    assert sum(calls.values()) > 0
    assert _mismatches(got, expected)
