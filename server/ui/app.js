// The /ui page: generate or score through the OpenAI API with `"ldmole": {"routing": "weights"}` and
// draw each token's routing (heatmap.js); optionally the same text through a second model, side by
// side; and a live panel from /metrics. Plain browser JS, no build step, nothing from the internet.
"use strict";

const $ = (id) => document.getElementById(id);
const H = window.LDMoleHeatmap;
const KEY_STORE = "ldmole-api-key"; // sessionStorage: gone with the tab, never in a URL

const page = {key: sessionStorage.getItem(KEY_STORE) || "", authRequired: false, views: [], metricsTimer: null,
              lastMetrics: null};

function status(text, isError) {
  const node = $("status");
  node.textContent = text;
  node.classList.toggle("error", Boolean(isError));
}

function headers() {
  const h = {"Content-Type": "application/json"};
  if (page.key) h.Authorization = `Bearer ${page.key}`;
  return h;
}

async function errorOf(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.message) return `${response.status}: ${body.error.message}`;
  } catch (_) { /* not JSON: fall through */ }
  return `${response.status} ${response.statusText}`;
}

async function api(path, body) {
  const response = await fetch(path, body === undefined ? {headers: headers()}
    : {method: "POST", headers: headers(), body: JSON.stringify(body)});
  if (!response.ok) throw new Error(await errorOf(response));
  return response.json();
}

// ---- tooltip -------------------------------------------------------------------------------------

function hover(text, ev, token) {
  const tip = $("tooltip");
  document.querySelectorAll(".tok.hot").forEach((n) => n.classList.remove("hot"));
  if (text === null) { tip.hidden = true; return; }
  document.querySelectorAll(`.tok[data-token="${token}"]`).forEach((n) => n.classList.add("hot"));
  tip.textContent = text;
  tip.hidden = false;
  tip.style.left = `${ev.pageX + 12}px`;
  tip.style.top = `${ev.pageY + 12}px`;
}

// ---- models, key, version ------------------------------------------------------------------------

async function loadVersion() {
  const v = await api("/version");
  page.authRequired = Boolean(v.api_key_required);
  $("version").textContent = `ldmole ${v.version} · ${v.dtype}`;
}

async function loadModels() {
  if (page.authRequired && !page.key) {
    status("This server needs an API key: enter it above.", true);
    $("api-key").focus();
    return;
  }
  const models = (await api("/v1/models")).data;
  for (const select of [$("model-a"), $("model-b")]) {
    const keep = select.value;
    select.replaceChildren(...models.map((m) => {
      const option = document.createElement("option");
      option.value = m.id;
      option.textContent = m.parent ? m.id : `${m.id} (base)`;
      return option;
    }));
    if (models.some((m) => m.id === keep)) select.value = keep;
  }
  const firstAdapter = models.find((m) => m.parent);
  if (firstAdapter && !$("model-a").dataset.touched) $("model-a").value = firstAdapter.id;
  const base = models.find((m) => !m.parent);
  if (base && !$("model-b").dataset.touched) $("model-b").value = base.id;
  $("run").disabled = false;
  status(`${models.length} models`);
}

async function useKey() {
  page.key = $("api-key").value.trim();
  if (page.key) sessionStorage.setItem(KEY_STORE, page.key); else sessionStorage.removeItem(KEY_STORE);
  $("api-key").value = "";
  $("api-key").placeholder = page.key ? "key set" : "(none)";
  try { await loadModels(); } catch (err) { status(err.message, true); }
}

// ---- views: one model's tokens, routing and log-probabilities ------------------------------------

function projectionChoice() {
  const v = $("projection").value;
  return v === "mean" ? null : v;
}

