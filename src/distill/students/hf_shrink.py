"""A smaller transformer student cut from a Hugging Face teacher (DistilBERT, Sanh et al. 2019; TinyBERT style):
an encoder (BERT-like classifiers and taggers) or a decoder-only language model (GPT-2, Llama).

The student is the teacher's own class built from a copy of its config with fewer layers (and optionally narrower
widths), so it keeps the tokenizer, labels and task head and saves/loads with save_pretrained/from_pretrained.
With the teacher's widths it starts from the teacher's weights: DistilBERT's ablation (its table 4) lost about
3 GLUE points when the student started from random weights instead of a subset of the teacher's layers.
"""

import copy
from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt
from torch import nn

from distill.errors import UserError

if TYPE_CHECKING:  # transformers is needed only by whoever passes a teacher
    from transformers import PreTrainedModel

# config attribute names for the feed-forward width; the other sizes go through the config's attribute_map
# (GPT-2's n_inner may be None: 4 x hidden_size, which then follows the student's width)
_FFN_NAMES = ("intermediate_size", "hidden_dim", "ffn_dim", "n_inner")
# widths some configs keep apart from hidden_size (DeBERTa's pooler, ELECTRA's embeddings): when the teacher's
# equals its hidden_size it follows the student's; otherwise (ELECTRA-small's 128) it stays as the teacher's
_TIED_WIDTHS = ("pooler_hidden_size", "embedding_size")


class HFShrinkConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hf-shrink"] = "hf-shrink"
    layers: list[NonNegativeInt] | None = Field(None, min_length=1, description="teacher layers to keep, 0-based, increasing")
    num_layers: PositiveInt | None = Field(None, description="keep this many layers, spread as in select_layers")
    hidden_size: PositiveInt | None = Field(None, description="None = the teacher's")
    num_heads: PositiveInt | None = Field(None, description="None = the teacher's")
    intermediate_size: PositiveInt | None = Field(None, description="feed-forward width; None = the teacher's")
    init_from_teacher: bool = Field(True, description="copy the teacher's weights when the widths allow it")


def select_layers(teacher_layers: int, keep: int) -> list[int]:
    """round(linspace(0, n-1, keep)), rounding halves up: the first and last layer and evenly spaced ones between.
    For 12 -> 6 this is [0, 2, 4, 7, 9, 11], the layers Hugging Face's extract_distilbert.py copied into the
    released DistilBERT (the paper's "one out of two"); 4 -> 2 gives [0, 3]. Keeping 1 layer keeps layer 0."""
    if keep == 1:
        return [0]
    return [(2 * i * (teacher_layers - 1) + keep - 1) // (2 * (keep - 1)) for i in range(keep)]


def find_layer_list(model: nn.Module, num_layers: int) -> tuple[str, nn.ModuleList]:
    """The transformer's layer list: the one nn.ModuleList whose length is the config's number of hidden layers."""
    found = [(name, m) for name, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) == num_layers]
    what = f"the {model.config.model_type} teacher ({type(model).__name__})"
    if not found:
        raise UserError(f"hf-shrink: found no list of {num_layers} layers (num_hidden_layers) in {what}: hf-shrink "
                        "needs one nn.ModuleList of transformer layers, as BERT, RoBERTa, DistilBERT, ELECTRA, GPT-2 and Llama have")
    if len(found) > 1:
        raise UserError(f"hf-shrink: {what} has {len(found)} lists of {num_layers} modules "
                        f"({', '.join(n for n, _ in found)}), so its layers are ambiguous; use a BERT-like encoder or a GPT-2 / "
                        "Llama-like decoder")
    return found[0]


def _kept_layers(cfg: HFShrinkConfig, n: int) -> list[int]:
    if cfg.layers is not None and cfg.num_layers is not None:
        raise UserError("hf-shrink: set layers or num_layers, not both (neither keeps half the teacher's layers)")
    if cfg.layers is not None:
        for t in cfg.layers:
            if t >= n:
                raise UserError(f"hf-shrink.layers: teacher layer {t} does not exist: the teacher has {n} layers (0..{n - 1})")
        if cfg.layers != sorted(set(cfg.layers)):
            raise UserError(f"hf-shrink.layers: {cfg.layers} must be increasing without repeats, e.g. {sorted(set(cfg.layers))}")
        return list(cfg.layers)
    keep = cfg.num_layers if cfg.num_layers is not None else (n + 1) // 2
    if keep > n:
        raise UserError(f"hf-shrink.num_layers: {keep} is more than the teacher's {n} layers: choose 1..{n}")
    return select_layers(n, keep)


