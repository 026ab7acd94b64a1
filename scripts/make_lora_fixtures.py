#!/usr/bin/env python3
"""Generate the reference fixtures for LoRA adapter parity (loading a `peft` adapter, the
adapted forward pass, LoRA gradients, greedy generation, merging) of wordloom.

Run by hand from anywhere (after scripts/make_fixtures.py has written tests/fixtures/tiny-llama/,
tiny-gptneo/ and tiny-gptj/, which are read and never modified):

    /opt/wlpy/bin/python scripts/make_lora_fixtures.py [--only llama,gptneo,gptj]

Needs: torch, transformers (>= 5), peft, safetensors, numpy (install peft with
`/opt/wlpy/bin/python -m pip install peft`). Runs on CPU in float32 with one thread,
attn_implementation="eager", fixed seeds and torch.use_deterministic_algorithms(True); no
network access (HF_HUB_OFFLINE=1 is set).

Output: tests/fixtures/lora-llama/, lora-gptneo/, lora-gptj/ (each regenerated from scratch,
< 200 KB, byte-for-byte deterministic):

  adapter_config.json         written by peft's PeftModel.save_pretrained(), unchanged except
                              base_model_name_or_path, which is set to the base fixture's
                              directory relative to this one ("../tiny-llama", "../tiny-gptneo",
                              "../tiny-gptj") instead of the local path peft would record, and
                              target_modules sorted (peft stores them as a set and writes them
                              in string-hash order, which changes from run to run).
                              LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, bias="none",
                              task_type="CAUSAL_LM", target_modules=...), so scale =
                              lora_alpha / r = 2 (use_rslora false). Targets:
                                llama   q_proj k_proj v_proj o_proj gate_proj up_proj down_proj
                                gptneo  q_proj v_proj out_proj c_fc
                                gptj    q_proj v_proj fc_in
  adapter_model.safetensors   written by save_pretrained() (float32, metadata {"format": "pt"}),
                              peft's names with the adapter name ("default") stripped, e.g.
                              base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
                              [r, in_features] and ...q_proj.lora_B.weight [out_features, r].
                              lora_A keeps peft's default init (kaiming_uniform_(a=sqrt(5)) drawn
                              from the torch RNG seeded just before get_peft_model); every lora_B,
                              which peft initialises to zero, is overwritten with N(0, 0.05^2)
                              values from a seeded torch.Generator BEFORE saving (with B = 0 the
                              adapter would be a no-op and lora_A's gradients all zero).
                              peft's README.md model card is deleted (not part of the adapter).
  reference.json              three token sequences of different lengths with prompt-masked
                              labels; the batch loss; per-token next-token log-probs of
                              sequence 0; greedy continuations of the adapted and of the merged
                              model; versions and LoRA settings. See its "schema" key.
  grads.safetensors           every LoRA parameter's .grad after ONE loss.backward() of the batch
                              loss at the saved weights (no optimizer step), float32, under
                              exactly the names of adapter_model.safetensors (same key set,
                              asserted). Base weights are frozen: they have no gradients.

The adapted forward is  y = base(x) + (lora_dropout(x) @ A^T) @ B^T * (lora_alpha / r)
on every targeted nn.Linear (the base layer's bias, if any, stays in base(x) and is not
trained). The loss is the one of the PeftModel in train() mode (every dropout probability 0,
asserted) on the three sequences as one right-padded batch with attention_mask and labels
(-100 on the prompt part and on padding): model(input_ids, attention_mask, labels).loss, i.e.
HF shifts the labels by one internally and takes the mean of the token cross-entropies over
all non -100 targets of the whole batch. The script asserts that running each sequence
unpadded and computing sum(token losses) / number of label tokens gives the same value
(to 1e-5); that is the Rust-side definition.

Greedy convention: generate(do_sample=False, max_new_tokens=12) with a generation config whose
eos_token_id is None (so EOS is not a stop condition and is not suppressed either: pure argmax
over the full logits row, exactly 12 new tokens), checked against a hand-written argmax loop
without KV cache. merge_and_unload() is then applied and must give the same 12 tokens.

After writing, every directory is reloaded from disk (fresh base model + PeftModel.from_pretrained)
and the batch loss and gradients are reproduced bit-for-bit.

Floats that are float32 values are written in their shortest float32 round-trip decimal form
(parse as f32 to get back the exact value torch produced).
"""

