// peftkit ui: four pages over the JSON API in ui/app.py. No framework, no build step, nothing fetched
// from elsewhere; charts are SVG drawn below.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "text") node.textContent = value; else if (value !== false && value != null) node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
};

// -- talking to the server: every error is a readable message ------------------------------------------
async function api(path, body) {
  const options = body === undefined ? {} : {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json", "X-Peftkit-UI": "1" },
  };
  const response = await fetch(path, options);
  const answer = await response.json().catch(() => ({ error: `HTTP ${response.status}` }));
  if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
  return answer;
}

function debounce(fn, ms) {
  let timer;
  return (...args) => { clearTimeout(timer); timer = setTimeout(() => fn(...args), ms); };
}

const fmtTime = (s) => s == null ? "–" : s < 90 ? `${Math.round(s)} s` : s < 5400 ? `${(s / 60).toFixed(1)} min` : `${(s / 3600).toFixed(1)} h`;
const fmtNum = (x) => x == null ? "–" : x === 0 ? "0" : Math.abs(x) >= 1e-3 && Math.abs(x) < 1e4 ? (+x.toPrecision(4)).toString() : x.toExponential(2);

// -- pages ---------------------------------------------------------------------------------------------
const pages = { new: showNew, runs: showRuns, run: showRun, playground: showPlayground, reports: showReports };
let poller = null;

function route() {
  clearInterval(poller);
  const [page, arg] = (location.hash.slice(1) || "new").split("/");
  const name = pages[page] ? page : "new";
  document.querySelectorAll(".page").forEach((p) => p.classList.toggle("shown", p.id === `page-${name}`));
  document.querySelectorAll("nav a").forEach((a) => a.classList.toggle("active", a.dataset.page === (name === "run" ? "runs" : name)));
  pages[name](arg && decodeURIComponent(arg));
}

// -- New run: the form is generated from the config dataclasses ------------------------------------------
let formSpec = null;

async function showNew() {
  if (formSpec) return;
  formSpec = await api("/api/form");
  $("#runs-dir").textContent = formSpec.runs_dir;
  const box = $("#form-sections");
  box.replaceChildren(...formSpec.sections.map(sectionNode));
  box.append(datalist("dl-models", formSpec.model_folders), datalist("dl-files", formSpec.data_files),
    datalist("dl-adapters", formSpec.adapters), datalist("dl-datasets", []));
  fillCatalog();
  applyVisibility();
  $("#run-form").addEventListener("input", onFormChange);
  $("#run-form").addEventListener("change", onFormChange);
  $("#run-form").addEventListener("submit", launch);
  $("#copy-yaml").addEventListener("click", copyYaml);
  onFormChange();
}

function copyYaml() {  // the Clipboard API exists on 127.0.0.1 / https only; elsewhere, select the text for Ctrl-C
  if (navigator.clipboard) { navigator.clipboard.writeText($("#yaml").textContent); return; }
  getSelection().selectAllChildren($("#yaml"));
}

function datalist(id, items) { return el("datalist", { id }, ...items.map((v) => el("option", { value: v }))); }

async function fillCatalog() {  // built-in names come from a child process; it may still be starting
  let catalog = formSpec.catalog;
  while (!catalog) {
    await new Promise((r) => setTimeout(r, 2000));
    catalog = (await api("/api/catalog")).catalog;
  }
  $("#dl-models").prepend(...catalog.models.map((v) => el("option", { value: v })));
  $("#dl-datasets").append(...catalog.datasets.map((v) => el("option", { value: v })));
}

const LISTS = { model: "dl-models", "data.train": "dl-files", "data.validation": "dl-files", "data.test": "dl-files",
  "data.dataset": "dl-datasets", "train.init_adapter": "dl-adapters" };

function sectionNode(section) {
  const box = el("fieldset", { "data-section": section.name });
  if (section.owner) box.dataset[section.owner.by] = section.owner.values.join(" ");
  box.append(el("legend", { text: section.name }), el("p", { class: "section-help", text: section.help }));
  for (const field of section.fields) box.append(fieldNode(field));
  return box;
}

function fieldNode(field) {
  const id = `f-${field.key.replace(/\./g, "-")}`;
  let input;
  if (field.kind === "select") {
    input = el("select", { id, name: field.key }, ...field.choices.map((c) => el("option", { value: c, text: c })));
    input.value = field.default;
  } else if (field.kind === "checkbox") {
    input = el("input", { id, name: field.key, type: "checkbox" });
    input.checked = field.default;
  } else {
    input = el("input", { id, name: field.key, value: field.default, list: LISTS[field.key] || false,
      placeholder: field.optional ? "null" : false, inputmode: field.kind === "number" ? "decimal" : false });
  }
  input.dataset.default = field.kind === "checkbox" ? String(field.default) : field.default;
  return el("label", { class: "field" }, el("span", { text: field.key }), input, el("small", { class: "help", text: field.help }));
}

