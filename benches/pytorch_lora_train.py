#!/usr/bin/env python3
"""PyTorch + PEFT side of the LoRA training benchmark: float32 on the CPU
(the default), or bf16 on a GPU with --device cuda.

Trains a LoRA (rank 8, alpha 2 x rank = 16, no dropout, on q,k,v,o,gate,up,down
by default) on a Llama-family HF folder with torch.optim.AdamW (constant --lr,
no weight decay, global-norm clipping at 1.0), on rows of exactly --seq-len
tokens made the way `engine finetune --pack` makes them from {"text"} lines:
each line's text tokenized without special tokens, followed by EOS, all lines
concatenated and cut into full rows (the tail that does not fill a row is
dropped). The loss is on every token (labels = inputs; transformers shifts
them). The benchmark only needs {"text"} lines; another kind of line is an
error. Step k (from 0) takes rows k·B .. k·B+B-1, the rows repeated from the
start if the file has fewer than N·B.

--device cuda, as close to engine's CUDA device as PyTorch gets: the frozen
base weights in bf16 (engine keeps them in bf16), the LoRA weights and their
AdamW state in f32 (PEFT's default autocast_adapter_dtype; engine's f32
master weights), and the forward under torch.autocast(bf16), so the matrix
products take bf16 inputs with f32 accumulation; the loss upcasts the logits
to f32 (engine's logits are f32). Attention is transformers' default (SDPA).

Measures:
  tokens_per_s  (N − 1)·B·seq_len / wall time of steps 2..N (step 1 is the
                warm-up); a step is forward + backward + clip + AdamW step
                (on a GPU, timed between torch.cuda.synchronize() calls);
  losses        the loss of every step;
  peak_rss_mb   this process's peak resident set (getrusage ru_maxrss);
  max_memory_allocated_mb, max_memory_reserved_mb
                with --device cuda: torch.cuda's peaks (tensors; and the
                caching allocator's reservation; neither counts the CUDA
                context).
With --json it prints one JSON line:
  {"impl":"pytorch+peft","tokens_per_s":..,"peak_rss_mb":..,"losses":[..],"step_s":[..],...}
otherwise a line per step and a summary.

    .venv/bin/pip install -r benches/requirements.txt
    .venv/bin/python benches/pytorch_lora_train.py --model models/smollm2-135m-instruct \\
        --data FILE --seq-len 256 --batch 4 --steps 6 --threads 2 --lr 2e-4 --json
"""

import argparse
import contextlib
import json
import os
import resource
import sys
import time

TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def packed_rows(tokenizer, path, seq_len, eos):
    """{"text"} lines -> token stream (each text, then EOS) -> full rows of seq_len."""
    stream = []
    with open(path) as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            obj = json.loads(line)
            if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
                sys.exit(f"{path}:{n}: expected a {{\"text\": ...}} line")
            stream += tokenizer.encode(obj["text"], add_special_tokens=False)
            stream.append(eos)
    n = len(stream) // seq_len
    if n == 0:
        sys.exit(f"{path}: {len(stream)} tokens, fewer than one row of {seq_len}")
    return stream[: n * seq_len], n


def main() -> int:
    ap = argparse.ArgumentParser(description="PyTorch + PEFT LoRA training benchmark (CPU f32, GPU bf16)")
    ap.add_argument("--model", required=True, help="HF folder: config.json, *.safetensors, tokenizer")
    ap.add_argument("--data", required=True, help='JSONL of {"text": ...} lines')
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, help="LoRA alpha (default: 2 x rank)")
    ap.add_argument("--targets", default=TARGETS, help="comma-separated projections")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cpu: float32; cuda: bf16 base weights and autocast, f32 LoRA (GPU 0)")
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()
    if min(args.seq_len, args.batch, args.threads, args.rank) < 1 or args.steps < 2:
        sys.exit("--seq-len, --batch, --threads and --rank must be >= 1, --steps >= 2")

    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit(f"--device cuda: torch {torch.__version__} sees no CUDA GPU")
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(args.seed)
    import peft
    import transformers
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(args.model)
    dtype = torch.bfloat16 if cuda else torch.float32
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(args.device)
    eos = model.config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    if eos is None:
        eos = tok.eos_token_id
    stream, n_rows = packed_rows(tok, args.data, args.seq_len, eos)
    data = torch.tensor(stream).view(n_rows, args.seq_len)
    need = args.steps * args.batch
    if n_rows < need:
        data = data.repeat((need + n_rows - 1) // n_rows, 1)

    config = LoraConfig(
        r=args.rank,
        lora_alpha=args.alpha if args.alpha is not None else 2 * args.rank,
        lora_dropout=0.0,
        target_modules=args.targets.split(","),
        bias="none",
        task_type="CAUSAL_LM",
    )
    # With bf16 base weights PEFT creates the adapters in f32
    # (autocast_adapter_dtype=True, its default).
    model = get_peft_model(model, config)
    model.train()
    data = data.to(args.device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16) if cuda else contextlib.nullcontext()
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)

    losses, step_s = [], []
    for step in range(args.steps):
        batch = data[step * args.batch : (step + 1) * args.batch]
        sync()
        t0 = time.perf_counter()
        with autocast:
            out = model(input_ids=batch, labels=batch)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        loss = out.loss.item()
        sync()
        step_s.append(time.perf_counter() - t0)
        losses.append(loss)
        if not args.json:
            print(f"step {step + 1}/{args.steps}  loss {loss:.4f}  {step_s[-1]:.2f} s  "
                  f"{args.batch * args.seq_len / step_s[-1]:.1f} tok/s", flush=True)

    tokens_per_s = (args.steps - 1) * args.batch * args.seq_len / sum(step_s[1:])
    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    result = {
        "impl": "pytorch+peft",
        "tokens_per_s": round(tokens_per_s, 2),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "losses": [round(x, 6) for x in losses],
        "step_s": [round(x, 4) for x in step_s],
        "device": args.device,
        "threads": args.threads,
        "seq_len": args.seq_len,
        "batch": args.batch,
        "steps": args.steps,
        "lr": args.lr,
        "lora_rank": args.rank,
        "lora_alpha": config.lora_alpha,
        "lora_targets": args.targets,
        "trainable_params": sum(p.numel() for p in trainable),
        "distinct_rows": n_rows,
        "model": os.path.basename(os.path.normpath(args.model)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
    }
    if cuda:
        result["gpu"] = torch.cuda.get_device_name(0)
        result["precision"] = "bf16 base weights + bf16 autocast, f32 LoRA and AdamW"
        result["max_memory_allocated_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
        result["max_memory_reserved_mb"] = round(torch.cuda.max_memory_reserved() / 2**20, 1)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{tokens_per_s:.1f} tok/s over steps 2..{args.steps}, peak RSS {peak_rss_mb:.0f} MiB, "
              f"{result['trainable_params']} trainable parameters, torch {torch.__version__}, "
              f"peft {peft.__version__}, {args.threads} threads")
        if cuda:
            print(f"{result['gpu']}: max_memory_allocated {result['max_memory_allocated_mb']:.0f} MiB, "
                  f"reserved {result['max_memory_reserved_mb']:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
