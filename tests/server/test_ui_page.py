"""The /ui page in a real headless Chromium (Debian's chromium and chromium-driver, driven by selenium):
it asks for the API key, generates with a set, and the heatmap's cells in the DOM equal the API's
own `counts` for the same request; side by side, the second model's heatmap and the per-token
log-probability differences equal the API's; scoring draws each choice's tokens. No console errors.
A screenshot is saved under $LDMOLE_TEST_ARTIFACTS (default: test-artifacts/ in the repository)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import httpx
import pytest
from live_server import BASE_NAME, LiveServer, write_model

CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
needs_chromium = pytest.mark.skipif(
    not (CHROMIUM and CHROMEDRIVER),
    reason="needs Debian's chromium and chromium-driver (/usr/bin/chromium, /usr/bin/chromedriver); .ci/run installs "
           "them with apt-get install chromium chromium-driver")

KEY = "ui-test-key"
PROMPT = "hello wor"
MAX_TOKENS = 5
ARTIFACTS = Path(os.environ.get("LDMOLE_TEST_ARTIFACTS", Path(__file__).resolve().parents[2] / "test-artifacts"))


@pytest.fixture(scope="module")
def model_files(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("ui"))


@pytest.fixture(scope="module")
def server(model_files):
    with LiveServer(*model_files, api_key=KEY) as srv:
        yield srv


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    # these machines have no network: the background-networking flags keep Chromium from trying
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-quic", "--window-size=1400,1000",
                 f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(executable_path=CHROMEDRIVER))
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def wait_for(driver, condition, timeout=60.0, what="the page"):
    from selenium.webdriver.support.ui import WebDriverWait

    try:
        return WebDriverWait(driver, timeout, poll_frequency=0.1).until(lambda d: condition(d))
    except Exception as exc:
        status = driver.execute_script("return document.getElementById('status').textContent")
        raise AssertionError(f"timed out waiting for {what}; the page's status: {status!r}") from exc


def run_and_wait(driver):
    done = int(driver.execute_script("return Number(document.body.dataset.done || 0)"))
    driver.find_element("id", "run").click()
    wait_for(driver, lambda d: d.execute_script("return Number(document.body.dataset.done || 0)") > done or
             "error" in d.find_element("id", "status").get_attribute("class"), what="the run to finish")
    status = driver.find_element("id", "status")
    assert "error" not in status.get_attribute("class"), status.text


def heatmap_cells(driver, role: str) -> dict:
    """What the view's heatmap draws: its size and {(token, layer): value}."""
    return driver.execute_script("""
        const svg = document.querySelector(`.view[data-role="${arguments[0]}"] svg.heatmap`);
        if (!svg) return null;
        const cells = [...svg.querySelectorAll("rect.cell")].map(
            (r) => [Number(r.dataset.token), Number(r.dataset.layer), r.dataset.value]);
        return {tokens: Number(svg.dataset.tokens), layers: Number(svg.dataset.layers), cells};
    """, role)


def choose(driver, select_id: str, value: str) -> None:
    from selenium.webdriver.support.ui import Select

    Select(driver.find_element("id", select_id)).select_by_value(value)


def check_against_api(driver, role: str, expected: dict, projections: list[str]) -> None:
    """Every cell of the heatmap, per projection and for the mean, equals the API's counts."""
    layers = expected["layers"]
    for projection in [*projections, "mean"]:
        choose(driver, "projection", projection)
        drawn = heatmap_cells(driver, role)
        assert drawn["tokens"] == len(expected["tokens"]) and drawn["layers"] == layers
        assert len(drawn["cells"]) == drawn["tokens"] * layers
        for t, layer, value in drawn["cells"]:
            entry = expected["tokens"][t]
            if entry is None:
                assert value == "", (t, layer)
                continue
            row = entry[layer]
            want = (row[expected["projections"].index(projection)] if projection != "mean"
                    else sum(row) / len(row))
            assert float(value) == pytest.approx(want, abs=1e-9), (projection, t, layer)


def check_hover(driver, api) -> None:
    """Hovering a cell shows that token's expert weights p and λ, as the API's `weights` give them."""
    from selenium.webdriver.common.action_chains import ActionChains

    weights = api.post("/v1/completions", json={"model": "math", "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                                "temperature": 0, "echo": True,
                                                "ldmole": {"routing": "weights"}}).json()
    cell = weights["choices"][0]["ldmole"]["routing"]["tokens"][3][1][0]  # token 3, layer 1, q_proj
    choose(driver, "projection", "q_proj")
    target = driver.find_element("css selector", '.view[data-role="a"] rect.cell[data-token="3"][data-layer="1"]')
    ActionChains(driver).move_to_element(target).perform()
    tip = wait_for(driver, lambda d: d.find_element("id", "tooltip").text, timeout=10, what="the tooltip")
    assert f"q_proj: {len(cell['experts'])} of 4" in tip
    assert "p = " + ", ".join(f"e{e} {p:.3f}" for e, p in zip(cell["experts"], cell["p"], strict=True)) in tip
    assert f"λ = {cell['lambda']:.4f}" in tip


def counts_of(api, model: str, prompt, max_tokens: int) -> dict:
    body = {"model": model, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "echo": True,
            "logprobs": 0, "ldmole": {"routing": "counts"}}
    response = api.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]