function applyVisibility() {
  const method = $("#f-method").value, task = $("#f-task").value;
  document.querySelectorAll("fieldset[data-section]").forEach((box) => {
    const owners = box.dataset.method || box.dataset.task;
    box.hidden = owners ? !owners.split(" ").includes(box.dataset.method ? method : task) : false;
  });
}

function formValues() {  // the visible fields that differ from their defaults, as typed
  const values = {};
  document.querySelectorAll("fieldset[data-section]:not([hidden]) [name]").forEach((input) => {
    const value = input.type === "checkbox" ? input.checked : input.value;
    if (String(value) !== input.dataset.default) values[input.name] = value;
  });
  return values;
}

let checkSeq = 0;
const checkForm = debounce(async () => {
  const seq = ++checkSeq;
  const answer = await api("/api/check", { values: formValues(), name: $("#run-name").value }).catch((e) => ({ ok: false, error: e.message }));
  if (seq !== checkSeq) return;  // the form changed since: a newer answer is coming
  $("#form-error").textContent = answer.ok ? "" : answer.error;
  $("#launch").disabled = !answer.ok;
  $("#yaml").textContent = answer.ok ? answer.yaml : "(fix the form first)";
  if (answer.ok) { $("#command").textContent = answer.command; estimate(); }
}, 300);

let estimateSeq = 0;
const estimate = debounce(async () => {
  const seq = ++estimateSeq;
  $("#estimate").textContent = "estimating… (a child process loads the model's shapes)";
  const answer = await api("/api/estimate", { values: formValues() }).catch((e) => ({ ok: false, error: e.message }));
  if (seq !== estimateSeq || answer.superseded) return;  // a newer estimate is on its way
  if (!answer.ok) { $("#estimate").textContent = answer.error; return; }
  const est = answer.estimate, gib = (b) => (b / 2 ** 30).toFixed(2);
  const rows = est.rows.map(([label, bytes]) => el("tr", {}, el("td", { text: label }), el("td", { text: `${gib(bytes)} GiB` })));
  rows.push(el("tr", {}, el("th", { text: "total" }), el("th", { text: `${gib(est.total)} GiB` })));
  rows.push(el("tr", {}, el("td", { text: "trainable parameters" }), el("td", { text: est.trainable_params.toLocaleString() })));
  $("#estimate").replaceChildren(el("table", { id: "estimate-table" }, ...rows),
    el("p", { class: "muted", text: `${est.method}, ${est.batch[0]} × ${est.batch[1]} tokens per forward` }));
}, 900);

function onFormChange(event) {
  if (!event || ["method", "task"].includes(event.target.name)) applyVisibility();
  checkForm();
}

async function launch(event) {
  event.preventDefault();
  $("#launch").disabled = true;
  try {
    const answer = await api("/api/runs", { values: formValues(), name: $("#run-name").value });
    location.hash = `#run/${encodeURIComponent(answer.name)}`;
  } catch (e) {
    $("#form-error").textContent = e.message;
  } finally {
    $("#launch").disabled = false;
  }
}

// -- Runs ----------------------------------------------------------------------------------------------
async function showRuns() {
  const draw = async () => {
    const { runs } = await api("/api/runs");
    $("#runs-table tbody").replaceChildren(...runs.map((r) => el("tr", { "data-run": r.name },
      el("td", {}, el("a", { href: `#run/${encodeURIComponent(r.name)}`, text: r.name })),
      el("td", { class: `status ${r.status}`, text: r.status }), el("td", { text: r.method }), el("td", { text: r.task }),
      el("td", { text: r.total ? `${r.step} / ${r.total}` : String(r.step) }), el("td", { text: fmtNum(r.best_val_loss) }),
      el("td", { text: fmtTime(r.wall_s) }))));
  };
  await draw();
  poller = setInterval(draw, 3000);
}

// -- one run: live curves from metrics.jsonl -------------------------------------------------------------
const COLORS = ["#2f6fd6", "#d9822b", "#1e7b34", "#8e44ad"];

