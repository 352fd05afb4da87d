"use strict";
// attnkit explain page: shows the explain data embedded above (built by attnkit/analysis/explain_page.py).
// No network, no libraries. Numbers are shown as the Python side computed them; the page only
// multiplies a weight by a value vector for the step-2 columns and formats.
(function () {
  const data = JSON.parse(document.getElementById("attnkit-data").textContent);
  const TYPES = { f32: Float32Array, f64: Float64Array, i32: Int32Array, u8: Uint8Array };

  function decode(spec) {
    const text = atob(spec.data);
    const bytes = new Uint8Array(text.length);
    for (let i = 0; i < text.length; i++) bytes[i] = text.charCodeAt(i);
    const Type = TYPES[spec.dtype];
    const strides = [];
    let size = 1;
    for (let d = spec.shape.length - 1; d >= 0; d--) { strides[d] = size; size *= spec.shape[d]; }
    return { values: new Type(bytes.buffer), shape: spec.shape, strides: strides };
  }
  function offset(array, index) {
    let at = 0;
    for (let d = 0; d < index.length; d++) at += index[d] * array.strides[d];
    return at;
  }
  function get(array, ...index) { return array.values[offset(array, index)]; }
  function slice(array, ...index) {  // the last axis at index
    const start = offset(array, index.concat([0]));
    return array.values.subarray(start, start + array.shape[array.shape.length - 1]);
  }

  const model = data.model, tokens = data.tokens;
  const N = tokens.ids.length, H = model.n_heads, L = model.n_layers;
  const GROUP = H / model.n_kv_heads, GROUPED = model.attention !== "MHA";
  const ALL = data.listed === "all";
  const rowOf = new Map(data.rows.map((p, i) => [p, i]));
  const s1 = {};
  for (const key of ["lse", "qk", "weights", "keys", "rest", "rest_hidden"]) {
    if (data.step1[key]) s1[key] = decode(data.step1[key]);
  }
  const strip = data.step1.strip ? { width: data.step1.strip.width, max: decode(data.step1.strip.max),
    hidden: decode(data.step1.strip.hidden) } : null;
  const extra = data.step1.extra.map(e => ({ label: e.label, scores: decode(e.scores), weights: decode(e.weights) }));
  const s2 = {};
  for (const key of ["keys", "weights", "shares", "output", "error", "value_index", "value_table"]) {
    s2[key] = decode(data.step2[key]);
  }
  const state = { token: data.token, layer: data.layer, head: data.head, preview: null };

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [key, value] of Object.entries(attrs || {})) {
      if (key === "class") node.className = value;
      else if (key === "style") node.style.cssText = value;
      else node.setAttribute(key, value);
    }
    for (const child of children) {
      if (child !== null && child !== undefined) node.append(child instanceof Node ? child : String(child));
    }
    return node;
  }
  const span = (h) => h[0] === h[h.length - 1] ? String(h[0]) : h[0] + "–" + h[h.length - 1];
  const label = (j) => tokens.labels[j];
  const patternOf = (l) => data.layers[l].pattern;
  const sentence = (text) => text[0].toUpperCase() + text.slice(1) + ".";
  const signed = (x) => (x >= 0 ? "+" : "-") + Math.abs(x).toFixed(2);  // as the terminal prints it

  // The rows of one (layer, head, query row), as the two steps list them.
  function step1Of(l, h, r) {
    const keys = ALL ? Array.from({ length: N }, (_, j) => j) : Array.from(slice(s1.keys, l, h, r));
    return {
      keys: keys,
      qk: slice(s1.qk, l, h, r),
      weights: slice(s1.weights, l, h, r),
      lse: get(s1.lse, l, h, r),
      rest: ALL ? 0 : get(s1.rest, l, h, r),
      restHidden: ALL ? 0 : get(s1.rest_hidden, l, h, r),
      extra: extra.map(e => ({ label: e.label, score: get(e.scores, l, h, r), weight: get(e.weights, l, h, r) }))
        .filter(e => e.score > -Infinity),  // -inf: a layer without this row (no sinks)
    };
  }
  function step2Of(l, h, r) {
    const keys = Array.from(slice(s2.keys, l, h, r));
    const index = slice(s2.value_index, l, h, r);
    return {
      keys: keys,
      weights: slice(s2.weights, l, h, r),
      shares: slice(s2.shares, l, h, r),
      values: keys.map((_, c) => slice(s2.value_table, index[c])),
      output: slice(s2.output, l, h, r),
      error: get(s2.error, l, h, r),
    };
  }

  // Colours: matplotlib's "Blues" for weights (as the PNGs), red-white-blue for vector entries.
  const BLUES = [[247, 251, 255], [222, 235, 247], [198, 219, 239], [158, 202, 225], [107, 174, 214],
    [66, 146, 198], [33, 113, 181], [8, 81, 156], [8, 48, 107]];
  function blues(w) {
    const x = Math.max(0, Math.min(1, w)) * (BLUES.length - 1), i = Math.min(Math.floor(x), BLUES.length - 2), f = x - i;
    return BLUES[i].map((c, k) => Math.round(c + f * (BLUES[i + 1][k] - c)));
  }
  function diverging(x, scale) {
    const t = Math.max(-1, Math.min(1, scale > 0 ? x / scale : 0));
    const end = t >= 0 ? [33, 102, 172] : [178, 24, 43];
    return end.map(c => Math.round(255 + Math.abs(t) * (c - 255)));
  }
  function hatch(x, y) { return (x + y) % 4 < 2 ? [200, 200, 200] : [238, 238, 238]; }

  // One head's thumbnail: every row x every key, or the held rows x the strip bins of a long text.
  function drawThumbnail(canvas, l, h) {
    const rows = data.rows.length;
    const columns = ALL ? N : strip.max.shape[3];
    const width = Math.max(columns, 48), height = data.every_row ? Math.max(rows, 48) : Math.max(rows * 4, 24);
    canvas.width = width; canvas.height = height;
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(width, height);
    for (let y = 0; y < height; y++) {
      const r = Math.floor(y * rows / height);
      const rowWeights = ALL ? slice(s1.weights, l, h, r) : slice(strip.max, l, h, r);
      const rowQk = ALL ? slice(s1.qk, l, h, r) : null;
      const rowHidden = ALL ? null : slice(strip.hidden, l, h, r);
      for (let x = 0; x < width; x++) {
        const c = Math.floor(x * columns / width);
        const hidden = ALL ? Number.isNaN(rowQk[c]) : rowHidden[c] === 2;
        const rgb = hidden ? hatch(x, y) : blues(ALL ? rowWeights[c] : Math.sqrt(rowWeights[c]));
        const at = 4 * (y * width + x);
        image.data[at] = rgb[0]; image.data[at + 1] = rgb[1]; image.data[at + 2] = rgb[2]; image.data[at + 3] = 255;
      }
    }
    ctx.putImageData(image, 0, 0);
  }

  function vectorCanvas(vector, scale) {
    const canvas = el("canvas", { width: vector.length, height: 1 });
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(vector.length, 1);
    vector.forEach((x, i) => {
      const rgb = diverging(x, scale);
      image.data.set([rgb[0], rgb[1], rgb[2], 255], 4 * i);
    });
    ctx.putImageData(image, 0, 0);
    return canvas;
  }
  function vectorCell(vector, scale) {
    const first = Array.from(vector.slice(0, 3), signed).join(" ");
    return el("td", {}, el("div", { class: "vec" }, vectorCanvas(vector, scale), el("code", {}, "[" + first + " …]")));
  }
  const maxAbs = (vectors) => vectors.reduce((m, v) => v.reduce((a, x) => Math.max(a, Math.abs(x)), m), 0);

  // ---- header and notes -------------------------------------------------------------------
  function renderHeader() {
    const heads = model.heads + (model.attention === "MHA" ? " of width " : ", head width ") + model.head_dim;
    const file = model.name.split(/[\\/]/).pop();
    document.getElementById("header").append(
      el("h1", {}, "attnkit explain · " + file, file !== model.name ? el("span", { class: "path" }, "  " + model.name) : null),
      el("p", {}, model.family + ": " + L + " layers × " + heads + " · " + model.attention + " · " + N + " tokens"),
      el("p", {}, data.notes.patterns));
  }

  function renderNotes() {
    const kinds = { MHA: "Multi-head attention (MHA).", GQA: "Grouped-query attention (GQA).",
      MQA: "Multi-query attention (MQA)." };
    const notes = document.getElementById("notes");
    const windows = data.layers.some(layer => layer.kind !== "global");
    notes.append(
      el("p", {}, el("b", {}, "The two steps. "), "Step 1 scores every key for the chosen token: the dot " +
        "product q·k of its query with the key, times the scale; a softmax over the keys the layer lets the token " +
        "see turns the scores into weights that sum to one (weight = exp(scaled − lse)). Step 2 multiplies each " +
        "value vector by its weight and adds them up; the check compares that sum with the head's output in the " +
        "model's own forward pass."),
      el("p", {}, el("b", { class: "kind" }, kinds[model.attention] + " "), sentence(data.notes.heads)),
      el("p", {}, el("b", {}, windows ? "Windows. " : "Which keys. "), sentence(data.notes.patterns)),
      el("p", {}, el("b", {}, "Rows. "), sentence(data.notes.rows)),
      el("p", {}, el("b", {}, "The grid. "), "Each thumbnail is one head: " +
        (data.every_row ? "rows are query tokens, columns key tokens" :
          "rows are the held tokens, columns the text in " + (strip ? strip.max.shape[3] : N) +
          " bins (the largest weight in each, on a square-root scale so that thin spreads show)") +
        "; darker blue = more weight; hatched grey = keys the pattern hides (not a zero weight); red line: the " +
        "chosen token; red frame: the chosen head." + (GROUPED ? " Heads on one grey band share a KV head." : "")));
    if (tokens.generated.some(Boolean)) {
      notes.append(el("p", {}, el("b", {}, "Generated tokens "), "(italic, underlined) were produced by the model " +
        "one at a time, greedily: the row of position p predicted the token at p + 1, so a generated token's own " +
        "row shows what the model looks at while it predicts the next one."));
    }
  }

  // ---- the text -----------------------------------------------------------------------------
  const tokenSpans = [];
  function renderSentence() {
    const box = document.getElementById("sentence");
    const held = data.rows.length;
    const hint = document.getElementById("text-hint");
    hint.textContent = data.every_row
      ? "Click a token to explain it (hover to preview). Shading: the chosen head's weights for the chosen token."
      : "The text has " + N + " tokens; the " + held + " held ones (framed) can be explained: click or hover one, " +
        "or pick one here: ";
    if (!data.every_row) {
      for (const p of data.rows) {
        const chip = el("button", { class: "chip", "data-pos": p }, p + ": " + label(p));
        chip.addEventListener("click", () => { state.token = p; state.preview = null; update(); scrollToToken(p); });
        hint.append(chip, " ");
      }
    }
    const fragment = document.createDocumentFragment();
    for (let j = 0; j < N; j++) {
      if (j === data.prompt_tokens && tokens.generated[j]) fragment.append(el("span", { class: "gen-mark" }, "▸ generated:"));
      const classes = ["tok"];
      if (rowOf.has(j)) classes.push(data.every_row ? "held" : "held framed");
      if (tokens.special[j]) classes.push("special");
      if (tokens.generated[j]) classes.push("generated");
      const node = el("span", { class: classes.join(" "), "data-pos": j, title: j + ": " + label(j) }, label(j));
      if (rowOf.has(j)) {
        node.addEventListener("click", () => { state.token = j; state.preview = null; update(); });
        node.addEventListener("mouseenter", () => { state.preview = j; update(); });
        node.addEventListener("mouseleave", () => { state.preview = null; update(); });
      }
      tokenSpans.push(node);
      fragment.append(node, " ");
    }
    box.append(fragment);
  }
  function scrollToToken(j) {
    const box = document.getElementById("sentence"), node = tokenSpans[j];
    box.scrollTop = node.offsetTop - box.offsetTop - box.clientHeight / 2;
  }
  function shadeSentence(l, h, token) {
    const r = rowOf.get(token), one = step1Of(l, h, r);
    const weight = new Map(one.keys.map((j, k) => [j, one.weights[k]]));
    const hidden = new Set(one.keys.filter((j, k) => Number.isNaN(one.qk[k])));
    const hiddenBins = strip ? slice(strip.hidden, l, h, r) : null;
    tokenSpans.forEach((node, j) => {
      const isHidden = hidden.has(j) || (hiddenBins !== null && hiddenBins[Math.floor(j / strip.width)] === 2);
      const w = weight.has(j) && !isHidden ? weight.get(j) : 0;
      const rgb = blues(w);
      node.style.background = isHidden || w <= 0 ? "" : "rgb(" + rgb.join(",") + ")";
      node.classList.toggle("hid", isHidden);
      node.classList.toggle("light", w > 0.55);
      node.classList.toggle("chosen", j === token);
    });
    document.querySelectorAll(".chip").forEach(chip => chip.classList.toggle("chosen", Number(chip.dataset.pos) === token));
  }

  // ---- the overview grid ---------------------------------------------------------------------
  const cells = [];
  function renderGrid() {
    const grid = document.getElementById("grid");
    document.getElementById("grid-hint").textContent = "Click a head to explain it." +
      (GROUPED ? " " + model.heads + ": each grey band is one KV head and the query heads that share it." : "");
    const header = el("div", { class: "grid-row" }, el("div", { class: "label" }, ""));
    model.groups.forEach((heads, g) => {
      const band = el("div", { class: "kv-group" });
      heads.forEach(h => band.append(el("div", { class: "cell", style: "height:auto;cursor:default" },
        el("div", { class: "head-label" }, "h" + h))));
      header.append(el("div", {}, GROUPED ? el("div", { class: "kv-head" }, "KV " + g) : null, band));
    });
    grid.append(header);
    for (let l = 0; l < L; l++) {
      const kind = data.layers[l].kind;
      const row = el("div", { class: "grid-row" }, el("div", { class: "label" }, "layer " + l,
        el("span", { class: "pattern " + kind }, patternOf(l) + (kind === "global" || patternOf(l).startsWith(kind) ? "" : " · " + kind))));
      model.groups.forEach(heads => {
        const band = el("div", { class: "kv-group" });
        for (const h of heads) {
          const canvas = el("canvas", { "data-layer": l, "data-head": h, title: "layer " + l + ", head " + h +
            (GROUPED ? " (KV head " + Math.floor(h / GROUP) + ")" : "") });
          const mark = el("div", { class: "rowmark" });
          const cell = el("div", { class: "cell" + (data.every_row ? "" : " strip"), "data-layer": l, "data-head": h },
            canvas, mark);
          cell.addEventListener("click", () => { state.layer = l; state.head = h; update(); });
          drawThumbnail(canvas, l, h);
          cells.push({ cell: cell, mark: mark, layer: l, head: h });
          band.append(cell);
        }
        row.append(band);
      });
      grid.append(row);
    }
  }
  function markGrid(token) {
    const r = rowOf.get(token), rows = data.rows.length;
    for (const c of cells) {
      c.cell.classList.toggle("chosen", c.layer === state.layer && c.head === state.head);
      c.mark.style.top = (100 * r / rows) + "%";
      c.mark.style.height = "calc(" + (100 / rows) + "% - 2px)";
    }
  }

  // ---- step 1 --------------------------------------------------------------------------------
  function scoreBar(scaled, scale) {
    const fill = el("div", { class: "fill" });
    const width = Math.min(50, 50 * Math.abs(scaled) / (scale || 1));
    fill.style.cssText = "width:" + width + "%;" + (scaled >= 0 ? "left:50%;background:#2166ac" : "right:50%;background:#b2182b");
    return el("div", { class: "score" }, el("div", { class: "zero" }), fill);
  }
  function renderStep1(l, h, token) {
    const r = rowOf.get(token), one = step1Of(l, h, r), scale = data.layers[l].scale;
    const box = document.getElementById("step1");
    box.replaceChildren();
    const kv = GROUPED ? " (KV head " + Math.floor(h / GROUP) + ", shared with heads " + span(model.groups[Math.floor(h / GROUP)]) + ")" : "";
    box.append(el("h2", {}, "Step 1 · relevance scoring: q('" + label(token) + "') · k(each token)"),
      el("p", { class: "hint" }, "layer " + l + " (" + patternOf(l) + "), head " + h + kv + "; token " + token +
        (tokens.generated[token] ? " (generated)" : "")));
    if (!ALL) box.append(...stripView(l, h, r));
    let top = 0;
    one.keys.forEach((j, k) => { if (!Number.isNaN(one.qk[k])) top = Math.max(top, Math.abs(one.qk[k] * scale)); });
    const table = el("table", { id: "step1-table" }, el("tr", {}, el("th", {}, "key"), el("th", { class: "num" }, "q·k"),
      el("th", { class: "num" }, "scaled"), el("th", {}, "score"), el("th", { class: "num" }, "weight"), el("th", {}, "")));
    let sum = 0;
    one.keys.forEach((j, k) => {
      const qk = one.qk[k], w = one.weights[k];
      const name = label(j) + (j === token ? " (itself)" : "") + (ALL ? "" : " @" + j);
      if (Number.isNaN(qk)) {
        table.append(el("tr", { class: "hidden", "data-key": j, "data-hidden": "1" }, el("td", { class: "key" }, name),
          el("td", { class: "num" }, "—"), el("td", { class: "num" }, "—"), el("td", {}, ""), el("td", { class: "num" }, "—"),
          el("td", {}, "hidden (" + patternOf(l) + ")")));
        return;
      }
      sum += w;
      table.append(el("tr", { class: j === token ? "itself" : "", "data-key": j, "data-qk": String(qk), "data-weight": String(w) },
        el("td", { class: "key" }, name), el("td", { class: "num" }, qk.toFixed(2)),
        el("td", { class: "num" }, (qk * scale).toFixed(2)), el("td", {}, scoreBar(qk * scale, top)),
        el("td", { class: "num" }, w.toFixed(3)),
        el("td", { class: "barcell" }, el("div", { class: "bar", style: "width:" + (100 * w) + "%" }))));
    });
    if (!ALL) {
      sum += one.rest;
      table.append(el("tr", { class: "others" }, el("td", {}, (N - one.keys.length) + " other keys"), el("td", {}, ""),
        el("td", {}, ""), el("td", {}, ""), el("td", { class: "num" }, one.rest.toFixed(3)),
        el("td", {}, one.restHidden ? one.restHidden + " of them hidden (" + patternOf(l) + ")" : "")));
    }
    for (const e of one.extra) {
      sum += e.weight;
      table.append(el("tr", { class: "extra", "data-extra": e.label, "data-weight": String(e.weight) },
        el("td", {}, e.label), el("td", { class: "num" }, "—"), el("td", { class: "num" }, e.score.toFixed(2)),
        el("td", {}, scoreBar(e.score, top)), el("td", { class: "num" }, e.weight.toFixed(3)),
        el("td", { class: "barcell" }, el("div", { class: "bar", style: "width:" + (100 * e.weight) + "%;background:#8e44ad" }))));
    }
    const plain = Math.abs(scale - 1 / Math.sqrt(model.head_dim)) < 1e-12;
    box.append(table, el("p", { class: "caption" }, "scaled = q·k × " + scale.toFixed(4) +
      (plain ? " (1/√" + model.head_dim + ")" : "") + "; softmax: weight = exp(scaled − lse) with lse = " +
      one.lse.toFixed(4) + " over the visible keys" +
      one.extra.map(e => " and the " + e.label).join("") + "; the weights sum to " + sum.toFixed(6) +
      (ALL ? "" : "; listed: the " + one.keys.length + " keys with the most weight, in text order")));
  }
  function stripView(l, h, r) {
    const maxima = slice(strip.max, l, h, r), hidden = slice(strip.hidden, l, h, r);
    const canvas = el("canvas", { class: "overview", width: maxima.length, height: 1 });
    const ctx = canvas.getContext("2d"), image = ctx.createImageData(maxima.length, 1);
    maxima.forEach((w, b) => image.data.set([...(hidden[b] === 2 ? [205, 205, 205] : blues(Math.sqrt(w))), 255], 4 * b));
    ctx.putImageData(image, 0, 0);
    return [el("p", { class: "hint" }, "Where the weight goes over all " + N + " keys (" + maxima.length +
      " bins of " + strip.width + "; darker = a larger weight in the bin, square-root scale; grey = hidden):"), canvas,
      el("div", { class: "axis" }, el("span", {}, "0"), el("span", {}, String(N - 1)))];
  }

  // ---- step 2 --------------------------------------------------------------------------------
  function renderStep2(l, h, token) {
    const r = rowOf.get(token), two = step2Of(l, h, r), one = step1Of(l, h, r);
    const box = document.getElementById("step2");
    box.replaceChildren();
    box.append(el("h2", {}, "Step 2 · combination: output = Σ weight × value"));
    const visible = two.keys.map((j, c) => c).filter(c => !hiddenKey(one, two.keys[c]));
    const products = visible.map(c => two.values[c].map(x => x * two.weights[c]));
    const rest = two.output.map((x, i) => x - products.reduce((s, p) => s + p[i], 0));
    const valueScale = maxAbs(visible.map(c => two.values[c])), productScale = maxAbs(products.concat([two.output]));
    const table = el("table", { id: "step2-table" }, el("tr", {}, el("th", {}, "token"), el("th", { class: "num" }, "weight"),
      el("th", {}, "value v"), el("th", {}, "weight × v"), el("th", { class: "num" }, "share")));
    let weights = 0, shares = 0;
    visible.forEach((c, k) => {
      weights += two.weights[c]; shares += two.shares[c];
      table.append(el("tr", { "data-key": two.keys[c] }, el("td", {}, label(two.keys[c])),
        el("td", { class: "num" }, two.weights[c].toFixed(3)), vectorCell(two.values[c], valueScale),
        vectorCell(products[k], productScale), el("td", { class: "num" }, percent(two.shares[c]))));
    });
    const others = countVisible(one) - visible.length;
    const keysWeight = 1 - one.extra.reduce((s, e) => s + e.weight, 0);
    if (others > 0) {
      table.append(el("tr", { class: "others" }, el("td", {}, others + " others"),
        el("td", { class: "num" }, (keysWeight - weights).toFixed(3)), el("td", {}, ""), vectorCell(rest, productScale),
        el("td", { class: "num" }, percent(1 - shares))));
    }
    table.append(el("tr", { class: "output" }, el("td", {}, "output"), el("td", { class: "num" }, keysWeight.toFixed(3)), el("td", {}, ""),
      vectorCell(two.output, productScale), el("td", { class: "num" }, "100%")));
    const ok = two.error < 1e-4;
    box.append(table,
      el("p", { class: "caption" }, "vectors: " + model.head_dim + " numbers as colours (blue +, red −) and the first 3; " +
        "share: the part of the output each token supplies (its weighted value projected on the output)"),
      el("p", { class: "check " + (ok ? "ok" : "bad") }, el("b", {}, "Check: "), "this step-2 vector " +
        (ok ? "equals" : "DIFFERS FROM") + " head " + h + "'s output for '" + label(token) + "' in the model's own " +
        "forward pass (max |difference| " + two.error.toExponential(1) + " over " + model.head_dim + " numbers)."));
  }
  function hiddenKey(one, j) {
    const k = one.keys.indexOf(j);
    return k >= 0 && Number.isNaN(one.qk[k]);
  }
  function countVisible(one) {
    const listedHidden = one.keys.filter((j, k) => Number.isNaN(one.qk[k])).length;
    return N - listedHidden - one.restHidden;
  }
  function percent(x) { return Math.round(100 * x) + "%"; }

  function update() {
    const token = state.preview !== null ? state.preview : state.token;
    shadeSentence(state.layer, state.head, token);
    markGrid(token);
    renderStep1(state.layer, state.head, token);
    renderStep2(state.layer, state.head, token);
  }

  renderHeader();
  renderSentence();
  renderGrid();
  renderNotes();
  update();
  scrollToToken(state.token);
  window.attnkitExplain = { state: state, update: update };
})();
