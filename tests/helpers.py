"""Test helpers shared by several test modules: a small, realistic export written in the export's format.

`write_export(settings)` writes data/training/assistant-sft-*.jsonl and the summary the way `lunatrain
export` does (OpenAI chat records with id/hash/source/split), so training and preflight tests can run
without a database. `tier_data(...)` gives the same records as an in-memory TierData-like object.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SYSTEM = "Du bist Luna, eine freundliche persönliche Assistentin. Antworte kurz und genau."

_NAMES = ["Anna", "Ben", "Clara", "David", "Emma", "Felix", "Greta", "Hannes", "Ida", "Jonas", "Lena", "Max"]
_CITIES = ["Berlin", "Hamburg", "München", "Köln", "Leipzig", "Dresden", "Bremen", "Wien", "Zürich", "Graz"]
_DAYS = ["Montag", "Dienstag", "Mittwoch", "Donnerstag", "Freitag", "Samstag", "Sonntag"]
_COLORS = ["blau", "grün", "rot", "gelb", "schwarz", "weiß"]


def _samples(n: int, seed: int) -> list[tuple[str, str, str]]:
    """(source, prompt, response) triples in a few recurring patterns, German and English, varied lengths."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        kind = i % 6
        name, city, day = rng.choice(_NAMES), rng.choice(_CITIES), rng.choice(_DAYS)
        a, b = rng.randint(2, 60), rng.randint(2, 60)
        if kind == 0:
            out.append(("curated", f"Was ist {a} + {b}?", f"{a} + {b} = {a + b}."))
        elif kind == 1:
            out.append(("curated", f"What is {a} plus {b}?", f"{a} plus {b} is {a + b}."))
        elif kind == 2:
            out.append(("memory", f"Wo wohnt {name}?", f"{name} wohnt in {city}."))
        elif kind == 3:
            out.append(
                (
                    "curated",
                    f"Erinnere mich am {day} an den Termin mit {name}.",
                    f"Gern. Ich erinnere dich am {day} an deinen Termin mit {name}.",
                )
            )
        elif kind == 4:
            color = rng.choice(_COLORS)
            out.append(("memory", f"Welche Farbe mag {name}?", f"{name} mag am liebsten {color}."))
        else:
            items = rng.sample(
                ["Milch", "Brot", "Eier", "Äpfel", "Kaffee", "Butter", "Käse", "Reis"], rng.randint(2, 6)
            )
            out.append(
                (
                    "curated",
                    "Schreib mir eine kurze Einkaufsliste: " + ", ".join(items) + ".",
                    "Einkaufsliste:\n" + "\n".join(f"- {x}" for x in items),
                )
            )
    return out


def make_records(n: int = 120, *, seed: int = 0, val_every: int = 8, multi_turn_every: int = 10) -> list[dict]:
    """Export records in the export's format; every `val_every`-th sample is in the val split."""
    records, seen = [], set()
    for source, prompt, response in _samples(4 * n, seed):
        if len(records) == n:
            break
        if (prompt, response) in seen:  # the export deduplicates by content; so does this fixture
            continue
        seen.add((prompt, response))
        i = len(records)
        messages = [
            {"role": "system", "content": SYSTEM},
            {"role": "user", "content": prompt},
            {"role": "assistant", "content": response},
        ]
        if multi_turn_every and i % multi_turn_every == multi_turn_every - 1:
            messages += [{"role": "user", "content": "Danke!"}, {"role": "assistant", "content": "Gern geschehen."}]
        h = hashlib.sha256(json.dumps(messages, ensure_ascii=False, sort_keys=True).encode()).hexdigest()
        records.append(
            {
                "messages": messages,
                "id": i + 1,
                "hash": h,
                "source": source,
                "split": "val" if i % val_every == val_every - 1 else "train",
                "conversation_id": None,
                "tags": [],
                "rating": None,
            }
        )
    return records


@dataclass
class TierData:
    train: list[dict]
    val: list[dict]
    test: list[dict]
    fingerprint: str
    summary: dict[str, Any] = field(default_factory=dict)


def tier_data(records: list[dict]) -> TierData:
    by = {s: [r for r in records if r["split"] == s] for s in ("train", "val", "test")}
    fp = hashlib.sha256("\n".join(r["hash"] for r in records).encode()).hexdigest()
    return TierData(
        by["train"], by["val"], by["test"], fp, {"fingerprint": fp, "counts": {k: len(v) for k, v in by.items()}}
    )


def _jsonl(path: Path, records: list[dict]) -> dict[str, Any]:
    data = "".join(json.dumps(r, ensure_ascii=False, sort_keys=True, separators=(",", ":")) + "\n" for r in records)
    path.write_bytes(data.encode("utf-8"))
    return {"sha256": hashlib.sha256(data.encode("utf-8")).hexdigest(), "count": len(records)}


