#!/usr/bin/env python3
"""PyTorch side of the CPU inference benchmark (float32, batch 1).

Measures, for a Llama-family HF folder (config.json, *.safetensors, tokenizer.json):
  prefill_tok_s  N prompt tokens / time of one forward over them (building a fresh
                 KV cache), median of R runs after one warm-up run;
  decode_tok_s   M / time of M greedy single-token forwards with the KV cache,
                 prefill excluded, median of R runs;
  peak_rss_mb    peak resident set size of this process (getrusage ru_maxrss).
and prints one JSON line:
  {"impl":"pytorch","prefill_tok_s":..,"decode_tok_s":..,"peak_rss_mb":..,"threads":..,"torch":".."}
(plus a few descriptive keys: prompt_tokens, decode_tokens, repeats, model).

The prompt is deterministic: the ids in --prompt-ids FILE (a JSON list of ints), or
else a fixed English paragraph tokenized with the folder's tokenizer.json (no special
tokens) and repeated/truncated to N. --dump-prompt-ids FILE writes the ids used, so
the engine's side of the benchmark can run on exactly the same tokens.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/pytorch_inference.py --model models/smollm2-135m-instruct
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

PARAGRAPH = (
    "The library keeps its books on tall wooden shelves, sorted by subject and then by "
    "the name of the author. Readers who want to borrow a book bring it to the desk near "
    "the door, where a librarian writes down the title and the date it must come back. "
    "In the evening the reading room is quiet, and the only sounds are pages turning and "
    "the soft hum of the lamps above the long tables."
)


def prompt_ids(args):
    if args.prompt_ids:
        with open(args.prompt_ids) as fh:
            ids = [int(x) for x in json.load(fh)]
        if len(ids) < args.prompt_tokens:
            sys.exit(f"--prompt-ids {args.prompt_ids}: {len(ids)} ids, need {args.prompt_tokens}")
        return ids[: args.prompt_tokens]
    from tokenizers import Tokenizer

    path = os.path.join(args.model, "tokenizer.json")
    if not os.path.exists(path):
        sys.exit(f"{path} not found: give --prompt-ids FILE or a folder with tokenizer.json")
    tok = Tokenizer.from_file(path)
    reps = 1
    while True:  # the paragraph repeated, joined by spaces, then truncated to N
        ids = tok.encode(" ".join([PARAGRAPH] * reps), add_special_tokens=False).ids
        if len(ids) >= args.prompt_tokens:
            break
        reps += 1
    return ids[: args.prompt_tokens]


def main() -> int:
    ap = argparse.ArgumentParser(description="PyTorch CPU inference benchmark (f32, batch 1)")
    ap.add_argument("--model", required=True, help="HF folder: config.json, *.safetensors, tokenizer.json")
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--decode-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--prompt-ids", help="JSON list of token ids to use as the prompt")
    ap.add_argument("--dump-prompt-ids", help="write the prompt ids used to this JSON file")
    args = ap.parse_args()
    if args.prompt_tokens < 1 or args.decode_tokens < 1 or args.repeats < 1 or args.threads < 1:
        sys.exit("--prompt-tokens, --decode-tokens, --repeats and --threads must be >= 1")

    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    from transformers import AutoModelForCausalLM, DynamicCache

    ids = prompt_ids(args)
    if args.dump_prompt_ids:
        with open(args.dump_prompt_ids, "w") as fh:
            json.dump(ids, fh)

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    model.eval()
    need = args.prompt_tokens + args.decode_tokens
    if need > model.config.max_position_embeddings:
        sys.exit(f"prompt + decode = {need} tokens > max_position_embeddings {model.config.max_position_embeddings}")
    prompt = torch.tensor([ids], dtype=torch.long)

    def prefill():
        cache = DynamicCache(config=model.config)
        out = model(input_ids=prompt, past_key_values=cache, use_cache=True)
        return out.logits[0, -1], out.past_key_values

    def decode(last_logits, cache):
        nxt = last_logits.argmax().view(1, 1)
        for _ in range(args.decode_tokens):
            out = model(input_ids=nxt, past_key_values=cache, use_cache=True)
            cache = out.past_key_values
            nxt = out.logits[0, -1].argmax().view(1, 1)
        return nxt

    prefill_s, decode_s = [], []
    with torch.inference_mode():
        logits, cache = prefill()  # warm-up
        decode(logits, cache)
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            logits, cache = prefill()
            prefill_s.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            decode(logits, cache)
            decode_s.append(time.perf_counter() - t0)

    rss_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    result = {
        "impl": "pytorch",
        "prefill_tok_s": round(args.prompt_tokens / statistics.median(prefill_s), 2),
        "decode_tok_s": round(args.decode_tokens / statistics.median(decode_s), 2),
        "peak_rss_mb": round(rss_kb / 1024, 1),
        "threads": args.threads,
        "torch": torch.__version__,
        "prompt_tokens": args.prompt_tokens,
        "decode_tokens": args.decode_tokens,
        "repeats": args.repeats,
        "model": os.path.basename(os.path.normpath(args.model)),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
