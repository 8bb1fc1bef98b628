"""`distill generate`: the teacher's outputs for the training rows, as a new data set for sequence-level KD (Kim &
Rush 2016): the student then learns the teacher's output sequences instead of the data's (`data.targets: DIR`).
Translation: beam-search translations of the sources, or, among the teacher's k best, the one closest to the
reference by sentence BLEU (sequence-level interpolation, `data.target_choice: closest`). Causal language models:
completions of each row's prompt, by beam search or by sampling (`generate.sample`, seeded per shard).

The task decodes (`Task.generate_targets`: one JSON record per row, with its `hypotheses` best first) and reads
them back (`Task.distill_rows`). The folder is built as DIR.partial and renamed when complete. Rows are written in
shards (JSONL, one line per training row), each atomically and recorded with its sha256 in manifest.json together
with the teacher's and the data's sha256 and the decoding settings. A killed run continues at the first missing
shard; every shard holds a fixed range of rows decoded in a fixed order (sampling: from a seed fixed per shard), so
the result is byte for byte the uninterrupted one.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

from distill.durable import atomic_write_text, checked_json, read_checked_json, remove_temp_files
from distill.errors import UserError

FORMAT = "distill.generated/1"
MANIFEST = "manifest.json"


def model_sha256(path) -> str:
    """Of a model's weights: every .safetensors file of a folder (sorted by name), or the file itself."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise UserError(f"{path} holds no .safetensors weights: give the teacher's folder written by distill")
    h = hashlib.sha256()
    for f in files:
        h.update(f.name.encode())
        with open(f, "rb") as stream:
            for block in iter(lambda: stream.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def generate(task, teacher, rows, out, *, teacher_sha256: str, num_beams: int = 5, k_best: int = 1,
             max_new_tokens: int | None = None, sample: bool = False, temperature: float = 1.0, seed: int = 0,
             batch_size: int = 64, shard_size: int = 1000, resume: bool = True, progress=print, device="cpu") -> dict:
    """Decode every row of `rows` with `teacher` into DIR (see the module docstring); returns the manifest.
    max_new_tokens None: data.max_length. sample: sampling at `temperature` instead of beam search."""
    if not sample and not 1 <= k_best <= num_beams:
        raise UserError(f"--k-best {k_best} must be between 1 and --beam {num_beams}: a beam of n keeps n hypotheses")
    if batch_size < 1 or shard_size < 1:
        raise UserError("--batch-size and --shard-size must be at least 1")
    out = Path(out)
    if out.exists():
        raise UserError(f"{out} exists: choose a new --out folder, or remove it to generate again")
    partial = out.with_name(out.name + ".partial")
    decoding = {"num_beams": 1 if sample else num_beams, "k_best": k_best,
                "max_new_tokens": max_new_tokens or task.recipe.data.max_length, "shard_size": shard_size}
    if sample:  # (only then: folders of beam search keep the manifest they always had)
        decoding |= {"sample": True, "temperature": temperature, "seed": seed}
    manifest = {"format": FORMAT, "teacher_sha256": teacher_sha256, "data_sha256": rows.sha256(), "rows": len(rows),
                "decoding": decoding, "shards": []}
    manifest["shards"] = _finished_shards(partial, manifest) if resume and partial.exists() else []
    if not manifest["shards"]:
        shutil.rmtree(partial, ignore_errors=True)
    elif partial.exists():
        remove_temp_files(partial)  # of a write the kill interrupted: not part of the data set
    try:
        partial.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"cannot create {partial} ({e.strerror}): choose a writable --out folder") from None
    teacher = teacher.eval()
    for start in range(len(manifest["shards"]) * shard_size, len(rows), shard_size):
        index = range(start, min(start + shard_size, len(rows)))
        lines = _decode_shard(task, teacher, rows, index, decoding, batch_size, device)
        name = f"shard-{start // shard_size:05d}.jsonl"
        atomic_write_text(partial / name, lines)
        manifest["shards"].append({"file": name, "rows": len(index), "sha256": hashlib.sha256(lines.encode()).hexdigest()})
        atomic_write_text(partial / MANIFEST, checked_json(manifest, indent=1))
        if progress:
            progress(f"generate: {index.stop} / {len(rows)} rows")
    partial.rename(out)
    return manifest


