#!/usr/bin/env python3
"""PyTorch + peft peer for `wordloom finetune --task sft`: the same model, data and settings.

    /opt/wlpy/bin/python scripts/bench_sft_torch.py --model .cache/models/SmolLM2-135M-Instruct-f32 \
        --data tests/fixtures/sft-format/train.jsonl --threads 2 --steps 10 --json

AutoModelForCausalLM in f32 with eager attention (--attn sdpa to compare), wrapped by peft
with LoRA (rank 8, alpha 16, dropout 0.05, all linear layers unless --targets names them).
Each `messages` record is rendered with the chat template; the assistant turns are the
characters that rendering the conversation through a turn adds after the generation prompt,
and a token is learned iff its start offset lies in one (labels -100 elsewhere), as wordloom
marks them. Sequences are cut to --max-len; an example left without a learned token after its
first is dropped, as the Rust side does. Batches of --batch-size in file order (cycling),
right-padded to the batch's longest; AdamW (lr 1e-3, weight decay 0) over the adapters,
clipping at 1.0. One untimed warm-up step, then --steps timed steps; tokens/s counts the real
(unpadded) tokens of each batch, the sum of sequence lengths, which is what wordloom counts.
"""

import argparse
import json
import resource
import time

import peft
import torch
import transformers
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer


def tokenize(tok, messages, max_len):
    """Token ids and labels (-100 where not learned) of one conversation."""
    full = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prefix = tok.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        through = tok.apply_chat_template(messages[:i + 1], tokenize=False,
                                          add_generation_prompt=False)
        if not through.startswith(prefix) or not full.startswith(through):
            raise ValueError("the chat template renders a conversation's beginning differently")
        spans.append((len(prefix), len(through)))
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"][:max_len]
    labels = [t if any(a <= start < b for a, b in spans) else -100
              for t, (start, _end) in zip(ids, enc["offset_mapping"])]
    return ids, labels


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-len", type=int, default=256)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--alpha", type=float, default=16.0)
    ap.add_argument("--dropout", type=float, default=0.05)
    ap.add_argument("--targets", default="all-linear",
                    help='"all-linear" or a comma list of module names (q_proj,v_proj,...)')
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)

    tok = AutoTokenizer.from_pretrained(args.model)
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    examples, dropped, truncated = [], 0, 0
    for line in open(args.data, encoding="utf-8"):
        if not line.strip():
            continue
        ids, labels = tokenize(tok, json.loads(line)["messages"], 10**9)
        if len(ids) > args.max_len:
            truncated += 1
            ids, labels = ids[:args.max_len], labels[:args.max_len]
        # The first token is never predicted.
        if any(l != -100 for l in labels[1:]):
            examples.append((ids, labels))
        else:
            dropped += 1
    if not examples:
        raise SystemExit(f"no example has a learned token within --max-len {args.max_len}")

    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32,
                                                 attn_implementation=args.attn)
    model.train()
    targets = args.targets if args.targets == "all-linear" else \
        [t.strip() for t in args.targets.split(",") if t.strip()]
    model = get_peft_model(model, LoraConfig(
        r=args.rank, lora_alpha=args.alpha, lora_dropout=args.dropout,
        target_modules=targets, bias="none", task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=args.lr, weight_decay=0.0)

    def batch(i):
        rows = [examples[(i * args.batch_size + j) % len(examples)]
                for j in range(args.batch_size)]
        width = max(len(ids) for ids, _ in rows)
        input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for r, (ids, lab) in enumerate(rows):
            input_ids[r, :len(ids)] = torch.tensor(ids)
            mask[r, :len(ids)] = 1
            labels[r, :len(ids)] = torch.tensor(lab)
        return input_ids, mask, labels, sum(len(ids) for ids, _ in rows), len(rows)

    def step(i):
        input_ids, mask, labels, tokens, samples = batch(i)
        loss = model(input_ids=input_ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        opt.step()
        opt.zero_grad()
        return tokens, samples, loss.item()

    step(0)
    tokens = samples = 0
    loss = float("nan")
    start = time.perf_counter()
    for i in range(args.steps):
        t, s, loss = step(i + 1)
        tokens += t
        samples += s
    seconds = time.perf_counter() - start
    lengths = [len(ids) for ids, _ in examples]
    result = {"engine": "pytorch", "task": "sft",
              "tokens_per_second": tokens / seconds, "samples_per_second": samples / seconds,
              "mean_step_seconds": seconds / args.steps, "final_loss": loss,
              "steps": args.steps, "batch_size": args.batch_size, "max_len": args.max_len,
              "tokens": tokens, "examples": len(examples), "truncated": truncated,
              "dropped": dropped, "mean_tokens_per_example": sum(lengths) / len(lengths),
              "rank": args.rank, "alpha": args.alpha, "dropout": args.dropout,
              "targets": args.targets, "lr": args.lr,
              "trainable_parameters": sum(p.numel() for p in trainable),
              "threads": args.threads, "attn": args.attn,
              "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "torch": torch.__version__, "transformers": transformers.__version__,
              "peft": peft.__version__}
    if args.json:
        print(json.dumps(result))
    else:
        print(f"pytorch sft ({args.attn} attention, {args.threads} threads, torch "
              f"{torch.__version__}, transformers {transformers.__version__}, peft "
              f"{peft.__version__})")
        print(f"  {len(examples)} examples ({truncated} truncated, {dropped} dropped), "
              f"{result['mean_tokens_per_example']:.1f} tokens each on average")
        print(f"  LoRA r={args.rank} alpha={args.alpha:g} dropout={args.dropout:g} "
              f"targets={args.targets}: {result['trainable_parameters']:,} trainable parameters")
        print(f"  {args.steps} steps of {args.batch_size}: {result['tokens_per_second']:.1f} "
              f"tokens/s, {result['samples_per_second']:.2f} samples/s, "
              f"{result['mean_step_seconds']:.3f} s/step")
        print(f"  final loss {loss:.4f}, peak RSS {result['peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
