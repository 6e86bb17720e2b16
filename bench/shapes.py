"""Published shapes of real architectures, for the GPU benchmarks: models built from them have random weights,
so nothing is downloaded. Shared by bench/train_gpu.py and bench/memory.py.

The dimensions are those of the memory plan's reference shapes (the published config.json values that
`lunatrain health` plans with, src/lunatrain/resources/memplan/reference-shapes.json), so the benchmarks
measure exactly the shapes the plan describes; each preset adds the architecture and what the shape alone
does not say (RoPE base, context length)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_REFERENCE = Path(__file__).resolve().parent.parent / "src/lunatrain/resources/memplan/reference-shapes.json"
_SHAPES = {s.pop("name"): s for s in json.loads(_REFERENCE.read_text(encoding="utf-8"))["shapes"]}


def _published(name: str) -> dict[str, Any]:
    return dict(_SHAPES[name])


# preset -> (model_type, config values)
PRESETS: dict[str, tuple[str, dict[str, Any]]] = {
    "qwen2.5-0.5b": ("qwen2", _published("Qwen2.5-0.5B") | {"rope_theta": 1e6, "max_position_embeddings": 32768}),
    "llama-3.2-1b": ("llama", _published("Llama-3.2-1B") | {"rope_theta": 5e5, "max_position_embeddings": 131072}),
    "llama-3.1-8b": ("llama", _published("Llama-3.1-8B") | {"rope_theta": 5e5, "max_position_embeddings": 131072}),
    # a smoke-test shape for --device cpu
    "tiny": (
        "llama",
        {
            "hidden_size": 128,
            "intermediate_size": 256,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "vocab_size": 4096,
            "tie_word_embeddings": True,
            "max_position_embeddings": 8192,
        },
    ),
}
CHECKPOINTING = {"llama-3.1-8b"}
