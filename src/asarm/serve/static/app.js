// The playground: POST /v1/infill with stream=true and draw each round's tokens as they arrive.
"use strict";

const $ = (id) => document.getElementById(id);
const roundColour = (r) => `hsl(${(r * 47) % 360}, 70%, 82%)`;

function escapeMarkup(s) {
  return s.replace(/\\/g, "\\\\").replace(/\[/g, "\\[");
}

function requestText() {
  if (document.querySelector("input[name=mode]:checked").value === "holes") return $("text").value;
  const n = $("hole-length").value.trim();
  return escapeMarkup($("prefix").value) + (n ? `[MASK:${n}]` : "[MASK]") + escapeMarkup($("suffix").value);
}

function numberOrNull(id, parse) {
  const v = $(id).value.trim();
  return v === "" ? null : parse(v);
}

function requestBody() {
  const body = {
    text: requestText(), stream: true,
    method: $("method").value, draft: $("draft").value, k: parseInt($("k").value, 10),
    temperature: parseFloat($("temperature").value), order: $("order").value,
    bonus: $("bonus").checked, one_pass: $("one_pass").checked, adaptive_k: $("adaptive_k").checked,
  };
  const optional = { top_p: numberOrNull("top_p", parseFloat), top_k: numberOrNull("top_k", (v) => parseInt(v, 10)),
                     seed: numberOrNull("seed", (v) => parseInt(v, 10)) };
  for (const [key, value] of Object.entries(optional)) if (value !== null) body[key] = value;
  return body;
}

// --- drawing ---------------------------------------------------------------------------------
let spans = [];

function drawStart(choice) {
  const box = $("tokens");
  box.textContent = "";
  spans = choice.tokens.map((t) => {
    const span = document.createElement("span");
    span.className = t.hidden ? "tok hole" : "tok";
    span.textContent = t.hidden ? "\u2581" : t.text;
    box.appendChild(span);
    return span;
  });
  showStats({ "hole lengths": holeText(choice.holes) });
}

function drawRound(ev) {
  ev.positions.forEach((pos, i) => {
    const span = spans[pos];
    span.textContent = ev.texts[i];
    span.className = "tok filled" + (pos === ev.resampled ? " resampled" : "");
    span.style.background = roundColour(ev.round);
    span.title = `round ${ev.round}` + (pos === ev.resampled ? ", resampled after a rejected draft" : "");
    span.dataset.round = ev.round;
  });
  $("status").textContent = `round ${ev.round}, ${ev.nfe} passes`;
}

function holeText(holes) {
  return holes.map((h) => h.length + (h.probability === null ? "" : ` (p=${h.probability.toFixed(3)})`)).join(", ");
}

function showStats(values) {
  const dl = $("stats");
  dl.textContent = "";
  for (const [k, v] of Object.entries(values)) {
    const dt = document.createElement("dt"), dd = document.createElement("dd");
    dt.textContent = k; dd.textContent = v;
    dd.id = "stat-" + k.replace(/[^a-z]+/gi, "-");
    dl.append(dt, dd);
  }
}

function drawDone(ev) {
  const s = ev.asarm;
  showStats({
    "NFE": s.nfe, "rounds": s.rounds, "tokens": s.tokens, "tokens per pass": s.tokens_per_pass.toFixed(2),
    "tokens per round": s.tokens_per_round.join(" "), "hole lengths": holeText(s.holes),
    "resampled": spans.filter((x) => x.classList.contains("resampled")).length, "time": `${s.elapsed_ms} ms`,
  });
  $("result").textContent = ev.text;
  $("result").dataset.done = "1";
}

// --- the request -------------------------------------------------------------------------------
function showError(message) {
  $("error").hidden = false;
  $("error").textContent = message;
}

function handle(ev) {
  if (ev.error) throw new Error(ev.error.message);
  if (ev.object === "infill.start") drawStart(ev.choices[0]);
  else if (ev.object === "infill.round" && ev.index === 0) drawRound(ev);
  else if (ev.object === "infill.done" && ev.index === 0) drawDone(ev);
}

async function readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const line = buffer.slice(0, cut).trim();
      buffer = buffer.slice(cut + 2);
      if (!line.startsWith("data: ")) continue;
      const data = line.slice(6);
      if (data === "[DONE]") return;
      handle(JSON.parse(data));
    }
  }
}

async function run() {
  $("run").disabled = true;
  $("error").hidden = true;
  $("result").textContent = "";
  delete $("result").dataset.done;
  $("status").textContent = "waiting for the server…";
  const headers = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) headers["Authorization"] = "Bearer " + key;
  localStorage.setItem("asarm-api-key", key);
  try {
    const response = await fetch("/v1/infill", { method: "POST", headers, body: JSON.stringify(requestBody()) });
    if (!response.ok) {
      const err = await response.json().catch(() => ({}));
      throw new Error((err.error && err.error.message) || `HTTP ${response.status}`);
    }
    await readEvents(response);
    $("status").textContent = "done";
  } catch (e) {
    showError(e.message);
    $("status").textContent = "";
  } finally {
    $("run").disabled = false;
  }
}

function setMode() {
  const holes = document.querySelector("input[name=mode]:checked").value === "holes";
  $("holes-mode").hidden = !holes;
  $("fim-mode").hidden = holes;
}

async function loadModel() {
  const key = $("api-key").value.trim();
  const headers = key ? { Authorization: "Bearer " + key } : {};
  try {
    const r = await fetch("/v1/models", { headers });
    if (r.ok) $("model").textContent = (await r.json()).data.map((m) => m.id).join(", ");
  } catch (e) { /* the page works without it */ }
}

$("api-key").value = localStorage.getItem("asarm-api-key") || "";
document.querySelectorAll("input[name=mode]").forEach((r) => r.addEventListener("change", setMode));
$("run").addEventListener("click", run);
loadModel();
