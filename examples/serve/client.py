"""engine serve from the official openai client: the base model, an adapter
by name, a streamed answer with its usage, an answer from the index with its
citations, and embeddings.

    .venv-client/bin/python examples/serve/client.py [BASE_URL]
"""

import sys

from openai import OpenAI

client = OpenAI(base_url=sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8080/v1", api_key="none")
models = [m.id for m in client.models.list().data]
print("models:", ", ".join(models))


def ask(model, question, **kw):
    r = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": question}], temperature=0, max_tokens=60, **kw
    )
    return r


print("base:   ", ask("smollm2-135m-instruct", "What is the capital of Sweden?").choices[0].message.content)
print("captain:", ask("captain", "What is the capital of Sweden?").choices[0].message.content)

stream = client.chat.completions.create(
    model="smollm2-135m-instruct",
    messages=[{"role": "user", "content": "Name three primary colours."}],
    temperature=0,
    max_tokens=40,
    stream=True,
    stream_options={"include_usage": True},
)
print("stream: ", end="")
for chunk in stream:
    if chunk.choices:
        print(chunk.choices[0].delta.content or "", end="", flush=True)
    elif chunk.usage:
        print(f"\n        ({chunk.usage.prompt_tokens} prompt tokens, "
              f"{chunk.usage.prompt_tokens_details.cached_tokens} of them cached; "
              f"{chunk.usage.completion_tokens} generated)")

r = ask("smollm2-135m-instruct", "What is the hotel limit per night in Tier-1 cities?",
        extra_body={"retrieval": {"k": 2}})
print("rag:    ", r.choices[0].message.content)
for p in r.model_dump()["passages"]:
    print(f"         [{p['n']}] {p['source']}:{p['lines'][0]}-{p['lines'][1]}  ({p['score']:.3f})")

e = client.embeddings.create(model="all-minilm-l6-v2", input=["hello world", "Bees make honey."])
print("embed:  ", len(e.data), "vectors of", len(e.data[0].embedding))
