// yun's chat page. It talks only to the public OpenAI-compatible API (GET v1/models, POST
// v1/chat/completions, streamed). Model output and stored conversations are untrusted
// text: they reach the page only as text nodes (textContent, append(string)), never as
// HTML. There is no innerHTML in this file.
"use strict";

const CHAT_KEY = "yun.chat";          // localStorage: the conversation
const SETTINGS_KEY = "yun.settings";  // localStorage: system prompt and sampling settings
const API_KEY = "yun.apiKey";         // sessionStorage: the API key (never in a URL)
const NUMBERS = {temperature: parseFloat, top_p: parseFloat, max_tokens: parseInt,
                 seed: parseInt};

const $ = (id) => document.getElementById(id);

// A message: {role: "user" | "assistant" | "error", content, reasoning?, stats?,
// finish?, stopped?, pending?}. "error" messages are shown, never sent to the model.
const state = {
  messages: loadMessages(),
  settings: {system: "", temperature: "", top_p: "", max_tokens: "1024", seed: "",
             ...loadJson(localStorage, SETTINGS_KEY, {})},
  model: null,
  controller: null,  // the AbortController of the reply being streamed
};

// ---- storage ---------------------------------------------------------------------------
function loadJson(store, key, fallback) {
  try {
    const value = JSON.parse(store.getItem(key));
    return value && typeof value === "object" ? value : fallback;
  } catch {
    return fallback;
  }
}

function loadMessages() {
  const saved = loadJson(localStorage, CHAT_KEY, {}).messages;
  const messages = (Array.isArray(saved) ? saved : []).filter(
    (m) => m && ["user", "assistant", "error"].includes(m.role) &&
           typeof m.content === "string");
  for (const m of messages) {
    if (m.pending) {  // the page was closed while this reply streamed
      delete m.pending;
      m.stopped = true;
    }
  }
  return messages;
}

function saveChat() {
  try {
    localStorage.setItem(CHAT_KEY, JSON.stringify({messages: state.messages}));
  } catch (e) {  // storage full or disabled: the chat still works, unsaved
    console.warn("yun: could not save the conversation:", e);
  }
}

// ---- the API ---------------------------------------------------------------------------
class ApiError extends Error {
  constructor(status, message) {
    super(status ? `Error ${status}: ${message}` : `Error: ${message}`);
    this.status = status;
  }
}

function apiFetch(path, options = {}) {
  const headers = {"Content-Type": "application/json"};
  const key = sessionStorage.getItem(API_KEY);
  if (key) headers.Authorization = `Bearer ${key}`;
  return fetch(path, {...options, headers});
}

async function apiError(res) {
  let message = res.statusText || "request failed";
  try {
    message = (await res.json()).error.message || message;
  } catch { /* not the OpenAI error object: keep the status text */ }
  if (res.status === 401) askKey(message);
  return new ApiError(res.status, message);
}

async function loadModel() {
  let res;
  try {
    res = await apiFetch("v1/models");
  } catch {
    $("model").textContent = "server unreachable";
    return;
  }
  if (res.status === 401) {
    askKey(sessionStorage.getItem(API_KEY) ? "That key was refused." : "");
    return;
  }
  if (!res.ok) {
    $("model").textContent = (await apiError(res)).message;
    return;
  }
  const models = (await res.json()).data || [];
  state.model = models.length ? String(models[0].id) : null;
  $("model").textContent = state.model || "no model";
}

function askKey(message) {
  $("key-error").textContent = message || "";
  $("key-error").hidden = !message;
  if (!$("key-dialog").open) $("key-dialog").showModal();
}

