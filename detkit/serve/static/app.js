/* detkit serve page: pick or drop an image, POST it to /v1/predict, draw the detections.
 *
 * Plain browser JavaScript, no build step and no external assets. The HTTP contract is the one of
 * detkit/serve/app.py: GET /v1/model describes the model; POST /v1/predict (multipart, field
 * "image", ?masks=rle when the model has masks) answers
 *   {width, height, boxes: [[x1, y1, x2, y2] image pixels], scores, labels, class_names,
 *    masks?: [{size: [H, W], counts: COCO compressed RLE string}], timing: {total_ms, ...}}
 * with detections sorted by decreasing score, or {error: "<one line>"} with a 4xx/5xx status.
 *
 * The score threshold slider filters the drawing and the table on the client: moving it never
 * sends a request. For tests and debugging, window.detkitPage exposes the last response
 * (lastResult), the number of /v1/predict requests sent (predictRequests) and the pure helpers
 * (classColor, decodeRleCounts, rleToMask).
 */
"use strict";

(function () {
  // ---- pure helpers (no DOM) ---------------------------------------------------------------

  const GOLDEN = 0.618033988749895;

  /** Python's round() for non-negative numbers: halves go to the even neighbour. */
  function roundHalfEven(x) {
    const floor = Math.floor(x);
    const diff = x - floor;
    if (diff > 0.5) return floor + 1;
    if (diff < 0.5) return floor;
    return floor % 2 === 0 ? floor : floor + 1;
  }

  /** HSV (each in [0, 1]) to RGB floats in [0, 1], the piecewise formula of Python's colorsys. */
  function hsvToRgb(h, s, v) {
    if (s === 0) return [v, v, v];
    const sector = Math.floor(h * 6);
    const f = h * 6 - sector;
    const p = v * (1 - s);
    const q = v * (1 - s * f);
    const t = v * (1 - s * (1 - f));
    switch (sector % 6) {
      case 0: return [v, t, p];
      case 1: return [q, v, p];
      case 2: return [p, v, t];
      case 3: return [p, q, v];
      case 4: return [t, p, v];
      default: return [v, p, q];
    }
  }

  /** [r, g, b] 0..255 of a class index; the same as detkit.visualization.class_color. */
  function classColor(label) {
    const k = Math.trunc(Number(label));
    const hue = (0.05 + k * GOLDEN) % 1.0;
    const sat = k % 2 === 0 ? 0.85 : 0.65;
    return hsvToRgb(hue, sat, 0.95).map((c) => roundHalfEven(c * 255));
  }

  /** Black or white, whichever reads better on an [r, g, b] background (as the drawn files do). */
  function captionTextColor(rgb) {
    const luma = 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2];
    return luma > 140 ? "#000" : "#fff";
  }

  /**
   * Run lengths of a COCO compressed RLE string.
   *
   * Each count is written in 5-bit groups, least significant first, as characters from '0'
   * (48) upward: the low 5 bits of (char - 48) carry the data and bit 0x20 says another group
   * follows; in the last group bit 0x10 is the sign (two's complement over the bits read). From
   * the third count on, the stored number is the difference to the count two places before.
   * The counts alternate 0-runs and 1-runs, starting with 0s, over the mask in column-major order.
   * Returns an array of non-negative integers; throws Error on a malformed string.
   */
  function decodeRleCounts(text) {
    const counts = [];
    let pos = 0;
    while (pos < text.length) {
      let value = 0;
      let scale = 1; // 32 ** groups read so far (plain arithmetic: no 32-bit overflow)
      let more = true;
      while (more) {
        if (pos >= text.length) throw new Error("truncated RLE string");
        const c = text.charCodeAt(pos) - 48;
        if (c < 0 || c > 63) throw new Error("bad character in RLE string");
        value += (c & 0x1f) * scale;
        scale *= 32;
        more = (c & 0x20) !== 0;
        pos += 1;
        if (!more && (c & 0x10) !== 0) value -= scale; // negative: extend the sign bit
      }
      if (counts.length > 2) value += counts[counts.length - 2];
      if (value < 0) throw new Error("negative run length in RLE string");
      counts.push(value);
    }
    return counts;
  }

  /** Checked run lengths of one {size: [H, W], counts} mask, or null when it does not fit H x W. */
  function maskRuns(rle, height, width) {
    if (!rle || !Array.isArray(rle.size) || rle.size[0] !== height || rle.size[1] !== width) return null;
    if (typeof rle.counts !== "string") return null;
    let counts;
    try {
      counts = decodeRleCounts(rle.counts);
    } catch (err) {
      return null;
    }
    const total = counts.reduce((a, b) => a + b, 0);
    return total === height * width ? counts : null;
  }

  /** Visit the pixels of the 1-runs of a column-major run-length mask: visit(rowMajorIndex). */
  function forEachMaskPixel(counts, height, width, visit) {
    let pos = 0;
    for (let i = 0; i < counts.length; i++) {
      const n = counts[i];
      if (i % 2 === 1 && n > 0) {
        let x = Math.floor(pos / height);
        let y = pos - x * height;
        for (let j = 0; j < n && x < width; j++) {
          visit(y * width + x);
          y += 1;
          if (y === height) { y = 0; x += 1; }
        }
      }
      pos += n;
    }
  }

  /** A {size: [H, W], counts} mask as a row-major Uint8Array of 0/1 (H * W), or null if invalid. */
  function rleToMask(rle) {
    if (!rle || !Array.isArray(rle.size)) return null;
    const [height, width] = rle.size;
    const counts = maskRuns(rle, height, width);
    if (counts === null) return null;
    const mask = new Uint8Array(height * width);
    forEachMaskPixel(counts, height, width, (k) => { mask[k] = 1; });
    return mask;
  }

  /** Pixel rows/columns of a box's edges: rounded and kept inside the image, as in the drawn files. */
  function edgePixels(box, width, height) {
    const clamp = (v, hi) => Math.min(Math.max(v, 0), hi);
    const r = box.map((v) => roundHalfEven(Math.max(Number(v), 0)));
    return [clamp(r[0], width - 1), clamp(r[1], height - 1), clamp(r[2], width - 1), clamp(r[3], height - 1)];
  }

  const rgbCss = (c, alpha = 1) => `rgba(${c[0]}, ${c[1]}, ${c[2]}, ${alpha})`;
  const fmtMs = (v) => (typeof v === "number" && Number.isFinite(v) ? `${v.toFixed(1)} ms` : "?");

  // ---- page state and elements --------------------------------------------------------------

  const $ = (id) => document.getElementById(id);
  const el = {
    fileInput: $("file-input"), dropZone: $("drop-zone"), canvas: $("canvas"), canvasWrap: $("canvas-wrap"),
    threshold: $("threshold"), thresholdValue: $("threshold-value"), detections: $("detections"),
    latency: $("latency"), imageSize: $("image-size"), shown: $("shown"), empty: $("empty"),
    error: $("error"), status: $("status"), model: $("model"),
  };
  const state = {
    model: null,     // the /v1/model answer, or null
    result: null,    // the last successful /v1/predict answer
    fileName: "",
    bitmap: null,    // the decoded image (ImageBitmap) or null when the browser cannot show it
    runs: null,      // per detection: its mask's run lengths, or null
    highlight: -1,   // detection index under the pointer in the table, or -1
    requestSerial: 0,
  };
  const page = { predictRequests: 0, lastResult: null, classColor, decodeRleCounts, rleToMask };
  window.detkitPage = page;
  const overlay = document.createElement("canvas"); // mask layer, composited over the image

  function setStatus(text) { el.status.textContent = text; }

  function showError(text) {
    el.error.textContent = text;
    el.error.hidden = false;
  }

  function clearError() {
    el.error.textContent = "";
    el.error.hidden = true;
  }

  async function readJson(response) {
    const text = await response.text();
    try {
      return JSON.parse(text);
    } catch (err) {
      return null;
    }
  }

  function errorLine(response, body) {
    if (body && typeof body.error === "string" && body.error) return body.error;
    return `HTTP ${response.status} ${response.statusText}`.trim();
  }

  // ---- model information ---------------------------------------------------------------------

  function describeModel(m) {
    const parts = [String(m.meta_architecture || "model")];
    if (m.config && typeof m.config.backbone === "string") parts.push(m.config.backbone);
    if (Number.isFinite(m.num_classes)) parts.push(`${m.num_classes} classes`);
    parts.push(`${m.precision || "?"} on ${m.device || "?"}`);
    return parts.join(" · ");
  }

  const modelReady = fetch("/v1/model")
    .then(async (response) => {
      const body = await readJson(response);
      if (!response.ok || !body) throw new Error(errorLine(response, body));
      state.model = body;
      el.model.textContent = describeModel(body);
      return body;
    })
    .catch((err) => {
      el.model.textContent = "Model information unavailable";
      showError(`Could not read /v1/model: ${err.message}`);
      return null;
    });

  // ---- running the detector ------------------------------------------------------------------

  async function decodeImage(file) {
    try {
      return await createImageBitmap(file, { imageOrientation: "from-image" });
    } catch (err) {
      return null; // not displayable here; the server's answer decides whether it is an image
    }
  }

  function resetResult() {
    state.result = null;
    state.runs = null;
    state.bitmap = null;
    page.lastResult = null;
    el.canvasWrap.hidden = true;
    el.dropZone.classList.remove("compact");
    el.latency.textContent = "–";
    el.imageSize.textContent = "–";
    render();
  }

  async function handleFile(file) {
    if (!file) return;
    const serial = ++state.requestSerial;
    clearError();
    setStatus(`Detecting objects in ${file.name || "the image"}…`);
    el.dropZone.setAttribute("aria-busy", "true");
    const bitmapReady = decodeImage(file);
    const model = await modelReady;
    const url = model && model.has_masks ? "/v1/predict?masks=rle" : "/v1/predict";
    const form = new FormData();
    form.append("image", file, file.name || "image");
    let response;
    let body;
    try {
      page.predictRequests += 1;
      response = await fetch(url, { method: "POST", body: form });
      body = await readJson(response);
    } catch (err) {
      response = null;
      body = { error: `request to ${url} failed: ${err.message}` };
    }
    const bitmap = await bitmapReady;
    if (serial !== state.requestSerial) return; // a newer image was picked meanwhile
    el.dropZone.removeAttribute("aria-busy");
    if (!response || !response.ok || !body || typeof body !== "object") {
      resetResult();
      showError(response ? errorLine(response, body) : body.error);
      setStatus("The server did not detect anything: see the error above.");
      return;
    }
    state.fileName = file.name || "the image";
    setResult(body, bitmap);
  }

  function setResult(result, bitmap) {
    const n = Array.isArray(result.scores) ? result.scores.length : 0;
    const width = Number(result.width);
    const height = Number(result.height);
    state.result = result;
    state.bitmap = bitmap;
    state.highlight = -1;
    page.lastResult = result;
    state.runs = Array.isArray(result.masks)
      ? result.masks.map((rle) => maskRuns(rle, height, width))
      : null;
    el.canvas.width = width;
    el.canvas.height = height;
    el.canvasWrap.hidden = false;
    el.dropZone.classList.add("compact");

    const t = result.timing || {};
    const detail = document.createElement("span");
    detail.className = "detail";
    detail.textContent = `inference ${fmtMs(t.inference_ms)} · queue ${fmtMs(t.queue_ms)} · batch ${t.batch_size ?? "?"}`;
    el.latency.replaceChildren(document.createTextNode(`${fmtMs(t.total_ms)} total`), detail);
    el.imageSize.textContent = `${width} × ${height}`;
    if (!bitmap) showError("This browser cannot display the image; the detections are drawn on a blank canvas.");
    if (state.runs && state.runs.some((r) => r === null) && n > 0) {
      showError("Some masks did not match the image size and are not drawn.");
    }
    render();
  }

  // ---- drawing and the table -----------------------------------------------------------------

  function threshold() {
    const v = Number(el.threshold.value);
    return Number.isFinite(v) ? v : 0;
  }

  /** Indices of the detections scoring at least the threshold, by decreasing score. */
  function visibleDetections(result, thr) {
    const scores = result.scores || [];
    const keep = [];
    for (let i = 0; i < scores.length; i++) if (scores[i] >= thr) keep.push(i);
    return keep.sort((a, b) => scores[b] - scores[a] || a - b);
  }

  function className(result, i) {
    const label = result.labels ? result.labels[i] : undefined;
    if (result.class_names && typeof result.class_names[i] === "string") return result.class_names[i];
    const names = state.model && state.model.class_names;
    if (names && typeof names[label] === "string") return names[label];
    return String(label);
  }

  function drawMasks(ctx, result, order, width, height) {
    if (!state.runs || !order.some((i) => state.runs[i])) return;
    overlay.width = width;
    overlay.height = height;
    const octx = overlay.getContext("2d");
    const image = octx.createImageData(width, height);
    const data = image.data;
    for (const i of order) { // increasing score: the most confident mask ends on top
      const runs = state.runs[i];
      if (!runs) continue;
      const [r, g, b] = classColor(result.labels[i]);
      forEachMaskPixel(runs, height, width, (k) => {
        const o = k * 4;
        data[o] = r; data[o + 1] = g; data[o + 2] = b; data[o + 3] = 128;
      });
    }
    octx.putImageData(image, 0, 0);
    ctx.drawImage(overlay, 0, 0);
  }

  function drawCaption(ctx, text, x, y, rgb, width, height, fontPx) {
    ctx.font = `600 ${fontPx}px system-ui, -apple-system, "Segoe UI", Roboto, Arial, sans-serif`;
    const pad = Math.max(2, Math.round(fontPx * 0.25));
    const boxW = Math.ceil(ctx.measureText(text).width) + 2 * pad;
    const boxH = fontPx + 2 * pad;
    let top = y - boxH;
    if (top < 0) top = Math.min(Math.max(y, 0), Math.max(height - boxH, 0)); // no room above: inside
    const left = Math.min(Math.max(x, 0), Math.max(width - boxW, 0));
    ctx.fillStyle = rgbCss(rgb);
    ctx.fillRect(left, top, boxW, boxH);
    ctx.fillStyle = captionTextColor(rgb);
    ctx.textBaseline = "middle";
    ctx.fillText(text, left + pad, top + boxH / 2 + 0.5);
  }

  function drawResult(result, visible) {
    const canvas = el.canvas;
    const { width, height } = canvas;
    const ctx = canvas.getContext("2d");
    ctx.clearRect(0, 0, width, height);
    if (state.bitmap) {
      ctx.drawImage(state.bitmap, 0, 0, width, height);
    } else {
      ctx.fillStyle = "#8a8f98";
      ctx.fillRect(0, 0, width, height);
    }
    const order = visible.slice().reverse(); // increasing score
    drawMasks(ctx, result, order, width, height);

    // sizes in image pixels that look the same whatever the on-screen scale of the canvas
    const shownWidth = canvas.getBoundingClientRect().width || width;
    const scale = Math.max(width / shownWidth, 1);
    const thickness = Math.max(Math.round((width + height) / 2 * 0.003), Math.round(2 * scale), 1);
    const fontPx = Math.max(10, Math.round(12 * scale));
    const boxes = order.filter((i) => i !== state.highlight);
    if (order.includes(state.highlight)) boxes.push(state.highlight);
    for (const i of boxes) {
      const [x1, y1, x2, y2] = edgePixels(result.boxes[i], width, height);
      const t = i === state.highlight ? 2 * thickness : thickness;
      ctx.fillStyle = rgbCss(classColor(result.labels[i]));
      ctx.fillRect(x1, y1, x2 - x1 + 1, t);
      ctx.fillRect(x1, Math.max(y2 - t + 1, y1), x2 - x1 + 1, t);
      ctx.fillRect(x1, y1, t, y2 - y1 + 1);
      ctx.fillRect(Math.max(x2 - t + 1, x1), y1, t, y2 - y1 + 1);
    }
    for (const i of boxes) {
      const [x1, y1] = edgePixels(result.boxes[i], width, height);
      const text = `${className(result, i)} ${Number(result.scores[i]).toFixed(2)}`;
      drawCaption(ctx, text, x1, y1, classColor(result.labels[i]), width, height, fontPx);
    }
  }

  function tableRow(result, i) {
    const tr = document.createElement("tr");
    tr.dataset.index = String(i);
    const cell = (text, cls) => {
      const td = document.createElement("td");
      if (cls) td.className = cls;
      td.textContent = text;
      return td;
    };
    const name = cell("", "");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.backgroundColor = rgbCss(classColor(result.labels[i]));
    name.append(swatch, document.createTextNode(className(result, i))); // text node: never parsed as HTML
    const box = result.boxes[i].map((v) => Number(v).toFixed(1)).join(" ");
    tr.append(cell(String(i + 1), "num"), name, cell(Number(result.scores[i]).toFixed(3), "num"),
      cell(box, "num box"));
    tr.addEventListener("mouseenter", () => { state.highlight = i; tr.classList.add("active"); redraw(); });
    tr.addEventListener("mouseleave", () => { state.highlight = -1; tr.classList.remove("active"); redraw(); });
    return tr;
  }

  function redraw() {
    if (state.result) drawResult(state.result, visibleDetections(state.result, threshold()));
  }

  /** Re-filter by the slider, re-draw the canvas and rebuild the table (no request). */
  function render() {
    const thr = threshold();
    el.thresholdValue.textContent = thr.toFixed(2);
    const result = state.result;
    if (!result) {
      el.detections.replaceChildren();
      el.shown.textContent = "–";
      el.empty.textContent = "No detections yet.";
      el.empty.hidden = false;
      return;
    }
    const visible = visibleDetections(result, thr);
    const total = (result.scores || []).length;
    drawResult(result, visible);
    el.detections.replaceChildren(...visible.map((i) => tableRow(result, i)));
    el.shown.textContent = `${visible.length} of ${total}`;
    el.empty.textContent = total ? `No detection scores ${thr.toFixed(2)} or more.` : "The model found nothing.";
    el.empty.hidden = visible.length > 0;
    setStatus(`${state.fileName}: ${total} detection${total === 1 ? "" : "s"}, ` +
      `${visible.length} at or above ${thr.toFixed(2)}.`);
  }

  // ---- events ----------------------------------------------------------------------------------

  el.fileInput.addEventListener("change", () => {
    const file = el.fileInput.files && el.fileInput.files[0];
    handleFile(file);
    el.fileInput.value = ""; // picking the same file again fires "change" again
  });

  el.threshold.addEventListener("input", render);

  // dropping works anywhere on the page; the drop zone lights up while something is dragged
  let dragDepth = 0;
  document.addEventListener("dragenter", (e) => {
    e.preventDefault();
    dragDepth += 1;
    el.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(dragDepth - 1, 0);
    if (dragDepth === 0) el.dropZone.classList.remove("dragging");
  });
  document.addEventListener("dragover", (e) => { e.preventDefault(); });
  document.addEventListener("drop", (e) => {
    e.preventDefault();
    dragDepth = 0;
    el.dropZone.classList.remove("dragging");
    const files = e.dataTransfer && e.dataTransfer.files;
    if (files && files.length) handleFile(files[0]);
  });
  document.addEventListener("paste", (e) => {
    const files = e.clipboardData && e.clipboardData.files;
    if (files && files.length) handleFile(files[0]);
  });

  let resizePending = false;
  window.addEventListener("resize", () => {
    if (resizePending) return;
    resizePending = true;
    requestAnimationFrame(() => { resizePending = false; redraw(); });
  });

  render();
})();
