"""The human study's page (eval.prefstudy.build_site writes it; eval.prefserver serves it).

One self-contained HTML file, no external resources. Each prompt is shown once per question (image
quality, then prompt match); the images carry neutral labels 1..K in the order drawn for that prompt.
Answer with a click on an image (or its button) or its number key; `u` / Backspace / the Undo button
takes the last answer back (the server forgets it) and shows that step again.

Exactly one vote per prompt and question, whatever the input: a step accepts one answer and then
nothing until the server has confirmed it AND the next step's images have loaded plus a short
settle time; key auto-repeat (`event.repeat`) and the second click of a double click
(`event.detail > 1`) are ignored outright. A step answered twice anyway (two tabs) gets a 409 from
the server, which keeps the first answer.

Element ids the browser test drives: #annotator, #start, #prompt, #question, #images, #img-<j>,
#btn-<j>, #undo, #progress, #status, #done; document.body.dataset.state is `login`, `loading`,
`ready`, `busy` or `done`; dataset.step is the index of the step shown.
"""
from __future__ import annotations

import json

TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Image preference study</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.2em; background: #fafafa; color: #222; }
 #prompt { font-size: 1.05em; margin: 0.6em 0; padding: 0.6em; background: #fff; border: 1px solid #ddd; }
 #question { font-weight: 600; margin: 0.6em 0; }
 #images { display: flex; gap: 0.8em; flex-wrap: wrap; }
 #images figure { flex: 1 1 200px; margin: 0; text-align: center; cursor: pointer; }
 #images img { width: 100%; max-width: 420px; max-height: 50vh; object-fit: contain; border: 3px solid #ccc; }
 #images figure.picked img { border-color: #2a7; }
 #images figure .rank { font-weight: 700; color: #2a7; min-height: 1.2em; }
 button { font-size: 1em; padding: 0.4em 1em; margin: 0.3em; }
 #status { color: #666; margin-left: 1em; }
 .hidden { display: none; }
</style></head>
<body data-state="login" data-step="-1">
<h2>Image preference study</h2>
<div id="login">Annotator id: <input id="annotator" maxlength="64" placeholder="letters, digits, . _ -">
 <button id="start">Start</button></div>
<div id="progress"></div>
<div id="task" class="hidden">
 <div id="prompt"></div>
 <div id="question"></div>
 <div id="images"></div>
 <div><button id="undo">Undo last answer (u)</button><span id="status"></span></div>
