"use strict";
// mlxring's web page: the ring drawn from /cluster/status (polled every second) and a chat box
// that streams from /v1/chat/completions. Plain JS, no build step, no dependencies.

const POLL_MS = 1000;
// Polls that busy shares and tok/s are measured over: remote nodes' busy time arrives with the
// head's probe once a heartbeat, so a span of a few seconds keeps the numbers steady.
const RATE_SAMPLES = 6;
const KEY_STORE = "mlxring.apiKey";
const SVG_NS = "http://www.w3.org/2000/svg";
const $ = (id) => document.getElementById(id);

// ---------------------------------------------------------------------------------------------
// API key: kept in localStorage, sent as a bearer token on every data request

const keyInput = $("api-key");
keyInput.value = localStorage.getItem(KEY_STORE) || "";
keyInput.addEventListener("input", () => localStorage.setItem(KEY_STORE, keyInput.value.trim()));

function authHeaders(extra = {}) {
  const key = keyInput.value.trim();
  return key ? { ...extra, Authorization: `Bearer ${key}` } : extra;
}

async function errorMessage(resp) {
  try {
    const body = await resp.json();
    if (body && body.error && body.error.message) return body.error.message;
  } catch (_) {
    // not JSON: fall through to the status line
  }
  return `HTTP ${resp.status} ${resp.statusText}`;
}

function showBanner(text) {
  const b = $("banner");
  b.textContent = text;
  b.hidden = false;
}

function hideBanner() {
  $("banner").hidden = true;
}

// ---------------------------------------------------------------------------------------------
// Status polling

const samples = []; // {t, tokens, busy: {node: busy_s}} of the last few polls
let last = null; // the last status drawn

async function poll() {
  try {
    const r = await fetch("/cluster/status", { headers: authHeaders(), cache: "no-store" });
    if (r.ok) {
      const st = await r.json();
      hideBanner();
      remember(st);
      last = st;
      draw(st);
    } else if (r.status === 401) {
      showBanner("This cluster needs an API key: enter it at the top right.");
      offline("API key needed");
    } else {
      showBanner(`/cluster/status: ${await errorMessage(r)}`);
      offline(`status ${r.status}`);
    }
  } catch (e) {
    showBanner(`Cannot reach this node (${e.message}); retrying every second.`);
    offline("offline");
  }
  setTimeout(poll, POLL_MS);
}

function remember(st) {
  const busy = {};
  for (const n of st.nodes || []) if (typeof n.busy_s === "number") busy[n.name] = n.busy_s;
  const tokens = st.requests ? st.requests.tokens_generated : null;
  samples.push({ t: performance.now() / 1000, tokens, busy });
  while (samples.length > RATE_SAMPLES) samples.shift();
}

// Rates over the last few polls; the status's own values until there are two polls.
function rates(st) {
  const out = { tps: st.requests ? st.requests.tokens_per_s : null, busy: {} };
  for (const n of st.nodes || []) out.busy[n.name] = n.busy_share;
  if (samples.length < 2) return out;
  const a = samples[0];
  const b = samples[samples.length - 1];
  const dt = b.t - a.t;
  if (dt < 0.5) return out;
  if (typeof a.tokens === "number" && typeof b.tokens === "number" && b.tokens >= a.tokens) {
    out.tps = (b.tokens - a.tokens) / dt;
  }
  for (const name of Object.keys(b.busy)) {
    if (name in a.busy && b.busy[name] >= a.busy[name]) {
      out.busy[name] = Math.min(1, (b.busy[name] - a.busy[name]) / dt);
    }
  }
  return out;
}

function offline(why) {
  const s = $("summary");
  s.replaceChildren(pill("down", why));
  if (last) s.append(`  (last seen: ${last.nodes.length} nodes)`);
  $("ring").classList.add("stale");
}

// ---------------------------------------------------------------------------------------------
// Formatting

function size(bytes) {
  if (typeof bytes !== "number") return "?";
  const gb = 1 << 30;
  return bytes >= gb ? `${(bytes / gb).toFixed(1)} GB` : `${(bytes / (1 << 20)).toFixed(1)} MB`;
}

// A node's prompt cache: its bytes and how many prompts it keeps ("12.0 MB (3)").
function cacheText(node) {
  const bytes = node.prompt_cache_bytes;
  if (typeof bytes !== "number") return "–";
  const n = node.prompt_cache_entries;
  return `${size(bytes)} (${typeof n === "number" ? n : "?"})`;
}

