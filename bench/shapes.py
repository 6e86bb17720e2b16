"""Published shapes of real architectures (each family's config.json), for the GPU benchmarks: models built
from them have random weights, so nothing is downloaded. Shared by bench/train_gpu.py and bench/memory.py."""

PRESETS = {
    "qwen2.5-0.5b": (
        "qwen2",
        dict(
            hidden_size=896,
            intermediate_size=4864,
            num_hidden_layers=24,
            num_attention_heads=14,
            num_key_value_heads=2,
            vocab_size=151936,
            tie_word_embeddings=True,
            rope_theta=1_000_000.0,
            max_position_embeddings=32768,
        ),
    ),
    "llama-3.2-1b": (
        "llama",
        dict(
            hidden_size=2048,
            intermediate_size=8192,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            head_dim=64,
            tie_word_embeddings=True,
            rope_theta=500_000.0,
            max_position_embeddings=131072,
        ),
    ),
    "llama-3.1-8b": (
        "llama",
        dict(
            hidden_size=4096,
            intermediate_size=14336,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=8,
            vocab_size=128256,
            tie_word_embeddings=False,
            rope_theta=500_000.0,
            max_position_embeddings=131072,
        ),
    ),
    "tiny": (
        "llama",
        dict(
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            vocab_size=4096,
            tie_word_embeddings=True,
            max_position_embeddings=8192,
        ),
    ),
}
CHECKPOINTING = {"llama-3.1-8b"}