import argparse
import copy
import json
import os
import sys
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))

from make_fixtures import FIX, _F32, _dist_version, f32list, fresh_dir, versions, write_json  # noqa: E402

R = 4
ALPHA = 8
B_STD = 0.05
LENGTHS = [9, 14, 21]
PROMPT_LENGTHS = [4, 6, 10]
GREEDY_PROMPT = 5
NEW_TOKENS = 12

FAMILIES = {
    "llama": {
        "base": "tiny-llama",
        "targets": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        "seed": 100,
    },
    "gptneo": {
        "base": "tiny-gptneo",
        "targets": ["q_proj", "v_proj", "out_proj", "c_fc"],
        "seed": 200,
    },
    "gptj": {
        "base": "tiny-gptj",
        "targets": ["q_proj", "v_proj", "fc_in"],
        "seed": 300,
    },
}
# seed usage per family: numpy RandomState(seed) -> the sequences; torch.manual_seed(seed + 1)
# just before get_peft_model -> lora_A init; torch.Generator().manual_seed(seed + 2) -> lora_B.


def all_versions():
    v = versions()
    v.pop("gguf", None)
    v.pop("tokenizers", None)
    v["peft"] = _dist_version("peft")
    v["safetensors"] = _dist_version("safetensors")
    return v


def load_base(path):
    from transformers import AutoModelForCausalLM

    # the brief's torch_dtype=torch.float32: transformers 5 spells it dtype= (tiny-gptj is f16 on disk)
    model, info = AutoModelForCausalLM.from_pretrained(
        path, dtype=torch.float32, attn_implementation="eager", output_loading_info=True
    )
    bad = {k: v for k, v in info.items() if v}
    assert not bad, f"loading {path}: {bad}"
    assert all(p.dtype == torch.float32 for p in model.parameters())
    return model


def lora_config(targets):
    from peft import LoraConfig

    return LoraConfig(
        r=R, lora_alpha=ALPHA, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM", target_modules=list(targets)
    )


def check_no_dropout(model):
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Dropout):
            assert m.p == 0.0, (name, m)
    cfg = model.config
    for k in ("attention_dropout", "attn_pdrop", "embd_pdrop", "resid_pdrop", "embed_dropout", "resid_dropout"):
        v = getattr(cfg, k, None)
        assert v in (None, 0.0, 0), (k, v)


def make_sequences(seed, vocab):
    rs = np.random.RandomState(seed)
    seqs = [[int(x) for x in rs.randint(2, vocab, size=n)] for n in LENGTHS]
    labels = [[-100] * p + s[p:] for s, p in zip(seqs, PROMPT_LENGTHS)]
    return seqs, labels


def padded_batch(seqs, labels, pad_id):
    T = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), T), dtype=torch.long)
    lab = torch.full((len(seqs), T), -100, dtype=torch.long)
    for i, (s, l) in enumerate(zip(seqs, labels)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(s)] = 1
        lab[i, : len(s)] = torch.tensor(l)
    return ids, mask, lab


def unpadded_loss(model, seqs, labels):
    """sum of next-token CE over every label token of every sequence / number of label tokens."""
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    per_seq = []
    for s, l in zip(seqs, labels):
        ids = torch.tensor([s])
        logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0].float()
        tgt = torch.tensor(l[1:])
        keep = tgt != -100
        ce = torch.nn.functional.cross_entropy(logits[:-1][keep], tgt[keep], reduction="none")
        total += ce.double().sum()
        count += int(keep.sum())
        per_seq.append((float(ce.double().sum()), int(keep.sum())))
    return float(total / count), count, per_seq


def manual_greedy(model, prompt, n):
    ids = list(prompt)
    for _ in range(n):
        t = torch.tensor([ids])
        logits = model(input_ids=t, attention_mask=torch.ones_like(t), use_cache=False).logits[0, -1]
        ids.append(int(logits.argmax()))
    return ids[len(prompt):]


