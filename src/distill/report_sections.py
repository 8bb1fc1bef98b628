"""Sections of report.md built from results alone: Setup (method, architectures, training, data, seed),
Warnings and Exported models. Each returns a list of lines ([] when there is nothing to say) and copes with
missing keys: results of `distill eval` or of older runs carry no config."""

from __future__ import annotations

from distill.report_text import fmt, fmt_spread, num, value_text


def _dict(x) -> dict:
    return x if isinstance(x, dict) else {}


def _off(v) -> bool:
    """None, false, 0 or []: a setting that is off (architectures list only what is on)."""
    return v is None or v is False or v == [] or (num(v) == 0 and not isinstance(v, bool))


def _fields(d: dict, skip=(), keep_off: bool = True) -> str:
    return ", ".join(f"{k} {value_text(v)}" for k, v in d.items() if k not in skip and (keep_off or not _off(v)))


def _flat(d: dict, prefix: str = "") -> str:
    """{"distill": {"soft_weight": 0}} -> "distill.soft_weight 0"."""
    return ", ".join(_flat(v, f"{prefix}{k}.") if isinstance(v, dict) else f"{prefix}{k} {value_text(v)}"
                     for k, v in _dict(d).items())


def architecture(model: dict, params=None) -> str:
    """"mlp, hidden [64] (5,130 parameters)": the kind, then the settings that are not off."""
    model = _dict(model)
    text = ", ".join(p for p in (str(model.get("kind", "model")), _fields(model, skip=("kind",), keep_off=False)) if p)
    n = num(params)
    return text + (f" ({int(n):,} parameters)" if n is not None else "")


def training(train: dict, epochs_run=None) -> str:
    """"60 epochs, batch 64, adam, lr 0.003, cosine schedule" plus the settings that change training."""
    t = _dict(train)
    if not t:
        return "training settings not recorded"
    from distill.schedule import DEFAULT_EPOCHS, DEFAULT_MIN_STEPS

    epochs = (f"{value_text(t['max_steps'])} steps" if t.get("max_steps") else
              f"{value_text(t['epochs'])} epochs" if t.get("epochs") is not None else
              f"default length ({DEFAULT_EPOCHS} epochs, or more until {t.get('min_steps') or DEFAULT_MIN_STEPS:,} steps)")
    batch = f"batch {value_text(t.get('batch_size'))}" + (f" x {t['grad_accum']} accumulated" if (t.get("grad_accum") or 1) > 1 else "")
    parts = [epochs, batch,
             str(t.get("optimizer", "-")), f"lr {value_text(t.get('lr'))}"]
    if t.get("optimizer") == "sgd":
        parts.append(f"momentum {value_text(t.get('momentum'))}")
    parts.append(f"{t.get('schedule', '-')} schedule")
    for key in ("min_steps", "weight_decay", "warmup_epochs", "warmup_steps", "grad_clip", "jitter", "patience",
                "eval_every", "group_by_length"):
        if not _off(t.get(key)):
            parts.append(f"{key} {value_text(t[key])}")
    ran = num(epochs_run)
    if ran is not None and ran != num(t.get("epochs")) and not t.get("max_steps"):
        parts.append(f"ran {int(ran)}")
    return ", ".join(parts)


def _teacher_line(teacher: dict, card: dict) -> str:
    if teacher.get("ensemble"):
        e = _dict(teacher["ensemble"])
        files = e.get("checkpoints") or []
        weights = f", weights {value_text(e['weights'])}" if e.get("weights") else ""
        line = f"ensemble of {len(files)} trained teachers ({e.get('combine', 'probs')} averaged{weights}): {', '.join(map(str, files))}"
    elif teacher.get("checkpoint"):
        line = f"{architecture(teacher.get('model'), card.get('params'))}, loaded from {teacher['checkpoint']} (not trained in this run)"
    else:
        line = f"{architecture(teacher.get('model'), card.get('params'))}; trained: {training(teacher.get('train'), card.get('epochs'))}"
    if teacher.get("specialists"):
        sp = _dict(teacher["specialists"])
        sets = sp.get("class_sets")
        line += f"; with specialists ({'class sets ' + value_text(sets) if sets else str(sp.get('count')) + ' clusters of confused classes'})"
    cache = teacher.get("cache")
    if cache == "auto":
        line += "; its outputs over the students' rows computed once in the run folder (teacher.cache auto)"
    elif cache:
        line += f"; the distilled student learned from the stored outputs in {cache} (teacher.cache)"
    if teacher.get("precision") not in (None, "fp32"):
        line += f"; forward pass in {teacher['precision']} while distilling"
    return line