function lineChart(svg, series) {
  const W = 360, H = 200, L = 46, R = 8, T = 8, B = 22;
  const points = series.flatMap((s) => s.points);
  svg.replaceChildren();
  svg.dataset.points = String(series.length ? series[0].points.length : 0);
  if (!points.length) { svg.append(svgEl("text", { x: W / 2 - 30, y: H / 2, text: "no data yet" })); return; }
  const xs = points.map((p) => p[0]), ys = points.map((p) => p[1]);
  const x0 = Math.min(...xs), x1 = Math.max(...xs, x0 + 1), y0 = Math.min(...ys), y1 = Math.max(...ys, y0 + 1e-12);
  const px = (x) => L + (x - x0) / (x1 - x0) * (W - L - R), py = (y) => H - B - (y - y0) / (y1 - y0) * (H - T - B);
  svg.append(svgEl("line", { class: "axis", x1: L, y1: H - B, x2: W - R, y2: H - B }), svgEl("line", { class: "axis", x1: L, y1: T, x2: L, y2: H - B }),
    svgEl("text", { x: 2, y: T + 8, text: fmtNum(y1) }), svgEl("text", { x: 2, y: H - B, text: fmtNum(y0) }),
    svgEl("text", { x: L, y: H - 6, text: `step ${x0}` }), svgEl("text", { x: W - R - 50, y: H - 6, text: `step ${x1}` }));
  series.forEach((s, i) => {
    const color = COLORS[i % COLORS.length];
    svg.append(svgEl("polyline", { class: "series", stroke: color, points: s.points.map((p) => `${px(p[0])},${py(p[1])}`).join(" ") }));
    if (s.points.length < 30) s.points.forEach((p) => svg.append(svgEl("circle", { class: "dot", fill: color, r: 2.5, cx: px(p[0]), cy: py(p[1]) })));
    if (series.length > 1) svg.append(svgEl("text", { x: W - R - 90, y: T + 10 + 12 * i, fill: color, text: s.name }));
  });
}

function svgEl(tag, attrs) {
  const node = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [key, value] of Object.entries(attrs)) if (key === "text") node.textContent = value; else node.setAttribute(key, value);
  return node;
}

async function showRun(name) {
  let records = [], version = 0;
  $("#run-title").textContent = name;
  $("#run-report").hidden = true;
  const action = (path) => async () => {
    $("#run-error").textContent = "";
    try { await api(`/api/runs/${encodeURIComponent(name)}/${path}`, {}); } catch (e) { $("#run-error").textContent = e.message; }
    update();
  };
  $("#stop").onclick = action("stop");
  $("#resume").onclick = action("resume");
  $("#evaluate").onclick = action("evaluate");
  const update = async () => {
    let run;
    try {
      run = await api(`/api/runs/${encodeURIComponent(name)}?since=${records.length}&version=${version}`);
    } catch (e) { $("#run-error").textContent = e.message; return; }
    records = run.reset ? run.records : records.concat(run.records);
    version = run.version;
    drawRun(run, records);
  };
  await update();
  poller = setInterval(update, 1500);
}

function drawRun(run, records) {
  const s = run.summary, steps = records.filter((r) => "loss" in r);
  $("#run-status").textContent = s.status;
  $("#run-status").className = `status ${s.status}`;
  const eta = s.status === "running" && s.eta_s != null ? `, about ${fmtTime(s.eta_s)} left` : "";
  $("#run-progress-text").textContent = `step ${s.step}${s.total ? ` of ${s.total}` : ""}${eta}` +
    (s.best_val_loss != null ? ` · best validation loss ${fmtNum(s.best_val_loss)}` : "");
  $("#run-bar").style.width = s.total ? `${Math.min(100, 100 * s.step / s.total)}%` : "0";
  $("#stop").disabled = s.status !== "running";
  $("#resume").disabled = !["stopped", "failed"].includes(s.status);
  $("#evaluate").disabled = !s.adapter || s.task !== "generation" || run.eval.running;
  lineChart($("#chart-loss"), [{ name: "train", points: steps.map((r) => [r.step, r.loss]) }]);
  lineChart($("#chart-lr"), [{ name: "lr", points: steps.filter((r) => r.lr != null).map((r) => [r.step, r.lr]) }]);
  lineChart($("#chart-val"), [{ name: "val", points: records.filter((r) => r.val_loss != null).map((r) => [r.step, r.val_loss]) }]);
  $("#run-log").textContent = run.log;
  $("#run-config").textContent = run.config;
  $("#run-command").textContent = run.command;
  const report = run.reports.find((r) => r.startsWith("eval/")) || run.reports[0];
  $("#eval-status").textContent = run.eval.running ? "evaluating against the base model…" :
    report ? `report: ${report}` : run.eval.started && run.eval.exit_code ? `evaluation failed:\n${run.eval.log}` : "not evaluated yet";
  const src = report ? `/files/${encodeURIComponent(s.name)}/${report}` : "";
  if (src && $("#run-report").getAttribute("src") !== src) { $("#run-report").src = src; }
  $("#run-report").hidden = !src;
}

// -- Playground: base + adapters side by side, answers streamed -----------------------------------------
let playground = null, served = null;

