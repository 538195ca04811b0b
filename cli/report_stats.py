"""Routing statistics: how an LD-MoLE adapter set routes real text.

`routing_statistics` runs the adapter over batches of (input_ids, attention_mask) and accumulates,
over the real (mask == 1) tokens only, running sums per (layer, projection): how many experts are
active (p > 0), how often and how strongly each expert is used, and the learned λ. Only those sums
are kept between batches, never the routing tensors themselves.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator

import numpy as np
import torch

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS, PROJECTION_GROUPS
from ldmole_runtime.errors import LDMoleError

# ---- statistics -----------------------------------------------------------------------------------

def _adapted_projections(runtime, set_index: int) -> list[str]:
    """The projections this adapter set adapts, in decoder-layer order."""
    slot = runtime.bank.at(set_index)
    projs = []
    for group, members in PROJECTION_GROUPS.items():
        if group not in slot.group_masks:
            continue
        mask = slot.group_masks[group]
        keep = [True] * len(members) if mask is None else [bool(v) for v in mask.reshape(-1).tolist()]
        projs += [p for p, k in zip(members, keep, strict=True) if k]
    return [p for p in ALL_PROJECTIONS if p in projs]


BINS_PER_EXPERT = 4


def per_token_mean_bin_edges(num_experts: int) -> np.ndarray:
    """Bins of the per-token mean active-expert count: width 1/4 over [1, E], each [lo, hi) but the
    last [lo, E] (one bin [0.5, 1.5] for E = 1)."""
    if num_experts <= 1:
        return np.array([0.5, 1.5])
    return 1.0 + np.arange(BINS_PER_EXPERT * (num_experts - 1) + 1) / BINS_PER_EXPERT


def _check_batch(item, index: int) -> tuple[torch.Tensor, torch.Tensor]:
    if isinstance(item, torch.Tensor):
        ids, mask = item, None
    else:
        try:
            ids, mask = item
        except (TypeError, ValueError):
            raise LDMoleError(f"batch {index}: expected a pair (input_ids [B, T], attention_mask [B, T]), "
                              f"got {type(item).__name__}") from None
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2:
        raise LDMoleError(f"batch {index}: input_ids must be a [batch, tokens] tensor, got "
                          f"{tuple(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__}")
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise LDMoleError(f"batch {index}: input_ids must be integer token ids, got dtype {ids.dtype}")
    if mask is None:
        mask = torch.ones_like(ids, dtype=torch.bool)
    if not isinstance(mask, torch.Tensor) or tuple(mask.shape) != tuple(ids.shape):
        raise LDMoleError(f"batch {index}: attention_mask must have the shape of input_ids {tuple(ids.shape)}, got "
                          f"{tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__}")
    if mask.numel() and not ((mask == 0) | (mask == 1)).all():
        raise LDMoleError(f"batch {index}: attention_mask must hold only 0 and 1")
    return ids, mask.bool()


def routing_statistics(runtime, adapter: str, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                       lora_backend: str = "sparse") -> dict:
    """Routing statistics of adapter set `adapter` over the real tokens of `batches`.

    Each batch is (input_ids [B, T], attention_mask [B, T]); rows may be right-padded with any
    token id, only positions with mask == 1 count. Returns a JSON-friendly dict (lists, floats;
    NaN where a value does not exist, e.g. λ for routers without λ); see `write_report`.
    """
    if not isinstance(adapter, str):
        raise LDMoleError(f"adapter must be the name of a loaded adapter set, got {adapter!r}")
    set_index = runtime.adapter_index(adapter)  # raises LDMoleError for unknown names
    slot = runtime.bank.at(set_index)
    E, L = slot.num_experts, runtime.cfg.num_layers
    projs = _adapted_projections(runtime, set_index)
    P = len(projs)
    if P == 0:
        raise LDMoleError(f"adapter set {adapter!r} adapts no projection: there is no routing to report")
    keys = [f"{layer}.{proj}" for layer in range(L) for proj in projs]
    M = len(keys)
    edges = per_token_mean_bin_edges(E)

    tokens = 0
    k_hist = torch.zeros(M, E + 1, dtype=torch.float64)  # decisions with k active experts, k = 0..E
    act = torch.zeros(M, E, dtype=torch.float64)  # times expert e was active
    psum = torch.zeros(M, E, dtype=torch.float64)  # sum of p_e
    lam_sum = torch.zeros(M, dtype=torch.float64)
    lam_sq = torch.zeros(M, dtype=torch.float64)
    lam_n = torch.zeros(M, dtype=torch.float64)
    tok_hist = np.zeros(len(edges) - 1, dtype=np.int64)
    tok_sum = tok_sq = 0.0
    tok_min, tok_max = math.inf, -math.inf

    for b, item in enumerate(batches):
        ids, mask = _check_batch(item, b)
        if not mask.any():
            continue
        out = runtime.forward(ids, adapters=adapter, lora_backend=lora_backend, capture_routing=True)
        mask = mask.to(out.hidden.device)
        missing = [k for k in keys if k not in out.routing]
        if missing:
            raise LDMoleError(f"the runtime recorded no routing for {missing[:3]} of adapter set {adapter!r}")
        n = int(mask.sum())
        r = torch.stack([out.routing[k][..., :E][mask] for k in keys]).double().cpu()  # [M, n, E]
        lam = torch.stack([out.lambdas[k][mask] for k in keys]).double().cpu()  # [M, n]
        del out
        active = r > 0
        k = active.sum(-1)  # [M, n]
        offsets = torch.arange(M)[:, None] * (E + 1)
        k_hist += torch.bincount((k + offsets).reshape(-1), minlength=M * (E + 1)).view(M, E + 1).double()
        act += active.sum(1).double()
        psum += r.sum(1)
        finite = ~torch.isnan(lam)
        lam0 = torch.where(finite, lam, torch.zeros_like(lam))
        lam_sum += lam0.sum(1)
        lam_sq += (lam0 * lam0).sum(1)
        lam_n += finite.sum(1).double()
        total = k.sum(0)  # [n]: active experts summed over layers and projections (an integer)
        per_token = total.double().numpy() / M  # its mean across layers and projections
        # bin in integers, so a mean on a bin edge lands in the bin it starts (the last bin is closed)
        bins = ((total - M) * BINS_PER_EXPERT).div(M, rounding_mode="floor").clamp(0, len(tok_hist) - 1)
        tok_hist += np.bincount(bins.numpy(), minlength=len(tok_hist))
        tok_sum += float(per_token.sum())
        tok_sq += float((per_token ** 2).sum())
        tok_min, tok_max = min(tok_min, float(per_token.min())), max(tok_max, float(per_token.max()))
        tokens += n

    if tokens == 0:
        raise LDMoleError("no real tokens to report on: the batches are empty or their attention masks are all 0")

    def grid(x: torch.Tensor) -> list:  # [M, ...] -> nested [L][P][...] lists
        return x.reshape(L, P, *x.shape[1:]).tolist()

    ks = torch.arange(E + 1, dtype=torch.float64)
    mean_active = (k_hist * ks).sum(1) / tokens  # [M]
    total_act = act.sum(1, keepdim=True)  # [M, 1]
    freq = act / total_act.clamp(min=1)  # share of module m's activations that go to expert e
    prop = psum / tokens  # mean weight p_e
    rate = act / tokens  # fraction of tokens for which expert e is active
    switch = E * (freq * prop).sum(1)  # [M]: 1 for perfectly balanced routing
    cv = freq.std(1, unbiased=False) / freq.mean(1)  # [M]
    overall_freq = act.sum(0) / act.sum()
    overall_prop = psum.sum(0) / (tokens * M)
    overall_cv = float(overall_freq.std(unbiased=False) / overall_freq.mean())

    lam_mean = torch.where(lam_n > 0, lam_sum / lam_n.clamp(min=1), torch.full_like(lam_sum, math.nan))
    has_lambda = bool((lam_n > 0).any())
    if has_lambda:
        n_all = float(lam_n.sum())
        lam_overall = float(lam_sum.sum()) / n_all
        lam_overall_std = math.sqrt(max(float(lam_sq.sum()) / n_all - lam_overall ** 2, 0.0))
    else:
        lam_overall = lam_overall_std = math.nan

    by_proj = {}
    for j, proj in enumerate(projs):
        rows = [layer * P + j for layer in range(L)]
        by_proj[proj] = {"freq": freq[rows].mean(0).tolist(), "prop": prop[rows].mean(0).tolist(),
                         "activation_rate": rate[rows].mean(0).tolist(),
                         "mean_active": float(mean_active[rows].mean()),
                         "histogram": k_hist[rows, 1:].sum(0).long().tolist()}

    hist = k_hist.sum(0)
    tok_mean = tok_sum / tokens
    return {
        "adapter": adapter,
        "router": slot.router_kind,
        "lora_backend": lora_backend,
        "num_experts": E,
        "num_layers": L,
        "projections": projs,
        "tokens": tokens,
        "decisions": tokens * M,
        "mean_active_experts": float(mean_active.mean()),
        "active_experts": {
            "mean": grid(mean_active),  # [L][P]: heatmap data
            "histogram": {  # over every (token, layer, projection) decision
                "k": list(range(1, E + 1)),
                "counts": hist[1:].long().tolist(),
                "fraction": (hist[1:] / hist.sum()).tolist(),
                "zero_active": int(hist[0]),  # decisions with no active expert (0 for sparsegen)
            },
            "per_token_mean": {  # per token: mean active experts over all layers and projections
                "bin_edges": edges.tolist(),
                "counts": tok_hist.tolist(),
                "mean": tok_mean,
                "std": math.sqrt(max(tok_sq / tokens - tok_mean ** 2, 0.0)),
                "min": tok_min,
                "max": tok_max,
            },
        },
        "expert_usage": {
            "freq": grid(freq),  # [L][P][E]: share of the module's activations going to expert e
            "prop": grid(prop),  # [L][P][E]: mean routing weight p_e
            "activation_rate": grid(rate),  # [L][P][E]: fraction of tokens with expert e active
            "overall_freq": overall_freq.tolist(),  # [E], over all modules
            "overall_prop": overall_prop.tolist(),  # [E]
            "by_projection": by_proj,  # per projection type, averaged over layers
            "load_balance": {
                "uniform_share": 1.0 / E,
                "cv_overall": overall_cv,  # coefficient of variation of overall_freq (0 = balanced)
                "cv_per_module_mean": float(cv.mean()),
                "cv_per_module": grid(cv),
                "switch_balance_mean": float(switch.mean()),  # E * sum_e freq_e * prop_e (1 = balanced)
                "switch_balance_per_module": grid(switch),
            },
        },
        "lambda": {
            "available": has_lambda,
            "mean": grid(lam_mean),  # [L][P], NaN where the router has no λ
            "overall_mean": lam_overall,
            "overall_std": lam_overall_std,
        },
    }


# ---- batching text ----------------------------------------------------------------------------------

def _pad_id(tokenizer) -> int:
    for attr in ("pad_token_id", "eos_token_id"):
        v = getattr(tokenizer, attr, None)
        if isinstance(v, (list, tuple)):
            v = v[0] if v else None
        if isinstance(v, int):
            return v
    return 0


def text_batches(
    tokenizer, texts: list[str], batch_size: int, max_length: int
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Tokenize `texts` and yield (input_ids [B, T], attention_mask [B, T]) batches, right-padded
    to the longest row of each batch with the tokenizer's pad id (or its eos id, or 0); rows are
    truncated to `max_length` tokens."""
    if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
        raise LDMoleError("texts must be a list of strings")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise LDMoleError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(max_length, int) or max_length < 1:
        raise LDMoleError(f"max_length must be a positive integer, got {max_length!r}")
    pad = _pad_id(tokenizer)
    texts = list(texts)
    for start in range(0, len(texts), batch_size):
        chunk = texts[start:start + batch_size]
        rows = [list(tokenizer(t, truncation=True, max_length=max_length)["input_ids"])[:max_length] for t in chunk]
        T = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), T), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        for i, r in enumerate(rows):
            if r:
                ids[i, :len(r)] = torch.tensor(r, dtype=torch.long)
                mask[i, :len(r)] = 1
        yield ids, mask
