// The official OpenAI JavaScript client (openai@5.23.2, fetched by scripts/setup) against
// `kestrel serve`: chat and completions streamed and not, stop strings, usage, models, the error
// statuses the client maps to its error classes, and a stream the client aborts.
// Usage: node serve_openai.mjs OPENAI_PACKAGE_DIR PORT API_KEY
import assert from "node:assert/strict";
import { pathToFileURL } from "node:url";

const [packageDir, port, apiKey] = process.argv.slice(2);
const { default: OpenAI } = await import(pathToFileURL(`${packageDir}/index.mjs`).href);
const baseURL = `http://127.0.0.1:${port}/v1`;
// No retries: a 429 or 5xx must show here, not be retried away.
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 120_000 });
const messages = [{ role: "user", content: "Hello from the OpenAI client" }];

const models = await client.models.list();
assert.equal(models.data[0].id, "tiny-test");

const whole = await client.chat.completions.create({
  model: "tiny-test", messages, max_tokens: 10, temperature: 0,
});
assert.equal(whole.object, "chat.completion");
assert.equal(whole.choices[0].finish_reason, "length");
assert.equal(whole.usage.completion_tokens, 10);
const text = whole.choices[0].message.content;

let streamed = "";
let usage = null;
let finish = null;
const stream = await client.chat.completions.create({
  model: "tiny-test", messages, max_tokens: 10, temperature: 0, stream: true,
  stream_options: { include_usage: true },
});
for await (const chunk of stream) {
  if (chunk.usage) usage = chunk.usage;
  for (const choice of chunk.choices) {
    streamed += choice.delta.content ?? "";
    if (choice.finish_reason) finish = choice.finish_reason;
  }
}
assert.equal(streamed, text);
assert.equal(finish, "length");
assert.deepEqual(usage, whole.usage);
console.log("ok openai client: chat streamed and not, same text and usage");

const completion = await client.completions.create({
  model: "tiny-test", prompt: "Once upon a time", max_tokens: 12, temperature: 0,
});
const full = completion.choices[0].text;
assert.equal(completion.usage.completion_tokens, 12);
let start = 2;
while (start + 3 <= full.length &&
       (full.slice(start, start + 3).trim() === "" || full.indexOf(full.slice(start, start + 3)) !== start)) {
  start++;
}
assert.ok(start + 3 <= full.length, `no usable stop string in ${JSON.stringify(full)}`);
const stop = full.slice(start, start + 3);
let cut = "";
for await (const chunk of await client.completions.create({
  model: "tiny-test", prompt: "Once upon a time", max_tokens: 12, temperature: 0, stop: [stop],
  stream: true,
})) {
  cut += chunk.choices[0]?.text ?? "";
}
assert.equal(cut, full.slice(0, full.indexOf(stop)));
console.log("ok openai client: completions and a stop string");

async function expectStatus(status, errorClass, call) {
  try {
    await call();
  } catch (e) {
    assert.ok(e instanceof errorClass, `expected ${errorClass.name}, got ${e?.constructor?.name}: ${e}`);
    assert.equal(e.status, status);
    assert.ok(e.error?.message || e.message, "error without a message");
    return;
  }
  assert.fail(`expected HTTP ${status}`);
}
await expectStatus(400, OpenAI.BadRequestError, () =>
  client.chat.completions.create({ model: "tiny-test", messages, n: 2 }));
await expectStatus(400, OpenAI.BadRequestError, () =>
  client.completions.create({ model: "tiny-test", prompt: "x", max_tokens: 100000 }));
await expectStatus(401, OpenAI.AuthenticationError, () =>
  new OpenAI({ baseURL, apiKey: "wrong", maxRetries: 0 }).models.list());
await expectStatus(404, OpenAI.NotFoundError, () => client.models.retrieve("tiny-test"));
await expectStatus(413, OpenAI.APIError, () =>
  client.completions.create({ model: "tiny-test", prompt: "x".repeat(70000) }));
console.log("ok openai client: 400, 401, 404 and 413 arrive as the client's error classes");

// An aborted stream: the server must end the request as "abort" and free its slot.
async function abortCount() {
  const text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
  const m = text.match(/^kestrel_requests_finished_total\{reason="abort"\} (\d+)$/m);
  return m ? Number(m[1]) : 0;
}
const before = await abortCount();
const controller = new AbortController();
const long = await client.completions.create(
  { model: "tiny-test", prompt: "Tell a long story", max_tokens: 400, temperature: 0, stream: true },
  { signal: controller.signal });
let seen = 0;
try {
  for await (const chunk of long) {
    if (++seen === 3) controller.abort();
  }
} catch (e) {
  assert.ok(e instanceof OpenAI.APIUserAbortError || e.name === "AbortError", `${e}`);
}
const deadline = Date.now() + 60_000;
while ((await abortCount()) <= before) {
  assert.ok(Date.now() < deadline, "the aborted stream was never aborted on the server");
  await new Promise((r) => setTimeout(r, 50));
}
console.log("ok openai client: an aborted stream is aborted on the server");
