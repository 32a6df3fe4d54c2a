"""The knnlm-inspect page: render() unit tests, then the page in a real headless Chromium (Debian's chromium and
chromedriver, installed by `make browser`) read back through the rendered DOM. The browser tests never skip: a
missing browser is a failure that says how to install it."""
import copy
import html.parser
import json
import math
import os
import random
import shutil
import time

import pytest

from knnlm_fairseq.inspect import html as page

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"
NASTY = "</script><b>bold</b>"  # a vocab word that would break out of the <script> or the markup if unescaped
BEST, WORST = 4321, 2345  # the tokens given the largest gain and loss (on pages 3 and 2 of 2,000 tokens)


def synthetic(n=5000, vocab_size=300, k=8, seed=0) -> dict:
    """A seeded inspection: some tokens with fewer than k neighbours (or none), contexts of varying length with
    their value at `at`, line ends, and two planted extremes."""
    rng = random.Random(seed)
    vocab = ["</s>", NASTY, "&amp;", "\"q'"] + [f"w{j}" for j in range(vocab_size - 4)]
    cols = {c: [] for c in page.COLUMNS}
    for i in range(n):
        w = 0 if rng.random() < 0.04 else rng.randrange(1, vocab_size)
        count = k if i % 5 else rng.randrange(0, k)
        dists = sorted(rng.uniform(1, 60) for _ in range(count))
        weights = [math.exp(-d / 10) for d in dists]
        neighbours = []
        for d, wt in zip(dists, weights):
            ctx = [rng.randrange(vocab_size) for _ in range(rng.randint(3, 16))]
            at = rng.randrange(len(ctx))
            ctx[at] = w if rng.random() < 0.4 else ctx[at]
            neighbours.append([rng.randrange(10**6), round(d, 3), wt / sum(weights), ctx[at], ctx, at])
        lm = rng.uniform(1e-5, 0.9)
        knn = sum(nb[2] for nb in neighbours if nb[3] == w)
        p = 0.25 * knn + 0.75 * lm
        for c, v in zip(page.COLUMNS, (w, lm, knn, p, math.log(p / lm), neighbours)):
            cols[c].append(v)
    if n > BEST:
        cols["gain"][BEST], cols["gain"][WORST] = 9.0, -9.0
    base = math.exp(-sum(math.log(x) for x in cols["lm"]) / max(n, 1))
    knnlm = math.exp(-sum(math.log(x) for x in cols["p"]) / max(n, 1))
    meta = {"title": "valid <i>of</i> wikitext-2 & co", "split": "valid", "dstore": "dstore/wikitext-2-train",
            "k": 1024, "lmbda": 0.25, "knn_temp": 10.0, "knn_dist": "exact", "checkpoint": "wt2-small/checkpoint.pt",
            "neighbours_shown": k}
    return {"meta": meta, "summary": {"tokens": n, "base_ppl": base, "knnlm_ppl": knnlm}, "vocab": vocab,
            "tokens": cols}


class Scripts(html.parser.HTMLParser):
    """The text of every <script id=...> element and of <title>, as the browser's parser splits them."""

    def __init__(self):
        super().__init__()
        self.texts, self._id = {}, None

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "title"):
            self._id = dict(attrs).get("id", tag)
            self.texts[self._id] = ""

    def handle_endtag(self, tag):
        self._id = None

    def handle_data(self, data):
        if self._id:
            self.texts[self._id] += data


# ---- render() without a browser -----------------------------------------------------------------------------
def test_embedded_data_round_trips_and_markup_is_escaped():
    data = synthetic(n=300)
    doc = page.render(data)
    parsed = Scripts()
    parsed.feed(doc)
    assert json.loads(parsed.texts["knnlm-data"]) == data  # "</script><b>" stayed inside its JSON string
    assert doc.count("</script>") == 3 and "<b>bold" not in doc  # only our own three script elements close
    assert parsed.texts["title"] == data["meta"]["title"]  # shown as text, not as <i>
    assert "valid &lt;i&gt;of&lt;/i&gt; wikitext-2 &amp; co" in doc


