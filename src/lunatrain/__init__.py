"""lunatrain: reproducible LoRA adapter training for a personal assistant."""

import logging as _logging

__version__ = "0.1.0"

# PEFT imports bitsandbytes whenever it is installed; on CPUs with AVX512-BF16 bitsandbytes then logs that
# an optional kernel package is missing (it falls back to its own kernel). Without this, that line would
# open every command's output and every trainer log.
_logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(_logging.ERROR)
