// The search page's script (service/static/index.html). Plain DOM calls and textContent only: nothing the
// server returns is ever parsed as HTML. The service's limits come from the page's data-config attribute.
"use strict";

const $ = (id) => document.getElementById(id);

// The model sees the centre square of each image, its side 0.875 x the shorter side (model/preprocess.py:
// resize the shorter side to size / 0.875, centre crop): the explanation grids cover that square.
const CROP = 0.875;
const LEVEL_NAMES = ["Fine detail", "Medium", "Coarse"];
const SPECIAL_TOKENS = new Set(["[CLS]", "[SEP]", "[PAD]"]);
const WORD_END = /[\p{L}\p{N}]$/u;
const WORD_START = /^[\p{L}\p{N}]/u;
const STRENGTH_NAMES = { strong: "Strong match", good: "Good match", weak: "Weak match" };

const config = readConfig();
const state = {
  seq: 0, // the latest request; older answers are dropped
  controller: null,
  request: null, // the search the results answer: {kind, query | file + target, k, candidates, explain}
  lastForm: "text-form",
  hits: new WeakMap(), // result element -> its hit
  mode: null, // "text" or "image" while the results carry explanations (see setupExplanations)
  words: [], // a text search's query words
  levels: [], // [{level, grid, name}] of the explanations, fine -> coarse
  level: 0,
  hover: null, // the word under the pointer: {item (its result, null for the query), word, tokens, text}
  pinned: null, // the word clicked
  indexVersion: null,
  indexRetry: null,
  previewUrl: null,
};

function readConfig() {
  const defaults = {
    default_k: 10, max_k: 100, default_candidates: 200, max_candidates: 1000, max_query_chars: 1000,
    explain: { text: false, image: false }, // which searches take "explain"
  };
  try {
    return Object.assign(defaults, JSON.parse(document.body.dataset.config || "{}"));
  } catch (err) {
    return defaults;
  }
}

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function intValue(id, fallback, high) {
  const value = parseInt($(id).value, 10);
  return Number.isFinite(value) && value >= 1 ? Math.min(value, high) : fallback;
}

function plural(n, word) {
  return n.toLocaleString("en") + " " + word + (n === 1 ? "" : "s");
}

// ------------------------------------------------------------------------------------------- the index

async function loadIndexInfo() {
  clearTimeout(state.indexRetry);
  let response, body;
  try {
    response = await fetch("/index");
    body = await response.json().catch(() => null);
  } catch (err) {
    body = null;
  }
  if (!response || !response.ok || !body) {
    const reason = body && body.error ? ": " + body.error.message : "";
    $("index-counts").textContent = "The index is not loaded yet" + reason;
    $("index-model").textContent = "";
    $("index-version").textContent = "";
    state.indexRetry = setTimeout(loadIndexInfo, 5000);
    return;
  }
  state.indexVersion = body.version;
  $("index-counts").textContent = plural(body.images, "image") + " · " + plural(body.captions, "caption");
  const model = (body.manifest && body.manifest.model) || {};
  const name = modelName(model.source);
  const short = String(body.model_identity || "").slice(0, 12);
  $("index-model").textContent = "Model " + (name ? name + " (" + short + ")" : short);
  $("index-model").title = "Model identity " + body.model_identity;
  $("index-version").textContent = "Index version " + body.version;
}

function modelName(source) {
  if (typeof source !== "string") return "";
  const last = source.replace(/[\\/]+$/, "").split(/[\\/]/).pop() || "";
  return last.replace(/\.(ckpt|pt|pth|safetensors)$/i, "");
}

// ------------------------------------------------------------------------------------------- searching

function textRequest() {
  const query = $("query").value.trim();
  if (!query) return { error: "Type a query first." };
  return { kind: "text", query: query, ...commonOptions("text") };
}

function imageRequest() {
  const file = $("image-input").files[0];
  if (!file) return { error: "Choose an image first." };
  const target = $("target").value;
  const options = commonOptions("image");
  if (target !== "captions") options.explain = false; // the service explains image -> captions only
  return { kind: "image", file: file, target: target, ...options };
}

function commonOptions(kind) {
  return {
    k: intValue("k", config.default_k, config.max_k),
    candidates: intValue("candidates", config.default_candidates, config.max_candidates),
    explain: Boolean(config.explain[kind]) && $("explain").checked,
  };
}