def test_render_is_deterministic_and_self_contained():
    data = synthetic(n=300)
    doc = page.render(data)
    assert doc == page.render(copy.deepcopy(data))
    for needle in ("http://", "https://", "<link", " src=", "@import", "url("):
        assert needle not in doc, f"the page must not load anything: found {needle!r}"


def test_header_comes_from_meta_and_summary():
    data = synthetic(n=50)
    data["meta"]["index"] = "IVF1024,PQ32"  # a key the page does not know is shown under its own name
    data["summary"]["tokens"] = 245569  # a page of a longer split says how many it shows
    doc = page.render(data)
    assert '<code id="m-index">IVF1024,PQ32</code>' in doc and '<b id="s-shown">50</b>' in doc
    assert '<b id="s-tokens">245569</b>' in doc
    empty = synthetic(n=0)
    assert "knnlm-data" in page.render(empty)


@pytest.mark.parametrize("breakage, message", [
    (lambda d: d["tokens"]["p"].pop(), "differ in length"),
    (lambda d: d["meta"].pop("lmbda"), "meta lacks ['lmbda']"),
    (lambda d: d["tokens"]["w"].__setitem__(0, 10**6), "outside the vocab"),
    (lambda d: d["tokens"]["nb"][1][0].__setitem__(5, 99), "ctx[at] must be its value"),
    (lambda d: d["tokens"]["gain"].__setitem__(3, float("nan")), "NaN or infinite"),
])
def test_contract_violations_are_refused_by_name(breakage, message):
    data = synthetic(n=20)
    breakage(data)
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        page.render(data)


def test_colour_scale_is_a_round_95th_percentile_per_side():
    assert page.colour_scale([0.0] * 10) == (1.0, 1.0)
    assert page.colour_scale([0.03] * 95 + [8.0] * 5 + [-0.25] * 3) == (0.3, 0.03)
    assert page.colour_scale([-0.4, 0.1, 0.35] * 40) == (0.4, 0.4)


# ---- the page in Chromium -------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.access(p, os.X_OK)]
    assert not missing, f"{missing} missing: run `make browser` (installs Debian's chromium and chromium-driver)"
    try:
        from selenium import webdriver
        from selenium.webdriver.chrome.service import Service
    except ImportError as e:
        pytest.fail(f"selenium is missing ({e}): pip install -e '.[test]' (make install)")
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM  # with the driver's path too, selenium never looks for a browser to download
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-background-networking", "--disable-component-update", "--no-first-run", "--disable-sync",
                "--window-size=1440,1000", f"--user-data-dir={tmp_path_factory.mktemp('chromium-profile')}"):
        opts.add_argument(arg)
    opts.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    yield driver
    driver.quit()


@pytest.fixture(scope="module")
def inspected(tmp_path_factory):
    data = synthetic()
    path = tmp_path_factory.mktemp("inspect") / "valid.html"
    path.write_text(page.render(data), encoding="utf-8")
    return data, path


def load(driver, path):
    driver.get(path.as_uri())
    deadline = time.time() + 30
    while driver.execute_script("return document.body && document.body.dataset.ready") != "1":
        assert time.time() < deadline, "the viewer never finished building its first page"
        time.sleep(0.05)


def assert_no_console_errors(driver):
    errors = [e for e in driver.get_log("browser") if e["level"] == "SEVERE"]
    assert not errors, errors


def text(driver, css):
    return driver.find_element("css selector", css).text


def span(driver, i):
    return driver.find_element("css selector", f'#passage span.t[data-i="{i}"]')


# everything the panel shows about its neighbours, read in one round trip
PANEL = """
const rows = [...document.querySelectorAll('#panel tr.nb')];
return {token: document.getElementById('panel').dataset.token,
        gain: document.querySelector('#panel dd[data-name="gain (nats)"]').textContent,
        rows: rows.map(r => ({match: r.classList.contains('match'), value: r.querySelector('td.val').textContent,
          ctx: [...r.querySelector('td.ctx').children].map(c => [c.tagName, c.textContent])}))};
"""


