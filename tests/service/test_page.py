"""The search page in a real headless Chromium (system /usr/bin/chromium, driven by Playwright).

Screenshots at desktop (1280 px) and phone (375 px) width are written to ``$HAT_PAGE_SCREENSHOTS`` (default:
``page-screenshots`` in pytest's temporary directory); the test that takes them prints where.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts a browser

CHROMIUM = os.environ.get("HAT_TEST_CHROMIUM", "/usr/bin/chromium")
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]  # fmt: skip
DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 740}
# Refusals some tests provoke on purpose (Chromium logs each failed request as a console error).
EXPECTED_REFUSALS = ("responded with a status of 422", "responded with a status of 415")
ALL_IMAGES_LOADED = "() => [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0)"


def _unavailable(reason: str) -> None:
    """Skip loudly on a developer machine without a browser; fail in CI, which installs one (.ci/run)."""
    if os.environ.get("HAT_REQUIRE_BROWSER"):
        pytest.fail(f"HAT_REQUIRE_BROWSER is set but {reason}")
    pytest.skip(f"BROWSER TEST NOT RUN: {reason}")


@pytest.fixture(scope="module")
def browser():
    try:
        from playwright import sync_api
    except ImportError:
        _unavailable("playwright is not installed (pip install -e '.[dev]')")
    if not Path(CHROMIUM).is_file():
        _unavailable(f"there is no Chromium at {CHROMIUM} (apt-get install chromium, or set HAT_TEST_CHROMIUM)")
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


@pytest.fixture
def open_page(browser, server):
    """``open_page(viewport=DESKTOP)``: a fresh page on the server; at the end, no script errors, no CSP
    violations and no failed loads (other than the refusals a test asks for)."""
    contexts, errors = [], []

    def open_(viewport: dict = DESKTOP):
        context = browser.new_context(base_url=server.url, viewport=viewport)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(str(exc)))
        page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
        return page

    yield open_
    for context in contexts:
        context.close()
    errors = [e for e in errors if not any(refusal in e for refusal in EXPECTED_REFUSALS)]
    assert not errors, errors


@pytest.fixture
def page(open_page):
    return open_page()


@pytest.fixture(scope="module")
def shots(tmp_path_factory) -> Path:
    """Where the screenshots go."""
    where = os.environ.get("HAT_PAGE_SCREENSHOTS")
    path = Path(where) if where else tmp_path_factory.getbasetemp() / "page-screenshots"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _caption(world, image_id: str) -> str:
    return world["items"][image_id]["captions"][0]


def _search_text(page, query: str, k: int | None = None) -> None:
    if k is not None:
        page.fill("#k", str(k))
    page.fill("#query", query)
    page.click("#search-button")
    page.wait_for_selector(".result img")
    page.wait_for_function(ALL_IMAGES_LOADED)


def _ids(page) -> list[str]:
    return page.eval_on_selector_all(".result", "items => items.map(i => i.dataset.id)")


def _focused(page) -> str:
    """The focused element: its id, else its tag and classes."""
    return page.evaluate(
        "() => { const a = document.activeElement; return a.id || a.tagName.toLowerCase() + '.' + a.className; }"
    )


# ------------------------------------------------------------------------------------------- searches


def test_text_query_shows_result_images(page, world):
    page.goto("/")
    assert page.title() == "HAT Search"
    _search_text(page, _caption(world, "test_00004"), k=6)
    assert page.locator(".result").count() == 6
    assert "6 results" in page.inner_text("#status")
    assert page.inner_text("#timings").startswith("Took ")
    page.click("#timings summary")
    assert "rerank" in page.inner_text("#timings-stages")
    assert page.locator(".result .score").first.inner_text().startswith("#1")
    assert page.is_hidden("#query-preview")  # the query image belongs to image searches only


def test_index_size_model_and_version_are_shown(page, client):
    info = client.get("/index").json()
    page.goto("/")
    page.wait_for_function("() => document.querySelector('#index-version').textContent !== ''")
    assert page.inner_text("#index-counts") == "40 images · 200 captions"
    model = page.inner_text("#index-model")
    assert model == f"Model demo ({info['model_identity'][:12]})"
    assert page.get_attribute("#index-model", "title") == f"Model identity {info['model_identity']}"
    assert page.inner_text("#index-version") == f"Index version {info['version']}"


def test_limits_and_plain_labels_come_from_the_service(page):
    page.goto("/")
    assert page.get_attribute("#k", "max") == "100" and page.input_value("#k") == "10"
    assert page.get_attribute("#candidates", "max") == "1000"
    assert page.get_attribute("#query", "maxlength") == "1000"
    # Plain labels, bound to their inputs; the re-rank option explains itself.
    assert page.get_by_label("Results", exact=True).get_attribute("id") == "k"
    assert page.get_by_label("Matches to re-rank").get_attribute("id") == "candidates"
    hint = page.inner_text("#" + page.get_attribute("#candidates", "aria-describedby"))
    assert "slower, more thorough" in hint
    assert page.get_by_label("Describe an image").get_attribute("id") == "query"
    assert page.get_by_label("Or search with an image").get_attribute("id") == "image-input"
    assert page.get_by_label("Find").get_attribute("id") == "target"
    body = page.inner_text("body")
    assert "first stage" not in body.lower() and "candidates" not in body.lower()


def test_image_upload_shows_the_query_image_beside_the_captions(page, world):
    page.goto("/")
    page.set_input_files("#image-input", world["items"]["test_00007"]["image"])
    page.click("#image-button")
    page.wait_for_selector(".result .caption")
    captions = page.locator(".result .caption").all_inner_texts()
    assert captions and all(text.strip() for text in captions)
    page.wait_for_function(ALL_IMAGES_LOADED)
    assert page.inner_text("#status").endswith("results: captions that describe your image")
    assert page.is_visible("#query-preview")
    page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")
    assert page.get_attribute("#preview-image", "src").startswith("blob:")
    preview = page.locator("#query-preview").bounding_box()
    results = page.locator("#results").bounding_box()
    assert preview["x"] + preview["width"] <= results["x"]  # beside, at desktop width
    assert abs(preview["y"] - results["y"]) < 5
    # A text search next: the query image goes.
    _search_text(page, _caption(world, "test_00004"))
    assert page.is_hidden("#query-preview")


def test_a_new_search_clears_the_results_and_an_error_leaves_none(page, world, tmp_path):
    page.goto("/")
    _search_text(page, _caption(world, "test_00004"))
    assert page.locator(".result").count() == 10
    # Set by script: typing cannot pass the input's maxlength, but a client can send it; the server refuses.
    page.eval_on_selector("#query", "q => { q.value = 'a'.repeat(1001); }")
    page.click("#search-button")
    page.wait_for_selector("#status.error")
    assert "query is 1001 characters; the limit is 1000" in page.inner_text("#status")
    assert page.locator(".result").count() == 0 and page.is_hidden("#more-button")
    assert page.is_hidden("#timings")
    # The same after an image search that fails: nothing from before stays.
    _search_text(page, _caption(world, "test_00004"))
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    page.set_input_files("#image-input", str(not_an_image))
    page.click("#image-button")
    page.wait_for_selector("#status.error")
    assert "Error 415" in page.inner_text("#status")
    assert page.locator(".result").count() == 0
    # Asking without a query is refused on the page, and clears too.
    _search_text(page, _caption(world, "test_00004"))
    page.fill("#query", "   ")
    page.press("#query", "Enter")
    assert page.inner_text("#status") == "Type a query first."
    assert page.locator(".result").count() == 0


def test_a_slow_answer_to_an_earlier_search_never_replaces_the_newer_one(page, world):
    page.goto("/")
    held = []
    page.route("**/search/text", lambda route: held.append(route) if not held else route.continue_())
    page.fill("#query", "first question")
    page.click("#search-button")
    page.wait_for_function("() => document.querySelector('#status').textContent === 'Searching…'")
    _search_text(page, _caption(world, "test_00004"), k=3)
    with contextlib.suppress(Exception):  # the page has aborted it: its answer, if any, is never shown
        held[0].continue_()
    page.wait_for_timeout(300)
    assert page.locator(".result").count() == 3
    assert _caption(world, "test_00004") in page.inner_text("#status")


def test_more_results_grows_the_list_and_keeps_it(page, world):
    page.goto("/")
    _search_text(page, _caption(world, "test_00004"), k=4)
    first = _ids(page)
    page.eval_on_selector(".result", "item => { item.dataset.kept = 'yes'; }")
    page.click("#more-button")
    page.wait_for_function("() => document.querySelectorAll('.result').length === 8")
    assert _ids(page)[:4] == first and len(set(_ids(page))) == 8
    assert page.get_attribute(".result", "data-kept") == "yes"  # the same elements: appended, not redrawn
    assert "8 results" in page.inner_text("#status")
    # The focus goes to the first new result, for keyboard users.
    assert page.evaluate("() => document.activeElement.closest('.result').dataset.id") == _ids(page)[4]


def test_more_results_stops_at_the_service_limit(open_page, start_server, index_root, world):
    server = start_server(index_root=str(index_root), max_k=5, default_k=3)
    server.wait_ready()
    page = open_page()
    page.goto(server.url + "/")
    _search_text(page, _caption(world, "test_00004"))
    assert page.locator(".result").count() == 3 and page.is_visible("#more-button")
    page.click("#more-button")
    page.wait_for_function("() => document.querySelectorAll('.result').length === 5")
    assert page.is_hidden("#more-button")


# ------------------------------------------------------------------------------------------- keyboard


def test_keyboard_only_search_with_visible_focus(page, world):
    page.goto("/")
    page.keyboard.press("Tab")
    assert _focused(page).startswith("a.skip-link")
    page.keyboard.press("Tab")
    assert _focused(page) == "query"
    page.keyboard.type(_caption(world, "test_00004"))
    page.keyboard.press("Enter")
    page.wait_for_selector(".result img")
    # Tab on: every control in reading order, then the results.
    seen = []
    for _ in range(30):
        page.keyboard.press("Tab")
        seen.append(_focused(page))
        style = page.evaluate("() => { const s = getComputedStyle(document.activeElement); "
                              "return [s.outlineStyle, s.outlineWidth]; }")  # fmt: skip
        assert style[0] != "none" and style[1] != "0px", (seen[-1], style)
        if seen[-1].startswith("a.frame"):
            break
    controls = ["search-button", "image-input", "target", "image-button", "k", "candidates"]
    assert [s for s in seen if s in controls] == controls
    assert seen[-1].startswith("a.frame")
    assert page.evaluate("() => document.activeElement.getAttribute('aria-label')").startswith("Result 1")
    # Enter in an option runs the search again with it.
    page.focus("#k")
    page.keyboard.press("Control+a")
    page.keyboard.type("3")
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.result').length === 3")
    # The last result, then "More results" by keyboard.
    page.focus(".result:last-child a")
    page.keyboard.press("Tab")
    assert _focused(page) == "more-button"
    page.keyboard.press("Enter")
    page.wait_for_function("() => document.querySelectorAll('.result').length === 6")


def test_every_control_has_a_name(page):
    page.goto("/")
    unnamed = page.evaluate(
        """() => [...document.querySelectorAll('input, select, button, a')].filter(e => {
             if (e.labels && e.labels.length) return false;
             return !(e.getAttribute('aria-label') || e.textContent.trim());
           }).map(e => e.id || e.outerHTML)"""
    )
    assert unnamed == []


# ------------------------------------------------------------------------------------------- strength, explanations


def _blob(rows: int, cols: int, centre: tuple[float, float]) -> list[float]:
    """A normalised bump over a ``rows x cols`` grid (row-major) centred at ``centre`` (fractions)."""
    cy, cx = centre[0] * (rows - 1), centre[1] * (cols - 1)
    spread = max(rows, cols) / 3
    values = [math.exp(-((r - cy) ** 2 + (c - cx) ** 2) / spread**2) for r in range(rows) for c in range(cols)]
    return [v / sum(values) for v in values]


def _words(query: str) -> list[dict]:
    return [{"text": m.group(), "start": m.start(), "end": m.end()} for m in re.finditer(r"\w+", query)]


def _with_strength_and_explanations(weak: bool):
    """A route handler that passes the search to the service and adds, to its answer, strengths and
    explanations in the API's shape: word ``i`` of ``n`` found at the left-to-right fraction ``i / n``."""

    def handle(route):
        response = route.fetch()
        if response.status != 200:
            route.fulfill(response=response)
            return
        body = response.json()
        words = _words(body["query"])
        for i, hit in enumerate(body["results"]):
            percentile = 10.0 if weak else max(5.0, 96.0 - 30 * i)
            label = "strong" if percentile >= 80 else "good" if percentile >= 40 else "weak"
            hit["strength"] = {"percentile": percentile, "label": label}
            levels = []
            for level, (rows, cols) in enumerate([(8, 8), (4, 4), (2, 2)]):
                attention = [_blob(rows, cols, (0.5, t / max(1, len(words) - 1))) for t in range(len(words))]
                score = 0.3 - 0.1 * level
                levels.append({"level": level, "grid": [rows, cols], "score": score, "attention": attention})
            hit["explain"] = {"tokens": words, "levels": levels}
        body["weak"] = weak
        route.fulfill(response=response, json=body)

    return handle