function fetchOptions(request) {
  if (request.kind === "text") {
    const body = { query: request.query, k: request.k, candidates: request.candidates };
    if (request.explain) body.explain = true;
    return { method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body) };
  }
  const data = new FormData();
  data.append("image", request.file);
  data.append("target", request.target);
  data.append("k", String(request.k));
  data.append("candidates", String(request.candidates));
  if (request.explain) data.append("explain", "true");
  return { method: "POST", body: data };
}

function newSearch(request) {
  clearResults();
  state.request = null;
  showPreview(request.kind === "image" ? request.file : null);
  if (request.error) {
    state.seq += 1; // an answer still on its way belongs to the search before
    if (state.controller) state.controller.abort();
    setStatus(request.error, true);
    return;
  }
  send(request, false);
}

async function send(request, more) {
  const seq = ++state.seq;
  if (state.controller) state.controller.abort();
  const controller = (state.controller = new AbortController());
  setStatus(more ? "Loading more results…" : "Searching…", false);
  $("results").setAttribute("aria-busy", "true");
  let response, body;
  try {
    const url = request.kind === "text" ? "/search/text" : "/search/image";
    response = await fetch(url, { ...fetchOptions(request), signal: controller.signal });
    body = await response.json().catch(() => null);
  } catch (err) {
    if (seq === state.seq) failed("The request failed: " + err.message, more);
    return;
  } finally {
    if (seq === state.seq) $("results").removeAttribute("aria-busy");
  }
  if (seq !== state.seq) return;
  if (!response.ok || !body || !Array.isArray(body.results)) {
    const message = body && body.error ? body.error.message : response.statusText;
    failed("Error " + response.status + ": " + message, more);
    return;
  }
  state.request = { ...request, k: body.k };
  render(body, more);
}

function failed(message, more) {
  // A failed new search leaves nothing on the page that could pass for its answer; a failed "more results"
  // keeps the results that answered the same search.
  if (more) {
    setStatus("Could not load more results. " + message, true);
    return;
  }
  clearResults();
  setStatus(message, true);
}

function clearResults() {
  $("results").replaceChildren();
  $("more-button").hidden = true;
  $("weak-note").hidden = true;
  $("partial-note").hidden = true;
  $("explain-bar").hidden = true;
  $("timings").hidden = true;
  state.mode = null;
  state.words = [];
  state.hover = state.pinned = null;
}

function showPreview(file) {
  if (state.previewUrl) URL.revokeObjectURL(state.previewUrl);
  state.previewUrl = file ? URL.createObjectURL(file) : null;
  if (file) $("preview-image").src = state.previewUrl;
  else $("preview-image").removeAttribute("src");
  $("query-preview").hidden = !file;
  document.querySelector(".result-area").classList.toggle("with-preview", Boolean(file));
}

// ------------------------------------------------------------------------------------------- results

function render(body, more) {
  const list = $("results");
  const shown = [...list.children];
  // "More results" asks the same search again for a larger k: the results shown are its first ones, unless
  // the index changed in between (then the whole list is replaced).
  const same = more && shown.every((node, i) => body.results[i] && body.results[i].id === node.dataset.id);
  if (!same) list.replaceChildren();
  const fresh = body.results.slice(same ? shown.length : 0);
  setupExplanations(body);
  for (const hit of fresh) list.appendChild(card(hit));

  const n = body.results.length;
  let status = plural(n, "result");
  if (body.query) status += " for “" + body.query + "”";
  else if (body.target === "image") status += ": images like yours";
  else if (body.target === "captions") status += ": captions that describe your image";
  if (body.stage === "first_stage_only") status += " (by the quick comparison alone)";
  setStatus(status, false);
  $("weak-note").hidden = body.weak !== true;
  $("partial-note").hidden = body.partial !== true;
  showTimings(body.timings_ms || {});
  $("more-button").hidden = !(n >= body.k && body.k < config.max_k);
  if (body.index_version !== state.indexVersion) loadIndexInfo();
  drawAll();
  if (same && fresh.length) {
    const first = list.children[shown.length];
    (first.querySelector("a") || first).focus();
  }
}

// The total time, and each stage under the API's names for those who want them.
function showTimings(timings) {
  const total = timings.total;
  $("timings-total").textContent = typeof total === "number" ? "Took " + total.toFixed(1) + " ms" : "Timings";
  $("timings-stages").textContent = Object.keys(timings)
    .map((key) => key + " " + timings[key].toFixed(1) + " ms")
    .join(" · ");
  $("timings").hidden = false;
}

