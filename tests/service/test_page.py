"""The search page in a real headless Chromium (system /usr/bin/chromium, driven by Playwright).

Screenshots at desktop (1280 px) and phone (375 px) width are written to ``$HAT_PAGE_SCREENSHOTS`` (default:
``page-screenshots`` in pytest's temporary directory); the test that takes them prints where.
"""

from __future__ import annotations

import contextlib
import itertools
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
# Result images load lazily: scrolled into view (the screenshots are of the whole page), all loaded.
ALL_IMAGES_LOADED = """() => { window.scrollTo(0, document.body.scrollHeight);
  return [...document.querySelectorAll('.result img')].every(i => i.complete && i.naturalWidth > 0); }"""


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
    page.evaluate("() => window.scrollTo(0, 0)")
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


def _tokens(text: str) -> list[dict]:
    """WordPiece-like tokens of ``text`` as the API gives them: ``[CLS]``, each word (one longer than five
    characters in two pieces, the second written ``##...``) and punctuation mark with its span, ``[SEP]``."""
    tokens = [{"text": "[CLS]", "start": None, "end": None}]
    for m in re.finditer(r"\w+|[^\w\s]", text):
        start, end = m.span()
        cuts = [start, start + 3, end] if end - start > 5 else [start, end]
        for i, (a, b) in enumerate(itertools.pairwise(cuts)):
            tokens.append({"text": ("##" if i else "") + text[a:b], "start": a, "end": b})
    return [*tokens, {"text": "[SEP]", "start": None, "end": None}]


def _add_strength_and_explanations(body: dict, weak: bool) -> dict:
    """``body``, a search's answer, with strengths and explanations in the API's shape (per level, a map per
    token over the grid): each token of the query (or of a result's caption, for an image search) is found at
    the left-to-right place where it stands in its text."""
    for i, hit in enumerate(body["results"]):
        percentile = 10.0 if weak else max(5.0, 96.0 - 30 * i)
        label = "strong" if percentile >= 80 else "good" if percentile >= 40 else "weak"
        hit["strength"] = {"percentile": percentile, "match_percentile": None, "label": label,
                           "method": "gallery_pairs" if i else "query_sample"}  # fmt: skip
        text = body.get("query", hit.get("text"))
        tokens = _tokens(text)
        places = [(0.5, 0.5 if t["start"] is None else t["start"] / len(text)) for t in tokens]
        levels = []
        for level, (rows, cols) in enumerate([(8, 8), (4, 4), (2, 2)]):
            attention = [_blob(rows, cols, place) for place in places]
            score = 0.3 - 0.1 * level
            levels.append({"level": level, "grid": [rows, cols], "score": score, "attention": attention})
        hit["explain"] = {"tokens": tokens, "levels": levels}
    body["weak"] = weak
    return body


def _with_strength_and_explanations(weak: bool):
    """A route handler for text searches: the service's answer, with strengths and explanations added."""

    def handle(route):
        response = route.fetch()
        if response.status != 200:
            route.fulfill(response=response)
            return
        route.fulfill(response=response, json=_add_strength_and_explanations(response.json(), weak))

    return handle


def _image_search_explained(page, image: str, k: int):
    """A route handler for image searches of ``image``: the service's answer for ``k`` captions, with strengths
    and explanations added. (The upload is sent again: an intercepted request's multipart body is not kept.)"""

    def handle(route):
        upload = {"name": Path(image).name, "mimeType": "image/png", "buffer": Path(image).read_bytes()}
        response = page.request.post(route.request.url, multipart={"image": upload, "k": str(k)})
        route.fulfill(response=response, json=_add_strength_and_explanations(response.json(), weak=False))

    return handle


def _heatmap_pixels(page, selector: str = ".result canvas.heatmap") -> list[int]:
    """The red channel of the (first) heat map ``selector`` finds along its middle row (8 samples)."""
    return page.eval_on_selector(
        selector,
        """c => { const d = c.getContext('2d');
            return [...Array(8).keys()].map(i => d.getImageData(
              Math.floor((i + 0.5) * c.width / 8), Math.floor(c.height / 2), 1, 1).data[0]); }""",
    )


