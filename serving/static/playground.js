// The playground: a plain-JS client of this server's own OpenAI API (relative URLs, so it also works
// under --root-path). Chat keeps a message history; completion continues the text in the box.
"use strict";

const $ = (id) => document.getElementById(id);
const transcript = $("transcript");
const history = [];  // chat messages sent so far: {role, content}
let controller = null;

function authHeaders() {
  const key = $("apikey").value.trim();
  localStorage.setItem("aphrodite-playground-key", key);
  const h = { "Content-Type": "application/json" };
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  const label = document.createElement("span");
  label.className = "role";
  label.textContent = role;
  const body = document.createElement("span");
  body.className = "content";
  body.textContent = text;
  div.append(label, body);
  transcript.append(div);
  transcript.scrollTop = transcript.scrollHeight;
  return body;
}

function setStatus(text) { $("status").textContent = text; }

async function loadModels() {
  try {
    const r = await fetch("v1/models", { headers: authHeaders() });
    const data = await r.json();
    if (!r.ok) throw new Error(data.error ? data.error.message : r.statusText);
    const sel = $("model");
    sel.innerHTML = "";
    for (const m of data.data) {
      const opt = document.createElement("option");
      opt.value = opt.textContent = m.id;
      sel.append(opt);
    }
    setStatus("ready");
  } catch (e) {
    setStatus("could not list models: " + e.message);
  }
}

function samplingFields() {
  const num = (id) => { const v = $(id).value; return v === "" ? undefined : Number(v); };
  const body = {
    max_tokens: num("max_tokens"), temperature: num("temperature"), top_p: num("top_p"),
    top_k: num("top_k"), min_p: num("min_p"), repetition_penalty: num("repetition_penalty"),
    presence_penalty: num("presence_penalty"), frequency_penalty: num("frequency_penalty"),
    seed: num("seed"),
  };
  const stops = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) body.stop = stops;
  return body;
}

// Reads an SSE body and calls onData for each `data:` payload other than [DONE].
async function readSSE(response, onData) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const event = buf.slice(0, cut);
      buf = buf.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload && payload !== "[DONE]") onData(JSON.parse(payload));
      }
    }
  }
}

async function send(ev) {
  ev.preventDefault();
  const text = $("input").value;
  if (!text.trim() || controller) return;
  const chat = $("mode").value === "chat";
  const stream = $("stream").checked;
  const body = { model: $("model").value, stream, ...samplingFields() };
  let url, out;
  if (chat) {
    const system = $("system").value.trim();
    history.push({ role: "user", content: text });
    addMessage("user", text);
    body.messages = (system ? [{ role: "system", content: system }] : []).concat(history);
    url = "v1/chat/completions";
  } else {
    addMessage("user", text);
    body.prompt = text;
    url = "v1/completions";
  }
  $("input").value = "";
  out = addMessage("assistant", "");
  out.parentElement.classList.add("pending");
  controller = new AbortController();
  $("send").disabled = true;
  $("stop").disabled = false;
  setStatus("generating...");
  let reply = "", finish = null;
  const piece = (choice) => chat ? ((choice.delta && choice.delta.content) || (choice.message && choice.message.content) || "")
                                 : (choice.text || "");
  try {
    const r = await fetch(url, { method: "POST", headers: authHeaders(), body: JSON.stringify(body),
                                 signal: controller.signal });
    if (!r.ok) {
      const err = await r.json().catch(() => ({}));
      throw new Error(err.error ? err.error.message : r.status + " " + r.statusText);
    }
    if (stream) {
      await readSSE(r, (data) => {
        if (data.error) throw new Error(data.error.message);
        for (const c of data.choices || []) {
          reply += piece(c);
          if (c.finish_reason) finish = c.finish_reason;
        }
        out.textContent = reply;
        transcript.scrollTop = transcript.scrollHeight;
      });
    } else {
      const data = await r.json();
      reply = piece(data.choices[0]);
      finish = data.choices[0].finish_reason;
      out.textContent = reply;
    }
    if (chat) history.push({ role: "assistant", content: reply });
    setStatus("done" + (finish ? " (" + finish + ")" : ""));
  } catch (e) {
    if (e.name === "AbortError") {
      if (chat && reply) history.push({ role: "assistant", content: reply });
      setStatus("stopped");
    } else {
      if (chat) history.pop();
      out.parentElement.classList.add("error");
      out.textContent = reply + (reply ? "\n" : "") + "error: " + e.message;
      setStatus("error");
    }
  } finally {
    out.parentElement.classList.remove("pending");
    out.parentElement.classList.add("done");
    controller = null;
    $("send").disabled = false;
    $("stop").disabled = true;
  }
}

$("send-form").addEventListener("submit", send);
$("input").addEventListener("keydown", (e) => { if (e.key === "Enter" && e.ctrlKey) send(e); });
$("stop").addEventListener("click", () => controller && controller.abort());
$("clear").addEventListener("click", () => { history.length = 0; transcript.innerHTML = ""; });
$("apikey").value = localStorage.getItem("aphrodite-playground-key") || "";
$("apikey").addEventListener("change", loadModels);
loadModels();
