"""Decoder-only language models (Hugging Face GPT-2 or Llama built from a config, or any pretrained causal LM),
wrapped so that a model gives the logits of the counted positions: `[N, V]` rows in the order of the batch's y
(position t predicts token t + 1, see distill.data.lm_text), V being the shared tokenizer's size even when the
embedding matrix has more rows (models often round it up, e.g. GPT-2's 50,257 tokens in 50,304 rows).

Only the counted positions go through the output layer: a prompt's and padding's logits are never computed.
`counted_hidden` and `output_projection` give the two factors of those logits, for losses that compute them in
chunks themselves.
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from distill.errors import UserError


class CausalLMConfig(BaseModel):
    """A decoder-only transformer trained from scratch: GPT-2 (learnt positions, GELU MLP, LayerNorm) or Llama
    (rotary positions, SwiGLU MLP, RMSNorm); input and output embeddings tied in both."""

    model_config = ConfigDict(extra="forbid")
    kind: Literal["causal-lm"] = "causal-lm"
    arch: Literal["gpt2", "llama"] = "gpt2"
    layers: int = Field(4, ge=1)
    d_model: int = Field(256, ge=8, description="width of embeddings and hidden states")
    heads: int = Field(4, ge=1, description="attention heads")
    ffn_dim: int = Field(1024, ge=8, description="width of the feed-forward layers")
    max_positions: int = Field(512, ge=8, description="longest sequence in tokens, prompt and generated tokens included")
    dropout: float = Field(0.1, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _heads_divide(self):
        if self.d_model % self.heads:
            raise ValueError(f"d_model {self.d_model} must be a multiple of heads {self.heads}")
        return self


def build_causal_lm(config: CausalLMConfig, vocab_size: int, *, bos_id: int, eos_id: int, pad_id: int) -> "CausalLM":
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    ids = {"bos_token_id": bos_id, "eos_token_id": eos_id, "pad_token_id": pad_id}
    if config.arch == "gpt2":
        hf = GPT2LMHeadModel(GPT2Config(
            vocab_size=vocab_size, n_positions=config.max_positions, n_embd=config.d_model, n_layer=config.layers,
            n_head=config.heads, n_inner=config.ffn_dim, resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, activation_function="gelu_pytorch_tanh", **ids))
    else:
        hf = LlamaForCausalLM(LlamaConfig(
            vocab_size=vocab_size, hidden_size=config.d_model, intermediate_size=config.ffn_dim,
            num_hidden_layers=config.layers, num_attention_heads=config.heads, num_key_value_heads=config.heads,
            max_position_embeddings=config.max_positions, attention_dropout=config.dropout, tie_word_embeddings=True,
            **ids))
    return CausalLM(hf, vocab_size, eos_id=eos_id, pad_id=pad_id)


class CausalLM(nn.Module):
    """`forward(inputs)`: logits at inputs["target_mask"], [N, vocab_size], row-major (the batch's y)."""

    def __init__(self, hf_model: nn.Module, vocab_size: int, *, eos_id: int, pad_id: int):
        super().__init__()
        rows = hf_model.get_input_embeddings().weight.shape[0]
        if rows < vocab_size:
            raise UserError(f"the model has {rows} token embeddings but the tokenizer has {vocab_size} tokens: "
                            "teacher and student must share one tokenizer and vocabulary")
        self.hf, self.vocab_size, self.eos_id, self.pad_id = hf_model, vocab_size, eos_id, pad_id
        self.plain_head = _plain_head(hf_model)  # logits = output layer (last hidden state), checked on the model

    @property
    def embedding_rows(self) -> int:
        return self.hf.get_input_embeddings().weight.shape[0]

    @property
    def max_positions(self) -> int | None:
        return getattr(self.hf.config, "max_position_embeddings", None)

    def forward(self, inputs: dict[str, torch.Tensor], *, hidden: bool = False, **hf_kwargs):
        """Logits [N, V] at the counted positions; with transformers keyword arguments (output_hidden_states=True,
        for the layer methods), (those logits, the model's whole output); hidden=True: counted_hidden(inputs)
        (so the fused divergence can go through a DDP wrapper's forward, which synchronises the gradients)."""
        if hidden:
            return self.counted_hidden(inputs)
        if hf_kwargs or not self.plain_head:  # (or a head that scales or caps logits): the model's own logits
            out = self.hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **hf_kwargs)
            logits = out.logits[inputs["target_mask"]][:, : self.vocab_size]
            return (logits, out) if hf_kwargs else logits
        weight, bias = self.output_projection()
        return nn.functional.linear(self.counted_hidden(inputs), weight, bias)

    def counted_hidden(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        """Final hidden states at the counted positions, [N, d] in the order of y."""
        hidden = self.hf.base_model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).last_hidden_state
        return hidden[inputs["target_mask"]]

    def output_projection(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(weight [V, d], bias [V] or None) of the output layer, cut to the tokenizer's V tokens: logits =
        counted_hidden @ weight.T + bias. Refused for a model whose head does more than that."""
        if not self.plain_head:
            raise UserError(f"the {self.hf.config.model_type} model's logits are not a linear map of its last hidden "
                            "state (it scales or caps them): use a divergence computed from logits, not from hidden states")
        head = self.hf.get_output_embeddings()
        bias = head.bias[: self.vocab_size] if getattr(head, "bias", None) is not None else None
        return head.weight[: self.vocab_size], bias

    @torch.no_grad()  # (not inference_mode: on-policy training feeds the samples back into a forward with gradients)
    def generate(self, inputs: dict[str, torch.Tensor], *, max_new_tokens: int, do_sample: bool = False,
                 temperature: float = 1.0, min_new_tokens: int = 0, num_beams: int = 1,
                 num_return_sequences: int = 1) -> list[torch.Tensor]:
        """The new tokens after each row's prompt (inputs' input_ids at attention_mask; padding on either side),
        up to and including the first </s>: HF generate, greedy, beam search (num_beams) or sampling from
        softmax(logits / temperature) (no top-k / top-p cut); num_return_sequences k gives k per row, row after row
        (of a beam, best first). Padding and tokens outside the tokenizer's vocabulary are never produced."""
        rows = [ids[mask.bool()] for ids, mask in zip(inputs["input_ids"], inputs["attention_mask"])]
        longest = max(len(r) for r in rows)
        if self.max_positions and longest + max_new_tokens > self.max_positions:
            raise UserError(f"generating {max_new_tokens} tokens after a {longest}-token prompt exceeds the model's "
                            f"{self.max_positions} positions: shorten the prompts or generate fewer tokens")
        device = inputs["input_ids"].device
        input_ids = torch.full((len(rows), longest), self.pad_id, dtype=torch.long, device=device)
        attention_mask = torch.zeros_like(input_ids)
        for b, r in enumerate(rows):  # left padding: every row's next token is written at the same position
            input_ids[b, longest - len(r):], attention_mask[b, longest - len(r):] = r, 1
        # never padding (no text is trained to continue with it) nor rows beyond the tokenizer
        never = [self.pad_id] * (self.pad_id != self.eos_id) + list(range(self.vocab_size, self.embedding_rows))
        sampling = {"temperature": temperature, "top_k": 0, "top_p": 1.0} if do_sample else {}
        was_training = self.training
        self.eval()
        try:
            out = self.hf.generate(input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens,
                                   min_new_tokens=min_new_tokens, do_sample=do_sample, num_beams=num_beams,
                                   num_return_sequences=num_return_sequences, eos_token_id=self.eos_id,
                                   pad_token_id=self.eos_id, suppress_tokens=never or None, **sampling)
        finally:
            self.train(was_training)
        return [_through_eos(row, self.eos_id) for row in out[:, longest:]]  # (finished rows were filled with </s>)


    def sample_completions(self, inputs: dict[str, torch.Tensor], *, max_new_tokens: int,
                           temperature: float = 1.0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """GKD's on-policy batch: each row's prompt (its tokens before the first counted one; for plain text the
        start token alone) continued by this model's own samples (at most max_new_tokens, within its positions,
        through </s>), as (inputs, y) whose counted positions are exactly the generated tokens."""
        from distill.data.lm_text import TokenizedLM

        first = inputs["target_mask"].int().argmax(1)  # the position that predicts each row's first counted token
        prompts = [row[: int(f) + 1].tolist() for row, f in zip(inputs["input_ids"], first)]
        room = (self.max_positions or 1 << 30) - max(map(len, prompts))
        prompt_batch = {"input_ids": inputs["input_ids"], "attention_mask": torch.zeros_like(inputs["attention_mask"])}
        for b, p in enumerate(prompts):
            prompt_batch["attention_mask"][b, : len(p)] = 1
        new = self.generate(prompt_batch, max_new_tokens=min(max_new_tokens, room), do_sample=True, temperature=temperature)
        rows = TokenizedLM([p + n.tolist() for p, n in zip(prompts, new)], [len(p) for p in prompts], self.pad_id)
        sampled, y = rows.__getitems__(list(range(len(rows))))
        device = inputs["input_ids"].device
        return {k: v.to(device) for k, v in sampled.items()}, y.to(device)


def _through_eos(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    ends = (tokens == eos_id).nonzero()
    return tokens[: int(ends[0]) + 1] if len(ends) else tokens


@torch.no_grad()
def _plain_head(hf_model: nn.Module) -> bool:
    """Whether the model's logits are its output layer applied to its base model's last hidden state (GPT-2,
    Llama and most causal LMs; not those that scale or soft-cap logits): checked on two tokens."""
    head = hf_model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or any(p.is_meta for p in hf_model.parameters()):
        return False
    was_training = hf_model.training
    hf_model.eval()
    try:
        device = head.weight.device
        ids = torch.zeros((1, 2), dtype=torch.long, device=device)
        mask = torch.ones_like(ids)
        hidden = hf_model.base_model(input_ids=ids, attention_mask=mask).last_hidden_state
        return torch.allclose(head(hidden), hf_model(input_ids=ids, attention_mask=mask).logits, rtol=1e-4, atol=1e-5)
    finally:
        hf_model.train(was_training)


def load_causal_lm(path: str, vocab_size: int, *, eos_id: int, pad_id: int, trust_remote_code: bool = False) -> CausalLM:
    """A pretrained causal LM from a folder written by save_pretrained or a hub id (offline when HF_HUB_OFFLINE=1)."""
    from transformers import AutoModelForCausalLM

    from distill.students.hf import resolve_model_path

    # RuntimeError: a config.json whose sizes differ from the weights' (transformers builds on the meta device)
    try:
        hf = AutoModelForCausalLM.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model {path} is not a causal language model transformers can load "
                        f"({str(e).splitlines()[0][:150]}): give a folder written by save_pretrained or a hub id") from None
    return CausalLM(hf, vocab_size, eos_id=eos_id, pad_id=pad_id)
