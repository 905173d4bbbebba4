#!/usr/bin/env python3
"""The official `openai` Python client against pdserve's OpenAI-compatible API.
Asserts what a user of that client relies on, and prints JSON with what the Rust test
compares against the one-process reference (the greedy text for a token-id prompt).

  openai_check.py BASE_URL MODEL API_KEY TOO_MANY_TOKENS
"""
import json, sys

import openai

base, model, key, too_many = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
client = openai.OpenAI(base_url=base, api_key=key, max_retries=0, timeout=60)
greedy = {"temperature": 0, "extra_body": {"ignore_eos": True}}
out = {}

assert [m.id for m in client.models.list().data] == [model]

# Completions: a token-id prompt, greedy; usage and pdserve's figures.
r = client.completions.create(model=model, prompt=list(range(1, 20)), max_tokens=8, **greedy)
c = r.choices[0]
assert c.finish_reason == "length", c
assert r.usage.completion_tokens == 8 and r.usage.prompt_tokens == 19, r.usage
assert r.usage.total_tokens == 27 and r.usage.prompt_tokens_details.cached_tokens == 0, r.usage
ext = r.model_extra["pdserve"]
assert ext["kv_backend"] and ext["total_ms"] > 0 and ext["prefill_server"], ext
out["greedy_text"] = c.text

# The same streamed: the same text; usage at the end when asked for.
chunks = list(client.completions.create(model=model, prompt=list(range(1, 20)), max_tokens=8, stream=True,
                                        stream_options={"include_usage": True}, **greedy))
text = "".join(ch.choices[0].text for ch in chunks if ch.choices)
assert text == c.text, (text, c.text)
assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 8, chunks[-1]
assert [ch.choices[0].finish_reason for ch in chunks if ch.choices][-1] == "length"

# Stop strings: the text ends before the first stop string, finish_reason "stop".
long = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=24, **greedy).choices[0].text
stop = long[len(long) // 2:len(long) // 2 + 3]
if stop.strip():
    s = client.completions.create(model=model, prompt="The quick brown fox", max_tokens=24, stop=[stop], **greedy).choices[0]
    assert s.finish_reason == "stop" and s.text == long[:long.index(stop)], (s, long, stop)

# Seeds: the same seed samples the same text; other seeds others (a test model's
# distributions are peaked: several seeds, a high temperature).
def sampled(seed):
    return client.completions.create(model=model, prompt="Once upon a time", max_tokens=16, temperature=3.0,
                                     seed=seed, extra_body={"ignore_eos": True}).choices[0].text
assert sampled(42) == sampled(42)
assert len({sampled(s) for s in range(42, 48)}) > 1

# Chat, plain and streamed: the same answer; usage counts the rendered template.
msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
r = client.chat.completions.create(model=model, messages=msgs, max_tokens=6, **greedy)
m = r.choices[0].message
assert m.role == "assistant" and r.choices[0].finish_reason == "length", r
assert r.usage.completion_tokens == 6 and r.usage.prompt_tokens > 8, r.usage
chunks = list(client.chat.completions.create(model=model, messages=msgs, max_tokens=6, stream=True, **greedy))
assert chunks[0].choices[0].delta.role == "assistant"
assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == m.content
assert chunks[-1].choices[0].finish_reason == "length"
out["chat_text"] = m.content
r2 = client.chat.completions.create(model=model, messages=msgs, max_completion_tokens=6, **greedy)
assert r2.choices[0].message.content == m.content

# Errors, each with its status and OpenAI's error shape.
def status(fn):
    try:
        fn()
    except openai.APIStatusError as e:
        assert e.body and "message" in e.body, e.body
        return e.status_code
    raise AssertionError("no error")

assert status(lambda: client.completions.create(model=model, prompt="x", n=2)) == 400
assert status(lambda: client.completions.create(model=model, prompt="x", max_tokens=0)) == 400
assert status(lambda: client.completions.create(model=model, prompt="x", temperature=-1)) == 400
assert status(lambda: client.completions.create(model=model, prompt="x", logprobs=2)) == 400
assert status(lambda: client.chat.completions.create(model=model, messages=[])) == 400
assert status(lambda: client.completions.create(model="no-such-model", prompt="x")) == 404
wrong = openai.OpenAI(base_url=base, api_key="wrong", max_retries=0)
assert status(lambda: wrong.completions.create(model=model, prompt="x")) == 401
assert status(lambda: wrong.models.list()) == 401
# A request that can never fit the KV pool is a permanent 400, not a 429 to retry.
assert status(lambda: client.completions.create(model=model, prompt="x", max_tokens=too_many)) == 400
# Streamed, the refusal is still the HTTP status (not a 200 with an error event).
assert status(lambda: list(client.completions.create(model=model, prompt="x", max_tokens=too_many, stream=True))) == 400
assert status(lambda: list(client.chat.completions.create(model="no-such-model", messages=msgs, stream=True))) == 404
print(json.dumps(out))
