"""The recipe: one YAML file describes a whole experiment. Pydantic checks it; errors come out as one line.

Only data is read from YAML (yaml.safe_load): nothing in a recipe is imported or executed.
"""

import difflib
import math
from importlib import resources
from pathlib import Path
from typing import Any, Literal, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from distill.data import DATASETS, LM_DATASETS, TEXT_DATASETS
from distill.errors import UserError
from distill.methods import MethodConfigUnion
from distill.methods.kd import KDConfig
from distill.students import ModelConfig
from distill.students.mlp import MLPConfig
from distill.tracking import TRACKERS


class _Strict(BaseModel):
    # no inf / nan in any number (also through the API's TrainConfig): an infinite learning rate fails only in training
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


PACKED_TARGETS = ("data.targets (sequence-level KD) continues each row's prompt, and packed blocks have none: set "
                  "data.pack: false (each document's first tokens are then its prompt and the teacher writes the rest)")


class DataConfig(_Strict):
    dataset: Literal[DATASETS] = "digits"  # type: ignore[valid-type]
    path: str | None = Field(None, description="file (table) or folder (image-folder, or where MNIST files are)")
    data_dir: str | None = Field(None, description="folder of downloaded data sets (default: $DISTILL_DATA_DIR)")
    label_column: str = "label"
    feature_columns: list[str] | None = None
    image_size: tuple[int, int] = (28, 28)
    grayscale: bool = True
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    test_fraction: float = Field(0.2, gt=0.0, lt=1.0, description="held-out test share for sets without a test split")
    unlabelled_fraction: float = Field(0.0, ge=0.0, lt=1.0, description="hide labels of this share of train rows")
    split_seed: int = Field(0, description="seed of the train/val/test split; kept apart from the training seed so "
                                           "runs with different seeds share one test set")
    download: bool = True
    # text data sets (imdb, text, conll)
    text_column: str = Field("text", description="text: the column holding the texts")
    max_length: int = Field(128, ge=8, description="text: tokens per row after the teacher's tokenizer (longer rows are cut)")
    tokenizer: str | None = Field(None, description="text: tokenizer folder or hub id (default: the teacher's)")
    train_rows: int | None = Field(None, ge=1, description="text: at most this many training rows (a seeded draw)")
    val_rows: int | None = Field(None, ge=1, description="text: at most this many validation rows")
    test_rows: int | None = Field(None, ge=1, description="text: at most this many test rows")
    # translation (en-es, parallel)
    source_column: str | int = Field("source", description="parallel: the source column (a name, or a 0-based number for a TSV without header)")
    target_column: str | int = Field("target", description="parallel: the target column")
    target_path: str | None = Field(None, description="parallel: the target text file aligned line by line with data.path")
    targets: str | None = Field(None, description="translation, language models: a `distill generate` folder, or `auto` "
                                                   "(the teacher's beam search, settings in `generate`, written in the run "
                                                   "after the teacher): the distilled students learn the teacher's "
                                                   "translations or completions (sequence-level KD); scratch keeps the data")
    target_choice: Literal["best", "closest"] = Field("best", description="with targets: the teacher's best hypothesis, or "
                                                      "(translation) of its k best the closest to the reference by sentence BLEU")
    vocab_size: int = Field(8000, ge=300, description="translation, language models: subword vocabulary trained on the training text (when the teacher brings no tokenizer; its 256 bytes come first)")
    unlabelled_rows: int = Field(0, ge=0, description="imdb / text: this many more rows, disjoint from the splits, "
                                                      "with their labels hidden: the distilled student's extra transfer set")
    # language models (imdb-lm, lm)
    format: Literal["auto", "text", "prompt_completion", "chat"] = Field(
        "auto", description="lm: text (documents), prompt_completion (JSONL prompt + completion: only the completion "
                            "counts) or chat (JSONL messages, rendered with the tokenizer's chat template); auto: from the file")
    pack: bool = Field(False, description="imdb-lm / lm plain text: join the documents into blocks of max_length tokens")

    @model_validator(mode="after")
    def _text_fields_on_text(self):
        given = []
        if self.dataset not in TEXT_DATASETS:
            given = [f for f in ("tokenizer", "train_rows", "val_rows", "test_rows") if getattr(self, f) is not None]
            given += ["unlabelled_rows"] if self.unlabelled_rows else []
        if given:
            raise ValueError(f"data.{given[0]} applies to text data sets ({', '.join(TEXT_DATASETS)}), not {self.dataset}: remove it")
        if self.dataset not in ("en-es", "parallel"):
            given = [f for f in ("target_path", "targets") if getattr(self, f) is not None
                     and not (f == "targets" and self.dataset in LM_DATASETS)]
            given += ["target_choice"] if self.target_choice != "best" and self.dataset not in LM_DATASETS else []
            given += [f for f, default in (("source_column", "source"), ("target_column", "target"), ("vocab_size", 8000))
                      if getattr(self, f) != default and not (f == "vocab_size" and self.dataset in LM_DATASETS)]
            if given:
                raise ValueError(f"data.{given[0]} applies to translation data (en-es, parallel), not {self.dataset}: remove it")
        if self.dataset in ("en-es", "parallel") and self.unlabelled_rows:
            raise ValueError("data.unlabelled_rows applies to imdb / text data: translation pairs are all labelled")
        given = [f for f, off in (("format", "auto"), ("pack", False)) if getattr(self, f) != off]
        if self.dataset not in LM_DATASETS and given:
            raise ValueError(f"data.{given[0]} applies to language-model data ({', '.join(LM_DATASETS)}), not {self.dataset}: remove it")
        if self.dataset == "imdb-lm" and self.format not in ("auto", "text"):
            raise ValueError(f"data.format {self.format}: imdb-lm is plain text (the reviews); use data.dataset lm for your own file")
        if self.dataset in LM_DATASETS:
            self._lm_targets()
        if self.dataset in LM_DATASETS and self.unlabelled_rows:
            raise ValueError("data.unlabelled_rows applies to imdb / text data: language-model text has no labels to hide")
        if self.dataset == "conll" and self.unlabelled_rows:
            raise ValueError("data.unlabelled_rows draws extra rows of imdb / text data; for conll hide the labels of "
                             "training sentences with data.unlabelled_fraction")
        return self


    def _lm_targets(self) -> None:
        if self.targets and self.pack:
            raise ValueError(PACKED_TARGETS)
        if self.target_choice == "closest":
            raise ValueError("data.target_choice: closest picks a translation by sentence BLEU against its reference; a "
                             "language model's teacher writes completions: use target_choice best (the default)")


