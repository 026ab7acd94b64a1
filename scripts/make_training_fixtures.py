#!/usr/bin/env python3
"""Generate the reference fixture for classifier fine-tuning parity (gradients, gradient
clipping, AdamW steps, LR schedules) of wordloom.

Run by hand from anywhere (after scripts/make_encoder_fixtures.py has written
tests/fixtures/tiny-bert-cls/, whose weights this reuses unchanged):

    /opt/wlpy/bin/python scripts/make_training_fixtures.py [--threads N]

Needs: torch, transformers (>= 5), tokenizers, safetensors, numpy.

Output: tests/fixtures/train-bert-cls/ (regenerated from scratch, < 1 MB; byte-for-byte
deterministic with the default --threads 1: another thread count changes the last bits of
the gradients, and so of everything after them):

  config.json, tokenizer.json, tokenizer_config.json, model.safetensors
                      byte-for-byte copies of tests/fixtures/tiny-bert-cls/ (already
                      float32 safetensors, no conversion). config.json still says
                      hidden_dropout_prob = attention_probs_dropout_prob = 0.1 and
                      classifier_dropout null: the reference below was computed with all
                      three overridden to 0 (see reference.json "dropout_overrides"), so a
                      test must train with dropout disabled.
  reference.json      the batch (4 texts of different lengths, one right-padded batch:
                      input_ids, attention_mask, token_type_ids, labels), logits and loss
                      at the initial weights, grad_norm / clip coefficient of both steps,
                      loss of step 2, the AdamW hyper-parameters and the weight-decay rule
                      (decay / no_decay parameter name lists), the parameter list (HF
                      names, shapes, order), the LR-schedule sequences, versions. See its
                      "schema" and "conventions" keys.
  grads.safetensors   every parameter's .grad after the FIRST loss.backward(), BEFORE
                      clipping (float32, HF state_dict names, e.g.
                      bert.encoder.layer.0.attention.self.query.weight, classifier.weight)
  after_step.safetensors       all parameters after optimizer step 1 (float32, HF names)
  after_two_steps.safetensors  all parameters after step 2: a second
                      forward/backward/clip/AdamW step on the same batch, from the step-1
                      weights and the carried Adam moments (bias corrections of step 2)

The model is BertForSequenceClassification (with pooler) loaded from tiny-bert-cls with
attn_implementation="eager", in model.train() mode, every dropout probability 0.
Training step k (k = 1, 2): optimizer.zero_grad(set_to_none=True); loss =
model(**batch, labels=labels).loss (cross-entropy, mean over the 4 rows);
loss.backward(); grad_norm = clip_grad_norm_(all params, max_norm); optimizer.step().
The LR is constant 1e-3 for these two steps (no scheduler attached).

After writing, the directory is reloaded from disk and the step-1 loss and gradients are
reproduced bit-for-bit, and a hand-written float32 AdamW update (the formula written into
reference.json) is checked against torch's.

Floats that are float32 values are written in their shortest float32 round-trip decimal
form (parse as f32 to get back the exact value torch produced); the LR-schedule values are
Python float64 results and are written with Python's repr.
"""

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_fixtures import FIX, _F32, _dist_version, f32list, fresh_dir, versions, write_json  # noqa: E402

SRC = FIX / "tiny-bert-cls"
OUT = FIX / "train-bert-cls"
COPIED = ["config.json", "tokenizer.json", "tokenizer_config.json", "model.safetensors"]

# Four texts of different token lengths (17, 8, 27, 22 with [CLS]/[SEP]), so the batch is
# right-padded to 27 and three rows carry padding. All words are in the fixture vocabulary
# (no [UNK]). Labels: ids in id2label (0 negative, 1 neutral, 2 positive).
TEXTS = [
    "The team won the football match.",
    "Thumbs up!",
    "John Smith lives in New York and works for Acme Corporation.",
    "She cooked pasta with tomato sauce and basil.",
]
LABELS = [2, 0, 1, 0]

LR = 1e-3
BETAS = (0.9, 0.999)
EPS = 1e-8
WEIGHT_DECAY = 0.01
MAX_NORM = 1.0