@needs_chromium
def test_the_page_generates_compares_and_scores(server, api, browser):
    driver = browser
    driver.get(server.url + "/ui")
    # the key: asked for, not in any URL, and the model list arrives once it is given
    wait_for(driver, lambda d: "API key" in d.find_element("id", "status").text, what="the request for a key")
    driver.find_element("id", "api-key").send_keys(KEY)
    driver.find_element("id", "key-button").click()
    wait_for(driver, lambda d: len(d.find_elements("css selector", "#model-a option")) == 4, what="the model list")
    assert KEY not in driver.current_url

    # generate with one set: the page streams with weights; the API, asked for counts, must agree
    choose(driver, "model-a", "math")
    prompt = driver.find_element("id", "prompt")
    prompt.clear()
    prompt.send_keys(PROMPT)
    max_tokens = driver.find_element("id", "max-tokens")
    max_tokens.clear()
    max_tokens.send_keys(str(MAX_TOKENS))
    run_and_wait(driver)
    expected = counts_of(api, "math", PROMPT, MAX_TOKENS)
    routing = expected["ldmole"]["routing"]
    shown = driver.execute_script("return [...document.querySelectorAll('.view[data-role=\"a\"] .tok')]"
                                  ".map((s) => s.textContent)")
    assert shown == expected["logprobs"]["tokens"] and "".join(shown) == expected["text"]
    assert len(routing["tokens"]) == len(PROMPT) + MAX_TOKENS
    check_against_api(driver, "a", routing, routing["projections"])
    check_hover(driver, api)

    # side by side: the same tokens through a second set; its heatmap and the log-probability
    # differences of the generated tokens equal the API's
    driver.find_element("id", "side-by-side").click()
    choose(driver, "model-b", "code")
    run_and_wait(driver)
    ids = api.post("/tokenize", json={"model": "math", "prompt": expected["text"]}).json()["tokens"]
    a, b = counts_of(api, "math", ids, 0), counts_of(api, "code", ids, 0)
    check_against_api(driver, "b", b["ldmole"]["routing"], b["ldmole"]["routing"]["projections"])
    diffs = driver.execute_script("return [...document.querySelectorAll('.diff-view rect.diff-cell')]"
                                  ".map((r) => r.dataset.value)")
    assert len(diffs) == len(ids)
    for t, value in enumerate(diffs):
        if t < len(PROMPT):
            assert value == ""
        else:
            want = b["logprobs"]["token_logprobs"][t] - a["logprobs"]["token_logprobs"][t]
            assert float(value) == pytest.approx(want, abs=1e-6), t
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "ui_side_by_side.png"
    assert driver.save_screenshot(str(shot))
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 10_000

    # the bare base says it has no routing instead of drawing an empty map
    choose(driver, "model-b", BASE_NAME)
    run_and_wait(driver)
    assert "No routing" in driver.find_element("css selector", '.view[data-role="b"] .map').text

    # score choices: one view per choice, drawn from /v1/score's routing
    driver.find_element("id", "side-by-side").click()
    choose(driver, "mode", "score")
    run_and_wait(driver)
    scored = api.post("/v1/score", json={"model": "math", "context": PROMPT, "choices": [" proud", " bored", " sad"],
                                         "ldmole": {"routing": "counts"}}).json()
    for i, choice in enumerate(scored["choices"]):
        drawn = driver.execute_script(f"""
            const view = document.querySelectorAll('.view[data-role="a"]')[{i}];
            return [view.querySelector('h3').textContent, view.querySelectorAll('.tok').length]""")
        assert f"{choice['sum_logprob']:.3f}" in drawn[0] and drawn[1] == choice["num_tokens"]

    # the live panel has read /metrics, including the histogram of the set that ran
    wait_for(driver, lambda d: d.find_elements("css selector", '#m-hist figure[data-adapter="math"]'),
             timeout=15, what="the metrics panel")
    errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors


def test_the_page_is_served_without_a_key_and_only_its_own_files(server):
    with httpx.Client(base_url=server.url) as client:
        page = client.get("/ui/")
        assert page.status_code == 200 and "Content-Security-Policy" in page.headers
        assert client.get("/ui", follow_redirects=False).status_code == 307
        for name in ("app.js", "heatmap.js", "ui.css"):
            assert client.get(f"/ui/{name}").status_code == 200
        for name in ("../app.py", "..%2Fapp.py", "ui_page.py", "index.html.bak"):
            answer = client.get(f"/ui/{name}")  # "/ui/../app.py" reaches the server as /app.py: 401
            assert answer.status_code in (401, 404) and "import" not in answer.text, name
        assert client.get("/v1/models").status_code == 401  # the API behind it still needs the key
        assert client.get("/version").json()["api_key_required"] is True


@needs_chromium
def test_the_offline_report_draws_what_the_page_draws(model_files, api, browser, tmp_path):
    """`ldmole report`'s token_routing.json equals the API's routing of the same tokens, and its page,
    drawn by the same renderer, shows the same cells."""
    from ldmole_cli.report import run_report

    base, adapters = model_files
    text = "hello </script><!-- world, routed"  # nothing in a token may break the page
    run_report(str(base), str(adapters["math"]), [text, "a second text"], str(tmp_path), token_texts=1)
    saved = json.loads((tmp_path / "token_routing.json").read_text())
    assert len(saved["views"]) == 1
    view = saved["views"][0]
    served = counts_of(api, "math", text, 0)
    assert view["tokens"] == served["logprobs"]["tokens"]
    expected = served["ldmole"]["routing"]
    mine = view["routing"]
    assert {k: mine[k] for k in ("layers", "experts", "router", "projections")} == \
        {k: expected[k] for k in ("layers", "experts", "router", "projections")}
    assert [None if e is None else [[len(c["experts"]) for c in row] for row in e] for e in mine["tokens"]] == \
        expected["tokens"]
    browser.get((tmp_path / "token_routing.html").as_uri())
    wait_for(browser, lambda d: d.find_elements("css selector", "svg.heatmap"), what="the report page")
    check_against_api(browser, "report-0", expected, expected["projections"])
    errors = [entry for entry in browser.get_log("browser") if entry["level"] == "SEVERE"]
    assert not errors, errors
