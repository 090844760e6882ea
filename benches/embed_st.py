#!/usr/bin/env python3
"""sentence-transformers side of the CPU embedding benchmark (benches/embed.sh).

Two jobs:

  --make-texts DIR   writes the benchmark's texts, deterministically, from this
                     repository's prose (README.md and examples/quillmark-kb):
                       DIR/queries.json   short texts: the sentences of the prose
                                          and the knowledge base's questions,
                                          then the first 3-16 words of them
                                          (about 5-50 tokens each);
                       DIR/passages.json  passages of 60-150 consecutive words of
                                          the same prose (about 90-256 tokens);
                     each a JSON list of strings. --queries N and --passages N
                     set how many (cycling through the prose when it runs out).

  --texts FILE       embeds the JSON list of strings in FILE with
                     SentenceTransformer.encode(batch_size=--batch) on the CPU,
                     float32, torch.set_num_threads(--threads): one warm-up call
                     on the first 64 texts, then --repeats timed calls over all
                     of them (tokenization, length sorting, padding, forward,
                     pooling and normalisation included; process start and model
                     load excluded), and prints one JSON line:
                       {"impl": "sentence-transformers", "sentences": N, "tokens": T,
                        "sentences_per_s": median, "best_sentences_per_s": best,
                        "seconds": [...], "threads": .., "batch": .., ...}
                     --dump FILE writes the last call's embeddings as raw
                     little-endian float32, N rows of the embedding width.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/embed_st.py --make-texts /tmp/texts
    .venv/bin/python benches/embed_st.py --model models/all-minilm-l6-v2 --texts /tmp/texts/queries.json
"""

import argparse
import html
import json
import os
import random
import re
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KB = os.path.join(ROOT, "examples", "quillmark-kb")


def prose_paragraphs():
    """The prose of README.md and the knowledge base's documents: paragraphs
    with code blocks, tables, headings' markup and HTML tags left out."""
    sources = [os.path.join(ROOT, "README.md")]
    docs = os.path.join(KB, "docs")
    sources += [os.path.join(docs, f) for f in sorted(os.listdir(docs))]
    paragraphs = []
    for path in sources:
        text = open(path, encoding="utf-8").read()
        text = re.sub(r"```.*?```", "\n\n", text, flags=re.S)
        if path.endswith(".html"):
            text = re.sub(r"<(p|li|h\d|tr|div)[^>]*>", "\n\n", text)
            text = html.unescape(re.sub(r"<[^>]+>", " ", text))
        for block in re.split(r"\n\s*\n", text):
            lines = [l.strip() for l in block.splitlines()]
            lines = [l for l in lines if l and not l.startswith("|")]
            para = re.sub(r"^#+\s*", "", " ".join(lines))
            para = re.sub(r"\s+", " ", para).strip()
            if len(para.split()) >= 3:
                paragraphs.append(para)
    return paragraphs


def make_texts(out_dir, n_queries, n_passages):
    paragraphs = prose_paragraphs()
    sentences = []
    for p in paragraphs:
        for s in re.split(r"(?<=[.!?])\s+(?=[A-Z`(\"'])", p):
            if 3 <= len(s.split()) <= 30:
                sentences.append(s)
    with open(os.path.join(KB, "questions.jsonl"), encoding="utf-8") as fh:
        sentences += [json.loads(line)["question"] for line in fh if line.strip()]
    # Past the distinct sentences, query-like fragments: the first 3-16 words
    # of a sentence.
    rng = random.Random(0)
    queries = sentences[:n_queries]
    while len(queries) < n_queries:
        words = sentences[len(queries) % len(sentences)].split()
        queries.append(" ".join(words[: rng.randint(3, 16)]))

    words = " ".join(paragraphs).split()
    passages, at = [], 0
    for _ in range(n_passages):
        n = rng.randint(60, 150)
        passages.append(" ".join(words[(at + i) % len(words)] for i in range(n)))
        at = (at + n) % len(words)

    os.makedirs(out_dir, exist_ok=True)
    for name, texts in (("queries", queries), ("passages", passages)):
        with open(os.path.join(out_dir, f"{name}.json"), "w", encoding="utf-8") as fh:
            json.dump(texts, fh, ensure_ascii=False)
    print(json.dumps({"queries": len(queries), "distinct_sentences": len(set(sentences)),
                      "passages": len(passages), "prose_words": len(words)}))


def peak_rss_mb():
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def bench(args):
    import torch
    import sentence_transformers
    from sentence_transformers import SentenceTransformer

    torch.set_num_threads(args.threads)
    with open(args.texts, encoding="utf-8") as fh:
        texts = json.load(fh)
    model = SentenceTransformer(args.model, device="cpu")
    model.eval()
    tokenize = getattr(model, "preprocess", None) or model.tokenize
    tokens = sum(len(tokenize([t])["input_ids"][0]) for t in texts)

    def encode(batch):
        with torch.inference_mode():
            return model.encode(batch, batch_size=args.batch, convert_to_numpy=True,
                                show_progress_bar=False)

    encode(texts[:64])  # warm-up
    seconds, emb = [], None
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        emb = encode(texts)
        seconds.append(time.perf_counter() - t0)
    if args.dump:
        emb.astype("<f4").tofile(args.dump)
    n = len(texts)
    print(json.dumps({
        "impl": "sentence-transformers",
        "sentences": n,
        "tokens": tokens,
        "sentences_per_s": round(n / statistics.median(seconds), 2),
        "best_sentences_per_s": round(n / min(seconds), 2),
        "seconds": [round(s, 4) for s in seconds],
        "threads": args.threads,
        "batch": args.batch,
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "torch": torch.__version__,
        "sentence_transformers": sentence_transformers.__version__,
    }))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--make-texts", metavar="DIR")
    p.add_argument("--queries", type=int, default=1024)
    p.add_argument("--passages", type=int, default=256)
    p.add_argument("--texts", metavar="FILE")
    p.add_argument("--model", default=os.path.join(ROOT, "models", "all-minilm-l6-v2"))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dump", metavar="FILE")
    args = p.parse_args()
    if args.make_texts:
        make_texts(args.make_texts, args.queries, args.passages)
    elif args.texts:
        bench(args)
    else:
        sys.exit("give --make-texts DIR or --texts FILE (see --help)")


if __name__ == "__main__":
    main()
