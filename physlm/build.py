"""Building a run's networks: the language model of `architecture` and, for ResNet-BK with
energy heads, its energy penalty (physlm.physics), seeded."""

from __future__ import annotations

import torch
from torch import nn

from physlm.config import Config, ModelConfig
from physlm.lstm import LSTMLanguageModel
from physlm.model import BKLayer, ResNetBK
from physlm.physics import EnergyHeads, EnergyPenalty
from physlm.transformer import Transformer


def build_model(config: Config, vocab_size: int) -> tuple[nn.Module, EnergyPenalty | None]:
    """The language model and its energy penalty (None without energy heads), seeded.

    Parameters are drawn in the order of the original's single model, block by block
    (layer l, then its heads), so the initial weights do not depend on where the heads live.
    The baselines (`architecture` transformer or lstm) have no penalty.
    """
    torch.manual_seed(config.train.seed)
    if config.model.architecture == "transformer":
        return Transformer(config.model, vocab_size), None
    if config.model.architecture == "lstm":
        return LSTMLanguageModel(config.model, vocab_size), None
    heads: list[EnergyHeads] = []

    def layer_then_heads(model_config: ModelConfig) -> BKLayer:
        layer = BKLayer(model_config)
        if model_config.energy_heads:
            heads.append(EnergyHeads(model_config.d_model))
        return layer

    model = ResNetBK(config.model, vocab_size, layer_then_heads)
    return model, EnergyPenalty(config.physics, heads) if heads else None
