// Per-token routing drawn as SVG: the tokens x layers heatmap of active experts, the text shaded by
// each token's mean, and a strip of per-token log-probability differences. It reads the API's
// `ldmole.routing` object (server/routing.py) in either format, and is shared by the /ui page and the
// offline `ldmole report` page, so that both draw the same picture from the same numbers.
"use strict";

const LDMoleHeatmap = (() => {
  const SVG = "http://www.w3.org/2000/svg";
  const CELL_W = 14, CELL_H = 12, LEFT = 40, TOP = 14;
  // viridis at 9 stops: perceptually even and readable for colour-blind users
  const STOPS = ["#440154", "#472d7b", "#3b528b", "#2c728e", "#21918c", "#28ae80", "#5ec962", "#addc30", "#fde725"];

  function hexToRgb(h) {
    return [1, 3, 5].map((i) => parseInt(h.slice(i, i + 2), 16));
  }

  function viridis(t) {
    const x = Math.min(1, Math.max(0, t)) * (STOPS.length - 1);
    const i = Math.min(STOPS.length - 2, Math.floor(x)), f = x - i;
    const a = hexToRgb(STOPS[i]), b = hexToRgb(STOPS[i + 1]);
    const c = a.map((v, k) => Math.round(v + (b[k] - v) * f));
    return `rgb(${c[0]},${c[1]},${c[2]})`;
  }

  // red for a lower, blue for a higher log-probability; white at 0
  function diverging(d, scale) {
    const t = Math.max(-1, Math.min(1, d / (scale || 1)));
    const v = Math.round(255 * (1 - Math.abs(t)));
    return t < 0 ? `rgb(255,${v},${v})` : `rgb(${v},${v},255)`;
  }

  // one routing decision: a count ("counts") or {experts, p, lambda} ("weights")
  function countOf(cell) {
    return typeof cell === "number" ? cell : cell.experts.length;
  }

  // the value drawn for token entry `entry` (or null) at `layer`: one projection's count, or the mean
  // over the adapted projections when `column` is null
  function valueOf(entry, layer, column) {
    if (entry === null || entry === undefined) return null;
    const row = entry[layer];
    if (column !== null) return countOf(row[column]);
    return row.reduce((s, c) => s + countOf(c), 0) / row.length;
  }

  function tokenMean(entry) {
    if (entry === null || entry === undefined) return null;
    let sum = 0, n = 0;
    for (const row of entry) for (const c of row) { sum += countOf(c); n += 1; }
    return n ? sum / n : null;
  }

  function el(name, attrs, parent) {
    const node = document.createElementNS(SVG, name);
    for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
    if (parent) parent.appendChild(node);
    return node;
  }

  function describe(routing, entry, tokenText, t, layer, column) {
    const lines = [`token ${t}: ${JSON.stringify(tokenText)}`, `layer ${layer}`];
    if (entry === null || entry === undefined) return lines.concat("no routing: no position chose this token").join("\n");
    const columns = column === null ? routing.projections.map((_, j) => j) : [column];
    for (const j of columns) {
      const cell = entry[layer][j];
      let line = `${routing.projections[j]}: ${countOf(cell)} of ${routing.experts}`;
      if (typeof cell !== "number") {
        line += "  p = " + cell.experts.map((e, k) => `e${e} ${cell.p[k].toFixed(3)}`).join(", ");
        if (cell.lambda !== null) line += `  ${routing.router === "adamole" ? "τ" : "λ"} = ${cell.lambda.toFixed(4)}`;
      }
      lines.push(line);
    }
    return lines.join("\n");
  }

  // Draws the heatmap into `container` (emptied first). tokens: the token strings, one per routing
  // entry. projection: a name in routing.projections, or null for the mean over them. onHover(text |
  // null, event, tokenIndex) shows a cell's detail. Each cell is a <rect> carrying data-token,
  // data-layer and data-value (what it shows), so that tests read the drawn numbers off the DOM.
  function render(container, routing, tokens, projection, onHover) {
    container.replaceChildren();
    if (!routing || routing.none) {
      const p = document.createElement("p");
      p.className = "no-routing";
      p.textContent = routing ? `No routing: ${routing.none}` : "No routing yet.";
      container.appendChild(p);
      return null;
    }
    const column = projection === null || projection === undefined ? null : routing.projections.indexOf(projection);
    if (column === -1) {
      const p = document.createElement("p");
      p.className = "no-routing";
      p.textContent = `This set does not adapt ${projection}; it adapts ${routing.projections.join(", ")}.`;
      container.appendChild(p);
      return null;
    }
    const T = routing.tokens.length, L = routing.layers;
    const svg = el("svg", {width: LEFT + T * CELL_W + 4, height: TOP + L * CELL_H + 4, class: "heatmap",
                           "data-tokens": T, "data-layers": L, "data-projection": projection || "mean"}, container);
    for (let t = 0; t < T; t += 10) {
      const tick = el("text", {x: LEFT + t * CELL_W + 1, y: TOP - 3, class: "tick"}, svg);
      tick.textContent = String(t);
    }
    for (let l = 0; l < L; l++) {
      const label = el("text", {x: LEFT - 4, y: TOP + l * CELL_H + CELL_H - 2, class: "tick", "text-anchor": "end"}, svg);
      label.textContent = `L${l}`;
    }
    for (let t = 0; t < T; t++) {
      const entry = routing.tokens[t];
      for (let l = 0; l < L; l++) {
        const v = valueOf(entry, l, column);
        const rect = el("rect", {x: LEFT + t * CELL_W, y: TOP + l * CELL_H, width: CELL_W - 1, height: CELL_H - 1,
                                 class: "cell", "data-token": t, "data-layer": l,
                                 "data-value": v === null ? "" : String(v),
                                 fill: v === null ? "#ddd" : viridis(v / routing.experts)}, svg);
        if (onHover) {
          rect.addEventListener("mouseenter", (ev) => onHover(describe(routing, entry, tokens[t], t, l, column), ev, t));
          rect.addEventListener("mouseleave", (ev) => onHover(null, ev, t));
        }
      }
    }
    return svg;
  }

  // The text, one <span> per token, shaded by the token's mean active experts over layers and projections.
  function shadeText(container, routing, tokens, onHover) {
    container.replaceChildren();
    const E = routing && !routing.none ? routing.experts : null;
    tokens.forEach((text, t) => {
      const span = document.createElement("span");
      span.className = "tok";
      span.dataset.token = t;
      span.textContent = text;
      const mean = E ? tokenMean(routing.tokens[t]) : null;
      if (mean !== null) {
        span.style.backgroundColor = viridis(mean / E);
        span.style.color = mean / E > 0.6 ? "#000" : "#fff";
        span.dataset.mean = mean.toFixed(3);
        if (onHover) {
          span.addEventListener("mouseenter", (ev) => onHover(`token ${t}: ${JSON.stringify(text)}\nmean active ` +
            `experts ${mean.toFixed(2)} of ${E}`, ev, t));
          span.addEventListener("mouseleave", (ev) => onHover(null, ev, t));
        }
      }
      container.appendChild(span);
    });
  }

  // A strip under a heatmap: per-token log p(B) - log p(A), aligned with the heatmap's columns.
  function renderDiff(container, diffs, tokens, onHover) {
    container.replaceChildren();
    const finite = diffs.filter((d) => d !== null && Number.isFinite(d));
    const scale = Math.max(1e-6, ...finite.map(Math.abs));
    const svg = el("svg", {width: LEFT + diffs.length * CELL_W + 4, height: CELL_H * 2 + 4, class: "diff"}, container);
    const label = el("text", {x: LEFT - 4, y: CELL_H + 4, class: "tick", "text-anchor": "end"}, svg);
    label.textContent = "Δ";
    diffs.forEach((d, t) => {
      const rect = el("rect", {x: LEFT + t * CELL_W, y: 2, width: CELL_W - 1, height: CELL_H * 2 - 1, class: "diff-cell",
                               "data-token": t, "data-value": d === null ? "" : String(d),
                               fill: d === null ? "#ddd" : diverging(d, scale)}, svg);
      if (onHover) {
        const text = d === null ? "no log-probability (prompt)" : `log p(B) − log p(A) = ${d.toFixed(4)}`;
        rect.addEventListener("mouseenter", (ev) => onHover(`token ${t}: ${JSON.stringify(tokens[t])}\n${text}`, ev, t));
        rect.addEventListener("mouseleave", (ev) => onHover(null, ev, t));
      }
    });
    return svg;
  }

  function legend(container, experts) {
    container.replaceChildren();
    const svg = el("svg", {width: 220, height: 26, class: "legend"}, container);
    for (let i = 0; i < 20; i++) el("rect", {x: 10 + i * 8, y: 2, width: 8, height: 10, fill: viridis(i / 19)}, svg);
    const lo = el("text", {x: 10, y: 24, class: "tick"}, svg);
    lo.textContent = "0";
    const hi = el("text", {x: 170, y: 24, class: "tick", "text-anchor": "end"}, svg);
    hi.textContent = `${experts} experts`;
    return svg;
  }

  return {render, shadeText, renderDiff, legend, viridis, countOf, valueOf, tokenMean};
})();

if (typeof window !== "undefined") window.LDMoleHeatmap = LDMoleHeatmap;
