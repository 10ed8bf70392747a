"""The model families mlxring runs through the ring, each checked token for token against
mlx-lm on the whole model (tests/test_families.py). A model of any other type is refused at
start unless the user asks to run it unverified (`allow_unverified`), through the llama-style
defaults of `Family`.
"""

from __future__ import annotations

from typing import Any

from mlxring.model.families.base import FULL, Family, FamilyError, Kind, Shape
from mlxring.model.families.deepseek import DeepseekV3, DeepseekV32, KimiK25
from mlxring.model.families.dense import Cohere, Granite, Olmo2, Phi3
from mlxring.model.families.gemma import Gemma2, Gemma3Text, Gemma4Text
from mlxring.model.families.gpt_oss import GptOss
from mlxring.model.families.llama import Llama, Llama3, Ministral3, Mistral
from mlxring.model.families.llama4 import Llama4Text
from mlxring.model.families.moe import Glm4Moe, MiniMax, Mixtral
from mlxring.model.families.qwen import Qwen2, Qwen3, Qwen3Moe
from mlxring.model.families.qwen3_next import Qwen3Next, Qwen35, Qwen35Moe

__all__ = [
    "FULL",
    "MADE",
    "SUPPORTED",
    "Family",
    "FamilyError",
    "Kind",
    "Shape",
    "family_of",
    "model_type",
]

#: what `mlxring make-model --family` makes, by name (a model type, or llama3: llama with
#: Llama 3.1's rope scaling).
MADE: dict[str, Family] = {
    "llama": Llama(),
    "llama3": Llama3(),
    "mistral": Mistral(),
    "ministral3": Ministral3(),
    "qwen2": Qwen2(),
    "qwen3": Qwen3(),
    "qwen3_moe": Qwen3Moe(),
    "qwen3_next": Qwen3Next(),
    "qwen3_5": Qwen35(),
    "qwen3_5_moe": Qwen35Moe(),
    "deepseek_v3": DeepseekV3(),
    "deepseek_v32": DeepseekV32(),
    "kimi_k25": KimiK25(),
    "glm4_moe": Glm4Moe(),
    "gpt_oss": GptOss(),
    "minimax": MiniMax(),
    "mixtral": Mixtral(),
    "gemma2": Gemma2(),
    "gemma3_text": Gemma3Text(),
    "gemma4_text": Gemma4Text(),
    "llama4_text": Llama4Text(),
    "phi3": Phi3(),
    "olmo2": Olmo2(),
    "granite": Granite(),
    "cohere": Cohere(),
}

#: model_type (as config.json spells it) -> the family that runs it.
SUPPORTED: dict[str, Family] = {t: f for f in MADE.values() for t in f.model_types}

UNVERIFIED = Family()


def model_type(config: dict[str, Any]) -> str:
    return str(config.get("model_type"))


def family_of(config: dict[str, Any], allow_unverified: bool = False) -> Family:
    """The family that runs a model of this config.json; FamilyError (one line) for a type
    that is not verified through the ring, unless `allow_unverified`."""
    kind = model_type(config)
    family = SUPPORTED.get(kind)
    if family is not None:
        return family
    if allow_unverified:
        return UNVERIFIED
    raise FamilyError(
        f"model type {kind!r} is not verified to run exactly through the ring "
        "(supported: " + ", ".join(sorted(SUPPORTED)) + "); set allow_unverified = true "
        "in [cluster] to run it anyway, at your own risk"
    )