function pct(x) {
  return typeof x === "number" ? `${Math.round(x * 100)}%` : "–";
}

function layersText(layers) {
  return Array.isArray(layers) ? `layers [${layers[0]}, ${layers[1]})` : "no layers";
}

function pill(cls, text) {
  const s = document.createElement("span");
  s.className = `pill ${cls}`;
  s.textContent = text;
  return s;
}

function bold(text) {
  const b = document.createElement("b");
  b.textContent = text;
  return b;
}

// ---------------------------------------------------------------------------------------------
// Drawing: a summary line and the ring as an SVG

function draw(st) {
  const r = rates(st);
  const ring = st.ring || {};
  const req = st.requests;
  const s = $("summary");
  s.replaceChildren(
    "cluster ", bold(st.cluster), " · model ", bold(st.model), " · head ", bold(st.head), " · ",
    pill(ring.ok ? "up" : "down", ring.ok ? "ring up" : "ring down"),
  );
  if (req) {
    s.append(
      ` · ${typeof r.tps === "number" ? r.tps.toFixed(1) : "–"} tok/s`,
      ` · ${req.generating} generating, ${req.waiting} waiting`,
    );
  }
  s.title = ring.ok ? "" : ring.reason || "";
  $("ring").classList.remove("stale");
  drawRing(st, r);
}

function el(name, attrs = {}, parent = null) {
  const e = document.createElementNS(SVG_NS, name);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, String(v));
  if (parent) parent.appendChild(e);
  return e;
}

function text(parent, x, y, content, cls = "") {
  const t = el("text", { x, y, class: cls }, parent);
  t.textContent = content;
  return t;
}

const C = 320; // the diagram's centre (viewBox 640 x 640)
const CARD_H = 128;

// Where a ray from a card's centre along (dx, dy) leaves the card: the arc starts there.
function exitDistance(w, h, dx, dy) {
  const tx = Math.abs(dx) > 1e-9 ? w / 2 / Math.abs(dx) : Infinity;
  const ty = Math.abs(dy) > 1e-9 ? h / 2 / Math.abs(dy) : Infinity;
  return Math.min(tx, ty);
}

function drawRing(st, r) {
  const svg = $("ring");
  svg.replaceChildren();
  const defs = el("defs", {}, svg);
  const marker = el("marker", {
    id: "arrow", viewBox: "0 0 10 10", refX: 8, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse",
  }, defs);
  el("path", { d: "M0,0 L10,5 L0,10 z" }, marker);

  const nodes = st.nodes || [];
  const n = nodes.length;
  const R = n <= 1 ? 0 : 215;
  const chord = n > 1 ? 2 * R * Math.sin(Math.PI / n) : 400;
  const w = Math.max(120, Math.min(190, chord * 0.8));
  const angle = (i) => -Math.PI / 2 + (i * 2 * Math.PI) / Math.max(1, n);
  const pos = (i) => [C + R * Math.cos(angle(i)), C + R * Math.sin(angle(i))];

  // Arcs first (cards cover their ends): each ring member to the next, the last one back to
  // the head (dashed: only the sampled token travels there).
  const ringOk = !!(st.ring && st.ring.ok);
  const members = nodes.map((m, i) => [m, i]).filter(([m]) => m.member);
  const arcs = el("g", { class: "arcs" }, svg);
  if (members.length === 1 && n >= 1) {
    const [, i] = members[0];
    const [x, y] = pos(i);
    el("path", {
      d: `M ${x + w / 2} ${y} C ${x + w / 2 + 110} ${y}, ${x + 60} ${y - CARD_H / 2 - 110}, ${x + 20} ${y - CARD_H / 2}`,
      class: `arc back${ringOk ? "" : " off"}`, "marker-end": "url(#arrow)",
    }, arcs);
  }
  for (let k = 0; members.length > 1 && k < members.length; k++) {
    const i = members[k][1];
    const j = members[(k + 1) % members.length][1];
    let a0 = angle(i);
    let a1 = angle(j);
    if (a1 <= a0) a1 += 2 * Math.PI;
    const d0 = (exitDistance(w, CARD_H, -Math.sin(a0), Math.cos(a0)) + 6) / R;
    const d1 = (exitDistance(w, CARD_H, -Math.sin(a1), Math.cos(a1)) + 10) / R;
    const s = a0 + d0;
    const e = a1 - d1;
    if (e <= s) continue;
    const large = e - s > Math.PI ? 1 : 0;
    const back = k === members.length - 1;
    el("path", {
      d: `M ${C + R * Math.cos(s)} ${C + R * Math.sin(s)} A ${R} ${R} 0 ${large} 1 ${C + R * Math.cos(e)} ${C + R * Math.sin(e)}`,
      class: `arc${back ? " back" : ""}${ringOk ? "" : " off"}`,
      "marker-end": "url(#arrow)",
    }, arcs);
  }

  // The centre: the ring's state and throughput.
  const center = el("g", { class: "center", "text-anchor": "middle" }, svg);
  if (n > 1) {
    const req = st.requests;
    text(center, C, C - 22, ringOk ? "ring up" : "ring down", "big");
    text(center, C, C + 4, typeof r.tps === "number" ? `${r.tps.toFixed(1)} tok/s` : "– tok/s");
    const ring = st.ring || {};
    const hop = typeof ring.hop_ms === "number" ? `hop ${ring.hop_ms.toFixed(2)} ms` : "";
    const busyHop = typeof ring.decode_hop_ms === "number" ? ` (decoding ${ring.decode_hop_ms.toFixed(2)})` : "";
    text(center, C, C + 26, hop + busyHop);
    const up = nodes.filter((m) => m.up).length;
    text(center, C, C + 48, `${up} of ${n} nodes up${req ? ` · ${req.generating} in flight` : ""}`);
  }

  nodes.forEach((node, i) => drawNode(svg, node, pos(i), w, r.busy[node.name]));
}

