// The Experiments tab: experiments with their variants, live results (n, mean score with its
// 95% CI, p-values against the control, the sample-ratio check), and a response from the
// experiment rated with thumbs up/down, which posts feedback for the variant it was served.

import { call } from "./api.js";
import { clearErrors, showError } from "./errors.js";
import { el } from "./dom.js";

const USER_STORE = "steer.userId";
let baseModel = () => "";
let timer = null;

/** A stable id of this browser: the experiment's assignment unit (`user`). */
function userId() {
  let id = localStorage.getItem(USER_STORE);
  if (!id) {
    id = `ui-${crypto.randomUUID ? crypto.randomUUID() : Math.random().toString(16).slice(2)}`;
    localStorage.setItem(USER_STORE, id);
  }
  return id;
}

const fmt = (x, digits = 3) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function variantSteering(v) {
  if (v.preset) return `preset ${v.preset}`;
  if (!v.steering) return "unsteered";
  const parts = Object.entries(v.steering.features || {}).map(([name, s]) =>
    `${name} ${typeof s === "number" ? s : `${s.mode || "add"} ${s.strength ?? ""}`}`.trim());
  if (v.steering.vectors?.length) parts.push(`${v.steering.vectors.length} raw vector(s)`);
  return parts.join(", ") || "unsteered";
}

function variantsTable(exp) {
  return el("table", { class: "variants", "aria-label": `Variants of ${exp.name}` },
    el("thead", {}, el("tr", {}, ...["Variant", "Weight", "Steering"].map((h) => el("th", { scope: "col" }, h)))),
    el("tbody", {}, ...exp.variants.map((v) => el("tr", { dataset: { variant: v.name } },
      el("th", { scope: "row" }, v.name + (v.control ? " (control)" : "")),
      el("td", {}, String(v.weight)), el("td", {}, variantSteering(v))))));
}

function resultsTable(res) {
  const rows = res.variants.map((v) => {
    const vs = v.vs_control || {};
    return el("tr", { dataset: { variant: v.name } },
      el("th", { scope: "row" }, v.name + (v.control ? " (control)" : "")),
      el("td", { class: "n" }, String(v.n)),
      el("td", {}, v.score.n ? `${fmt(v.score.mean)} [${fmt(v.score.ci95[0])}, ${fmt(v.score.ci95[1])}]` : "–"),
      el("td", {}, v.labels.n ? `${v.labels.good}/${v.labels.n} (${fmt(v.labels.good_rate, 2)})` : "–"),
      el("td", {}, v.control ? "control" : fmt(vs.score_p_value)),
      el("td", {}, v.control ? "control" : fmt(vs.good_rate_p_value)));
  });
  const srm = res.sample_ratio || {};
  return [
    el("table", { class: "results-table", "aria-label": `Results of ${res.experiment}` },
      el("thead", {}, el("tr", {}, ...["Variant", "n", "Mean score [95% CI]", "Good", "p (score)", "p (good)"]
        .map((h) => el("th", { scope: "col" }, h)))),
      el("tbody", {}, ...rows)),
    el("p", { class: "note" }, `${res.n} measured responses · sample ratio p = ${fmt(srm.p_value)}`),
    ...res.warnings.map((w) => el("p", { class: "warning", role: "status" }, `⚠ ${w}`)),
  ];
}

async function loadResults(card) {
  const name = card.dataset.experiment;
  const box = card.querySelector(".live");
  try {
    const res = await call("GET", `/v1/experiments/${encodeURIComponent(name)}/results`);
    box.replaceChildren(...resultsTable(res));
    card.querySelector('[data-error-for="results"]').textContent = "";
  } catch (err) {
    showError(err, "results", card);
  }
}

async function tryIt(card, exp) {
  clearErrors(card);
  const out = card.querySelector(".exp-output");
  const rate = card.querySelector(".rate");
  rate.hidden = true;
  out.textContent = "…";
  try {
    const body = await call("POST", "/v1/chat/completions", {
      model: `${baseModel()}:exp/${exp.name}`, user: userId(), max_tokens: 32, temperature: 0.7,
      messages: [{ role: "user", content: card.querySelector("textarea").value }],
    });
    out.textContent = body.choices[0].message.content;
    out.dataset.responseId = body.id;
    out.dataset.variant = body.experiment?.variant || "";
    card.querySelector(".served").textContent = `variant ${out.dataset.variant} · ${body.id}`;
    rate.hidden = false;
  } catch (err) {
    out.textContent = "";
    showError(err, "try", card);
  }
}