def _data_line(results: dict, cfg: dict, models: dict) -> str:
    data, transfer = _dict(cfg.get("data")), _dict(results.get("transfer"))
    parts = [str(results.get("dataset") or data.get("dataset") or "-")]
    sizes = {num(m.get("test_size")) for m in models.values()} - {None}
    if len(sizes) == 1:
        parts.append(f"test set {int(sizes.pop()):,} rows")
    elif sizes:
        parts.append("test rows " + ", ".join(f"{r} {int(m['test_size']):,}" for r, m in models.items() if num(m.get("test_size")) is not None))
    if num(transfer.get("teacher_rows")) is not None:
        parts.append(f"teacher trained on {int(transfer['teacher_rows']):,} rows")
    if num(transfer.get("student_rows")) is not None:
        parts.append(f"students learned from {int(transfer['student_rows']):,} rows (transfer.rows {transfer.get('rows', 'train')})")
    if transfer.get("omit_classes"):
        parts.append(f"classes {value_text(transfer['omit_classes'])} left out of the students' rows")
    if num(data.get("val_fraction")) is not None:
        parts.append(f"val_fraction {value_text(data['val_fraction'])}")
    if data.get("unlabelled_fraction"):
        parts.append(f"unlabelled_fraction {value_text(data['unlabelled_fraction'])}")
    if data.get("targets"):
        parts.append(f"the distilled student's targets: the teacher's translations ({data['targets']}, {data.get('target_choice')})")
    variants = [_dict(v) for v in _dict(cfg.get("variants")).values()]
    if "auto" in [data.get("targets"), *(_dict(v.get("data")).get("targets") for v in variants)]:
        g = _dict(cfg.get("generate"))
        parts.append(f"targets auto: the teacher's beam search (beam {value_text(g.get('beam'))}, {value_text(g.get('k_best'))} "
                     "best kept) over the students' sources, in teacher-targets/")
    return ", ".join(parts)


def setup_section(results: dict, models: dict) -> list[str]:
    """## Setup: method and its settings, the architectures, each role's training, data, seed."""
    cfg = _dict(results.get("config"))
    if not cfg:
        return []
    method = _dict(cfg.get("distill"))
    teacher, student = _dict(cfg.get("teacher")), _dict(cfg.get("student"))
    card = lambda role: _dict(models.get(role))  # noqa: E731
    lines = ["## Setup", ""]
    if method:
        lines.append(f"- method: **{method.get('method', '-')}**: {_fields(method, skip=('method',)) or 'no settings'}")
    if teacher:
        lines.append(f"- teacher: {_teacher_line(teacher, card('teacher'))}")
    for i, a in enumerate(cfg.get("assistants") or [], 1):
        a = _dict(a)
        lines.append(f"- assistant{i}: {architecture(a.get('model'), card(f'assistant{i}').get('params'))}; "
                     f"trained: {training(a.get('train'), card(f'assistant{i}').get('epochs'))}")
    if student:
        params = card("student").get("params", card("scratch").get("params"))
        lines.append(f"- student: {architecture(student.get('model'), params)}")
        lines.append(f"- scratch (the student's network trained alone): {training(student.get('train'), card('scratch').get('epochs'))}")
        own = student.get("distill_train")
        how = (f"{training(own, card('student').get('epochs'))} (student.distill_train)" if own
               else "the same training as scratch (student.train)")
        lines.append(f"- distilled student: {how}")
        for name, changes in _dict(cfg.get("variants")).items():
            lines.append(f"- {name} (a variant of the distilled student, same initial weights): {_flat(changes) or 'no changes'}")
    lines.append(f"- data: {_data_line(results, cfg, models)}")
    extra = f", mixed precision {cfg['mixed_precision']}" if cfg.get("mixed_precision") not in (None, "no") else ""
    split = _dict(cfg.get("data")).get("split_seed")
    lines.append(f"- seed: {value_text(cfg.get('seed'))}" + (f" (data split seed {split})" if split is not None else "") + extra)
    return lines + [""]


def warnings_list(results: dict) -> list[str]:
    w = results.get("warnings")
    return [str(x) for x in w if str(x).strip()] if isinstance(w, list) else []


def warnings_section(results: dict) -> list[str]:
    """## Warnings: the runner's one-line warnings, as a list; [] when there are none."""
    w = warnings_list(results)
    return ["## Warnings", "", *(f"- {x}" for x in w), ""] if w else []


def _score(v, metric) -> str:
    if metric == "accuracy" and num(v) is not None:
        return f"{v * 100:.2f}%"
    return fmt(v, ".4g")


def _latency(d) -> str:
    d = _dict(d)
    return fmt_spread(d.get("median"), d.get("min"), d.get("max"), ".3f", small=3)


