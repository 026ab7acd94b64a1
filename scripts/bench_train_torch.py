#!/usr/bin/env python3
"""PyTorch peer for `wordloom finetune --task classify`: the same model, data and settings.

    /opt/wlpy/bin/python scripts/bench_train_torch.py --model .cache/models/all-MiniLM-L6-v2 \
        --data .cache/data/spam-assassin/train.jsonl --threads 2 --steps 20 --json

BertForSequenceClassification from the encoder directory with a new 2-label head, the config's
dropout (as wordloom; --no-dropout sets every probability to 0), eager attention, f32. Examples in file order, batches of
--batch-size, each tokenized with truncation to --max-len and padded to the batch's longest;
AdamW (lr 1e-4, weight decay 0, Trainer's no-decay groups), clipping at 1.0, as the Rust run.
--precision bf16|f16 runs forward and loss under torch.autocast (f32 master weights), f16 with
torch.amp.GradScaler, as Trainer's --bf16 / --fp16 do.
One untimed warm-up step, then --steps timed steps; samples/s = examples / time.
"""

import argparse
import json
import resource
import time

import torch
from transformers import AutoTokenizer, BertForSequenceClassification


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=96)
    ap.add_argument("--precision", choices=["f32", "bf16", "f16"], default="f32")
    ap.add_argument("--no-dropout", action="store_true")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    torch.manual_seed(0)
    tok = AutoTokenizer.from_pretrained(args.model)
    dropout = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0} if args.no_dropout else {}
    model = BertForSequenceClassification.from_pretrained(
        args.model, num_labels=2, attn_implementation="eager", **dropout)
    model.train()
    rows = [json.loads(l) for l in open(args.data, encoding="utf-8") if l.strip()]
    labels = {"ham": 0, "spam": 1}
    decay = [p for n, p in model.named_parameters() if "bias" not in n and "LayerNorm.weight" not in n]
    no_decay = [p for n, p in model.named_parameters() if "bias" in n or "LayerNorm.weight" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.0},
                             {"params": no_decay, "weight_decay": 0.0}], lr=1e-4)

    dtype = {"f32": None, "bf16": torch.bfloat16, "f16": torch.float16}[args.precision]
    scaler = torch.amp.GradScaler("cpu", enabled=args.precision == "f16")

    def step(i):
        batch = rows[i * args.batch_size:(i + 1) * args.batch_size]
        enc = tok([r["text"] for r in batch], truncation=True, max_length=args.max_len,
                  padding=True, return_tensors="pt")
        y = torch.tensor([labels[r["label"]] for r in batch])
        with torch.autocast("cpu", dtype=dtype, enabled=dtype is not None):
            out = model(**enc, labels=y)
        scaler.scale(out.loss).backward()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        return len(batch)

    step(0)
    start = time.perf_counter()
    samples = sum(step(i + 1) for i in range(args.steps))
    seconds = time.perf_counter() - start
    result = {"engine": "pytorch", "samples_per_second": samples / seconds, "steps": args.steps,
              "batch_size": args.batch_size, "max_len": args.max_len, "threads": args.threads,
              "precision": args.precision,
              "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
              "torch": torch.__version__}
    print(json.dumps(result) if args.json else result)


if __name__ == "__main__":
    main()
