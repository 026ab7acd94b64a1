#!/usr/bin/env python3
"""PyTorch / sentence-transformers peer benchmark for sentence embeddings (e.g. all-MiniLM-L6-v2).

Run from anywhere:

    # the peer numbers, one JSON line
    /opt/wlpy/bin/python scripts/bench_embed_torch.py --model .cache/models/all-MiniLM-L6-v2 \
        --threads 2 --batch 32 --sentences 256 [--repetitions 3] --json

    # write the exact benchmark sentences (one per line) for the Rust side, then exit
    /opt/wlpy/bin/python scripts/bench_embed_torch.py --sentences 256 --write-sentences /tmp/sentences.txt

    # benchmark a given sentence file instead of the generated sentences
    /opt/wlpy/bin/python scripts/bench_embed_torch.py --model DIR --file /tmp/sentences.txt --batch 32 --json

Relative paths are taken relative to the current directory; the default --model is relative
to the repository root. Needs torch, transformers, sentence-transformers.

Sentences
  Without --file, K (--sentences) English sentences are generated deterministically (no
  Python `random`, so another language can regenerate them): a 64-bit LCG
      state = (state * 6364136223846793005 + 1442695040888963407) mod 2**64, seed 42,
  and pick(list) = list[(state >> 33) % len(list)] after advancing the state once. Sentence i
  is built as
      "{Det} {adj} {noun} {verb} {det} {adj} {noun} {prep} {det} {adj} {noun} {time}, and {det}
       {noun} {ending}."
  (picks in that order, left to right)
  with the word lists below (Det capitalised); each sentence is about 20 WordPiece tokens
  with [CLS]/[SEP] for MiniLM's uncased vocab (mean reported as mean_tokens).
  --write-sentences PATH writes them, one per line (UTF-8, '\\n'), and exits.
  --file PATH reads one sentence per line (empty lines skipped) and ignores --sentences.

Measurement
  torch.set_num_threads(T), torch.set_num_interop_threads(1); SentenceTransformer(dir,
  device="cpu") in float32 with the model's own modules (for MiniLM: Transformer -> mean
  Pooling -> Normalize). One untimed warm-up encode over the first min(K, 4*B) sentences,
  then --repetitions timed calls of model.encode(all K sentences, batch_size=B,
  convert_to_numpy=True); note that sentence-transformers sorts the inputs by length before
  batching, so each batch is padded only to its own longest member. seconds = median time
  of one call (upper median for an even count, values[n//2]); sentences_per_second =
  K / seconds. peak_rss_bytes = resource.getrusage(RUSAGE_SELF).ru_maxrss * 1024 (Linux
  reports KiB), i.e. the whole process including Python, torch and the model.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL = REPO_ROOT / ".cache" / "models" / "all-MiniLM-L6-v2"

DETS = ["the", "a", "every", "one", "that", "this", "some", "no"]
ADJS = ["quick", "lazy", "bright", "quiet", "ancient", "modern", "curious", "careful", "heavy", "gentle",
        "small", "large", "red", "green", "silent", "busy"]
NOUNS = ["fox", "dog", "engineer", "teacher", "river", "city", "computer", "garden", "library", "train",
         "student", "market", "mountain", "window", "letter", "kitchen"]
VERBS = ["jumps over", "looks at", "walks past", "writes about", "repairs", "paints", "visits", "follows",
         "describes", "finds", "carries", "watches"]
PREPS = ["near", "behind", "inside", "beyond", "under", "beside", "across", "around"]
ENDINGS = ["smiles", "waits", "sleeps", "listens", "agrees", "disappears", "laughs", "returns"]
TIMES = ["every morning", "last night", "in the spring", "before dinner", "after the storm",
         "on a sunny afternoon", "during the long winter", "at noon"]

MASK64 = (1 << 64) - 1


class Lcg:
    def __init__(self, seed=42):
        self.state = seed & MASK64

    def pick(self, items):
        self.state = (self.state * 6364136223846793005 + 1442695040888963407) & MASK64
        return items[(self.state >> 33) % len(items)]


def make_sentences(k, seed=42):
    rng = Lcg(seed)
    out = []
    for _ in range(k):
        det = rng.pick(DETS)
        words = [
            det[0].upper() + det[1:],
            rng.pick(ADJS),
            rng.pick(NOUNS),
            rng.pick(VERBS),
            rng.pick(DETS),
            rng.pick(ADJS),
            rng.pick(NOUNS),
            rng.pick(PREPS),
            rng.pick(DETS),
            rng.pick(ADJS),
            rng.pick(NOUNS),
            rng.pick(TIMES) + ", and",
            rng.pick(DETS),
            rng.pick(NOUNS),
            rng.pick(ENDINGS),
        ]
        out.append(" ".join(words) + ".")
    return out


def read_sentences(path):
    with open(path, encoding="utf-8") as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="sentence-transformers model dir (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--sentences", type=int, default=256, help="number of generated sentences (K)")
    ap.add_argument("--file", help="one sentence per line; replaces the generated sentences")
    ap.add_argument("--write-sentences", metavar="PATH", help="write the generated sentences and exit")
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print one JSON line")
    args = ap.parse_args()

    sentences = read_sentences(args.file) if args.file else make_sentences(args.sentences)
    if args.write_sentences:
        Path(args.write_sentences).write_text("".join(s + "\n" for s in sentences), encoding="utf-8")
        print(f"wrote {len(sentences)} sentences to {args.write_sentences}", file=sys.stderr)
        return
    if not sentences:
        sys.exit("no sentences")

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import torch

    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    import sentence_transformers
    import transformers
    from sentence_transformers import SentenceTransformer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    model = SentenceTransformer(str(Path(args.model).resolve()), device="cpu")
    model.eval()
    tok = model.tokenizer
    lens = [len(tok(s, truncation=True, max_length=model.max_seq_length)["input_ids"]) for s in sentences]

    def encode(batch):
        return model.encode(batch, batch_size=args.batch, convert_to_numpy=True, show_progress_bar=False)

    with torch.inference_mode():
        encode(sentences[: min(len(sentences), 4 * args.batch)])  # warm-up
        times = []
        for _ in range(max(1, args.repetitions)):
            t0 = time.perf_counter()
            emb = encode(sentences)
            times.append(time.perf_counter() - t0)
    times.sort()
    seconds = times[len(times) // 2]
    res = {
        "engine": "torch+sentence-transformers",
        "model": Path(args.model).name,
        "threads": args.threads,
        "batch": args.batch,
        "sentences": len(sentences),
        "sentences_source": args.file or f"generated (LCG seed 42, {len(sentences)})",
        "mean_tokens": sum(lens) / len(lens),
        "max_tokens": max(lens),
        "dimension": int(emb.shape[1]),
        "repetitions": len(times),
        "seconds": seconds,
        "sentences_per_second": len(sentences) / seconds,
        "peak_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "transformers": transformers.__version__,
            "sentence-transformers": sentence_transformers.__version__,
        },
    }
    if args.json:
        print(json.dumps(res))
    else:
        print(
            f"{res['sentences']} sentences (mean {res['mean_tokens']:.1f} tokens), batch {args.batch}, "
            f"{args.threads} threads: {res['sentences_per_second']:.1f} sentences/s "
            f"({seconds:.3f} s median of {len(times)}), peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB"
        )


if __name__ == "__main__":
    main()
