#!/usr/bin/env python3
"""PyTorch / `transformers` peer for `wordloom translate` (Marian / opus-mt): the same model,
sentences and beam settings, one sentence at a time.

    # once: a random-weight checkpoint shaped like Helsinki-NLP/opus-mt-en-de (~300 MB)
    /opt/wlpy/bin/python scripts/bench_translate_torch.py --create .cache/models/marian-opus-random

    # the peer numbers
    /opt/wlpy/bin/python scripts/bench_translate_torch.py --model .cache/models/marian-opus-random \
        --sentences scripts/bench_sentences.txt --threads 2 --beams 4 --max-new-tokens 32 --json

    # a quick smoke run: the first 3 sentences
    /opt/wlpy/bin/python scripts/bench_translate_torch.py --model .cache/models/marian-opus-random \
        --sentences scripts/bench_sentences.txt --threads 2 --limit 3 --json

Needs torch, transformers (>= 5), sentencepiece, safetensors. No network (HF_HUB_OFFLINE=1).

--create DIR [--size opus|tiny] [--eos-bias B] [--check N] [--force]
  opus: MarianMTModel with the shape and special ids of Helsinki-NLP/opus-mt-en-de: d_model 512,
  6 encoder + 6 decoder layers, 8 heads, ffn 2048, vocab_size = decoder_vocab_size 58101,
  max_position_embeddings 512, activation swish, scale_embedding true, static sinusoidal
  positions (not stored), share_encoder_decoder_embeddings true, embeddings tied to lm_head,
  pad = decoder_start = 58100, eos = bos = forced_eos = 0. Weights: torch.manual_seed(0), then
  transformers' own init (MarianMTModel(config): Linear / Embedding weights N(0, 0.02^2), biases 0,
  LayerNorm 1 / 0, the <pad> embedding row 0, final_logits_bias 0), then the EOS tweak below.
  Written (to a temporary sibling, then renamed) as model.safetensors in float32 by
  save_pretrained (tied tensors once, no lm_head / embed_positions), config.json with what the
  opus-mt converter adds (legacy generation keys bad_words_ids [[58100]], max_length 512,
  num_beams 4; dtype / torch_dtype float32; keys sorted), generation_config.json like opus-mt's
  (bad_words_ids [[58100]], bos 0, decoder_start 58100, eos 0, forced_eos 0, max_length 512,
  num_beams 4, pad 58100, renormalize_logits true). Tokenizer: source.spm, target.spm, vocab.json
  and tokenizer_config.json copied from tests/fixtures/tiny-marian (296 ids; the tokenizer never
  produces an id past 295; generated ids past 295 have no token, and the benchmark drops them
  before decoding: transformers 5's MarianTokenizer would look them up in the spm model and
  raise IndexError).

  EOS tweak: with N(0, 0.02^2) weights the decoder barely looks at the source. Its post-LayerNorm
  output is close to the scaled embedding of the token it was fed plus the position, so the
  first step is almost flat over the 58101 ids (best log-prob about -9.0, EOS -11.2) and every
  later step repeats the previous token (log-prob about -4.4 to -5.5; EOS stays near -11). With
  final_logits_bias 0, beam search never picks EOS and all 20 check sentences run to the limit.
  final_logits_bias[eos] is therefore raised by --eos-bias (default EOS_BIAS = 5.13; 0 disables
  it). The value was found with torch 2.15 / transformers 5.24 at 1 thread: beams 4,
  max_new_tokens 32, the first 20 lines of scripts/bench_sentences.txt, scanning the bias:
      2, 3, 4, 5, 5.05   0 of 20 end early (all 32 new tokens, the last one a forced EOS)
      5.1 / 5.12 / 5.13 / 5.15   6 / 7 / 11 / 16 of 20 (each 28 or 32 new tokens)
      5.2 ... 5.6          20 of 20 (27 or 28);  5.8: 20 (19, 27 or 28);  6: 20 (11 to 19);
      6.5 and up           20 of 20 after 1 token (EOS first)
  With 5.13, 11 of the first 20 sentences (27 of all 40) pick EOS after 27 new tokens (28 with
  EOS); the others reach 32. Because the source hardly matters, the switch is sharp: a
  sentence's outcome can flip when its scores move by about 0.01, so compare
  ended_with_eos_early and mean_generated_tokens with wordloom's before comparing speeds. The
  tuning holds for beams 4 / 32 new tokens only. --check N prints the count for the first N
  sentences of --sentences after writing (--threads 1 is much faster on a busy machine).

  tiny: copies tests/fixtures/tiny-marian (minus reference.json) to DIR.

--model DIR --sentences FILE (benchmark)
  torch.set_num_threads(--threads), torch.set_num_interop_threads(1); MarianMTModel loaded in
  float32 with attn_implementation="eager" (--attn sdpa to compare), eval(), everything under
  torch.inference_mode(); MarianTokenizer. The non-empty lines of FILE (--limit N: the first N)
  are translated --batch-size at a time (default 1: each alone), in file order, as
  `wordloom translate --batch-size` groups them:
      model.generate(**tok(batch, return_tensors="pt", padding=True), num_beams=--beams,
                     max_new_tokens=--max-new-tokens)
  with everything else from the checkpoint's generation_config.json (renormalize_logits,
  bad_words_ids, forced_eos, length_penalty 1, early_stopping false, ...), then decoded with
  skip_special_tokens (ids past the tokenizer's vocab.json dropped first). One untimed warm-up
  translation of the first sentence, then every sentence is timed, tokenization and decoding
  included. Reported: sentences/s, total seconds,
  mean generated tokens per sentence (output length minus the decoder start token; EOS counted),
  how many ended with an EOS chosen before the limit (fewer than --max-new-tokens generated;
  sequences that reach the limit also end with EOS, forced by forced_eos_token_id), peak RSS
  (ru_maxrss), versions, threads, beams. --json prints one JSON object on stdout.
  Time on an idle machine: with --threads equal to the core count and other processes running,
  torch's thread barriers make every small op slow (seen: one sentence about 1.5 s at 1 thread,
  about 30 s at 2 threads on 2 busy cores).
"""