def _export_row(e: dict) -> str:
    e = _dict(e)
    tol = num(e.get("tolerance"))
    diff = fmt(e.get("max_abs_diff"), ".2g")
    over = tol is not None and num(e.get("max_abs_diff")) is not None and e["max_abs_diff"] > tol
    diff += f" ({fmt(tol, '.2g')}{', over' if over else ''})" if tol is not None else " (no tolerance)"
    ours, theirs = _dict(e.get("latency_ms")).get("median"), _dict(e.get("latency_ms_pytorch")).get("median")
    speedup = num(theirs) / num(ours) if num(ours) and num(theirs) is not None else None
    fmt_cell = f"{e.get('format', '-')}" + (f" ({e['runtime']})" if e.get("runtime") else "")
    cells = [str(e.get("role", "-")), fmt_cell, str(e.get("quantization") or "none"), f"`{e.get('file', '-')}`",
             fmt(e.get("size_mb"), ".3f", small=3), diff,
             f"{_score(e.get('score'), e.get('metric'))} vs {_score(e.get('score_pytorch'), e.get('metric'))}",
             f"{_latency(e.get('latency_ms'))} vs {_latency(e.get('latency_ms_pytorch'))}", fmt(speedup, ".2f")]
    return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"


def exports_section(results: dict) -> list[str]:
    """## Exported models (`distill export`): one row per exported file; [] when there is none."""
    given = results.get("exports")
    exports = [e for e in given if isinstance(e, dict)] if isinstance(given, list) else []
    if not exports:
        return []
    batch = next((e["latency_batch"] for e in exports if num(e.get("latency_batch")) is not None), 1)
    return ["## Exported models", "",
            "| role | format (runtime) | quantization | file | MB | max \\|diff\\| (tolerance) | score exported vs PyTorch "
            f"| latency ms at batch {batch}, median (min–max): exported vs PyTorch | speed-up × |",
            "|:---|:---|:---|:---|---:|---:|---:|---:|---:|", *map(_export_row, exports), "",
            "max |diff|: the largest absolute difference between the exported model's outputs and PyTorch's on the "
            "same inputs; speed-up: PyTorch median latency / exported median latency.", ""]


def translation_section(results: dict) -> list[str]:
    """Translation runs: greedy and beam BLEU, chrF and decoding speed of every model, and sample translations."""
    models = {role: m for role, m in _dict(results.get("models")).items() if isinstance(m, dict) and "bleu_beam" in m}
    if not models:
        return []
    beam = next(iter(models.values())).get("beam", "-")
    lines = ["## Translation", "", f"BLEU and chrF (sacrebleu, one reference) on the test split; beam = {beam}.", "",
             "| model | BLEU greedy | BLEU beam | beam - greedy | chrF greedy | chrF beam | sentences/s (beam, batched) |",
             "|:---|---:|---:|---:|---:|---:|---:|"]
    for role, m in models.items():
        gap = (m["bleu_beam"] - m["bleu"]) if isinstance(m.get("bleu"), (int, float)) else None
        cells = [m.get("bleu"), m.get("bleu_beam"), gap, m.get("chrf"), m.get("chrf_beam"), m.get("beam_sentences_per_s")]
        lines.append(f"| {role} | " + " | ".join(fmt(num(c), ".2f") for c in cells) + " |")
    lines += [""]
    for role, m in models.items():
        samples = m.get("samples") or []
        if samples:
            lines += [f"Sample translations by the {role} (beam):", ""]
            lines += [f"- source: {s['source']}\n  - reference: {s['reference']}\n  - {role}: {s['beam']}" for s in samples]
            lines += [""]
    return lines


def language_model_section(results: dict) -> list[str]:
    """Causal-LM runs: test perplexity, the teacher's NLL of each model's own samples, generation speed, and a few
    sampled continuations of test prompts."""
    models = {role: m for role, m in _dict(results.get("models")).items() if isinstance(m, dict) and "perplexity" in m}
    if not models:
        return []
    new = next((m["new_tokens"] for m in models.values() if num(m.get("new_tokens")) is not None), None)
    lines = ["## Language model", "",
             "Perplexity = exp(mean NLL per counted token) of the test split. Teacher NLL of own samples: the teacher's "
             "mean NLL per token of the continuations the model itself samples (temperature 1) after the first test "
             "prompts, the quality on-policy distillation aims at (lower: text the teacher finds likelier). Tokens/s: "
             f"greedy generation of {value_text(new) if new is not None else '-'} new tokens, from the latency above.", "",
             "| model | perplexity | NLL per token | teacher NLL of own samples | tokens/s (greedy) |",
             "|:---|---:|---:|---:|---:|"]
    for role, m in models.items():
        latency = num(m.get("latency_ms"))
        speed = num(new) * 1e3 / latency if latency and new is not None else None
        cells = [fmt(num(m.get("perplexity")), ".2f"), fmt(num(m.get("loss")), ".4f"), fmt(num(m.get("teacher_nll")), ".4f"),
                 fmt(speed, ",.0f")]
        lines.append(f"| {role} | " + " | ".join(cells) + " |")
    lines += [""]
    for role, m in models.items():
        samples = [s for s in m.get("samples") or [] if isinstance(s, dict)]
        if samples:
            lines += [f"Sampled continuations by the {role}:", ""]
            lines += [f"- prompt: {s.get('prompt')}\n  - test text: {s.get('reference')}\n  - {role}: {s.get('continuation')}"
                      for s in samples]
            lines += [""]
    return lines