async function showPlayground() {
  playground = await api("/api/playground");
  const base = $("#pg-base");
  if (!base.options.length || base.dataset.filled !== JSON.stringify(playground.bases)) {
    base.replaceChildren(...playground.bases.map((b) => el("option", { value: b, text: b })));
    base.dataset.filled = JSON.stringify(playground.bases);
  }
  base.onchange = drawAdapters;
  drawAdapters();
  $("#pg-load").onclick = loadModels;
  $("#pg-generate").onclick = generate;
  $("#pg-example").onchange = () => { if ($("#pg-example").value) $("#pg-prompt").value = $("#pg-example").value; };
  if (!playground.bases.length) $("#pg-state").textContent = "no finished run yet: train one first";
}

function drawAdapters() {
  const runs = playground.adapters.filter((a) => a.base === $("#pg-base").value);
  $("#pg-adapters").replaceChildren(el("legend", { text: "adapters" }), ...runs.map((a) => el("label", {},
    el("input", { type: "checkbox", value: a.run, name: "pg-adapter" }), ` ${a.run} (${a.method}) `)));
  $("#pg-adapters").onchange = (event) => { if (event.target.checked) loadExamples(event.target.value); };
}

async function loadModels() {
  const runs = [...document.querySelectorAll("[name=pg-adapter]:checked")].map((i) => i.value);
  $("#pg-error").textContent = "";
  $("#pg-state").textContent = "loading the base and adapters…";
  $("#pg-load").disabled = true;
  try {
    served = await api("/api/playground/load", { base: $("#pg-base").value, runs });
    $("#pg-state").textContent = `ready: base + ${runs.length} adapter(s)`;
    $("#pg-answers").replaceChildren(...columns().map(([title]) => el("div", { class: "answer" }, el("h3", { text: title }), el("div", { class: "text" }))));
  } catch (e) {
    $("#pg-state").textContent = "";
    $("#pg-error").textContent = e.message;
  } finally {
    $("#pg-load").disabled = false;
  }
}

function columns() {  // [title, served model name]
  return [["base", served.base], ...Object.entries(served.adapters)];
}

async function loadExamples(run) {
  try {
    const { examples } = await api(`/api/playground/examples?run=${encodeURIComponent(run)}`);
    $("#pg-example").replaceChildren(el("option", { value: "", text: "(type your own prompt)" }),
      ...examples.map((ex, i) => el("option", { value: ex.input, text: `${i + 1}: ${ex.input.slice(0, 80)}` })));
  } catch (e) {
    $("#pg-error").textContent = e.message;
  }
}

async function generate() {
  $("#pg-error").textContent = "";
  if (!served) { $("#pg-error").textContent = "press Load first"; return; }
  const settings = { prompt: $("#pg-prompt").value, max_tokens: +$("#pg-max").value, temperature: +$("#pg-temp").value, top_p: +$("#pg-topp").value };
  const boxes = [...document.querySelectorAll("#pg-answers .answer .text")];
  await Promise.all(columns().map(([, model], i) => streamAnswer({ ...settings, model }, boxes[i])));
}

async function streamAnswer(body, box) {
  box.textContent = "";
  box.classList.remove("done");
  const response = await fetch("/api/playground/complete", {
    method: "POST", body: JSON.stringify(body), headers: { "Content-Type": "application/json", "X-Peftkit-UI": "1" },
  });
  if (!response.ok) {
    const answer = await response.json().catch(() => ({}));
    $("#pg-error").textContent = answer.error || `HTTP ${response.status}`;
    return;
  }
  const reader = response.body.getReader(), decoder = new TextDecoder();
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    box.textContent += decoder.decode(value, { stream: true });
  }
  box.classList.add("done");
}

// -- Reports ---------------------------------------------------------------------------------------------
async function showReports() {
  const { runs } = await api("/api/runs");
  $("#reports-table tbody").replaceChildren(...runs.map((r) => {
    const links = r.reports.map((path) => el("a", { href: `/files/${encodeURIComponent(r.name)}/${path}`, "data-report": path, text: path }));
    links.forEach((a) => a.addEventListener("click", (e) => {
      e.preventDefault();
      $("#report-view").src = a.getAttribute("href");
      $("#report-view").hidden = false;
    }));
    return el("tr", {}, el("td", {}, el("a", { href: `#run/${encodeURIComponent(r.name)}`, text: r.name })),
      el("td", {}, ...(links.length ? links : [el("span", { class: "muted", text: "none" })])),
      el("td", {}, r.adapter && r.task === "generation" ? el("a", { href: `#run/${encodeURIComponent(r.name)}`, text: "evaluate…" }) : ""));
  }));
}

window.addEventListener("hashchange", route);
route();
