"""What a seq2seq model's shape costs at decoding time, batch 1, CPU: random weights, a fixed source and a fixed
number of generated tokens (min = max new tokens), so only the architecture differs.

    python bench/decoding_cost.py [--tokens 25] [--source 20] [--rounds 5] [--threads 1]

Models take turns each round; the median round is printed, greedy and beam 5 through `transformers` generate, and a
hand-written greedy loop over the same model (encoder once, then one decoder call per token with the key/value
cache) to show generate's own overhead. Shapes: the en-es teacher (3+3, d 256), the en-es student (3+1, d 256) and
smaller students.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

SHAPES = {  # name -> (encoder layers, decoder layers, d_model, ffn_dim)
    "3+3 d256 (en-es teacher)": (3, 3, 256, 1024),
    "3+1 d256 (en-es student)": (3, 1, 256, 1024),
    "3+1 d128": (3, 1, 128, 512),
    "2+1 d64": (2, 1, 64, 256),
}


def build(encoder_layers: int, decoder_layers: int, d_model: int, ffn_dim: int, vocab: int):
    from distill.students.seq2seq import Seq2SeqConfig, build_marian

    config = Seq2SeqConfig(encoder_layers=encoder_layers, decoder_layers=decoder_layers, d_model=d_model, heads=4,
                           ffn_dim=ffn_dim)
    return build_marian(config, vocab, pad_id=0, eos_id=2).hf.eval()


@torch.inference_mode()
def generate(model, ids, tokens: int, beams: int):
    return model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), num_beams=beams, do_sample=False,
                          max_new_tokens=tokens, min_new_tokens=tokens)


@torch.inference_mode()
def hand_greedy(model, ids, tokens: int):
    mask = torch.ones_like(ids)
    encoded = model.get_encoder()(input_ids=ids, attention_mask=mask)
    out, cache = torch.zeros(1, 1, dtype=torch.long), None
    for _ in range(tokens):
        step = model(encoder_outputs=encoded, attention_mask=mask, decoder_input_ids=out[:, -1:], past_key_values=cache,
                     use_cache=True)
        cache = step.past_key_values
        out = torch.cat([out, step.logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=25, help="tokens generated per sentence (en-es mean: ~21)")
    p.add_argument("--source", type=int, default=20, help="source tokens")
    p.add_argument("--vocab", type=int, default=8000)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(a.threads)
    models = {name: build(*shape, a.vocab) for name, shape in SHAPES.items()}
    ids = torch.randint(5, a.vocab, (1, a.source))
    modes = {"greedy": lambda m: generate(m, ids, a.tokens, 1), "beam 5": lambda m: generate(m, ids, a.tokens, 5),
             "hand greedy": lambda m: hand_greedy(m, ids, a.tokens)}
    for model in models.values():  # untimed: lazy initialisation
        generate(model, ids, 2, 1)
    seconds = {(n, k): [] for n in models for k in modes}
    for _ in range(a.rounds):
        for name, model in models.items():
            for mode, run in modes.items():
                t0 = time.perf_counter()
                run(model)
                seconds[(name, mode)].append(time.perf_counter() - t0)
    ms = {key: statistics.median(v) * 1000 for key, v in seconds.items()}
    teacher = next(iter(models))
    print(f"{a.tokens} tokens from a {a.source}-token source, batch 1, {a.threads} thread(s), median of {a.rounds} rounds\n")
    print("| model | params (M) | greedy ms | beam 5 ms | hand greedy ms | vs teacher greedy | vs teacher beam 5 |")
    print("|:---|---:|---:|---:|---:|---:|---:|")
    for name, model in models.items():
        params = sum(t.numel() for t in model.parameters()) / 1e6
        print(f"| {name} | {params:.2f} | {ms[(name, 'greedy')]:.1f} | {ms[(name, 'beam 5')]:.1f} | "
              f"{ms[(name, 'hand greedy')]:.1f} | {ms[(teacher, 'greedy')] / ms[(name, 'greedy')]:.1f} | "
              f"{ms[(teacher, 'beam 5')] / ms[(name, 'greedy')]:.1f} |")


if __name__ == "__main__":
    main()
