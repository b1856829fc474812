// Demo page for tome-serve. Plain browser JavaScript, no build step, no third-party code.
// It talks to the public API (/models, /classify, /visualize, /v1/embeddings) exactly as any client would.
"use strict";

(() => {
  const DEBOUNCE_MS = 150;
  const TOP_K = 5;
  const KEY_STORAGE = "tome-serve.api-key";

  const $ = (id) => document.getElementById(id);
  const ui = {
    fileInput: $("file-input"),
    dropZone: $("drop-zone"),
    modelSelect: $("model-select"),
    modelMeta: $("model-meta"),
    slider: $("r-slider"),
    rValue: $("r-value"),
    rAuto: $("r-auto"),
    auth: $("auth"),
    apiKey: $("api-key"),
    results: $("results"),
    status: $("status"),
    error: $("error"),
    weightsNote: $("weights-note"),
    original: $("original-image"),
    originalPlaceholder: $("original-placeholder"),
    merge: $("merge-image"),
    mergePlaceholder: $("merge-placeholder"),
    mergeCaption: $("merge-caption"),
    tokens: $("tokens"),
    speedup: $("speedup"),
    gmacs: $("gmacs"),
    inferenceMs: $("inference-ms"),
    batch: $("batch"),
    totalMs: $("total-ms"),
    queueMs: $("queue-ms"),
    predictions: $("predictions"),
    viewRadios: [...document.querySelectorAll('input[name="view"]')],
    embed: $("embed"),
    embedCosine: $("embed-cosine"),
    embedNote: $("embed-note"),
    nearest: $("nearest"),
  };

  // What the user has chosen; results are derived from it by refresh().
  const state = {
    models: [],
    file: null,
    controller: null, // AbortController of the newest request; older ones are aborted
    debounceTimer: 0,
    modelsRequest: null, // the /models request in flight, if any
    originalUrl: "",
    mergeUrl: "",
    samples: new Map(), // model name -> promise of the samples' r=0 embeddings, asked for once
  };

  // ---------- API ----------

  class ApiError extends Error {}

  function authHeaders() {
    const key = ui.apiKey.value.trim();
    return key ? { Authorization: `Bearer ${key}` } : {};
  }

  function describeDetail(detail) {
    if (typeof detail === "string") return detail;
    if (Array.isArray(detail)) {
      // FastAPI validation errors: [{loc: ["query", "r"], msg: "..."}]
      return detail
        .map((item) => {
          const where = Array.isArray(item.loc) ? item.loc.filter((part) => part !== "query" && part !== "body") : [];
          return where.length ? `${where.join(".")}: ${item.msg}` : String(item.msg ?? JSON.stringify(item));
        })
        .join("; ");
    }
    return detail == null ? "" : JSON.stringify(detail);
  }

  async function errorFromResponse(response) {
    let detail = "";
    try {
      detail = describeDetail((await response.json()).detail);
    } catch {
      // not JSON (a proxy error page, say): fall back to the status line
    }
    const message = detail || `${response.status} ${response.statusText}`.trim();
    const advice = [];
    if (response.status === 401) {
      advice.push("This server requires an API key: enter it under “API key”.");
      ui.auth.open = true;
    } else if (response.status === 429) {
      const retry = response.headers.get("Retry-After");
      advice.push(retry ? `Try again in ${retry} s.` : "Try again shortly.");
    }
    const full = advice.length ? [message.replace(/[.!?]?$/, "."), ...advice].join(" ") : message;
    return new ApiError(`Error ${response.status}: ${full}`);
  }

  async function request(path, options = {}) {
    let response;
    try {
      response = await fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) } });
    } catch (err) {
      if (err.name === "AbortError") throw err;
      throw new ApiError(`Could not reach the server (${err.message}).`);
    }
    if (!response.ok) throw await errorFromResponse(response);
    return response;
  }

  function postImage(endpoint, params, file, signal) {
    const body = new FormData();
    body.append("file", file, file.name || "image");
    const query = new URLSearchParams(params).toString();
    return request(`${endpoint}?${query}`, { method: "POST", body, signal });
  }

  // Several images as multipart files, the other fields of OpenAI's embeddings request beside them;
  // the answer in base64, as OpenAI's clients ask for it.
  async function postEmbeddings(files, params, signal) {
    const body = new FormData();
    for (const file of files) body.append("file", file, file.name || "image");
    for (const [name, value] of Object.entries({ encoding_format: "base64", ...params })) body.append(name, value);
    return (await request("v1/embeddings", { method: "POST", body, signal })).json();
  }

  // base64 of little-endian float32 values.
  function decodeEmbedding(item) {
    const bytes = Uint8Array.from(atob(item.embedding), (c) => c.charCodeAt(0));
    const view = new DataView(bytes.buffer);
    return Float64Array.from({ length: bytes.length / 4 }, (_, i) => view.getFloat32(4 * i, true));
  }

  function cosine(a, b) {
    let dot = 0;
    let aa = 0;
    let bb = 0;
    for (let i = 0; i < a.length; i++) {
      dot += a[i] * b[i];
      aa += a[i] * a[i];
      bb += b[i] * b[i];
    }
    return dot / Math.sqrt(aa * bb);
  }

  // ---------- /models ----------

  function currentModel() {
    return state.models.find((m) => m.name === ui.modelSelect.value) || null;
  }

  // The analytical cost of one r, as /models lists it for every r of the model's range.
  function costAt(model, r) {
    const table = model && Array.isArray(model.costs) ? model.costs : [];
    return table.find((row) => Number(row.r) === r) || null;
  }

  function hasClassifier(model) {
    return Number(model.num_classes ?? 1) > 0;
  }

  // One /models request at a time: the start, a new key and a first image may all ask for it.
  function loadModels() {
    state.modelsRequest ??= fetchModels().finally(() => {
      state.modelsRequest = null;
    });
    return state.modelsRequest;
  }

  async function fetchModels() {
    setStatus("Loading models…");
    try {
      const payload = await (await request("models")).json();
      state.models = Array.isArray(payload.models) ? payload.models : [];
    } catch (err) {
      showError(err.message);
      setStatus("Could not load the models.");
      return;
    }
    if (!state.models.length) {
      showError("The server reports no loaded models.");
      return;
    }
    const previous = ui.modelSelect.value;
    ui.modelSelect.replaceChildren(
      ...state.models.map((m) => new Option(m.name, m.name)),
    );
    const fallback = state.models.find((m) => m.default) || state.models[0];
    ui.modelSelect.value = state.models.some((m) => m.name === previous) ? previous : fallback.name;
    ui.modelSelect.disabled = false;
    clearError();
    applyModel({ keepR: false });
    setStatus(state.file ? "" : "Ready. Choose an image or a sample.");
    scheduleRefresh(0);
  }

  function applyModel({ keepR }) {
    const model = currentModel();
    if (!model) return;
    const rMin = Number(model.r_min ?? 0);
    const rMax = Number(model.r_max ?? 0);
    const defaultAuto = model.default_r === "auto";
    if (!keepR) ui.rAuto.checked = defaultAuto;
    const wanted = keepR || defaultAuto ? Number(ui.slider.value) : Number(model.default_r ?? rMin);
    ui.slider.min = String(rMin);
    ui.slider.max = String(rMax);
    ui.slider.value = String(Math.min(rMax, Math.max(rMin, wanted)));
    ui.slider.disabled = rMax <= rMin;

    const size = Array.isArray(model.input_size) ? model.input_size.slice(-2).join("×") : "";
    const facts = [
      size ? `input ${size}` : "",
      model.input_tokens ? `${model.input_tokens} tokens` : "",
      model.depth ? `${model.depth} blocks` : "",
      model.device,
      model.dtype,
      // A file's path, possibly followed by a remark in parentheses that the notes repeat anyway.
      `weights: ${String(model.weights || "?").split(" (")[0].split("/").pop()}`,
    ].filter(Boolean);
    ui.modelMeta.textContent = facts.join(" · ");

    const notes = [];
    const random = String(model.weights || "").toLowerCase() === "random";
    if (!hasClassifier(model)) {
      notes.push("This model has no classifier head: the page shows its merge map only.");
      if (random) notes.push("Its weights are random, so the merges are those of an untrained model.");
    } else if (random) {
      notes.push("This model has random weights, so its predictions are meaningless; the merge map and timings are real.");
    }
    notes.push(...(Array.isArray(model.notes) ? model.notes.filter((note) => !/num_classes=0/.test(note)) : []));
    ui.weightsNote.hidden = notes.length === 0;
    ui.weightsNote.textContent = notes.join(" ");
    showR();
  }

  // The slider's own readouts come from /models and need no request.
  // With auto, the readouts show the r the server chose for the last answer (none yet: "auto").
  function showR(chosen = null) {
    const auto = ui.rAuto.checked;
    const r = auto ? chosen : Number(ui.slider.value);
    ui.rValue.textContent = auto ? (r === null ? "auto" : `auto: r=${r}`) : String(r);
    const cost = r === null ? null : costAt(currentModel(), r);
    const speedup = cost && Number(cost.speedup ?? cost.expected_speedup);
    const gmacs = cost && Number(cost.gmacs);
    ui.speedup.textContent = speedup ? `${speedup.toFixed(2)}×` : "–";
    const base = costAt(currentModel(), 0);
    const baseGmacs = base && Number(base.gmacs);
    ui.gmacs.textContent = gmacs
      ? `${formatGmacs(gmacs)}${baseGmacs ? ` of ${formatGmacs(baseGmacs)}` : ""} GMACs per image`
      : "";
    if (!auto) {
      ui.slider.setAttribute("aria-valuetext", speedup ? `r ${r}, expected speedup ${speedup.toFixed(2)} times` : `r ${r}`);
    }
  }

  // ---------- requests for the current choice ----------

  function scheduleRefresh(delay = DEBOUNCE_MS) {
    clearTimeout(state.debounceTimer);
    state.debounceTimer = setTimeout(refresh, delay);
  }

  async function refresh() {
    if (!state.models.length) {
      loadModels(); // the first try failed (no key yet, say); it refreshes once the models are in
      return;
    }
    const model = currentModel();
    const file = state.file;
    if (!model || !file) return;
    const auto = ui.rAuto.checked;
    const r = auto ? "auto" : Number(ui.slider.value);

    // A newer choice makes any request still in flight useless: abort it, and check identity
    // after every await so that a late answer can never overwrite a newer one.
    state.controller?.abort();
    const controller = new AbortController();
    state.controller = controller;
    const isCurrent = () => state.controller === controller;

    ui.results.setAttribute("aria-busy", "true");
    setStatus(`Running ${model.name} at r=${r} on ${file.name || "the image"}…`);
    try {
      if (currentView() === "embed") {
        await refreshEmbedding(model, r, file, controller.signal, isCurrent);
        return;
      }
      const params = { model: model.name, r: String(r) };
      const started = performance.now();
      const classify = hasClassifier(model)
        ? postImage("classify", { ...params, top_k: String(TOP_K) }, file, controller.signal).then((res) => res.json())
        : Promise.resolve(null);
      const [classified, merged] = await Promise.all([classify, visualize(params, file, controller.signal)]);
      if (!isCurrent()) return;
      clearError();
      const result = classified ?? resultFromHeaders(merged.headers, r, performance.now() - started);
      // With auto, /classify and /visualize may each get an r of their own: show the map's.
      const used = auto ? Number(merged.headers.get("X-Tome-R")) : r;
      if (auto && classified) result.r = used;
      renderResult(result, merged.blob, used, file, auto);
    } catch (err) {
      if (!isCurrent() || err.name === "AbortError") return;
      controller.abort(); // the sibling request is useless now
      ui.results.classList.add("stale");
      showError(err instanceof ApiError ? err.message : `Unexpected error: ${err.message}`);
      setStatus("The last request failed.");
    } finally {
      if (isCurrent()) ui.results.setAttribute("aria-busy", "false");
    }
  }

  function visualize(params, file, signal) {
    return postImage("visualize", params, file, signal).then(async (res) => ({
      blob: await res.blob(),
      headers: res.headers,
    }));
  }

  // The embed view: the image's embedding at r against its own at r=0 (one request when r is 0), the
  // samples' r=0 embeddings ranked against it, and the merge map at r for the figures and the stats.
  async function refreshEmbedding(model, r, file, signal, isCurrent) {
    const auto = r === "auto";
    const params = { model: model.name, r: String(r) };
    const started = performance.now();
    const atR = postEmbeddings([file], params, signal);
    const atZero = r === 0 ? atR : postEmbeddings([file], { ...params, r: "0" }, signal);
    const [chosen, zero, samples, merged] = await Promise.all([
      atR,
      atZero,
      sampleEmbeddings(model.name),
      visualize(params, file, signal),
    ]);
    if (!isCurrent()) return;
    clearError();
    const vector = decodeEmbedding(chosen.data[0]);
    const nearest = samples
      .map((sample) => ({ ...sample, cosine: cosine(vector, sample.vector) }))
      .sort((a, b) => b.cosine - a.cosine);
    const result = resultFromHeaders(merged.headers, r, performance.now() - started);
    const used = auto ? Number(merged.headers.get("X-Tome-R")) : r;
    renderResult(result, merged.blob, used, file, auto);
    renderEmbedding(chosen.data[0].r, cosine(vector, decodeEmbedding(zero.data[0])), nearest, file);
  }

  // The samples' r=0 embeddings, in one request per model; asked again only after a failure.
  function sampleEmbeddings(modelName) {
    if (!state.samples.has(modelName)) {
      const pending = fetchSampleEmbeddings(modelName).catch((err) => {
        state.samples.delete(modelName);
        throw err;
      });
      state.samples.set(modelName, pending);
    }
    return state.samples.get(modelName);
  }

  async function fetchSampleEmbeddings(modelName) {
    const buttons = [...document.querySelectorAll("button.sample")];
    const files = await Promise.all(buttons.map(sampleFile));
    const answer = await postEmbeddings(files, { model: modelName, r: "0" });
    return answer.data.map((item) => ({
      name: files[item.index].name,
      src: buttons[item.index].dataset.src,
      alt: buttons[item.index].querySelector("img").alt,
      vector: decodeEmbedding(item),
    }));
  }

  // A model without a classifier head only has /visualize, which reports its numbers in headers
  // but not its total latency: the browser's round trip stands in for it, and says so.
  function resultFromHeaders(headers, r, roundTripMs) {
    const timing = {};
    for (const part of (headers.get("Server-Timing") || "").split(",")) {
      const match = part.trim().match(/^(\w+);dur=([\d.]+)/);
      if (match) timing[match[1]] = Number(match[2]);
    }
    const count = (name) => (headers.has(name) ? Number(headers.get(name)) : null);
    return {
      model: headers.get("X-Tome-Model") || "",
      r: count("X-Tome-R") ?? r,
      predictions: null,
      tokens: { input: count("X-Tome-Tokens-Input"), output: count("X-Tome-Tokens-Output") },
      batch_size: count("X-Tome-Batch-Size"),
      timing_ms: { ...timing, total: roundTripMs },
      totalFromBrowser: true,
    };
  }

  // ---------- rendering ----------

  function formatNumber(value, digits = 1) {
    return Number(value).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
  }

  function formatGmacs(value) {
    return value >= 10 ? value.toFixed(1) : value.toPrecision(2);
  }

  function formatScore(score) {
    const percent = score * 100;
    if (percent >= 10) return `${percent.toFixed(1)}%`;
    return `${percent.toPrecision(2)}%`;
  }

  function renderResult(result, mergeBlob, r, file, auto = false) {
    const name = file.name || "the image";
    ui.results.classList.remove("stale");
    ui.results.dataset.r = String(result.r ?? r);
    ui.results.dataset.rAuto = auto ? "1" : "0";
    if (auto) showR(r);
    ui.results.dataset.model = String(result.model ?? "");

    if (state.mergeUrl) URL.revokeObjectURL(state.mergeUrl);
    state.mergeUrl = URL.createObjectURL(mergeBlob);
    ui.merge.src = state.mergeUrl;
    ui.merge.alt = `Merge map of ${name} at r=${r}: patches merged into the same token share one colour`;
    ui.merge.hidden = false;
    ui.mergePlaceholder.hidden = true;
    const size = currentModel()?.input_size?.slice(-2).join("×");
    ui.mergeCaption.textContent = `Merge map at r=${r} on the ${size ? `${size} ` : ""}model input: ` +
      "patches merged into one token share a colour";

    const tokens = result.tokens || {};
    ui.tokens.textContent = `${tokens.input ?? "?"} → ${tokens.output ?? "?"}`;
    const timing = result.timing_ms || {};
    ui.inferenceMs.textContent = timing.inference != null ? `${formatNumber(timing.inference)} ms` : "–";
    ui.totalMs.textContent = timing.total != null ? `${formatNumber(timing.total)} ms` : "–";
    const queued = timing.queue != null ? `of which queued ${formatNumber(timing.queue)} ms` : "";
    ui.queueMs.textContent = [result.totalFromBrowser ? "round trip seen by the browser" : "", queued]
      .filter(Boolean)
      .join("; ");
    ui.batch.textContent = result.batch_size ? `batch of ${result.batch_size}` : "";

    if (result.predictions === null) {
      ui.predictions.replaceChildren(emptyItem("No predictions: this model has no classifier head."));
    } else if (Array.isArray(result.predictions) && result.predictions.length) {
      ui.predictions.replaceChildren(...result.predictions.map(predictionItem));
    } else {
      ui.predictions.replaceChildren(emptyItem("The server returned no predictions."));
    }
    const took = timing.total != null ? `, ${formatNumber(timing.total)} ms in total` : "";
    const how = auto ? " (chosen by the server)" : "";
    setStatus(`${name}: ${tokens.input ?? "?"} → ${tokens.output ?? "?"} tokens at r=${r}${how}${took}.`);
  }

  function renderEmbedding(r, toZero, nearest, file) {
    ui.embedCosine.textContent = toZero.toFixed(4);
    ui.embedCosine.dataset.cosine = String(toZero);
    ui.embedCosine.dataset.r = String(r);
    ui.embedNote.textContent = r === 0
      ? "r=0: the embedding itself, nothing merged"
      : `cosine similarity of the embedding at r=${r} to the same image's at r=0`;
    ui.nearest.replaceChildren(...nearest.map(neighbourItem));
    const top = nearest[0];
    setStatus(`${file.name || "the image"} at r=${r}: cosine ${toZero.toFixed(4)} to r=0; most similar sample ` +
      `${top ? `${top.name} (${top.cosine.toFixed(4)})` : "none"}.`);
  }

  function neighbourItem(sample) {
    const item = document.createElement("li");
    item.className = "neighbour";
    item.dataset.name = sample.name;
    item.dataset.cosine = String(sample.cosine);
    const thumb = document.createElement("img");
    thumb.src = sample.src;
    thumb.alt = sample.alt;
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = sample.name;
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = sample.cosine.toFixed(4);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, sample.cosine)) * 100}%`;
    bar.append(fill);
    item.append(thumb, label, value, bar);
    return item;
  }

  function predictionItem(prediction) {
    const score = Number(prediction.score);
    const item = document.createElement("li");
    item.className = "prediction";
    item.dataset.index = String(prediction.index);
    item.dataset.score = String(prediction.score);

    const label = document.createElement("span");
    label.className = "label";
    label.textContent = prediction.label ?? `class ${prediction.index}`;
    const value = document.createElement("span");
    value.className = "score";
    value.textContent = formatScore(score);
    const bar = document.createElement("span");
    bar.className = "bar";
    bar.setAttribute("aria-hidden", "true");
    const fill = document.createElement("span");
    fill.style.width = `${Math.max(0, Math.min(1, score)) * 100}%`;
    bar.append(fill);
    item.append(label, value, bar);
    return item;
  }

  function emptyItem(text) {
    const item = document.createElement("li");
    item.className = "empty";
    item.textContent = text;
    return item;
  }

  function clearResults() {
    ui.merge.hidden = true;
    ui.merge.removeAttribute("src");
    ui.merge.alt = "Merge map: not computed yet";
    ui.mergePlaceholder.hidden = false;
    if (state.mergeUrl) URL.revokeObjectURL(state.mergeUrl);
    state.mergeUrl = "";
    for (const el of [ui.tokens, ui.inferenceMs, ui.totalMs]) el.textContent = "–";
    ui.queueMs.textContent = "";
    ui.batch.textContent = "";
    ui.predictions.replaceChildren(emptyItem("No predictions yet."));
    ui.embedCosine.textContent = "–";
    delete ui.embedCosine.dataset.cosine;
    delete ui.embedCosine.dataset.r;
    ui.nearest.replaceChildren(emptyItem("No embedding yet."));
    delete ui.results.dataset.r;
    delete ui.results.dataset.rAuto;
    ui.results.classList.remove("stale");
  }

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function showError(text) {
    ui.error.textContent = text;
    ui.error.hidden = false;
  }

  function clearError() {
    ui.error.hidden = true;
    ui.error.textContent = "";
  }

  // ---------- choosing an image ----------

  function useFile(file, sample = null) {
    if (!file) return;
    state.file = file;
    for (const button of document.querySelectorAll("button.sample")) {
      button.setAttribute("aria-pressed", String(button === sample));
    }
    if (sample) ui.fileInput.value = ""; // the file chooser would otherwise name an older file
    clearResults();
    clearError();
    if (state.originalUrl) URL.revokeObjectURL(state.originalUrl);
    state.originalUrl = URL.createObjectURL(file);
    ui.original.alt = `The chosen image, ${file.name || "unnamed"}`;
    ui.original.src = state.originalUrl;
    ui.original.hidden = false;
    ui.originalPlaceholder.hidden = true;
    scheduleRefresh(0);
  }

  // The browser cannot show some files that the server may still decode (or rejects: the server
  // has the last word and its error is shown); only the preview is dropped here.
  ui.original.addEventListener("error", () => {
    if (!ui.original.getAttribute("src")) return;
    ui.original.hidden = true;
    ui.originalPlaceholder.hidden = false;
    ui.originalPlaceholder.textContent = "This browser cannot preview the file";
  });

  async function sampleFile(button) {
    const src = button.dataset.src;
    const response = await fetch(src);
    if (!response.ok) throw new Error(`${response.status} ${response.statusText}`);
    const blob = await response.blob();
    return new File([blob], src.split("/").pop(), { type: blob.type || "image/jpeg" });
  }

  async function useSample(button) {
    try {
      useFile(await sampleFile(button), button);
    } catch (err) {
      showError(`Could not load the sample image (${err.message}).`);
    }
  }

  function firstFile(dataTransfer) {
    return dataTransfer && dataTransfer.files && dataTransfer.files.length ? dataTransfer.files[0] : null;
  }

  // ---------- wiring ----------

  ui.fileInput.addEventListener("change", () => useFile(ui.fileInput.files[0]));
  for (const button of document.querySelectorAll("button.sample")) {
    button.addEventListener("click", () => useSample(button));
  }

  // Dropping anywhere on the page works; without this the browser would navigate to the file.
  document.addEventListener("dragover", (event) => {
    event.preventDefault();
    ui.dropZone.classList.add("dragging");
  });
  document.addEventListener("dragleave", (event) => {
    if (!event.relatedTarget) ui.dropZone.classList.remove("dragging");
  });
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    ui.dropZone.classList.remove("dragging");
    useFile(firstFile(event.dataTransfer));
  });
  document.addEventListener("paste", (event) => {
    const file = firstFile(event.clipboardData);
    if (file) useFile(file);
  });

  ui.modelSelect.addEventListener("change", () => {
    applyModel({ keepR: true });
    scheduleRefresh(0);
  });
  ui.slider.addEventListener("input", () => {
    ui.rAuto.checked = false; // moving the slider picks a fixed r
    showR();
    scheduleRefresh();
  });
  ui.rAuto.addEventListener("change", () => {
    showR();
    scheduleRefresh(0);
  });

  function currentView() {
    return ui.viewRadios.find((radio) => radio.checked)?.value || "classify";
  }

  function applyView() {
    const view = currentView();
    ui.results.dataset.view = view;
    ui.embed.hidden = view !== "embed";
  }

  for (const radio of ui.viewRadios) {
    radio.addEventListener("change", () => {
      applyView();
      scheduleRefresh(0);
    });
  }
  applyView(); // a reload may keep the radio the user had chosen

  function applyKey() {
    const key = ui.apiKey.value.trim();
    if (key) sessionStorage.setItem(KEY_STORAGE, key);
    else sessionStorage.removeItem(KEY_STORAGE);
    if (state.models.length) scheduleRefresh(0);
    else loadModels();
  }

  ui.apiKey.value = sessionStorage.getItem(KEY_STORAGE) || "";
  ui.apiKey.addEventListener("change", applyKey);
  $("auth-form").addEventListener("submit", (event) => {
    event.preventDefault(); // Enter applies the key; the page never reloads
    applyKey();
  });
  if (ui.apiKey.value) ui.auth.open = true;

  loadModels();
})();
