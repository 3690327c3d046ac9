// The official `openai` npm package against a running balancer gateway.
//
// Run by tests/it/sdk.rs (`node --test`), which starts the gateway in front
// of mock upstreams on 127.0.0.1 and passes where it is in the environment:
// BALANCER_BASE_URL, BALANCER_KEY (no limits of its own), BALANCER_LIMITED_KEY
// (a token bucket of 1 request refilled every 2 s, so its 429 says
// Retry-After: 2) and BALANCER_EMBEDDING (the mock's embedding, as JSON).
//
// The tests run one after another: the two rate-limit tests share a bucket.

import assert from "node:assert/strict";
import { describe, test } from "node:test";

import OpenAI from "openai";

const BASE_URL = process.env.BALANCER_BASE_URL;
const KEY = process.env.BALANCER_KEY;
const LIMITED_KEY = process.env.BALANCER_LIMITED_KEY;
const EMBEDDING = JSON.parse(process.env.BALANCER_EMBEDDING);
const CHAT_MODEL = "gpt-4o-mini";
const EMBEDDING_MODEL = "text-embedding-3-small";
const MESSAGES = [{ role: "user", content: "Say hello to the SDK test." }];

function client(apiKey = KEY, maxRetries = 0) {
  return new OpenAI({ baseURL: BASE_URL, apiKey, maxRetries, timeout: 30_000 });
}

/** Spends the limited client's bucket until the gateway refuses it. */
async function drain(apiKey) {
  for (let i = 0; i < 5; i++) {
    try {
      await client(apiKey).chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES, max_tokens: 5 });
    } catch (err) {
      if (err instanceof OpenAI.RateLimitError) return err;
      throw err;
    }
  }
  assert.fail("the limited client was never refused");
}

describe("completions", { concurrency: false }, () => {
  test("chat completion", async () => {
    const reply = await client().chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES, max_tokens: 20 });
    assert.equal(reply.object, "chat.completion");
    assert.ok(reply.choices[0].message.content);
    assert.ok(reply.usage.prompt_tokens > 0);
    assert.ok(reply.usage.completion_tokens > 0);
  });

  test("streaming without usage", async () => {
    const stream = await client().chat.completions.create({
      model: CHAT_MODEL, messages: MESSAGES, max_tokens: 20, stream: true,
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    assert.ok(chunks.length > 2, "the answer arrives in several events");
    const text = chunks.map((c) => c.choices[0]?.delta?.content ?? "").join("");
    assert.ok(text.length > 0);
    assert.ok(chunks.every((c) => !c.usage));
  });

  test("streaming with include_usage", async () => {
    const stream = await client().chat.completions.create({
      model: CHAT_MODEL, messages: MESSAGES, max_tokens: 20, stream: true,
      stream_options: { include_usage: true },
    });
    const chunks = [];
    for await (const chunk of stream) chunks.push(chunk);
    const last = chunks.at(-1);
    assert.deepEqual(last.choices, [], "usage comes in a final event without choices");
    assert.ok(last.usage.prompt_tokens > 0);
    assert.ok(last.usage.completion_tokens > 0);
    assert.ok(chunks.slice(0, -1).every((c) => !c.usage));
  });

  test("embeddings", async () => {
    // The SDK asks for base64 and decodes it to floats.
    const result = await client().embeddings.create({ model: EMBEDDING_MODEL, input: ["hello", "world"] });
    assert.equal(result.data.length, 2);
    assert.deepEqual(Array.from(result.data[0].embedding), EMBEDDING);
    assert.ok(result.usage.prompt_tokens > 0);
  });

  test("models list", async () => {
    const ids = [];
    for await (const model of client().models.list()) ids.push(model.id);
    assert.ok(ids.includes(CHAT_MODEL), ids.join(","));
    assert.ok(ids.includes(EMBEDDING_MODEL), ids.join(","));
    assert.equal((await client().models.retrieve(CHAT_MODEL)).id, CHAT_MODEL);
  });
});

