"""The search page served at ``/``: plain HTML, and its script at ``/page.js`` (no inline script, no build step).

Stable element ids for people and browser tests: ``#query``, ``#search-button``, ``#image-input``,
``#image-button``, ``#target``, ``#k``, ``#status``, ``#timings``, ``#results``; each hit is a ``.result``
card with an ``img``, a ``.score`` and, for captions, a ``.caption``.
"""

from __future__ import annotations

# The headers of the page, its script and the gallery files: scripts from the service only, no framing.
PAGE_HEADERS = {
    "Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'unsafe-inline'; img-src 'self' "
    "blob:; connect-src 'self'; form-action 'none'; base-uri 'none'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}

PAGE_HTML = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>HAT Search</title>
<style>
  body { font-family: system-ui, sans-serif; margin: 1.5rem; color: #222; }
  h1 { font-size: 1.4rem; margin: 0 0 1rem; }
  form { display: flex; gap: .5rem; flex-wrap: wrap; align-items: center; margin-bottom: .6rem; }
  #query { flex: 1 1 24rem; padding: .45rem; font-size: 1rem; }
  #k { width: 4rem; padding: .4rem; }
  button { padding: .45rem .9rem; font-size: 1rem; cursor: pointer; }
  #status { min-height: 1.3em; color: #555; }
  #status.error { color: #b00020; }
  #timings { color: #777; font-size: .85rem; min-height: 1.1em; }
  #results { display: grid; grid-template-columns: repeat(auto-fill, minmax(170px, 1fr)); gap: .9rem;
             margin-top: 1rem; }
  .result { border: 1px solid #ddd; border-radius: 6px; padding: .5rem; background: #fafafa; }
  .result img { width: 100%; aspect-ratio: 1; object-fit: contain; background: #fff; display: block; }
  .score { font-size: .8rem; color: #555; margin-top: .3rem; }
  .caption { font-size: .9rem; margin-top: .3rem; }
  .rid { font-size: .75rem; color: #888; word-break: break-all; }
</style>
</head>
<body>
<h1>HAT Search</h1>
<form id="text-form">
  <input id="query" type="search" placeholder="Describe an image, e.g. a red circle left of a blue square"
         autocomplete="off" maxlength="1000" aria-label="query">
  <label>k <input id="k" type="number" min="1" max="100" value="12"></label>
  <button id="search-button" type="submit">Search images</button>
</form>
<form id="image-form">
  <input id="image-input" type="file" accept="image/*" aria-label="query image">
  <select id="target" aria-label="search for">
    <option value="captions">captions</option>
    <option value="image">similar images</option>
  </select>
  <button id="image-button" type="submit">Search with image</button>
</form>
<div id="status" role="status"></div>
<div id="timings"></div>
<div id="results"></div>
<script src="/page.js"></script>
</body>
</html>
"""

PAGE_JS = r"""
"use strict";
const $ = (id) => document.getElementById(id);

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function kValue() {
  const k = parseInt($("k").value, 10);
  return Number.isFinite(k) && k > 0 ? k : 12;
}

async function callSearch(url, options) {
  setStatus("Searching…", false);
  $("timings").textContent = "";
  try {
    const response = await fetch(url, options);
    const body = await response.json().catch(() => null);
    if (!response.ok) {
      const message = body && body.error ? body.error.message : response.statusText;
      setStatus("Error " + response.status + ": " + message, true);
      return;
    }
    render(body);
  } catch (err) {
    setStatus("Request failed: " + err, true);
  }
}

function render(body) {
  const results = $("results");
  results.replaceChildren();
  for (const hit of body.results) {
    const card = document.createElement("div");
    card.className = "result";
    card.dataset.id = hit.id;
    const img = document.createElement("img");
    img.src = hit.image_url;
    img.alt = hit.text || hit.id;
    img.loading = "lazy";
    card.appendChild(img);
    if (hit.text !== undefined) {
      const caption = document.createElement("div");
      caption.className = "caption";
      caption.textContent = hit.text;
      card.appendChild(caption);
    }
    const score = document.createElement("div");
    score.className = "score";
    score.textContent = "#" + hit.rank + "  score " + hit.score.toFixed(4) +
      "  (first stage " + hit.first_stage_score.toFixed(4) + ")";
    card.appendChild(score);
    const rid = document.createElement("div");
    rid.className = "rid";
    rid.textContent = hit.image_id ? hit.image_id + " / " + hit.id : hit.id;
    card.appendChild(rid);
    results.appendChild(card);
  }
  const n = body.results.length;
  setStatus(n + " result" + (n === 1 ? "" : "s") + " from index " + body.index_version +
    (body.stage === "first_stage_only" ? " (global vectors only)" : ""), false);
  const t = body.timings_ms;
  $("timings").textContent = Object.keys(t).map((key) => key + " " + t[key].toFixed(1) + " ms").join(" · ");
}

$("text-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const query = $("query").value.trim();
  if (!query) { setStatus("Type a query first.", true); return; }
  callSearch("/search/text", {
    method: "POST",
    headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ query: query, k: kValue() }),
  });
});

$("image-form").addEventListener("submit", (event) => {
  event.preventDefault();
  const file = $("image-input").files[0];
  if (!file) { setStatus("Choose an image first.", true); return; }
  const data = new FormData();
  data.append("image", file);
  data.append("k", String(kValue()));
  data.append("target", $("target").value);
  callSearch("/search/image", { method: "POST", body: data });
});
"""
