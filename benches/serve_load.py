"""Load generator for benches/serve.sh: replays a fixed set of prompts against an
OpenAI-compatible server (engine serve or llama.cpp's llama-server) at fixed
concurrencies, as streaming /v1/completions with ignore_eos, and prints one JSON
line per concurrency level on stdout.

Per request: TTFT = send -> first chunk with text; TPOT = (last text chunk -
first text chunk) / (completion tokens - 1). Per level: requests/s and output
tokens/s over the level's wall time (first send -> last response), p50/p99 of
TTFT and TPOT, and the server's peak RSS so far (VmHWM of --pid).

The prompts are made deterministically from a fixed word list (random.Random
seeded by the request's number) and cut to an exact token count with the
model's tokenizer.json, so both servers get the same text. Request k of the
whole run gets prompt k: no prompt repeats, and every prompt starts with a
different sequence number, so neither server's prefix or slot cache can reuse
an earlier request's prompt.
"""

import argparse
import asyncio
import json
import random
import sys
import time

import httpx
from tokenizers import Tokenizer

WORDS = """
the of and to in is that for it as was with be by on not he this are or his from at
which but have an they you were her she there one all we their has been would more
when if will can no other its about so what time up out into than some could them
only new these two may first then do any like my now over such our man me even most
made after also did many before must through back years where much your way well
down should because each just those people how too little state good very make world
still own see men work long get here between both life being under never day same
another know while last might us great old year off come since against go came right
used take three house small number river garden engine server request token model
batch memory cache paged block thread kernel matrix vector weight layer prompt answer
question library document index search machine learning water light window city road
""".split()


def make_prompt(tok: Tokenizer, k: int, n_tokens: int) -> str:
    rng = random.Random(1_000_003 * k + 17)
    words = [f"Note {k}:"]
    while True:
        words.extend(rng.choice(WORDS) for _ in range(n_tokens))
        ids = tok.encode(" ".join(words), add_special_tokens=False).ids
        if len(ids) >= n_tokens:
            return tok.decode(ids[:n_tokens])


def prompt_len(k: int, fixed: int | None) -> int:
    if fixed:
        return fixed
    # 32, 64, ..., 256 tokens in a fixed order scrambled by k.
    return 32 * (1 + (k * 5) % 8)


def percentile(xs: list[float], q: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not xs:
        return float("nan")
    xs = sorted(xs)
    pos = (len(xs) - 1) * q / 100
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def peak_rss_mib(pid: int | None) -> float | None:
    if not pid:
        return None
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


async def one_request(client, url, model, prompt, max_tokens, ignore_eos=True):
    body = {
        "model": model,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": ignore_eos,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = None
    chunks = 0
    usage = None
    async with client.stream("POST", url, json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:300]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data:"):
                continue
            data = line[5:].strip()
            if data == "[DONE]":
                break
            msg = json.loads(data)
            if msg.get("usage"):
                usage = msg["usage"]
            for choice in msg.get("choices") or []:
                if choice.get("text"):
                    now = time.perf_counter()
                    first = first or now
                    last = now
                    chunks += 1
    end = time.perf_counter()
    tokens = usage["completion_tokens"] if usage else chunks
    return {
        "ttft": (first or end) - t0,
        "tpot": (last - first) / (tokens - 1) if first and tokens > 1 else None,
        "tokens": tokens,
        "chunks": chunks,
        "prompt_tokens": usage.get("prompt_tokens") if usage else None,
        "latency": end - t0,
    }


async def run_level(client, args, conc, n, start_k, fixed_len, tok):
    prompts = [make_prompt(tok, start_k + i, prompt_len(start_k + i, fixed_len)) for i in range(n)]
    queue = list(enumerate(prompts))
    results = []

    async def worker():
        while queue:
            i, p = queue.pop(0)
            r = await one_request(client, args.url, args.model, p, args.max_tokens)
            results.append({**r, "index": i})

    t0 = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(conc)))
    wall = time.perf_counter() - t0
    toks = sum(r["tokens"] for r in results)
    ttft = [r["ttft"] for r in results]
    tpot = [r["tpot"] for r in results if r["tpot"] is not None]
    # After the first wave: requests that arrived while others were running
    # (the first `conc` all arrive at once, and the last of them waits for the
    # prompts of all the others).
    later = [r["ttft"] for r in results if r["index"] >= conc]
    short = [r["tokens"] for r in results if r["tokens"] != args.max_tokens]
    return {
        "server": args.label,
        "concurrency": conc,
        "requests": n,
        "prompt_tokens": fixed_len or "32-256",
        "prompt_tokens_mean": round(sum(r["prompt_tokens"] or 0 for r in results) / n, 1),
        "output_tokens": toks,
        "short_requests": len(short),
        "wall_s": round(wall, 3),
        "req_s": round(n / wall, 4),
        "out_tok_s": round(toks / wall, 2),
        "ttft_p50_s": round(percentile(ttft, 50), 4),
        "ttft_p99_s": round(percentile(ttft, 99), 4),
        "ttft_later_p50_s": round(percentile(later, 50), 4) if later else None,
        "ttft_later_p99_s": round(percentile(later, 99), 4) if later else None,
        "tpot_p50_ms": round(1000 * percentile(tpot, 50), 2),
        "tpot_p99_ms": round(1000 * percentile(tpot, 99), 2),
        "peak_rss_mib": peak_rss_mib(args.pid),
    }


async def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base-url", default="http://127.0.0.1:8099")
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--tokenizer", required=True, help="tokenizer.json of the model")
    ap.add_argument("--label", default="server")
    ap.add_argument("--pid", type=int, help="server process: its VmHWM is the peak RSS")
    ap.add_argument("--concurrency", default="1,4,16,64")
    ap.add_argument("--requests", default="",
                    help="requests per level, comma-separated like --concurrency "
                         "(default: 4 at concurrency 1, else 2 x concurrency)")
    ap.add_argument("--prompt-tokens", type=int, default=0,
                    help="every prompt this many tokens (default: 32..256, varied)")
    ap.add_argument("--first-prompt", type=int, default=0,
                    help="number of the first prompt (levels take consecutive numbers)")
    ap.add_argument("--max-tokens", type=int, default=128)
    args = ap.parse_args()
    args.url = args.base_url.rstrip("/") + "/v1/completions"
    tok = Tokenizer.from_file(args.tokenizer)
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.requests:
        counts = [int(c) for c in args.requests.split(",")]
    else:
        counts = [4 if c == 1 else 2 * c for c in levels]
    assert len(counts) == len(levels), "--requests needs one count per concurrency"
    limits = httpx.Limits(max_connections=max(levels) + 4, max_keepalive_connections=max(levels) + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        # Warm-up: one short request, not counted, with a prompt no level uses.
        warm = make_prompt(tok, 10**6 + args.first_prompt, 32)
        await one_request(client, args.url, args.model, warm, 8)
        k = args.first_prompt
        for conc, n in zip(levels, counts):
            row = await run_level(client, args, conc, n, k, args.prompt_tokens or None, tok)
            k += n
            print(json.dumps(row), flush=True)
            if row["short_requests"]:
                print(f"warning: {args.label}: {row['short_requests']} requests at concurrency "
                      f"{conc} generated fewer than {args.max_tokens} tokens", file=sys.stderr)


if __name__ == "__main__":
    asyncio.run(main())
