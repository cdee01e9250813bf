// CogVLM2 playground: a plain OpenAI client of this server's /v1/chat/completions.
//
// The conversation is kept here, in OpenAI message format, and the whole history is sent with every
// turn; the image travels as a data URL inside the first user message only (the model accepts one
// image per conversation). Answers stream over SSE (fetch + ReadableStream, since EventSource cannot
// POST). Errors are shown with the API's own `error.message`. Nothing here uses innerHTML: model
// output is untrusted text.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORAGE = "cogvlm-playground-api-key";

const state = {
  requireApiKey: false,
  model: null, // id from GET /v1/models; omitted from requests until known
  image: null, // {dataUrl, name, previewUrl}
  history: [], // OpenAI messages of the finished turns
  controller: null, // AbortController of the turn in flight
  isBusy: false, // a turn is being sent or streamed; further Enter presses are ignored
  chatId: 0, // bumped by "New chat", so a turn aborted by it does not write into the new history
};

class ApiError extends Error {}

// ---------------------------------------------------------------- setup

document.addEventListener("DOMContentLoaded", async () => {
  $("file-input").addEventListener("change", (e) => pickFile(e.target.files[0]));
  setUpDropZone($("drop-zone"));
  document.addEventListener("paste", onPaste);
  $("temperature").addEventListener("input", (e) => ($("temperature-value").value = e.target.value));
  $("ask-form").addEventListener("submit", (e) => {
    e.preventDefault();
    ask();
  });
  $("question").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      ask();
    }
  });
  $("new-chat").addEventListener("click", newChat);
  $("stop").addEventListener("click", () => state.controller?.abort());
  $("api-key").addEventListener("change", (e) => {
    sessionStorage.setItem(KEY_STORAGE, e.target.value.trim());
    state.model = null;
    loadModel();
  });

  try {
    const config = await (await fetch("/playground/config.json")).json();
    state.requireApiKey = Boolean(config.require_api_key);
  } catch (err) {
    console.warn("playground config unavailable", err);
  }
  if (state.requireApiKey) {
    $("api-key-field").hidden = false;
    $("api-key").value = sessionStorage.getItem(KEY_STORAGE) || "";
  }
  await loadModel();
  document.body.dataset.ready = "true";
});

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (state.requireApiKey && key) h.Authorization = `Bearer ${key}`;
  return h;
}

async function loadModel() {
  if (state.requireApiKey && !$("api-key").value.trim()) {
    $("model-name").textContent = "enter the API key to start";
    return;
  }
  try {
    const resp = await fetch("/v1/models", { headers: headers() });
    if (!resp.ok) throw new ApiError(await errorMessage(resp));
    const models = (await resp.json()).data || [];
    state.model = models.length ? models[0].id : null;
    $("model-name").textContent = state.model || "";
  } catch (err) {
    $("model-name").textContent = `models: ${err.message}`;
  }
}

// ---------------------------------------------------------------- image input

function setUpDropZone(zone) {
  zone.addEventListener("dragover", (e) => {
    e.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("dragging");
    pickFile(e.dataTransfer.files[0]);
  });
}

function onPaste(e) {
  const file = Array.from(e.clipboardData?.files || []).find((f) => f.type.startsWith("image/"));
  if (!file) return; // plain text paste into the question box stays untouched
  e.preventDefault();
  pickFile(file);
}

// Any file is accepted here on purpose: the server decides what is an image, and its 400 message
// is what the user should see.
function pickFile(file) {
  if (!file) return;
  const reader = new FileReader();
  reader.onload = () => {
    if (state.history.length) {
      newChat(); // the first user message carries the old image; a new image is a new chat
      notice("New image: started a new chat.");
    }
    if (state.image?.previewUrl) URL.revokeObjectURL(state.image.previewUrl);
    state.image = { dataUrl: reader.result, name: file.name, previewUrl: URL.createObjectURL(file) };
    const preview = $("preview");
    preview.onerror = () => showPreview(false); // not an image the browser can draw: the server decides
    preview.src = state.image.previewUrl;
    showPreview(true);
    $("image-name").textContent = `${file.name} (${Math.ceil(file.size / 1024)} KiB)`;
    $("file-input").value = ""; // picking the same file again still fires "change"
  };
  reader.onerror = () => notice(`Could not read ${file.name}: ${reader.error}`, true);
  reader.readAsDataURL(file);
}

function showPreview(isShown) {
  $("preview").hidden = !isShown;
  $("drop-hint").hidden = isShown;
}

// ---------------------------------------------------------------- conversation

function newChat() {
  state.chatId += 1;
  state.controller?.abort();
  state.history = [];
  $("transcript").replaceChildren();
  $("question").focus();
}

async function ask() {
  const question = $("question").value.trim();
  if (!question || state.isBusy) return;
  setBusy(true);
  try {
    if (!state.model) await loadModel();
    await runTurn(question);
  } finally {
    setBusy(false);
  }
}