SCHED_WARMUP = 3
SCHED_TOTAL = 12

DROPOUT_OVERRIDES = {"hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "classifier_dropout": 0.0}


def all_versions():
    v = versions()
    v.pop("gguf", None)
    v["safetensors"] = _dist_version("safetensors")
    return v


def load_model(path):
    from transformers import AutoConfig, BertForSequenceClassification

    cfg = AutoConfig.from_pretrained(path)
    for k, val in DROPOUT_OVERRIDES.items():
        setattr(cfg, k, val)
    model, info = BertForSequenceClassification.from_pretrained(
        path, config=cfg, attn_implementation="eager", dtype=torch.float32, output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    model.train()
    for m in model.modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.0, m
    return model


def is_decay(name):
    """The rule recorded in reference.json (equal to transformers.Trainer's for BERT, asserted below)."""
    return "bias" not in name and "LayerNorm.weight" not in name


def make_optimizer(model):
    named = list(model.named_parameters())
    decay = [p for n, p in named if is_decay(n)]
    no_decay = [p for n, p in named if not is_decay(n)]
    return torch.optim.AdamW(
        [{"params": decay, "weight_decay": WEIGHT_DECAY}, {"params": no_decay, "weight_decay": 0.0}],
        lr=LR,
        betas=BETAS,
        eps=EPS,
    )


def train_step(model, opt, batch, labels):
    opt.zero_grad(set_to_none=True)
    out = model(**batch, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    params = [p for p in model.parameters()]
    norm = torch.nn.utils.clip_grad_norm_(params, max_norm=MAX_NORM)
    opt.step()
    return out, grads, norm


def f32_state(model):
    return {n: p.detach().to(torch.float32).contiguous().clone() for n, p in model.named_parameters()}


def save_st(path, tensors):
    from safetensors.torch import save_file

    save_file({k: tensors[k] for k in sorted(tensors)}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)  # safetensors creates 0600 files


def lr_sequences():
    from transformers import (
        get_constant_schedule_with_warmup,
        get_cosine_schedule_with_warmup,
        get_linear_schedule_with_warmup,
    )

    makers = {
        "linear": lambda o: get_linear_schedule_with_warmup(
            o, num_warmup_steps=SCHED_WARMUP, num_training_steps=SCHED_TOTAL
        ),
        "cosine": lambda o: get_cosine_schedule_with_warmup(
            o, num_warmup_steps=SCHED_WARMUP, num_training_steps=SCHED_TOTAL
        ),
        "constant": lambda o: get_constant_schedule_with_warmup(o, num_warmup_steps=SCHED_WARMUP),
    }
    out = {}
    for name, make in makers.items():
        p = torch.nn.Parameter(torch.zeros(1))
        opt = torch.optim.AdamW([p], lr=LR)
        sched = make(opt)
        seq = []
        for _ in range(SCHED_TOTAL):
            lr = sched.get_last_lr()[0]
            assert lr == opt.param_groups[0]["lr"]
            seq.append(float(lr))
            p.grad = torch.zeros(1)
            opt.step()
            sched.step()
        out[name] = seq
    return out


def manual_adamw(p, g, m, v, step, wd):
    """float32 re-implementation of torch's single-tensor AdamW (the formula in reference.json)."""
    p = p.clone()
    p.mul_(1 - LR * wd)
    m = m.lerp(g, 1 - BETAS[0])
    v = v.mul(BETAS[1]).addcmul_(g, g, value=1 - BETAS[1])
    bc1 = 1 - BETAS[0] ** step
    bc2 = 1 - BETAS[1] ** step
    step_size = LR / bc1
    denom = (v.sqrt() / math.sqrt(bc2)).add_(EPS)
    p.addcdiv_(m, denom, value=-step_size)
    return p, m, v


def clip_coef(norm):
    return torch.clamp(MAX_NORM / (norm + 1e-6), max=1.0)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build():
    from transformers import AutoTokenizer, Trainer

    fresh_dir(OUT)
    for f in COPIED:
        shutil.copyfile(SRC / f, OUT / f)

    tok = AutoTokenizer.from_pretrained(OUT)
    enc = tok(
        TEXTS,
        padding=True,
        truncation=True,
        return_attention_mask=True,
        return_token_type_ids=True,
        return_tensors="pt",
    )
    assert tok.unk_token_id not in enc["input_ids"].tolist()
    lengths = enc["attention_mask"].sum(1).tolist()
    assert len(set(lengths)) == len(TEXTS), lengths
    batch = {k: enc[k] for k in ("input_ids", "attention_mask", "token_type_ids")}
    labels = torch.tensor(LABELS, dtype=torch.long)

    model = load_model(OUT)
    cfg = model.config
    assert all(0 <= y < cfg.num_labels for y in LABELS)
    names = [n for n, _ in model.named_parameters()]
    sd_keys = list(model.state_dict().keys())
    assert names == sd_keys, "state_dict holds something besides the parameters"
    from safetensors import safe_open

    with safe_open(str(OUT / "model.safetensors"), "pt") as f:
        file_keys = set(f.keys())
        assert all(f.get_tensor(k).dtype == torch.float32 for k in file_keys)
    assert file_keys == set(names), (file_keys ^ set(names))

    decay_names = [n for n in names if is_decay(n)]
    no_decay_names = [n for n in names if not is_decay(n)]
    trainer_decay = Trainer.get_decay_parameter_names(None, model)
    assert sorted(trainer_decay) == sorted(decay_names), (set(trainer_decay) ^ set(decay_names))

    initial = f32_state(model)
    opt = make_optimizer(model)

    # ---- step 1
    out1, grads1, norm1 = train_step(model, opt, batch, labels)
    logits1 = out1.logits.detach()
    loss1 = out1.loss.detach()
    ce = torch.nn.functional.cross_entropy(logits1, labels)
    assert torch.equal(ce, loss1), (ce, loss1)
    no_grad = [n for n in names if n not in grads1]
    assert not no_grad, no_grad
    assert float(norm1) > MAX_NORM, f"grad norm {float(norm1)} <= max_norm {MAX_NORM}: clipping would not act"
    after1 = f32_state(model)
    state1 = {n: {k: v.clone() for k, v in opt.state[p].items()} for n, p in model.named_parameters()}

    # self-check: the recorded AdamW formula reproduces torch's step 1 from the clipped grads
    coef1 = clip_coef(norm1)
    for n in names:
        wd = WEIGHT_DECAY if is_decay(n) else 0.0
        g = grads1[n] * coef1
        z = torch.zeros_like(g)
        p, m, v = manual_adamw(initial[n], g, z, z, 1, wd)
        assert torch.equal(p, after1[n]), f"manual AdamW step 1 differs for {n}"
        assert torch.equal(m, state1[n]["exp_avg"]) and torch.equal(v, state1[n]["exp_avg_sq"]), n

    # ---- step 2
    out2, grads2, norm2 = train_step(model, opt, batch, labels)
    after2 = f32_state(model)
    coef2 = clip_coef(norm2)
    for n in names:
        wd = WEIGHT_DECAY if is_decay(n) else 0.0
        p, _, _ = manual_adamw(after1[n], grads2[n] * coef2, state1[n]["exp_avg"], state1[n]["exp_avg_sq"], 2, wd)
        assert torch.equal(p, after2[n]), f"manual AdamW step 2 differs for {n}"
    steps = {int(opt.state[p]["step"]) for p in model.parameters()}
    assert steps == {2}, steps

    save_st(OUT / "grads.safetensors", {n: g.to(torch.float32) for n, g in grads1.items()})
    save_st(OUT / "after_step.safetensors", after1)
    save_st(OUT / "after_two_steps.safetensors", after2)

    # Gradient rows that are exactly zero (padding_idx row of the word embeddings, unused
    # vocabulary / positions / token type 1): documented, since a naive implementation
    # might still update the padding row.
    zero_rows = {}
    for n in ("bert.embeddings.word_embeddings.weight", "bert.embeddings.position_embeddings.weight",
              "bert.embeddings.token_type_embeddings.weight"):
        nz = (grads1[n] != 0).any(dim=1)
        zero_rows[n] = {"rows": grads1[n].shape[0], "nonzero_rows": int(nz.sum()),
                        "row_0_all_zero": bool(not nz[0])}
    used_ids = sorted(set(enc["input_ids"][enc["attention_mask"].bool()].tolist()))
    pad_id = cfg.pad_token_id

    sched = lr_sequences()
    clipped = torch.cat([(grads1[n] * coef1).reshape(-1) for n in names])
    small = {t: int(((clipped != 0) & (clipped.abs() < t)).sum()) for t in (1e-8, 1e-7, 1e-6)}

    written_cfg = json.loads((OUT / "config.json").read_text())
    params_info = [{"name": n, "shape": list(initial[n].shape), "weight_decay": WEIGHT_DECAY if is_decay(n) else 0.0}
                   for n in names]
    ref = {
        "model": "train-bert-cls",
        "architecture": "BertForSequenceClassification",
        "source_fixture": "tiny-bert-cls",
        "versions": all_versions(),
        "note": (
            "config.json, tokenizer.json, tokenizer_config.json and model.safetensors are byte copies of "
            "tiny-bert-cls (float32 safetensors, no conversion); the model was loaded with "
            "attn_implementation='eager', dropout_overrides applied to the config before loading, and put "
            "in train() mode"
        ),
        "copied_files_sha256": {f: sha256(OUT / f) for f in COPIED},
        "compute_dtype": "float32",
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": "eager",
        "mode": "train() with every dropout probability 0 (deterministic)",
        "dropout_overrides": DROPOUT_OVERRIDES,
        "config_dropout_as_written": {k: written_cfg.get(k) for k in DROPOUT_OVERRIDES},
        "num_labels": cfg.num_labels,
        "id2label": {str(k): v for k, v in cfg.id2label.items()},
        "problem_type": cfg.problem_type,
        "pad_token_id": pad_id,
        "schema": {
            "batch": "tok(texts, padding=True, truncation=True, return_attention_mask=True, "
                     "return_token_type_ids=True): right-padded with pad_token_id to padded_length; "
                     "token_type_ids all 0 (single sentences); labels: class ids",
            "logits": "[batch, num_labels] row-major flattened, at the initial (tiny-bert-cls) weights",
            "loss": "model(**batch, labels=labels).loss at the initial weights = "
                    "F.cross_entropy(logits, labels), mean over the batch rows (float32)",
            "grads.safetensors": "param.grad after the first loss.backward(), BEFORE clipping; one entry per "
                                 "parameter, HF names (model.named_parameters() == model.state_dict() keys)",
            "steps[k]": "k = 0: step 1, k = 1: step 2. grad_norm: value returned by clip_grad_norm_ (pre-clip "
                        "total L2 norm over all parameters' grads); clip_coef: the factor torch multiplied "
                        "every grad by; loss: the loss of that step's forward (step 2: at after_step weights)",
            "after_step.safetensors": "all parameters after optimizer step 1",
            "after_two_steps.safetensors": "all parameters after optimizer step 2",
            "lr_schedules": "see lr_schedules.convention",
        },
        "batch": {
            "texts": TEXTS,
            "padded_length": int(enc["input_ids"].shape[1]),
            "lengths": [int(x) for x in lengths],
            "input_ids": enc["input_ids"].tolist(),
            "attention_mask": enc["attention_mask"].tolist(),
            "token_type_ids": enc["token_type_ids"].tolist(),
            "labels": LABELS,
            "tokens": [tok.convert_ids_to_tokens(r) for r in enc["input_ids"].tolist()],
        },
        "logits": f32list(logits1),
        "loss": _F32(loss1.item()),
        "predicted": logits1.argmax(-1).tolist(),
        "optimizer": {
            "class": "torch.optim.AdamW (default single-tensor for-loop implementation on CPU; "
                     "foreach/fused not used, amsgrad False, maximize False)",
            "lr": LR,
            "betas": list(BETAS),
            "eps": EPS,
            "weight_decay": WEIGHT_DECAY,
            "param_groups": [
                {"weight_decay": WEIGHT_DECAY, "params": "decay_parameters"},
                {"weight_decay": 0.0, "params": "no_decay_parameters"},
            ],
            "weight_decay_rule": "weight_decay 0.01 iff the HF parameter name contains neither 'bias' nor "
                                 "'LayerNorm.weight'; 0.0 otherwise (all biases, all LayerNorm weights and "
                                 "biases). Identical here to transformers.Trainer.get_decay_parameter_names "
                                 "(asserted). Embeddings (word/position/token_type), pooler and classifier "
                                 "weights ARE decayed.",
            "update_formula": [
                "step t = 1, 2, ...; g = param.grad after clipping; m, v start at 0",
                "param *= 1 - lr * weight_decay          (decoupled decay, applied first, even where g == 0)",
                "m = m + (g - m) * (1 - beta1)           (torch lerp; = beta1*m + (1-beta1)*g)",
                "v = v * beta2 + (1 - beta2) * g * g",
                "bias_correction1 = 1 - beta1**t ; bias_correction2 = 1 - beta2**t   (Python float64)",
                "step_size = lr / bias_correction1",
                "denom = sqrt(v) / sqrt(bias_correction2) + eps",
                "param = param + (-step_size) * m / denom",
                "scalars (1 - lr*wd, 1 - beta1, beta2, 1 - beta2, step_size, sqrt(bias_correction2), eps) are "
                "computed as Python float64 and rounded to float32 when applied; all tensor arithmetic is "
                "float32",
            ],
            "bit_exactness": "torch's vectorized CPU kernels (AVX512 here) compute lerp as fma(w, g - m, m), "
                             "addcmul as fma(value * g, g, v), addcdiv as p + (value * m) / denom, and a float32 "
                             "sqrt that is NOT always correctly rounded (~0.6% of values 1-2 ulp low). A plain "
                             "float32 port of update_formula reproduces after_step bit-for-bit (m = v = 0 there) "
                             "but differs from after_two_steps in a few elements by ~1 ulp: compare with a "
                             "tolerance",

            "lr_during_these_steps": "constant 1e-3 (no scheduler)",
        },
        "clipping": {
            "function": "torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm, norm_type=2.0)",
            "max_norm": MAX_NORM,
            "formula": "total_norm = ||[||g_p||_2 for every param p]||_2 (float32); "
                       "clip_coef = min(max_norm / (total_norm + 1e-6), 1.0); every g_p *= clip_coef",
        },
        "steps": [
            {"step": 1, "loss": _F32(loss1.item()), "grad_norm": _F32(float(norm1)), "clip_coef": _F32(float(coef1))},
            {"step": 2, "loss": _F32(out2.loss.item()), "grad_norm": _F32(float(norm2)),
             "clip_coef": _F32(float(coef2)), "logits": f32list(out2.logits.detach())},
        ],
        "parameters": params_info,
        "num_parameters": len(names),
        "num_scalars": int(sum(initial[n].numel() for n in names)),
        "decay_parameters": decay_names,
        "no_decay_parameters": no_decay_names,
        "zero_grad_notes": {
            "every_parameter_gets_a_grad": True,
            "embedding_rows": zero_rows,
            "word_embeddings_padding_idx": pad_id,
            "ids_in_batch_excluding_pads": used_ids,
            "explanation": "word_embeddings is nn.Embedding(padding_idx=pad_token_id): its row pad_token_id "
                           "never gets a gradient (0 exactly), though pads are in the batch; rows of unused "
                           "ids / positions >= padded_length / token type 1 are 0 too. Padded key positions "
                           "get attention weight exactly 0, so pad tokens contribute nothing. Weight decay "
                           "still shrinks such zero-grad rows (m = v = 0 there, so Adam adds nothing).",
            "buffers_not_parameters": "bert.embeddings.position_ids and bert.embeddings.token_type_ids are "
                                      "non-persistent buffers: not in state_dict, not in any .safetensors here",
        },
        "parity_notes": {
            "small_clipped_grads": {f"nonzero_and_abs_below_{t:g}": int(n) for t, n in small.items()},
            "explanation": "Adam's first update is ~ -lr * g / (|g| + eps): where the clipped gradient is tiny "
                           "(comparable to eps = 1e-8 or to float32 round-off of the backward pass) the update "
                           "can differ by up to ~lr between two correct implementations. Check the optimizer in "
                           "isolation by feeding grads.safetensors (clip, then AdamW) and comparing "
                           "after_step tightly; compare end-to-end training with a tolerance of order lr on "
                           "those elements, or on the loss of step 2 (steps[1].loss).",
        },
        "lr_schedules": {
            "base_lr": LR,
            "num_warmup_steps": SCHED_WARMUP,
            "num_training_steps": SCHED_TOTAL,
            "convention": "values[i] = the lr the optimizer uses AT optimizer step i (0-based, i = 0..11): "
                          "scheduler.get_last_lr()[0] read after i calls of scheduler.step(), i.e. before "
                          "the scheduler.step() that follows optimizer.step() number i. values[0] is the lr of "
                          "the very first update (0.0 with warmup). Python float64 values = base_lr * lambda(i)",
            "calls": {
                "linear": "transformers.get_linear_schedule_with_warmup(opt, num_warmup_steps=3, "
                          "num_training_steps=12)",
                "cosine": "transformers.get_cosine_schedule_with_warmup(opt, num_warmup_steps=3, "
                          "num_training_steps=12)  (num_cycles=0.5)",
                "constant": "transformers.get_constant_schedule_with_warmup(opt, num_warmup_steps=3)",
            },
            "lambdas": {
                "linear": "i < w: float(i) / float(max(1, w)); "
                          "else max(0.0, float(T - i) / float(max(1, T - w)))",
                "cosine": "i < w: float(i) / float(max(1, w)); else progress = float(i - w) / float(max(1, T - w)); "
                          "max(0.0, 0.5 * (1.0 + math.cos(math.pi * 0.5 * 2.0 * progress)))",
                "constant": "i < w: float(i) / float(max(1.0, w)); else 1.0",
                "lr": "base_lr * lambda(i) (torch LambdaLR, Python float64)",
            },
            "values": sched,
        },
    }
    write_json(OUT / "reference.json", ref)
    return ref


def verify():
    """Reload train-bert-cls from disk; reproduce the step-1 loss and grads bit-for-bit."""
    from safetensors.torch import load_file
    from transformers import AutoTokenizer

    ref = json.loads((OUT / "reference.json").read_text())
    b = ref["batch"]
    tok = AutoTokenizer.from_pretrained(OUT)
    enc = tok(b["texts"], padding=True, truncation=True, return_attention_mask=True, return_token_type_ids=True)
    for k in ("input_ids", "attention_mask", "token_type_ids"):
        assert enc[k] == b[k], k
    model = load_model(OUT)
    batch = {k: torch.tensor(b[k]) for k in ("input_ids", "attention_mask", "token_type_ids")}
    out = model(**batch, labels=torch.tensor(b["labels"]))
    assert np.float32(out.loss.item()) == np.float32(ref["loss"])
    assert np.array_equal(out.logits.detach().numpy().reshape(-1), np.asarray(ref["logits"], dtype=np.float32))
    out.loss.backward()
    grads = load_file(str(OUT / "grads.safetensors"))
    assert set(grads) == {n for n, _ in model.named_parameters()}
    for n, p in model.named_parameters():
        assert torch.equal(p.grad, grads[n]), n
    for f in ("after_step.safetensors", "after_two_steps.safetensors"):
        assert set(load_file(str(OUT / f))) == set(grads), f
    total = sum(p.stat().st_size for p in OUT.iterdir())
    assert total < 1_000_000, total
    print(f"verified {OUT.relative_to(FIX.parent.parent)}: {total} bytes")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()

    torch.set_num_threads(args.threads)
    torch.use_deterministic_algorithms(True)
    torch.manual_seed(0)  # nothing random is drawn (dropout is 0); set for safety
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    if not (SRC / "model.safetensors").exists():
        sys.exit(f"{SRC} missing: run scripts/make_encoder_fixtures.py --only tiny-bert-cls first")
    build()
    verify()


if __name__ == "__main__":
    main()