const STATUS_URL = BASE_URL.replace(/\/v1$/, "") + "/status";

/** The node's tokens in its window once nothing is reserved. */
async function nodeTokens() {
  for (let i = 0; i < 200; i++) {
    const node = (await (await fetch(STATUS_URL)).json()).nodes[0];
    if (node.reserved_tokens === 0 && node.in_flight === 0) return node.limits.tpm.used;
    await new Promise((resolve) => setTimeout(resolve, 50));
  }
  assert.fail("the gateway never settled");
}

describe("responses", { concurrency: false }, () => {
  test("a response", async () => {
    const before = await nodeTokens();
    const reply = await client().responses.create({
      model: CHAT_MODEL, instructions: "Be brief.", input: "Say hello.", max_output_tokens: 20,
    });
    assert.equal(reply.object, "response");
    assert.ok(reply.output_text.length > 0);
    assert.ok(reply.usage.input_tokens > 0);
    assert.ok(reply.usage.output_tokens > 0);
    assert.equal((await nodeTokens()) - before, reply.usage.total_tokens);
  });

  test("a streamed response", async () => {
    const before = await nodeTokens();
    const stream = await client().responses.create({
      model: CHAT_MODEL, input: [{ role: "user", content: "Say hello." }], max_output_tokens: 20, stream: true,
    });
    const events = [];
    for await (const event of stream) events.push(event);
    const deltas = events.filter((e) => e.type === "response.output_text.delta").map((e) => e.delta);
    assert.ok(deltas.length > 1);
    const done = events.at(-1);
    assert.equal(done.type, "response.completed");
    const usage = done.response.usage;
    assert.ok(usage.output_tokens > 0);
    assert.equal((await nodeTokens()) - before, usage.input_tokens + usage.output_tokens);
  });
});

describe("errors", { concurrency: false }, () => {
  test("a wrong key raises AuthenticationError", async () => {
    await assert.rejects(
      client("sk-not-a-gateway-key").chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES }),
      (err) => err instanceof OpenAI.AuthenticationError && err.status === 401 && err.code === "invalid_api_key",
    );
  });

  test("an unknown model raises NotFoundError", async () => {
    await assert.rejects(
      client().chat.completions.create({ model: "no-such-model", messages: MESSAGES }),
      (err) => err instanceof OpenAI.NotFoundError && err.code === "model_not_found" && err.message.includes("no-such-model"),
    );
  });

  test("a request no node could ever take raises BadRequestError", async () => {
    await assert.rejects(
      client().chat.completions.create({ model: CHAT_MODEL, messages: MESSAGES, max_tokens: 10_000_000 }),
      (err) => err instanceof OpenAI.BadRequestError && err.code === "request_too_large",
    );
  });

  test("a client over its limit raises RateLimitError with Retry-After", async () => {
    const err = await drain(LIMITED_KEY);
    assert.equal(err.status, 429);
    assert.equal(err.code, "client_rate_limit_exceeded");
    assert.equal(err.type, "rate_limit_error");
    assert.ok(["1", "2"].includes(err.headers.get("retry-after")), err.headers.get("retry-after"));
  });

  test("the SDK waits the Retry-After, then succeeds", async () => {
    await drain(LIMITED_KEY);
    const started = performance.now();
    // One retry only: its own backoff (0.5 s at most) would come back before
    // the bucket refills; waiting our Retry-After succeeds.
    const reply = await client(LIMITED_KEY, 1).chat.completions.create({
      model: CHAT_MODEL, messages: MESSAGES, max_tokens: 5,
    });
    const waited = (performance.now() - started) / 1000;
    assert.ok(reply.choices[0].message.content);
    assert.ok(waited >= 1.0, `waited ${waited} s`);
    assert.ok(waited < 10, `waited ${waited} s`);
  });
});