def test_match_strength_and_the_no_good_match_note(page, world):
    page.goto("/")
    page.route("**/search/text", _with_strength_and_explanations(weak=False))
    _search_text(page, _caption(world, "test_00004"), k=4)
    badges = page.locator(".result .strength").all_inner_texts()
    assert badges == ["Strong match", "Good match", "Weak match", "Weak match"]
    assert page.locator(".result .strength-detail").all_inner_texts() == [
        "Better than 96% of a sample of the gallery", "Better than 66% of random image–caption pairs",
        "Better than 36% of random image–caption pairs", "Better than 6% of random image–caption pairs"]  # fmt: skip
    assert page.get_attribute(".result a.frame", "aria-label").startswith("Result 1, strong match")
    assert page.is_hidden("#weak-note")
    page.unroute("**/search/text")
    page.route("**/search/text", _with_strength_and_explanations(weak=True))
    _search_text(page, "a purple elephant on the moon", k=4)
    assert page.is_visible("#weak-note") and "No good match" in page.inner_text("#weak-note")


def test_hovering_or_clicking_a_word_shows_heatmaps_per_level(page, world):
    page.goto("/")
    page.route("**/search/text", _with_strength_and_explanations(weak=False))
    query = "red circle left of blue square."
    _search_text(page, query, k=4)
    assert page.is_visible("#explain-bar")
    # Words, not WordPiece pieces ("cir" + "##cle" is one button) nor the encoder's [CLS] and [SEP].
    assert page.locator("#query-words .word").all_inner_texts() == ["red", "circle", "left", "of", "blue",
                                                                    "square", "."]  # fmt: skip
    shown = ".result canvas.heatmap:not([hidden])"
    assert page.locator(shown).count() == 0  # nothing until a word is chosen
    assert "Per level: fine detail 0.300" in page.inner_text(".result .level-scores")

    page.hover("#query-words .word >> nth=0")  # "red": found at the left
    page.wait_for_function(f"() => document.querySelectorAll('{shown}').length === 4")
    assert page.get_attribute(".result", "data-heatmap") == "red@0"
    left = _heatmap_pixels(page)
    assert left[1] > left[6], left  # bright where the word was found, dark elsewhere
    page.mouse.move(0, 0)  # away: gone again
    page.wait_for_function(f"() => document.querySelectorAll('{shown}').length === 0")

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
    assert page.locator(shown).count() == 0
    # More results: the new ones are explained too, the word stays chosen.
    page.click("#query-words .word >> nth=0")
    page.click("#more-button")
    page.wait_for_function(f"() => document.querySelectorAll('{shown}').length === 8")


def test_an_image_search_maps_caption_words_onto_the_query_image(page, world):
    page.goto("/")
    image = world["items"]["test_00007"]["image"]
    page.route("**/search/image", _image_search_explained(page, image, k=3))
    page.set_input_files("#image-input", image)
    page.click("#image-button")
    page.wait_for_selector(".result .caption .word")
    page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")
    assert "caption" in page.inner_text("#explain-help") and page.is_hidden("#query-words")
    first = page.locator(".result").first
    caption = first.locator(".caption")
    assert caption.inner_text() == page.evaluate("() => document.querySelector('.result .caption').textContent")
    words = caption.locator(".word")
    assert words.count() >= 3 and page.is_hidden("#preview-heatmap")
    words.first.hover()  # the caption's first word: found at the left of the query image
    page.wait_for_selector("#preview-heatmap:not([hidden])")
    assert page.get_attribute("#query-preview", "data-heatmap") == words.first.inner_text() + "@0"
    assert "explaining" in first.get_attribute("class")
    left = _heatmap_pixels(page, "#preview-heatmap")
    assert left[1] > left[6], left
    page.mouse.move(0, 0)
    page.wait_for_selector("#preview-heatmap", state="hidden")
    words.last.click()  # pinned
    page.mouse.move(0, 0)
    assert page.get_attribute("#query-preview", "data-heatmap") == words.last.inner_text() + "@0"
    assert page.locator(".result canvas.heatmap").count() == 0  # the results' images are not what is explained


