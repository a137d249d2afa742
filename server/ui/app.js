// The playground's entry point: the API key, the model list, the tabs, and each part's wiring.

import { apiKey, call, setApiKey } from "./api.js";
import { initCode } from "./code.js";
import { el } from "./dom.js";
import { initEqualizer } from "./equalizer.js";
import { clearErrors, showError } from "./errors.js";
import { initExperiments, loadExperiments } from "./experiments.js";
import { initRun, selectedModel } from "./run.js";
import { initWorkshop } from "./workshop.js";

/** Fill the model list from /v1/models (served names, then presets `base:name`); select `pick`. */
async function loadModels(pick) {
  const select = document.getElementById("model");
  const previous = pick || select.value;
  try {
    const body = await call("GET", "/v1/models");
    const bases = body.data.filter((m) => !m.parent);
    const presets = body.data.filter((m) => m.parent);
    select.replaceChildren(
      el("optgroup", { label: "Models" }, ...bases.map((m) => el("option", { value: m.id, dataset: { base: m.id } }, m.id))),
      el("optgroup", { label: "Presets" }, ...presets.map((m) =>
        el("option", { value: m.id, dataset: { base: m.parent } }, m.id))));
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
    document.querySelector('[data-error-for="model"]').textContent = "";
    document.querySelector('[data-error-for="auth"]').textContent = "";
  } catch (err) {
    showError(err, "model");
  }
}

function initKey() {
  const input = document.getElementById("api-key");
  input.value = apiKey();
  const commit = () => {
    if (input.value.trim() === apiKey()) return;
    setApiKey(input.value.trim());
    clearErrors();
    loadModels();
  };
  input.addEventListener("change", commit);
  input.addEventListener("keydown", (e) => { if (e.key === "Enter") commit(); });
  document.getElementById("forget-key").addEventListener("click", () => {
    input.value = "";
    setApiKey("");
    input.focus();
  });
}

/** Tabs as WAI-ARIA describes them: click or arrow keys switch, only the selected tab is in the tab order. */
function initTabs(onShow) {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  const show = (tab) => {
    for (const t of tabs) {
      const selected = t === tab;
      t.setAttribute("aria-selected", String(selected));
      t.tabIndex = selected ? 0 : -1;
      document.getElementById(t.getAttribute("aria-controls")).hidden = !selected;
    }
    onShow(tab.id);
  };
  for (const [i, tab] of tabs.entries()) {
    tab.addEventListener("click", () => show(tab));
    tab.addEventListener("keydown", (e) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[e.key];
      if (!step) return;
      const next = tabs[(i + step + tabs.length) % tabs.length];
      next.focus();
      show(next);
    });
  }
}

initKey();
initEqualizer();
initRun();
initWorkshop();
initCode(loadModels);
const live = initExperiments(() => selectedModel().base);
initTabs((id) => {
  if (id === "tab-experiments") loadExperiments();
  live();
});
loadModels();
