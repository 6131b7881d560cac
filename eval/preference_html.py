"""The preference page (eval.preference): one self-contained HTML file, no external resources.

Element ids the browser test drives: #annotator, #start, #prompt, #left, #right, #btn-left,
#btn-tie, #btn-right, #progress, #status, #download, #done.
"""

TEMPLATE = r"""<!doctype html>
<html lang="en"><head><meta charset="utf-8">
<title>Which image is better?</title>
<style>
 body { font-family: system-ui, sans-serif; margin: 1.5em; background: #fafafa; color: #222; }
 #prompt { font-size: 1.1em; margin: 0.8em 0; padding: 0.6em; background: #fff; border: 1px solid #ddd; }
 .pair { display: flex; gap: 1em; }
 .pair figure { flex: 1; margin: 0; text-align: center; }
 .pair img { width: 100%; max-width: 512px; max-height: 60vh; object-fit: contain; border: 1px solid #ccc; }
 button { font-size: 1em; padding: 0.5em 1.2em; margin: 0.3em; }
 #status { color: #666; margin-left: 1em; }
 .hidden { display: none; }
</style></head>
<body>
<h2>Which image matches the prompt better, and looks better?</h2>
<div id="login">Your name: <input id="annotator" maxlength="64" placeholder="letters, digits, . _ -">
 <button id="start">Start</button></div>
<div id="task" class="hidden">
 <div id="progress"></div>
 <div id="prompt"></div>
 <div class="pair">
  <figure><img id="left" alt="left image"><figcaption>Left (1 or &larr;)</figcaption></figure>
  <figure><img id="right" alt="right image"><figcaption>Right (2 or &rarr;)</figcaption></figure>
 </div>
 <div><button id="btn-left">Left is better</button><button id="btn-tie">Tie (t)</button>
  <button id="btn-right">Right is better</button><span id="status"></span></div>
</div>
<div id="done" class="hidden"><p>All prompts done, thank you.</p></div>
<p><button id="download">Download my choices (JSON)</button></p>
<script>
const DATA = __DATA__;
let who = null, pos = 0;
const store = () => "pref:" + DATA.page + ":" + who;
function load() { try { return JSON.parse(localStorage.getItem(store())) || []; } catch (e) { return []; } }
function save(c) { try { localStorage.setItem(store(), JSON.stringify(c)); } catch (e) {} }
function show() {
  if (pos >= DATA.items.length) {
    document.getElementById("task").classList.add("hidden");
    document.getElementById("done").classList.remove("hidden");
    return;
  }
  const it = DATA.items[pos];
  document.getElementById("prompt").textContent = it.prompt;
  document.getElementById("left").src = it.left;
  document.getElementById("right").src = it.right;
  document.getElementById("progress").textContent = (pos + 1) + " / " + DATA.items.length;
}
async function vote(choice) {
  if (who === null || pos >= DATA.items.length) return;
  const v = {annotator: who, i: DATA.items[pos].i, choice: choice, t: new Date().toISOString()};
  const all = load(); all.push(v); save(all);
  const st = document.getElementById("status");
  try {
    const r = await fetch("api/choice", {method: "POST", headers: {"Content-Type": "application/json"},
                                         body: JSON.stringify(v)});
    st.textContent = r.ok ? "saved" : "kept in this browser (server said " + r.status + ")";
  } catch (e) { st.textContent = "kept in this browser (no server): download when done"; }
  pos += 1; show();
}
document.getElementById("start").onclick = () => {
  const name = document.getElementById("annotator").value.trim();
  if (!/^[A-Za-z0-9_.-]{1,64}$/.test(name)) { alert("name: letters, digits, . _ - only"); return; }
  who = name;
  const done = new Set(load().map(v => v.i));
  pos = 0; while (pos < DATA.items.length && done.has(DATA.items[pos].i)) pos += 1;
  document.getElementById("login").classList.add("hidden");
  document.getElementById("task").classList.remove("hidden");
  show();
};
document.getElementById("btn-left").onclick = () => vote("left");
document.getElementById("btn-right").onclick = () => vote("right");
document.getElementById("btn-tie").onclick = () => vote("tie");
document.addEventListener("keydown", e => {
  if (e.target.tagName === "INPUT") return;
  if (e.key === "1" || e.key === "ArrowLeft") vote("left");
  else if (e.key === "2" || e.key === "ArrowRight") vote("right");
  else if (e.key === "t") vote("tie");
});
document.getElementById("download").onclick = () => {
  const doc = {page: DATA.page, annotator: who, choices: load().map(v => ({i: v.i, choice: v.choice, t: v.t}))};
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([JSON.stringify(doc, null, 1)], {type: "application/json"}));
  a.download = "choices-" + (who || "anonymous") + ".json"; a.click();
};
</script>
</body></html>
"""
