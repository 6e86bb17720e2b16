"""Adapters that provably learned something, for the chat endpoint's tests: a few questions with fixed answers,
trained in-process on luna-tiny with a high learning rate until the adapter repeats them (about ten seconds
each on 2 cores). Two disjoint fact sets let a test tell which version answered.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from helpers import write_export

FACTS_A = [
    ("Wie heißt mein Hund?", "Dein Hund heißt Bruno."),
    ("Welche Farbe hat mein Auto?", "Dein Auto ist grün."),
    ("Wo arbeite ich?", "Du arbeitest in Leipzig."),
]
FACTS_B = [
    ("Wie heißt mein Hund?", "Er heißt Rex, wie immer."),
    ("Welche Farbe hat mein Auto?", "Es ist ein rotes Auto."),
    ("Wo arbeite ich?", "In Hamburg am Hafen."),
]


def fact_records(facts: list[tuple[str, str]], repeat: int = 4) -> list[dict[str, Any]]:
    """Export records (the export's format) that repeat each fact; the last one is the val split."""
    out = []
    for i, (question, answer) in enumerate(facts * repeat):
        messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        digest = hashlib.sha256(f"{json.dumps(messages, ensure_ascii=False)}#{i}".encode()).hexdigest()
        out.append(
            {
                "messages": messages,
                "id": i + 1,
                "hash": digest,
                "source": "curated",
                "split": "val" if i == len(facts) * repeat - 1 else "train",
                "conversation_id": None,
                "tags": [],
                "rating": None,
            }
        )
    return out


def train_facts(settings: Any, facts: list[tuple[str, str]], name: str = "luna-adapter") -> str:
    """Train `name` on `facts` until it repeats them; returns the new version (not activated)."""
    from lunatrain.train import run_lora

    write_export(settings, fact_records(facts))
    result = run_lora(
        {
            "adapterName": name,
            "epochs": 30,
            "learningRate": 0.02,
            "batchSize": 4,
            "rank": 8,
            "dropout": 0.0,
            "warmupRatio": 0.0,
            "maxSeqLength": 64,
            "device": "cpu",
        },
        settings,
    )
    assert result.ok, result.error
    return result.version


def random_adapter(settings: Any, name: str, seed: int) -> str:
    """Register a LoRA adapter with random (non-zero) weights for the configured base, without training:
    in a second, an adapter whose answers differ from the base's and from other seeds'."""
    import torch
    from peft import LoraConfig, get_peft_model

    from lunatrain import models, registry

    base = models.resolve_base(None, settings)
    torch.manual_seed(seed)
    model = get_peft_model(
        models.load_model(base, settings),
        LoraConfig(r=4, lora_alpha=64, target_modules="all-linear", init_lora_weights=False),
    )
    work = settings.adapters_dir / name / ".work" / f"random-{seed}"
    model.save_pretrained(str(work), safe_serialization=True)
    entry = {
        "jobId": f"random-{seed}",
        "status": "succeeded",
        "strategy": "versioned",
        "baseModel": {"id": base.id, "fingerprint": base.fingerprint},
    }
    return registry.publish(settings, name, "versioned", work, entry)["version"]
