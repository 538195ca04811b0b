"""`ldmole compare`: the zero-shot base, plain LoRA at an equal parameter budget, and LD-MoLE under
the paper and sparse recipes, trained and evaluated on the same items, with honest statistics.

Every row is one `ldmole train` run in its own folder under --out, from the same settings except
what defines the row, so the rows differ only in what they claim to compare. A row whose folder
already holds the finished run of the same settings is reused, so an interrupted comparison
resumes where it stopped.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import replace
from pathlib import Path

from ldmole_runtime.adapters.spec import projection_shapes
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.config import ModelConfig
from ldmole_runtime.model.default_base import resolve_base
from ldmole_runtime.training.config import PRESETS, TrainConfig
from ldmole_runtime.training.stats import mcnemar, wilson_interval

ROWS = ("base", "lora", "paper", "sparse")
METRICS = ("acc", "acc_norm")  # per-item correctness kept by cloze evaluation, as lm-eval names them


def ldmole_parameters(cfg: TrainConfig, base_cfg) -> int:
    """Trainable parameters of an LD-MoLE set of these settings: experts, routers and λ-networks."""
    shapes = projection_shapes(base_cfg)
    per_layer = sum(cfg.experts * (cfg.rank * (i + o) + i) for i, o in (shapes[m] for m in cfg.target_modules))
    widths = {shapes[m][0] for m in cfg.target_modules}
    return base_cfg.num_layers * per_layer + sum(cfg.lambda_hidden * (w + 2) + 1 for w in widths)


def lora_budget_rank(cfg: TrainConfig, base_cfg) -> int:
    """The LoRA rank whose parameters come closest to LD-MoLE's (experts + routers + λ-networks)."""
    shapes = projection_shapes(base_cfg)
    per_rank = base_cfg.num_layers * sum(i + o for i, o in (shapes[m] for m in cfg.target_modules))
    return max(1, round(ldmole_parameters(cfg, base_cfg) / per_rank))


def row_config(cfg: TrainConfig, row: str, out: Path, base_cfg) -> TrainConfig:
    """The settings of one row. LoRA gets an equal parameter budget (its rank matched to LD-MoLE's
    parameter count, at the same alpha / r scale)."""
    common = dict(out=str(out / row), resume=False)
    if row == "base":  # an untrained adapter's B is zero: this scores the bare base under the same protocol
        return replace(cfg, epochs=0, **common)
    if row == "lora":
        rank = lora_budget_rank(cfg, base_cfg)
        return replace(cfg, router="lora", experts=1, rank=rank, alpha=cfg.alpha * rank / cfg.rank,
                       reg=0.0, lam=0.0, **common)
    overrides = {k: v for k, v in cfg.to_dict().items() if k not in _preset_keys()}
    return TrainConfig.from_sources(None, overrides | {"preset": row} | common)


def _preset_keys() -> set[str]:
    return {"preset", *(k for values in PRESETS.values() for k in values)}


# settings each row sets itself (a comparison's settings file giving them is an error)
ROW_SETTINGS = ("resume", "router", *sorted(_preset_keys()))


def _finished(cfg: TrainConfig) -> dict | None:
    """The metrics of a finished run of exactly these settings in cfg.out, or None."""
    path = Path(cfg.out) / "metrics.json"
    try:
        metrics = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    same = metrics.get("config") == json.loads(json.dumps(cfg.to_dict()))
    done = (Path(cfg.out) / "predictions.json").is_file() and "wall_s" in metrics
    return metrics if same and done else None


def run_row(cfg: TrainConfig) -> dict:
    from ldmole_runtime.training.trainer import train

    metrics = _finished(cfg)
    if metrics is not None:
        print(f"[{Path(cfg.out).name}] reusing the finished run in {cfg.out}", flush=True)
        return metrics
    print(f"[{Path(cfg.out).name}] training in {cfg.out}", flush=True)
    start = time.time()
    metrics = train(cfg)
    metrics["wall_s"] = time.time() - start
    (Path(cfg.out) / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def adapter_parameters(out: Path) -> int | None:
    """Trainable parameters of a run's adapter, counted from its saved tensors."""
    from safetensors import safe_open

    path = out / "adapter" / "adapter.safetensors"
    if not path.is_file():
        return None
    with safe_open(str(path), "pt") as f:
        return sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())


