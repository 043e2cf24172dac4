// The deepseek playground: streams /v1/completions or /v1/chat/completions (Server-Sent Events read with fetch)
// and charts the server's generation metrics, polled from /metrics. No dependencies, nothing fetched from outside.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const POLL_MS = 1000;
  const HISTORY = 60; // points per chart: a minute at one poll a second

  // -- requests ------------------------------------------------------------------------------------------

  function headers(json) {
    const h = json ? { "Content-Type": "application/json" } : {};
    const key = $("api-key").value.trim();
    if (key) h.Authorization = `Bearer ${key}`;
    return h;
  }

  // A failed response as one line: OpenAI-style {"error": {"message": ...}} or the KServe routes' {"error": "..."}.
  async function errorText(res) {
    const body = await res.text();
    let message = body;
    try {
      const err = JSON.parse(body).error;
      message = typeof err === "string" ? err : (err && err.message) || body;
    } catch (_) { /* not JSON: show the body as it is */ }
    return `HTTP ${res.status}: ${message || res.statusText}`;
  }

  function showError(message) { $("error").textContent = message; }

  // -- models --------------------------------------------------------------------------------------------

  let models = [];

  async function loadModels() {
    try {
      const res = await fetch("v1/models", { headers: headers(false), cache: "no-store" });
      if (!res.ok) throw new Error(await errorText(res));
      models = (await res.json()).data || [];
    } catch (e) {
      showError(`cannot list models: ${e.message}`);
      return;
    }
    const select = $("model");
    const previous = select.value;
    select.replaceChildren(...models.map((m) => new Option(m.id, m.id)));
    if (models.some((m) => m.id === previous)) select.value = previous;
    fillVersions();
    select.dataset.loaded = String(models.length);
    showError(models.length ? "" : "the server has no language model to generate with");
  }

  function fillVersions() {
    const model = models.find((m) => m.id === $("model").value);
    const versions = (model && model.versions) || [];
    $("version").replaceChildren(new Option("auto (routing)", ""), ...versions.map((v) => new Option(v, v)));
  }

  // -- generation ----------------------------------------------------------------------------------------

  // The `data:` payloads of an SSE body, one per event (multi-line data joined with "\n").
  async function* sseData(body) {
    const reader = body.pipeThrough(new TextDecoderStream()).getReader();
    let buffer = "";
    let data = [];
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buffer += value;
        let end;
        while ((end = buffer.indexOf("\n")) >= 0) {
          const line = buffer.slice(0, end).replace(/\r$/, "");
          buffer = buffer.slice(end + 1);
          if (line === "") {
            if (data.length) yield data.join("\n");
            data = [];
          } else if (line.startsWith("data:")) {
            data.push(line.slice(5).replace(/^ /, ""));
          } // other fields (event:, id:, retry:) and ":" comments carry nothing we show
        }
      }
      if (data.length) yield data.join("\n");
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  const number = (id) => Number($(id).value);
  let controller = null;

  function setStatus(text) { $("status").textContent = text; }

  function setBusy(busy) {
    $("generate").disabled = busy;
    $("stop").disabled = !busy;
  }

  async function generate() {
    const model = $("model").value;
    if (!model) { showError("no model to generate with"); return; }
    const chat = $("mode").value === "chat";
    const version = $("version").value;
    const request = {
      model: version ? `${model}/${version}` : model,
      max_tokens: number("max-tokens"), temperature: number("temperature"),
      top_p: number("top-p"), top_k: number("top-k"),
      stream: true, stream_options: { include_usage: true },
    };
    if (chat) request.messages = [{ role: "user", content: $("prompt").value }];
    else request.prompt = $("prompt").value;

    const out = $("output");
    out.replaceChildren();
    out.dataset.chunks = "0";
    showError("");
    for (const id of ["finish", "ttft", "tps", "tokens"]) $(id).textContent = "–";
    setStatus("waiting");
    setBusy(true);
    controller = new AbortController();
    const start = performance.now();
    let first = null, last = null, chunks = 0, finished = false;
    const showRate = (tokens) => {
      $("tokens").textContent = String(tokens);
      // decode speed: tokens after the first over the time since the first
      if (tokens > 1 && last > first) $("tps").textContent = `${((tokens - 1) / ((last - first) / 1000)).toFixed(1)} tok/s`;
    };
    try {
      const res = await fetch(chat ? "v1/chat/completions" : "v1/completions", {
        method: "POST", headers: headers(true), body: JSON.stringify(request), signal: controller.signal,
      });
      if (!res.ok) throw new Error(await errorText(res));
      setStatus("streaming");
      for await (const data of sseData(res.body)) {
        if (data === "[DONE]") { finished = true; break; }
        const chunk = JSON.parse(data);
        if (chunk.error) throw new Error(chunk.error.message || JSON.stringify(chunk.error));
        if (chunk.usage) showRate(chunk.usage.completion_tokens);
        const choice = (chunk.choices || [])[0];
        if (!choice) continue;
        const text = chat ? (choice.delta && choice.delta.content) || "" : choice.text || "";
        if (text) {
          last = performance.now();
          if (first === null) {
            first = last;
            $("ttft").textContent = `${(first - start).toFixed(0)} ms`;
          }
          chunks += 1;
          out.append(text);
          out.dataset.chunks = String(chunks);
          out.scrollTop = out.scrollHeight;
          showRate(chunks);
        }
        if (choice.finish_reason) $("finish").textContent = choice.finish_reason;
      }
      if (!finished) throw new Error("the stream ended without [DONE]");
      setStatus("done");
    } catch (e) {
      if (e.name === "AbortError") {
        setStatus("stopped");
      } else {
        showError(e.message);
        setStatus("error");
      }
    } finally {
      controller = null;
      setBusy(false);
    }
  }

  // -- metrics -------------------------------------------------------------------------------------------

  const promNumber = (s) => (s === "+Inf" ? Infinity : s === "-Inf" ? -Infinity : Number(s));

  // Prometheus text exposition -> [{name, labels, value}] (comments, HELP and TYPE lines skipped).
  function parsePrometheus(text) {
    const samples = [];
    for (const line of text.split("\n")) {
      if (!line || line.startsWith("#")) continue;
      const m = /^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)/.exec(line);
      if (!m) continue;
      const labels = {};
      for (const [, key, value] of (m[2] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) {
        labels[key] = value.replace(/\\(.)/g, (_, c) => (c === "n" ? "\n" : c));
      }
      samples.push({ name: m[1], labels, value: promNumber(m[3]) });
    }
    return samples;
  }

  // The generation series of one model (all its versions), summed; kv is the fullest version's cache.
  function snapshot(samples, model) {
    const s = { t: performance.now(), model, requests: 0, tokens: 0, buckets: new Map(), running: 0, maxRunning: 0, kv: null };
    for (const { name, labels, value } of samples) {
      if (model && labels.model !== model) continue;
      switch (name) {
        case "ds_generation_requests_total": s.requests += value; break;
        case "ds_generation_completion_tokens_total": s.tokens += value; break;
        case "ds_generation_e2e_latency_seconds_bucket": {
          const le = promNumber(labels.le);
          s.buckets.set(le, (s.buckets.get(le) || 0) + value);
          break;
        }
        case "ds_generation_running_sequences": s.running += value; break;
        case "ds_generation_max_running_sequences": s.maxRunning += value; break;
        case "ds_generation_kv_cache_utilization": s.kv = Math.max(s.kv || 0, value); break;
        default: break;
      }
    }
    return s;
  }

  // The q-quantile of the requests that finished between two snapshots, interpolated within the bucket the way
  // Prometheus' histogram_quantile does; null when none finished.
  function quantile(q, prev, cur) {
    const les = [...cur.buckets.keys()].sort((a, b) => a - b);
    const counts = les.map((le) => cur.buckets.get(le) - (prev.buckets.get(le) || 0));
    const total = counts[counts.length - 1]; // the +Inf bucket
    if (!(total > 0)) return null;
    const rank = q * total;
    const i = counts.findIndex((c) => c >= rank);
    if (les[i] === Infinity) return i > 0 ? les[i - 1] : null; // past the largest bound: that bound is all we know
    const lower = i > 0 ? les[i - 1] : 0;
    const below = i > 0 ? counts[i - 1] : 0;
    return lower + ((les[i] - lower) * (rank - below)) / (counts[i] - below);
  }

  // A small time-series line chart on a canvas. For tests: data-samples counts the values drawn, data-last and
  // data-max are the latest and the largest value in view.
  function chart(name, format, fixedMax) {
    const canvas = $(`chart-${name}`);
    const label = $(`val-${name}`);
    const points = [];
    let samples = 0;
    function draw() {
      const ratio = window.devicePixelRatio || 1;
      const w = (canvas.width = Math.max(1, canvas.clientWidth * ratio));
      const h = (canvas.height = Math.max(1, canvas.clientHeight * ratio));
      const ctx = canvas.getContext("2d");
      const values = points.filter((v) => v !== null);
      const max = fixedMax || Math.max(...values, 1e-9) * 1.15;
      ctx.strokeStyle = "#eef0f4";
      ctx.lineWidth = ratio;
      for (const f of [0.25, 0.5, 0.75]) {
        ctx.beginPath(); ctx.moveTo(0, h * f); ctx.lineTo(w, h * f); ctx.stroke();
      }
      ctx.strokeStyle = ctx.fillStyle = "#2f6fde";
      ctx.lineWidth = 1.5 * ratio;
      ctx.beginPath();
      const x0 = HISTORY - points.length; // the newest point at the right edge
      const present = (i) => i >= 0 && i < points.length && points[i] !== null;
      points.forEach((v, i) => {
        if (v === null) return; // a gap: nothing to measure in that interval
        const x = (w * (x0 + i)) / (HISTORY - 1);
        const y = h - 2 * ratio - ((h - 4 * ratio) * Math.min(v, max)) / max;
        if (present(i - 1)) ctx.lineTo(x, y); else ctx.moveTo(x, y);
        if (!present(i - 1) && !present(i + 1)) ctx.fillRect(x - 2 * ratio, y - 2 * ratio, 4 * ratio, 4 * ratio);
      });
      ctx.stroke();
    }
    return {
      push(value) {
        const v = value === null || value === undefined || !Number.isFinite(value) ? null : value;
        points.push(v);
        if (points.length > HISTORY) points.shift();
        if (v !== null) canvas.dataset.samples = String(++samples);
        canvas.dataset.last = v === null ? "" : String(v);
        canvas.dataset.max = String(Math.max(0, ...points.filter((p) => p !== null)));
        label.textContent = v === null ? "–" : format(v);
        draw();
      },
    };
  }

  const fixed = (digits) => (v) => v.toFixed(digits);
  const percent = (v) => `${(100 * v).toFixed(0)}%`;
  const charts = {
    rps: chart("rps", fixed(2)),
    p99: chart("p99", fixed(3)),
    tokens: chart("tokens", fixed(1)),
    batch: chart("batch", percent, 1),
    kv: chart("kv", percent, 1),
  };
  let previous = null;

  async function poll() {
    try {
      const res = await fetch("metrics", { cache: "no-store" });
      if (!res.ok) throw new Error(await errorText(res));
      const cur = snapshot(parsePrometheus(await res.text()), $("model").value);
      // rates need two polls of the same model, and no counter reset (a restarted server) in between
      if (previous && previous.model === cur.model && cur.requests >= previous.requests) {
        const dt = (cur.t - previous.t) / 1000;
        charts.rps.push((cur.requests - previous.requests) / dt);
        charts.p99.push(quantile(0.99, previous, cur));
        charts.tokens.push((cur.tokens - previous.tokens) / dt);
      }
      charts.batch.push(cur.maxRunning > 0 ? cur.running / cur.maxRunning : null);
      charts.kv.push(cur.kv);
      previous = cur;
      $("metrics-status").textContent = `updated ${new Date().toLocaleTimeString()}`;
    } catch (e) {
      $("metrics-status").textContent = `metrics unavailable: ${e.message}`;
    }
    setTimeout(poll, POLL_MS);
  }

  // -- wiring --------------------------------------------------------------------------------------------

  $("model").addEventListener("change", fillVersions);
  $("api-key").addEventListener("change", loadModels);
  $("generate").addEventListener("click", generate);
  $("stop").addEventListener("click", () => controller && controller.abort());
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey) && !controller) generate();
  });
  loadModels();
  poll();
})();
