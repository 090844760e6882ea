#!/usr/bin/env python3
"""PyTorch + PEFT side of the CPU LoRA training benchmark (float32).

Trains a LoRA (rank 8, alpha 16, no dropout, on q,k,v,o,gate,up,down by
default) on a Llama-family HF folder with torch.optim.AdamW, on rows of
exactly --seq-len tokens made the way `engine finetune --pack` makes them:
each {"text"} line of the JSONL tokenized without special tokens, followed by
EOS, all concatenated and cut into rows. Step k takes rows k·B .. k·B+B-1.

Measures and prints one JSON line:
  {"impl":"pytorch+peft","tokens_per_s":..,"peak_rss_mb":..,"losses":[..],...}
where tokens_per_s = (N − 1)·B·seq_len / (time of steps 2..N) (step 1 is the
warm-up) and peak_rss_mb is this process's peak resident set (ru_maxrss).

    .venv/bin/python benches/pytorch_lora_train.py --model models/smollm2-135m-instruct \\
        --data FILE --seq-len 256 --batch 4 --steps 6 --threads 2
"""

import argparse
import json
import resource
import time

import torch


def rows(tokenizer, path, seq_len, eos):
    stream = []
    with open(path) as f:
        for line in f:
            if line.strip():
                stream += tokenizer.encode(json.loads(line)["text"], add_special_tokens=False)
                stream.append(eos)
    n = len(stream) // seq_len
    return torch.tensor(stream[: n * seq_len]).view(n, seq_len)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument(
        "--targets", default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    config = LoraConfig(
        r=args.rank,
        lora_alpha=2 * args.rank,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    model = get_peft_model(model, config)
    model.train()
    data = rows(tok, args.data, args.seq_len, tok.eos_token_id)
    need = args.steps * args.batch
    if len(data) < need:
        data = data.repeat((need + len(data) - 1) // len(data), 1)
    opt = torch.optim.AdamW(
        [p for p in model.parameters() if p.requires_grad], lr=args.lr, weight_decay=0.0
    )
    losses, times = [], []
    for step in range(args.steps):
        batch = data[step * args.batch : (step + 1) * args.batch]
        t0 = time.perf_counter()
        out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(
            [p for p in model.parameters() if p.requires_grad], 1.0
        )
        opt.step()
        opt.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(out.loss.item())
    timed = sum(times[1:])
    tokens = (args.steps - 1) * args.batch * args.seq_len
    print(
        json.dumps(
            {
                "impl": "pytorch+peft",
                "tokens_per_s": tokens / timed,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "losses": losses,
                "threads": args.threads,
                "seq_len": args.seq_len,
                "batch": args.batch,
                "steps": args.steps,
                "torch": torch.__version__,
            }
        )
    )


if __name__ == "__main__":
    main()
