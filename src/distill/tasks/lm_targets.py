"""Sequence-level KD for causal language models: the teacher's completions of the training rows' prompts
(`distill generate`, data.targets) and the rows the distilled students then learn from.

A row's prompt is its tokens before the first counted one (the start token and the prompt of a prompt/completion or
chat row). A plain-text row has only its start token there, and a beam from one shared token is the same for every
row, so a plain-text row keeps its first `prompt_tokens` tokens as prompt (as the task's sample continuations do)
and the teacher writes the rest. The distilled row is that prompt followed by the teacher's completion, with the
counted tokens starting where the data's did: the text of a plain-text prompt still counts, as in the data.
Packed blocks begin mid-document and have no prompt: the recipe refuses data.targets with data.pack.
"""

from __future__ import annotations

from distill.data.lm_text import TokenizedLM
from distill.data.text import pad_rows


def prompt_end(ids: list[int], start: int, plain_prompt: int) -> int:
    """Where a row's prompt ends: at its first counted token, or, for plain text (start 1), after its first
    plain_prompt tokens (at least one token is left to continue)."""
    return start if start > 1 else min(plain_prompt, len(ids) - 1)


def generate_completions(task, model, rows: TokenizedLM, *, num_beams: int, num_return_sequences: int,
                         batch_size: int, device, max_new_tokens: int, sample: bool, temperature: float) -> list[dict]:
    """One record per row of `rows`, in order: its prompt and reference completion as text, and the teacher's k
    completions as token ids (best first for a beam), each at most max_new_tokens and within data.max_length.
    Batches hold prompts of similar lengths (sorted, stable: the same batches every time)."""
    model = getattr(model, "module", model)
    limit, k = task.recipe.data.max_length, num_return_sequences
    room = model.max_positions or limit  # the teacher's positions, at least data.max_length (checked when built)
    cuts = [prompt_end(ids, start, task.prompt_tokens) for ids, start in zip(rows.ids, rows.starts)]
    order = sorted(range(len(rows)), key=lambda i: cuts[i])
    decode = lambda ids: task.tokenizer.decode(ids, skip_special_tokens=True).strip()  # noqa: E731
    records: list = [None] * len(rows)
    for first in range(0, len(order), batch_size):
        idx = order[first : first + batch_size]
        prompts = [rows.ids[i][: cuts[i]] for i in idx]
        new = min(max_new_tokens, limit - len(prompts[0]), room - len(prompts[-1]))  # (sorted: shortest first)
        input_ids, attention_mask = pad_rows(prompts, task.tokenizer.pad_token_id)
        out = model.generate({"input_ids": input_ids.to(device), "attention_mask": attention_mask.to(device)},
                             max_new_tokens=new, do_sample=sample, temperature=temperature,
                             num_beams=1 if sample else num_beams, num_return_sequences=k)
        for j, i in enumerate(idx):
            fits = limit - len(prompts[j])  # a longer prompt's completion ends where its row reaches max_length
            records[i] = {"prompt": decode(prompts[j]), "reference": decode(rows.ids[i][cuts[i]:]),
                          "hypotheses": [h.tolist()[:fits] for h in out[j * k : (j + 1) * k]]}
    return records


def completion_rows(task, rows: TokenizedLM, completions: list[list[int]]) -> TokenizedLM:
    """The rows with the teacher's completion after each prompt; counted tokens start where they did in `rows`."""
    cuts = [prompt_end(ids, start, task.prompt_tokens) for ids, start in zip(rows.ids, rows.starts)]
    return TokenizedLM([ids[:cut] + list(c) for ids, cut, c in zip(rows.ids, cuts, completions)], list(rows.starts),
                       rows.pad_id)
