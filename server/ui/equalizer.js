// The equalizer: named features as sliders grouped by pack, a strength and a mode per feature,
// and the request's `steering` object they stand for.

import { call } from "./api.js";
import { el } from "./dom.js";
import { clearErrors, showError } from "./errors.js";

export const STRENGTH_MIN = -2;
export const STRENGTH_MAX = 2;
const MODES = ["add", "clamp", "ablate"];
/** A lowrank feature (a rank-r edit) has no scalar activation to pin: clamp is a 400 there. */
const modesOf = (hit) => (hit.kind === "lowrank" ? ["add", "ablate"] : MODES);

/** id ("pack/name") → {id, name, pack, strength, mode, row}; in the order they were added. */
const features = new Map();
let serial = 0;


/** The `steering` object of the current equalizer, or null when no feature is set. */
export function steering() {
  if (!features.size) return null;
  const out = {};
  for (const f of features.values()) {
    out[f.id] = f.mode === "ablate" ? { mode: "ablate" } : { strength: f.strength, mode: f.mode };
  }
  return { features: out };
}

/** The ids of the features on the equalizer. */
export function featureIds() {
  return [...features.keys()];
}

function packGroup(pack) {
  const sliders = document.getElementById("sliders");
  let group = sliders.querySelector(`fieldset[data-pack="${CSS.escape(pack)}"]`);
  if (!group) {
    group = el("fieldset", { dataset: { pack } }, el("legend", {}, pack));
    sliders.append(group);
  }
  return group;
}

/** Put feature `hit` (a /v1/features/search result) on the equalizer at strength 0. */
export function addFeature(hit) {
  if (features.has(hit.id)) {
    features.get(hit.id).row.querySelector('input[type="range"]').focus();
    return;
  }
  const n = ++serial;
  const f = { id: hit.id, name: hit.name, pack: hit.pack || "", strength: 0,
              mode: modesOf(hit).includes(hit.default_mode) ? hit.default_mode : "add" };
  const range = el("input", { type: "range", id: `strength-${n}`, min: String(STRENGTH_MIN),
                              max: String(STRENGTH_MAX), step: "0.05", value: "0" });
  const number = el("input", { type: "number", id: `strength-value-${n}`, step: "0.05", value: "0",
                               class: "strength" });
  const mode = el("select", { id: `mode-${n}` }, ...modesOf(hit).map((m) => el("option", { value: m }, m)));
  mode.value = f.mode;
  const remove = el("button", { type: "button", "aria-label": `Remove ${hit.id}` }, "×");
  const error = el("p", { class: "error", role: "alert",
                          dataset: { errorFor: `steering.features.${hit.id}` } });
  const beyond = ` (slider ${STRENGTH_MIN} to ${STRENGTH_MAX}; type a value for more)`;
  f.row = el("div", { class: "slider", dataset: { feature: hit.id } },
    el("label", { for: range.id, title: hit.description || "" }, hit.name),
    range,
    el("label", { for: number.id, class: "visually-hidden" }, `${hit.id} strength${beyond}`),
    number,
    el("label", { for: mode.id, class: "visually-hidden" }, `${hit.id} mode`),
    mode, remove, error);
  range.setAttribute("aria-label", `${hit.id} strength`);

  const set = (value, from) => {
    f.strength = Number.isFinite(value) ? value : 0;
    if (from !== range) range.value = String(Math.min(STRENGTH_MAX, Math.max(STRENGTH_MIN, f.strength)));
    if (from !== number) number.value = String(f.strength);
    error.textContent = "";
    f.row.classList.remove("has-error");
  };
  range.addEventListener("input", () => set(Number(range.value), range));
  number.addEventListener("input", () => set(Number(number.value), number));
  mode.addEventListener("change", () => {
    f.mode = mode.value;
    range.disabled = number.disabled = f.mode === "ablate";
  });
  remove.addEventListener("click", () => {
    const group = f.row.parentElement;
    f.row.remove();
    features.delete(f.id);
    if (!group.querySelector(".slider")) group.remove();
    document.getElementById("no-features").hidden = features.size > 0;
    document.getElementById("feature-query").focus();
  });
  range.disabled = number.disabled = f.mode === "ablate";
  features.set(f.id, f);
  packGroup(f.pack).append(f.row);
  document.getElementById("no-features").hidden = true;
  range.focus();
}

async function search(event) {
  event.preventDefault();
  const q = document.getElementById("feature-query").value.trim();
  const list = document.getElementById("search-results");
  clearErrors(document.querySelector(".equalizer"));
  list.replaceChildren();
  if (!q) return;
  try {
    const body = await call("GET", `/v1/features/search?q=${encodeURIComponent(q)}&limit=12`);
    if (!body.data.length) list.append(el("li", { class: "hint" }, `No feature matches “${q}”.`));
    for (const hit of body.data) {
      const add = el("button", { type: "button", "aria-label": `Add ${hit.id}` }, "Add");
      add.addEventListener("click", () => addFeature(hit));
      list.append(el("li", { dataset: { feature: hit.id } },
        add, el("strong", {}, hit.name), " ", el("span", { class: "pack" }, hit.pack || ""),
        el("span", { class: "desc" }, hit.description || ""),
        (hit.tags || []).includes("no-measured-effect")
          ? el("span", { class: "evidence", title: "steer pack calibrate saw no effect on its concept" },
               "no measured effect") : ""));
    }
  } catch (err) {
    showError(err, "search");
  }
}

export function initEqualizer() {
  document.getElementById("search-form").addEventListener("submit", search);
}
