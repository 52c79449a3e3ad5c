"""Train the demo model that ships with mvc (`mvc init --demo`), reproducibly, on CPU.

A tiny Llama (about 1.1 M parameters, byte-level BPE with 1024 tokens) trained for a few
minutes on Milton's *Paradise Lost* (public domain; Project Gutenberg text, see
scripts/data/README.md). The last 10 % of the poem is held out: the evaluation text is taken
from it, the calibration text from the training part.

    .venv/bin/python scripts/make_demo_model.py [--steps 700] [--out mvc/compress/demo]

Writes config.json, generation_config.json, model.safetensors (bf16), tokenizer.json,
tokenizer_config.json, eval.txt and calib.txt into --out.
"""

from __future__ import annotations

import argparse
import math
import os
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TEXT = os.path.join(HERE, "data", "paradise-lost.txt")


def split_text(text: str) -> tuple[str, str, str]:
    """(train, calibration, evaluation): the evaluation text never appears in training."""
    cut = int(len(text) * 0.9)
    cut = text.index("\n", cut) + 1
    train, held = text[:cut], text[cut:]
    start = text.index("\n", len(train) // 3) + 1
    calib = train[start:text.index("\n", start + 64_000) + 1]
    evaluation = held[:text.index("\n", cut + 24_000) + 1 - cut]
    return train, calib, evaluation


def train_tokenizer(train: str, vocab: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([train], trainer=trainer)
    return tok


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=700)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "mvc", "compress", "demo"))
    args = ap.parse_args()

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    with open(TEXT, encoding="utf-8") as f:
        text = f.read()
    train, calib, evaluation = split_text(text)

    tok = train_tokenizer(train, 1024)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
                                   unk_token="<|endoftext|>", model_max_length=256)
    ids = torch.tensor(tok.encode(train).ids, dtype=torch.long)
    eval_ids = torch.tensor(tok.encode(evaluation).ids, dtype=torch.long)

    cfg = LlamaConfig(vocab_size=1024, hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256,
                      rms_norm_eps=1e-5, tie_word_embeddings=False, bos_token_id=0, eos_token_id=0)
    model = LlamaForCausalLM(cfg)
    # weight decay on matrices only: norm gains keep their scale (as LLM training recipes do)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": rest, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95))
    warm = 30

    def lr_at(step):
        if step < warm:
            return args.lr * (step + 1) / warm
        return args.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, args.steps - warm)))

    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.time()
    model.train()
    for step in range(args.steps):
        starts = torch.randint(0, len(ids) - args.seq_len - 1, (args.batch,), generator=gen)
        batch = torch.stack([ids[s:s + args.seq_len] for s in starts.tolist()])
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        if step % 50 == 0 or step == args.steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  {time.time() - t0:.0f} s", flush=True)

    model.eval()
    with torch.no_grad():
        n = (len(eval_ids) - 1) // args.seq_len * args.seq_len
        x = eval_ids[:n].view(-1, args.seq_len)
        nll = model(input_ids=x, labels=x).loss.item()
    print(f"held-out perplexity (fp32, {n} tokens): {math.exp(nll):.2f}  (uniform: {cfg.vocab_size})")

    os.makedirs(args.out, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(args.out, safe_serialization=True)
    fast.save_pretrained(args.out)
    for name, body in (("eval.txt", evaluation), ("calib.txt", calib)):
        with open(os.path.join(args.out, name), "w", encoding="utf-8") as f:
            f.write(body)
    print(f"wrote {os.path.abspath(args.out)}")


if __name__ == "__main__":
    main()