function card(hit) {
  const item = el("li", "result");
  item.dataset.id = hit.id;
  state.hits.set(item, hit);
  const strength = hit.strength && STRENGTH_NAMES[hit.strength.label];
  const label = "Result " + hit.rank + (strength ? ", " + strength.toLowerCase() : "");
  const explained = explanationOf(hit) !== null;
  if (hit.image_url) {
    const frame = el("a", "frame");
    frame.href = hit.image_url;
    frame.target = "_blank";
    frame.rel = "noopener";
    frame.setAttribute("aria-label", label + ": open image " + (hit.image_id || hit.id));
    const img = el("img");
    img.src = hit.image_url;
    img.alt = hit.text || "image " + hit.id;
    img.loading = "lazy";
    frame.appendChild(img);
    if (explained && state.mode === "text") {
      frame.appendChild(heatmapCanvas());
      img.addEventListener("load", () => drawResult(item));
    }
    item.appendChild(frame);
  } else {
    item.tabIndex = 0; // a caption without an image is still reachable by keyboard
    item.setAttribute("aria-label", label);
  }
  if (hit.text !== undefined && hit.text !== null) {
    const caption = el("div", "caption");
    if (explained && state.mode === "image") {
      // Each word of the caption shows where the model found it in the query image.
      wordsOf(hit.explain.tokens, hit.text).forEach((word, i) => {
        if (word.gap) caption.append(word.gap);
        caption.append(wordButton(word, item, i));
      });
      caption.append(hit.text.slice(caption.textContent.length));
    } else {
      caption.textContent = hit.text;
    }
    item.appendChild(caption);
  }
  item.appendChild(el("div", "score",
    "#" + hit.rank + " · score " + hit.score.toFixed(4) + " (quick score " + hit.first_stage_score.toFixed(4) + ")"));
  if (strength) {
    item.appendChild(el("div", "strength " + hit.strength.label, strength));
    const detail = strengthDetail(hit.strength);
    if (detail) item.appendChild(el("div", "strength-detail", detail));
  }
  if (explained) {
    const scores = hit.explain.levels.map((lv, i) => levelName(i).toLowerCase() + " " + lv.score.toFixed(3));
    item.appendChild(el("div", "level-scores", "Per level: " + scores.join(" · ")));
  }
  item.appendChild(el("div", "rid", hit.image_id ? hit.image_id + " / " + hit.id : hit.id));
  return item;
}

// What the strength's percentile compares the result with (index_format/strength.py), in words.
function strengthDetail(strength) {
  const p = strength.percentile;
  if (typeof p !== "number") return "";
  const share = p >= 100 ? "all " : Math.floor(p) + "% of ";
  if (strength.method === "gallery_pairs") return "Better than " + share + "random image–caption pairs";
  if (strength.method === "query_sample") return "Better than " + share + "a sample of the gallery";
  const n = Math.round(p);
  const tens = n % 100;
  const suffix = tens >= 11 && tens <= 13 ? "th" : ["th", "st", "nd", "rd"][n % 10] || "th";
  return n + suffix + " percentile";
}

// ------------------------------------------------------------------------------------------- explanations
//
// A text search's explanations map each word of the query onto each result's image: the words are buttons
// above the results, each result's image gets a heat map. An image search's explanations map each word of each
// caption onto the query image: the caption words are buttons, the query image gets the heat map.

function explanationOf(hit) {
  const explain = hit.explain;
  return explain && Array.isArray(explain.tokens) && Array.isArray(explain.levels) && explain.levels.length
    ? explain
    : null;
}