class TrainConfig(_Strict):
    epochs: int | None = Field(None, ge=1, description="passes over the training rows (default: 20, raised until "
                                                        "training takes min_steps steps)")
    min_steps: int | None = Field(None, ge=1, description="train at least this many optimisation steps (epochs are raised "
                                                          "to reach it; default 1000 when epochs is not set, none when it is)")
    batch_size: int = Field(128, ge=1)
    optimizer: Literal["sgd", "adam", "adamw"] = "adam"
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(0.0, ge=0)
    schedule: Literal["constant", "cosine", "linear"] = "cosine"
    warmup_epochs: float = Field(0.0, ge=0, description="linear learning-rate warm-up")
    warmup_steps: int | None = Field(None, ge=0, description="linear learning-rate warm-up in optimiser steps (instead "
                                                             "of warmup_epochs)")
    grad_accum: int = Field(1, ge=1, description="batches per optimiser step (the step's batch is batch_size x "
                                                 "grad_accum rows); losses are normalised by the rows of the whole step")
    max_steps: int | None = Field(None, ge=1, description="train exactly this many optimiser steps (decides the "
                                                          "number of epochs; for long runs such as LLMs)")
    eval_every: int | None = Field(None, ge=1, description="validate (and keep the best weights) every this many "
                                                           "optimiser steps instead of after every epoch")
    save_every: int | None = Field(None, ge=1, description="write the resumable state every this many optimiser "
                                                           "steps too (a kill loses at most these steps)")
    grad_clip: float | None = Field(None, gt=0)
    jitter: int = Field(0, ge=0, description="random translation of images by up to this many pixels")
    patience: int | None = Field(None, ge=1, description="stop after this many validations (epochs, or eval_every "
                                                         "steps) without a better validation score")
    group_by_length: bool = Field(False, description="text: batches of rows of similar length, so padding does not eat "
                                                     "the compute (less random batches: measure on small data)")


class ModelRole(_Strict):
    model: ModelConfig = Field(default_factory=MLPConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)

    @model_validator(mode="before")
    @classmethod
    def _default_kind(cls, data: Any):
        # `model: {hidden: [64]}` without a `kind:` tag means an MLP.
        if isinstance(data, dict) and isinstance(data.get("model"), dict) and "kind" not in data["model"]:
            data = {**data, "model": {"kind": "mlp", **data["model"]}}
        return data