def write_export(settings: Any, records: list[dict] | None = None) -> Any:
    """Write the tier files and a summary that `lunatrain.export.read_tier` accepts (same names, sha256s and
    fingerprint rule as `lunatrain export`); return `read_tier(settings, "curated")`."""
    from lunatrain.export import SUMMARY_FORMAT, dataset_fingerprint, read_tier

    records = make_records() if records is None else records
    d: Path = settings.training_dir
    d.mkdir(parents=True, exist_ok=True)
    curated = [r for r in records if r["source"] == "curated"]
    memory = [r for r in records if r["source"] == "memory"]
    files = {"assistant-sft-curated.jsonl": _jsonl(d / "assistant-sft-curated.jsonl", curated)}
    for split in ("train", "val", "test"):
        name = f"assistant-sft-curated-{split}.jsonl"
        files[name] = _jsonl(d / name, [r for r in curated if r["split"] == split])
    files["assistant-sft-memory.jsonl"] = _jsonl(d / "assistant-sft-memory.jsonl", memory)
    files["assistant-sft.jsonl"] = _jsonl(d / "assistant-sft.jsonl", records)
    fingerprint = dataset_fingerprint({name: f["sha256"] for name, f in files.items()})
    counts = {
        tier: {"total": len(rs), **{s: sum(1 for r in rs if r["split"] == s) for s in ("train", "val", "test")}}
        for tier, rs in (("curated", curated), ("memory", memory), ("merged", records))
    }
    summary = {
        "format": SUMMARY_FORMAT,
        "exported_at": "2026-01-01T00:00:00+00:00",
        "store_revision": "test-1",
        "ratios": {"train": 0.875, "val": 0.125, "test": 0.0},
        "counts": counts,
        "files": files,
        "fingerprint": fingerprint,
    }
    (d / "assistant-sft-summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n", "utf-8")
    return read_tier(settings, "curated")


def adapter_work_dir(settings: Any, name: str, tag: str) -> Path:
    """A run's work folder holding the files a version must have to be activated or served
    (registry.ADAPTER_FILES), each containing `tag`: for registry tests that need no real weights."""
    from lunatrain import registry

    work = settings.adapters_dir / name / ".work" / tag
    work.mkdir(parents=True)
    for file_name in registry.ADAPTER_FILES:
        (work / file_name).write_text(tag)
    return work


def recorded_job(
    data_dir: Path, status: str, adapter_name: str = "luna-adapter", *, resume: bool = False, **fields: Any
) -> Any:
    """A job in the data root's job database, moved to `status` (with `fields`, e.g. error=...), as a trainer
    that has since stopped left it: for the readers of that database without a trainer. `resume`: a job
    submitted with `"resume": true` (`jobs resume`)."""
    from lunatrain.params import LoraParams
    from lunatrain.service.jobs import JobStore, jobs_db_path

    jobs = JobStore(jobs_db_path(data_dir))
    try:
        job, _ = jobs.create(LoraParams(adapter_name=adapter_name, base_model="luna-tiny", resume=resume))
        return jobs.set_status(job.id, status, **fields)
    finally:
        jobs.close()


# Three short golden cases of the shipped suite's kinds: a test about a flow's steps and decisions gates on
# these instead of the shipped 17 at 128 new tokens each (most of such a test's time on luna-tiny, which never
# stops early). The shipped suite itself is gated on by test_evalgate.py and the whole-flow tests.
SMALL_SUITE = [
    {"id": "identity-de", "lang": "de", "prompt": "Wer bist du?", "maxNewTokens": 8,
     "checks": [{"type": "contains", "value": "Luna"}, {"type": "stops"}, {"type": "max_chars", "value": 400}]},
    {"id": "identity-en", "lang": "en", "prompt": "Who are you?", "maxNewTokens": 8,
     "checks": [{"type": "contains", "value": "Luna"}, {"type": "not_contains", "value": ["<|im_start|>"]}]},
    {"id": "persona", "lang": "de", "system": "Du bist Luna.", "prompt": "Wie heißt du?", "maxNewTokens": 8,
     "checks": [{"type": "contains", "value": "Luna"}, {"type": "max_chars", "value": 300}]},
]  # fmt: skip


def write_small_suite(settings: Any) -> Path:
    """SMALL_SUITE as the data root's golden suite (in place of the shipped one)."""
    settings.eval_dir.mkdir(parents=True, exist_ok=True)
    path = settings.eval_dir / "luna-golden.jsonl"
    path.write_text("".join(json.dumps(case, ensure_ascii=False) + "\n" for case in SMALL_SUITE), encoding="utf-8")
    return path