// Server-Sent Events of a fetch body: each `data:` payload parsed as JSON, until [DONE].
async function* sseEvents(body) {
  const reader = body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const {value, done} = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, {stream: true}).replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trim()).join("\n");
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function requestBody(history) {
  const s = state.settings;
  const messages = s.system.trim() ? [{role: "system", content: s.system}] : [];
  for (const m of history) {
    if ((m.role === "user" || m.role === "assistant") && m.content) {
      messages.push({role: m.role, content: m.content});
    }
  }
  const body = {messages, stream: true, stream_options: {include_usage: true}};
  if (state.model) body.model = state.model;
  for (const [name, parse] of Object.entries(NUMBERS)) {
    const value = parse(s[name]);
    if (Number.isFinite(value)) body[name] = value;
  }
  return body;
}

// ---- a conversation turn ---------------------------------------------------------------
async function send(text) {
  const history = state.messages.slice();
  history.push({role: "user", content: text});
  const reply = {role: "assistant", content: "", reasoning: "", pending: true};
  addMessage({role: "user", content: text});
  const view = addMessage(reply);
  const controller = state.controller = new AbortController();
  setBusy(true);
  const t0 = performance.now();
  let first = null, answerStart = null, usage = null, failed = false;
  try {
    const res = await apiFetch("v1/chat/completions", {
      method: "POST", body: JSON.stringify(requestBody(history)), signal: controller.signal});
    if (!res.ok) throw await apiError(res);
    for await (const event of sseEvents(res.body)) {
      if (event.error) throw new ApiError(null, event.error.message);  // after the 200
      if (event.usage) usage = event.usage;
      const choice = (event.choices || [])[0];
      if (!choice) continue;
      const delta = choice.delta || {};
      const reasoning = delta.reasoning_content ?? delta.reasoning;
      if (reasoning) reply.reasoning += reasoning;
      if (delta.content) {
        reply.content += delta.content;
        answerStart ??= performance.now();
      }
      if (delta.content || reasoning) first ??= performance.now();
      if (choice.finish_reason) reply.finish = choice.finish_reason;
      scheduleRender(view, reply);
    }
  } catch (e) {
    if (e.name === "AbortError") {
      reply.stopped = true;
    } else {
      failed = true;
      const message = e instanceof ApiError ? e.message : e instanceof TypeError
        ? `Could not reach the server (${e.message}).` : `Error: ${e.message || e}`;
      addMessage({role: "error", content: message});
    }
  } finally {
    reply.stats = timing(usage, t0, first, performance.now());
    if (reply.reasoning && answerStart !== null) {
      reply.thought = (answerStart - t0) / 1000;
    }
    delete reply.pending;
    if (failed && !reply.content && !reply.reasoning) removeMessage(reply, view);
    if (state.controller === controller) {
      state.controller = null;
      setBusy(false);
    }
    render(view, reply);
    saveChat();
  }
}

function timing(usage, t0, first, end) {
  const stats = {};
  if (first !== null) stats.ttft = (first - t0) / 1000;
  if (usage) {
    stats.tokens = usage.completion_tokens;
    // Decode speed: the tokens after the first over the time after the first (unless
    // the reply came in one burst, e.g. through a buffering proxy: then it means nothing).
    if (first !== null && end - first >= 20 && stats.tokens > 1) {
      stats.tps = (stats.tokens - 1) / ((end - first) / 1000);
    }
  }
  return stats;
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
}

// ---- rendering -------------------------------------------------------------------------
function h(tag, className, content) {
  const el = document.createElement(tag);
  if (className) el.className = className;
  if (Array.isArray(content)) el.append(...content);
  else if (content !== undefined) el.textContent = content;
  return el;
}

function addMessage(message) {
  state.messages.push(message);
  const view = messageView(message);
  const list = $("messages");
  const atBottom = nearBottom(list);
  list.append(view.el);
  if (atBottom || message.role === "user") list.scrollTop = list.scrollHeight;
  saveChat();
  return view;
}

function removeMessage(message, view) {
  const at = state.messages.indexOf(message);
  if (at >= 0) state.messages.splice(at, 1);
  view.el.remove();
}