class EnsembleConfig(_Strict):
    checkpoints: list[str] = Field(..., min_length=2, description="safetensors teachers written by distill")
    weights: list[float] | None = Field(None, description="one weight >= 0 per teacher (default: equal)")
    combine: Literal["probs", "logits"] = Field("probs", description="average the teachers' probabilities or logits")

    @model_validator(mode="after")
    def _one_weight_each(self):
        if self.weights is not None and (len(self.weights) != len(self.checkpoints) or min(self.weights) < 0 or sum(self.weights) <= 0):
            raise ValueError(f"give one weight >= 0 per checkpoint ({len(self.checkpoints)}), with a positive sum")
        return self


class SpecialistsConfig(_Strict):
    """Hinton et al. 2015 §5: specialists on classes the generalist (the teacher) confuses, each with a dustbin
    class for all others, built like the teacher and started from its weights; combined with it into one target."""

    class_sets: list[list[int]] | None = Field(None, description="disjoint class lists, one per specialist (default: "
                                                                 "found by clustering the teacher's predictions)")
    count: int = Field(3, ge=2, description="clusters asked for when class_sets is not given (singletons are dropped)")
    temperature: float = Field(4.0, gt=0, description="softening of the teacher's predictions before clustering their covariance")
    top_n: int = Field(1, ge=1, description="a specialist is active on a row when one of its classes is among the teacher's top_n")
    special_share: float = Field(0.5, gt=0, lt=1, description="share of a specialist's training rows drawn from its own classes")
    train: TrainConfig | None = Field(None, description="specialists' training (default: the teacher's)")


class TeacherRole(ModelRole):
    checkpoint: str | None = Field(None, description="a safetensors teacher to load instead of training one")
    ensemble: EnsembleConfig | None = Field(None, description="several trained teachers acting as one")
    specialists: SpecialistsConfig | None = Field(None, description="generalist + specialists (Hinton et al. 2015 §5)")
    cache: str | None = Field(None, description="`auto`: the teacher's logits over the students' rows are computed once "
                                                 "in the run folder (exact, for methods that read only logits); or a "
                                                 "folder written by `distill cache`: the first distilled stage learns "
                                                 "from the stored teacher outputs instead of running the teacher")
    precision: Literal["fp32", "fp16", "bf16"] = Field(
        "fp32", description="precision of the teacher's forward pass while distilling (fp16/bf16: a half copy, half "
                            "the memory; the losses stay in float32)")

    @model_validator(mode="after")
    def _checkpoint_or_ensemble(self):
        if self.checkpoint and self.ensemble:
            raise ValueError("set teacher.checkpoint or teacher.ensemble, not both")
        if self.specialists and (self.ensemble or self.cache):
            raise ValueError("teacher.specialists needs one generalist network: not with teacher.ensemble or teacher.cache")
        return self


class StudentRole(ModelRole):
    model: ModelConfig = Field(default_factory=lambda: MLPConfig(hidden=[64]))  # smaller than the default teacher
    distill_train: TrainConfig | None = Field(
        None, description="training settings of the distilled student where they differ from the scratch student's "
                          "(e.g. a lower SGD learning rate: at high T the T²-scaled soft loss has larger gradients); "
                          "fields it does not set come from student.train")

    @model_validator(mode="after")
    def _inherit_train(self):
        if self.distill_train is not None:  # only what distill_train sets differs from student.train
            own = {k: getattr(self.distill_train, k) for k in self.distill_train.model_fields_set}
            self.distill_train = self.train.model_copy(update=own)
        return self


class TransferConfig(_Strict):
    """Which rows the students learn from (see distill.transfer)."""

    rows: Literal["train", "heldout"] = Field(
        "train", description="train: the teacher's training rows; heldout: the teacher trains on one part of the "
                             "training split and the students learn from the other part")
    heldout_fraction: float = Field(0.5, gt=0.0, lt=1.0, description="share of the training split kept for the students (rows: heldout)")
    omit_classes: list[int] = Field(default_factory=list, description="classes removed from the students' rows (Hinton's omitted 3)")
    bias_correction: float | Literal["auto"] | None = Field(
        "auto", description="raise the omitted classes' logits of the distilled student by this much (auto: the value "
                            "best on the validation rows; null: none); reported as the role student+bias")

    @model_validator(mode="after")
    def _distinct(self):
        if len(set(self.omit_classes)) != len(self.omit_classes) or any(c < 0 for c in self.omit_classes):
            raise ValueError(f"omit_classes must be distinct class indices >= 0, got {self.omit_classes}")
        return self


