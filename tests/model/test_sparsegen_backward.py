"""sparsegen-lin's written-out backward gives autograd's own gradients of the forward's ops."""

import pytest
import torch

from ldmole_runtime.lora.routing import SPARSEGEN_EPS, _sparsegen_forward, sparsegen_lin


@pytest.mark.parametrize("shape, lam_shape", [((64, 3, 8), (64, 1)), ((40, 4), (40,)), ((30, 2, 16), (30, 1))])
@pytest.mark.parametrize("scale", [0.05, 1.0, 6.0])
def test_sparsegen_backward_equals_autograd(shape, lam_shape, scale):
    g = torch.Generator().manual_seed(int(scale * 100) + shape[-1])
    u = torch.randn(shape, generator=g) * scale
    u[1, ..., :2] = u[1, ..., 2:4]  # ties among the logits
    lam = torch.rand(lam_shape, generator=g) * 3 - 2
    lam[0] = 0.995  # 1 - λ under the eps floor
    lam[2] = 1 - SPARSEGEN_EPS  # exactly at it
    weights = torch.randn(shape, generator=g)
    ours_u, ours_lam = u.clone().requires_grad_(), lam.clone().requires_grad_()
    p = sparsegen_lin(ours_u, ours_lam)
    (p * weights).sum().backward()
    ref_u, ref_lam = u.clone().requires_grad_(), lam.clone().requires_grad_()
    p_ref = _sparsegen_forward(ref_u.float(), ref_lam.float().unsqueeze(-1), SPARSEGEN_EPS)[0]
    (p_ref * weights).sum().backward()
    assert torch.equal(p, p_ref)
    assert 1 < int((p > 0).sum(-1).max()) and int((p > 0).sum(-1).min()) == 1  # sparse and dense rows alike
    torch.testing.assert_close(ours_u.grad, ref_u.grad, rtol=1e-5, atol=1e-5)
    scale_lam = ref_lam.grad.abs().max().item()
    torch.testing.assert_close(ours_lam.grad, ref_lam.grad, rtol=1e-5, atol=1e-6 * max(scale_lam, 1.0))


def test_sparsegen_without_autograd_skips_the_function():
    u, lam = torch.randn(5, 8), torch.zeros(5)
    with torch.no_grad():
        p = sparsegen_lin(u.requires_grad_(), lam)
    assert p.grad_fn is None and torch.allclose(p.sum(-1), torch.ones(5))
