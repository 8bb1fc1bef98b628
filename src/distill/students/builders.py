"""Build a model from its recipe config; the config is stored with the weights so `distill eval` can rebuild it.

`mlp` and `cnn` take images and tables (built here); `hf`, `hf-shrink`, `bilstm` and `textcnn` take text and are
built by the text tasks (distill.tasks.text), which know the tokenizer and the teacher.
"""

from typing import Annotated, Union

from pydantic import Field, TypeAdapter
from torch import nn

from distill.errors import UserError
from distill.students.bilstm import BiLSTMConfig
from distill.students.causal_lm import CausalLMConfig
from distill.students.cnn import CNN, CNNConfig
from distill.students.hf import HFConfig
from distill.students.hf_shrink import HFShrinkConfig
from distill.students.imported import ImportConfig, build_imported
from distill.students.mlp import MLP, MLPConfig
from distill.students.seq2seq import Seq2SeqConfig
from distill.students.textcnn import TextCNNConfig

ModelConfig = Annotated[Union[MLPConfig, CNNConfig, HFConfig, HFShrinkConfig, BiLSTMConfig, TextCNNConfig, ImportConfig,
                                     Seq2SeqConfig, CausalLMConfig],
                        Field(discriminator="kind")]
model_config_adapter = TypeAdapter(ModelConfig)
_BUILDERS = {"mlp": MLP, "cnn": CNN}
TEXT_KINDS = ("hf", "hf-shrink", "bilstm", "textcnn", "seq2seq", "causal-lm")


def build_model(config, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """The model a config describes, tagged with that description (`distill_config`) so it can be saved and rebuilt."""
    if config.kind == "import":
        model = build_imported(config, input_shape, num_classes)
    elif config.kind not in _BUILDERS:
        raise UserError(f"model.kind {config.kind} is for text data sets (imdb, text, conll, en-es, parallel, imdb-lm, lm); for images and tables "
                        "use mlp or cnn")
    else:
        model = _BUILDERS[config.kind](config, tuple(input_shape), num_classes)
    model.distill_config = {"model": config.model_dump(mode="json"), "input_shape": list(input_shape) if input_shape is not None else None,
                            "num_classes": num_classes}
    return model