import argparse
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parent.parent
TINY = REPO_ROOT / "tests" / "fixtures" / "tiny-marian"
DEFAULT_SENTENCES = REPO_ROOT / "scripts" / "bench_sentences.txt"
TOKENIZER_FILES = ("source.spm", "target.spm", "vocab.json", "tokenizer_config.json")
EOS_BIAS = 5.13  # added to final_logits_bias[eos]; see the docstring

OPUS = dict(
    vocab_size=58101, decoder_vocab_size=58101, d_model=512, encoder_layers=6, decoder_layers=6,
    encoder_attention_heads=8, decoder_attention_heads=8, encoder_ffn_dim=2048,
    decoder_ffn_dim=2048, max_position_embeddings=512, activation_function="swish",
    scale_embedding=True, static_position_embeddings=True,
    share_encoder_decoder_embeddings=True, tie_word_embeddings=True, pad_token_id=58100,
    decoder_start_token_id=58100, eos_token_id=0, bos_token_id=0, forced_eos_token_id=0,
    dropout=0.1, attention_dropout=0.0, activation_dropout=0.0, init_std=0.02,
    architectures=["MarianMTModel"],
)


def log(msg):
    print(msg, file=sys.stderr, flush=True)


def read_sentences(path, limit=None):
    lines = [ln.strip() for ln in open(path, encoding="utf-8")]
    lines = [ln for ln in lines if ln]
    return lines[:limit] if limit else lines


# --------------------------------------------------------------------------------------------
# --create