function messageView(message) {
  const view = {el: h("div", `msg ${message.role}`), body: h("div", "body"),
                meta: h("div", "meta")};
  if (message.role === "assistant") {
    view.thinking = h("details", "thinking", [h("summary"), h("div", "content")]);
    view.thinking.open = !!message.pending;
    view.el.append(view.thinking);
  }
  view.meta.title = "TTFT: time to first token. tok/s: decode speed after the first token.";
  view.el.append(view.body, view.meta);
  render(view, message);
  return view;
}

function render(view, m) {
  if (m.role === "assistant") {
    view.body.replaceChildren(...markdown(m.content));
    view.thinking.hidden = !m.reasoning;
    view.thinking.lastChild.replaceChildren(...markdown(m.reasoning || ""));
    view.thinking.firstChild.textContent = m.thought ? `Thought for ${m.thought.toFixed(1)} s`
      : m.pending && !m.content ? "Thinking…" : "Thinking";
  } else {
    view.body.textContent = m.content;  // what the user typed, or an error, as typed
  }
  view.meta.textContent = metaText(m);
}

function metaText(m) {
  const s = m.stats || {}, parts = [];
  if (s.tokens !== undefined) parts.push(`${s.tokens} tokens`);
  if (s.ttft !== undefined) parts.push(`TTFT ${s.ttft.toFixed(2)} s`);
  if (s.tps !== undefined) parts.push(`${s.tps.toFixed(1)} tok/s`);
  if (m.finish === "length") parts.push("max tokens reached");
  if (m.stopped) parts.push("stopped");
  return parts.join(" · ");
}

let pendingRender = null, renderCost = 0;

// A streaming reply is rendered (markdown and all) and saved once per frame at most, and,
// as it grows, after a pause of a few times what its last render cost: a long reply from a
// fast server would otherwise take every frame, and the page (its Stop button) would stop
// answering.
function scheduleRender(view, message) {
  if (pendingRender !== null) return;
  pendingRender = setTimeout(() => requestAnimationFrame(() => {
    const start = performance.now();
    const list = $("messages");
    const atBottom = nearBottom(list);
    render(view, message);
    if (atBottom) list.scrollTop = list.scrollHeight;
    saveChat();
    renderCost = performance.now() - start;
    pendingRender = null;
  }), Math.min(1000, 3 * renderCost));
}

function nearBottom(el) {
  return el.scrollHeight - el.scrollTop - el.clientHeight < 40;
}

function renderAll() {
  $("messages").replaceChildren(...state.messages.map((m) => messageView(m).el));
  $("messages").scrollTop = $("messages").scrollHeight;
}

// ---- Markdown, the safe subset ---------------------------------------------------------
// Blocks: code fences, headings, lists, quotes, rules, paragraphs. Inline: code, bold,
// italic, and links to http(s) URLs only. Everything becomes elements and text nodes.
const FENCE = /^\s*(`{3,}|~{3,})\s*([\w+#.-]*)/;
const HEADING = /^(#{1,6})\s+(.*)$/;
const LIST_ITEM = /^\s*([-*+]|\d{1,9}[.)])\s+(.*)$/;
const QUOTE = /^\s*>\s?(.*)$/;
const RULE = /^\s*([-*_])(\s*\1){2,}\s*$/;
const INLINE = new RegExp([
  /`([^`\n]+)`/.source,                                // 1: code
  /\*\*(?=\S)([^*]*?\S)\*\*/.source,                    // 2: bold
  /\*(?=[^\s*])([^*]*?[^\s*])\*/.source,               // 3: italic
  /(?<![\w])_(?=[^\s_])([^_]*?[^\s_])_(?![\w])/.source,  // 4: italic
  /\[([^\]\n]+)\]\((https?:\/\/[^\s()]+)\)/.source,     // 5, 6: link
].join("|"), "g");

function startsBlock(line) {
  return FENCE.test(line) || HEADING.test(line) || LIST_ITEM.test(line) ||
         QUOTE.test(line) || RULE.test(line);
}