def summarise(rows: dict[str, dict], outs: dict[str, Path]) -> dict:
    """Per task: each row's accuracy with its 95% interval, McNemar against base and LoRA on the
    same items, mean active experts; per row: parameters, training tokens/s, wall time."""
    predictions = {row: json.loads((outs[row] / "predictions.json").read_text()) for row in rows}
    tasks = list(next(iter(predictions.values())))
    table: dict = {"tasks": {}, "rows": {}}
    for row, metrics in rows.items():
        trained = [e for e in metrics["epochs"] if e.get("epoch", 0) > 0]
        speeds = [e["train_tokens_per_s"] for e in trained if "train_tokens_per_s" in e]
        table["rows"][row] = {
            "parameters": adapter_parameters(outs[row]) if trained else 0,
            "train_tokens_per_s": sum(speeds) / len(speeds) if speeds else None,
            "wall_s": metrics.get("wall_s"),
            "router": metrics["config"]["router"], "preset": metrics["config"]["preset"],
        }
    for task in tasks:
        entry: dict = {}
        for row, metrics in rows.items():
            validation = metrics["epochs"][-1]["validation"]
            validation = validation.get("per_task", {}).get(task, validation)
            result = {"active_experts": None if row in ("base", "lora") else validation.get("active_experts")}
            for metric in METRICS:
                correct = predictions[row][task][metric]
                n, k = len(correct), sum(correct)
                result[metric] = {"value": k / n, "correct": k, "n": n, "ci95": wilson_interval(k, n)}
                for other in ("base", "lora"):
                    if other in rows and other != row:
                        test = mcnemar(correct, predictions[other][task][metric])
                        result[metric][f"vs_{other}"] = {"p_value": test["p_value"], "only_this": test["only_a"],
                                                         f"only_{other}": test["only_b"]}
            entry[row] = result
        table["tasks"][task] = entry
    return table


def format_table(table: dict) -> str:
    lines = []
    for task, entry in table["tasks"].items():
        n = next(iter(entry.values()))["acc"]["n"]
        lines.append(f"{task}: {n} validation items (acc / acc_norm as lm-eval defines them; p: McNemar exact)")
        lines.append(f"  {'row':<7}{'acc':>7} {'95% CI':<14}{'acc_norm':>9} {'95% CI':<14}"
                     f"{'p vs base':>20}{'p vs lora':>20}{'experts':>9}{'params':>10}{'tok/s':>7}{'wall s':>8}")
        for row, r in entry.items():
            info = table["rows"][row]

            def ci(metric, r=r):
                lo, hi = r[metric]["ci95"]
                return f"[{lo:.3f},{hi:.3f}]"

            def p(other, r=r):
                if f"vs_{other}" not in r["acc"]:
                    return "-"
                return f"{r['acc'][f'vs_{other}']['p_value']:.2g} / {r['acc_norm'][f'vs_{other}']['p_value']:.2g}"

            experts = "-" if r["active_experts"] is None else f"{r['active_experts']:.2f}"
            speed = "-" if info["train_tokens_per_s"] is None else f"{info['train_tokens_per_s']:.0f}"
            wall = "-" if info["wall_s"] is None else f"{info['wall_s']:.0f}"
            lines.append(f"  {row:<7}{r['acc']['value']:>7.4f} {ci('acc'):<14}{r['acc_norm']['value']:>9.4f} "
                         f"{ci('acc_norm'):<14}{p('base'):>20}{p('lora'):>20}{experts:>9}{info['parameters']:>10}"
                         f"{speed:>7}{wall:>8}")
    return "\n".join(lines)


def plot(table: dict, path: Path) -> None:
    """acc and acc_norm per row with their 95% intervals, one panel per task."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(table["tasks"])
    fig, axes = plt.subplots(1, len(tasks), figsize=(4.5 * len(tasks), 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks, strict=True):
        entry = table["tasks"][task]
        rows = list(entry)
        for j, metric in enumerate(METRICS):
            xs = [i + (j - 0.5) * 0.38 for i in range(len(rows))]
            values = [entry[r][metric]["value"] for r in rows]
            err = [[v - entry[r][metric]["ci95"][0] for r, v in zip(rows, values, strict=True)],
                   [entry[r][metric]["ci95"][1] - v for r, v in zip(rows, values, strict=True)]]
            ax.bar(xs, values, width=0.36, yerr=err, capsize=3, label=metric)
        ax.set_xticks(range(len(rows)), rows)
        ax.set_title(f"{task} (n={entry[rows[0]]['acc']['n']})")
        ax.set_ylabel("accuracy (95% CI)")
        ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def compare(cfg: TrainConfig, rows: list[str], out: Path, make_plot: bool = True) -> dict:
    if cfg.task not in (None, "mc") or cfg.mc_format != "cloze":
        raise LDMoleError("ldmole compare scores multiple choice by option log-likelihood: use mc data with "
                          "--mc-format cloze")
    unknown = [r for r in rows if r not in ROWS]
    if unknown or not rows:
        raise LDMoleError(f"unknown compare rows {unknown or '[]'}; choose from {', '.join(ROWS)}")
    defaults = TrainConfig.from_sources(None, {})
    fixed = [k for k in ROW_SETTINGS if k != "resume" and getattr(cfg, k) != getattr(defaults, k)]
    if fixed:
        raise LDMoleError(f"ldmole compare sets {', '.join(fixed)} per row (base, lora, paper, sparse); "
                          "leave them out of its settings")
    if cfg.epochs < 1:
        raise LDMoleError("ldmole compare trains its adapters: --epochs must be >= 1")
    out.mkdir(parents=True, exist_ok=True)
    base_cfg = ModelConfig.from_dir(resolve_base(cfg.base))
    configs = {row: row_config(cfg, row, out, base_cfg) for row in rows}
    results = {row: run_row(c) for row, c in configs.items()}
    table = summarise(results, {row: Path(c.out) for row, c in configs.items()})
    (out / "compare.json").write_text(json.dumps(table, indent=2) + "\n")
    if make_plot:
        plot(table, out / "compare.png")
    return table