def _heatmap_pixels(page, index: int = 0) -> list[int]:
    """The red channel of result ``index``'s heat map along its middle row (8 samples)."""
    return page.eval_on_selector_all(
        "canvas.heatmap",
        f"""cs => {{ const c = cs[{index}]; const d = c.getContext('2d');
            return [...Array(8).keys()].map(i => d.getImageData(
              Math.floor((i + 0.5) * c.width / 8), Math.floor(c.height / 2), 1, 1).data[0]); }}""",
    )


def test_match_strength_and_the_no_good_match_note(page, world):
    page.goto("/")
    page.route("**/search/text", _with_strength_and_explanations(weak=False))
    _search_text(page, _caption(world, "test_00004"), k=4)
    badges = page.locator(".result .strength").all_inner_texts()
    assert badges == ["Strong match · 96th percentile", "Good match · 66th percentile",
                      "Weak match · 36th percentile", "Weak match · 6th percentile"]  # fmt: skip
    assert page.get_attribute(".result a.frame", "aria-label").startswith("Result 1, strong match")
    assert page.is_hidden("#weak-note")
    page.unroute("**/search/text")
    page.route("**/search/text", _with_strength_and_explanations(weak=True))
    _search_text(page, "a purple elephant on the moon", k=4)
    assert page.is_visible("#weak-note") and "No good match" in page.inner_text("#weak-note")