function drawNode(svg, node, [x, y], w, busy) {
  const state = !node.up ? "down" : node.member ? "up" : "idle";
  const g = el("g", {
    class: `node ${state}`, "data-name": node.name, "data-up": node.up,
    "data-layers": Array.isArray(node.layers) ? node.layers.join(",") : "",
  }, svg);
  const card = el("g", { class: "card", transform: `translate(${x - w / 2} ${y - CARD_H / 2})` }, g);
  el("rect", { class: "box", width: w, height: CARD_H, rx: 10 }, card);
  text(card, 12, 24, node.name, "name");
  if (node.head) {
    const badge = el("g", { class: "head-badge", transform: `translate(${w - 52} 10)` }, card);
    el("rect", { width: 42, height: 18, rx: 9 }, badge);
    text(badge, 21, 13, "HEAD").setAttribute("text-anchor", "middle");
  }
  text(card, 12, 44, state === "down" ? `${layersText(node.layers)} · down` : layersText(node.layers), "layers");

  const bw = w - 24;
  const active = node.memory_active_bytes;
  const total = node.memory_total_bytes;
  text(card, 12, 64, `memory ${size(active)} / ${size(total)}`, "small");
  el("rect", { class: "track", x: 12, y: 69, width: bw, height: 6, rx: 3 }, card);
  const memFrac = typeof active === "number" && total ? Math.min(1, active / total) : 0;
  el("rect", { class: "mem", x: 12, y: 69, width: Math.max(memFrac > 0 ? 2 : 0, bw * memFrac), height: 6, rx: 3 }, card);

  // Under its memory, the part of it kept for prompts that start alike (the prompt cache).
  text(card, 12, 90, `prompt cache ${cacheText(node)}`, "small cache");

  const kv = typeof node.kv_requests === "number" ? ` · ${node.kv_requests} in KV` : "";
  text(card, 12, 108, `busy ${pct(busy)}${kv}`, "small");
  el("rect", { class: "track", x: 12, y: 113, width: bw, height: 6, rx: 3 }, card);
  const b = typeof busy === "number" ? Math.max(0, Math.min(1, busy)) : 0;
  el("rect", { class: "busy", x: 12, y: 113, width: Math.max(b > 0 ? 2 : 0, bw * b), height: 6, rx: 3 }, card);
  const tip = el("title", {}, g);
  tip.textContent = `${node.name} at ${node.address}:${node.ring_port} (API port ${node.api_port})`;
}

// ---------------------------------------------------------------------------------------------
// Chat: streamed from /v1/chat/completions, parsed from the response body's ReadableStream

const messagesEl = $("messages");
const promptEl = $("prompt");
let conversation = [];
let controller = null;

