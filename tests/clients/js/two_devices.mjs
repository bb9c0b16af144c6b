// The official ollama and openai JavaScript clients against one user with
// two devices behind a running relay: each lists the union of the devices'
// models, chats (streamed and not) with each model, which only one device
// has, and gets the client's own 404 for a model no device has.
//
// Run by tests/clients/test_clients.py (which starts relayd, two agentd and
// their stand-ins) as:  node two_devices.mjs
// Environment: RELAY (http://127.0.0.1:PORT), TUNNEL_USER, MODELS (comma-
// separated, one per device). Prints one line per check; exits 1 on the
// first that fails.
import assert from "node:assert/strict";
import { Ollama } from "ollama";
import OpenAI from "openai";

const relay = process.env.RELAY;
const user = process.env.TUNNEL_USER;
const models = (process.env.MODELS ?? "").split(",").filter(Boolean).sort();
assert.ok(relay && user && models.length >= 2, "set RELAY, TUNNEL_USER and MODELS");
const hi = [{ role: "user", content: "hi" }];

async function ollamaClient() {
  const client = new Ollama({ host: `${relay}/api/tunnel/${user}` });
  const listed = (await client.list()).models.map((m) => m.model).sort();
  assert.deepEqual(listed, models);
  for (const model of models) {
    const whole = await client.chat({ model, messages: hi, stream: false, options: { num_predict: 4 } });
    assert.equal(whole.model, model);
    assert.ok(whole.done);
    let parts = 0;
    let last;
    for await (const part of await client.chat({ model, messages: hi, stream: true, options: { num_predict: 4 } })) {
      parts += 1;
      last = part;
    }
    assert.equal(parts, 5, `${model}: 4 tokens and the final part`);
    assert.ok(last.done && last.model === model);
  }
  await assert.rejects(client.chat({ model: "mistral", messages: hi }), (e) => {
    assert.equal(e.status_code, 404);
    assert.match(e.error, /"mistral"/);
    return true;
  });
  console.log(`ollama js: list=${listed.join(",")}; chat with each (whole and streamed) answered; mistral -> 404`);
}

async function openaiClient() {
  const client = new OpenAI({ baseURL: `${relay}/api/tunnel/${user}/v1`, apiKey: "unused", maxRetries: 0 });
  const ids = [];
  for await (const m of client.models.list()) ids.push(m.id);
  assert.deepEqual(ids.sort(), models);
  for (const model of models) {
    const whole = await client.chat.completions.create({ model, messages: hi, max_tokens: 4 });
    assert.equal(whole.model, model);
    assert.equal(whole.choices[0].finish_reason, "stop");
    const stream = await client.chat.completions.create({ model, messages: hi, max_tokens: 4, stream: true });
    let finish;
    let text = "";
    for await (const chunk of stream) {
      text += chunk.choices[0]?.delta?.content ?? "";
      finish = chunk.choices[0]?.finish_reason ?? finish;
    }
    assert.equal(finish, "stop");
    assert.ok(text.length > 0, `${model}: streamed text`);
  }
  await assert.rejects(client.chat.completions.create({ model: "mistral", messages: hi }), (e) => {
    assert.ok(e instanceof OpenAI.NotFoundError, `${e}`);
    assert.equal(e.status, 404);
    assert.equal(e.code, "model_not_found");
    return true;
  });
  console.log(`openai js: models=${ids.join(",")}; chat with each (whole and streamed) answered; mistral -> 404 model_not_found`);
}

try {
  await ollamaClient();
  await openaiClient();
} catch (e) {
  console.error(`FAILED: ${e.stack ?? e}`);
  process.exit(1);
}
