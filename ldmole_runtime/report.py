"""Routing reports: how an LD-MoLE adapter set routes real text, as numbers and pictures.

    stats = routing_statistics(rt, "math", text_batches(tok, texts, batch_size=8, max_length=256))
    write_report(stats, "out/")   # report.json + PNG plots

`routing_statistics` runs the adapter over batches of (input_ids, attention_mask) and accumulates,
over the real (mask == 1) tokens only, running sums per (layer, projection): how many experts are
active (p > 0), how often and how strongly each expert is used, and the learned λ. Only those sums
are kept between batches, never the routing tensors themselves. `run_report` is the whole pipeline
from a base folder, an adapter folder and a list of texts (used by the CLI).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
import torch

from .adapters.spec import ALL_PROJECTIONS, PROJECTION_GROUPS
from .errors import LDMoleError

REPORT_JSON = "report.json"
HEATMAP_PNG = "active_experts_heatmap.png"
HIST_PNG = "experts_per_token_hist.png"
USAGE_PNG = "expert_usage.png"
LAMBDA_PNG = "lambda_heatmap.png"


# ---- statistics -----------------------------------------------------------------------------------

def _adapted_projections(runtime, set_index: int) -> list[str]:
    """The projections this adapter set adapts, in decoder-layer order."""
    slot = runtime.bank.slots[set_index]
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
                       mode: str = "sparse") -> dict:
    """Routing statistics of adapter set `adapter` over the real tokens of `batches`.

    Each batch is (input_ids [B, T], attention_mask [B, T]); rows may be right-padded with any
    token id, only positions with mask == 1 count. Returns a JSON-friendly dict (lists, floats;
    NaN where a value does not exist, e.g. λ for routers without λ); see `write_report`.
    """
    if not isinstance(adapter, str):
        raise LDMoleError(f"adapter must be the name of a loaded adapter set, got {adapter!r}")
    set_index = runtime.adapter_index(adapter)  # raises LDMoleError for unknown names
    slot = runtime.bank.slots[set_index]
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
        out = runtime.forward(ids, adapters=adapter, mode=mode, capture_routing=True)
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
        "mode": mode,
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


# ---- writing the report ----------------------------------------------------------------------------

def _json_safe(x):
    if isinstance(x, dict):
        return {str(k): _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    if isinstance(x, (np.ndarray, torch.Tensor)):
        return _json_safe(x.tolist())
    if isinstance(x, (bool, np.bool_)):
        return bool(x)
    if isinstance(x, (int, np.integer)):
        return int(x)
    if isinstance(x, (float, np.floating)):
        return None if not math.isfinite(float(x)) else float(x)
    return x


def _array(x) -> np.ndarray:
    """Nested lists (None = NaN, as report.json stores it) to a float array."""
    return np.array(_json_safe(x), dtype=float)


def _heatmap(fig, ax, data: np.ndarray, projs: list[str], title: str, cbar_label: str, fmt: str, cmap: str):
    L, P = data.shape
    finite = data[np.isfinite(data)]
    lo, hi = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 1.0)
    if hi - lo < 1e-6:
        lo, hi = lo - 0.5, hi + 0.5
    im = ax.imshow(np.ma.masked_invalid(data), aspect="auto", cmap=cmap, vmin=lo, vmax=hi, interpolation="nearest")
    ax.set_xticks(range(P), projs, rotation=30, ha="right")
    step = max(1, math.ceil(L / 40))
    ax.set_yticks(range(0, L, step))
    ax.set_xlabel("projection")
    ax.set_ylabel("layer")
    ax.set_title(title)
    cbar = fig.colorbar(im, ax=ax, fraction=0.05, pad=0.03, aspect=max(20, 1.2 * L))
    cbar.set_label(cbar_label)
    if L * P <= 600:
        size = 9 if L <= 12 else 8 if L <= 24 else 7
        cmap_obj = im.get_cmap()
        for i in range(L):
            for j in range(P):
                v = data[i, j]
                if not np.isfinite(v):
                    ax.text(j, i, "n/a", ha="center", va="center", fontsize=size, color="gray")
                    continue
                r, g, b, _ = cmap_obj(im.norm(v))
                color = "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"
                ax.text(j, i, format(v, fmt), ha="center", va="center", fontsize=size, color=color)


def _new_figure(width: float, height: float):
    from matplotlib.figure import Figure
    return Figure(figsize=(width, height), dpi=110, layout="constrained")


def write_report(stats: dict, out_dir) -> list[Path]:
    """Write report.json and the PNG plots for `stats` (from `routing_statistics`) into `out_dir`.

    Returns the paths written: report.json, active_experts_heatmap.png, experts_per_token_hist.png,
    expert_usage.png, and lambda_heatmap.png when the router has a λ.
    """
    try:
        import matplotlib  # noqa: F401  (Figure objects are used directly: no pyplot, no display)
    except ImportError:
        raise LDMoleError("writing report plots needs matplotlib: pip install matplotlib") from None
    try:
        E, L = int(stats["num_experts"]), int(stats["num_layers"])
        projs = list(stats["projections"])
        active, usage, lam = stats["active_experts"], stats["expert_usage"], stats["lambda"]
        heat = _array(active["mean"]).reshape(L, len(projs))
    except (KeyError, TypeError, ValueError) as exc:
        raise LDMoleError(f"write_report needs the dict returned by routing_statistics ({exc!r})") from None
    out = Path(out_dir)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LDMoleError(f"cannot create report folder {out}: {exc}") from None
    written = []
    router, tokens = stats.get("router", "?"), stats.get("tokens", "?")
    name = f"adapter {stats.get('adapter', '?')!r} (E = {E}, {router}, {tokens} tokens)"

    path = out / REPORT_JSON
    path.write_text(json.dumps(_json_safe(stats), indent=1, allow_nan=False) + "\n")
    written.append(path)

    # 1. mean active experts per (layer, projection)
    P = len(projs)
    fig = _new_figure(max(6.0, 1.0 * P + 3.2), max(4.0, 0.32 * L + 1.8))
    ax = fig.add_subplot()
    _heatmap(fig, ax, heat, projs,
             f"Mean active experts per token (overall {stats['mean_active_experts']:.2f} of {E})\n{name}",
             "mean active experts (p > 0) per token", ".2f", "viridis")
    written.append(_save(fig, out / HEATMAP_PNG))

    # 2. active experts per decision, and the per-token mean across layers/projections
    fig = _new_figure(12.0, 4.6)
    ax1, ax2 = fig.subplots(1, 2)
    h = active["histogram"]
    frac = _array(h["fraction"])
    ks = np.arange(1, E + 1)
    bars = ax1.bar(ks, 100 * frac, color="tab:blue", edgecolor="black", linewidth=0.5)
    for bar, f in zip(bars, frac, strict=True):
        if f > 0:
            ax1.annotate(f"{100 * f:.1f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                         ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    ax1.set_xticks(ks)
    ax1.set_xlim(0.3, E + 0.7)
    ax1.set_xlabel("active experts (p > 0)")
    ax1.set_ylabel("% of routing decisions")
    ax1.set_title(f"Active experts per (token, layer, projection)\n{int(sum(h['counts']))} decisions")
    ax1.set_ylim(0, max(100 * float(frac.max()) * 1.15, 1.0))
    pt = active["per_token_mean"]
    edges = _array(pt["bin_edges"])
    counts = _array(pt["counts"])
    ax2.bar(
        edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:orange", edgecolor="black", linewidth=0.5
    )
    ax2.axvline(pt["mean"], color="black", linestyle="--", label=f"mean {pt['mean']:.2f} (std {pt['std']:.2f})")
    ax2.set_xlim(edges[0], edges[-1])
    ax2.set_xlabel("mean active experts across layers and projections")
    ax2.set_ylabel("tokens")
    ax2.set_title(f"Per-token mean active experts\n{stats.get('tokens')} tokens")
    ax2.legend(loc="best")
    fig.suptitle(name)
    written.append(_save(fig, out / HIST_PNG))

    # 3. expert usage per projection type (averaged over layers)
    fig = _new_figure(max(9.0, 0.15 * E * P + 3.0), 8.0)
    ax1, ax2 = fig.subplots(2, 1, sharex=True)
    by = usage["by_projection"]
    width = 0.8 / max(P, 1)
    colors = [f"C{i % 10}" for i in range(P)]
    x = np.arange(E)
    for j, proj in enumerate(projs):
        xs = x - 0.4 + width * (j + 0.5)
        ax1.bar(xs, _array(by[proj]["freq"]), width, label=proj, color=colors[j])
        ax2.bar(xs, _array(by[proj]["prop"]), width, label=proj, color=colors[j])
    for ax in (ax1, ax2):
        ax.axhline(1.0 / E, color="black", linestyle="--", linewidth=1, label=f"uniform 1/E = {1.0 / E:.3f}")
        ax.grid(axis="y", alpha=0.3)
        ax.set_axisbelow(True)
    ax1.plot(x, _array(usage["overall_freq"]), "k_", markersize=18, markeredgewidth=2, label="all modules")
    ax2.plot(x, _array(usage["overall_prop"]), "k_", markersize=18, markeredgewidth=2, label="all modules")
    ax1.set_ylabel("share of activations (freq)")
    ax2.set_ylabel("mean routing weight p (prop)")
    ax2.set_xlabel("expert")
    ax2.set_xticks(x, [str(e) for e in range(E)])
    ax2.tick_params(labelbottom=True)
    lb = usage["load_balance"]
    ax1.set_title("Share of the module's expert activations per expert (averaged over layers)")
    ax2.set_title("Mean routing weight p per expert (averaged over layers)")
    handles, labels = ax1.get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside lower center", ncol=min(len(labels), 5), fontsize=9)
    fig.suptitle(f"Expert usage per projection type: {name}\nload balance: CV of usage {_fmt(lb['cv_overall'])} "
                 f"(0 = even), E·Σ freq·prop {_fmt(lb['switch_balance_mean'])} (1 = even)")
    written.append(_save(fig, out / USAGE_PNG))

    # 4. mean λ per (layer, projection)
    if lam.get("available"):
        lam_grid = _array(lam["mean"]).reshape(L, P)
        fig = _new_figure(max(6.0, 1.0 * P + 3.2), max(4.0, 0.32 * L + 1.8))
        ax = fig.add_subplot()
        _heatmap(fig, ax, lam_grid, projs,
                 f"Mean λ per token (overall {_fmt(lam['overall_mean'])} ± {_fmt(lam['overall_std'])}; "
                 f"higher λ = sparser)\n{name}", "mean λ", ".3f", "magma")
        written.append(_save(fig, out / LAMBDA_PNG))
    return written


def _fmt(v) -> str:
    return "n/a" if v is None or not math.isfinite(float(v)) else f"{float(v):.3f}"


def _save(fig, path: Path) -> Path:
    fig.savefig(path, format="png")
    return path


# ---- whole pipeline ---------------------------------------------------------------------------------

def run_report(base: str, adapter: str, texts: list[str], out_dir: str, batch_size: int = 8,
               max_length: int = 256, tokenizer=None, dtype: str = "float32", device: str = "cpu") -> dict:
    """Load `base` ("default" = SmolLM2-135M-Instruct) with the adapter folder `adapter`, route
    `texts` through it, write the report into `out_dir` and return the statistics.

    `tokenizer` is a tokenizer object or a folder; None loads the base folder's tokenizer.
    """
    from .default_base import resolve_base
    from .runtime import LDMoleRuntime

    if isinstance(texts, str) or not texts:
        raise LDMoleError("run_report needs a non-empty list of texts")
    base_path = resolve_base(base)
    name = Path(adapter).name or "adapter"
    runtime = LDMoleRuntime.from_pretrained(base_path, adapters={name: adapter}, dtype=dtype, device=device)
    if not all(isinstance(t, str) for t in texts):
        raise LDMoleError("texts must be a list of strings")
    sample = next((t for t in texts if t.strip()), None)
    if sample is None:
        raise LDMoleError("all texts are empty: there is nothing to route")
    source = "the given tokenizer"
    if tokenizer is None or isinstance(tokenizer, (str, Path)):
        source = base_path if tokenizer is None else Path(tokenizer)
        try:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(str(source))
        except Exception as exc:  # transformers raises OSError/ValueError/... for missing or bad files
            raise LDMoleError(f"cannot load a tokenizer from {source}: {exc}") from None
    try:
        empty = not list(tokenizer(sample, truncation=True, max_length=max_length)["input_ids"])
    except Exception as exc:  # a tokenizer object of the wrong kind
        raise LDMoleError(f"the tokenizer from {source} cannot tokenize text: {exc}") from None
    if empty:  # transformers builds an empty tokenizer for a folder without tokenizer files
        raise LDMoleError(f"the tokenizer from {source} turns {sample[:40]!r} into no tokens; does that folder hold "
                          "tokenizer files (tokenizer.json, vocab)? Pass tokenizer= a folder that does.")
    stats = routing_statistics(runtime, name, text_batches(tokenizer, texts, batch_size, max_length))
    stats["base"] = str(base)
    stats["adapter_path"] = str(adapter)
    stats["texts"] = len(texts)
    write_report(stats, out_dir)
    return stats