def test_hovering_or_clicking_a_word_shows_heatmaps_per_level(page, world):
    page.goto("/")
    page.route("**/search/text", _with_strength_and_explanations(weak=False))
    query = "red circle left of blue square"
    _search_text(page, query, k=4)
    assert page.is_visible("#explain-bar")
    assert page.locator("#query-words .word").all_inner_texts() == query.split()
    assert page.locator("canvas.heatmap:visible").count() == 0  # nothing until a word is chosen
    assert "Per level: fine detail 0.300" in page.inner_text(".result .level-scores")

    page.hover("#query-words .word >> nth=0")  # "red": found at the left
    page.wait_for_function("() => document.querySelectorAll('canvas.heatmap:not([hidden])').length === 4")
    assert page.get_attribute(".result", "data-heatmap") == "red@0"
    left = _heatmap_pixels(page)
    assert left[1] > left[6], left  # bright where the word was found, dark elsewhere
    page.mouse.move(0, 0)  # away: gone again
    page.wait_for_function("() => document.querySelectorAll('canvas.heatmap:not([hidden])').length === 0")

    page.click("#query-words .word >> nth=5")  # "square", found at the right: pinned by a click
    page.mouse.move(0, 0)
    assert page.get_attribute("#query-words .word >> nth=5", "aria-pressed") == "true"
    assert page.get_attribute(".result", "data-heatmap") == "square@0"
    right = _heatmap_pixels(page)
    assert right[6] > right[1], right
    page.check("#level-switch input >> nth=2")  # the coarse level
    assert page.get_attribute(".result", "data-heatmap") == "square@2"
    assert page.locator("#level-switch label").all_inner_texts() == [
        "Fine detail (8×8)", "Medium (4×4)", "Coarse (2×2)"]  # fmt: skip
    # By keyboard: Enter on a focused word pins it; again unpins.
    page.focus("#query-words .word >> nth=1")
    page.keyboard.press("Enter")
    assert page.get_attribute(".result", "data-heatmap") == "circle@2"
    page.keyboard.press("Enter")
    assert page.locator("canvas.heatmap:visible").count() == 0


def test_screenshots_at_desktop_and_phone_width(open_page, world, shots, capsys):
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_page(viewport)
        page.goto("/")
        page.route("**/search/text", _with_strength_and_explanations(weak=False))
        _search_text(page, "red circle left of blue square", k=6)
        page.click("#query-words .word >> nth=0")
        page.screenshot(path=str(shots / f"{name}-text-explained.png"), full_page=True)
        page.set_input_files("#image-input", world["items"]["test_00007"]["image"])
        page.click("#image-button")
        page.wait_for_selector(".result .caption")
        page.wait_for_function(ALL_IMAGES_LOADED)
        page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")
        page.screenshot(path=str(shots / f"{name}-image-search.png"), full_page=True)
        page.eval_on_selector("#query", "q => { q.value = 'a'.repeat(1001); }")
        page.click("#search-button")
        page.wait_for_selector("#status.error")
        page.screenshot(path=str(shots / f"{name}-error.png"), full_page=True)
        # Nothing wider than the window, at either width.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    with capsys.disabled():
        print(f"\npage screenshots: {shots}")
