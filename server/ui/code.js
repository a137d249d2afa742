// The steered request as code (curl, and Python with the openai SDK's extra_body), and the
// equalizer saved as a preset (an admin key), served as the model `base:name`.

import { call } from "./api.js";
import { clearErrors, showError } from "./errors.js";
import { steering } from "./equalizer.js";
import { selectedModel, steeredRequest } from "./run.js";

const OPENAI_FIELDS = ["model", "messages", "max_tokens", "temperature", "seed"];

function shellQuote(text) {
  return `'${text.replaceAll("'", "'\\''")}'`;
}

/** The steered request as a curl command (the key from $STEER_API_KEY, never the typed one). */
export function asCurl(body = steeredRequest()) {
  return [
    `curl -s ${location.origin}/v1/chat/completions \\`,
    "  -H 'content-type: application/json' \\",
    '  -H "authorization: Bearer $STEER_API_KEY" \\',
    `  -d ${shellQuote(JSON.stringify(body, null, 2))}`,
  ].join("\n");
}

function py(value, indent) {
  // JSON is Python but for true/false/null.
  return JSON.stringify(value, null, 4).replace(/\b(true|false|null)\b/g,
    (m) => ({ true: "True", false: "False", null: "None" })[m])
    .replaceAll("\n", `\n${" ".repeat(indent)}`);
}

/** The steered request with the openai SDK: OpenAI's fields as arguments, ours in extra_body. */
export function asPython(body = steeredRequest()) {
  const args = OPENAI_FIELDS.filter((k) => body[k] !== undefined)
    .map((k) => `    ${k}=${py(body[k], 4)},`);
  const extra = Object.fromEntries(Object.entries(body).filter(([k]) => !OPENAI_FIELDS.includes(k)));
  if (Object.keys(extra).length) args.push(`    extra_body=${py(extra, 4)},`);
  return [
    "import os",
    "from openai import OpenAI",
    "",
    `client = OpenAI(base_url="${location.origin}/v1", api_key=os.environ.get("STEER_API_KEY", "unused"))`,
    "resp = client.chat.completions.create(",
    ...args,
    ")",
    "print(resp.choices[0].message.content)",
    'print(resp.model_extra.get("steering"))  # what was applied',
  ].join("\n");
}

async function copy(text) {
  const area = document.getElementById("code");
  const status = document.getElementById("copy-status");
  area.hidden = false;
  area.value = text;
  try {
    await navigator.clipboard.writeText(text);
    status.textContent = "Copied to the clipboard.";
  } catch {
    area.select();
    status.textContent = "The clipboard is not available here: the code is selected below.";
  }
}

async function savePreset(reloadModels) {
  clearErrors(document.querySelector(".equalizer"));
  const status = document.getElementById("preset-status");
  status.textContent = "";
  const name = document.getElementById("preset-name").value.trim();
  const s = steering();
  if (!name || !s) {
    showError({ message: !name ? "Name the preset first." : "Add a feature first." }, "preset");
    return;
  }
  try {
    const preset = await call("POST", "/v1/presets", {
      name, steering: s, description: "saved from the playground" });
    const model = preset.models.find((m) => m.startsWith(`${selectedModel().base}:`)) || preset.models[0];
    await reloadModels(model);
    status.textContent = `Saved: the model ${model} now serves this equalizer.`;
  } catch (err) {
    showError(err, "preset");
  }
}

export function initCode(reloadModels) {
  document.getElementById("copy-curl").addEventListener("click", () => copy(asCurl()));
  document.getElementById("copy-python").addEventListener("click", () => copy(asPython()));
  document.getElementById("save-preset").addEventListener("click", () => savePreset(reloadModels));
}
