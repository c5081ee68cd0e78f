// smoothsal viewer: tissue pyramid + saliency heatmap overlay in two synchronised panels.
// Coordinates are µm (slide level 0 origin). Tiles come from relative URLs (see smoothsal/viewer/__init__.py), so the
// same page works with `smoothsal view` and with a static export behind any plain web server.
"use strict";
(function () {
  const MAX_INFLIGHT = 6;
  const CACHE_LIMIT = 800;
  const CLASS_COLOURS = ["#ffd400", "#00e5ff", "#76ff03", "#ff4081", "#ff9100", "#b388ff"];
  const GRID_COLOUR = "rgba(255, 255, 255, 0.6)";

  const $ = (id) => document.getElementById(id);
  const clamp = (v, lo, hi) => Math.min(hi, Math.max(lo, v));
  const state = {
    manifest: null, view: { cx: 0, cy: 0, upp: 1 }, colormap: "inferno", opacity: 0.6, percentile: 99,
    symmetric: false, grid: false, annotations: false, two: true, panels: [],
  };
  const cache = new Map(); // url → {url, format, status: queued|loading|ok|empty|error, bitmap|values, coloured}
  let queue = [];
  let inflight = 0;
  let frame = 0;
  let renders = 0;
  let gridData = null;
  let annotationData = null;

  // --- tiles -------------------------------------------------------------------------------------

  function tileUrl(im, level, row, col) {
    return `tiles/${im.index}/${level}/${row}/${col}.${im.format}?v=${state.manifest.version}`;
  }

  function getTile(url, format, wanted) {
    wanted.add(url);
    let e = cache.get(url);
    if (e) {
      cache.delete(url); // keep the most recently used last
      cache.set(url, e);
      return e;
    }
    e = { url, format, status: "queued", coloured: new Map() };
    cache.set(url, e);
    queue.push(e);
    return e;
  }

  function pump() {
    while (inflight < MAX_INFLIGHT && queue.length) load(queue.shift());
    if (cache.size > CACHE_LIMIT) {
      for (const [url, e] of cache) {
        if (cache.size <= CACHE_LIMIT) break;
        if (e.status !== "queued" && e.status !== "loading") cache.delete(url);
      }
    }
    document.body.dataset.pending = String(pending());
  }

  let goneMessage = null; // set once the server says the container changed or was removed (HTTP 410)
  function gone(text) {
    goneMessage = text.trim();
    $("status").textContent = goneMessage;
    $("status").classList.add("gone");
  }

  async function load(e) {
    inflight++;
    e.status = "loading";
    try {
      const r = await fetch(e.url);
      if (r.status === 410) {
        gone(await r.text());
        e.status = "error";
      } else if (r.status === 204 || r.status === 404) {
        e.status = "empty"; // an empty heatmap tile: no content from the server, no file in an export
      } else if (!r.ok) {
        e.status = "error";
      } else if (e.format === "jpg") {
        e.bitmap = await createImageBitmap(await r.blob());
        e.status = "ok";
      } else {
        e.values = new Float32Array(await r.arrayBuffer()); // little-endian float32, row-major
        e.status = "ok";
      }
    } catch (err) {
      e.status = "error";
    }
    inflight--;
    pump();
    schedule();
  }

  function pending() {
    return inflight + queue.length + (frame ? 1 : 0);
  }

  // --- geometry -------------------------------------------------------------------------------------

  function chooseLevel(im, uppDevice) {
    let best = 0; // the coarsest level still at least as fine as the screen
    im.levels.forEach((lv, i) => {
      if (Math.max(lv.scale[0], lv.scale[1]) <= uppDevice * 1.0001) best = i;
    });
    return best;
  }

  function visibleTiles(im, level, box) {
    const T = state.manifest.tile_size;
    const lv = im.levels[level];
    const [sy, sx] = lv.scale;
    const [ty, tx] = lv.origin; // top-left corner of pixel (0, 0), µm
    const [h, w] = lv.shape;
    const rows = Math.ceil(h / T);
    const cols = Math.ceil(w / T);
    const c0 = Math.floor((box.x0 - tx) / (sx * T));
    const c1 = Math.floor((box.x1 - tx) / (sx * T));
    const r0 = Math.floor((box.y0 - ty) / (sy * T));
    const r1 = Math.floor((box.y1 - ty) / (sy * T));
    const out = [];
    for (let row = Math.max(0, r0); row <= Math.min(rows - 1, r1); row++) {
      for (let col = Math.max(0, c0); col <= Math.min(cols - 1, c1); col++) {
        const pw = Math.min(T, w - col * T);
        const ph = Math.min(T, h - row * T);
        out.push({
          level, row, col, pw, ph,
          x: tx + col * T * sx, y: ty + row * T * sy, w: pw * sx, h: ph * sy,
          url: tileUrl(im, level, row, col),
        });
      }
    }
    return out;
  }

  // --- colour --------------------------------------------------------------------------------------

  function lut() {
    return state.manifest.colormaps[state.colormap];
  }

  function panelRange(p, map) {
    if (p.manual) return p.manual;
    const q = map && map.quantiles;
    if (!q) return [0, 1];
    const i = Math.round(clamp(state.percentile, 50, 100) * 2);
    let lo = q[200 - i];
    let hi = q[i];
    if (state.symmetric) {
      const m = Math.max(Math.abs(lo), Math.abs(hi));
      lo = -m;
      hi = m;
    }
    if (!(hi > lo)) hi = lo + Math.max(Math.abs(lo) * 1e-6, 1e-12);
    return [lo, hi];
  }

  function colouredTile(e, t, range, zeroEmpty) {
    const key = `${state.colormap}|${range[0]}|${range[1]}`;
    let canvas = e.coloured.get(key);
    if (canvas) return canvas;
    const n = t.pw * t.ph;
    if (e.values.length !== n) return null;
    const L = lut();
    const img = new ImageData(t.pw, t.ph);
    const d = img.data;
    const v0 = range[0];
    const f = 255 / (range[1] - range[0]);
    for (let i = 0; i < n; i++) {
      const v = e.values[i];
      if (v !== v || (zeroEmpty && v === 0)) continue; // NaN (or a 0 fill): transparent
      const j = clamp(Math.round((v - v0) * f), 0, 255) * 3;
      const o = i * 4;
      d[o] = L[j];
      d[o + 1] = L[j + 1];
      d[o + 2] = L[j + 2];
      d[o + 3] = 255;
    }
    canvas = document.createElement("canvas");
    canvas.width = t.pw;
    canvas.height = t.ph;
    canvas.getContext("2d").putImageData(img, 0, 0);
    if (e.coloured.size >= 2) e.coloured.delete(e.coloured.keys().next().value);
    e.coloured.set(key, canvas);
    return canvas;
  }

  // --- drawing -------------------------------------------------------------------------------------

  function schedule() {
    if (!frame) frame = requestAnimationFrame(render);
    document.body.dataset.pending = String(pending());
  }

  function render() {
    frame = 0;
    renders++;
    const wanted = new Set();
    for (const p of state.panels) if (!p.hidden) renderPanel(p, wanted);
    queue = queue.filter((e) => {
      if (wanted.has(e.url)) return true;
      cache.delete(e.url); // out of view before it was fetched: never fetch it
      return false;
    });
    pump();
    updateStatus();
  }

  function renderPanel(p, wanted) {
    const canvas = p.canvas;
    const dpr = window.devicePixelRatio || 1;
    const W = Math.max(1, Math.round(canvas.clientWidth * dpr));
    const H = Math.max(1, Math.round(canvas.clientHeight * dpr));
    for (const c of [canvas, p.offscreen]) {
      if (c.width !== W || c.height !== H) {
        c.width = W;
        c.height = H;
      }
    }
    const v = state.view;
    const k = dpr / v.upp; // device px per µm
    const map = { X: (x) => (x - v.cx) * k + W / 2, Y: (y) => (y - v.cy) * k + H / 2 };
    const box = { x0: v.cx - W / 2 / k, x1: v.cx + W / 2 / k, y0: v.cy - H / 2 / k, y1: v.cy + H / 2 / k };
    const ctx = canvas.getContext("2d");
    ctx.imageSmoothingEnabled = true;
    ctx.globalAlpha = 1;
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, W, H);

    const tissue = state.manifest.images.find((im) => im.kind === "tissue");
    const tissueLevel = tissue ? drawPyramid(ctx, tissue, box, 1 / k, map, wanted, (e) => e.bitmap, false) : null;

    const image = findMap(p);
    let mapLevel = null;
    if (image) {
      const range = panelRange(p, image);
      p.range = range;
      const lctx = p.offscreen.getContext("2d");
      lctx.imageSmoothingEnabled = true;
      lctx.clearRect(0, 0, W, H);
      mapLevel = drawPyramid(lctx, image, box, 1 / k, map, wanted,
        (e, t) => colouredTile(e, t, range, image.zero_is_empty), true);
      if (state.opacity > 0) {
        ctx.globalAlpha = state.opacity;
        ctx.drawImage(p.offscreen, 0, 0);
        ctx.globalAlpha = 1;
      }
    }
    if (state.grid) drawGrid(ctx, box, map);
    if (state.annotations) drawAnnotations(ctx, box, map, dpr);
    p.levels = { tissue: tissueLevel, heatmap: mapLevel };
    showPanelInfo(p, image, tissueLevel, mapLevel);
  }

  // Draw the coarsest level everywhere (instant, few tiles), then the level fitting the screen over it.
  function drawPyramid(ctx, im, box, uppDevice, map, wanted, source, clearFirst) {
    const target = chooseLevel(im, uppDevice);
    const coarsest = im.levels.length - 1;
    const levels = target === coarsest ? [coarsest] : [coarsest, target];
    for (const level of levels) {
      for (const t of visibleTiles(im, level, box)) {
        const e = getTile(t.url, im.format, wanted);
        if (e.status !== "ok" && !(e.status === "empty" && level === target)) continue;
        const x0 = Math.round(map.X(t.x));
        const y0 = Math.round(map.Y(t.y));
        const x1 = Math.round(map.X(t.x + t.w));
        const y1 = Math.round(map.Y(t.y + t.h));
        if (clearFirst && level === target) ctx.clearRect(x0, y0, x1 - x0, y1 - y0);
        if (e.status !== "ok") continue;
        const img = source(e, t);
        if (img) ctx.drawImage(img, x0, y0, x1 - x0, y1 - y0);
      }
    }
    return target;
  }

  function drawGrid(ctx, box, map) {
    if (!gridData) return void loadOverlay("grid.json").then((d) => { gridData = d; schedule(); });
    const b = gridData.boxes;
    const s = gridData.mpp;
    ctx.strokeStyle = GRID_COLOUR;
    ctx.lineWidth = 1;
    ctx.beginPath();
    for (let i = 0; i + 3 < b.length; i += 4) {
      const x = b[i] * s, y = b[i + 1] * s, w = b[i + 2] * s, h = b[i + 3] * s;
      if (x > box.x1 || y > box.y1 || x + w < box.x0 || y + h < box.y0) continue;
      const x0 = Math.round(map.X(x)) + 0.5, y0 = Math.round(map.Y(y)) + 0.5;
      ctx.rect(x0, y0, Math.round(map.X(x + w)) - Math.round(map.X(x)), Math.round(map.Y(y + h)) - Math.round(map.Y(y)));
    }
    ctx.stroke();
  }

  function drawAnnotations(ctx, box, map, dpr) {
    if (!annotationData) return void loadOverlay("annotations.json").then((d) => { annotationData = d; schedule(); });
    const s = annotationData.mpp;
    ctx.lineWidth = 2 * dpr;
    for (const poly of annotationData.polygons) {
      const v = poly.vertices;
      if (!v || v.length < 2) continue;
      ctx.strokeStyle = CLASS_COLOURS[((poly.class | 0) % CLASS_COLOURS.length + CLASS_COLOURS.length) % CLASS_COLOURS.length];
      ctx.beginPath();
      v.forEach(([x, y], i) => (i ? ctx.lineTo : ctx.moveTo).call(ctx, map.X(x * s), map.Y(y * s)));
      ctx.closePath();
      ctx.stroke();
    }
  }

  const overlayLoads = {};
  function loadOverlay(name) {
    if (!overlayLoads[name]) {
      overlayLoads[name] = fetch(name).then(async (r) => {
        if (r.status === 410) gone(await r.text());
        return r.ok ? r.json() : { boxes: [], polygons: [], mpp: 1 };
      })
        .catch(() => ({ boxes: [], polygons: [], mpp: 1 }));
      inflight++;
      overlayLoads[name].finally(() => { inflight--; schedule(); });
    }
    return overlayLoads[name];
  }

  // --- panels and controls ---------------------------------------------------------------------------

  function heatmaps() {
    return state.manifest.images.filter((im) => im.kind === "heatmap");
  }

  function findMap(p) {
    return heatmaps().find((im) => im.method === p.method && im.attribution === p.attribution && im.layer === p.layer) || null;
  }

  function unique(key) {
    return [...new Set(heatmaps().map((im) => im[key]))];
  }

  function fillSelect(select, values, value) {
    select.replaceChildren(...values.map((v) => new Option(v, v, false, v === value)));
  }

  function makePanel(index, method) {
    const node = $("panel-template").content.firstElementChild.cloneNode(true);
    node.id = `panel${index}`;
    $("panels").append(node);
    const p = {
      index, node, canvas: node.querySelector(".view"), offscreen: document.createElement("canvas"),
      note: node.querySelector(".note"), method, attribution: unique("attribution")[0], layer: unique("layer")[0],
      manual: null, range: null, hidden: false, levels: null,
    };
    for (const key of ["method", "attribution", "layer"]) {
      const select = node.querySelector(`.${key}`);
      fillSelect(select, unique(key), p[key]);
      select.addEventListener("change", () => {
        p[key] = select.value;
        p.manual = null;
        schedule();
      });
    }
    const [vmin, vmax] = [node.querySelector(".vmin"), node.querySelector(".vmax")];
    const manual = () => {
      const lo = parseFloat(vmin.value);
      const hi = parseFloat(vmax.value);
      if (Number.isFinite(lo) && Number.isFinite(hi) && hi > lo) p.manual = [lo, hi];
      schedule();
    };
    vmin.addEventListener("change", manual);
    vmax.addEventListener("change", manual);
    node.querySelector(".auto").addEventListener("click", () => { p.manual = null; schedule(); });
    p.vmin = vmin;
    p.vmax = vmax;
    p.colorbar = node.querySelector(".colorbar");
    attachPointer(p);
    return p;
  }

  function showPanelInfo(p, image, tissueLevel, mapLevel) {
    const fmt = (x) => (Math.abs(x) >= 1e4 || (Math.abs(x) < 1e-3 && x !== 0) ? x.toExponential(3) : x.toPrecision(4));
    if (image && p.range) {
      if (document.activeElement !== p.vmin) p.vmin.value = fmt(p.range[0]);
      if (document.activeElement !== p.vmax) p.vmax.value = fmt(p.range[1]);
    }
    const um = state.view.upp;
    const problem = image ? (image.error ? `${image.error} · ` : "") : "no heatmap for this method / attribution / layer · ";
    p.note.textContent = problem
      + `${um.toPrecision(3)} µm/px` + (tissueLevel === null ? "" : ` · tissue level ${tissueLevel}`)
      + (image ? ` · map level ${mapLevel}` : "");
    drawColorbar(p.colorbar);
  }

  function drawColorbar(canvas) {
    const ctx = canvas.getContext("2d");
    const L = lut();
    for (let x = 0; x < canvas.width; x++) {
      const j = Math.round((x / (canvas.width - 1)) * 255) * 3;
      ctx.fillStyle = `rgb(${L[j]},${L[j + 1]},${L[j + 2]})`;
      ctx.fillRect(x, 0, 1, canvas.height);
    }
  }

  function attachPointer(p) {
    const c = p.canvas;
    let drag = null;
    c.addEventListener("pointerdown", (ev) => {
      drag = { x: ev.clientX, y: ev.clientY };
      c.setPointerCapture(ev.pointerId);
      c.classList.add("dragging");
    });
    c.addEventListener("pointermove", (ev) => {
      if (!drag) return;
      state.view.cx -= (ev.clientX - drag.x) * state.view.upp;
      state.view.cy -= (ev.clientY - drag.y) * state.view.upp;
      drag = { x: ev.clientX, y: ev.clientY };
      schedule();
    });
    const end = () => { drag = null; c.classList.remove("dragging"); };
    c.addEventListener("pointerup", end);
    c.addEventListener("pointercancel", end);
    c.addEventListener("wheel", (ev) => {
      ev.preventDefault();
      const r = c.getBoundingClientRect();
      const step = ev.deltaMode === 1 ? 33 : ev.deltaMode === 2 ? 400 : 1;
      zoomAt(Math.exp(ev.deltaY * step * 0.0015), ev.clientX - r.left - r.width / 2, ev.clientY - r.top - r.height / 2);
    }, { passive: false });
    c.addEventListener("dblclick", (ev) => {
      const r = c.getBoundingClientRect();
      zoomAt(ev.shiftKey ? 2 : 0.5, ev.clientX - r.left - r.width / 2, ev.clientY - r.top - r.height / 2);
    });
  }

  function uppLimits() {
    const finest = Math.min(...state.manifest.images.map((im) => Math.min(...im.levels[0].scale)));
    return [finest / 16, fitView().upp * 8];
  }

  // Zoom by factor f (µm per px × f) keeping the point (mx, my) px from the panel centre fixed.
  function zoomAt(f, mx, my) {
    const v = state.view;
    const ux = v.cx + mx * v.upp;
    const uy = v.cy + my * v.upp;
    const [lo, hi] = uppLimits();
    v.upp = clamp(v.upp * f, lo, hi);
    v.cx = ux - mx * v.upp;
    v.cy = uy - my * v.upp;
    schedule();
  }

  function fitView() {
    const [w, h] = state.manifest.slide.extent_um;
    const c = state.panels[0].canvas;
    const upp = 1.02 * Math.max(w / Math.max(1, c.clientWidth), h / Math.max(1, c.clientHeight));
    return { cx: w / 2, cy: h / 2, upp };
  }

  function updateStatus() {
    if (goneMessage) {
      $("status").textContent = goneMessage; // stays until the page is reloaded
      return;
    }
    const n = pending();
    const m = state.manifest;
    $("status").textContent = `${m.title} · ${heatmaps().length} heatmaps · `
      + (n ? `loading ${inflight + queue.length} tiles…` : "ready");
  }

  function bindControls() {
    const cm = $("colormap");
    fillSelect(cm, Object.keys(state.manifest.colormaps), state.colormap);
    cm.addEventListener("change", () => { state.colormap = cm.value; schedule(); });
    $("opacity").addEventListener("input", (ev) => { state.opacity = parseFloat(ev.target.value); schedule(); });
    $("percentile").addEventListener("change", (ev) => {
      const v = parseFloat(ev.target.value);
      if (Number.isFinite(v)) state.percentile = clamp(v, 50, 100);
      for (const p of state.panels) p.manual = null;
      schedule();
    });
    $("symmetric").addEventListener("change", (ev) => {
      state.symmetric = ev.target.checked;
      for (const p of state.panels) p.manual = null;
      schedule();
    });
    $("grid").disabled = !state.manifest.grid;
    $("annotations").disabled = !state.manifest.annotations;
    $("grid").addEventListener("change", (ev) => { state.grid = ev.target.checked; schedule(); });
    $("annotations").addEventListener("change", (ev) => { state.annotations = ev.target.checked; schedule(); });
    $("two").addEventListener("change", (ev) => {
      state.two = ev.target.checked;
      state.panels[1].hidden = !state.two;
      state.panels[1].node.classList.toggle("hidden", !state.two);
      schedule();
    });
    $("zoom-in").addEventListener("click", () => zoomAt(0.5, 0, 0));
    $("zoom-out").addEventListener("click", () => zoomAt(2, 0, 0));
    $("fit").addEventListener("click", () => { state.view = fitView(); schedule(); });
    window.addEventListener("resize", schedule);
  }

  async function start() {
    try {
      const r = await fetch("manifest.json");
      if (!r.ok) throw new Error(`manifest.json: HTTP ${r.status}`);
      state.manifest = await r.json();
    } catch (err) {
      $("status").textContent = `cannot load the manifest (${err.message}); open this page through a web server`;
      document.body.dataset.pending = "0";
      return;
    }
    const m = state.manifest;
    document.title = `${m.title} · smoothsal`;
    $("title").textContent = m.title;
    state.opacity = parseFloat($("opacity").value);
    const methods = unique("method");
    const first = methods.includes("original") ? "original" : methods[0];
    const second = methods.includes("surrogate") ? "surrogate" : methods.find((x) => x !== first) || first;
    state.panels = [makePanel(0, first), makePanel(1, second)];
    bindControls();
    state.view = fitView();
    schedule();
  }

  // For scripts and tests: read or set the shared view; count outstanding work.
  window.smoothsal = {
    view: () => ({ ...state.view }),
    setView(cx, cy, upp) {
      state.view = { cx, cy, upp };
      schedule();
    },
    pending,
    renders: () => renders,
    panels: () => state.panels.map((p) => ({
      method: p.method, attribution: p.attribution, layer: p.layer, range: p.range, levels: p.levels,
      hidden: p.hidden,
    })),
  };

  start();
})();
