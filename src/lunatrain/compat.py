"""Version quirks of transformers / PEFT / torch, each in one place with the releases it serves.

Nothing else in the package silences a library warning or touches a private attribute.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator


@contextlib.contextmanager
def peft_wrapping() -> Iterator[None]:
    """Around `get_peft_model` / `PeftModel.from_pretrained` / `load_adapter`.

    PEFT (0.21, with transformers 5.24) asks the model `is_gradient_checkpointing`, which transformers 5.x deprecates for v6
    with a FutureWarning on every call: noise for the user, nothing they can act on. Remove this when PEFT
    asks `is_activation_checkpointing` instead.
    """
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*", category=FutureWarning)
        yield
