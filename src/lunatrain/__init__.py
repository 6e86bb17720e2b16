"""lunatrain: reproducible LoRA adapter training for a personal assistant."""

from . import compat as _compat

__version__ = "0.1.0"

_compat.quiet_bitsandbytes()
