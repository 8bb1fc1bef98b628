"""`distill run|train|distill|eval|methods`. Mistakes end as one line on stderr and exit status 2."""

import argparse
import json
import os
import sys
import traceback

from distill.errors import UserError

USAGE_EXAMPLES = """examples:
  distill run                                   # the default recipe (sklearn digits), a few minutes on CPU
  distill run recipes/mnist-hinton.yaml seed=1 distill.temperature=8
  distill train recipes/mnist-hinton.yaml       # the teacher only
  distill distill recipes/mnist-hinton.yaml --teacher runs/mnist-hinton/teacher.safetensors
  distill cache recipes/mnist-hinton.yaml --teacher runs/mnist-hinton/teacher.safetensors --out caches/mnist-train
  distill distill recipes/mnist-hinton.yaml teacher.cache=caches/mnist-train   # no teacher in memory
  distill eval runs/digits/student.safetensors
  distill export runs/digits --format onnx [--quantize int8]   # checked against PyTorch, timed beside it
  distill bench mnist-hinton --data-dir ../shared/data   # epoch time: plain PyTorch vs distill live / cached
  distill methods
"""


class _Parser(argparse.ArgumentParser):
    """argparse that reports a mistake in one line (no usage block), like every other bad input."""

    def error(self, message):
        raise UserError(f"{message} (see `{self.prog} --help`)")