@pytest.mark.slow
def test_header_shows_meta_and_summary(browser, inspected):
    data, path = inspected
    load(browser, path)
    meta, summary = data["meta"], data["summary"]
    assert browser.title == meta["title"] == text(browser, "#title")
    assert text(browser, "#s-tokens") == str(summary["tokens"])
    assert text(browser, "#s-base") == f"{summary['base_ppl']:.2f}"
    assert text(browser, "#s-knn") == f"{summary['knnlm_ppl']:.2f}"
    assert text(browser, "#s-helped") == str(sum(g > 0 for g in data["tokens"]["gain"]))
    for key in ("split", "dstore", "k", "knn_dist", "checkpoint", "neighbours_shown"):
        assert text(browser, f"#m-{key}") == str(meta[key])
    assert text(browser, "#m-lmbda") == "0.25" and text(browser, "#m-knn_temp") == "10"
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_first_page_spans_shading_and_line_ends(browser, inspected):
    data, path = inspected
    load(browser, path)
    toks = data["tokens"]
    spans = browser.execute_script(
        "return [...document.querySelectorAll('#passage span.t')].map(s => [+s.dataset.i, s.className, s.textContent,"
        " !!(s.nextSibling && s.nextSibling.tagName === 'BR')])")
    assert [s[0] for s in spans] == list(range(page.PAGE_SIZE))
    for i, cls, shown, line_end in spans:
        g, word = toks["gain"][i], data["vocab"][toks["w"][i]]
        assert ("pos" in cls.split()) == (g > 0) and ("neg" in cls.split()) == (g < 0), (i, g, cls)
        assert shown == ("↵" if word == "</s>" else word) and line_end == (word == "</s>")
    assert any(shown == NASTY for _, _, shown, _ in spans) and not browser.find_elements("css selector", "#passage b")
    colours = {sign: browser.execute_script(
        f"return getComputedStyle(document.querySelector('#passage .{sign}')).backgroundColor") for sign in
        ("pos", "neg")}
    pos, neg = ([int(float(x)) for x in c[c.index("(") + 1:-1].split(",")[:3]] for c in colours.values())
    assert pos[2] > pos[0] and neg[0] > neg[2], colours  # helped is blue, hurt is red
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_click_and_hover_show_the_neighbours_with_their_contexts(browser, inspected):
    data, path = inspected
    from selenium.webdriver import ActionChains, Keys

    load(browser, path)
    toks, vocab = data["tokens"], data["vocab"]
    counts = {len(toks["nb"][i]) for i in range(page.PAGE_SIZE)}
    assert 0 in counts and 8 in counts and len(counts) >= 5  # the data exercises short and empty lists
    picks = [next(i for i in range(page.PAGE_SIZE) if len(toks["nb"][i]) == c) for c in sorted(counts)]
    ActionChains(browser).move_to_element(span(browser, picks[1])).perform()  # hover, nothing pinned: a preview
    assert browser.execute_script(PANEL)["token"] == str(picks[1])
    for i in picks + [1999]:
        span(browser, i).click()
        shown = browser.execute_script(PANEL)
        assert shown["token"] == str(i) and "pinned" in span(browser, i).get_attribute("class")
        assert abs(float(shown["gain"]) - toks["gain"][i]) < 1e-3
        assert len(shown["rows"]) == len(toks["nb"][i]), (i, len(shown["rows"]), toks["nb"][i])
        for row, (_, _, _, value, ctx, at) in zip(shown["rows"], toks["nb"][i]):
            assert row["value"] == vocab[value] and row["match"] == (value == toks["w"][i])
            assert [t for t, _ in row["ctx"]] == ["MARK" if j == at else "SPAN" for j in range(len(ctx))]
            assert [w for _, w in row["ctx"]] == [vocab[c] for c in ctx]
    ActionChains(browser).move_to_element(span(browser, 5)).perform()  # pinned: hovering elsewhere keeps it
    assert browser.execute_script(PANEL)["token"] == "1999"
    ActionChains(browser).send_keys(Keys.ESCAPE).perform()  # unpinned: hovering previews again
    assert "pinned" not in span(browser, 1999).get_attribute("class")
    ActionChains(browser).move_to_element(span(browser, 6)).perform()
    assert browser.execute_script(PANEL)["token"] == "6"
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_pagination_reaches_the_last_token(browser, inspected):
    data, path = inspected
    from selenium.webdriver import ActionChains, Keys

    n = len(data["tokens"]["w"])
    load(browser, path)
    button = lambda go: browser.find_element("css selector", f'.pager button[data-go="{go}"]')  # noqa: E731
    assert not button("first").is_enabled() and button("last").is_enabled()
    button("next").click()
    assert text(browser, "#page-label").startswith("page 2 of 3")
    button("last").click()
    ids = browser.execute_script("return [...document.querySelectorAll('#passage span.t')].map(s => +s.dataset.i)")
    assert ids == list(range(2 * page.PAGE_SIZE, n)) and not button("next").is_enabled()
    assert text(browser, "#page-label") == f"page 3 of 3 · tokens 4000–{n - 1} of {n}"
    goto = browser.find_element("css selector", "#goto")
    goto.send_keys("3000\n")  # the token box: its page, pinned
    assert text(browser, "#page-label").startswith("page 2 of 3") and "pinned" in span(browser, 3000).get_attribute(
        "class")
    goto.clear()
    goto.send_keys("3999\n")
    ActionChains(browser).send_keys(Keys.ARROW_RIGHT).perform()  # steps across the page break
    assert text(browser, "#page-label").startswith("page 3 of 3") and "pinned" in span(browser, 4000).get_attribute(
        "class")
    assert browser.execute_script(PANEL)["token"] == "4000"
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_largest_gain_and_loss_jump_to_their_token(browser, inspected, tmp_path):
    data, path = inspected
    load(browser, path)
    for list_id, target, page_no in (("top-gains", BEST, 3), ("top-losses", WORST, 2)):
        first = browser.find_element("css selector", f"#{list_id} li a")
        assert first.get_attribute("data-i") == str(target)
        first.click()
        assert text(browser, "#page-label").startswith(f"page {page_no} of 3")
        token = span(browser, target)
        assert "pinned" in token.get_attribute("class")
        assert browser.execute_script(PANEL)["token"] == str(target)
        assert browser.execute_script("const r = arguments[0].getBoundingClientRect();"
                                      "return r.top >= 0 && r.bottom <= innerHeight", token), "not scrolled to"
    gains = browser.find_elements("css selector", "#top-gains li")
    assert len(gains) == page.TOP
    # the screenshot: a token with all its neighbours pinned
    browser.find_element("css selector", '.pager button[data-go="first"]').click()
    span(browser, next(i for i in range(50) if len(data["tokens"]["nb"][i]) == 8)).click()
    browser.execute_script("window.scrollTo(0, 0)")  # the header in view too
    shot = tmp_path / "inspect.png"
    assert browser.save_screenshot(str(shot)) and shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("KNNLM_SCREENSHOT_DIR"):  # e.g. docs/img, for the README
        os.makedirs(os.environ["KNNLM_SCREENSHOT_DIR"], exist_ok=True)
        shutil.copy(shot, os.path.join(os.environ["KNNLM_SCREENSHOT_DIR"], "inspect.png"))
    assert_no_console_errors(browser)


@pytest.mark.slow
def test_twenty_thousand_tokens_open(browser, tmp_path, capsys):
    """Reports the load time of a 20k-token split (no threshold: the machine's load varies)."""
    data = synthetic(n=20000, seed=1)
    path = tmp_path / "big.html"
    started = time.perf_counter()
    path.write_text(page.render(data), encoding="utf-8")
    render_s = time.perf_counter() - started
    load(browser, path)
    timing = browser.execute_script(
        "const t = performance.timing; return {load: t.loadEventEnd - t.navigationStart,"
        " build: window.knnlmViewer.buildMs, spans: document.querySelectorAll('#passage span.t').length}")
    assert timing["spans"] == page.PAGE_SIZE
    assert text(browser, "#page-label").startswith("page 1 of 10")
    with capsys.disabled():
        print(f"\n20k tokens: {path.stat().st_size / 2**20:.1f} MiB html, render() {render_s:.2f} s, page load "
              f"{timing['load']} ms (navigationStart to loadEventEnd), viewer build {timing['build']:.0f} ms")
    assert_no_console_errors(browser)