</div>
<div id="done" class="hidden"><p>All prompts answered, thank you. (Undo still works.)</p></div>
<script>
const DATA = __DATA__;
const K = DATA.k, Q = DATA.questions, STEPS = [];
DATA.items.forEach(it => Q.forEach(q => STEPS.push({item: it, q: q})));
let who = null, pos = 0, state = "login", partial = [], answered = new Set(), loadToken = 0;
const $ = id => document.getElementById(id);
function setState(s) { state = s; document.body.dataset.state = s; document.body.dataset.step = String(pos); }
function stepKey(s) { return s.item.i + ":" + s.q.id; }
async function post(path, body) {
  body.study = DATA.study; body.annotator = who;
  const r = await fetch(path, {method: "POST", headers: {"Content-Type": "application/json"},
                               body: JSON.stringify(body)});
  let j = {}; try { j = await r.json(); } catch (e) {}
  return {status: r.status, body: j};
}
function progressText() {
  const s = STEPS[pos];
  return "Prompt " + (Math.floor(pos / Q.length) + 1) + " / " + DATA.items.length + " \u00b7 question "
    + (pos % Q.length + 1) + " of " + Q.length + " \u00b7 " + answered.size + " / " + STEPS.length + " answers saved";
}
function show() {
  partial = [];
  if (pos >= STEPS.length) {
    $("task").classList.add("hidden"); $("done").classList.remove("hidden");
    $("progress").textContent = answered.size + " / " + STEPS.length + " answers saved";
    setState("done"); return;
  }
  $("done").classList.add("hidden"); $("task").classList.remove("hidden");
  const s = STEPS[pos], token = ++loadToken;
  setState("loading");
  $("prompt").textContent = s.item.prompt;
  $("question").textContent = s.q.text + (DATA.ranking ? " Click the images from best to worst." : "");
  $("progress").textContent = progressText();
  const box = $("images"); box.textContent = "";
  const loads = [];
  s.item.images.forEach((src, j) => {
    const fig = document.createElement("figure"); fig.id = "fig-" + j;
    const img = document.createElement("img"); img.id = "img-" + j; img.alt = "image " + (j + 1);
    loads.push(new Promise(res => { img.onload = res; img.onerror = res; }));
    img.src = src;
    const btn = document.createElement("button"); btn.id = "btn-" + j; btn.textContent = "Image " + (j + 1) + " (" + (j + 1) + ")";
    const rank = document.createElement("div"); rank.className = "rank";
    fig.append(img, rank, btn); box.append(fig);
    fig.addEventListener("click", e => { if (e.detail > 1) return; pick(j); });
  });
  // Settle time after the images appear: a fast second click or key meant for the step before lands here.
  Promise.all(loads).then(() => setTimeout(() => { if (token === loadToken && state === "loading") setState("ready"); }, 250));
}
function mark() {
  for (let j = 0; j < K; j++) {
    const r = partial.indexOf(j);
    $("fig-" + j).classList.toggle("picked", r >= 0);
    $("fig-" + j).querySelector(".rank").textContent = r >= 0 ? "#" + (r + 1) : "";
  }
}
async function pick(j) {
  if (state !== "ready" || j < 0 || j >= K) return;
  if (DATA.ranking) {
    if (partial.includes(j)) return;
    partial.push(j);
    if (partial.length === K - 1) for (let x = 0; x < K; x++) if (!partial.includes(x)) partial.push(x);
    mark();
    if (partial.length < K) return;
  }
  const s = STEPS[pos], body = {item: s.item.i, question: s.q.id, t: new Date().toISOString()};
  if (DATA.ranking) body.ranking = partial.slice(); else body.choice = j;
  setState("busy");
  try {
    const r = await post("api/answer", body);
    if (r.status === 200 || r.status === 409) {
      answered.add(stepKey(s));
      $("status").textContent = r.status === 200 ? "saved" : "already answered before (kept the first answer)";
      pos += 1; show(); return;
    }
    $("status").textContent = "not saved: server said " + r.status + " " + (r.body.error || "");
  } catch (e) { $("status").textContent = "not saved: no server (" + e + ")"; }
  partial = []; mark(); setState("ready");
}
async function undo() {
  if (state !== "ready" && state !== "done") return;
  if (DATA.ranking && partial.length && state === "ready") { partial.pop(); mark(); return; }
  if (pos === 0) return;
  const s = STEPS[pos - 1];
  setState("busy");
  try {
    const r = await post("api/undo", {item: s.item.i, question: s.q.id});
    if (r.status === 200) {
      answered.delete(stepKey(s)); pos -= 1; $("status").textContent = "undone"; show(); return;
    }
    $("status").textContent = "undo failed: server said " + r.status;
  } catch (e) { $("status").textContent = "undo failed: no server"; }
  setState(pos >= STEPS.length ? "done" : "ready");
}
$("undo").addEventListener("click", e => { if (e.detail > 1) return; undo(); });
$("start").onclick = async () => {
  const name = $("annotator").value.trim();
  if (!/^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/.test(name)) { $("status").textContent = "id: letters, digits, . _ -"; alert("annotator id: letters, digits, . _ - only"); return; }
  who = name;
  try {
    const r = await post("api/progress", {});
    if (r.status !== 200) throw new Error("server said " + r.status);
    r.body.done.forEach(d => answered.add(d[0] + ":" + d[1]));
  } catch (e) { alert("the study server does not answer: " + e); who = null; return; }
  pos = 0; while (pos < STEPS.length && answered.has(stepKey(STEPS[pos]))) pos += 1;  // resume
  $("login").classList.add("hidden");
  show();
};
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT" || e.repeat || e.ctrlKey || e.metaKey || e.altKey) return;
  if (e.key === "u" || e.key === "Backspace") { e.preventDefault(); undo(); return; }
  const n = parseInt(e.key, 10);
  if (n >= 1 && n <= 9) pick(n - 1);
});
</script>
</body></html>
"""


def render(page: dict) -> str:
    """page: {study, k, ranking, questions: [{id, text}], items: [{i, prompt, images}]} -> HTML.
    `</` is escaped so a prompt can never close the script element."""
    data = json.dumps(page, ensure_ascii=False).replace("</", "<\\/")
    return TEMPLATE.replace("__DATA__", data)