def create_opus(tmp, eos_bias):
    import torch
    from transformers import GenerationConfig, MarianConfig, MarianMTModel

    pad = OPUS["pad_token_id"]
    torch.manual_seed(0)
    model = MarianMTModel(MarianConfig(**OPUS)).eval()
    with torch.no_grad():
        assert float(model.model.shared.weight[pad].abs().max()) == 0.0, "pad row not zero"
        assert float(model.final_logits_bias.abs().max()) == 0.0
        model.final_logits_bias[0, OPUS["eos_token_id"]] += eos_bias
    assert model.lm_head.weight.data_ptr() == model.model.shared.weight.data_ptr()
    model.save_pretrained(str(tmp))

    gen = {"bad_words_ids": [[pad]], "bos_token_id": 0, "decoder_start_token_id": pad,
           "eos_token_id": 0, "forced_eos_token_id": 0, "max_length": 512, "num_beams": 4,
           "pad_token_id": pad, "renormalize_logits": True}
    path = tmp / "generation_config.json"
    if path.exists():
        path.unlink()
    GenerationConfig(**gen).save_pretrained(str(tmp))
    written = json.loads(path.read_text())
    for k, v in gen.items():
        assert written.get(k) == v, (k, written.get(k), v)

    # what the opus-mt converter put in config.json next to the model settings
    path = tmp / "config.json"
    cfg = json.loads(path.read_text())
    cfg.update({"bad_words_ids": [[pad]], "max_length": 512, "num_beams": 4,
                "dtype": "float32", "torch_dtype": "float32"})
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(TINY / name, tmp / name)
    for name in ("tokenizer.json", "special_tokens_map.json"):
        assert not (tmp / name).exists(), name


def check_dir(out):
    """Layout checks on a written opus-sized dir; raises on a problem."""
    from safetensors import safe_open

    cfg = json.loads((out / "config.json").read_text())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        dtypes = {str(f.get_slice(n).get_dtype()) for n in names}
        shared = tuple(f.get_slice("model.shared.weight").get_shape())
    problems = []
    if dtypes != {"F32"}:
        problems.append(f"dtypes {dtypes}")
    if shared != (cfg["vocab_size"], cfg["d_model"]):
        problems.append(f"model.shared.weight {shared}")
    if any("embed_positions" in n or n == "lm_head.weight" for n in names):
        problems.append("embed_positions / lm_head stored")
    if problems:
        raise SystemExit(f"{out}: " + "; ".join(problems))
    return len(names)


def count_early(model_dir, sentences, beams, max_new):
    """(per-sentence generated lengths, how many ended with EOS before max_new)."""
    model, tok = load(model_dir, "eager")
    lengths = []
    import torch

    with torch.inference_mode():
        for s in sentences:
            out = model.generate(**tok(s, return_tensors="pt"), num_beams=beams,
                                 max_new_tokens=max_new)
            lengths.append(out.shape[1] - 1)
    return lengths, sum(n < max_new for n in lengths)