def _decode_shard(task, teacher, rows, index: range, decoding: dict, batch_size: int, device) -> str:
    import torch

    shard = rows.subset(list(index))
    with torch.random.fork_rng(devices=[device] if torch.device(device).type == "cuda" else []):
        torch.manual_seed(decoding.get("seed", 0) + index.start)  # a shard's samples do not depend on the ones before
        records = task.generate_targets(teacher, shard, num_beams=decoding["num_beams"],
                                        num_return_sequences=decoding["k_best"], batch_size=batch_size, device=device,
                                        max_new_tokens=decoding["max_new_tokens"], sample=decoding.get("sample", False),
                                        temperature=decoding.get("temperature", 1.0))
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def _finished_shards(partial: Path, manifest: dict) -> list[dict]:
    """The shards of a killed run that can be kept: same teacher, data and decoding, files intact. A damaged
    manifest is refused rather than discarded (writes are atomic: a kill cannot damage it)."""
    if not (partial / MANIFEST).exists():
        return []  # killed before its first shard
    old = read_checked_json(partial / MANIFEST, f"delete {partial} (or add --restart) to generate from the start",
                            required=False)
    if any(old.get(k) != manifest[k] for k in ("format", "teacher_sha256", "data_sha256", "rows", "decoding")):
        return []  # another teacher, data or decoding: start afresh
    kept = []
    for shard in old.get("shards", []):
        path = partial / str(shard.get("file"))
        if not path.is_file() or hashlib.sha256(path.read_bytes()).hexdigest() != shard.get("sha256"):
            break
        kept.append(shard)
    return kept


def generated_targets(task, rows, data_cfg, teacher: str | None) -> list:
    """The targets data_cfg.targets (a `distill generate` folder) holds for `rows`, checked against the teacher saved
    at `teacher` (default: the task's teacher checkpoint); what every task's distill_rows reads."""
    if data_cfg.targets == "auto":
        raise UserError("data.targets: auto is written by `distill run` / `distill distill` after the teacher; "
                        "here give a folder written by `distill generate`")
    teacher = teacher or task.teacher_checkpoint
    if not teacher:
        raise UserError("data.targets holds a teacher's outputs: distil from that teacher (--teacher FOLDER or "
                        "teacher.checkpoint), not from one trained in this run (or use data.targets: auto)")
    return read_generated(data_cfg.targets, rows, model_sha256(teacher), data_cfg.target_choice)


def read_generated(folder, rows, teacher_sha256: str | None, choice: str = "best") -> list:
    """The target of every row of `rows` from a finished `distill generate` folder: the teacher's best hypothesis,
    or (choice "closest") the hypothesis with the highest sentence BLEU against the reference. Refused with one line:
    a folder of another teacher, of other rows, unfinished or damaged."""
    import sacrebleu

    folder = Path(folder)
    if folder.with_name(folder.name + ".partial").exists() and not folder.exists():
        raise UserError(f"{folder} is unfinished ({folder.name}.partial): rerun the same `distill generate` to complete it")
    if not (folder / MANIFEST).is_file():
        raise UserError(f"{folder} has no {MANIFEST}: give a folder written by `distill generate`")
    manifest = read_checked_json(folder / MANIFEST, "generate again", required=False)
    if manifest.get("format") != FORMAT:
        raise UserError(f"{folder} is not a `distill generate` folder (format {manifest.get('format')!r})")
    if teacher_sha256 is not None and manifest.get("teacher_sha256") != teacher_sha256:
        raise UserError(f"{folder} was generated by another teacher than this run's: generate again with this "
                        "teacher, or distil from the teacher that generated it (--teacher)")
    if choice == "closest" and manifest.get("decoding", {}).get("k_best") == 1:
        raise UserError(f"{folder} holds one translation per sentence, and data.target_choice: closest picks among the "
                        "teacher's k best: generate with --k-best 5 (or generate.k_best), or use target_choice best")
    if manifest.get("data_sha256") != rows.sha256():
        raise UserError(f"{folder} was generated from other training rows than this recipe's (data, split or "
                        "max_length differ): generate again with this recipe")
    targets = []
    for shard in manifest["shards"]:
        raw = (folder / shard["file"]).read_bytes()
        if hashlib.sha256(raw).hexdigest() != shard["sha256"]:
            raise UserError(f"{folder / shard['file']} is damaged (sha256 differs from the manifest): generate again")
        for line in raw.decode("utf-8").splitlines():
            row = json.loads(line)
            hyps = row["hypotheses"]
            if choice == "closest":
                hyps = sorted(hyps, key=lambda h: -sacrebleu.sentence_bleu(h, [row["reference"]]).score)
            targets.append(hyps[0])
    if len(targets) != len(rows):
        raise UserError(f"{folder} holds {len(targets)} targets for {len(rows)} training rows: generate again")
    return targets