class ReportConfig(_Strict):
    latency_batch: int = Field(1, ge=1)
    throughput_batch: int = Field(256, ge=1)
    repeats: int = Field(30, ge=1)
    trackers: list[Literal[TRACKERS]] = Field(  # type: ignore[valid-type]
        default_factory=list, description="experiment trackers through Accelerate (tensorboard, mlflow, wandb, ...): "
                                          "every epoch's metrics and the final table; their package must be installed")
    tracking_dir: str | None = Field(None, description="where local trackers write (default: the run folder's tracking/)")


class GenerateConfig(_Strict):
    """The teacher's decoding of the training sources for sequence-level KD: `distill generate` and data.targets: auto."""

    beam: int = Field(5, ge=1, description="beam size (Kim & Rush: 5)")
    k_best: int = Field(1, ge=1, description="hypotheses kept per row (more than 1 for data.target_choice: closest)")
    max_new_tokens: int | None = Field(None, ge=1, description="tokens per translation or completion (default "
                                                               "data.max_length; a completion also ends at data.max_length)")
    sample: bool = Field(False, description="language models: sample the completions (at temperature, seeded by the "
                                            "recipe's seed) instead of beam search")
    temperature: float = Field(1.0, gt=0, description="with sample: softmax(logits / temperature)")
    batch_size: int = Field(64, ge=1, description="sentences per beam search")
    shard_size: int = Field(1000, ge=1, description="sentences per shard file (the unit a killed run keeps)")

    @model_validator(mode="after")
    def _k_within_beam(self):
        if self.k_best > self.beam and not self.sample:
            raise ValueError(f"k_best {self.k_best} must be at most beam {self.beam}: a beam of n keeps n hypotheses")
        return self