def cmd_create(args):
    out = Path(args.create).resolve()
    if out.exists() and not args.force:
        raise SystemExit(f"{out} exists (use --force to rebuild)")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    t0 = time.perf_counter()
    if args.size == "tiny":
        shutil.copytree(TINY, tmp, ignore=shutil.ignore_patterns("reference.json"))
    else:
        tmp.mkdir(parents=True)
        create_opus(tmp, args.eos_bias)
        n = check_dir(tmp)
        log(f"{n} f32 tensors, eos bias {args.eos_bias}")
    shutil.rmtree(out, ignore_errors=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp.rename(out)
    for p in sorted(out.iterdir()):
        log(f"  {p.name:24} {p.stat().st_size:>12,} bytes")
    log(f"wrote {out} in {time.perf_counter() - t0:.1f}s")
    if args.check:
        import torch

        torch.set_num_threads(args.threads)
        sentences = read_sentences(args.sentences, args.check)
        lengths, early = count_early(out, sentences, args.beams, args.max_new_tokens)
        log(f"check: {early} of {len(sentences)} sentences end with EOS before "
            f"{args.max_new_tokens} new tokens (beams {args.beams}); generated lengths {lengths}")


# --------------------------------------------------------------------------------------------
# benchmark


def load(model_dir, attn):
    import torch
    from transformers import MarianMTModel, MarianTokenizer

    tok = MarianTokenizer.from_pretrained(str(model_dir))
    model = MarianMTModel.from_pretrained(str(model_dir), dtype=torch.float32,
                                          attn_implementation=attn).eval()
    return model, tok


def cmd_bench(args):
    import sentencepiece
    import torch
    import transformers

    torch.set_num_threads(args.threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError as e:  # only settable before any inter-op work has started
        log(f"warning: set_num_interop_threads(1) failed: {e}")
    sentences = read_sentences(args.sentences, args.limit)
    if not sentences:
        raise SystemExit(f"no sentences in {args.sentences}")

    t0 = time.perf_counter()
    model, tok = load(Path(args.model).resolve(), args.attn)
    load_seconds = time.perf_counter() - t0
    eos = model.generation_config.eos_token_id
    eos = eos[0] if isinstance(eos, list) else eos
    vocab = tok.vocab_size  # len(vocab.json): 296 for the tiny-marian tokenizer files

    pad = model.generation_config.pad_token_id

    def translate(batch):
        out = model.generate(**tok(batch, return_tensors="pt", padding=True),
                             num_beams=args.beams, max_new_tokens=args.max_new_tokens)
        rows = []
        for row in out.tolist():
            # a batch pads shorter outputs after their EOS; the decoder start token is first
            while len(row) > 1 and row[-1] == pad:
                row.pop()
            rows.append(row)
        # ids past the tokenizer's vocabulary decode to nothing (transformers' MarianTokenizer
        # would look them up in the spm model and raise)
        texts = [tok.decode([i for i in r if i < vocab], skip_special_tokens=True) for r in rows]
        return rows, texts

    lengths, early, last_eos = [], 0, 0
    size = max(1, args.batch_size)
    with torch.inference_mode():
        translate(sentences[:size])  # warm-up, not counted
        t = time.perf_counter()
        for first in range(0, len(sentences), size):
            rows, _texts = translate(sentences[first:first + size])
            for row in rows:
                n = len(row) - 1  # minus the decoder start token
                lengths.append(n)
                early += n < args.max_new_tokens
                last_eos += row[-1] == eos
        total = time.perf_counter() - t

    report = {
        "engine": "transformers",
        "model": str(Path(args.model).resolve()),
        "sentences_file": str(Path(args.sentences).resolve()),
        "sentences": len(sentences),
        "threads": torch.get_num_threads(),
        "interop_threads": torch.get_num_interop_threads(),
        "beams": args.beams,
        "max_new_tokens": args.max_new_tokens,
        "batch_size": size,
        "sentences_per_second": len(sentences) / total,
        "total_seconds": total,
        "mean_generated_tokens": sum(lengths) / len(lengths),
        "generated_tokens_per_second": sum(lengths) / total,
        "ended_with_eos_early": early,
        "ended_with_eos": last_eos,
        "generated_lengths": lengths,
        "attn_implementation": model.config._attn_implementation,
        "load_seconds": load_seconds,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "sentencepiece_version": sentencepiece.__version__,
        "python_version": sys.version.split()[0],
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(f"model      {report['model']}")
        print(f"threads    {report['threads']} (interop {report['interop_threads']}), "
              f"beams {args.beams}, max new tokens {args.max_new_tokens}, batch {size}")
        print(f"speed      {report['sentences_per_second']:.3f} sentences/s "
              f"({len(sentences)} sentences in {total:.2f} s)")
        print(f"generated  {report['mean_generated_tokens']:.1f} tokens per sentence "
              f"({report['generated_tokens_per_second']:.1f} tokens/s), "
              f"{early} ended with EOS before the limit")
        print(f"load       {load_seconds:.2f} s")
        print(f"peak RSS   {report['peak_rss_mib']:.1f} MiB")
        print(f"torch {report['torch_version']}, transformers {report['transformers_version']}")


# --------------------------------------------------------------------------------------------


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--create", metavar="DIR", help="write a random-weight checkpoint to DIR")
    ap.add_argument("--size", choices=["opus", "tiny"], default="opus")
    ap.add_argument("--eos-bias", type=float, default=EOS_BIAS,
                    help="added to final_logits_bias[eos] (opus size)")
    ap.add_argument("--check", type=int, default=0, metavar="N",
                    help="after --create: count early EOS over the first N sentences")
    ap.add_argument("--force", action="store_true", help="--create over an existing DIR")
    ap.add_argument("--model", help="checkpoint dir to benchmark")
    ap.add_argument("--sentences", default=str(DEFAULT_SENTENCES))
    ap.add_argument("--limit", type=int, default=0, help="only the first N sentences")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--beams", type=int, default=4)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=1, help="sentences per generate call")
    ap.add_argument("--attn", choices=["eager", "sdpa"], default="eager")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    if bool(args.create) == bool(args.model):
        ap.error("give either --create DIR or --model DIR")
    cmd_create(args) if args.create else cmd_bench(args)


if __name__ == "__main__":
    main()
