// attnlab attention views: a head view (lines between tokens, one colour per head) and a
// model view (every layer x head as a small heatmap). All data comes from the JSON block in the
// page; tokens are only ever written with textContent, never parsed as HTML. When the text was
// generated (data.prompt_length set), a step control grows the head view one token at a time.
(function () {
  "use strict";

  const data = JSON.parse(document.getElementById("attnlab-data").textContent);
  const tokens = data.tokens;
  const W = data.weights; // [layer][head][from][to]
  const nLayers = W.length;
  const nHeads = W[0].length;
  const T = tokens.length;
  const state = {
    view: data.view,
    layer: data.layer,
    heads: new Set(data.heads),
    focus: null, // {side: "from" | "to", index}
    pinned: false,
    shown: T, // tokens the head view shows: the prompt and the first generated ones
  };
  const promptLength = data.prompt_length === null ? T : data.prompt_length;

  const svg = document.getElementById("head-svg");
  const NS = svg.namespaceURI;
  const info = document.getElementById("info");
  const tooltip = document.getElementById("tooltip");

  const PALETTE = [
    "#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
    "#bcbd22", "#17becf", "#393b79", "#ad494a", "#637939", "#8c6d31", "#7b4173", "#3182bd",
  ];
  function headColour(h) {
    return h < PALETTE.length ? PALETTE[h] : "hsl(" + ((h * 137.5) % 360).toFixed(1) + ", 62%, 44%)";
  }

  function html(tag, attrs, parent, text) {
    const node = document.createElement(tag);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function svgNode(tag, attrs, parent, text) {
    const node = document.createElementNS(NS, tag);
    for (const key in attrs) node.setAttribute(key, attrs[key]);
    if (text !== undefined) node.textContent = text;
    if (parent) parent.appendChild(node);
    return node;
  }
  function shown(token) {
    const flat = token.replace(/\n/g, "\\n").replace(/\t/g, "\\t");
    return flat.length > 22 ? flat.slice(0, 21) + "\u2026" : flat;
  }
  function quoted(i) {
    return "\u201c" + shown(tokens[i]) + "\u201d";
  }

  // ---- head view ----------------------------------------------------------------------
  const ROW = 24;
  const TOP = 34;
  const CHAR = 8.2; // width of one monospace character at 13.5px
  const GAP = 190; // room for the lines between the two token columns
  const labelWidth = Math.max(4, ...tokens.map((t) => shown(t).length)) * CHAR + 18;
  const lineStart = labelWidth;
  const lineEnd = labelWidth + GAP;
  const minWeight = T > 64 ? 0.01 : 0.002; // lines this faint are invisible anyway
  const rowY = (i) => TOP + i * ROW + ROW / 2;

  svg.setAttribute("width", String(lineEnd + labelWidth));
  svg.setAttribute("height", String(TOP + T * ROW + 8));
  svgNode("text", { class: "column-title", x: labelWidth / 2, y: 14 }, svg, "attends from");
  svgNode("text", { class: "column-title", x: lineEnd + labelWidth / 2, y: 14 }, svg, "to");
  const linesGroup = svgNode("g", { id: "lines" }, svg);
  const tokenGroups = { from: [], to: [] };
  for (const side of ["from", "to"]) {
    for (let i = 0; i < T; i++) {
      const kind = i >= promptLength ? " generated" : "";
      const g = svgNode("g", { class: "tok tok-" + side + kind, "data-side": side, "data-index": i }, svg);
      const x = side === "from" ? 0 : lineEnd;
      svgNode("rect", { class: "token-bg", x: x + 2, y: TOP + i * ROW + 1, width: labelWidth - 4, height: ROW - 2, rx: 4 }, g);
      svgNode("text", {
        class: "token",
        x: side === "from" ? lineStart - 8 : lineEnd + 8,
        y: rowY(i),
        "text-anchor": side === "from" ? "end" : "start",
      }, g, shown(tokens[i]));
      svgNode("title", {}, g, tokens[i]);
      g.addEventListener("mouseenter", () => { if (!state.pinned) setFocus({ side, index: i }); g.classList.add("hover"); });
      g.addEventListener("mouseleave", () => { if (!state.pinned) setFocus(null); g.classList.remove("hover"); });
      g.addEventListener("click", () => {
        const same = state.pinned && state.focus && state.focus.side === side && state.focus.index === i;
        state.pinned = !same;
        setFocus(same ? null : { side, index: i });
      });
      tokenGroups[side].push(g);
    }
  }

  function drawLines() {
    linesGroup.replaceChildren();
    svg.setAttribute("data-layer", String(state.layer));
    const layer = W[state.layer];
    for (const h of [...state.heads].sort((a, b) => a - b)) {
      const g = svgNode("g", { class: "head-lines", "data-head": h, stroke: headColour(h) }, linesGroup);
      for (let i = 0; i < state.shown; i++) {
        for (let j = 0; j < state.shown; j++) {
          const w = layer[h][i][j];
          if (w < minWeight) continue;
          svgNode("line", {
            class: "attn", x1: lineStart, y1: rowY(i), x2: lineEnd, y2: rowY(j),
            "stroke-opacity": Math.min(1, w).toFixed(4),
            "data-from": i, "data-to": j, "data-head": h, "data-weight": w,
          }, g);
        }
      }
    }
    applyFocus();
  }

  function setFocus(focus) {
    state.focus = focus;
    applyFocus();
  }

  function applyFocus() {
    const f = state.focus;
    svg.classList.toggle("focused", f !== null);
    for (const line of linesGroup.querySelectorAll("line")) {
      const on = f !== null && Number(line.getAttribute(f.side === "from" ? "data-from" : "data-to")) === f.index;
      line.classList.toggle("on", on);
    }
    for (const side of ["from", "to"]) {
      tokenGroups[side].forEach((g, i) => {
        g.classList.toggle("pinned", state.pinned && f !== null && f.side === side && f.index === i);
      });
    }
    updateInfo();
  }

  function updateInfo() {
    info.replaceChildren();
    const f = state.focus;
    if (f === null) {
      html("p", { class: "empty" }, info, "Layer " + state.layer + ": hover a token to list its strongest links per head.");
      return;
    }
    const title = f.side === "from" ? quoted(f.index) + " attends to" : "attends to " + quoted(f.index);
    html("h2", {}, info, "Layer " + state.layer + ": " + title);
    if (state.heads.size === 0) {
      html("p", { class: "empty" }, info, "No head selected.");
      return;
    }
    const table = html("table", {}, info);
    const layer = W[state.layer];
    for (const h of [...state.heads].sort((a, b) => a - b)) {
      const pairs = [];
      for (let k = 0; k < state.shown; k++) {
        pairs.push([k, f.side === "from" ? layer[h][f.index][k] : layer[h][k][f.index]]);
      }
      pairs.sort((a, b) => b[1] - a[1]);
      pairs.slice(0, 3).forEach(([k, w], rank) => {
        const row = html("tr", {}, table);
        const head = html("td", {}, row);
        if (rank === 0) {
          html("span", { class: "swatch", style: "background:" + headColour(h) }, head);
          head.appendChild(document.createTextNode("head " + h));
        }
        html("td", { class: "tok" }, row, quoted(k));
        html("td", { class: "w" }, row, w.toFixed(3));
        const barCell = html("td", { style: "width:90px" }, row);
        html("div", { class: "bar", style: "width:" + (w * 100).toFixed(1) + "%;background:" + headColour(h) }, barCell);
      });
    }
  }

  linesGroup.addEventListener("mousemove", (event) => {
    const line = event.target.closest("line");
    if (!line) return;
    const i = Number(line.getAttribute("data-from"));
    const j = Number(line.getAttribute("data-to"));
    const w = Number(line.getAttribute("data-weight"));
    tooltip.textContent = "head " + line.getAttribute("data-head") + "  " + quoted(i) + " \u2192 " + quoted(j) + "  " + w.toFixed(3);
    tooltip.hidden = false;
    tooltip.style.left = event.clientX + 14 + "px";
    tooltip.style.top = event.clientY + 10 + "px";
  });
  linesGroup.addEventListener("mouseleave", () => { tooltip.hidden = true; });

  // ---- controls -------------------------------------------------------------------------
  const layerSelect = document.getElementById("layer-select");
  for (let l = 0; l < nLayers; l++) html("option", { value: l }, layerSelect, String(l));
  layerSelect.addEventListener("change", () => {
    state.layer = Number(layerSelect.value);
    drawLines();
  });

  const toggles = document.getElementById("head-toggles");
  const toggleButtons = [];
  for (let h = 0; h < nHeads; h++) {
    const b = html("button", { type: "button", class: "head-toggle", style: "--c:" + headColour(h), "data-head": h, title: "head " + h }, toggles, String(h));
    b.addEventListener("click", () => {
      if (state.heads.has(h)) state.heads.delete(h); else state.heads.add(h);
      syncControls();
      drawLines();
    });
    toggleButtons.push(b);
  }
  document.getElementById("heads-all").addEventListener("click", () => {
    for (let h = 0; h < nHeads; h++) state.heads.add(h);
    syncControls();
    drawLines();
  });
  document.getElementById("heads-none").addEventListener("click", () => {
    state.heads.clear();
    syncControls();
    drawLines();
  });

  // ---- steps of a generated text ---------------------------------------------------------
  const stepRange = document.getElementById("step-range");
  const stepLabel = document.getElementById("step-label");
  let playing = null;
  function showTokens(n) {
    state.shown = n;
    for (const side of ["from", "to"]) {
      tokenGroups[side].forEach((g, i) => { g.style.display = i < n ? "" : "none"; });
    }
    if (state.focus !== null && state.focus.index >= n) {
      state.focus = null;
      state.pinned = false;
    }
    stepRange.value = String(n);
    stepLabel.textContent = (n - promptLength) + " / " + (T - promptLength) + " generated";
    svg.setAttribute("data-shown", String(n));
    drawLines();
  }
  if (promptLength < T) {
    document.getElementById("steps").hidden = false;
    stepRange.min = String(promptLength);
    stepRange.max = String(T);
    stepRange.addEventListener("input", () => showTokens(Number(stepRange.value)));
    document.getElementById("step-play").addEventListener("click", () => {
      if (playing !== null) { clearInterval(playing); playing = null; return; }
      showTokens(promptLength);
      playing = setInterval(() => {
        if (state.shown >= T) { clearInterval(playing); playing = null; return; }
        showTokens(state.shown + 1);
      }, 700);
    });
  }

  function syncControls() {
    layerSelect.value = String(state.layer);
    toggleButtons.forEach((b, h) => {
      b.classList.toggle("off", !state.heads.has(h));
      b.setAttribute("aria-pressed", String(state.heads.has(h)));
    });
  }

  // ---- model view -----------------------------------------------------------------------
  const VIRIDIS = [[68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37]];
  function viridis(w) {
    const x = Math.max(0, Math.min(1, w)) * (VIRIDIS.length - 1);
    const k = Math.min(VIRIDIS.length - 2, Math.floor(x));
    const t = x - k;
    return VIRIDIS[k].map((c, n) => Math.round(c + (VIRIDIS[k + 1][n] - c) * t));
  }

  let modelBuilt = false;
  function buildModelView() {
    if (modelBuilt) return;
    modelBuilt = true;
    const grid = document.getElementById("model-grid");
    grid.style.gridTemplateColumns = "auto repeat(" + nHeads + ", 78px)";
    html("div", {}, grid);
    for (let h = 0; h < nHeads; h++) html("div", { class: "col-head", style: "color:" + headColour(h) }, grid, "head " + h);
    for (let l = 0; l < nLayers; l++) {
      html("div", { class: "row-head" }, grid, "layer " + l);
      for (let h = 0; h < nHeads; h++) {
        const canvas = html("canvas", { width: T, height: T, "data-layer": l, "data-head": h, title: "layer " + l + " \u00b7 head " + h }, grid);
        const ctx = canvas.getContext("2d");
        const image = ctx.createImageData(T, T);
        for (let i = 0; i < T; i++) {
          for (let j = 0; j < T; j++) {
            const [r, g, b] = viridis(W[l][h][i][j]);
            const p = 4 * (i * T + j);
            image.data[p] = r; image.data[p + 1] = g; image.data[p + 2] = b; image.data[p + 3] = 255;
          }
        }
        ctx.putImageData(image, 0, 0);
        canvas.addEventListener("click", () => {
          state.layer = l;
          state.heads = new Set([h]);
          state.focus = null;
          state.pinned = false;
          syncControls();
          drawLines();
          showView("head");
        });
      }
    }
  }

  function showView(view) {
    state.view = view;
    if (view === "model") buildModelView();
    document.getElementById("head-view").hidden = view !== "head";
    document.getElementById("model-view").hidden = view !== "model";
    document.getElementById("tab-head").classList.toggle("active", view === "head");
    document.getElementById("tab-model").classList.toggle("active", view === "model");
    tooltip.hidden = true;
  }
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => showView(b.getAttribute("data-view")));
  }

  document.getElementById("title").textContent = data.title;
  document.getElementById("subtitle").textContent = data.subtitle;
  syncControls();
  if (promptLength < T) showTokens(T); else drawLines();
  showView(state.view);
})();
