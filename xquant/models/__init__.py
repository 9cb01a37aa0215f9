"""xquant's own PyTorch implementations of architectures that neither transformers nor llama.cpp
ships (their checkpoints carry remote code). Each module registers its config and model with
transformers' Auto classes when imported; the architecture's TOML names the module
(`transformers_as.module`), and `hf_config` / the runtimes import it before loading.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def transformers_fields(config: dict[str, Any], source: str = "config.json") -> dict[str, Any]:
    """config.json's fields as transformers should read them: for an architecture that ships as
    remote code (the registry's `transformers_as`), the class transformers or xquant has for its
    math named instead (its module imported, so the class is registered)."""
    from ..arch import for_config

    alias = for_config(config, source).transformers_as
    if alias is None:
        return dict(config)
    alias.register()
    return {**config, **alias.config_fields()}


def hf_config(path: Path):
    """The transformers config of the checkpoint directory `path` (see `transformers_fields`)."""
    from transformers import AutoConfig

    from ..arch import for_config

    source = Path(path) / "config.json"
    config = json.loads(source.read_text())
    if for_config(config, str(source)).transformers_as is None:
        return AutoConfig.from_pretrained(path)
    fields = transformers_fields(config, str(source))
    fields.pop("auto_map", None)
    return AutoConfig.for_model(fields.pop("model_type"), **fields)