async function feedback(card, label) {
  const out = card.querySelector(".exp-output");
  const status = card.querySelector(".feedback-status");
  status.textContent = "";
  const path = `/v1/experiments/${encodeURIComponent(card.dataset.experiment)}/feedback`;
  const body = { response_id: out.dataset.responseId, label };
  try {
    let fb;
    for (let attempt = 0; ; attempt++) {
      try {
        fb = await call("POST", path, body);
        break;
      } catch (err) {
        // The exposure is stored just after the response ends: a quick click may precede it.
        if (err.status !== 404 || err.param !== "response_id" || attempt >= 4) throw err;
        await new Promise((done) => setTimeout(done, 250));
      }
    }
    status.textContent = `Feedback “${fb.label}” ${fb.status} for variant ${fb.variant}.`;
    await loadResults(card);
  } catch (err) {
    showError(err, "feedback", card);
  }
}

/** A thumb icon (inline SVG: no icon font or emoji font needed). */
function thumb(down = false) {
  const ns = "http://www.w3.org/2000/svg";
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("viewBox", "0 0 24 24");
  svg.setAttribute("class", down ? "thumb down" : "thumb");
  svg.setAttribute("aria-hidden", "true");
  const path = document.createElementNS(ns, "path");
  path.setAttribute("d", "M2 10h4v11H2z M8 21h9.5a2 2 0 0 0 2-1.6l1.4-7A2 2 0 0 0 19 10h-5.5"
    + "l.8-4.2A2 2 0 0 0 12.3 3.5L8 10z");
  path.setAttribute("fill", "currentColor");
  svg.append(path);
  return svg;
}

function card(exp) {
  const id = `try-${exp.name.replace(/[^A-Za-z0-9_-]/g, "_")}`;
  const up = el("button", { type: "button", "aria-label": "Good response (thumbs up)" }, thumb(), " Good");
  const down = el("button", { type: "button", "aria-label": "Bad response (thumbs down)" }, thumb(true), " Bad");
  const go = el("button", { type: "button" }, "Get a response");
  const node = el("article", { class: "experiment", dataset: { experiment: exp.name } },
    el("h3", {}, exp.name, " ", el("span", { class: `status ${exp.status}` }, exp.status),
       el("span", { class: "note" }, ` unit: ${exp.unit}`)),
    exp.description ? el("p", {}, exp.description) : "",
    variantsTable(exp),
    el("h4", {}, "Live results"),
    el("div", { class: "live" }, el("p", { class: "hint" }, "loading…")),
    el("p", { class: "error", role: "alert", dataset: { errorFor: "results" } }),
    el("h4", {}, "Try it and rate"),
    el("label", { for: id }, `Prompt for ${exp.name}`),
    el("textarea", { id, rows: "2" }, "Tell me about your weekend."),
    el("div", { class: "row" }, go),
    el("p", { class: "error", role: "alert", dataset: { errorFor: "try" } }),
    el("div", { class: "exp-output output", "aria-live": "polite" }),
    el("p", { class: "served note" }),
    el("div", { class: "row rate", hidden: true }, up, down),
    el("p", { class: "error", role: "alert", dataset: { errorFor: "feedback" } }),
    el("p", { class: "feedback-status note", role: "status" }));
  go.addEventListener("click", () => tryIt(node, exp));
  up.addEventListener("click", () => feedback(node, "good"));
  down.addEventListener("click", () => feedback(node, "bad"));
  return node;
}

export async function loadExperiments() {
  const list = document.getElementById("experiment-list");
  clearErrors(document.getElementById("panel-experiments"));
  try {
    const body = await call("GET", "/v1/experiments");
    const cards = body.data.map(card);
    list.replaceChildren(...(cards.length ? cards : [el("p", { class: "hint" }, "No experiments on this server.")]));
    await Promise.all(cards.map(loadResults));
  } catch (err) {
    showError(err, "experiments");
  }
}

function live() {
  clearInterval(timer);
  timer = null;
  const visible = !document.getElementById("panel-experiments").hidden;
  if (visible && document.getElementById("live-results").checked) {
    timer = setInterval(() => {
      for (const c of document.querySelectorAll("#experiment-list .experiment")) loadResults(c);
    }, 5000);
  }
}

export function initExperiments(base) {
  baseModel = base;
  document.getElementById("refresh-experiments").addEventListener("click", loadExperiments);
  document.getElementById("live-results").addEventListener("change", live);
  return live;
}
