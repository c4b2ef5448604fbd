"""The interactive page in a real browser: Playwright driving Debian's headless chromium.

Set-up (the Makefile's test set-up does this): `apt-get install -y chromium` and the dev extra
(playwright). Outside CI the test skips when chromium or playwright is missing; in CI it fails.
"""

import os
import pathlib

import pytest
import torch

from attnlab.viz import AttentionView

CHROMIUM = pathlib.Path("/usr/bin/chromium")
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--no-first-run",
]
TOKENS = [
    "[CLS]", "the", "<script>alert(1)</script>", '<img src=x onerror="window.__pwned=1">',
    "'quote\"", "a & b &amp;", "brush", "[SEP]",
]
N_LAYERS, N_HEADS = 3, 4


def _need(condition: bool, why: str) -> None:
    if condition:
        return
    if os.environ.get("CI"):
        pytest.fail(f"{why} (CI is set, so the browser test may not skip)")
    pytest.skip(why)


@pytest.fixture(scope="module")
def weights():
    gen = torch.Generator().manual_seed(7)
    seq = len(TOKENS)
    return [torch.softmax(3 * torch.randn(1, N_HEADS, seq, seq, generator=gen), -1) for _ in range(N_LAYERS)]


@pytest.fixture(scope="module")
def browser():
    _need(CHROMIUM.exists(), f"{CHROMIUM} not found: install it with `apt-get install -y chromium`")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        _need(False, "playwright is not installed: pip install 'attnlab[dev]'")
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def page(browser, weights, tmp_path):
    path = AttentionView(TOKENS, weights, title="<b>bold?</b>", heads=[0, 2]).save(tmp_path / "page.html")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    problems = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type in ("error", "warning") else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("dialog", lambda d: (problems.append(f"dialog: {d.message}"), d.dismiss()))
    page.on("request", lambda r: None if r.url.startswith("file://") else problems.append(f"request: {r.url}"))
    page.goto(path.as_uri())
    yield page
    page.close()
    assert problems == []


def _groups(page) -> list[int]:
    return page.eval_on_selector_all("#head-svg g.head-lines", "gs => gs.map(g => Number(g.dataset.head))")


def _lines(page, selector="#head-svg line.attn") -> list[dict]:
    return page.eval_on_selector_all(
        selector,
        """ls => ls.map(l => ({head: Number(l.dataset.head), from: Number(l.dataset.from),
                              to: Number(l.dataset.to), opacity: Number(l.getAttribute('stroke-opacity')),
                              shown: getComputedStyle(l).display !== 'none'}))""",
    )


def test_one_line_set_per_selected_head(page):
    assert _groups(page) == [0, 2]
    assert {line["head"] for line in _lines(page)} == {0, 2}
    page.click("#head-toggles button[data-head='1']")
    assert _groups(page) == [0, 1, 2]
    page.click("#head-toggles button[data-head='0']")
    assert _groups(page) == [1, 2]
    page.click("#heads-none")
    assert _groups(page) == [] and _lines(page) == []
    page.click("#heads-all")
    assert _groups(page) == list(range(N_HEADS))


def test_hover_highlights_the_token_lines(page, weights):
    assert all(line["shown"] for line in _lines(page))
    page.hover("#head-svg g.tok-from[data-index='1']")
    shown = [line for line in _lines(page) if line["shown"]]
    expected = {(h, 1, j) for h in (0, 2) for j in range(len(TOKENS)) if weights[0][0, h, 1, j] >= 0.002}
    assert {(line["head"], line["from"], line["to"]) for line in shown} == expected
    assert "Layer 0: \u201cthe\u201d attends to" in page.inner_text("#info")
    page.hover("#head-svg g.tok-to[data-index='6']")
    shown = [line for line in _lines(page) if line["shown"]]
    assert shown and all(line["to"] == 6 for line in shown)
    page.mouse.move(5, 5)
    assert all(line["shown"] for line in _lines(page))


