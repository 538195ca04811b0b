"""Routing reports: how an LD-MoLE adapter set routes real text, as numbers and pictures.

    stats = routing_statistics(rt, "math", text_batches(tok, texts, batch_size=8, max_length=256))
    write_report(stats, "out/")   # report.json + PNG plots

The statistics are in report_stats.py, the files in report_plots.py, the per-token page (the /ui
page's heatmap, offline) in report_tokens.py; `run_report` is the whole
pipeline from a base folder, an adapter folder and a list of texts (`ldmole report`).
"""

from __future__ import annotations

from pathlib import Path

from ldmole_cli.report_plots import write_report
from ldmole_cli.report_stats import routing_statistics, text_batches
from ldmole_cli.report_tokens import token_routing, write_token_page
from ldmole_runtime.errors import LDMoleError
from ldmole_runtime.model.tokenizer import load_tokenizer


def run_report(base: str, adapter: str, texts: list[str], out_dir: str, batch_size: int = 8,
               max_length: int = 256, tokenizer=None, dtype: str = "float32", device: str = "cpu",
               token_texts: int = 3) -> dict:
    """Load `base` ("default" = SmolLM2-135M-Instruct) with the adapter folder `adapter`, route
    `texts` through it, write the report into `out_dir` and return the statistics.

    `tokenizer` is a tokenizer object or a folder; None loads the base folder's tokenizer.
    `token_texts`: how many of the texts (the first non-empty ones) the per-token page draws (report_tokens.py).
    """
    from ldmole_runtime.model.default_base import resolve_base
    from ldmole_runtime.model.runtime import LDMoleRuntime

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
        tokenizer = load_tokenizer(source, needed_for="the routing report")
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
    views = []
    for text in [t for t in texts if t.strip()][:max(0, token_texts)]:
        ids = list(tokenizer(text, truncation=True, max_length=max_length)["input_ids"])[:max_length]  # as text_batches
        if not ids:
            continue
        views.append({"title": f"{name}: {text[:80]!r}", "tokens": [tokenizer.decode([i]) for i in ids],
                      "routing": token_routing(runtime, name, ids)})
    if views:
        write_token_page(views, out_dir, f"Per-token routing of adapter {name!r}")
    return stats