def hf_greedy(model, gen_base, prompt, n, pad_id):
    gc = copy.deepcopy(gen_base)
    gc.do_sample = False
    gc.eos_token_id = None
    gc.pad_token_id = pad_id
    gc.max_new_tokens = n
    gc.min_new_tokens = None
    t = torch.tensor([prompt])
    out = model.generate(input_ids=t, attention_mask=torch.ones_like(t), generation_config=gc)
    new = out[0, len(prompt):].tolist()
    assert len(new) == n, (len(new), n)
    return new


def save_st(path, tensors):
    from safetensors.torch import save_file

    save_file({k: tensors[k].contiguous() for k in sorted(tensors)}, str(path), metadata={"format": "pt"})
    os.chmod(path, 0o644)


def lora_grad_dict(model):
    from peft import get_peft_model_state_dict

    grads = {}
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert "lora_" in n, n
            assert p.grad is not None, n
            grads[n] = p.grad.detach().to(torch.float32).clone()
        else:
            assert p.grad is None, n
    # strip the adapter name exactly the way peft does when saving
    stripped = get_peft_model_state_dict(model, state_dict=grads, save_embedding_layers=False)
    assert len(stripped) == len(grads)
    return {k: v.clone() for k, v in stripped.items()}


def build(fam, spec):
    from peft import get_peft_model
    from safetensors import safe_open

    base_dir = FIX / spec["base"]
    out = FIX / f"lora-{fam}"
    fresh_dir(out)
    seed = spec["seed"]

    base = load_base(base_dir)
    cfg = base.config
    vocab = cfg.vocab_size
    gen_base = base.generation_config
    eos = gen_base.eos_token_id
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else gen_base.pad_token_id
    if pad_id is None:
        pad_id = eos
    seqs, labels = make_sequences(seed, vocab)

    torch.manual_seed(seed + 1)
    model = get_peft_model(base, lora_config(spec["targets"]))
    gen = torch.Generator().manual_seed(seed + 2)
    b_names = []
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32) * B_STD)
                b_names.append(n)
    assert b_names
    model.peft_config["default"].base_model_name_or_path = f"../{spec['base']}"
    # no embedding layer is targeted; False skips peft's cwd-relative base-config look-up
    model.save_pretrained(str(out), save_embedding_layers=False)
    readme = out / "README.md"
    if readme.exists():
        readme.unlink()
    os.chmod(out / "adapter_model.safetensors", 0o644)  # safetensors creates 0600 files
    # peft keeps target_modules as a set, so it writes them in hash order (PYTHONHASHSEED-dependent):
    # sort them, and rewrite the file exactly as peft's LoraConfig.save_pretrained formats it.
    cfg_path = out / "adapter_config.json"
    written = json.loads(cfg_path.read_text())
    assert set(written["target_modules"]) == set(spec["targets"]), written["target_modules"]
    assert written["base_model_name_or_path"] == f"../{spec['base']}"
    written["target_modules"] = sorted(written["target_modules"])
    cfg_path.write_text(json.dumps(written, indent=2, sort_keys=True))
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"], list(
        out.iterdir()
    )
    with safe_open(str(out / "adapter_model.safetensors"), "pt") as f:
        saved = {k: f.get_tensor(k) for k in f.keys()}
    assert all(t.dtype == torch.float32 for t in saved.values())
    params = dict(model.named_parameters())
    for k, t in saved.items():
        assert ".default" not in k, k
        pk = k.replace(".lora_A.weight", ".lora_A.default.weight").replace(".lora_B.weight", ".lora_B.default.weight")
        assert torch.equal(params[pk].detach(), t), k

    # ---- batch loss + gradients (train mode, dropout 0)
    model.train()
    check_no_dropout(model)
    ids, mask, lab = padded_batch(seqs, labels, pad_id)
    model.zero_grad(set_to_none=True)
    outp = model(input_ids=ids, attention_mask=mask, labels=lab)
    loss = outp.loss
    loss.backward()
    grads = lora_grad_dict(model)
    assert set(grads) == set(saved), set(grads) ^ set(saved)
    for k, g in grads.items():
        assert g.shape == saved[k].shape, k
        assert torch.count_nonzero(g) > 0, f"all-zero gradient {k}"
    save_st(out / "grads.safetensors", grads)
    model.zero_grad(set_to_none=True)

    with torch.no_grad():
        ul, n_label, per_seq = unpadded_loss(model, seqs, labels)
    assert abs(ul - loss.item()) <= 1e-5, (ul, loss.item())
    assert n_label == sum(len(s) - p for s, p in zip(seqs, PROMPT_LENGTHS))

    # ---- eval: log-probs of sequence 0, greedy continuations
    model.eval()
    with torch.no_grad():
        s0 = torch.tensor([seqs[0]])
        logits = model(input_ids=s0, attention_mask=torch.ones_like(s0)).logits[0].float()
        lp = torch.log_softmax(logits, dim=-1)[:-1].gather(1, s0[0, 1:, None])[:, 0]
        with model.disable_adapter():
            base_logits = model(input_ids=s0, attention_mask=torch.ones_like(s0)).logits[0].float()
        adapter_effect = float((logits - base_logits).abs().max())
        assert adapter_effect > 1e-3, adapter_effect

        prompt = seqs[0][:GREEDY_PROMPT]
        greedy = hf_greedy(model, gen_base, prompt, NEW_TOKENS, pad_id)
        assert greedy == manual_greedy(model, prompt, NEW_TOKENS), "generate() vs argmax loop"

        merged = model.merge_and_unload()
        merged.eval()
        merged_logits = merged(input_ids=s0, attention_mask=torch.ones_like(s0)).logits[0].float()
        merged_max_diff = float((merged_logits - logits).abs().max())
        merged_greedy = hf_greedy(merged, gen_base, prompt, NEW_TOKENS, pad_id)
    assert merged_greedy == greedy, (merged_greedy, greedy)

    target_shapes = {}
    for k, t in sorted(saved.items()):
        mod = k.rsplit(".lora_", 1)[0]
        target_shapes.setdefault(mod, {})["lora_A" if ".lora_A." in k else "lora_B"] = list(t.shape)

    ref = {
        "model": f"lora-{fam}",
        "base_fixture": spec["base"],
        "base_architecture": type(merged).__name__,
        "versions": all_versions(),
        "compute_dtype": "float32",
        "torch_num_threads": torch.get_num_threads(),
        "attn_implementation": "eager",
        "lora": {
            "r": R,
            "lora_alpha": ALPHA,
            "scale": ALPHA / R,
            "lora_dropout": 0.0,
            "bias": "none",
            "use_rslora": False,
            "target_modules": spec["targets"],
            "formula": "y = base_linear(x) + ((x @ lora_A^T) @ lora_B^T) * (lora_alpha / r); "
                       "lora_A: [r, in_features], lora_B: [out_features, r]",
            "lora_A_init": f"peft default (kaiming_uniform_(a=sqrt(5))) after torch.manual_seed({seed + 1})",
            "lora_B_init": f"overwritten in model.named_parameters() order with torch.randn(shape, "
                           f"generator=torch.Generator().manual_seed({seed + 2})) * {B_STD}",
            "adapted_modules": target_shapes,
        },
        "pad_token_id_used_for_batch": pad_id,
        "eos_token_id": eos,
        "schema": {
            "model / base_fixture / base_architecture": "this fixture dir / the base checkpoint dir next to it "
                                                        "(loaded with dtype float32) / its HF class",
            "versions": "python and package versions that produced these files",
            "compute_dtype / torch_num_threads / attn_implementation": "how everything here was computed (CPU)",
            "lora": "LoraConfig values, the adapted forward formula, how A and B were initialised, and every "
                    "adapted module (saved-name prefix) with its lora_A / lora_B shapes",
            "pad_token_id_used_for_batch": "id filling the padded tail of the loss batch (config pad_token_id, "
                                           "else generation_config's); masked, so its value does not matter",
            "eos_token_id": "generation_config.eos_token_id of the base (NOT used as a stop token here)",
            "greedy_contains_eos": "whether eos_token_id occurs in greedy.new_tokens",
            "adapter_config_base_model_name_or_path": "the value written into adapter_config.json",
            "sequences": "3 token-id lists (lengths 9, 14, 21, ids uniform in [2, vocab_size) from "
                         f"numpy RandomState({seed}))",
            "labels": "per sequence, same length as its ids: -100 on the first 4 / 6 / 10 (prompt) positions, "
                      "the token id elsewhere (unshifted, like HF labels)",
            "loss": "PeftModel in train() mode (dropout 0) on the 3 sequences as ONE right-padded batch "
                    "(pad_token_id_used_for_batch, attention_mask, labels -100 on padding): "
                    "model(input_ids, attention_mask, labels).loss = mean next-token cross-entropy over all "
                    "non -100 shifted targets of the batch (num_label_tokens of them)",
            "loss_unpadded": "each sequence run alone, unpadded: sum of token losses / num_label_tokens "
                             "(float64 accumulation); asserted equal to loss within 1e-5",
            "num_label_tokens": "number of (position, next token) targets whose label is not -100",
            "logprobs": "sequence 0 alone, eval mode, adapter on: log_softmax(logits[t])[ids[t+1]] "
                        "for t = 0..len-2 (float32)",
            "greedy": "prompt = sequence 0's first 5 ids; new_tokens = the 12 tokens of "
                      "generate(do_sample=False, max_new_tokens=12, eos_token_id=None) of the adapted model "
                      "(pure argmax over the full vocab, EOS neither stops nor is suppressed; equal to an "
                      "uncached argmax loop, asserted)",
            "merged_greedy": "the same generate() call on peft's merge_and_unload() model "
                             "(asserted equal to greedy.new_tokens)",
            "merged_logits_max_abs_diff": "max |logits(merged) - logits(adapter)| on sequence 0 (float32 "
                                          "round-off of W + scale * B @ A)",
            "adapter_effect_max_abs_logit": "max |logits(adapter) - logits(base)| on sequence 0",
            "grads.safetensors": "LoRA param .grad after loss.backward() of 'loss', names as in "
                                 "adapter_model.safetensors (adapter name stripped by "
                                 "peft.get_peft_model_state_dict)",
        },
        "sequences": seqs,
        "labels": labels,
        "loss": _F32(loss.item()),
        "loss_unpadded": _F32(ul),
        "num_label_tokens": n_label,
        "logprobs": f32list(lp),
        "greedy": {"prompt": prompt, "new_tokens": greedy},
        "merged_greedy": merged_greedy,
        "greedy_contains_eos": eos is not None and eos in greedy,
        "merged_logits_max_abs_diff": _F32(merged_max_diff),
        "adapter_effect_max_abs_logit": _F32(adapter_effect),
        "adapter_config_base_model_name_or_path": f"../{spec['base']}",
    }
    write_json(out / "reference.json", ref)
    return out