def positive_int(text: str) -> int:
    """An option that counts something (epochs, rounds, threads, rows ...): a whole number >= 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return value


def _split(items: list[str]) -> tuple[str | None, list[str]]:
    """First item is the recipe unless it is a key=value override."""
    if items and "=" not in items[0]:
        return items[0], items[1:]
    return None, items


def _recipe(args, stages=None, teacher_given=False):
    from distill.recipe import load_recipe

    path, overrides = _split(args.items)
    if args.data_dir:
        overrides = [*overrides, f"data.data_dir={args.data_dir}"]
    return load_recipe(path, overrides, stages=stages, teacher_given=teacher_given)


def cmd_run(args, stages=("teacher", "scratch", "student"), teacher=None):
    from distill.runner import run_recipe, summary

    recipe = _recipe(args, stages=stages, teacher_given=bool(teacher))
    results, out = run_recipe(recipe, stages=stages, teacher_checkpoint=teacher, resume=args.resume, progress=not args.quiet)
    if results:  # empty on the non-main processes of a distributed run
        print(summary(results, out))


def cmd_train(args):
    cmd_run(args, stages=("teacher",))


def cmd_distill(args):
    stages = ("student",) if args.no_scratch else ("scratch", "student")
    cmd_run(args, stages=stages, teacher=args.teacher)


def cmd_eval(args):
    from distill.report import format_table, model_card
    from distill.run_checks import check_split_sizes
    from distill.saved import load_saved

    model, task, data = load_saved(args.checkpoint, args.overrides, args.data_dir)
    check_split_sizes(data, splits=("test",))  # a score on a handful of rows would be noise
    scores = dict(task.test_scores(model.eval(), data))
    card = model_card(task.timed(model), lambda n: task.latency_inputs(data, n))
    results = {"recipe": args.checkpoint, "task": task.name, "dataset": data.name,
               "models": {"model": {"metric": task.metric, **scores, **card}}}
    print(json.dumps(results["models"]["model"], indent=1) if args.json else format_table(results))


def cmd_export(args):
    from distill.export import export

    _, _, table = export(args.run, role=args.role, fmt=args.format, quantize=args.quantize, out=args.out,
                         data_dir=args.data_dir, overrides=args.overrides)
    print(table)


def cmd_cache(args):
    import torch

    from distill.cache_fit import teacher_layers
    from distill.signals.cache import write_cache, write_summary
    from distill.tasks import make_task
    from distill.transfer import recipe_rows

    recipe = _recipe(args)
    teacher_path = args.teacher or recipe.teacher.checkpoint
    if not teacher_path:
        raise UserError("distill cache needs a teacher: pass --teacher PATH (.safetensors, or a text model's folder) "
                        "or set teacher.checkpoint in the recipe")
    task = make_task(recipe, teacher_path)
    data = task.load_data()
    teacher = task.load_model(teacher_path, data)
    if args.split == "transfer":  # the rows the distilled student learns from (see the recipe's transfer section)
        rows = task.distill_rows(recipe_rows(recipe, data.train)[1])
    else:
        rows = getattr(data, args.split)
    # the teacher layers the recipe's method reads come along, so `distill distill RECIPE teacher.cache=OUT` works
    features = args.features if args.features is not None else teacher_layers(recipe.distill)
    try:
        manifest = write_cache(teacher, rows, args.out, top_k=args.top_k, dtype=args.dtype, features=features,
                               batch_size=args.batch_size or task.inference_batch, resume=not args.restart,
                               device="cuda" if torch.cuda.is_available() else "cpu")
    except KeyboardInterrupt:
        print("distill: interrupted; rerun the same command to continue the cache", file=sys.stderr)
        raise SystemExit(130) from None
    print(write_summary(manifest, args.out))


def cmd_generate(args):
    from distill.data import LM_DATASETS
    from distill.generate import generate, model_sha256
    from pydantic import ValidationError

    from distill.recipe import PACKED_TARGETS, GenerateConfig
    from distill.tasks import make_task
    from distill.transfer import recipe_rows

    recipe = _recipe(args)
    teacher_path = args.teacher or recipe.teacher.checkpoint
    if not teacher_path:
        raise UserError("distill generate needs a teacher: pass --teacher FOLDER (a model written by distill)")
    if recipe.data.dataset not in ("en-es", "parallel", *LM_DATASETS):
        raise UserError(f"distill generate writes translations or language-model completions: data.dataset must be "
                        f"en-es, parallel, {', '.join(LM_DATASETS)}, not {recipe.data.dataset}")
    if recipe.data.pack:
        raise UserError(PACKED_TARGETS)
    given = {k: getattr(args, k) for k in ("beam", "k_best", "batch_size", "shard_size") if getattr(args, k) is not None}
    g = {**recipe.generate.model_dump(), **given}  # the recipe's decoding settings, unless an option says otherwise
    try:  # before the teacher is loaded: e.g. --k-best larger than --beam
        GenerateConfig.model_validate(g)
    except ValidationError as e:
        raise UserError(f"distill generate: {e.errors()[0]['msg'].removeprefix('Value error, ')}") from None
    beam, k_best = g["beam"], g["k_best"]
    task = make_task(recipe, teacher_path)
    data = task.load_data()
    teacher = task.load_model(teacher_path, data)
    rows = recipe_rows(recipe, data.train)[1]  # the rows the students learn from
    try:
        manifest = generate(task, teacher, rows, args.out, teacher_sha256=model_sha256(teacher_path), num_beams=beam,
                            k_best=k_best, max_new_tokens=g["max_new_tokens"], sample=g["sample"],
                            temperature=g["temperature"], seed=recipe.seed, batch_size=g["batch_size"],
                            shard_size=g["shard_size"], resume=not args.restart, progress=None if args.quiet else print)
    except KeyboardInterrupt:
        print("distill: interrupted; rerun the same command to continue", file=sys.stderr)
        raise SystemExit(130) from None
    how = f"sampled at temperature {g['temperature']}" if g["sample"] else f"beam {beam}"
    print(f"{manifest['rows']} rows, {how}, {k_best} best each: {args.out} "
          f"(train on them with data.targets={args.out})")


def cmd_bench(args):
    from distill.data import LM_DATASETS
    from distill.speed import bench, format_bench, rounds_note

    recipe = _recipe(args)
    if recipe.data.dataset in LM_DATASETS:  # causal LM: time per optimiser step, on-policy included
        from distill.speed_lm import bench_lm, format_lm_bench

        result = bench_lm(recipe, steps=args.steps, rounds=args.rounds, threads=args.threads, top_k=args.top_k or 32,
                          rows=args.rows, progress=lambda line: print(line, file=sys.stderr))
        print(json.dumps(result, indent=1) if args.json else format_lm_bench(result))
        return
    result = bench(recipe, teacher_path=args.teacher, epochs=args.epochs, rounds=args.rounds,
                   threads=args.threads, top_k=args.top_k, progress=lambda line: print(line, file=sys.stderr))
    print(json.dumps(result, indent=1) if args.json else format_bench(result))
    if args.json and rounds_note(args.rounds):  # the JSON stays machine-readable; the caution goes to stderr
        print(rounds_note(args.rounds), file=sys.stderr)


RECIPE_TECHNIQUES = (
    ("teacher.ensemble", "many teachers as one: weighted average of their probabilities or logits"),
    ("teacher.specialists", "a generalist plus specialists on confusable classes with a dustbin class (Hinton et al. 2015 §5)"),
    ("assistants", "teacher-assistant chain: each assistant distilled from the one before (Mirzadeh et al. 2020)"),
    ("transfer.rows", "the teacher's own rows, or rows held out from it (heldout_fraction)"),
    ("transfer.omit_classes", "leave classes out of the transfer set; bias_correction raises their logits (Hinton's omitted 3)"),
    ("data.unlabelled_fraction", "unlabelled transfer rows with the teacher's argmax as pseudo-label"),
    ("teacher.cache", "stored teacher outputs from `distill cache` (full or top-k logits, layer features): no teacher in memory"),
    ("teacher.precision", "the teacher's forward pass in fp16/bf16"),
    ("data.targets", "translation, language models: the teacher's translations or completions as targets (sequence-level KD): a `distill generate` folder, or auto"),
    ("variants", "more distilled students in one run, each changing distill.*, student.distill_train.* or data.targets"),
)


def cmd_methods(args):
    from distill.methods import REGISTRY

    for name, cls in REGISTRY.items():
        print(f"{name:12s} {cls.summary}")
        for field, info in cls.Config.model_fields.items():
            if field == "method":
                continue
            doc = f"  {info.description}" if info.description else ""
            default = "(required)" if info.is_required() else f"= {info.get_default(call_default_factory=True)!r}"
            print(f"{'':12s}   {field} {default}{doc}")
    print("\nWho teaches, and on which rows (recipe sections that work with any method above):")
    for key, text in RECIPE_TECHNIQUES:
        print(f"  {key:25s} {text}")


def _allow_import(parser) -> None:
    parser.add_argument("--allow-import", action="append", default=[], metavar="MODULE",
                        help="let `model: {kind: import, target: MODULE:Class}` import (and so run) MODULE and its "
                             "sub-modules; a recipe alone never imports code")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="distill", description="Knowledge distillation: a small fast student from a large teacher.",
                                epilog=USAGE_EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--debug", action="store_true", help="show the traceback of an error (for bug reports)")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def recipe_parser(name, help_text):
        s = sub.add_parser(name, help=help_text, description=help_text)
        s.add_argument("items", nargs="*", metavar="[RECIPE.yaml] [key=value ...]", help="a recipe (default: the built-in digits recipe) and overrides")
        s.add_argument("--data-dir", help="folder with downloaded data sets (else $DISTILL_DATA_DIR)")
        _allow_import(s)
        return s

    def recipe_command(name, func, help_text):
        s = recipe_parser(name, help_text)
        s.add_argument("--resume", action="store_true", help="continue a killed run from runs/<name>.partial")
        s.add_argument("--quiet", action="store_true", help="no progress bar")
        s.set_defaults(func=func)
        return s

    recipe_command("run", cmd_run, "train the teacher, a scratch student and a distilled student; evaluate and report")
    recipe_command("train", cmd_train, "train the teacher only")
    d = recipe_command("distill", cmd_distill, "distil a student from an existing teacher checkpoint")
    d.add_argument("--teacher", help="teacher weights (.safetensors written by distill); default: teacher.checkpoint of the recipe")
    d.add_argument("--no-scratch", action="store_true", help="skip the no-teacher baseline")
    e = sub.add_parser("eval", help="evaluate a checkpoint (.safetensors, or a text model's folder) on the test split of its data set")
    e.add_argument("checkpoint")
    e.add_argument("overrides", nargs="*", metavar="data.key=value", help="e.g. data.data_dir=/data")
    e.add_argument("--data-dir")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _allow_import(e)
    e.set_defaults(func=cmd_eval)
    x = sub.add_parser("export", help="write a trained model as ONNX or TorchScript, checked against PyTorch and timed")
    x.add_argument("run", help="a finished run folder (runs/NAME), or one saved model (.safetensors / text model folder)")
    x.add_argument("--role", default="student", help="which model of the run (default: student)")
    x.add_argument("--format", required=True, metavar="{onnx,torchscript}", help="onnx (run by onnxruntime) or torchscript")
    x.add_argument("--quantize", metavar="int8", help="int8: dynamic quantization of the weights (accuracy reported, no 1e-5 check)")
    x.add_argument("--out", help="file or folder to write (default: RUN/export/ROLE.onnx|.pt, int8: ROLE.int8.onnx|.pt)")
    x.add_argument("overrides", nargs="*", metavar="data.key=value", help="where the test data is, e.g. data.data_dir=/data")
    x.add_argument("--data-dir")
    x.set_defaults(func=cmd_export)
    c = recipe_parser("cache", "run a teacher once over a split and store its outputs for later students")
    c.add_argument("--teacher", help="teacher weights (.safetensors written by distill); default: teacher.checkpoint of the recipe")
    c.add_argument("--out", required=True, help="cache folder to write (built as OUT.partial, resumed if killed)")
    c.add_argument("--top-k", type=positive_int, help="store only the k largest logits per row (+ classes + logsumexp); default: all logits")
    c.add_argument("--dtype", choices=("float16", "float32"), default="float16", help="type of the stored logits and features")
    c.add_argument("--features", nargs="*", metavar="LAYER",
                   help="teacher layers whose outputs are stored too (default: those the recipe's method reads, "
                        "e.g. hints' teacher_layer; --features with no name stores none)")
    c.add_argument("--split", choices=("transfer", "train", "val", "test"), default="transfer",
                   help="rows to cache; transfer (default): the rows the students learn from, as teacher.cache needs")
    c.add_argument("--batch-size", type=positive_int, help="examples per teacher forward pass (default: 1024; 64 for text)")
    c.add_argument("--restart", action="store_true", help="discard a half-written OUT.partial instead of continuing it")
    c.set_defaults(func=cmd_cache)
    g = recipe_parser("generate", "the teacher's translations or completions of the training rows (sequence-level KD data)")
    g.add_argument("--teacher", help="the teacher's folder (default: teacher.checkpoint of the recipe)")
    g.add_argument("--out", required=True, help="folder to write (built as OUT.partial, continued if killed)")
    g.add_argument("--beam", type=positive_int, help="beam size (default: the recipe's generate.beam, 5)")
    g.add_argument("--k-best", type=positive_int, help="hypotheses kept per sentence (k > 1 for data.target_choice: closest; "
                                              "default: generate.k_best, 1)")
    g.add_argument("--batch-size", type=positive_int, help="sentences per beam search (default: generate.batch_size, 64)")
    g.add_argument("--shard-size", type=positive_int, help="sentences per shard file, the unit a killed run keeps "
                                                  "(default: generate.shard_size, 1000)")
    g.add_argument("--restart", action="store_true", help="discard a half-written OUT.partial instead of continuing it")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=cmd_generate)
    b = recipe_parser("bench", "time a distillation epoch: plain PyTorch loop vs distill live, cached, student alone")
    b.add_argument("--teacher", help="teacher weights; default: an untrained teacher of the recipe's architecture (same speed)")
    b.add_argument("--epochs", type=positive_int, default=3, help="timed epochs per variant and round (one more runs untimed first)")
    b.add_argument("--rounds", type=positive_int, default=2, help="rounds of all variants, taking turns")
    b.add_argument("--threads", type=positive_int, help="torch threads per variant (default: torch's default)")
    b.add_argument("--top-k", type=positive_int, help="cache only the top k logits (default: full float32 logits)")
    b.add_argument("--steps", type=positive_int, default=20, help="causal LM: timed optimiser steps per variant and round")
    b.add_argument("--rows", type=positive_int, help="causal LM: use only this many training sequences")
    b.add_argument("--json", action="store_true", help="print JSON")
    b.set_defaults(func=cmd_bench)
    m = sub.add_parser("methods", help="list distillation methods and their parameters")
    m.set_defaults(func=cmd_methods)
    return p


def parse(parser: argparse.ArgumentParser, argv: list[str]) -> argparse.Namespace:
    # overrides may come after options (`distill run r.yaml --quiet seed=1`): collect stray key=value items too
    args, extra = parser.parse_known_args(argv)
    unknown = [e for e in extra if e.startswith("-") or not hasattr(args, "items") and not hasattr(args, "overrides")]
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if extra:
        target = "items" if hasattr(args, "items") else "overrides"
        setattr(args, target, [*getattr(args, target), *extra])
    return args


def main(argv: list[str] | None = None) -> int:
    from distill.train import end_distributed, several_processes  # under torchrun / accelerate launch

    try:
        code = _main(argv)
    except Exception:
        if not several_processes():
            raise
        traceback.print_exc()  # a bug, shown whole; then leave as after any error (below)
        code = 1
    if code and several_processes():
        # Leave at once, the process group left as it is: the other processes may be blocked in a collective this
        # one never joins, and tearing the group down waits for them (gloo: both processes hung until its timeout).
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    end_distributed(wait=code == 0)  # after an error, the others may never arrive at the barrier
    return code


def _main(argv: list[str] | None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv  # accepted anywhere on the line, not only before the command
    argv = [a for a in argv if a != "--debug"]
    from distill.students.imported import allowed_imports
    from distill.train import peer_stopped

    try:
        args = parse(build_parser(), argv)
        with allowed_imports(getattr(args, "allow_import", None)):
            args.func(args)
    except (UserError, OSError, RuntimeError) as e:
        from distill.durable import write_error

        if isinstance(e, OSError) and (e := write_error(e.filename or "a file", e)) is None:
            raise  # an OSError that is not the disk's refusal (full, no permission): a bug to see whole
        if isinstance(e, RuntimeError) and (e := peer_stopped(e)) is None:
            raise  # a RuntimeError that is not a lost peer: a bug to see whole
        if debug:
            raise
        print(f"distill: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("distill: interrupted; continue with --resume", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
