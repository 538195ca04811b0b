"""Each term of the LD-MoLE objective against numbers worked out by hand (and the routing math)."""

import pytest
import torch

from ldmole_runtime.lora.routing import sparsegen_lin
from ldmole_runtime.training.losses import (
    LossWeights,
    TrainingCapture,
    lambda_lower_bound,
    lambda_term,
    load_balance,
    objective,
    sparsity_control,
)


def test_load_balance_by_hand():
    p = torch.tensor([[0.5, 0.5, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 1.0]])
    mask = torch.tensor([True, True, False])  # the last token is padding
    # activations of real tokens: expert 0 twice, expert 1 once -> freq = [2/3, 1/3, 0, 0]
    # mean weights over 2 real tokens -> prop = [0.75, 0.25, 0, 0]
    expected = 4 * (2 / 3 * 0.75 + 1 / 3 * 0.25)
    assert load_balance(p, mask).item() == pytest.approx(expected, abs=1e-6)
    uniform = torch.full((5, 4), 0.25)
    assert load_balance(uniform, torch.ones(5, dtype=torch.bool)).item() == pytest.approx(1.0, abs=1e-6)


def test_lambda_lower_bound_is_where_sparsegen_crosses_k_experts():
    u = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.3, 0.2, 0.25, 0.1]])
    lower = lambda_lower_bound(u, k=2)
    # row 0: sorted [3, 1, 0, -1], U_2 = 4, s_3 = 0 -> 1 - (4 - 2 * 0) = -3
    assert lower[0].item() == pytest.approx(-3.0)
    # row 1: sorted [0.3, 0.25, 0.2, 0.1], U_2 = 0.55, s_3 = 0.2 -> 1 - (0.55 - 0.4) = 0.85
    assert lower[1].item() == pytest.approx(0.85, abs=1e-6)
    for shift, at_most_k in ((1e-3, True), (-1e-3, False)):
        active = (sparsegen_lin(u, lower + shift) > 0).sum(-1)
        assert bool((active <= 2).all()) == at_most_k


def test_sparsity_control_and_lambda_term_by_hand():
    u = torch.tensor([[3.0, 1.0, 0.0, -1.0], [0.3, 0.2, 0.25, 0.1], [9.0, 0.0, 0.0, 0.0]])
    lam = torch.tensor([-5.0, 0.9, -100.0], requires_grad=True)
    mask = torch.tensor([True, True, False])
    # relu(lower - λ): row 0: -3 - (-5) = 2; row 1: 0.85 - 0.9 < 0 -> 0; row 2 is padding
    assert sparsity_control(u, lam, mask, k=2).item() == pytest.approx(1.0, abs=1e-6)
    assert lambda_term(lam, mask).item() == pytest.approx(((1 + 5) + (1 - 0.9)) / 2, abs=1e-6)
    sparsity_control(u, lam, mask, k=2).backward()
    assert lam.grad.tolist() == pytest.approx([-0.5, 0.0, 0.0])  # only λ learns; it is pushed up


def test_objective_weights_the_terms():
    g = torch.Generator().manual_seed(0)
    cap = TrainingCapture()
    mask = torch.tensor([True, True, True, False])
    for key in ("0.q_proj", "0.k_proj"):
        u = torch.randn(4, 4, generator=g)
        lam = torch.randn(4, generator=g) * 0.3
        cap.record(key, None, sparsegen_lin(u, lam), lam=lam, u=u)
    ce = torch.tensor(2.0)
    w = LossWeights(ce=0.5, lb=0.3, reg=2.0, lam=0.1, k=2)
    terms = objective(ce, cap, mask, w)
    lb = (load_balance(cap.p["0.q_proj"], mask) + load_balance(cap.p["0.k_proj"], mask)) / 2
    sc = (sparsity_control(cap.u["0.q_proj"], cap.lam["0.q_proj"], mask, 2)
          + sparsity_control(cap.u["0.k_proj"], cap.lam["0.k_proj"], mask, 2)) / 2
    lt = (lambda_term(cap.lam["0.q_proj"], mask) + lambda_term(cap.lam["0.k_proj"], mask)) / 2
    assert terms["loss"].item() == pytest.approx(
        0.5 * 2.0 + 0.3 * lb.item() + 2.0 * sc.item() + 0.1 * lt.item(), abs=1e-6
    )
    active = sum(((cap.p[k] > 0).sum(-1).float()[:3].mean()) for k in cap.p) / 2
    assert terms["active_experts"].item() == pytest.approx(active.item(), abs=1e-6)
