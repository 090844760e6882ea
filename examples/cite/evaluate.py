#!/usr/bin/env python3
"""Score `engine ask` on examples/quillmark-kb/questions.jsonl, with and without
a citation adapter (and, with --generate, the model alone, without passages).

For each question it checks two things:
  right  - the answer contains the reference fact (the key value of the reference
           answer in questions.jsonl, listed in FACTS below);
  cites  - the answer cites ([n]) at least one passage from the reference source;
  holds  - ... and a cited passage holds that fact (its lines, read from the file);
and counts the answers that run on (over 40 words: copied passages, repeats).

Usage (from the repository root, after `engine index add --index runs/kb ...`):
  python3 examples/cite/evaluate.py --adapter runs/cite-lora [--generate] [-v]
Prints one line per question (-v: the whole answers) and a table. Stdlib only.
"""

import argparse
import html
import json
import re
import subprocess
import sys
import time

# The fact each reference answer turns on: every group must match, a group is
# matched by any of its alternatives (case-insensitive, ** and line breaks removed).
FACTS = {
    "What was Quillmark's revenue in Q3 2026?": [["48.2"]],
    "How large was Quillmark's order backlog at the end of Q3 2026?": [["63 million", "€63m"]],
    "What payload can the Tern-7 arm carry?": [["7.5 kg", "7.5kg", "7.5 kilo"]],
    "How long does a Kestrel mobile base run on one charge?": [["10 hours", "ten hours"]],
    "When does the Heron vision module ship?": [["november"]],
    "What is the hotel limit per night in Tier-1 cities?": [["180"]],
    "When is business class allowed on a flight?": [["8 hours", "eight hours"]],
    "Within how many days must expense claims be submitted?": [["30 days", "thirty days"]],
    "How many days a week may employees work remotely?": [["two days", "2 days"]],
    "How large is the home-office budget?": [["600"]],
    "How much does Priority support cost?": [["2,400", "2400", "2 400"]],
    "How long is the hardware warranty on a Tern arm?": [["24 months", "two years", "24-month"]],
    "Who founded Quillmark Robotics?": [["lehtonen"], ["svoboda"]],
    "Where is Quillmark's sales office?": [["munich"]],
}


def has_fact(answer, groups):
    a = " ".join(answer.lower().replace("**", "").replace("\u00a0", " ").split())
    return all(any(alt.lower() in a for alt in group) for group in groups)


def passage_text(citation):
    """The lines a citation names, from the file (HTML tags and entities removed)."""
    first, last = citation["lines"]
    with open(citation["source"], encoding="utf-8") as f:
        text = "".join(f.readlines()[first - 1:last])
    return html.unescape(re.sub(r"<[^>]+>", " ", text))


def run(cmd):
    p = subprocess.run(cmd, capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr}")
    return p.stdout


def ask(args, question, adapter):
    cmd = [args.engine, "ask", "--model", args.model, "--index", args.index,
           "--embedder", args.embedder, "-k", str(args.k), "--json", question]
    if adapter:
        cmd[2:2] = ["--adapter", adapter]
    doc = json.loads(run(cmd))
    return doc["answer"], doc["citations"]


def generate(args, question):
    cmd = [args.engine, "generate", "--model", args.model, "--chat",
           "--max-tokens", "60", "--prompt", question]
    return run(cmd).strip(), []


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--engine", default="target/release/engine")
    ap.add_argument("--model", default="models/smollm2-135m-instruct")
    ap.add_argument("--embedder", default="models/all-minilm-l6-v2")
    ap.add_argument("--index", default="runs/kb")
    ap.add_argument("--questions", default="examples/quillmark-kb/questions.jsonl")
    ap.add_argument("-k", type=int, default=2)
    ap.add_argument("--adapter", action="append", default=[],
                    help="an adapter folder to score (repeatable)")
    ap.add_argument("--no-base", action="store_true", help="skip `ask` without adapter")
    ap.add_argument("--generate", action="store_true",
                    help="also score `engine generate --chat` on the bare question")
    ap.add_argument("-v", "--verbose", action="store_true", help="print whole answers")
    args = ap.parse_args()

    questions = [json.loads(line) for line in open(args.questions, encoding="utf-8") if line.strip()]
    for q in questions:
        if q["question"] not in FACTS:
            sys.exit(f"no reference fact for: {q['question']}")

    configs = []
    if args.generate:
        configs.append(("`generate` alone (no passages)", lambda q: generate(args, q)))
    if not args.no_base:
        configs.append(("`ask`", lambda q: ask(args, q, None)))
    for a in args.adapter:
        configs.append((f"`ask --adapter {a}`", lambda q, a=a: ask(args, q, a)))

    rows = []
    for name, fn in configs:
        right = cites = holds = both = long = 0
        t0 = time.time()
        print(f"== {name}", flush=True)
        for q in questions:
            answer, citations = fn(q["question"])
            fact = FACTS[q["question"]]
            ok = has_fact(answer, fact)
            cit = any(c["source"].endswith("/" + q["source"]) for c in citations)
            hold = cit and any(has_fact(passage_text(c), fact) for c in citations)
            right += ok
            cites += cit
            holds += hold
            both += ok and hold
            long += len(answer.split()) > 40
            flat = " ".join(answer.split())
            shown = flat if args.verbose else (flat[:110] + ("…" if len(flat) > 110 else ""))
            mark = ("R" if ok else "-") + ("C" if cit else "-") + ("H" if hold else "-")
            print(f"  {mark}  {q['question']}\n        {shown}", flush=True)
        rows.append((name, right, cites, holds, both, long, time.time() - t0))

    n = len(questions)
    print(f"\n| {n} questions | right fact | cites the right source | cites the passage with the fact "
          f"| right and cites that passage | over 40 words |")
    print("|---|---|---|---|---|---|")
    for name, right, cites, holds, both, long, _ in rows:
        print(f"| {name} | {right} | {cites} | {holds} | {both} | {long} |")
    for name, *_, secs in rows:
        print(f"# {name}: {secs:.0f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
