"""The routing report on disk: report.json and PNG plots of `routing_statistics`' output."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from ldmole_runtime.errors import LDMoleError

REPORT_JSON = "report.json"
HEATMAP_PNG = "active_experts_heatmap.png"
HIST_PNG = "experts_per_token_hist.png"
USAGE_PNG = "expert_usage.png"
LAMBDA_PNG = "lambda_heatmap.png"


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
