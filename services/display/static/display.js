// Surgical display: renders the updates the display service pushes (Server-Sent Events,
// one JSON snapshot per message). Read-only: this script never sends anything to the cart.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);
  const canvas = $("image");
  const ctx = canvas.getContext("2d");
  const SITE_NAMES = {
    gross_tumor: "gross tumour",
    tumor_bed: "tumour bed",
    specimen_cross_section: "specimen cross-section",
  };
  const LATENCIES_KEPT = 600;

  // Counters for whoever looks (the tests, a technician in the browser's console).
  const stats = {
    updates: 0,
    images: 0,
    state: null,
    stateChangedAtMs: null,
    imageRect: null,       // where the image sits on the canvas, in canvas pixels
    staleSinceMs: null,
    resultLatencyMs: [],   // capture of the pair -> numbers on the page
    imageLatencyMs: [],    // capture of the pair -> image drawn
  };
  window.nirfDisplay = stats;

  let snap = null;             // the latest snapshot
  let lastMessageMs = null;    // Date.now() of the latest message
  let staleAfterS = 1.0;
  let bitmap = null;           // the latest decoded preview
  let bitmapInfo = null;
  let decoding = false;
  let waitingPreview = null;   // newest preview that arrived while one was decoding
  let lastResultSeq = null;
  const captureTimes = new Map();  // frame_seq -> t_capture_ns, for the image latency

  function fmt(value, digits) {
    return (typeof value === "number" && isFinite(value)) ? value.toFixed(digits) : "\u2013";
  }

  function keep(list, value) {
    list.push(value);
    if (list.length > LATENCIES_KEPT) list.shift();
  }

  // -- the image -----------------------------------------------------------------------
  function fitCanvas() {
    const rect = canvas.getBoundingClientRect();
    const ratio = window.devicePixelRatio || 1;
    const w = Math.max(1, Math.round(rect.width * ratio));
    const h = Math.max(1, Math.round(rect.height * ratio));
    if (canvas.width !== w || canvas.height !== h) {
      canvas.width = w;
      canvas.height = h;
    }
  }

  function draw() {
    fitCanvas();
    ctx.fillStyle = "#050505";
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    if (!bitmap) return;
    // Keep the aspect ratio: fit the image inside the canvas, centred.
    const scale = Math.min(canvas.width / bitmap.width, canvas.height / bitmap.height);
    const w = bitmap.width * scale, h = bitmap.height * scale;
    const x0 = (canvas.width - w) / 2, y0 = (canvas.height - h) / 2;
    ctx.imageSmoothingEnabled = true;
    ctx.imageSmoothingQuality = "high";
    ctx.drawImage(bitmap, x0, y0, w, h);
    stats.imageRect = { x0, y0, w, h };
    drawRois(x0, y0, w, h);
  }

  function drawRois(x0, y0, w, h) {
    const result = snap && snap.result;
    const camera = snap && snap.status && snap.status.camera;
    if (!result || !result.roi || !camera || !camera.width || !camera.height) return;
    // ROIs are in full-frame pixels; the preview covers the whole frame.
    const sx = w / camera.width, sy = h / camera.height;
    const line = Math.max(2, canvas.height / 250);
    const style = getComputedStyle(document.documentElement);
    const boxes = [
      [result.roi.background, style.getPropertyValue("--background-roi").trim() || "#fff", [3 * line, 2 * line], "B"],
      [result.roi.signal, style.getPropertyValue("--signal-roi").trim() || "#3f6", [], "S"],
    ];
    ctx.font = `bold ${Math.round(canvas.height / 22)}px sans-serif`;
    ctx.textBaseline = "bottom";
    for (const [roi, colour, dash, tag] of boxes) {
      if (!Array.isArray(roi) || roi.length !== 4) continue;
      const [x, y, rw, rh] = roi;
      ctx.lineWidth = line;
      ctx.strokeStyle = colour;
      ctx.setLineDash(dash);
      ctx.strokeRect(x0 + x * sx, y0 + y * sy, rw * sx, rh * sy);
      ctx.setLineDash([]);
      ctx.fillStyle = colour;
      ctx.fillText(tag, x0 + x * sx + line, y0 + y * sy - line);
    }
  }

  function showPreview(preview) {
    // Latest value only: while one image decodes, a newer one replaces the waiting one.
    if (decoding) {
      waitingPreview = preview;
      return;
    }
    decoding = true;
    const img = new Image();
    img.onload = () => {
      bitmap = img;
      bitmapInfo = preview;
      stats.images += 1;
      draw();
      const tCapture = captureTimes.get(preview.frame_seq);
      if (tCapture) keep(stats.imageLatencyMs, Date.now() - tCapture / 1e6);
      next();
    };
    img.onerror = next;
    img.src = "data:image/png;base64," + preview.png_b64;

    function next() {
      decoding = false;
      if (waitingPreview) {
        const p = waitingPreview;
        waitingPreview = null;
        showPreview(p);
      }
    }
  }

  // -- the numbers ---------------------------------------------------------------------
  function setText(id, text) {
    const node = $(id);
    if (node.textContent !== text) node.textContent = text;
  }

  function renderState(status) {
    const state = typeof status.state === "string" ? status.state : "NO STATUS";
    const node = $("state");
    if (stats.state !== state) {
      stats.state = state;
      stats.stateChangedAtMs = Date.now();
      node.className = "state state-" + state.replace(/[^A-Z]/g, "");
    }
    setText("state", state);
    const faults = Array.isArray(status.faults) ? status.faults : [];
    const fault = $("fault");
    if (faults.length) {
      setText("fault", faults.map((f) => (f.message || f.code || "fault")).join(" \u00b7 "));
      fault.hidden = false;
    } else {
      fault.hidden = true;
    }
    const laser = status.laser || {};
    // While acquiring, the cart gates the laser on alternate frames, so "on" and the
    // monitored power flicker; the setpoint is what the state EMITTING delivers.
    if (state === "EMITTING" || laser.on) {
      setText("power", fmt(laser.setpoint_mw, 0) + " mW");
      setText("setpoint", laser.on ? "monitor " + fmt(laser.power_mw, 0) + " mW" : "gated");
    } else {
      setText("power", "OFF");
      setText("setpoint", "");
    }
  }

  function renderResult(s) {
    let result = s.result || {};
    const box = $("result");
    // A running average, when the cart computes one, is what the surgeon should read.
    const avg = result.average;
    const useAvg = avg && typeof avg === "object" && avg.pairs > 1;
    const sbr = useAvg ? avg.sbr : result.sbr;
    const cnr = useAvg ? avg.cnr : result.cnr;
    const valid = useAvg ? avg.valid : result.valid;
    const positive = useAvg ? avg.positive : result.positive;
    if (result.frame_seq === undefined) {
      setText("sbr", "\u2013");
      setText("call", "no result");
      $("call").className = "call invalid";
      setText("cnr", "\u2013");
    } else {
      setText("sbr", fmt(sbr, 2));
      setText("cnr", fmt(cnr, 1));
      const call = $("call");
      if (!valid) {
        const flags = Array.isArray(result.flags) && result.flags.length ? result.flags.join(", ") : "undefined";
        setText("call", "NOT VALID: " + flags.replace(/_/g, " "));
        call.className = "call invalid";
      } else if (positive) {
        setText("call", "POSITIVE");
        call.className = "call positive";
      } else {
        setText("call", "NEGATIVE");
        call.className = "call negative";
      }
    }
    setText("threshold", typeof result.threshold === "number" ? "threshold SBR \u2265 " + fmt(result.threshold, 1) : "");
    // The numbers are old when no result came lately (acquisition stopped, cart silent).
    const old = s.result_age_s === null || s.result_age_s > s.stale_after_s;
    box.classList.toggle("old", old);
    setText("result-note", result.frame_seq === undefined ? "" :
      (useAvg ? `mean of ${avg.pairs} pairs` : "single pair") + (old ? ` \u00b7 ${fmt(s.result_age_s, 0)} s old` : ""));
    if (result.frame_seq !== undefined && result.frame_seq !== lastResultSeq) {
      lastResultSeq = result.frame_seq;
      if (typeof result.t_capture_ns === "number") {
        keep(stats.resultLatencyMs, Date.now() - result.t_capture_ns / 1e6);
        captureTimes.set(result.frame_seq, result.t_capture_ns);
        if (captureTimes.size > 64) captureTimes.delete(captureTimes.keys().next().value);
      }
    }
  }

  function renderCase(s) {
    const c = s.case || {};
    setText("case", c.id ? String(c.id) : "no case open");
    const site = c.site ? (SITE_NAMES[c.site] || String(c.site)) + (c.label ? " \u00b7 " + c.label : "") : "\u2013";
    setText("site", site);
  }

  // -- staleness -----------------------------------------------------------------------
  function renderStale() {
    const now = Date.now();
    let message = null;
    let imageNote = null;
    if (lastMessageMs === null || now - lastMessageMs > staleAfterS * 1000) {
      const gone = lastMessageMs === null ? "" : ` for ${fmt((now - lastMessageMs) / 1000, 1)} s`;
      message = `STALE \u2014 no connection to the display service${gone}`;
      imageNote = "STALE IMAGE";
    } else if (snap) {
      const since = (now - lastMessageMs) / 1000;
      // previews come from fluorescence pairs, which exist only while emitting
      const acquiring = Boolean(snap.status) && snap.status.acquisition === "fluorescence" &&
        snap.status.state === "EMITTING";
      if (snap.status_stale) {
        message = snap.status_age_s === null ? "STALE \u2014 no status from the cart yet"
          : `STALE \u2014 no status from the cart for ${fmt(snap.status_age_s + since, 1)} s`;
      } else if (acquiring && snap.image_stale) {
        message = snap.preview_age_s === null ? "STALE \u2014 no image from the cart yet"
          : `STALE \u2014 no new image for ${fmt(snap.preview_age_s + since, 1)} s`;
      }
      if (!bitmap) {
        imageNote = snap.status_stale ? "NO IMAGE" :
          (acquiring ? "WAITING FOR IMAGE" : "NO IMAGE \u2014 acquisition off");
      } else if (snap.image_stale) {
        imageNote = snap.preview_age_s === null ? "STALE IMAGE" :
          `STALE IMAGE \u2014 ${fmt(snap.preview_age_s + since, 0)} s old`;
      }
    }
    const banner = $("stale");
    if (message) {
      setText("stale", message);
      if (banner.hidden) stats.staleSinceMs = now;
      banner.hidden = false;
    } else {
      banner.hidden = true;
      stats.staleSinceMs = null;
    }
    document.body.classList.toggle("stale", Boolean(message));
    const note = $("image-note");
    if (imageNote) setText("image-note", imageNote);
    note.hidden = !imageNote;
    $("image").parentElement.classList.toggle("image-stale", Boolean(imageNote) && Boolean(bitmap));
  }

  function renderInfo(s) {
    const parts = [];
    if (bitmapInfo && bitmapInfo.frame_seq !== null && bitmapInfo.frame_seq !== undefined) parts.push(`frame ${bitmapInfo.frame_seq}`);
    if (s.status && s.status.profile) parts.push(`profile ${s.status.profile}`);
    if (s.status && s.status.acquisition) parts.push(`acquisition ${s.status.acquisition}`);
    setText("info", parts.join(" \u00b7 "));
  }

  function render(s) {
    snap = s;
    if (typeof s.stale_after_s === "number") staleAfterS = s.stale_after_s;
    document.body.classList.remove("no-data");
    renderState(s.status || {});
    renderResult(s);
    renderCase(s);
    renderInfo(s);
    if (s.preview && s.preview.png_b64) showPreview(s.preview);
    else if (bitmap) draw();  // ROIs may have moved
    renderStale();
  }

  // -- the stream ----------------------------------------------------------------------
  const source = new EventSource("events");
  source.onmessage = (ev) => {
    let s;
    try {
      s = JSON.parse(ev.data);
    } catch (err) {
      return;  // a broken message is skipped; the next one carries everything again
    }
    lastMessageMs = Date.now();
    stats.updates += 1;
    render(s);
  };
  // EventSource reconnects by itself; the timer below keeps the STALE warning honest
  // while it does.
  setInterval(renderStale, 200);
  window.addEventListener("resize", draw);
  renderStale();
})();