def test_explain_matches_asks_the_service_and_shows_its_maps(page, world):
    page.goto("/")
    assert page.is_visible("#explain")
    _search_text(page, _caption(world, "test_00004"), k=3)
    assert page.is_hidden("#explain-bar")  # not asked
    assert page.locator(".result .strength").count() == 3  # the service rates every re-ranked result
    page.check("#explain")
    with page.expect_request("**/search/text") as sent:
        page.click("#search-button")
    assert sent.value.post_data_json["explain"] is True
    page.wait_for_selector("#explain-bar:not([hidden])")
    words = page.locator("#query-words .word")
    assert words.count() >= 3
    assert page.locator("#level-switch input").count() == 3
    words.nth(1).hover()
    page.wait_for_function("() => document.querySelectorAll('.result canvas.heatmap:not([hidden])').length === 3")
    assert page.get_attribute(".result", "data-heatmap") == words.nth(1).inner_text() + "@0"
    # Image -> captions: each caption's words over the query image.
    page.set_input_files("#image-input", world["items"]["test_00007"]["image"])
    page.click("#image-button")
    page.wait_for_selector(".result .caption .word")
    page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")
    word = page.locator(".result .caption .word").first
    word.hover()
    page.wait_for_selector("#preview-heatmap:not([hidden])")
    assert page.get_attribute("#query-preview", "data-heatmap") == word.inner_text() + "@0"
    # Image -> images is not explained by the service: the page does not ask (it would be refused).
    page.select_option("#target", "image")
    page.click("#image-button")
    page.wait_for_selector(".result img")
    assert "images like yours" in page.inner_text("#status") and page.is_hidden("#explain-bar")


def _screenshot(page, path: Path) -> None:
    """The whole page, seen from its top (where the sticky query image sits)."""
    page.evaluate("() => window.scrollTo(0, 0)")
    page.screenshot(path=str(path), full_page=True)


def test_screenshots_at_desktop_and_phone_width(open_page, world, shots, capsys):
    for name, viewport in (("desktop", DESKTOP), ("phone", PHONE)):
        page = open_page(viewport)
        page.goto("/")
        page.check("#explain")
        _search_text(page, _caption(world, "test_00004"), k=6)
        page.click("#query-words .word >> nth=1")
        _screenshot(page, shots / f"{name}-text-explained.png")
        page.set_input_files("#image-input", world["items"]["test_00007"]["image"])
        page.click("#image-button")
        page.wait_for_selector(".result .caption .word")
        page.wait_for_function(ALL_IMAGES_LOADED)
        page.wait_for_function("() => document.querySelector('#preview-image').naturalWidth > 0")
        page.click(".result .caption .word >> nth=2")
        _screenshot(page, shots / f"{name}-image-explained.png")
        # Further down the results, the query image (and its heat map) is still in sight.
        page.locator(".result >> nth=5").locator(".caption .word").nth(1).click()
        page.wait_for_selector("#preview-heatmap:not([hidden])")
        box = page.locator("#preview-heatmap").bounding_box()
        assert box["y"] >= 0 and box["y"] + box["height"] <= viewport["height"], box
        page.screenshot(path=str(shots / f"{name}-image-explained-scrolled.png"))
        page.eval_on_selector("#query", "q => { q.value = 'a'.repeat(1001); }")
        page.click("#search-button")
        page.wait_for_selector("#status.error")
        _screenshot(page, shots / f"{name}-error.png")
        # Nothing wider than the window, at either width.
        assert page.evaluate("() => document.documentElement.scrollWidth") <= viewport["width"]
    with capsys.disabled():
        print(f"\npage screenshots: {shots}")
