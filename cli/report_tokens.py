"""The per-token page of `ldmole report`: the /ui page's tokens x layers heatmap over a few of the
report's texts, in one self-contained HTML file (token_routing.html), beside its data
(token_routing.json).

The data is built by the server's own code (server/routing.py) in the API's `ldmole.routing` format,
aligned as the API aligns it (a token's entry is the routing of the position whose logits chose it),
and the page inlines the /ui page's own renderer and stylesheet (server/ui/heatmap.js, ui.css). So
the offline and the served views of the same tokens are the same picture from the same numbers.
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import torch

from ldmole_runtime.adapters.spec import ALL_PROJECTIONS
from ldmole_runtime.engine.routing_trace import RoutingEntry, describe_set
from ldmole_server.routing import routing_object
from ldmole_server.ui_page import UI_DIR

TOKENS_JSON, TOKENS_HTML = "token_routing.json", "token_routing.html"


def token_routing(runtime, adapter: str, ids: list[int], fmt: str = "weights") -> dict:
    """The API's routing object for the token ids `ids` under `adapter` (one forward, no generation)."""
    index = runtime.adapter_index(adapter)
    info = describe_set(runtime.bank.at(index))
    if "none" in info:
        return routing_object(fmt, info, [])
    fwd = runtime.forward(torch.tensor([ids]), adapters=adapter, capture_routing=True)
    L, T, E = runtime.cfg.num_layers, len(ids), info["experts"]
    p = torch.zeros(T, L, len(ALL_PROJECTIONS), E)
    scalar = torch.full((T, L, len(ALL_PROJECTIONS)), float("nan"))
    for key, probs in fwd.routing.items():
        layer, proj = key.split(".", 1)
        at = (slice(None), int(layer), ALL_PROJECTIONS.index(proj))
        p[at] = probs[0, :, :E].float().cpu()
        lam, threshold = fwd.lambdas[key][0].float().cpu(), fwd.thresholds[key][0].float().cpu()
        scalar[at] = torch.where(torch.isnan(lam), threshold, lam)
    entries = [RoutingEntry(p[t], scalar[t]) for t in range(T)]
    return routing_object(fmt, info, [None, *entries[:-1]])


def write_token_page(views: list[dict], out_dir, title: str) -> list[Path]:
    """views: [{"title", "tokens": [str], "routing": API routing object}]. Writes the JSON and the page."""
    out = Path(out_dir)
    data = out / TOKENS_JSON
    data.write_text(json.dumps({"title": title, "views": views}, allow_nan=False) + "\n")
    # no "<" in the inlined JSON ("</script>" or "<!--" in a token would change how HTML parses it)
    payload = json.dumps({"title": title, "views": views}, allow_nan=False).replace("<", "\\u003c")
    css, js = (UI_DIR / "ui.css").read_text(), (UI_DIR / "heatmap.js").read_text()
    page = out / TOKENS_HTML
    page.write_text(f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title><link rel="icon" href="data:,">
<style>{css}</style></head>
<body class="report"><main>
<h2>{html.escape(title)}</h2>
<p class="hint">As on the /ui page of <code>ldmole serve</code>: each token shaded by its mean number of active
experts over layers and projections; the heatmap is tokens &times; layers, the mean over projections or one of
them. A token's routing is that of the position whose logits chose it, as log-probabilities are aligned.</p>
<label>Heatmap <select id="projection"><option value="mean">mean over projections</option></select></label>
<div id="results"></div></main>
<pre id="tooltip" hidden></pre>
<script type="application/json" id="data">{payload}</script>
<script>{js}</script>
<script>{_PAGE_SCRIPT}</script>
</body></html>
""")
    return [data, page]


# the report page's own wiring: the views are fixed, so only the projection and the tooltip move
_PAGE_SCRIPT = """
"use strict";
(() => {
  const H = LDMoleHeatmap, data = JSON.parse(document.getElementById("data").textContent);
  const tip = document.getElementById("tooltip"), select = document.getElementById("projection");
  const hover = (text, ev) => {
    if (text === null) { tip.hidden = true; return; }
    tip.textContent = text; tip.hidden = false;
    tip.style.left = `${ev.pageX + 12}px`; tip.style.top = `${ev.pageY + 12}px`;
  };
  const names = new Set();
  data.views.forEach((v) => (v.routing.projections || []).forEach((p) => names.add(p)));
  names.forEach((n) => {
    const option = document.createElement("option");
    option.value = option.textContent = n;
    select.appendChild(option);
  });
  const blocks = data.views.map((view, i) => {
    const block = document.createElement("section"), title = document.createElement("h3");
    block.className = "view";
    block.dataset.role = `report-${i}`;
    title.textContent = view.title;
    const [text, legend, map] = ["div", "div", "div"].map((tag) => document.createElement(tag));
    text.className = "text"; map.className = "map";
    block.append(title, text, legend, map);
    document.getElementById("results").appendChild(block);
    H.shadeText(text, view.routing, view.tokens, hover);
    if (!view.routing.none) H.legend(legend, view.routing.experts);
    return {view, map};
  });
  const draw = () => blocks.forEach(({view, map}) =>
    H.render(map, view.routing, view.tokens, select.value === "mean" ? null : select.value, hover));
  select.addEventListener("change", draw);
  draw();
})();
"""