def shrink(teacher: "PreTrainedModel", cfg: HFShrinkConfig) -> tuple["PreTrainedModel", dict]:
    """(student, report): the teacher's class with the kept layers and the new widths.

    Teacher layer kept[i] becomes student layer i. With the teacher's hidden and feed-forward widths (and
    init_from_teacher) every tensor is copied: embeddings, kept layers, and all outside the layer list (pooler,
    classifier). A different head count alone still copies: Q, K and V are the same hidden x hidden matrices,
    only split into heads differently. Other widths leave nothing copyable: the config's random init."""
    config = teacher.config
    n = config.num_hidden_layers
    kept = _kept_layers(cfg, n)
    list_name, _ = find_layer_list(teacher, n)
    ffn = next((name for name in _FFN_NAMES if isinstance(getattr(config, name, None), int)),
               "n_inner" if hasattr(config, "n_inner") else None)
    if cfg.intermediate_size is not None and ffn is None:
        raise UserError(f"hf-shrink.intermediate_size: the {config.model_type} config has none of {', '.join(_FFN_NAMES)}; "
                        "leave intermediate_size unset")
    hidden = cfg.hidden_size or config.hidden_size
    heads = cfg.num_heads or config.num_attention_heads
    if hidden % heads:
        field = "hidden_size" if cfg.hidden_size else "num_heads"
        raise UserError(f"hf-shrink.{field}: hidden_size {hidden} is not divisible by num_heads {heads}: "
                        "choose a num_heads that divides hidden_size")

    student_config = copy.deepcopy(config)
    student_config.num_hidden_layers = len(kept)  # attribute_map turns these into e.g. DistilBERT's n_layers, dim
    student_config.hidden_size = hidden
    for name in _TIED_WIDTHS:
        if getattr(config, name, None) == config.hidden_size:
            setattr(student_config, name, hidden)
    student_config.num_attention_heads = heads
    _follow_heads(config, student_config, hidden, heads)
    if ffn is not None and cfg.intermediate_size is not None:
        setattr(student_config, ffn, cfg.intermediate_size)
    if isinstance(getattr(config, "layer_types", None), list) and len(config.layer_types) == n:
        student_config.layer_types = [config.layer_types[t] for t in kept]
    student = type(teacher)(student_config).to(dtype=teacher.dtype)
    student.train(teacher.training)

    changed = [f"{name} {getattr(config, name)} -> {getattr(student_config, name)}" for name in ("hidden_size", ffn)
               if name and getattr(config, name) != getattr(student_config, name)]
    copied = 0
    if not cfg.init_from_teacher:
        note = "random initialisation (init_from_teacher is false)"
    elif changed:
        note = (f"widths differ from the teacher's ({', '.join(changed)}): no teacher tensor fits as it is, "
                "so the student starts from the config's random initialisation")
    else:
        state = _renamed_state(teacher.state_dict(), list_name, kept)
        target = student.state_dict()
        bad = sorted(set(state) ^ set(target)) or [k for k in state if state[k].shape != target[k].shape]
        if bad:  # e.g. ModernBERT's layer 0 has no attention norm, so no other layer can take its place
            raise UserError(f"hf-shrink.layers: the {config.model_type} teacher's layers {kept} do not fit the student's "
                            f"positions 0..{len(kept) - 1} ({bad[0]} differs): choose other layers or set init_from_teacher: false")
        student.load_state_dict(state, strict=True)
        copied = len(state)
        note = f"copied the embeddings, teacher layers {kept} and everything outside the layer list from the teacher"
        if heads != config.num_attention_heads:
            note += (f"; num_heads {config.num_attention_heads} -> {heads} only changes how Q/K/V split into heads, so "
                     "copying is valid, but the copied layers attend differently from the teacher's")
    report = {"kept_layers": kept, "initialised_from_teacher": copied > 0, "params": _count(student),
              "teacher_params": _count(teacher), "copied_tensors": copied, "note": note}
    return student, report


def _follow_heads(config, student_config, hidden: int, heads: int) -> None:
    """Decoder configs that also name the width of a head and the number of key/value heads (Llama's head_dim,
    num_key_value_heads): where the teacher's follow from its width and heads, the student's follow its own."""
    if getattr(config, "head_dim", None) == config.hidden_size // config.num_attention_heads:
        student_config.head_dim = hidden // heads
    kv = getattr(config, "num_key_value_heads", None)
    if kv == config.num_attention_heads:
        student_config.num_key_value_heads = heads
    elif kv is not None and heads % kv:
        raise UserError(f"hf-shrink.num_heads: {heads} heads cannot share the teacher's {kv} key/value heads: "
                        f"choose a multiple of {kv}")


def _renamed_state(state: dict, list_name: str, kept: list[int]) -> dict:
    """The teacher's state_dict with layer kept[i] renamed to layer i and the dropped layers left out."""
    prefix = list_name + "."
    new_index = {str(t): str(i) for i, t in enumerate(kept)}
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            out[key] = value
            continue
        index, _, rest = key[len(prefix):].partition(".")
        if index in new_index:
            out[f"{prefix}{new_index[index]}.{rest}"] = value
    return out


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
