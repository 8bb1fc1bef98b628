"""What text classification and tagging share: the teacher's tokenizer, model kinds for text, saving and loading.

Models: `hf` (a transformers model), `hf-shrink` (fewer layers / narrower, from the teacher), `bilstm` and
`textcnn` (small students on the teacher's tokenizer, embeddings optionally from the teacher's). Every model of
a text task takes the same tokenized batch, so teacher and student must share the tokenizer (checked).

A trained model is saved as a folder: transformers models with save_pretrained (safetensors), the others as
model.safetensors; the tokenizer beside it, and distill.json describing task, labels, data and model, so
`distill eval FOLDER` and `--teacher FOLDER` rebuild it (and `from_pretrained(FOLDER)` loads an HF student anywhere).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from distill.checkpoint import built_to_fit, load_model_file, load_weights, save_model
from distill.durable import atomic_write_text, check_sealed, checked_json, read_checked_json, seal, writing
from distill.errors import UserError
from distill.tasks.base import Task
from distill.tasks.classification import data_record

RECORD = "distill.json"


class TextTask(Task):
    token_level = False
    inference_batch = 64  # padded sequences: a transformer's attention grows with batch x length²
    folder_kinds: tuple[str, ...] = ("hf", "hf-shrink")  # model kinds saved as transformers folders (save_pretrained)
    pad_from_eos = False  # a tokenizer without a padding token pads with its eos token (decoder-only LMs: GPT-2's)

    def __init__(self, recipe, teacher_checkpoint: str | None = None):
        import transformers

        transformers.utils.logging.disable_progress_bar()  # per-file load/save bars would drown distill's own
        self.recipe = recipe
        self.teacher_checkpoint = teacher_checkpoint
        self._tokenizer = None
        self._saved_vocab: int | None = None  # embedding rows of a small model being loaded (see load_model)

    # ------------------------------------------------------------------ tokenizer
    def tokenizer_path(self) -> str:
        r = self.recipe
        if r.data.tokenizer:
            return r.data.tokenizer
        if self.teacher_checkpoint:
            return self.teacher_checkpoint
        if getattr(r.teacher.model, "kind", None) == "hf":
            return r.teacher.model.path
        raise UserError("a text task needs the teacher's tokenizer: use an hf teacher (teacher.model: {kind: hf, path: ...}) "
                        "or set data.tokenizer to a folder or hub id holding one")

    @property
    def tokenizer(self):
        if self._tokenizer is None:
            from distill.students.hf import load_tokenizer

            self._tokenizer = load_tokenizer(self.tokenizer_path(), pad_from_eos=self.pad_from_eos)
        return self._tokenizer

    def teacher_brings_tokenizer(self) -> bool:
        """Whether the tokenizer comes from data.tokenizer or the teacher (else a task may train one on its data)."""
        r = self.recipe
        return bool(r.data.tokenizer or self.teacher_checkpoint or getattr(r.teacher.model, "kind", None) == "hf")

    def teacher_label_names(self) -> list[str] | None:
        """The label order of a teacher fine-tuned with named labels (the data is mapped to it), else None."""
        from distill.students.hf import check_head, load_config

        source = self.teacher_checkpoint or (self.recipe.teacher.model.path if getattr(self.recipe.teacher.model, "kind", None) == "hf" else None)
        if not source:
            return None
        if (Path(source) / RECORD).is_file():
            return list(read_record(source)["class_names"])  # a model saved by distill: its label order
        config = load_config(source)
        names = [config.id2label[i] for i in sorted(config.id2label)] if getattr(config, "id2label", None) else []
        return check_head(config, names, source) if names else None

    # ------------------------------------------------------------------ models
    def build_model(self, model_cfg, data, teacher: nn.Module | None = None) -> nn.Module:
        kind = model_cfg.kind
        if kind == "hf":
            from distill.students.hf import load_hf

            model = load_hf(model_cfg, token_level=self.token_level, class_names=data.class_names)
            self.check_tokenizer(model_cfg.path, model)
            return model
        if kind == "hf-shrink":
            from distill.students.hf import HFModel

            return HFModel(self.shrunk(teacher, HFModel, model_cfg), self.token_level)
        if kind in ("bilstm", "textcnn"):
            return self._small_model(model_cfg, data, teacher)
        raise UserError(f"model.kind {kind} takes images or tables; for text use hf, hf-shrink, bilstm or textcnn")

    @staticmethod
    def shrunk(teacher: nn.Module | None, wrapper: type, model_cfg) -> nn.Module:
        """The transformers model of an hf-shrink student, cut from the teacher's (a `wrapper` of this task)."""
        from distill.students.hf_shrink import shrink

        if not isinstance(teacher, wrapper):
            raise UserError("model.kind hf-shrink builds the student from the teacher's layers: the teacher must be a "
                            "transformers model (teacher.model.kind: hf, or a model trained by distill)")
        hf, report = shrink(teacher.hf, model_cfg)
        print(f"hf-shrink: {report['params'] / 1e6:.2f}M parameters ({report['params'] * 4 / 1e6:.1f} MB fp32) "
              f"from the teacher's {report['teacher_params'] / 1e6:.2f}M, layers {report['kept_layers']}, "
              f"{'initialised from the teacher' if report['initialised_from_teacher'] else 'randomly initialised'}")
        return hf

    def _small_model(self, model_cfg, data, teacher) -> nn.Module:
        from distill.students.bilstm import BiLSTMText
        from distill.students.textcnn import TextCNN

        embeddings, vocab = None, len(self.tokenizer)
        if teacher is not None and hasattr(teacher, "hf"):  # HF models often round their embedding rows up
            embeddings = teacher.hf.get_input_embeddings().weight.detach()
            vocab = embeddings.shape[0]
        embeddings = embeddings if model_cfg.init_embeddings else None
        vocab = self._saved_vocab or vocab  # a saved model is rebuilt with the rows it was trained with
        cls = BiLSTMText if model_cfg.kind == "bilstm" else TextCNN
        return cls(model_cfg, vocab_size=vocab, num_classes=data.num_classes,
                   pad_id=self.tokenizer.pad_token_id, token_level=self.token_level, teacher_embeddings=embeddings)

    def check_tokenizer(self, path: str, model: nn.Module) -> None:
        """Teacher and students read the same token ids: a model with another vocabulary is refused."""
        from distill.students.hf import load_tokenizer

        rows = model.hf.get_input_embeddings().weight.shape[0]
        if rows < len(self.tokenizer):
            raise UserError(f"model {path} has {rows} token embeddings but the tokenizer ({self.tokenizer_path()}) has "
                            f"{len(self.tokenizer)} tokens: teacher and student must share one tokenizer and vocabulary")
        from distill.students.hf import resolve_model_path

        folder = Path(resolve_model_path(path))
        if folder.resolve() != Path(resolve_model_path(self.tokenizer_path())).resolve() and (folder / "tokenizer_config.json").exists():
            own = load_tokenizer(path)
            if own.get_vocab() != self.tokenizer.get_vocab():
                raise UserError(f"model {path} has its own tokenizer, different from the teacher's ({self.tokenizer_path()}): "
                                "teacher and student must share one tokenizer; distil into a student built on the teacher's")

    def check_compatible(self, teacher: nn.Module, student: nn.Module, data) -> None:
        inputs, _ = data.train.__getitems__([0, 1] if len(data.train) > 1 else [0])
        with torch.inference_mode():
            t, s = teacher.eval()(inputs), student.eval()(inputs)
        teacher.train(), student.train()
        if t.shape != s.shape:
            raise UserError(f"teacher outputs shape {tuple(t.shape)} but student outputs {tuple(s.shape)}: both must "
                            f"predict the same {data.num_classes} labels at the same positions")

    def record(self, model_cfg, data) -> dict:
        kind = model_cfg.kind
        model = {"kind": "hf", "path": "."} if kind in self.folder_kinds else model_cfg.model_dump(mode="json")
        return {"task": self.name, "model": model, "class_names": list(data.class_names),
                "data": data_record(self.recipe.data), "transfer": self.recipe.transfer.model_dump(mode="json"),
                "seed": self.recipe.seed}

    def saved_name(self, role: str) -> str:
        return role  # a folder: save_pretrained + tokenizer + distill.json

    def load_trained(self, model: nn.Module, folder: Path) -> nn.Module:
        """The weights a finished stage saved in `folder`, into a model like `model` (resuming a run)."""
        from distill.students.hf import HFModel

        if isinstance(model, HFModel):
            return HFModel(type(model.hf).from_pretrained(folder), self.token_level)
        load_weights(model, load_model_file(Path(folder) / "model.safetensors")[0], source=str(folder))
        return model

    def save_model(self, model: nn.Module, folder: Path, record: dict) -> None:
        """`folder` is written as folder.tmp and renamed, so it is whole or absent."""
        import shutil

        tmp = folder.with_name(folder.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        with writing(folder):  # a full disk: one line, and the folder is as it was
            try:
                tmp.mkdir(parents=True)
                if hasattr(model, "hf"):
                    model.hf.save_pretrained(tmp, safe_serialization=True)
                else:
                    record = {**record, "vocab_size": model.embedding.num_embeddings}
                    save_model(tmp / "model.safetensors", model, record)
                self.tokenizer.save_pretrained(tmp)
                atomic_write_text(tmp / RECORD, checked_json(record, indent=1))
                seal(tmp)  # SHA256SUMS of every file, checked by read_record and when a run resumes
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise
            shutil.rmtree(folder, ignore_errors=True)
            tmp.rename(folder)

    def load_model(self, folder: str, data) -> nn.Module:
        """A model saved by save_model (or a plain transformers folder) with this run's labels."""
        from distill.students import model_config_adapter
        from distill.students.hf import HFConfig

        path = Path(folder)
        if not (path / RECORD).is_file():
            return self.build_model(HFConfig(path=folder), data)  # a plain transformers folder
        record = read_record(folder)
        if record.get("task") != self.name:
            raise UserError(f"{folder} is a {record.get('task')} model but this recipe is a {self.name} task: "
                            "use a model trained for this task")
        if record.get("class_names") != list(data.class_names):
            raise UserError(f"{folder} predicts labels {record.get('class_names')} but the data has {list(data.class_names)}: "
                            "use a model trained on these labels")
        from distill.tasks.classification import check_same_split

        check_same_split(record.get("data") or {}, self.recipe.data.model_dump(mode="json"), folder)
        config = model_config_adapter.validate_python(record["model"])
        if config.kind == "hf":
            return self.build_model(HFConfig(path=folder), data)
        self._saved_vocab = record.get("vocab_size")  # the teacher's embedding rows may exceed the tokenizer's
        try:
            # sizes come from distill.json: checked against the weights' shapes before anything is allocated
            model = built_to_fit(lambda: self.build_model(config, data), path / "model.safetensors", str(path))
        finally:
            self._saved_vocab = None
        load_weights(model, load_model_file(path / "model.safetensors")[0], source=str(path))
        return model

    def latency_inputs(self, data, batch_size: int):
        """The test row nearest the median length, repeated: a typical sentence or review."""
        lengths = [len(r) for r in data.test.ids]
        typical = sorted(range(len(lengths)), key=lambda i: lengths[i])[len(lengths) // 2]
        inputs, _ = data.test.__getitems__([typical] * batch_size)
        return inputs

    def supervised_rows(self, rows):
        """Only the labelled rows: an unlabelled review or sentence teaches nothing without a teacher, and running
        the models over it (the teacher's fine-tuning, above all) would cost as much as a labelled one."""
        import numpy as np

        return rows.subset(np.flatnonzero(rows.labelled()))


def read_record(folder) -> dict:
    """The distill.json of a text model folder: task, labels, data and model description."""
    path = Path(folder) / RECORD
    if not path.is_file():
        raise UserError(f"{folder} has no {RECORD}: it was not written by distill; give a run's model folder "
                        "(runs/NAME/student) or a .safetensors file")
    fix = "save or copy the model again (for a run: rerun it)"
    check_sealed(folder, fix)
    record = read_checked_json(path, fix, required=False)  # (folders saved before it carry no sha256)
    if "task" not in record or "model" not in record:
        raise UserError(f"{path} does not describe a distill model (no task or model): re-save it with distill")
    return record
