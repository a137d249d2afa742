// The "New feature" panel: a custom feature made by the server's workshop (POST /v1/features),
// its progress by stage, then its dose curve, and the feature put on the equalizer.

import { call } from "./api.js";
import { el } from "./dom.js";
import { addFeature } from "./equalizer.js";
import { clearErrors, showError } from "./errors.js";

const POLL_MS = 1000;
const STAGE_NAMES = { data: "generating data", train: "training", calibrate: "calibrating", store: "storing" };
let polling = null;

/** Example pairs from the textarea: one per line, "positive || negative". */
function examples(text) {
  const lines = text.split("\n").map((l) => l.trim()).filter(Boolean);
  if (!lines.length) return undefined;
  return lines.map((line) => {
    const [positive, negative = ""] = line.split("||").map((s) => s.trim());
    return { positive, negative };
  });
}

function panel() {
  return document.getElementById("workshop");
}

function setProgress(job) {
  const bar = document.getElementById("workshop-progress");
  bar.hidden = false;
  bar.value = job.progress;
  const stage = job.stage ? STAGE_NAMES[job.stage] || job.stage : job.status;
  document.getElementById("workshop-status").textContent =
    `${job.status}${job.status === "running" ? ` — ${stage}` : ""} (${Math.round(job.progress * 100)} %)`;
}

/** The dose curve (score and perplexity ratio against strength) as an SVG line chart. */
export function doseCurve(effect) {
  const rows = (effect && effect.curve) || [];
  const W = 320, H = 160, P = 28;
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
  svg.setAttribute("role", "img");
  svg.setAttribute("class", "dose-curve");
  if (!rows.length) return svg;
  const xs = rows.map((r) => r.strength), maxX = Math.max(...xs, 1);
  const series = [["score", "#c2410c"], ["ppl_ratio", "#2563eb"]];
  const maxY = Math.max(1.5, ...rows.flatMap((r) => series.map(([k]) => r[k] || 0)));
  const minY = Math.min(0, ...rows.map((r) => r.score || 0));
  const x = (v) => P + (v / maxX) * (W - 2 * P);
  const y = (v) => H - P - ((v - minY) / (maxY - minY || 1)) * (H - 2 * P);
  const add = (tag, attrs) => {
    const n = document.createElementNS("http://www.w3.org/2000/svg", tag);
    for (const [k, v] of Object.entries(attrs)) n.setAttribute(k, String(v));
    svg.append(n);
    return n;
  };
  add("line", { x1: P, y1: H - P, x2: W - P, y2: H - P, stroke: "#a8a29e" });
  add("line", { x1: P, y1: P, x2: P, y2: H - P, stroke: "#a8a29e" });
  add("line", { x1: x(1), y1: P, x2: x(1), y2: H - P, stroke: "#a8a29e", "stroke-dasharray": "3 3" });
  add("text", { x: x(1) + 3, y: P + 10, "font-size": 10 }).textContent = "strength 1";
  for (const [key, color] of series) {
    add("polyline", { fill: "none", stroke: color, "stroke-width": 2,
                      points: rows.map((r) => `${x(r.strength)},${y(r[key] || 0)}`).join(" "),
                      "data-series": key });
  }
  add("text", { x: P, y: H - 6, "font-size": 10 }).textContent = "strength →";
  add("text", { x: W - P - 120, y: 12, "font-size": 10, fill: "#c2410c" }).textContent = "score";
  add("text", { x: W - P - 70, y: 12, "font-size": 10, fill: "#2563eb" }).textContent = "perplexity ×";
  const title = document.createElementNS("http://www.w3.org/2000/svg", "title");
  title.textContent = "Dose curve: " + rows.map((r) =>
    `strength ${r.strength}: score ${r.score}, perplexity ×${r.ppl_ratio}`).join("; ");
  svg.prepend(title);
  return svg;
}

function done(job) {
  const f = job.feature;
  const effect = f && f.calibration && f.calibration.effect;
  const result = document.getElementById("workshop-result");
  result.replaceChildren(
    el("p", { class: "note" }, `${f.id} is ready (${job.method}, ${job.data.pairs} pairs, ` +
       `${job.data.source}); it is on the equalizer.`),
    effect ? doseCurve(effect) : el("p", { class: "hint" }, "Not calibrated: strength 1 is the built unit."));
  addFeature(f);
}

async function poll(id) {
  const job = await call("GET", `/v1/features/jobs/${encodeURIComponent(id)}`);
  setProgress(job);
  if (job.status === "running" || job.status === "queued") return false;
  document.getElementById("workshop-start").disabled = false;
  document.getElementById("workshop-cancel").disabled = true;
  if (job.status === "done") done(job);
  else showError({ status: job.status, message: job.error || job.status }, "workshop", panel());
  return true;
}

function follow(id) {
  document.getElementById("workshop-cancel").dataset.job = id;
  polling = setInterval(async () => {
    try {
      if (await poll(id)) clearInterval(polling);
    } catch (err) {
      clearInterval(polling);
      showError(err, "workshop", panel());
    }
  }, POLL_MS);
}

async function start(event) {
  event.preventDefault();
  const root = panel();
  clearErrors(root);
  document.getElementById("workshop-result").replaceChildren();
  const body = {
    name: document.getElementById("workshop-name").value.trim(),
    description: document.getElementById("workshop-description").value.trim(),
    method: document.getElementById("workshop-method").value,
    calibrate: document.getElementById("workshop-calibrate").checked,
  };
  const ex = examples(document.getElementById("workshop-examples").value);
  if (ex) body.examples = ex;
  try {
    const job = await call("POST", "/v1/features", body);
    document.getElementById("workshop-start").disabled = true;
    document.getElementById("workshop-cancel").disabled = false;
    setProgress(job);
    follow(job.id);
  } catch (err) {
    showError(err, "workshop", root);
  }
}

async function cancel() {
  const id = document.getElementById("workshop-cancel").dataset.job;
  try {
    await call("DELETE", `/v1/features/jobs/${encodeURIComponent(id)}`);
  } catch (err) {
    showError(err, "workshop", panel());
  }
}

export function initWorkshop() {
  document.getElementById("workshop-form").addEventListener("submit", start);
  document.getElementById("workshop-cancel").addEventListener("click", cancel);
}