function updateProjections() {
  const select = $("projection"), keep = select.value;
  const names = new Set();
  for (const view of page.views) if (view.routing && !view.routing.none) view.routing.projections.forEach((p) => names.add(p));
  const options = [["mean", "mean over projections"], ...[...names].map((n) => [n, n])];
  select.replaceChildren(...options.map(([value, label]) => {
    const option = document.createElement("option");
    option.value = value;
    option.textContent = label;
    return option;
  }));
  select.value = names.has(keep) ? keep : "mean";
}

function viewBlock(view) {
  const block = document.createElement("section");
  block.className = "view";
  block.dataset.model = view.model;
  block.dataset.role = view.role;
  const title = document.createElement("h3");
  title.textContent = view.title;
  const text = document.createElement("div");
  text.className = "text";
  const map = document.createElement("div");
  map.className = "map";
  const legend = document.createElement("div");
  legend.className = "legend-box";
  block.append(title, text, legend, map);
  view.node = block;
  return block;
}

function draw(view) {
  if (!view.node) return;
  H.shadeText(view.node.querySelector(".text"), view.routing, view.tokens, hover);
  const legend = view.node.querySelector(".legend-box");
  if (view.routing && !view.routing.none) H.legend(legend, view.routing.experts); else legend.replaceChildren();
  H.render(view.node.querySelector(".map"), view.routing, view.tokens, projectionChoice(), hover);
}

function redraw() {
  page.views.forEach(draw);
}

function resetResults() {
  page.views = [];
  $("results").replaceChildren();
}

function addView(view) {
  page.views.push(view);
  $("results").appendChild(viewBlock(view));
  return view;
}

// ---- generate (streaming) ------------------------------------------------------------------------

async function* sse(response) {
  const reader = response.body.getReader(), decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, {stream: true});
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data: ")) continue;
        const data = line.slice(6);
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

function limits() {
  return {max_tokens: Math.max(1, Number($("max-tokens").value) || 1),
          temperature: Math.max(0, Number($("temperature").value) || 0)};
}