function emptyHint() {
  const p = document.createElement("p");
  p.className = "empty";
  p.textContent = "Messages stream here token by token, from the ring through this node.";
  messagesEl.replaceChildren(p);
}

function addMessage(role, content) {
  const hint = messagesEl.querySelector(".empty");
  if (hint) hint.remove();
  const div = document.createElement("div");
  div.className = `msg ${role}`;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = content;
  div.appendChild(body);
  messagesEl.appendChild(div);
  messagesEl.scrollTop = messagesEl.scrollHeight;
  return div;
}

function addMeta(div, content) {
  const m = document.createElement("span");
  m.className = "meta";
  m.textContent = content;
  div.appendChild(m);
}

// Calls onEvent with each SSE event's parsed JSON until [DONE] or the end of the body.
async function readSSE(body, onEvent) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  try {
    for (;;) {
      const { value, done } = await reader.read();
      // JSON escapes control characters, so dropping CR turns CRLF framing into LF framing.
      buf += decoder.decode(value || new Uint8Array(), { stream: !done }).replace(/\r/g, "");
      let cut;
      while ((cut = buf.indexOf("\n\n")) >= 0) {
        const event = buf.slice(0, cut);
        buf = buf.slice(cut + 2);
        const data = event.split("\n").filter((l) => l.startsWith("data:"))
          .map((l) => l.slice(5).replace(/^ /, "")).join("\n");
        if (!data) continue;
        if (data === "[DONE]") return;
        onEvent(JSON.parse(data));
      }
      if (done) return;
    }
  } finally {
    reader.cancel().catch(() => {});
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").hidden = !busy;
}

async function send() {
  const content = promptEl.value.trim();
  if (!content || controller) return;
  promptEl.value = "";
  conversation.push({ role: "user", content });
  addMessage("user", content);
  const div = addMessage("assistant", "");
  const out = div.querySelector(".content");
  div.classList.add("streaming");
  div.dataset.chunks = "0";
  div.dataset.done = "false";
  const maxTokens = parseInt($("max-tokens").value, 10);
  const temperature = parseFloat($("temperature").value);
  const request = { messages: conversation, stream: true, stream_options: { include_usage: true } };
  if (maxTokens > 0) request.max_tokens = maxTokens;
  if (temperature >= 0) request.temperature = temperature;
  controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null;
  let reply = "";
  let usage = null;
  let finish = null;
  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: authHeaders({ "Content-Type": "application/json" }),
      body: JSON.stringify(request),
      signal: controller.signal,
    });
    if (!resp.ok) throw new Error(await errorMessage(resp));
    await readSSE(resp.body, (obj) => {
      if (obj.error) throw new Error(obj.error.message || "the server reported an error");
      const choice = obj.choices && obj.choices[0];
      const delta = choice && choice.delta && choice.delta.content;
      if (delta) {
        if (first === null) first = performance.now();
        reply += delta;
        out.textContent = reply;
        div.dataset.chunks = String(Number(div.dataset.chunks) + 1);
        messagesEl.scrollTop = messagesEl.scrollHeight;
      }
      if (choice && choice.finish_reason) finish = choice.finish_reason;
      if (obj.usage) usage = obj.usage;
    });
    conversation.push({ role: "assistant", content: reply });
    const secs = (performance.now() - (first ?? t0)) / 1000;
    const n = usage ? usage.completion_tokens : null;
    const parts = [];
    if (n !== null) parts.push(`${n} tokens`);
    if (n !== null && n > 1 && secs > 0) parts.push(`${((n - 1) / secs).toFixed(1)} tok/s`);
    if (first !== null) parts.push(`first token ${Math.round(first - t0)} ms`);
    if (finish) parts.push(`finish: ${finish}`);
    addMeta(div, parts.join(" · "));
  } catch (e) {
    if (e.name === "AbortError") {
      addMeta(div, "stopped");
      if (reply) conversation.push({ role: "assistant", content: reply });
      else conversation.pop();
    } else {
      if (reply) conversation.push({ role: "assistant", content: reply });
      else {
        conversation.pop(); // a request that produced nothing is not part of the conversation
        div.remove();
      }
      addMessage("error", e.message);
    }
  } finally {
    div.classList.remove("streaming");
    div.dataset.done = "true";
    controller = null;
    setBusy(false);
  }
}

$("chat-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  send();
});
promptEl.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    send();
  }
});
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation = [];
  emptyHint();
});

emptyHint();
poll();
