// Drives a running `flashmoe serve` with the official OpenAI Node client (installed by
// tests/server/setup.sh into .cache/npm). tests/test_server.c starts the server and runs
//
//   node tests/server/openai_client.mjs SCENARIO
//
// with FM_BASE_URL (http://127.0.0.1:PORT/v1), FM_NPM_DIR and FM_MODEL set. The server runs with
// FLASHMOE_TEST_HOOKS=1, so `fm_test_output` replaces sampling with a given text (test-only).
// Prints "ok  ..." / "FAIL ..." per check and exits 1 if any failed. The client's SSE parser reads
// every stream, so the chunks are checked to be well-formed server-sent events as well.
import { createRequire } from 'node:module';
import path from 'node:path';
import assert from 'node:assert/strict';

const require = createRequire(path.join(process.env.FM_NPM_DIR, 'package.json'));
const mod = require('openai');
const OpenAI = mod.OpenAI ?? mod.default ?? mod;
const MODEL = process.env.FM_MODEL;
const client = new OpenAI({ baseURL: process.env.FM_BASE_URL, apiKey: process.env.FM_API_KEY ?? 'unused', maxRetries: 0, timeout: 120000 });

let failures = 0;
async function check(name, fn) {
  try {
    await fn();
    console.log(`ok   ${name}`);
  } catch (e) {
    failures++;
    console.log(`FAIL ${name}: ${e && e.stack ? e.stack.split('\n').slice(0, 3).join(' | ') : e}`);
  }
}

const user = (content) => ({ role: 'user', content });

/* Reads a chat stream: text per field, tool calls, finish reason, usage, ids. */
async function readChat(stream) {
  const r = { content: '', reasoning: '', calls: [], finish: null, usage: null, ids: new Set(), chunks: 0, role: null };
  for await (const chunk of stream) {
    r.chunks++;
    r.ids.add(chunk.id);
    assert.equal(chunk.object, 'chat.completion.chunk');
    if (chunk.usage) r.usage = chunk.usage;
    for (const c of chunk.choices) {
      const d = c.delta ?? {};
      if (d.role) r.role = d.role;
      if (d.content) r.content += d.content;
      if (d.reasoning_content) r.reasoning += d.reasoning_content;
      for (const tc of d.tool_calls ?? []) {
        const slot = (r.calls[tc.index] ??= { id: '', name: '', arguments: '' });
        if (tc.id) slot.id = tc.id;
        if (tc.function?.name) slot.name += tc.function.name;
        if (tc.function?.arguments) slot.arguments += tc.function.arguments;
      }
      if (c.finish_reason) r.finish = c.finish_reason;
    }
  }
  return r;
}