// One question -> one streamed answer, appended to the transcript and (on success) the history.
async function runTurn(question) {
  const chatId = state.chatId;
  const isFirstTurn = state.history.length === 0;
  const withImage = isFirstTurn && state.image !== null;
  const userMessage = {
    role: "user",
    content: withImage
      ? [
          { type: "text", text: question },
          { type: "image_url", image_url: { url: state.image.dataUrl } },
        ]
      : question,
  };
  const body = {
    messages: [...state.history, userMessage],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    max_tokens: Number($("max-tokens").value),
  };
  if (state.model) body.model = state.model;

  const asked = addUserBubble(question, withImage ? state.image.previewUrl : null);
  $("question").value = "";
  const answer = addAssistantBubble();
  try {
    const result = await streamCompletion(body, (text) => (answer.text.textContent = text));
    answer.item.classList.remove("streaming");
    answer.meta.textContent = formatStats(result);
    answer.meta.title = "TTFT: request sent -> first token. tok/s: (tokens - 1) / (first -> last token).";
    // A stopped answer is kept too: the user saw it, so the next turn should build on it.
    if (chatId === state.chatId && result.text) {
      state.history.push(userMessage, { role: "assistant", content: result.text });
    } else {
      asked.classList.add("failed"); // nothing came back: the question is not part of the conversation
    }
  } catch (err) {
    asked.classList.add("failed"); // shown, but not part of the conversation any more
    answer.item.className = "assistant error";
    answer.item.dataset.testid = "error";
    answer.text.textContent = err.message;
    if (!$("question").value) $("question").value = question; // easy retry; this turn is dropped
    if (/^401\b/.test(err.message) && state.requireApiKey) $("api-key").focus();
  }
}

// POSTs one streaming chat completion; calls onText with the answer so far; resolves with stats.
async function streamCompletion(body, onText) {
  state.controller = new AbortController();
  const t0 = performance.now();
  let tFirst = null;
  let tLast = null;
  let text = "";
  let numChunks = 0;
  let usage = null;
  let finishReason = null;
  let stopped = false;

  try {
    const resp = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(body),
      signal: state.controller.signal,
    });
    if (!resp.ok) throw new ApiError(await errorMessage(resp));
    for await (const event of sseEvents(resp.body)) {
      if (event === "[DONE]") break;
      const chunk = JSON.parse(event);
      if (chunk.error) throw new ApiError(chunk.error.message || JSON.stringify(chunk.error));
      if (chunk.usage) usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        const delta = choice.delta?.content;
        if (delta) {
          tLast = performance.now();
          tFirst ??= tLast;
          numChunks += 1;
          text += delta;
          onText(text);
        }
        if (choice.finish_reason) finishReason = choice.finish_reason;
      }
    }
  } catch (err) {
    if (err.name !== "AbortError") throw err;
    stopped = true;
  } finally {
    state.controller = null;
  }
  const numTokens = usage?.completion_tokens ?? numChunks;
  return { text, t0, tFirst, tLast, numTokens, finishReason: stopped ? "stopped" : finishReason };
}

// Yields the data payload of each SSE event ("data:" lines joined), across arbitrary chunk splits.
async function* sseEvents(stream) {
  const reader = stream.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    const events = buffer.split(/\r?\n\r?\n/);
    buffer = events.pop();
    for (const event of events) {
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith("data:"))
        .map((line) => line.slice(5).trimStart())
        .join("\n");
      if (data) yield data;
    }
  }
}

// "400: <the API's error.message>", or the plain-text body for non-JSON errors (e.g. a proxy 503).
async function errorMessage(resp) {
  const raw = await resp.text();
  let message = raw.trim() || resp.statusText;
  try {
    const parsed = JSON.parse(raw);
    message = parsed.error?.message ?? parsed.detail ?? message;
    if (typeof message !== "string") message = JSON.stringify(message);
  } catch {
    // not JSON: keep the text
  }
  return `${resp.status}: ${message}`;
}

function formatStats({ t0, tFirst, tLast, numTokens, finishReason }) {
  if (tFirst === null) return `no tokens · finish: ${finishReason ?? "none"}`;
  const ttftMs = tFirst - t0;
  const decodeS = (tLast - tFirst) / 1000;
  const rate = numTokens > 1 && decodeS > 0 ? (numTokens - 1) / decodeS : numTokens / ((tLast - t0) / 1000);
  return [
    `TTFT ${Math.round(ttftMs)} ms`,
    `${rate.toFixed(1)} tok/s`,
    `${numTokens} tokens`,
    `finish: ${finishReason ?? "none"}`,
  ].join(" · ");
}

// ---------------------------------------------------------------- rendering

function addItem(role) {
  const item = document.createElement("li");
  item.className = role;
  item.dataset.testid = role;
  const text = document.createElement("div");
  text.className = "bubble";
  const meta = document.createElement("div");
  meta.className = "meta muted";
  item.append(text, meta);
  $("transcript").append(item);
  item.scrollIntoView({ block: "end" });
  return { item, text, meta };
}

function addUserBubble(question, imageUrl) {
  const { item, text } = addItem("user");
  text.textContent = question;
  if (imageUrl) {
    const thumb = document.createElement("img");
    thumb.className = "thumb";
    thumb.alt = "image sent with this question";
    thumb.src = imageUrl;
    thumb.onerror = () => thumb.remove();
    item.prepend(thumb);
  }
  return item;
}

function addAssistantBubble() {
  const bubble = addItem("assistant");
  bubble.item.classList.add("streaming");
  const observer = new MutationObserver(() => bubble.item.scrollIntoView({ block: "end" }));
  observer.observe(bubble.text, { childList: true, characterData: true, subtree: true });
  return bubble;
}

function notice(message, isError = false) {
  const { item, text } = addItem(isError ? "assistant error" : "notice");
  if (isError) item.dataset.testid = "error";
  text.textContent = message;
}

function setBusy(isBusy) {
  state.isBusy = isBusy;
  $("send").disabled = isBusy;
  $("stop").hidden = !isBusy;
  document.body.dataset.busy = String(isBusy);
}