function setupExplanations(body) {
  const first = body.results.find((hit) => explanationOf(hit) !== null);
  if (!first) {
    $("explain-bar").hidden = true;
    state.mode = null;
    state.words = [];
    state.levels = [];
    return;
  }
  const mode = body.query === undefined ? "image" : "text";
  const levels = first.explain.levels.map((lv) => ({ level: lv.level, grid: lv.grid }));
  state.levels = levels;
  levels.forEach((lv, i) => (lv.name = levelName(i)));
  if (state.level >= levels.length) state.level = 0;
  if (mode === "text") {
    const words = wordsOf(first.explain.tokens, body.query);
    const sameWords = state.mode === "text" && words.map((w) => w.text).join("\n") === state.words.join("\n");
    if (!sameWords) {
      state.hover = state.pinned = null;
      $("query-words").replaceChildren(...words.map((word, i) => wordButton(word, null, i)));
      state.words = words.map((w) => w.text);
    }
  }
  state.mode = mode;
  $("query-words").hidden = mode !== "text";
  $("explain-help").textContent = mode === "text"
    ? "Point at or click a word of the query: each result shows where in its image the model found it " +
      "(brighter = stronger)."
    : "Point at or click a word of a caption: your image shows where the model found it (brighter = stronger).";
  const switcher = $("level-switch");
  switcher.replaceChildren(el("span", "", "Level of detail:"));
  levels.forEach((lv, i) => {
    const label = el("label");
    const radio = el("input");
    radio.type = "radio";
    radio.name = "level";
    radio.value = String(i);
    radio.checked = i === state.level;
    radio.addEventListener("change", () => {
      state.level = i;
      drawAll();
    });
    label.append(radio, lv.name + " (" + lv.grid[0] + "×" + lv.grid[1] + ")");
    switcher.appendChild(label);
  });
  $("explain-bar").hidden = false;
}

// The words of ``text`` from its tokens: WordPiece pieces of one word (spans that touch, letters or digits on
// both sides) become one word; the encoder's markers are left out. Each word: its text, the indices of its
// tokens (rows of the attention) and the text between it and the word before.
function wordsOf(tokens, text) {
  const words = [];
  let last = null;
  tokens.forEach((token, i) => {
    if (SPECIAL_TOKENS.has(token.text) || typeof token.start !== "number" || typeof token.end !== "number") return;
    if (last && token.start === last.end && WORD_END.test(last.text) && WORD_START.test(text.slice(token.start))) {
      last.tokens.push(i);
      last.end = token.end;
      last.text = text.slice(last.start, last.end);
      return;
    }
    const gap = text.slice(last ? last.end : 0, token.start);
    last = { text: text.slice(token.start, token.end), start: token.start, end: token.end, tokens: [i], gap: gap };
    words.push(last);
  });
  return words;
}

function wordButton(word, item, index) {
  const button = el("button", "word", word.text);
  button.type = "button";
  button.dataset.word = String(index);
  button.setAttribute("aria-pressed", "false");
  const me = { item: item, word: index, tokens: word.tokens, text: word.text };
  button.addEventListener("mouseenter", () => setActive("hover", me));
  button.addEventListener("mouseleave", () => setActive("hover", null));
  button.addEventListener("click", () => setActive("pinned", isWord(state.pinned, me) ? null : me));
  return button;
}

function isWord(a, b) {
  return Boolean(a && b) && a.item === b.item && a.word === b.word;
}

function setActive(which, word) {
  state[which] = word;
  for (const button of document.querySelectorAll(".word")) {
    const owner = button.closest(".result");
    const me = { item: owner, word: Number(button.dataset.word) };
    button.setAttribute("aria-pressed", String(isWord(state.pinned, me)));
    button.classList.toggle("active", isWord(activeWord(), me));
  }
  drawAll();
}

function activeWord() {
  return state.hover || state.pinned;
}

function levelName(i) {
  return LEVEL_NAMES.length === 3 && state.levels.length === 3 ? LEVEL_NAMES[i] : "Level " + (i + 1);
}

function heatmapCanvas() {
  const canvas = el("canvas", "heatmap");
  canvas.hidden = true;
  canvas.setAttribute("aria-hidden", "true");
  return canvas;
}

function drawAll() {
  const word = activeWord();
  if (state.mode === "text") for (const item of $("results").children) drawResult(item);
  const owner = state.mode === "image" && word ? word.item : null;
  for (const item of $("results").children) item.classList.toggle("explaining", item === owner);
  drawHeatmap($("preview-heatmap"), $("preview-image"), owner && state.hits.get(owner), owner && word, $("query-preview"));
}

// A text search's heat map over one result's image.
function drawResult(item) {
  const canvas = item.querySelector("canvas.heatmap");
  if (canvas) drawHeatmap(canvas, item.querySelector("img"), state.hits.get(item), activeWord(), item);
}

