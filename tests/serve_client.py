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
    assert r.status_code == 413 and "over" in r.json()["error"]["message"], (r.status_code, r.text[:200])
    r = httpx.post(BASE + "/completions", content=b'{"model": 5}', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "model" in r.json()["error"]["message"], r.text
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


def adapters():
    """Adapters by name: equal to engine generate --adapter, mixed with the
    base model in one batch, loaded and unloaded while serving, and never a
    path from a request."""
    c = client()
    base_text, adapter_text, question = ARGS[0], ARGS[1], ARGS[2]
    ids = [m.id for m in c.models.list().data]
    assert "cap" in ids, ids
    r = c.chat.completions.create(model="cap", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30)
    assert r.choices[0].message.content == adapter_text, (r.choices[0].message.content, adapter_text)
    assert r.model == "cap"

    # Base and adapter rows in the same batches: each gets its solo text.
    ac = openai.AsyncOpenAI(base_url=BASE, api_key="none", max_retries=0)

    async def one(model):
        r = await ac.chat.completions.create(
            model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30
        )
        return r.choices[0].message.content

    async def mixed():
        return await asyncio.gather(*(one(m) for m in ["cap", MODEL, "cap", MODEL, MODEL, "cap"]))

    got = asyncio.run(mixed())
    assert got == [adapter_text, base_text, adapter_text, base_text, base_text, adapter_text], got

    # Loaded from --adapter-dir by name while serving, then unloaded.
    def post(name):
        return httpx.post(BASE + "/adapters", json={"name": name})

    for bad in ["../adapter", "/etc", "a/b", "..", ".hidden", ""]:
        r = post(bad)
        assert r.status_code == 400, (bad, r.status_code, r.text)
    r = post("escape")  # a symbolic link out of the adapter folder
    assert r.status_code == 400 and "outside" in r.json()["error"]["message"], r.text
    assert post("missing").status_code == 404
    r = post("dyn")
    assert r.status_code == 200, r.text
    assert "dyn" in [m.id for m in c.models.list().data]
    r = c.chat.completions.create(model="dyn", messages=[{"role": "user", "content": question}], temperature=0, max_tokens=30)
    assert r.choices[0].message.content == adapter_text
    assert httpx.delete(BASE + "/adapters/dyn").status_code == 200
    assert httpx.delete(BASE + "/adapters/dyn").status_code == 404
    expect_error(
        openai.NotFoundError, 404, lambda: c.chat.completions.create(model="dyn", messages=[{"role": "user", "content": "hi"}])
    )
    wait_idle()


def rag():
    """Embeddings, documents changed while serving, retrieval with citations."""
    c = client()
    embedder, expected_file = ARGS[0], ARGS[1]
    expected = json.load(open(expected_file))
    assert embedder in [m.id for m in c.models.list().data]
    texts = [e["text"] for e in expected]
    # The client asks for base64 unless told: both must give engine embed's vectors.
    for fmt in [None, "float"]:
        kw = {} if fmt is None else {"encoding_format": fmt}
        r = c.embeddings.create(model=embedder, input=texts, **kw)
        assert [d.index for d in r.data] == list(range(len(texts)))
        for d, e in zip(r.data, expected):
            assert d.embedding == e["embedding"], (fmt, d.embedding[:4], e["embedding"][:4])
        assert r.usage.prompt_tokens > 0
    expect_error(openai.NotFoundError, 404, lambda: c.embeddings.create(model="nope", input="x"))

    doc = (
        "# Travel policy\n\nHotels: staff may book hotels of up to 212 euros per night in any city.\n\n"
        "Trains: second class for trips under four hours, first class above.\n"
    )
    other = "# Office plants\n\nThe office ficus is watered every Tuesday by the facilities team.\n"
    for source, text in [("policies/travel.md", doc), ("../../outside.md", other)]:
        r = httpx.post(BASE + "/documents", json={"source": source, "text": text})
        assert r.status_code == 200 and r.json()["chunks"] >= 1, r.text
    assert r.json()["source"] == "../../outside.md"
    assert httpx.post(BASE + "/documents", json={"source": "", "text": "x"}).status_code == 400
    assert httpx.post(BASE + "/documents", json={"source": "a\nb", "text": "x"}).status_code == 400

    question = "How much may a hotel cost per night?"
    r = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=60,
        extra_body={"retrieval": {"k": 2}},
    )
    body = r.model_dump()
    assert body["passages"][0]["source"] == "policies/travel.md", body["passages"]
    assert body["passages"][0]["lines"][0] >= 1 and body["passages"][0]["score"] > 0
    for cit in body["citations"]:
        assert cit["source"] in ("policies/travel.md", "../../outside.md") and cit["n"] in (1, 2)
    # Streamed: the same answer, the citations on the finishing chunk.
    chunks = list(c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=60,
        extra_body={"retrieval": {"k": 2}}, stream=True,
    ))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    last = [ch.model_dump() for ch in chunks if ch.choices and ch.choices[0].finish_reason][0]
    assert last["citations"] == body["citations"] and last["passages"] == body["passages"]

    # Deleted: the next request no longer sees it.
    assert httpx.delete(BASE + "/documents", params={"source": "policies/travel.md"}).status_code == 200
    assert httpx.delete(BASE + "/documents", params={"source": "policies/travel.md"}).status_code == 404
    r = c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=8,
        extra_body={"retrieval": {"k": 2}},
    )
    assert [p["source"] for p in r.model_dump()["passages"]] == ["../../outside.md"]
    expect_error(openai.BadRequestError, 400, lambda: c.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "x"}], extra_body={"retrieval": {"k": 0}}))


def concurrent():
    """32 streams at once, every fourth with the adapter "cap", each with
    exactly the text it gets alone."""
    c = client()
    prompts = [f"Say something about the number {i}." if i % 2 else f"Name {i % 7 + 2} animals." for i in range(32)]
    lengths = [4 + (i * 5) % 29 for i in range(32)]
    models = ["cap" if i % 4 == 0 else MODEL for i in range(32)]
    solo = [
        c.chat.completions.create(
            model=m, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=n
        ).choices[0].message.content
        for p, n, m in zip(prompts, lengths, models)
    ]
    ac = openai.AsyncOpenAI(base_url=BASE, api_key="none", max_retries=0)

    async def one(p, n, m):
        text = ""
        async for ch in await ac.chat.completions.create(
            model=m, messages=[{"role": "user", "content": p}], temperature=0, max_tokens=n, stream=True
        ):
            if ch.choices:
                text += ch.choices[0].delta.content or ""
        return text

    async def all_at_once():
        return await asyncio.gather(*(one(p, n, m) for p, n, m in zip(prompts, lengths, models)))

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
    r = client(api_key=key).chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert r.model == MODEL and r.usage.completion_tokens >= 1
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
    "adapters": adapters,
    "rag": rag,
    "concurrent": concurrent,
    "disconnect": disconnect,
    "auth": auth,
    "overload": overload,
    "stream_until_killed": stream_until_killed,
}[MODE]()
print("ok", MODE)
