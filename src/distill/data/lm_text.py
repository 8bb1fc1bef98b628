"""Text for causal language models: a user's files read into examples, examples tokenized into rows, and the
batches a decoder-only model trains on.

Examples come as plain text (language modelling: .txt with one document per non-empty line, or JSONL with a
text field), prompt/completion JSONL (`prompt`, `completion`), or chat JSONL (`messages`: [{role, content}],
rendered with the tokenizer's chat template: the last turn, the assistant's, is the completion, everything before
it the prompt). Files may be gzipped; a malformed line is refused with its file and line number.

A row is [start] + prompt + completion + [</s>] in token ids (start: the tokenizer's bos token, else its eos
token, which then also begins a text, as GPT-2's <|endoftext|>); a chat row is its rendered prompt + completion,
whose special tokens the template writes. The tokens that count are the completion's, or, for plain text, every
token after the first. With packing (plain text only) the documents are joined into one stream and cut into
blocks of max_length tokens that overlap by one token, so every token of the stream but the first is predicted
exactly once and no position is padding.

A batch is `({"input_ids", "attention_mask", "target_mask"}, y)`: target_mask[b, t] is True when the token at
t + 1 counts, and y holds those tokens in row-major order. A model's logits at target_mask (position t predicts
token t + 1) are then [N, V] rows in the order of y, and every logit method of the zoo works per counted token.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from distill.data.parallel import json_lines, open_text
from distill.data.text import pad_rows
from distill.errors import UserError

FORMATS = ("text", "prompt_completion", "chat")


@dataclass(frozen=True)
class LMExample:
    where: str  # "FILE line N": named when the example is refused
    completion: str = ""  # the text that counts (for plain text: the whole document)
    prompt: str | None = None  # None: plain text
    messages: tuple | None = None  # a chat, rendered into prompt and completion by the tokenizer's template


# ----------------------------------------------------------------------------- reading
def read_lm_file(path, fmt: str = "auto", text_field: str = "text") -> tuple[str, list[LMExample]]:
    """(format, examples) of a .txt or .jsonl file (optionally .gz); fmt auto: a .txt file is plain text, a JSONL
    file's format follows its first line's fields (`messages`: chat; `prompt` and `completion`; else text)."""
    path = Path(path)
    name = path.name.removesuffix(".gz")
    if name.endswith(".txt"):
        if fmt not in ("auto", "text"):
            raise UserError(f"{path}: a .txt file holds plain text (one document per line), not data.format {fmt}: "
                            "give a .jsonl file or set data.format to text")
        lines = enumerate(open_text(path), start=1)
        examples = [LMExample(f"{path} line {n}", line.strip()) for n, line in lines if line.strip()]
    elif name.endswith((".jsonl", ".json")):
        rows = list(json_lines(path))
        fmt = _detect(path, rows[0][1], text_field) if rows and fmt == "auto" else fmt
        parse = {"text": _text, "prompt_completion": _prompt_completion, "chat": _chat}[fmt] if rows else None
        examples = [parse(f"{path} line {line}", row, text_field) for line, row in rows]
    else:
        raise UserError(f"{path}: language-model data must be .txt (one document per line) or .jsonl (text, "
                        "prompt/completion or chat messages), optionally .gz")
    if not examples:
        raise UserError(f"{path} holds no examples: give one document per line (.txt) or one JSON object per line")
    return ("text" if fmt == "auto" else fmt), examples


def _detect(path: Path, first, text_field: str) -> str:
    keys = sorted(first) if isinstance(first, dict) else []
    if "messages" in keys:
        return "chat"
    if "prompt" in keys and "completion" in keys:
        return "prompt_completion"
    if text_field in keys:
        return "text"
    raise UserError(f"{path} line 1 has keys {keys}: language-model JSONL needs {text_field!r} (data.text_column), "
                    "'prompt' and 'completion', or 'messages'; or set data.format")


def _string(where: str, row, key: str, *, empty: bool = False) -> str:
    value = row.get(key) if isinstance(row, dict) else None
    if not isinstance(value, str) or not (empty or value.strip()):
        raise UserError(f"{where}: needs {'a' if empty else 'a non-empty'} {key!r} string: fix or remove that line")
    return value


def _text(where: str, row, text_field: str) -> LMExample:
    return LMExample(where, _string(where, row, text_field).strip())


def _prompt_completion(where: str, row, _) -> LMExample:
    return LMExample(where, _string(where, row, "completion"), prompt=_string(where, row, "prompt", empty=True))


def _chat(where: str, row, _) -> LMExample:
    messages = row.get("messages") if isinstance(row, dict) else None
    if not isinstance(messages, list) or not messages or not all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages):
        raise UserError(f"{where}: needs 'messages', a non-empty list of {{\"role\": ..., \"content\": ...}} with text "
                        "values: fix or remove that line")
    if messages[-1]["role"] != "assistant":
        raise UserError(f"{where}: the last message is the {messages[-1]['role']}'s, but it must be the assistant's "
                        "(the completion the model learns): end that conversation with an assistant turn")
    return LMExample(where, messages=tuple({"role": m["role"], "content": m["content"]} for m in messages))


# ----------------------------------------------------------------------------- tokenizing
def render_chat(tokenizer, messages, where: str) -> tuple[str, str]:
    """(prompt, completion) text of a chat: the template's rendering of every turn before the last with the
    generation prompt, and what the whole conversation's rendering adds to it."""
    try:
        prompt = tokenizer.apply_chat_template(list(messages[:-1]), tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(list(messages), tokenize=False)
    except Exception as e:  # a template is a user's Jinja program: any error it raises is about that line
        raise UserError(f"{where}: the tokenizer's chat template fails on it ({type(e).__name__}: "
                        f"{str(e).splitlines()[0][:120] if str(e) else ''}): fix that line or the template") from None
    if not full.startswith(prompt):
        raise UserError(f"{where}: the chat template renders the turns before the assistant's differently alone "
                        "than in the whole conversation, so the completion cannot be cut from it: use a template whose "
                        "generation prompt is a prefix of the rendered conversation, or prompt/completion JSONL")
    return prompt, full[len(prompt):]


def tokenize_examples(tokenizer, examples: list[LMExample], max_length: int, *, pack: bool = False,
                      source: str = "data") -> "TokenizedLM":
    """Rows of token ids cut to max_length, each with the index of its first counted token. A prompt that leaves
    no completion token within max_length is refused, naming the example."""
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer has no end-of-text token: set tokenizer.eos_token and save it ({source})")
    chat = any(ex.messages is not None for ex in examples)
    if chat and not getattr(tokenizer, "chat_template", None):
        raise UserError(f"{source}: chat data (messages) is rendered with the tokenizer's chat template, but the tokenizer "
                        "has none: use a teacher or data.tokenizer whose tokenizer has a chat_template, or give "
                        "prompt/completion JSONL")
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    head, tail = ([], []) if chat else ([start], [tokenizer.eos_token_id])  # a template writes its own
    texts = [render_chat(tokenizer, ex.messages, ex.where) if chat else (ex.prompt or "", ex.completion) for ex in examples]
    encode = lambda parts: tokenizer(list(parts), add_special_tokens=False)["input_ids"] if parts else []  # noqa: E731
    prompts, completions = encode(p for p, _ in texts), encode(c for _, c in texts)
    rows, starts = [], []
    for ex, p, c in zip(examples, prompts, completions):
        first = max(1, len(head) + len(p))  # index of the first counted token: position first - 1 predicts it
        if first >= max_length:
            raise UserError(f"{ex.where}: the prompt takes {first} tokens, leaving no room for its completion within "
                            f"data.max_length={max_length}: raise data.max_length or shorten that prompt")
        rows.append([*head, *p, *c, *tail])
        starts.append(first)
    if pack:
        if any(ex.prompt is not None or ex.messages is not None for ex in examples):
            raise UserError("data.pack joins plain-text documents into blocks; prompt/completion and chat rows keep "
                            "their own rows: set data.pack false")
        return pack_rows(rows, max_length, tokenizer.pad_token_id)
    return TokenizedLM([r[:max_length] for r in rows], starts, tokenizer.pad_token_id)


def pack_rows(rows: list[list[int]], max_length: int, pad_id: int) -> "TokenizedLM":
    """Plain-text rows joined into one stream (where a text ends with the token the next one starts with, as when
    </s> serves as both, that token is written once) and cut into blocks of max_length tokens, each starting at
    the last token of the block before: every token of the stream but the first is a target exactly once.
    Attention crosses the documents of a block, as in GPT-2's training."""
    stream: list[int] = []
    for r in rows:
        stream.extend(r[1:] if stream and r[0] == stream[-1] else r)
    blocks = [stream[i : i + max_length] for i in range(0, len(stream) - 1, max_length - 1)]
    return TokenizedLM(blocks, [1] * len(blocks), pad_id)


# ----------------------------------------------------------------------------- batches
class TokenizedLM(torch.utils.data.Dataset):
    """Token rows; tokens ids[i][starts[i]:] count, each predicted from the tokens before it."""

    def __init__(self, ids: list[list[int]], starts: list[int], pad_id: int):
        if len(ids) != len(starts) or any(not 1 <= s < len(r) for r, s in zip(ids, starts)):
            raise ValueError("TokenizedLM: every row needs a start in 1..len(row) - 1, one per row")
        self.ids, self.starts, self.pad_id = ids, starts, pad_id

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int):
        return self.__getitems__([i])

    def __getitems__(self, indices: list[int]):
        input_ids, attention_mask = pad_rows([self.ids[i] for i in indices], self.pad_id)
        target_mask = torch.zeros(input_ids.shape, dtype=torch.bool)
        for b, i in enumerate(indices):
            target_mask[b, self.starts[i] - 1 : len(self.ids[i]) - 1] = True
        y = input_ids[:, 1:][target_mask[:, :-1]]  # the next token of every counted position, row-major
        return {"input_ids": input_ids, "attention_mask": attention_mask, "target_mask": target_mask}, y

    def row_counts(self) -> np.ndarray:
        """Counted tokens per row (what a teacher cache stores per example)."""
        return np.array([len(r) - s for r, s in zip(self.ids, self.starts)], dtype=np.int64)

    def lengths(self) -> np.ndarray:
        """Tokens per row, padding excluded (for batches of similar lengths)."""
        return np.array([len(r) for r in self.ids], dtype=np.int64)

    def prompt(self, i: int) -> list[int]:
        """The tokens of row i that do not count (its start token and prompt)."""
        return self.ids[i][: self.starts[i]]

    def sha256(self) -> str:
        h = hashlib.sha256(f"lm rows {len(self)} pad {self.pad_id}\n".encode())
        h.update(self.lengths().tobytes())
        h.update(np.asarray(self.starts, dtype=np.int64).tobytes())
        h.update(np.concatenate([np.asarray(r, dtype=np.int64) for r in self.ids] or [np.zeros(0, np.int64)]).tobytes())
        return h.hexdigest()

    def subset(self, indices) -> "TokenizedLM":
        indices = [int(i) for i in indices]
        return TokenizedLM([self.ids[i] for i in indices], [self.starts[i] for i in indices], self.pad_id)

    def labelled(self) -> np.ndarray:
        return np.ones(len(self), dtype=bool)