def verify(fam, spec):
    """Reload from disk: fresh base + PeftModel.from_pretrained; loss and grads bit-for-bit."""
    from peft import PeftModel
    from safetensors.torch import load_file

    out = FIX / f"lora-{fam}"
    ref = json.loads((out / "reference.json").read_text())
    base = load_base(FIX / spec["base"])
    model = PeftModel.from_pretrained(base, str(out), is_trainable=True)
    model.train()
    ids, mask, lab = padded_batch(ref["sequences"], ref["labels"], ref["pad_token_id_used_for_batch"])
    loss = model(input_ids=ids, attention_mask=mask, labels=lab).loss
    assert np.float32(loss.item()) == np.float32(ref["loss"]), (loss.item(), ref["loss"])
    loss.backward()
    grads = load_file(str(out / "grads.safetensors"))
    got = lora_grad_dict(model)
    assert set(got) == set(grads)
    for k in grads:
        assert torch.equal(got[k], grads[k]), k
    total = sum(p.stat().st_size for p in out.iterdir())
    assert total < 200_000, total
    print(f"verified {out.relative_to(FIX.parent.parent)}: {total} bytes, loss {ref['loss']}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default=",".join(FAMILIES), help="comma-separated subset of " + ",".join(FAMILIES))
    args = ap.parse_args()
    fams = [f for f in args.only.split(",") if f]
    for f in fams:
        if f not in FAMILIES:
            sys.exit(f"unknown family {f!r}")

    torch.set_num_threads(1)
    torch.use_deterministic_algorithms(True)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    for f in fams:
        spec = FAMILIES[f]
        if not (FIX / spec["base"] / "config.json").exists():
            sys.exit(f"{FIX / spec['base']} missing: run scripts/make_fixtures.py --only {spec['base']} first")
        build(f, spec)
        verify(f, spec)


if __name__ == "__main__":
    main()