def test_selecting_a_layer_redraws_it(page, weights):
    page.select_option("#layer-select", "2")
    assert page.get_attribute("#head-svg", "data-layer") == "2"
    for line in _lines(page):
        assert line["opacity"] == pytest.approx(float(weights[2][0, line["head"], line["from"], line["to"]]), abs=1e-3)


def test_model_view_opens_a_head(page):
    page.click("#tab-model")
    assert page.is_hidden("#head-view") and page.is_visible("#model-view")
    assert page.locator("#model-grid canvas").count() == N_LAYERS * N_HEADS
    page.click("#model-grid canvas[data-layer='1'][data-head='3']")
    assert page.is_visible("#head-view") and page.is_hidden("#model-view")
    assert _groups(page) == [3]
    assert page.get_attribute("#head-svg", "data-layer") == "1"
    assert page.input_value("#layer-select") == "1"


def test_html_in_tokens_is_text(page):
    page.hover("#head-svg g.tok-from[data-index='3']")
    page.hover("#head-svg g.tok-to[data-index='2']")
    assert page.evaluate("window.__pwned") is None
    assert page.locator("script").count() == 2 and page.locator("img").count() == 0
    assert page.locator("b").count() == 0
    assert page.text_content("#title") == "<b>bold?</b>"
    titles = page.eval_on_selector_all("#head-svg g.tok-from title", "ts => ts.map(t => t.textContent)")
    assert titles == TOKENS


def test_jupyter_iframe_renders(browser, weights):
    """What a notebook cell shows (_repr_html_: the page in an iframe) draws the same head view."""
    page = browser.new_page()
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.set_content("<p>notebook output</p>" + AttentionView(TOKENS, weights, heads=[1])._repr_html_())
    frame = page.frame_locator("iframe")
    frame.locator("#head-svg g.head-lines").first.wait_for()
    assert frame.locator("#head-svg g.head-lines").count() == 1
    assert frame.locator("#head-svg g.head-lines").get_attribute("data-head") == "1"
    page.close()
    assert errors == []


def test_generated_text_grows_the_head_view(browser, weights, tmp_path):
    """A generated text (prompt of 3 tokens): the step slider shows the prompt, then one more token at a
    time, with lines only between the tokens shown; play runs to the last token."""
    path = AttentionView(TOKENS, weights, heads=[0, 1], prompt_length=3).save(tmp_path / "generated.html")
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    errors = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(path.as_uri())

    def visible() -> list[int]:
        return page.eval_on_selector_all("#head-svg g.tok-from", "gs => gs.filter(g => g.style.display !== 'none')"
                                                                 ".map(g => Number(g.dataset.index))")

    def set_step(n: int) -> None:
        page.eval_on_selector("#step-range", "(r, n) => { r.value = String(n); r.dispatchEvent(new Event('input')); }", n)

    assert page.is_visible("#steps") and visible() == list(range(len(TOKENS)))  # opens on the whole text
    assert page.locator("#head-svg g.tok-from.generated").count() == len(TOKENS) - 3
    for n in (3, 4, 6):
        set_step(n)
        assert visible() == list(range(n)) and page.get_attribute("#head-svg", "data-shown") == str(n)
        lines = _lines(page)
        assert lines and all(line["from"] < n and line["to"] < n for line in lines)
        assert page.inner_text("#step-label") == f"{n - 3} / {len(TOKENS) - 3} generated"
    newest = {line["to"] for line in _lines(page) if line["from"] == 5}
    assert newest == {j for j in range(6) if weights[0][0, 0, 5, j] >= 0.002 or weights[0][0, 1, 5, j] >= 0.002}
    page.click("#step-play")
    page.wait_for_function(f"document.getElementById('head-svg').dataset.shown === '{len(TOKENS)}'", timeout=10000)
    assert visible() == list(range(len(TOKENS)))
    page.close()
    assert errors == []


def test_a_plain_text_has_no_step_control(page):
    assert page.is_hidden("#steps")