function markdown(text) {
  const lines = (text || "").split("\n"), out = [];
  let i = 0, m;
  while (i < lines.length) {
    const line = lines[i];
    if ((m = FENCE.exec(line))) {
      const code = [];
      for (i++; i < lines.length && !lines[i].trim().startsWith(m[1]); i++) code.push(lines[i]);
      i++;  // the closing fence (an unclosed one, while streaming, runs to the end)
      out.push(h("pre", "", [h("code", m[2] ? `lang-${m[2]}` : "", code.join("\n"))]));
    } else if (!line.trim()) {
      i++;
    } else if (RULE.test(line)) {
      out.push(h("hr"));
      i++;
    } else if ((m = HEADING.exec(line))) {
      out.push(h(`h${m[1].length}`, "", inline(m[2])));
      i++;
    } else if (LIST_ITEM.test(line)) {
      const ordered = /\d/.test(LIST_ITEM.exec(line)[1]);
      const list = h(ordered ? "ol" : "ul");
      if (ordered) list.start = parseInt(LIST_ITEM.exec(line)[1], 10);
      while (i < lines.length && (m = LIST_ITEM.exec(lines[i])) && /\d/.test(m[1]) === ordered) {
        list.append(h("li", "", inline(m[2])));
        i++;
      }
      out.push(list);
    } else if (QUOTE.test(line)) {
      const quoted = [];
      for (; i < lines.length && (m = QUOTE.exec(lines[i])); i++) quoted.push(m[1]);
      out.push(h("blockquote", "", markdown(quoted.join("\n"))));
    } else {
      const para = [line];
      for (i++; i < lines.length && lines[i].trim() && !startsBlock(lines[i]); i++) {
        para.push(lines[i]);
      }
      out.push(h("p", "", inline(para.join("\n"))));
    }
  }
  return out;
}

function inline(text) {
  const out = [];
  let last = 0;
  for (const m of text.matchAll(INLINE)) {
    out.push(text.slice(last, m.index));  // a string: append() makes it a text node
    if (m[1] !== undefined) out.push(h("code", "", m[1]));
    else if (m[2] !== undefined) out.push(h("strong", "", inline(m[2])));
    else if (m[3] !== undefined || m[4] !== undefined) out.push(h("em", "", inline(m[3] ?? m[4])));
    else out.push(link(m[5], m[6]));
    last = m.index + m[0].length;
  }
  out.push(text.slice(last));
  return out;
}

function link(text, url) {
  const a = h("a", "", text);
  a.href = url;  // http(s) only: the pattern admits nothing else
  a.target = "_blank";
  a.rel = "noopener noreferrer nofollow";
  return a;
}

// ---- wiring ----------------------------------------------------------------------------
function bindSettings() {
  for (const name of ["system", ...Object.keys(NUMBERS)]) {
    const input = $(name);
    input.value = state.settings[name] ?? "";
    input.addEventListener("input", () => {
      state.settings[name] = input.value;
      localStorage.setItem(SETTINGS_KEY, JSON.stringify(state.settings));
    });
  }
}

function submit() {
  const text = $("input").value;
  if (!text.trim() || state.controller) return;
  $("input").value = "";
  fitInput();
  send(text);
}

function fitInput() {
  const input = $("input");
  input.style.height = "auto";
  input.style.height = `${Math.min(input.scrollHeight, 200)}px`;
}

function newChat() {
  if (state.controller) state.controller.abort();
  state.messages = [];
  saveChat();
  renderAll();
  $("input").focus();
}

function main() {
  bindSettings();
  renderAll();
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("input").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  $("input").addEventListener("input", fitInput);
  $("stop").addEventListener("click", () => state.controller && state.controller.abort());
  $("new-chat").addEventListener("click", newChat);
  $("key-form").addEventListener("submit", () => {
    sessionStorage.setItem(API_KEY, $("key").value.trim());
    $("key").value = "";
    $("forget-key").hidden = false;
    loadModel();
  });
  $("forget-key").hidden = !sessionStorage.getItem(API_KEY);
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(API_KEY);
    $("forget-key").hidden = true;
    loadModel();
  });
  loadModel();
}

main();