async function generate(model, prompt) {
  const view = addView({model, role: "a", title: `${model}: generated`, tokens: [], logprobs: [], routing: null, text: ""});
  const response = await fetch("/v1/completions", {method: "POST", headers: headers(), body: JSON.stringify({
    model, prompt, ...limits(), stream: true, echo: true, logprobs: 0, ldmole: {routing: "weights"}})});
  if (!response.ok) throw new Error(await errorOf(response));
  let pending = false;
  for await (const chunk of sse(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    for (const choice of chunk.choices || []) {
      view.text += choice.text;
      if (choice.logprobs) {
        view.tokens.push(...choice.logprobs.tokens);
        view.logprobs.push(...choice.logprobs.token_logprobs);
      }
      const routing = choice.ldmole && choice.ldmole.routing;
      if (routing) {
        if (!view.routing) view.routing = {...routing, tokens: []};
        if (!routing.none) view.routing.tokens.push(...routing.tokens);
      }
    }
    if (!pending) {
      pending = true;
      requestAnimationFrame(() => { pending = false; updateProjections(); draw(view); });
    }
  }
  updateProjections();
  draw(view);
  return view;
}

// The same token ids through one model, prompt only (max_tokens 0, echo): its routing and
// log-probabilities on exactly those tokens.
async function rescore(model, ids, role) {
  const out = await api("/v1/completions", {model, prompt: ids, max_tokens: 0, echo: true, logprobs: 0, temperature: 0,
                                            ldmole: {routing: "weights"}});
  const choice = out.choices[0];
  return {model, role, title: `${model}: same tokens`, tokens: choice.logprobs.tokens,
          logprobs: choice.logprobs.token_logprobs, routing: choice.ldmole.routing, text: choice.text};
}

async function sideBySide(first, modelB, prompt) {
  status("running the same tokens through both models…");
  const [ids, promptIds] = await Promise.all([api("/tokenize", {model: first.model, prompt: first.text}),
                                              api("/tokenize", {model: first.model, prompt})]);
  const [a, b] = await Promise.all([rescore(first.model, ids.tokens, "a2"), rescore(modelB, ids.tokens, "b")]);
  // the streamed view gives way to the same tokens under both models, drawn one above the other
  page.views = page.views.filter((v) => v !== first);
  first.node.remove();
  addView(a);
  addView(b);
  // the generated text's tokens only: the prompt's are the same for both and not what was compared
  const diffs = a.logprobs.map((lp, t) => (t < promptIds.count || lp === null || b.logprobs[t] === null
    ? null : b.logprobs[t] - lp));
  const box = document.createElement("section");
  box.className = "view diff-view";
  const title = document.createElement("h3");
  const total = diffs.reduce((s, d) => s + (d || 0), 0);
  title.textContent = `log p(${modelB}) − log p(${first.model}) per generated token (sum ${total.toFixed(3)})`;
  const strip = document.createElement("div");
  strip.className = "map";
  box.append(title, strip);
  $("results").appendChild(box);
  H.renderDiff(strip, diffs, a.tokens, hover);
  updateProjections();
  redraw();
}

// ---- score choices -------------------------------------------------------------------------------

// /tokenize's token_strs are the vocabulary's strings: byte-level BPE writes a space as "Ġ", a newline as "Ċ"
function readable(piece) {
  return piece.replace(/Ġ/g, " ").replace(/Ċ/g, "\n").replace(/ĉ/g, "\t");
}

async function scoreWith(model, context, choices, role) {
  const [scored, ...pieces] = await Promise.all([
    api("/v1/score", {model, context, choices, ldmole: {routing: "weights"}}),
    ...choices.map((c) => api("/tokenize", {model, prompt: c, return_token_strs: true}))]);
  return scored.choices.map((c, i) => addView({
    model, role, tokens: pieces[i].token_strs.map(readable), routing: c.ldmole.routing, logprobs: [],
    title: `${model}: ${JSON.stringify(choices[i])}  sum log p ${c.sum_logprob.toFixed(3)}, mean ` +
           `${c.mean_logprob.toFixed(3)}${c.is_greedy ? ", greedy" : ""}`}));
}

async function score(modelA, modelB, context) {
  const choices = $("choices").value.split("\n").filter((c) => c.length > 0);
  if (!choices.length) throw new Error("give at least one choice, one per line");
  await scoreWith(modelA, context, choices, "a");
  if (modelB) await scoreWith(modelB, context, choices, "b");
  updateProjections();
  redraw();
}

async function run() {
  const modelA = $("model-a").value, prompt = $("prompt").value;
  const modelB = $("side-by-side").checked ? $("model-b").value : null;
  if (!modelA) { status("no model: set the API key, or wait for the model list", true); return; }
  $("run").disabled = true;
  resetResults();
  const started = performance.now();
  try {
    if ($("mode").value === "score") {
      status("scoring…");
      await score(modelA, modelB, prompt);
    } else {
      status("generating…");
      const first = await generate(modelA, prompt);
      if (modelB) await sideBySide(first, modelB, prompt);
    }
    status(`done in ${((performance.now() - started) / 1000).toFixed(2)} s`);
    document.body.dataset.done = String(Number(document.body.dataset.done || 0) + 1);
  } catch (err) {
    status(err.message, true);
  } finally {
    $("run").disabled = false;
  }
}

// ---- live metrics --------------------------------------------------------------------------------

function parseMetrics(text) {
  const samples = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([^{\s]+)(?:\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const pair of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[pair[1]] = pair[2];
    samples.push({name: m[1], labels, value: Number(m[3])});
  }
  return samples;
}

function drawHistograms(container, samples) {
  const byAdapter = new Map();
  for (const s of samples) {
    if (s.name !== "ldmole:active_experts_per_token_bucket") continue;
    if (!byAdapter.has(s.labels.adapter)) byAdapter.set(s.labels.adapter, []);
    byAdapter.get(s.labels.adapter).push([s.labels.le === "+Inf" ? Infinity : Number(s.labels.le), s.value]);
  }
  container.replaceChildren();
  for (const [adapter, buckets] of byAdapter) {
    buckets.sort((x, y) => x[0] - y[0]);
    const counts = buckets.map(([, c], i) => c - (i ? buckets[i - 1][1] : 0));
    const total = counts.reduce((s, c) => s + c, 0);
    const figure = document.createElement("figure");
    figure.className = "hist";
    figure.dataset.adapter = adapter;
    const caption = document.createElement("figcaption");
    caption.textContent = `${adapter} (${total} tokens)`;
    const svgNS = "http://www.w3.org/2000/svg";
    const svg = document.createElementNS(svgNS, "svg");
    const w = 8, hgt = 40;
    svg.setAttribute("width", String(counts.length * w + 2));
    svg.setAttribute("height", String(hgt + 2));
    const peak = Math.max(1, ...counts);
    counts.forEach((c, i) => {
      const bar = document.createElementNS(svgNS, "rect");
      const barH = Math.round((hgt * c) / peak);
      bar.setAttribute("x", String(1 + i * w));
      bar.setAttribute("y", String(1 + hgt - barH));
      bar.setAttribute("width", String(w - 1));
      bar.setAttribute("height", String(barH));
      bar.setAttribute("fill", H.viridis(i / Math.max(1, counts.length - 1)));
      const tip = document.createElementNS(svgNS, "title");
      tip.textContent = `≤ ${buckets[i][0]} experts: ${c}`;
      bar.appendChild(tip);
      svg.appendChild(bar);
    });
    figure.append(svg, caption);
    container.appendChild(figure);
  }
  if (!byAdapter.size) container.textContent = "no routed tokens yet";
}

async function pollMetrics() {
  try {
    const response = await fetch("/metrics", {headers: headers()});
    if (!response.ok) throw new Error(await errorOf(response));
    const samples = parseMetrics(await response.text());
    const value = (name) => samples.filter((s) => s.name === name).reduce((sum, s) => sum + s.value, 0);
    const now = performance.now(), generated = value("ldmole:generation_tokens_total");
    const last = page.lastMetrics;
    const rate = last ? (generated - last.generated) / ((now - last.at) / 1000) : 0;
    page.lastMetrics = {at: now, generated};
    $("m-running").textContent = String(value("ldmole:num_requests_running"));
    $("m-waiting").textContent = String(value("ldmole:num_requests_waiting"));
    $("m-tps").textContent = rate.toFixed(1);
    $("m-kv").textContent = `${(100 * value("ldmole:kv_cache_usage_perc")).toFixed(1)}%`;
    drawHistograms($("m-hist"), samples);
    $("metrics-error").textContent = "";
  } catch (err) {
    $("metrics-error").textContent = `metrics: ${err.message}`;
  }
}

// ---- wiring --------------------------------------------------------------------------------------

function syncMode() {
  const scoring = $("mode").value === "score";
  $("choices-row").hidden = !scoring;
  $("run").textContent = scoring ? "Score" : "Generate";
  $("prompt-label").textContent = scoring ? "Context" : "Prompt";
}

async function start() {
  $("api-key").placeholder = page.key ? "key set" : "(none)";
  $("key-button").addEventListener("click", useKey);
  $("api-key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") useKey(); });
  $("run").addEventListener("click", run);
  $("mode").addEventListener("change", syncMode);
  $("projection").addEventListener("change", redraw);
  for (const id of ["model-a", "model-b"]) $(id).addEventListener("change", () => { $(id).dataset.touched = "1"; });
  syncMode();
  try {
    await loadVersion();
    await loadModels();
  } catch (err) {
    status(err.message, true);
  }
  pollMetrics();
  page.metricsTimer = setInterval(pollMetrics, 2000);
}

document.addEventListener("DOMContentLoaded", start);
