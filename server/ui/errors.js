// Server errors shown next to the control they concern: each control has an error slot
// `[data-error-for=KEY]`; an error's `param` picks the slot whose KEY is its longest prefix
// (`steering.features.NAME.strength` → the NAME slider, `messages.[0].content` → the prompt).

/** Empty every error slot inside `root`. */
export function clearErrors(root = document) {
  for (const el of root.querySelectorAll("[data-error-for]")) {
    el.textContent = "";
    const control = el.closest(".slider, .field, .row");
    if (control) control.classList.remove("has-error");
  }
}

function slotFor(param, root, unscoped = false) {
  let best = null;
  for (const el of root.querySelectorAll("[data-error-for]")) {
    // A panel with its own field names (`data-error-scope`) takes only its own errors.
    if (unscoped && el.closest("[data-error-scope]")) continue;
    const key = el.dataset.errorFor;
    const fits = param === key || param.startsWith(`${key}.`) || param.startsWith(`${key}[`);
    if (fits && (!best || key.length > best.dataset.errorFor.length)) best = el;
  }
  return best;
}

/** The text of `err` (an ApiError or any Error) as the user reads it. */
export function describe(err) {
  if (err.status === undefined) return String(err.message || err);
  const head = [err.status, err.code].filter((x) => x !== null && x !== undefined).join(" ");
  let text = head ? `${head}: ${err.message}` : err.message;
  if (err.status === 429 && err.retryAfter) text += ` (retry after ${err.retryAfter} s)`;
  if (err.status === 401) text += " — enter the server's API key above.";
  return text;
}

/**
 * Show `err` next to its control: the slot its `param` names, the API key for a 401, else the
 * slot `fallback` (a key) inside `root`. Returns the element that shows it.
 */
export function showError(err, fallback, root = document) {
  let slot = null;
  if (err.param) slot = slotFor(err.param, root) || slotFor(err.param, document, true);
  if (!slot && err.status === 401) slot = document.querySelector('[data-error-for="auth"]');
  if (!slot) slot = root.querySelector(`[data-error-for="${fallback}"]`);
  slot.textContent = describe(err);
  const control = slot.closest(".slider, .field, .row");
  if (control) control.classList.add("has-error");
  return slot;
}
