// sigma browse: plain JS, no build step. Views are chosen by the URL hash:
//   #/rows?where=..&sort=..&desc=1&offset=N   #/row/KEY   #/dups/KEY   #/whatif?..   #/report
// Every text from the run (captions, URLs, errors) goes into the page as textContent, never HTML.
"use strict";

const PAGE = 48;
let INFO = null, rowsSeq = 0;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "text") e.textContent = v;
    else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children.flat()) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
const $ = (id) => document.getElementById(id);
const fmt = (v, d = 2) => (v === null || v === undefined) ? "–" : (typeof v === "number" && !Number.isInteger(v) ? v.toFixed(d) : String(v));

function showError(msg) {
  const box = $("error");
  box.hidden = !msg;
  box.textContent = msg || "";
}

async function api(path) {
  const r = await fetch(path);
  let body = null;
  try { body = await r.json(); } catch (e) { body = { error: `${r.status} ${r.statusText}` }; }
  if (!r.ok) { showError(body.error || `${r.status}`); throw new Error(body.error); }
  return body;
}

function route() {
  const h = location.hash.replace(/^#/, "") || "/rows";
  const [path, query] = h.split("?");
  const parts = path.split("/").filter(Boolean);
  return { view: parts[0] || "rows", arg: parts[1] ? decodeURIComponent(parts[1]) : null, q: new URLSearchParams(query || "") };
}

function show(view) {
  for (const s of document.querySelectorAll(".view")) s.hidden = s.id !== `view-${view}`;
  for (const a of document.querySelectorAll("nav a")) a.classList.toggle("active", a.id === `nav-${view}`);
}

function thumb(key, cls) {
  return el("img", { class: cls || "thumb", loading: "lazy", src: `/thumb/${encodeURIComponent(key)}`, alt: key });
}

function card(r, extra) {
  const badges = [];
  if (r.selected === true) badges.push(el("span", { class: "badge sel", text: "selected" }));
  if (r.duplicate_of || r.dup_members > 0 || r.dup_pairs > 0)
    badges.push(el("a", { class: "badge dup", href: `#/dups/${r.key}`, text: r.duplicate_of ? "duplicate" : (r.dup_members ? `kept, ${r.dup_members} dup` : "pairs") }));
  return el("div", { class: "card", "data-key": r.key },
    el("a", { href: `#/row/${r.key}`, class: "thumblink" }, thumb(r.key)),
    el("div", { class: "meta" },
      el("code", { text: r.key }), " ",
      r.aesthetic !== undefined ? el("span", { class: "aes", title: "aesthetic", text: `★ ${fmt(r.aesthetic)}` }) : null, " ",
      r.width ? el("span", { class: "wh", text: `${r.width}×${r.height}` }) : null, " ",
      el("span", { class: `status st-${r.status}`, text: r.status || "" }), " ",
      r.bucket ? el("span", { class: "bucket", title: "aspect bucket", text: `▭ ${r.bucket}` }) : null, " ",
      ...badges,
      r.reject_reason ? el("div", { class: "reason", text: r.reject_reason }) : null,
      extra || null,
      r.caption ? el("div", { class: "cap", title: r.caption, text: r.caption }) : null));
}

// --- rows ---------------------------------------------------------------------------------
async function renderRows(q) {
  show("rows");
  const where = q.get("where") || "", sort = q.get("sort") || "key", desc = q.get("desc") === "1";
  const offset = parseInt(q.get("offset") || "0", 10) || 0;
  $("where").value = where;
  $("sort").value = sort;
  $("desc").checked = desc;
  const params = new URLSearchParams({ where, sort, desc: desc ? "1" : "0", offset, limit: PAGE });
  const seq = ++rowsSeq;  // answers can arrive out of order: only the latest request draws
  let res;
  try { res = await api(`/api/rows?${params}`); } catch (e) {
    if (seq !== rowsSeq) return;
    $("grid").replaceChildren(); $("count").textContent = "filter error"; $("count").dataset.count = ""; return;
  }
  if (seq !== rowsSeq) return;
  showError(null);
  const c = $("count");
  c.dataset.count = res.count;
  c.textContent = res.count ? `rows ${res.offset + 1}–${res.offset + res.rows.length} of ${res.count.toLocaleString()} matching` : "no rows match";
  $("prev").disabled = res.offset <= 0;
  $("next").disabled = res.offset + res.rows.length >= res.count;
  $("grid").replaceChildren(...res.rows.map((r) => card(r, sort !== "key" && !["aesthetic", "width", "height", "status", "bucket"].includes(sort)
    ? el("div", { class: "sortval", text: `${sort}: ${fmt(r[sort])}` }) : null)));
}

function goRows(changes) {
  const q = route().view === "rows" ? route().q : new URLSearchParams();
  for (const [k, v] of Object.entries(changes)) q.set(k, v);
  const h = `#/rows?${q}`;
  if (location.hash === h) render(); else location.hash = h;
}

// --- one row ------------------------------------------------------------------------------
async function renderRow(key) {
  show("row");
  const v = $("view-row");
  v.replaceChildren(el("p", { class: "muted", text: "loading…" }));
  const r = await api(`/api/row/${encodeURIComponent(key)}`);
  showError(null);
  const c = Object.fromEntries(r.columns);
  const img = r.image.ok ? el("img", { id: "full", src: `/image/${encodeURIComponent(key)}`, alt: key })
    : el("div", { id: "image-error", class: "error", text: r.image.error });
  const caps = el("div", { class: "captions" },
    el("h3", { text: "Captions" }),
    el("div", { class: "capline" }, el("b", { text: "long (captioner): " }), el("span", { id: "caption-long", text: c.caption_long ?? "–" })),
    el("div", { class: "capline" }, el("b", { text: `short${c.caption_short_derived ? " (derived from the long one)" : " (alt text)"}: ` }),
      el("span", { id: "caption-short", text: c.caption_short ?? c.caption ?? "–" })),
    el("div", { class: "capline" }, el("b", { text: "raw alt text: " }), el("span", { id: "caption-raw", text: c.caption ?? "–" })),
    el("div", { class: "capline" }, el("b", { text: "caption status: " }), el("span", { id: "caption-status", text: c.caption_status ?? "–" }),
      c.caption_error ? ` (${c.caption_error})` : "", el("b", { text: " · model: " }), el("span", { id: "caption-model", text: c.caption_model ?? "–" }),
      el("b", { text: " · T5 tokens: " }), fmt(c.caption_t5_tokens)));
  const table = el("table", { id: "columns", class: "kv" },
    ...r.columns.map(([k, val]) => el("tr", {}, el("th", { text: k }), el("td", { text: val === null ? "NULL" : (typeof val === "object" ? JSON.stringify(val) : String(val)) }))));
  v.replaceChildren(
    el("div", { class: "rowhead" }, el("a", { href: "javascript:history.back()", text: "‹ back" }), " ", el("h2", { text: key }),
      el("a", { id: "dups-link", href: `#/dups/${key}`, text: c.duplicate_of ? `duplicate of ${c.duplicate_of} ›` : "duplicate group ›" })),
    el("div", { class: "rowbody" }, el("div", { class: "imgbox" }, img), el("div", {}, caps, el("h3", { text: "Every manifest column" }), table)));
}

// --- duplicate group ----------------------------------------------------------------------
async function renderDups(key) {
  show("dups");
  const v = $("view-dups");
  const g = await api(`/api/dups/${encodeURIComponent(key)}`);
  showError(null);
  const thr = g.dedup_threshold ?? null;
  const simLabel = (s, kind) => el("div", { class: "sim", text: `similarity ${s === null || s === undefined ? "–" : Number(s).toFixed(4)}${kind ? " · " + kind : ""}` });
  const members = g.members.map((m) => card(m, simLabel(m.dup_similarity, m.dup_kind)));
  const parts = [
    el("div", { class: "rowhead" }, el("a", { href: "javascript:history.back()", text: "‹ back" }), " ",
      el("h2", { text: `Duplicate group of ${key}` })),
    el("p", { class: "muted", text: g.has_pairs
      ? `Candidate pairs stored (similarity ≥ ${fmt(g.candidate_threshold, 3)}); select's threshold: ${thr === null ? "not in the run's config" : thr}.`
      : "No candidate pairs stored (dedup/pairs/ absent): the group is the rows pointing at the kept row (duplicate_of)." }),
    el("div", { class: "dupgroup" },
      el("div", { id: "dups-kept", class: "kept" }, el("h3", { text: g.kept.missing ? "kept row (not in the manifest)" : "kept" }), card(g.kept)),
      el("div", { id: "dups-members", class: "members" }, el("h3", { text: `${g.members.length} dropped as its duplicate` }),
        el("div", { class: "grid" }, ...members)))];
  if (g.has_pairs) {
    parts.push(el("h3", { text: "Candidate pairs of the group" }),
      el("table", { id: "dups-pairs", class: "kv" }, el("tr", {}, el("th", { text: "a" }), el("th", { text: "b" }), el("th", { text: "similarity" }), el("th", { text: "kind" })),
        ...g.pairs.map((p) => el("tr", { class: thr !== null && p.similarity >= thr ? "above" : "below" },
          el("td", {}, el("a", { href: `#/row/${p.a}`, text: p.a })), el("td", {}, el("a", { href: `#/row/${p.b}`, text: p.b })),
          el("td", { class: "simval", text: Number(p.similarity).toFixed(4) }), el("td", { text: p.kind })))));
    if ((g.others || []).length)
      parts.push(el("h3", { text: "Other rows paired with the group (kept: under the threshold or not passing other criteria)" }),
        el("div", { id: "dups-others", class: "grid" }, ...g.others.map((o) => card(o))));
  }
  v.replaceChildren(...parts);
}

// --- what-if ------------------------------------------------------------------------------
const SLIDERS = [
  ["aesthetic_min", "aesthetic_min", 0.05], ["min_side", "min_side (px)", 16],
  ["max_aspect_ratio", "max_aspect_ratio (h/w)", 0.05], ["min_aspect_ratio", "min_aspect_ratio (h/w)", 0.01],
  ["nsfw_max", "nsfw_max (P NSFW)", 0.01], ["watermark_max", "watermark_max (P watermark)", 0.01],
  ["clip_similarity_min", "clip_similarity_min (cosine)", 0.005],
  ["dedup_threshold", "dedup_threshold", 0.001]];
// Sliders that can be off (select's null): an "on" checkbox beside them. The filter sliders are
// disabled when the run has no scores for their column.
const OPTIONAL = { aesthetic_min: "aesthetic", nsfw_max: "nsfw", watermark_max: "watermark", clip_similarity_min: "clip_similarity" };
let wiTimer = null, wiSeq = 0;

function buildWhatIf() {
  const s = INFO.select || {}, r = INFO.ranges || {};
  const lim = {
    aesthetic_min: [Math.floor(r.aes_min ?? 0), Math.ceil(r.aes_max ?? 10), s.aesthetic_min ?? null],
    min_side: [0, Math.max(2048, r.side_max || 0), s.min_side ?? 1024],
    max_aspect_ratio: [1, 10, s.max_aspect_ratio ?? 4.5],
    min_aspect_ratio: [0.1, 1, s.min_aspect_ratio ?? 1 / 4.5],
    nsfw_max: [0, 1, s.nsfw_max ?? null], watermark_max: [0, 1, s.watermark_max ?? null],
    clip_similarity_min: [-1, 1, s.clip_similarity_min ?? null],
    dedup_threshold: [INFO.candidate_threshold ?? 0.9, 1, s.dedup_threshold ?? INFO.candidate_threshold ?? null]};
  const rows = SLIDERS.map(([name, label, step]) => {
    const [lo, hi, val] = lim[name];
    const hasCol = (c) => (INFO.columns || []).some((x) => x.name === c) && (r.filters || {})[c] !== false;
    const disabled = (name === "dedup_threshold" && !INFO.has_pairs) || (name in OPTIONAL && name !== "aesthetic_min" && !hasCol(OPTIONAL[name]));
    const range = el("input", { type: "range", id: `wi-${name}`, min: lo, max: hi, step, value: val ?? lo, disabled });
    const num = el("input", { type: "number", id: `wi-${name}-val`, step: "any", value: val ?? "", disabled });
    range.addEventListener("input", () => { num.value = range.value; if (name in OPTIONAL) $(`wi-${name}-on`).checked = true; scheduleWhatIf(); });
    num.addEventListener("change", () => { range.value = num.value; scheduleWhatIf(); });
    const extra = name in OPTIONAL ? el("label", {}, el("input", { type: "checkbox", id: `wi-${name}-on`, checked: val !== null, disabled, onchange: scheduleWhatIf }),
        disabled ? ` off (no ${OPTIONAL[name]} scores in this run)` : " on")
      : disabled ? el("span", { class: "muted", text: "no stored candidate pairs" }) : null;
    return el("div", { class: "slider" }, el("label", { for: `wi-${name}`, text: label }), range, num, extra);
  });
  const res = el("select", { id: "wi-resolution", onchange: scheduleWhatIf },
    ...[256, 512, 1024, 2048, 2880].map((x) => el("option", { value: x, selected: x === INFO.resolution, text: `${x} px buckets` })));
  $("wi-controls").replaceChildren(...rows, el("div", { class: "slider" }, el("label", { text: "bucket table" }), res));
}

function scheduleWhatIf() { clearTimeout(wiTimer); wiTimer = setTimeout(runWhatIf, 150); }

async function runWhatIf() {
  const p = new URLSearchParams({ resolution: $("wi-resolution").value });
  for (const [name] of SLIDERS) {
    const v = $(`wi-${name}-val`).value;
    if (name in OPTIONAL) p.set(name, $(`wi-${name}-on`).checked && v !== "" ? v : "null");
    else if (!(name === "dedup_threshold" && (!INFO.has_pairs || v === ""))) p.set(name, v);
  }
  $("wi-would").classList.add("stale");
  const seq = ++wiSeq;  // a slower, older answer must not overwrite a newer one
  let w;
  try { w = await api(`/api/whatif?${p}`); } catch (e) { if (seq === wiSeq) bump("whatifs"); return; }
  if (seq !== wiSeq) return;
  showError(null);
  $("wi-would").classList.remove("stale");
  $("wi-would").textContent = w.would.toLocaleString();
  $("wi-would").dataset.count = w.would;
  $("wi-would").dataset.params = JSON.stringify(w.params);
  $("wi-was").textContent = w.was; $("wi-gained").textContent = `+${w.gained}`; $("wi-lost").textContent = `−${w.lost}`;
  $("wi-dedup").textContent = w.dedup.applied
    ? `${w.dedup.dropped} rows dropped as duplicates (from ${w.dedup.source === "pairs" ? "the stored candidate pairs, greedy in rank order: " + w.dedup.keep : "the recorded duplicate_of"}); ${w.passes} rows pass the other criteria.`
    : "select.drop_duplicates is off in this run's config.";
  $("wi-set").textContent = w.set_line;
  $("wi-reasons").replaceChildren(el("tr", {}, el("th", { text: "reason" }), el("th", { text: "rows" })),
    ...w.reasons.map((r) => el("tr", {}, el("td", { text: r.reason }), el("td", { class: "num", text: r.n }))));
  const mx = Math.max(1, ...w.buckets.map((b) => Math.max(b.would, b.was)));
  $("wi-buckets").replaceChildren(el("tr", {}, el("th", { text: "bucket h/w" }), el("th", { text: "would" }), el("th", { text: "now" }), el("th", {})),
    ...w.buckets.map((b) => el("tr", { "data-bucket": b.bucket }, el("td", { text: b.bucket }), el("td", { class: "num", text: b.would }),
      el("td", { class: "num", text: b.was }), el("td", {}, el("div", { class: "bar", style: `width:${Math.round(200 * b.would / mx)}px` })))));
  $("wi-margins").replaceChildren(...w.margins.filter((m) => m.rows.length).map((m) => el("div", { class: "margin" },
    el("h4", { text: `${m.margin}: ${m.side}` }),
    el("div", { class: "grid small" }, ...m.rows.map((r) => el("div", { class: "card" },
      el("a", { href: `#/row/${r.key}` }, thumb(r.key)),
      el("div", { class: "meta" }, el("code", { text: r.key }), " ",
        r.similarity !== undefined ? el("span", { text: `sim ${Number(r.similarity).toFixed(4)}${r.kept ? " → " + r.kept : r.other ? " ~ " + r.other : ""}` })
          : m.margin in OPTIONAL && m.margin !== "aesthetic_min" ? el("span", { text: `${OPTIONAL[m.margin]} ${fmt(r[OPTIONAL[m.margin]])} · ★ ${fmt(r.aesthetic)}` })
          : el("span", { text: `★ ${fmt(r.aesthetic)} · ${r.width}×${r.height} · h/w ${fmt(r.ratio)}` }))))))));
  bump("whatifs");
}

// Counters the tests (and anyone scripting the page) wait on: a view or a what-if finished.
function bump(name) { document.body.dataset[name] = (parseInt(document.body.dataset[name] || "0", 10) + 1).toString(); }

// --- report -------------------------------------------------------------------------------
function table(id, rows, cols) {
  return el("table", { id, class: "kv" }, el("tr", {}, ...cols.map((c) => el("th", { text: c }))),
    ...rows.map((r) => el("tr", { class: r.Source === "paper" ? "paper" : "" }, ...cols.map((c) => el("td", { text: fmt(r[c], 4) })))));
}

async function renderReport() {
  show("report");
  const v = $("view-report");
  const r = await api("/api/report");
  showError(null);
  const t1 = r.table1.rows;
  const parts = [el("h2", { text: "Table 1: caption statistics beside the paper's rows" })];
  if (r.table1.missing) parts.push(el("p", { class: "muted", id: "t1-missing", text: r.table1.missing }));
  parts.push(table("t1", t1, t1.length ? Object.keys(t1[0]) : []));
  parts.push(el("h2", { text: "Figures" }), el("div", { id: "figures", class: "figures" },
    ...r.figures.map((f) => el("figure", {}, el("img", { src: `/run/${f.path}`, alt: f.title }), el("figcaption", { text: `${f.title} (${f.path})` })))));
  if (!r.figures.length) parts.push(el("p", { class: "muted", text: "No figures yet (the stats stage writes them)." }));
  parts.push(el("h2", { text: "Stages" }));
  if (r.summary) {
    parts.push(el("p", { text: `pipeline ${r.summary.pipeline}: ${r.summary.rows} rows, selected ${r.summary.selected}` }),
      table("summary", (r.summary.stages || []).map((s) => ({ stage: s.stage, seconds: s.seconds, "rows/s": s.rows_per_s, finished: s.finished_at || "", result: JSON.stringify(s.result) })),
        ["stage", "seconds", "rows/s", "result"]));
  } else parts.push(el("p", { class: "muted", text: "report/summary.json not written yet (curation.run writes it at the end)." }));
  if (r.dedup) {  // dedup's measured recall: a sample of rows searched exactly (dedup/_done.json)
    const d = r.dedup, ci = (x) => (x && x.interval ? `${fmt(x.interval[0], 4)}-${fmt(x.interval[1], 4)}` : "");
    parts.push(el("h3", { text: "Dedup recall" }), el("p", { id: "dedup-recall", text: `near pairs at cosine >= ${d.cosine}: ` +
      `recall ${d.recall === null ? "n/a (no pair in the sample)" : fmt(d.recall, 4)} (95 % interval ${ci(d)}, ${d.pairs} pairs of ` +
      `${d.sample_rows} rows searched exactly; ${d.assignments} clusters per row)` }),
    table("dedup-bands", d.bands.map((b) => ({ cosine: b.band, pairs: b.pairs, found: b.found, recall: b.recall, "95 % interval": ci(b) })),
      ["cosine", "pairs", "found", "recall", "95 % interval"]));
  }
  parts.push(el("p", { id: "footers", text: `manifest footers: ${r.footers.rows} rows; ` + Object.entries(r.footers.status).map(([k, n]) => `${k} ${n}`).join(", ") +
    (r.footers.selected !== null ? `; selected ${r.footers.selected}` : "") }));
  parts.push(el("h2", { text: "Eval" }));
  if (r.eval.runs.length) parts.push(table("eval", r.eval.runs, ["run", "checkpoint", "fid", "clip_score", "n_scored", "n_benchmark", "scored_at"]));
  else parts.push(el("p", { class: "muted", id: "eval-missing", text: "No eval scores yet (eval.score writes eval/scores/)." }));
  if (r.eval.report_md) parts.push(el("a", { href: `/run/${r.eval.report_md}`, text: "eval/report.md" }));
  parts.push(el("h3", { text: "Files" }), el("ul", {}, ...r.files.map((f) => el("li", {}, el("a", { href: `/run/${f}`, text: f })))));
  v.replaceChildren(...parts);
}

// --- wiring -------------------------------------------------------------------------------
async function render() {
  const r = route();
  try {
    if (r.view === "row" && r.arg) await renderRow(r.arg);
    else if (r.view === "dups" && r.arg) await renderDups(r.arg);
    else if (r.view === "whatif") { show("whatif"); if (!$("wi-resolution")) buildWhatIf(); await runWhatIf(); }
    else if (r.view === "report") await renderReport();
    else await renderRows(r.q);
  } catch (e) { /* the message is in #error */ }
  document.body.dataset.view = r.view;
  bump("renders");
}

async function init() {
  INFO = await api("/api/info");
  $("run-name").textContent = INFO.name || INFO.out;
  $("run-info").textContent = `${INFO.out} · ${INFO.rows.toLocaleString()} rows · ${INFO.parts} parts${INFO.has_pairs ? " · candidate pairs" : ""}`;
  $("sort").replaceChildren(...INFO.columns.map((c) => el("option", { value: c.name, text: c.name })));
  $("presets").replaceChildren(...INFO.presets.map((p) => el("button", { type: "button", class: "preset", "data-where": p.where, title: p.where,
    text: p.label, onclick: () => goRows({ where: p.where, offset: 0 }) })));
  $("filter-form").addEventListener("submit", (ev) => { ev.preventDefault(); goRows({ where: $("where").value, offset: 0 }); });
  $("sort").addEventListener("change", () => goRows({ sort: $("sort").value, offset: 0 }));
  $("desc").addEventListener("change", () => goRows({ desc: $("desc").checked ? "1" : "0", offset: 0 }));
  $("prev").addEventListener("click", () => goRows({ offset: Math.max(0, (parseInt(route().q.get("offset") || "0", 10) || 0) - PAGE) }));
  $("next").addEventListener("click", () => goRows({ offset: (parseInt(route().q.get("offset") || "0", 10) || 0) + PAGE }));
  $("reload").addEventListener("click", async () => { await fetch("/api/reload", { method: "POST" }); location.reload(); });
  window.addEventListener("hashchange", render);
  await render();
}

init();