async function basic() {
  await check('models.list names the model', async () => {
    const list = await client.models.list();
    const ids = [];
    for await (const m of list) ids.push(m.id);
    assert.deepEqual(ids, [MODEL]);
    const one = await client.models.retrieve(MODEL);
    assert.equal(one.id, MODEL);
  });

  const req = { model: MODEL, messages: [user('Write one word.')], max_tokens: 8, temperature: 0 };
  let plain;
  await check('chat, not streamed', async () => {
    const r = await client.chat.completions.create(req);
    plain = r.choices[0].message.content;
    assert.equal(r.object, 'chat.completion');
    assert.equal(r.choices[0].message.role, 'assistant');
    assert.equal(typeof plain, 'string');
    assert.ok(plain.length > 0);
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.completion_tokens, 8);
    assert.ok(r.usage.prompt_tokens > 5);
    assert.equal(r.usage.total_tokens, r.usage.prompt_tokens + 8);
  });
  await check('chat, streamed: same text, one id, usage chunk', async () => {
    const s = await client.chat.completions.create({ ...req, stream: true, stream_options: { include_usage: true } });
    const r = await readChat(s);
    assert.equal(r.content, plain);
    assert.equal(r.role, 'assistant');
    assert.equal(r.finish, 'length');
    assert.equal(r.ids.size, 1);
    assert.ok(r.chunks >= 3);
    assert.equal(r.usage.completion_tokens, 8);
  });
  await check('reasoning_content is split at </think> (not streamed and streamed)', async () => {
    const forced = '<think>\nThe user wants a greeting.\n</think>\n\nHello there!';
    const r = await client.chat.completions.create({ model: MODEL, messages: [user('hi')], fm_test_output: forced });
    assert.equal(r.choices[0].message.reasoning_content, 'The user wants a greeting.');
    assert.equal(r.choices[0].message.content, 'Hello there!');
    assert.equal(r.choices[0].finish_reason, 'stop');
    const s = await readChat(await client.chat.completions.create({ model: MODEL, messages: [user('hi')], fm_test_output: forced, stream: true }));
    assert.equal(s.reasoning, 'The user wants a greeting.');
    assert.equal(s.content, 'Hello there!');
  });
  await check('stop strings end the answer before them', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages: [user('x')], fm_test_output: 'one two STOP three', stop: ['STOP'] });
    assert.equal(r.choices[0].message.content, 'one two ');
    assert.equal(r.choices[0].finish_reason, 'stop');
  });

  const tools = [{
    type: 'function',
    function: {
      name: 'get_weather', description: 'Current weather in a city',
      parameters: { type: 'object', properties: { city: { type: 'string' } }, required: ['city'] },
    },
  }];
  const call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>';
  await check('tool call round trip (not streamed)', async () => {
    const messages = [{ role: 'system', content: 'You can look up the weather.' }, user('Weather in Paris?')];
    const r1 = await client.chat.completions.create({ model: MODEL, messages, tools, fm_test_output: call });
    const m = r1.choices[0].message;
    assert.equal(r1.choices[0].finish_reason, 'tool_calls');
    assert.equal(m.tool_calls.length, 1);
    assert.equal(m.tool_calls[0].type, 'function');
    assert.match(m.tool_calls[0].id, /^call_/);
    assert.equal(m.tool_calls[0].function.name, 'get_weather');
    assert.deepEqual(JSON.parse(m.tool_calls[0].function.arguments), { city: 'Paris' });
    assert.ok(m.content === null || m.content === '');
    // the client sends the assistant message back as it got it, plus the tool's result
    messages.push(m, { role: 'tool', tool_call_id: m.tool_calls[0].id, content: '{"sky": "sunny", "celsius": 22}' });
    const r2 = await client.chat.completions.create({ model: MODEL, messages, tools, fm_test_output: 'It is sunny in Paris, 22 C.' });
    assert.equal(r2.choices[0].message.content, 'It is sunny in Paris, 22 C.');
    assert.equal(r2.choices[0].finish_reason, 'stop');
    assert.ok(r2.usage.prompt_tokens > r1.usage.prompt_tokens + 10);
  });
  await check('tool call, streamed', async () => {
    const s = await readChat(await client.chat.completions.create({
      model: MODEL, messages: [user('Weather in Paris?')], tools, stream: true,
      fm_test_output: 'Let me check.\n' + call,
    }));
    assert.equal(s.finish, 'tool_calls');
    assert.equal(s.content, 'Let me check.\n');
    assert.equal(s.calls.length, 1);
    assert.equal(s.calls[0].name, 'get_weather');
    assert.deepEqual(JSON.parse(s.calls[0].arguments), { city: 'Paris' });
  });
  await check('tool_choice none: no call is parsed', async () => {
    const r = await client.chat.completions.create({ model: MODEL, messages: [user('x')], tools, tool_choice: 'none', fm_test_output: call });
    assert.equal(r.choices[0].finish_reason, 'stop');
    assert.equal(r.choices[0].message.tool_calls ?? undefined, undefined);
    assert.equal(r.choices[0].message.content, call);
  });

  let text;
  await check('completions, not streamed', async () => {
    const r = await client.completions.create({ model: MODEL, prompt: 'The capital of France is', max_tokens: 6, temperature: 0 });
    assert.equal(r.object, 'text_completion');
    text = r.choices[0].text;
    assert.ok(text.length > 0);
    assert.equal(r.choices[0].finish_reason, 'length');
    assert.equal(r.usage.completion_tokens, 6);
  });
  await check('completions, streamed: same text', async () => {
    const s = await client.completions.create({ model: MODEL, prompt: 'The capital of France is', max_tokens: 6, temperature: 0, stream: true });
    let got = '', finish = null;
    for await (const c of s) {
      got += c.choices[0]?.text ?? '';
      if (c.choices[0]?.finish_reason) finish = c.choices[0].finish_reason;
    }
    assert.equal(got, text);
    assert.equal(finish, 'length');
  });
  await check('errors come back as OpenAI errors', async () => {
    await assert.rejects(client.chat.completions.create({ model: MODEL, messages: [{ role: 'wizard', content: 'x' }] }), (e) => {
      assert.equal(e.status, 400);
      assert.equal(e.param, 'messages[0].role');
      return true;
    });
    await assert.rejects(client.chat.completions.create({ model: MODEL, messages: [user('x')], max_tokens: 10000000 }), (e) => {
      assert.equal(e.status, 400);
      assert.equal(e.code, 'context_length_exceeded');
      return true;
    });
  });
}

