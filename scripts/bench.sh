#!/usr/bin/env bash
# Side-by-side benchmark in one run, same files, same thread count (results go to BENCHMARKS.md).
#   scripts/bench.sh                      wordloom vs llama.cpp on SmolLM2 Q4_1 (GGUF)
#   PYTHON=/path/to/python scripts/bench.sh   also f32 safetensors vs PyTorch transformers, and
#                                             all-MiniLM-L6-v2 embeddings vs sentence-transformers
#   ONLY=embed PYTHON=... scripts/bench.sh     only the embedding comparison
#   ONLY=gptneo PYTHON=... scripts/bench.sh    only GPT-Neo-125M-shaped random weights (f32) vs PyTorch
# LLAMA_BENCH: path to a llama-bench binary you built yourself from llama.cpp's source.
# Set THREADS (default 2) and ROUNDS (default 2: the peers alternate, so a noisy neighbour hits both).
set -euo pipefail
cd "$(dirname "$0")/.."
export WORDLOOM_CACHE="${WORDLOOM_CACHE:-$PWD/.cache}"
THREADS="${THREADS:-2}"
ROUNDS="${ROUNDS:-2}"
cargo build --release --quiet
W=./target/release/wordloom
GGUF=$($W fetch smollm2 | cut -f2)
peak() { /usr/bin/time -f '%M' "$@" 2>&1 >/dev/null | tail -n 1; } # peak RSS in KiB

embed_round() {
  MINILM=$($W fetch minilm | cut -f2)
  SENTENCES="$WORDLOOM_CACHE/bench-sentences.txt"
  "$PYTHON" scripts/bench_embed_torch.py --sentences 256 --write-sentences "$SENTENCES" >/dev/null
  for batch in 1 32; do
    $W bench --task embed -m "$MINILM" --threads "$THREADS" --batch-size "$batch" --sentences "$SENTENCES" --repetitions 3 --json
    # bf16x3 on AMX (where the CPU has it; otherwise the same f32 path again)
    $W --matmul-precision high bench --task embed -m "$MINILM" --threads "$THREADS" --batch-size "$batch" --sentences "$SENTENCES" --repetitions 3 --json
    "$PYTHON" scripts/bench_embed_torch.py --model "$MINILM" --threads "$THREADS" --batch "$batch" --file "$SENTENCES" --repetitions 3 --json 2>/dev/null
  done
}

gptneo_round() {
  NEO="$WORDLOOM_CACHE/models/gpt-neo-125m-random"
  [ -f "$NEO/model.safetensors" ] || "$PYTHON" scripts/bench_transformers.py random-gptneo --out "$NEO" >&2
  $W bench -m "$NEO" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json
  "$PYTHON" scripts/bench_transformers.py bench --model "$NEO" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json 2>/dev/null
}

if [ "${ONLY:-}" = gptneo ]; then
  for round in $(seq "$ROUNDS"); do echo "== round $round, $THREADS threads"; gptneo_round; done
  exit 0
fi

if [ "${ONLY:-}" = embed ]; then
  for round in $(seq "$ROUNDS"); do echo "== round $round, $THREADS threads"; embed_round; done
  exit 0
fi

for round in $(seq "$ROUNDS"); do
  echo "== round $round, $THREADS threads"
  $W bench -m "$GGUF" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json
  if [ -n "${LLAMA_BENCH:-}" ]; then
    "$LLAMA_BENCH" -m "$GGUF" -p 512 -n 128 -t "$THREADS" -r 3 -o json 2>/dev/null |
      python3 -c 'import json,sys; print(json.dumps({r["n_prompt"] and "llama.cpp prefill_tokens_per_second" or "llama.cpp decode_tokens_per_second": r["avg_ts"] for r in json.load(sys.stdin)}))'
    echo "{\"llama.cpp peak_rss_kib\": $(peak "$LLAMA_BENCH" -m "$GGUF" -p 512 -n 128 -t "$THREADS" -r 1)}"
  fi
  if [ -n "${PYTHON:-}" ]; then
    F32="$WORDLOOM_CACHE/models/SmolLM2-135M-Instruct-f32"
    [ -d "$F32" ] || "$PYTHON" scripts/bench_transformers.py export --gguf "$GGUF" --out "$F32" >&2
    $W bench -m "$F32" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json
    "$PYTHON" scripts/bench_transformers.py bench --model "$F32" --threads "$THREADS" --prompt-tokens 512 --gen-tokens 128 --repetitions 3 --json
    embed_round
  fi
done
