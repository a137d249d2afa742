// Side by side: the same prompt, seed and sampling, unsteered and steered, both streamed; one
// Stop aborts both. Then a heatmap of the equalizer's features over each output, read through
// /v1/features/inspect.

import { call, streamChat } from "./api.js";
import { clearErrors, showError } from "./errors.js";
import { el } from "./dom.js";
import { featureIds, steering } from "./equalizer.js";

let controller = null;

/** The selected model and the base model it steers (a preset `base:name` has base `base`). */
export function selectedModel() {
  const select = document.getElementById("model");
  const option = select.selectedOptions[0];
  return { model: select.value, base: option ? option.dataset.base || select.value : select.value };
}

function number(id) {
  const raw = document.getElementById(id).value;
  return raw === "" ? undefined : Number(raw);
}

/** The request both panes share (no `steering`, no `stream`), from the prompt and sampling. */
export function commonRequest() {
  const body = {
    model: selectedModel().base,
    messages: [{ role: "user", content: document.getElementById("prompt").value }],
    max_tokens: number("max-tokens"),
    temperature: number("temperature"),
    seed: number("seed"),
    repetition_penalty: number("repetition-penalty"),
  };
  for (const k of Object.keys(body)) if (body[k] === undefined) delete body[k];
  return body;
}

/** The steered request: the selected model (maybe a preset) with the equalizer's steering. */
export function steeredRequest() {
  const body = { ...commonRequest(), model: selectedModel().model };
  const s = steering();
  if (s) body.steering = s;
  return body;
}

/** Stream `body` into pane `which` ("base" or "steered"); resolves to the text or null.
 * `onFail` runs when the server refuses or fails it (the pair is then stopped). */
async function streamInto(which, body, signal, onFail) {
  const out = document.getElementById(`out-${which}`);
  const meta = document.getElementById(`meta-${which}`);
  out.textContent = "";
  meta.textContent = "";
  out.dataset.state = "streaming";
  const facts = [];
  try {
    await streamChat(body, signal,
      (headers) => {
        const hash = headers.get("x-steering-hash");
        if (hash) {
          out.dataset.steeringHash = hash;
          facts.push(`x-steering-hash ${hash}`);
        } else delete out.dataset.steeringHash;
      },
      (chunk) => {
        for (const choice of chunk.choices || []) out.textContent += choice.delta?.content || "";
        if (chunk.usage) facts.push(`${chunk.usage.completion_tokens} tokens`);
        if (chunk.id && !out.dataset.responseId) out.dataset.responseId = chunk.id;
      });
    out.dataset.state = "done";
    meta.textContent = facts.join(" · ");
    return out.textContent;
  } catch (err) {
    if (err.name === "AbortError") {
      out.dataset.state = "aborted";
      meta.textContent = "stopped";
    } else {
      out.dataset.state = "error";
      showError(err, "run");
      onFail();
    }
    return null;
  }
}

async function run() {
  clearErrors();
  if (controller) controller.abort();
  controller = new AbortController();
  const pair = controller;
  const signal = pair.signal;
  const fail = () => pair.abort();
  for (const which of ["base", "steered"]) {
    document.getElementById(`heat-${which}`).replaceChildren();
    delete document.getElementById(`out-${which}`).dataset.responseId;
  }
  const runButton = document.getElementById("run");
  const stop = document.getElementById("stop");
  runButton.disabled = true;
  stop.disabled = false;
  const texts = await Promise.all([
    streamInto("base", commonRequest(), signal, fail),
    streamInto("steered", steeredRequest(), signal, fail),
  ]);
  runButton.disabled = false;
  stop.disabled = true;
  if (signal.aborted) return;
  controller = null;
  if (document.getElementById("heatmap-on").checked && featureIds().length && texts.every((t) => t)) {
    await heatmaps(texts);
  }
}

function stop() {
  if (controller) controller.abort();
}

/** Per-token activations of the equalizer's features over both outputs (one color scale). */
async function heatmaps([baseText, steeredText]) {
  const names = featureIds();
  const read = (text) => call("POST", "/v1/features/inspect", {
    model: selectedModel().base, text, features: names, layers: [], top_k: 0,
  });
  let results;
  try {
    results = await Promise.all([read(baseText), read(steeredText)]);
  } catch (err) {
    showError(err, "inspect");
    return;
  }
  const peak = {};
  for (const r of results) {
    for (const t of r.tokens) {
      for (const n of names) peak[n] = Math.max(peak[n] || 1e-9, Math.abs(t.features[n]));
    }
  }
  results.forEach((r, i) => renderHeatmap(document.getElementById(i ? "heat-steered" : "heat-base"),
                                          r.tokens, names, peak));
}

function renderHeatmap(box, tokens, names, peak) {
  box.replaceChildren();
  for (const name of names) {
    const row = el("div", { class: "heat-row", dataset: { feature: name } },
      el("span", { class: "heat-name" }, name));
    for (const t of tokens) {
      const v = t.features[name];
      const a = Math.min(1, Math.abs(v) / peak[name]);
      const cell = el("span", { class: "cell", title: `${name} = ${v.toFixed(3)} at “${t.token}”`,
                                dataset: { value: String(v) } }, t.token);
      cell.style.background = v >= 0 ? `rgba(234, 88, 12, ${a.toFixed(3)})` : `rgba(37, 99, 235, ${a.toFixed(3)})`;
      row.append(cell);
    }
    box.append(row);
  }
}

export function initRun() {
  document.getElementById("run").addEventListener("click", run);
  document.getElementById("stop").addEventListener("click", stop);
  document.getElementById("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && (e.ctrlKey || e.metaKey)) run();
  });
}
