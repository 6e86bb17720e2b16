"""Published shapes of real architectures, for the GPU benchmarks: models built from them have random weights,
so nothing is downloaded. Shared by bench/train_gpu.py and bench/memory.py.

The dimensions are those of the memory plan's reference shapes (the published config.json values that
`lunatrain health` plans with, src/lunatrain/resources/memplan/reference-shapes.json), so the benchmarks
measure exactly the shapes the plan describes; each preset adds the architecture and what the shape alone
does not say (RoPE base, context length).

`build_on_disk` writes a preset's random bfloat16 weights to a folder, for the benchmarks that load a model
as a job does (from disk, quantized ones included)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from benchargs import run

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


def build_on_disk(name: str, out: Path, device: str = "cuda") -> None:
    """Write preset `name` with random bfloat16 weights to `out`. On a GPU in a fresh process, so that none of
    the device memory it took stays with the benchmark (`python bench/shapes.py NAME OUT DEVICE`)."""
    if device == "cpu":
        _build(name, out, device)
        return
    built = subprocess.run([sys.executable, __file__, name, str(out), device], check=False)
    if built.returncode != 0:
        raise SystemExit(f"building {name} failed")


def config(name: str) -> Any:
    """The transformers config of preset `name`."""
    from transformers import AutoConfig

    model_type, shape = PRESETS[name]
    return AutoConfig.for_model(model_type, **shape)


def random_model(name: str, device: str, dtype: Any) -> Any:
    """Preset `name` with random weights (seed 0), built on `device`."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config(name), dtype=dtype)


def _build(name: str, out: Path, device: str) -> None:
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a shard bar per model is noise in a benchmark's output
    random_model(name, device, torch.bfloat16).save_pretrained(out)


if __name__ == "__main__":
    # The child entry point of build_on_disk, not a benchmark: its three words, or one line of usage.
    if len(sys.argv) != 4 or sys.argv[1] not in PRESETS or sys.argv[3] not in ("cpu", "cuda"):
        print(f"usage: python bench/shapes.py PRESET OUT cpu|cuda (PRESET: {', '.join(PRESETS)})", file=sys.stderr)
        sys.exit(2)
    run(lambda: _build(sys.argv[1], Path(sys.argv[2]), sys.argv[3]))