class Recipe(_Strict):
    name: str = Field("run", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    seed: int = 0
    output_dir: str = "runs"
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    data: DataConfig = Field(default_factory=DataConfig)
    teacher: TeacherRole = Field(default_factory=TeacherRole)
    student: StudentRole = Field(default_factory=StudentRole)
    assistants: list[ModelRole] = Field(
        default_factory=list, description="teacher-assistant chain (Mirzadeh et al. 2020): each assistant is distilled "
                                          "from the one before (the first from the teacher), the student from the last")
    distill: MethodConfigUnion = Field(default_factory=KDConfig)  # type: ignore[valid-type]
    transfer: TransferConfig = Field(default_factory=TransferConfig)
    report: ReportConfig = Field(default_factory=ReportConfig)
    generate: GenerateConfig = Field(default_factory=GenerateConfig)
    variants: dict[str, dict[str, Any]] = Field(  # last: its validator reads the fields above
        default_factory=dict, description="more distilled students in the same run, each from the student's initial "
                                          "weights: name -> what it changes (distill.*, student.distill_train.*, "
                                          "data.targets, data.target_choice); see distill.variants")

    @field_validator("generate")
    @classmethod
    def _generate_decodes(cls, generate, info):
        data = info.data.get("data")
        if data is not None and data.dataset not in ("en-es", "parallel", *LM_DATASETS) and generate != GenerateConfig():
            raise ValueError(f"generate applies to translation and language-model data (en-es, parallel, "
                             f"{', '.join(LM_DATASETS)}), not {data.dataset}: remove it")
        if data is not None and data.dataset in ("en-es", "parallel") and (generate.sample or generate.temperature != 1):
            raise ValueError("generate.sample and temperature apply to language models: translations are decoded by beam "
                             "search; remove them")
        return generate

    @field_validator("variants")
    @classmethod
    def _variants_valid(cls, variants, info):
        """Each variant, merged into this recipe, must be a valid recipe itself (one line naming it otherwise)."""
        from distill.variants import check_names, variant_raw

        if {"data", "student", "distill"} - set(info.data):
            return variants  # an earlier field is invalid: its own error comes first
        try:
            check_names(variants)
            for name, partial in variants.items():
                raw = variant_raw(info.data, name, partial)
                try:
                    cls.model_validate(raw)
                except ValidationError as e:
                    raise ValueError(f"variants.{name}: {describe_error(e.errors()[0], raw)}") from None
        except ValueError as e:  # the message as it is, without pydantic's "Value error," (see describe_error)
            raise PydanticCustomError("variant", "{error}", {"error": str(e)}) from None
        return variants

    @model_validator(mode="before")
    @classmethod
    def _default_method(cls, data: Any):
        # `distill: {temperature: 20}` without a `method:` tag means plain KD.
        if isinstance(data, dict) and isinstance(data.get("distill"), dict) and "method" not in data["distill"]:
            data = {**data, "distill": {"method": "kd", **data["distill"]}}
        return data


DEFAULT_RECIPE = "digits"


def builtin_recipe_path(name: str = DEFAULT_RECIPE) -> Path:
    return Path(str(resources.files("distill") / "recipes" / f"{name}.yaml"))


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides; values are parsed as YAML scalars/lists (e.g. `hidden=[64,64]`)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} is not key=value: write e.g. distill.temperature=8")
        try:
            value = yaml.safe_load(text) if text else None
        except yaml.YAMLError:
            value = text
        node = raw
        parts = key.split(".")
        if not all(parts):
            raise UserError(f"override {item!r}: {key!r} has an empty part: write e.g. distill.temperature=8")
        for part in parts[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[parts[-1]] = value
    return raw


def load_recipe(path: str | Path | None = None, overrides: list[str] | None = None, *, stages=None,
                teacher_given: bool = False) -> Recipe:
    """Read, override and validate a recipe. `path=None` loads the built-in default. stages / teacher_given (the
    command's stages, and whether it loads its teacher): an override that would have no effect is refused."""
    path = Path(path) if path is not None else builtin_recipe_path()
    if not path.is_file() and builtin_recipe_path(str(path)).is_file():
        path = builtin_recipe_path(str(path))  # a built-in recipe by name, e.g. `distill run mnist-hinton`
    if not path.is_file():
        known = sorted(p.stem for p in builtin_recipe_path().parent.glob("*.yaml"))
        raise UserError(f"recipe {path} not found: give the path of a YAML recipe or a built-in name ({', '.join(known)})")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise UserError(f"recipe {path} is not valid YAML: {str(e).splitlines()[0]}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} cannot be read as UTF-8 text ({type(e).__name__}): give a YAML file") from None
    if raw is None:  # an empty file would silently train the defaults
        raise UserError(f"recipe {path} is empty: write its sections (name, data, teacher, student, distill), or run "
                        "without a recipe for the built-in default")
    if not isinstance(raw, dict):
        raise UserError(f"recipe {path} must be a mapping of sections (name, data, teacher, student, distill)")
    check_overrides_apply(raw, overrides or [], stages=stages, teacher_given=teacher_given)
    raw = apply_overrides(raw, overrides or [])
    return validate_recipe(raw, source=str(path))


def check_overrides_apply(raw: dict, overrides: list[str], *, stages=None, teacher_given: bool = False) -> None:
    """Refuse an override that cannot change what is trained (raw: the recipe before the overrides)."""
    keys = [o.partition("=")[0] for o in overrides]
    student = raw.get("student") if isinstance(raw.get("student"), dict) else {}
    shadow = student.get("distill_train") if isinstance(student.get("distill_train"), dict) else {}
    teacher = raw.get("teacher") if isinstance(raw.get("teacher"), dict) else {}
    loaded = teacher_given or bool(teacher.get("checkpoint"))
    specialists_train = isinstance(teacher.get("specialists"), dict) and not teacher["specialists"].get("train")
    for key in keys:
        field = key.removeprefix("student.train.")
        if key.startswith("student.train.") and field in shadow and f"student.distill_train.{field}" not in keys:
            raise UserError(f"override {key} reaches the scratch student only: the recipe sets student.distill_train.{field}"
                            f"={shadow[field]!r} for the distilled one; override student.distill_train.{field} too")
        if loaded and key.startswith(("teacher.train.", "teacher.model.")) and "teacher.checkpoint" not in keys and not (
                specialists_train and key.startswith("teacher.train.")):  # (specialists train like the teacher)
            raise UserError(f"override {key} has no effect: the teacher is loaded, not trained (--teacher or "
                            "teacher.checkpoint); remove the override")
        if stages is not None and "student" not in stages and key.startswith(("distill.", "student.", "assistants", "variants")):
            raise UserError(f"override {key} has no effect: this command trains no student (use `distill run`)")


def validate_recipe(raw: dict, source: str = "recipe") -> Recipe:
    check_finite(raw, source)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as e:
        raise UserError(f"{source}: {describe_error(e.errors()[0], raw)}") from None


MAX_RECIPE_NODES = 100_000  # far beyond any real recipe; YAML aliases can make a short file a huge (or endless) tree


def check_finite(node: Any, source: str = "recipe") -> None:
    """No number in a recipe may be inf or nan (YAML's .inf, .nan): such a learning rate or temperature would fail
    only after minutes of training, and a pydantic bound such as gt=0 lets inf through. Walked with a budget and
    refusing loops, so a YAML alias that refers to itself, or nested aliases (a "billion laughs"), end in one line."""
    stack, seen = [(node, "", ())], 0
    while stack:
        node, where, parents = stack.pop()
        seen += 1
        if seen > MAX_RECIPE_NODES:
            raise UserError(f"{source}: more than {MAX_RECIPE_NODES:,} values (YAML aliases repeated?): write a plain recipe")
        if isinstance(node, float) and not math.isfinite(node):
            raise UserError(f"{source}: {where or 'recipe'}: {node} is not a finite number: give a finite value")
        if isinstance(node, (dict, list)):
            if id(node) in parents:
                raise UserError(f"{source}: {where or 'recipe'} contains itself (a YAML alias loop): write the value out")
            items = node.items() if isinstance(node, dict) else enumerate(node)
            stack += [(child, f"{where}.{key}" if where else str(key), (*parents, id(node))) for key, child in items]


def describe_error(err: dict, raw: dict) -> str:
    """One line for pydantic's first error: the dotted field, what is wrong, and a fix or suggestion."""
    if err["type"] == "variant":
        return err["msg"]  # names the variant and its field already
    loc = [str(p) for p in err["loc"]]
    loc = [p for i, p in enumerate(loc) if not _is_union_tag(loc, i, raw)]
    field = ".".join(loc) or "recipe"
    if err["type"] == "extra_forbidden":
        known = _known_fields(loc[:-1], raw)
        close = difflib.get_close_matches(loc[-1], known, n=1)
        hint = f"did you mean {'.'.join(loc[:-1] + close)!r}?" if close else f"valid keys here: {', '.join(sorted(known))}"
        return f"unknown key {field!r}: {hint}"
    if err["type"] == "union_tag_invalid":  # e.g. distill.method: nope
        tag = err["ctx"]["discriminator"].strip("'\"")
        return f"{field}.{tag}: unknown {tag} {err['ctx']['tag']!r}: choose one of {err['ctx']['expected_tags']}"
    got = err.get("input")
    shown = "" if isinstance(got, dict) else f" (got {got!r})"
    return f"{field}: {err['msg']}{shown}"


def _is_union_tag(loc: list[str], i: int, raw: dict) -> bool:
    # pydantic puts the chosen union member (e.g. 'kd' or 'mlp') into the error location; drop it.
    node: Any = raw
    for part in loc[:i]:
        node = node.get(part) if isinstance(node, dict) else None
    return isinstance(node, dict) and loc[i] not in node and loc[i] in (node.get("method"), node.get("kind"), "kd", "mlp")


def _known_fields(loc: list[str], raw: dict) -> list[str]:
    model: Any = Recipe
    node: Any = raw
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else None
        field = model.model_fields.get(part) if isinstance(model, type) and issubclass(model, BaseModel) else None
        if field is None:
            return []
        model = _pick_member(field.annotation, node)
    return list(model.model_fields) if isinstance(model, type) and issubclass(model, BaseModel) else []


def _pick_member(annotation: Any, node: Any) -> Any:
    """The pydantic model a field holds; for a tagged union, the member named by the tag in `node`."""
    candidates = [a for a in _flatten(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
    for cls in candidates:
        for tag in ("method", "kind"):
            default = cls.model_fields.get(tag)
            if default is not None and isinstance(node, dict) and node.get(tag, default.default) == default.default:
                return cls
    return candidates[0] if candidates else None


def _flatten(annotation: Any) -> list[Any]:
    args = get_args(annotation)
    return [x for a in args for x in _flatten(a)] if args else [annotation]


def recipe_to_yaml(recipe: Recipe) -> str:
    return yaml.safe_dump(recipe.model_dump(mode="json"), sort_keys=False)