/* 16 clients stream at once; each must get exactly what it gets alone. */
async function concurrent() {
  const N = 16;
  const reqs = Array.from({ length: N }, (_, i) => ({
    model: MODEL, messages: [user(`Client ${i}: say something about the number ${i * 7 + 3}.`)], max_tokens: 8, temperature: 0, stream: true,
  }));
  const alone = [];
  for (const r of reqs) alone.push(await readChat(await client.chat.completions.create(r)));
  const t0 = performance.now();
  const together = await Promise.all(reqs.map(async (r) => readChat(await client.chat.completions.create(r))));
  const ms = performance.now() - t0;
  console.log(`measured: ${N} concurrent streaming clients finished in ${ms.toFixed(0)} ms`);
  await check(`${N} concurrent streams equal their sequential runs`, async () => {
    const ids = new Set();
    for (let i = 0; i < N; i++) {
      assert.equal(together[i].ids.size, 1, `stream ${i} mixes ids`);
      ids.add([...together[i].ids][0]);
      assert.equal(together[i].content, alone[i].content, `stream ${i}`);
      assert.equal(together[i].finish, 'length');
    }
    assert.equal(ids.size, N);
    assert.ok(new Set(alone.map((r) => r.content)).size >= N / 2, 'the prompts should give different answers');
  });
}

/* A follow-up turn re-uses the session's prefix and gives what a cold run gives. */
async function cache() {
  const system = { role: 'system', content: 'You are a terse assistant.' };
  const convA = [system, user('Name a colour.')];
  const convB = [system, user('Name an animal.')];
  const a1 = await client.chat.completions.create({ model: MODEL, messages: convA, fm_test_output: 'Blue is a colour.' });
  const b1 = await client.chat.completions.create({ model: MODEL, messages: convB, fm_test_output: 'A cat is an animal.' });
  const turn2 = (conv, prev, q) => [...conv, { role: 'assistant', content: prev.choices[0].message.content }, user(q)];
  const a2msgs = turn2(convA, a1, 'Another one?');
  const b2msgs = turn2(convB, b1, 'Another one?');
  const a2 = await client.chat.completions.create({ model: MODEL, messages: a2msgs, max_tokens: 10, temperature: 0 });
  const b2 = await client.chat.completions.create({ model: MODEL, messages: b2msgs, max_tokens: 10, temperature: 0 });
  const a2cold = await client.chat.completions.create({ model: MODEL, messages: a2msgs, max_tokens: 10, temperature: 0 });
  console.log(`measured: turn 2 prompt ${a2.usage.prompt_tokens} tokens, ${a2.usage.prompt_tokens_details.cached_tokens} cached; ` +
    `cold run ${a2cold.usage.prompt_tokens_details.cached_tokens} cached`);
  await check('second turns re-use their conversation\'s session (two slots)', async () => {
    assert.ok(a2.usage.prompt_tokens_details.cached_tokens >= a1.usage.prompt_tokens, JSON.stringify(a2.usage));
    assert.ok(b2.usage.prompt_tokens_details.cached_tokens >= b1.usage.prompt_tokens, JSON.stringify(b2.usage));
    assert.ok(a2.usage.prompt_tokens_details.cached_tokens < a2.usage.prompt_tokens);
  });
  await check('cached and cold runs give the same answer', async () => {
    assert.equal(a2cold.usage.prompt_tokens_details.cached_tokens, 0);
    assert.equal(a2.choices[0].message.content, a2cold.choices[0].message.content);
    assert.ok(a2.choices[0].message.content.length > 0);
  });
}

const scenarios = { basic, concurrent, cache };
const name = process.argv[2];
if (!scenarios[name]) {
  console.log(`FAIL unknown scenario ${name}`);
  process.exit(2);
}
await scenarios[name]();
console.log(failures ? `${failures} check(s) failed` : 'all checks passed');
process.exit(failures ? 1 : 0);
