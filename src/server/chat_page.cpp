#include "server/chat_page.h"

namespace kestrel::server {

// One self-contained page: no build step, no external resources (the server may have no
// network). The conversation lives in the page; each turn posts the whole of it to
// /v1/chat/completions with stream: true and appends the deltas as they arrive. Every message
// element carries data-role, and the assistant's carries data-state (streaming, done, error),
// which is what the browser test reads.
const char* chat_page_html() {
  return R"html(<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Kestrel chat</title>
<style>
  :root { color-scheme: light dark; font-family: system-ui, sans-serif; }
  body { margin: 0; display: flex; flex-direction: column; height: 100vh; }
  header { padding: 0.5rem 1rem; border-bottom: 1px solid #8884; display: flex; gap: 1rem;
           align-items: center; flex-wrap: wrap; }
  header h1 { font-size: 1rem; margin: 0; }
  header label { font-size: 0.85rem; }
  header input { width: 5rem; }
  #log { flex: 1; overflow-y: auto; padding: 1rem; }
  .message { max-width: 48rem; margin: 0 auto 0.75rem; white-space: pre-wrap;
             padding: 0.5rem 0.75rem; border-radius: 0.5rem; }
  .message[data-role="user"] { background: #4a90e222; }
  .message[data-role="assistant"] { background: #8882; }
  .message[data-state="error"] { background: #e24a4a33; }
  form { display: flex; gap: 0.5rem; padding: 0.75rem 1rem; border-top: 1px solid #8884; }
  textarea { flex: 1; resize: vertical; min-height: 2.5rem; font: inherit; }
</style>
</head>
<body>
<header>
  <h1>Kestrel <span id="model"></span></h1>
  <label>temperature <input id="temperature" type="number" min="0" max="2" step="0.1"
    value="0.7"></label>
  <label>max tokens <input id="max-tokens" type="number" min="1" value="256"></label>
  <label>API key <input id="api-key" type="password" autocomplete="off"></label>
  <button id="clear" type="button">New chat</button>
</header>
<main id="log" aria-live="polite"></main>
<form id="form">
  <textarea id="input" rows="2" placeholder="Message (Enter sends, Shift+Enter: new line)"
    required></textarea>
  <button id="send" type="submit">Send</button>
  <button id="stop" type="button" disabled>Stop</button>
</form>
<script>
"use strict";
const log = document.getElementById("log");
const input = document.getElementById("input");
const sendButton = document.getElementById("send");
const stopButton = document.getElementById("stop");
const keyInput = document.getElementById("api-key");
keyInput.value = localStorage.getItem("kestrel-api-key") || "";
keyInput.addEventListener("change", () => localStorage.setItem("kestrel-api-key", keyInput.value));
let messages = [];
let controller = null;

function headers() {
  const h = { "Content-Type": "application/json" };
  if (keyInput.value) h["Authorization"] = "Bearer " + keyInput.value;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "message";
  div.dataset.role = role;
  div.textContent = text;
  log.appendChild(div);
  log.scrollTop = log.scrollHeight;
  return div;
}

fetch("/v1/models", { headers: headers() }).then(r => r.json()).then(body => {
  if (body.data && body.data.length) document.getElementById("model").textContent = body.data[0].id;
}).catch(() => {});

// Reads server-sent events from a fetch response; calls onEvent with each parsed data line.
async function readEvents(response, onEvent) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (!line.startsWith("data: ")) continue;
      const payload = line.slice(6);
      if (payload === "[DONE]") return;
      onEvent(JSON.parse(payload));
    }
  }
}

async function send(text) {
  messages.push({ role: "user", content: text });
  addMessage("user", text);
  const answer = addMessage("assistant", "");
  answer.dataset.state = "streaming";
  controller = new AbortController();
  sendButton.disabled = true;
  stopButton.disabled = false;
  const body = {
    messages: messages, stream: true,
    temperature: Number(document.getElementById("temperature").value),
    max_tokens: Number(document.getElementById("max-tokens").value),
  };
  let failure = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      failure = (error.error && error.error.message) || ("HTTP " + response.status);
    } else {
      await readEvents(response, event => {
        if (event.error) { failure = event.error.message; return; }
        for (const choice of event.choices || []) {
          if (choice.delta && choice.delta.content) {
            answer.textContent += choice.delta.content;
            log.scrollTop = log.scrollHeight;
          }
        }
      });
    }
  } catch (e) {
    failure = e.name === "AbortError" ? null : String(e);
  }
  if (failure) {
    answer.textContent += (answer.textContent ? "\n" : "") + "[error: " + failure + "]";
    answer.dataset.state = "error";
    messages.pop();
  } else {
    answer.dataset.state = "done";
    messages.push({ role: "assistant", content: answer.textContent });
  }
  controller = null;
  sendButton.disabled = false;
  stopButton.disabled = true;
  input.focus();
}

document.getElementById("form").addEventListener("submit", event => {
  event.preventDefault();
  const text = input.value.trim();
  if (!text || controller) return;
  input.value = "";
  send(text);
});
input.addEventListener("keydown", event => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    document.getElementById("form").requestSubmit();
  }
});
stopButton.addEventListener("click", () => { if (controller) controller.abort(); });
document.getElementById("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  messages = [];
  log.textContent = "";
});
input.focus();
</script>
</body>
</html>
)html";
}

}  // namespace kestrel::server
