"""engine serve through the official `openai` Python client.

Run by tests/serve.rs against a server it started: `python serve_client.py
MODE BASE_URL MODEL [ARGS...]`, where MODE picks a group of checks. Each
check asserts what a user of the client relies on; the script exits non-zero
with the failed assertion on the first failure.
"""

import asyncio
import json
import sys
import time

import httpx
import openai

MODE, BASE, MODEL = sys.argv[1], sys.argv[2], sys.argv[3]
ARGS = sys.argv[4:]
ROOT = BASE[: -len("/v1")]


def client(**kw):
    return openai.OpenAI(base_url=BASE, api_key=kw.pop("api_key", "none"), max_retries=0, **kw)


def chat(c, prompt, **kw):
    return c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": prompt}], **kw
    )


def stream_chat(c, prompt, **kw):
    """Returns (text, chunks) of a streamed chat completion."""
    chunks = list(chat(c, prompt, stream=True, **kw))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    return text, chunks


def metrics():
    out = {}
    for line in httpx.get(ROOT + "/metrics").text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def wait_idle(timeout=30):
    """Waits until no request runs and no KV block is in use."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        m = metrics()
        if m["engine_requests_running"] == 0 and m["engine_kv_blocks_used"] == 0:
            return m
        time.sleep(0.1)
    raise AssertionError(f"the server did not go idle: {metrics()}")


def expect_error(cls, status, fn):
    try:
        fn()
    except cls as e:
        assert e.status_code == status, (e.status_code, e)
        body = e.response.json()
        assert "message" in body["error"] and "type" in body["error"], body
        return body["error"]
    raise AssertionError(f"expected {cls.__name__}")


def api():
    """Everything one server with the base model answers."""
    c = client()
    expected_greedy = ARGS[0]  # `engine generate --chat` of QUESTION
    question = ARGS[1]

    # Models.
    ids = [m.id for m in c.models.list().data]
    assert MODEL in ids, ids

    # Chat, greedy: the same text as engine generate.
    r = chat(c, question, temperature=0)
    assert r.choices[0].message.content == expected_greedy, (r.choices[0].message.content, expected_greedy)
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == "stop"
    assert r.object == "chat.completion" and r.model == MODEL
    u = r.usage
    assert u.prompt_tokens > 0 and u.completion_tokens > 0
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens

    # Streaming with usage: one id, the finish reason once, the joined text
    # equal to the non-streamed one, the usage chunk last with no choices,
    # and the repeated prompt's blocks counted as cached.
    text, chunks = stream_chat(c, question, temperature=0, stream_options={"include_usage": True})
    assert text == expected_greedy, (text, expected_greedy)
    assert len({ch.id for ch in chunks}) == 1
    finishes = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finishes == ["stop"], finishes
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None, last
    assert all(ch.usage is None for ch in chunks[:-1])
    assert last.usage.completion_tokens == u.completion_tokens
    assert last.usage.prompt_tokens == u.prompt_tokens
    assert last.usage.prompt_tokens_details.cached_tokens >= 16, last.usage
    assert last.usage.prompt_tokens_details.cached_tokens < u.prompt_tokens

    # max_tokens and max_completion_tokens end with "length".
    r = chat(c, "Count from one to fifty in words.", temperature=0, max_tokens=5)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 5
    r = chat(c, "Count from one to fifty in words.", temperature=0, max_completion_tokens=3)
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == 3

    # ignore_eos (an extension) runs to max_tokens past the end of turn.
    r = chat(c, question, temperature=0, max_tokens=u.completion_tokens + 5, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.completion_tokens == u.completion_tokens + 5

    # A stop string cuts the text before it, streamed or not.
    prompt = "Count from one to twenty, separated by commas."
    full = chat(c, prompt, temperature=0, max_tokens=40).choices[0].message.content
    words = full.split()
    assert len(words) > 4, full
    stop = words[len(words) // 2]
    r = chat(c, prompt, temperature=0, max_tokens=40, stop=[stop, "zzz"])
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == full[: full.index(stop)], (r.choices[0].message.content, full)
    text, chunks = stream_chat(c, prompt, temperature=0, max_tokens=40, stop=stop)
    assert text == full[: full.index(stop)], (text, full)

    # Sampling with a seed repeats itself.
    a = chat(c, "Write a word.", temperature=1.0, top_p=0.9, seed=7, max_tokens=8, extra_body={"top_k": 40})
    b = chat(c, "Write a word.", temperature=1.0, top_p=0.9, seed=7, max_tokens=8, extra_body={"top_k": 40})
    assert a.choices[0].message.content == b.choices[0].message.content

    # Logprobs: the greedy token is the most likely alternative.
    r = chat(c, question, temperature=0, logprobs=True, top_logprobs=3, max_tokens=4)
    content = r.choices[0].logprobs.content
    assert len(content) == 4
    for t in content:
        assert t.logprob <= 0 and len(t.top_logprobs) == 3
        assert t.top_logprobs[0].token == t.token and abs(t.top_logprobs[0].logprob - t.logprob) < 1e-6
        assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob >= t.top_logprobs[2].logprob
    assert "".join(t.token for t in content) == r.choices[0].message.content

    # Completions, streamed and not.
    r = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, logprobs=2)
    assert r.object == "text_completion" and r.choices[0].finish_reason == "length"
    lp = r.choices[0].logprobs
    assert len(lp.tokens) == 6 and len(lp.token_logprobs) == 6 and len(lp.top_logprobs[0]) == 2
    assert "".join(lp.tokens) == r.choices[0].text
    streamed = c.completions.create(model=MODEL, prompt="The capital of France is", max_tokens=6, temperature=0, stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == r.choices[0].text

    # Errors as the client raises them; the server answers normally after.
    e = expect_error(
        openai.NotFoundError, 404, lambda: c.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    )
    assert "nope" in e["message"]
    e = expect_error(openai.BadRequestError, 400, lambda: chat(c, "hi", logprobs=True, top_logprobs=21))
    assert e["param"] == "top_logprobs", e
    expect_error(openai.BadRequestError, 400, lambda: chat(c, "hi", n=2))
    expect_error(openai.BadRequestError, 400, lambda: chat(c, "hi", temperature=-1))
    expect_error(openai.BadRequestError, 400, lambda: chat(c, "hi", stop=["a", "b", "c", "d", "e"]))
    expect_error(openai.BadRequestError, 400, lambda: chat(c, "hi", extra_body={"max_tokens": "many"}))
    e = expect_error(openai.BadRequestError, 400, lambda: chat(c, "word " * 9000, max_tokens=1))
    assert e["code"] == "context_length_exceeded", e
    r = chat(c, question, temperature=0)
    assert r.choices[0].message.content == expected_greedy

    # Raw HTTP: malformed JSON, an oversized body, an unknown path.
    r = httpx.post(BASE + "/chat/completions", content=b'{"model": ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error", r.text
    r = httpx.post(BASE + "/chat/completions", content=b"x" * (5 << 20))
    assert r.status_code == 413, r.status_code
    assert httpx.get(ROOT + "/nope").status_code == 404
    assert httpx.get(ROOT + "/health").json() == {"status": "ok"}

    # The metrics a dashboard reads.
    m = wait_idle()
    for name in [
        "engine_requests_waiting",
        "engine_kv_blocks_free",
        "engine_prefix_cache_hit_rate",
        "engine_prompt_tokens_total",
        "engine_generation_tokens_total",
        'engine_time_to_first_token_seconds_bucket{le="+Inf"}',
        "engine_inter_token_latency_seconds_count",
    ]:
        assert name in m, name
    assert m["engine_prefix_cache_hits_total"] > 0
    assert 0 < m["engine_prefix_cache_hit_rate"] < 1


def concurrent():
    """32 streams at once, each with exactly the text it gets alone."""
    c = client()
    prompts = [f"Say something about the number {i}." if i % 2 else f"Name {i % 7 + 2} animals." for i in range(32)]
    lengths = [4 + (i * 5) % 29 for i in range(32)]
    solo = [chat(c, p, temperature=0, max_tokens=n).choices[0].message.content for p, n in zip(prompts, lengths)]
    ac = openai.AsyncOpenAI(base_url=BASE, api_key="none", max_retries=0)

    async def one(p, n):
        text = ""
        async for ch in await ac.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=n, stream=True
        ):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        return text

    async def all_at_once():
        return await asyncio.gather(*(one(p, n) for p, n in zip(prompts, lengths)))

    got = asyncio.run(all_at_once())
    for i, (g, s) in enumerate(zip(got, solo)):
        assert g == s, (i, g, s)
    wait_idle()


def disconnect():
    """A client that goes away mid-stream frees its request and blocks."""
    with httpx.stream(
        "POST",
        BASE + "/chat/completions",
        json={"model": MODEL, "messages": [{"role": "user", "content": "Tell a long story."}], "max_tokens": 2000, "stream": True},
        timeout=60,
    ) as r:
        lines = r.iter_lines()
        for _ in range(6):
            next(lines)
        assert metrics()["engine_requests_running"] == 1
    # The connection is closed: the engine notices at its next token.
    wait_idle()


def auth():
    key = ARGS[0]
    expect_error(openai.AuthenticationError, 401, lambda: client(api_key="wrong").models.list())
    r = httpx.get(BASE + "/models")
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert MODEL in [m.id for m in client(api_key=key).models.list().data]
    assert httpx.get(ROOT + "/health").status_code == 200


def overload():
    """With room for one request, a second one at the same time gets 429."""
    c = client()
    s = chat(c, "Tell a long story.", stream=True, max_tokens=500)
    next(iter(s))
    expect_error(openai.RateLimitError, 429, lambda: chat(c, "hi", max_tokens=1))
    s.close()
    wait_idle()
    assert chat(c, "hi", max_tokens=1).choices[0].finish_reason in ("stop", "length")


def stream_until_killed():
    """Prints the first chunk's text, then reads the rest: the server was
    sent SIGTERM meanwhile and must finish this stream."""
    c = client()
    text = ""
    for i, ch in enumerate(chat(c, "Tell a long story about a ship.", temperature=0, max_tokens=64, stream=True)):
        if i == 1:
            print("streaming", flush=True)
        if ch.choices:
            text += ch.choices[0].delta.content or ""
            if ch.choices[0].finish_reason:
                print("finished", ch.choices[0].finish_reason, json.dumps(text), flush=True)


{
    "api": api,
    "concurrent": concurrent,
    "disconnect": disconnect,
    "auth": auth,
    "overload": overload,
    "stream_until_killed": stream_until_killed,
}[MODE]()
print("ok", MODE)