// The heat map of ``word`` (its tokens' attention summed) at the chosen level of ``hit``'s explanation, over
// ``img`` (shown with object-fit: contain in the canvas's parent); hidden when there is none. ``marked`` gets
// data-heatmap="WORD@LEVEL" while a map is shown.
function drawHeatmap(canvas, img, hit, word, marked) {
  const level = hit && word ? explanationOf(hit).levels[state.level] : null;
  const values = level ? wordAttention(level, word.tokens) : null;
  if (!values || !img.complete || !img.naturalWidth) {
    canvas.hidden = true;
    delete marked.dataset.heatmap;
    return;
  }
  const [rows, cols] = level.grid;
  const frame = canvas.parentElement;
  const width = frame.clientWidth;
  const height = frame.clientHeight;
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.scale(ratio, ratio);
  // Where the image is drawn (object-fit: contain), and the square the model saw within it.
  const scale = Math.min(width / img.naturalWidth, height / img.naturalHeight);
  const w = img.naturalWidth * scale;
  const h = img.naturalHeight * scale;
  const x = (width - w) / 2;
  const y = (height - h) / 2;
  const side = CROP * Math.min(w, h);
  const sx = x + (w - side) / 2;
  const sy = y + (h - side) / 2;
  ctx.fillStyle = "rgba(0, 0, 0, 0.45)"; // what the model did not see
  ctx.beginPath();
  ctx.rect(x, y, w, h);
  ctx.rect(sx, sy, side, side);
  ctx.fill("evenodd");
  ctx.imageSmoothingEnabled = true;
  ctx.drawImage(gridImage(values, rows, cols), sx, sy, side, side);
  canvas.hidden = false;
  marked.dataset.heatmap = word.text + "@" + state.level;
}

function wordAttention(level, tokens) {
  const maps = tokens.map((t) => level.attention[t]).filter(Array.isArray);
  const cells = level.grid[0] * level.grid[1];
  if (!maps.length || maps.some((m) => m.length !== cells)) return null;
  return maps[0].map((_, i) => maps.reduce((sum, m) => sum + m[i], 0));
}

// One pixel per grid cell (row-major), coloured by its weight scaled to the cell range; the browser smooths
// it when drawn at the image's size.
function gridImage(values, rows, cols) {
  const small = document.createElement("canvas");
  small.width = cols;
  small.height = rows;
  const ctx = small.getContext("2d");
  const image = ctx.createImageData(cols, rows);
  let low = Infinity;
  let high = -Infinity;
  for (const v of values) {
    low = Math.min(low, v);
    high = Math.max(high, v);
  }
  const span = high - low || 1;
  for (let i = 0; i < rows * cols; i += 1) {
    const v = (values[i] - low) / span;
    const [r, g, b] = colour(v);
    image.data.set([r, g, b, Math.round(255 * 0.85 * v ** 1.5)], i * 4); // faint where the word is not
  }
  ctx.putImageData(image, 0, 0);
  return small;
}

const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];

function colour(v) {
  const at = Math.max(0, Math.min(1, v)) * (INFERNO.length - 1);
  const i = Math.min(Math.floor(at), INFERNO.length - 2);
  const f = at - i;
  return INFERNO[i].map((c, j) => Math.round(c + f * (INFERNO[i + 1][j] - c)));
}

// ------------------------------------------------------------------------------------------- wiring

function setup() {
  $("k").max = String(config.max_k);
  $("k").value = String(config.default_k);
  $("candidates").max = String(config.max_candidates);
  $("candidates").value = String(config.default_candidates);
  $("query").maxLength = config.max_query_chars;
  $("explain-option").hidden = !(config.explain.text || config.explain.image);

  $("text-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.lastForm = "text-form";
    newSearch(textRequest());
  });
  $("image-form").addEventListener("submit", (event) => {
    event.preventDefault();
    state.lastForm = "image-form";
    newSearch(imageRequest());
  });
  // Enter in an option runs the search last made (the options belong to both forms).
  $("options").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && event.target.type !== "checkbox") {
      event.preventDefault();
      $(state.lastForm).requestSubmit();
    }
  });
  $("more-button").addEventListener("click", () => {
    if (!state.request) return;
    const step = intValue("k", config.default_k, config.max_k);
    send({ ...state.request, k: Math.min(config.max_k, state.request.k + step) }, true);
  });
  new ResizeObserver(() => requestAnimationFrame(drawAll)).observe($("results"));
  loadIndexInfo();
}

setup();
