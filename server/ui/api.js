// The server's public HTTP API, as the page uses it: bearer key, OpenAI-style errors, SSE streams.

const KEY_STORE = "steer.apiKey";

/** The key the user typed (kept in this browser's localStorage only; never in a URL). */
export function apiKey() {
  return localStorage.getItem(KEY_STORE) || "";
}

export function setApiKey(key) {
  if (key) localStorage.setItem(KEY_STORE, key);
  else localStorage.removeItem(KEY_STORE);
}

/** An error answer of the server: {status, message, type, param, code, retryAfter}. */
export class ApiError extends Error {
  constructor(status, error, retryAfter) {
    super(error.message || `HTTP ${status}`);
    this.status = status;
    this.type = error.type || null;
    this.param = error.param || null;
    this.code = error.code || null;
    this.retryAfter = retryAfter;
  }
}

function headers(json) {
  const h = {};
  if (json) h["content-type"] = "application/json";
  const key = apiKey();
  if (key) h.authorization = `Bearer ${key}`;
  return h;
}

async function failure(resp) {
  let error = {};
  try {
    error = (await resp.json()).error || {};
  } catch (err) {
    // Stopped while the body was read (the other request of a pair was refused first): an
    // abort, not a second, body-less error over the first one's message.
    if (err.name === "AbortError") throw err;
    error = { message: `HTTP ${resp.status} ${resp.statusText}` };
  }
  return new ApiError(resp.status, error, resp.headers.get("retry-after"));
}

/** GET or POST/PATCH/DELETE `path` with a JSON body; the parsed JSON, or throws ApiError. */
export async function call(method, path, body, signal) {
  const resp = await fetch(path, {
    method, signal, headers: headers(body !== undefined),
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!resp.ok) throw await failure(resp);
  return resp.json();
}

/**
 * POST a streamed chat completion. `onStart(headers)` runs once with the response headers,
 * `onChunk(chunk)` per server-sent event until `data: [DONE]`. Throws ApiError for an error
 * status or an error event, and the AbortError of `signal` when it is aborted.
 */
export async function streamChat(body, signal, onStart, onChunk) {
  const resp = await fetch("/v1/chat/completions", {
    method: "POST", signal, headers: headers(true),
    body: JSON.stringify({ ...body, stream: true, stream_options: { include_usage: true } }),
  });
  if (!resp.ok) throw await failure(resp);
  onStart(resp.headers);
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffered = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffered += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffered.indexOf("\n\n")) >= 0) {
      const event = buffered.slice(0, cut);
      buffered = buffered.slice(cut + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const chunk = JSON.parse(data);
        if (chunk.error) throw new ApiError(null, chunk.error, null);  // in-stream: the HTTP status was 200
        onChunk(chunk);
      }
    }
  }
}
