"""The study's variants: each a params file, params/<name>.yaml, registered here with the label
the report gives it and the variant it is paired against, seed by seed.
"""

from __future__ import annotations

from dataclasses import dataclass

# Two variants have a role: CONTROL is the baseline every variant is compared with unless
# its entry names another (the ResNet-BK model, its energy penalty off), REPLICA the
# original's flaws, where the ablation starts.
CONTROL = "control"
REPLICA = "replica"
# Physics is said to "act as regularization": a physics recipe on the reference layer is also
# compared with the control whose dropout and weight decay were tuned (when the study has it).
REGULARISED = "control_regularised"


@dataclass(frozen=True)
class Variant:
    """A study variant, params/<name>.yaml: the label the report gives it, the variant it is
    paired against, seed by seed (the run it may fork its warmup from, too), and the
    variants it is also compared with when the study has them."""

    label: str
    control: str = CONTROL
    also: tuple[str, ...] = ()


# The study's variants, in the report's order.
_ALSO = (REGULARISED,)
VARIANTS = {"plain": Variant("Phase 1: ResNet-BK (plain)"),
            "koopman": Variant("Phase 2: Koopman ResNet-BK"),
            "physics_reference": Variant("Phase 3: physics, reference recipe", also=_ALSO),
            "physics_recommended": Variant("Phase 3: physics, recommended recipe", also=_ALSO),
            "physics_depth": Variant("Phase 3: physics, depth energy", also=_ALSO),
            "physics_warmup6": Variant("Phase 3: recommended recipe, physics from epoch 6",
                                       also=_ALSO),
            "physics_target_half": Variant("Phase 3: recommended recipe, drift target halved",
                                           also=_ALSO),
            "physics_rate": Variant("Phase 3: drift target halved, multiplier rate x100",
                                    also=_ALSO),
            CONTROL: Variant("Control (physics off)"),
            REGULARISED: Variant("Control with tuned dropout and weight decay"),
            "lstm": Variant("Baseline: LSTM (tied)"),
            "transformer": Variant("Baseline: Transformer (GPT)"),
            "layer_shifts": Variant("ResNet-BK, 4 potentials with learned shifts"),
            "layer_coupling": Variant("ResNet-BK, coupling from the tokens"),
            "layer_balance": Variant("ResNet-BK, MoE load balancing"),
            "improved": Variant("ResNet-BK, resolvent on the features (physics off)")}
# Issue 23's variants one or two changes from the improved layer or its tied form
# (params/<name>.yaml says which), each paired against the layer it changes.
_CHANGES = {
    "improved": {
        "physics_improved": "Physics on the improved ResNet-BK, recommended recipe",
        "improved_tied": "The improved ResNet-BK, tied head, d_model 88",
        "improved_gated": "The improved ResNet-BK with selective write and read gates",
        "improved_memory": "The improved ResNet-BK, shifts from gamma 0.02",
        "improved_memory16": "The improved ResNet-BK, 16 potentials, shifts from gamma 0.02",
        "improved_band_centre": "The improved ResNet-BK started at the band centre",
        "improved_band_centre_memory": "The improved ResNet-BK started at the band centre, "
                                       "shifts from gamma 0.02",
        "improved_coupling": "The improved ResNet-BK with the hopping from the tokens",
        "improved_channels": "The improved ResNet-BK with one potential per feature"},
    "improved_tied": {
        "physics_improved_tied": "Physics on the tied improved ResNet-BK, recommended recipe",
        "improved_tied_gated": "The tied improved ResNet-BK with selective gates, d_model 84",
        "improved_tied_memory": "The tied improved ResNet-BK, shifts from gamma 0.02",
        "improved_tied_d104": "The tied improved ResNet-BK, d_model 104, 2 layers",
        "improved_tied_d120": "The tied improved ResNet-BK, d_model 120, 2 layers, 2 experts",
        "improved_tied_dense": "The tied improved ResNet-BK with one expert per layer, "
                               "d_model 112",
        "improved_tied_deep6": "The tied improved ResNet-BK, d_model 76, 6 layers",
        "improved_tied_deep8": "The tied improved ResNet-BK, d_model 68, 8 layers",
        "improved_tied_deep16": "The tied improved ResNet-BK, d_model 52, 16 layers",
        "improved_tied_deep24": "The tied improved ResNet-BK, d_model 44, 24 layers",
        "improved_tied_deep32": "The tied improved ResNet-BK, d_model 36, 32 layers"},
    "improved_tied_deep16": {
        "physics_improved_tied_deep16": "Physics on the 16-layer tied improved ResNet-BK, "
                                        "recommended recipe",
        "improved_tied_deep16_e96": "The 16-layer tied improved ResNet-BK at d_model 40, "
                                    "embedding width 96"}}
VARIANTS |= {name: Variant(text, control=control)
             for control, changes in _CHANGES.items() for name, text in changes.items()}


def label(variant: str) -> str:
    """The report's name of a variant (its own name when it is not registered)."""
    return VARIANTS[variant].label if variant in VARIANTS else variant


def against_of(variant: str, variants: list[str]) -> list[str]:
    """Every variant `variant` is compared with in a study of `variants`: its control, then
    those of its `also` that the study has."""
    also = VARIANTS[variant].also if variant in VARIANTS else ()
    return [control_of(variant), *(v for v in also if v in variants)]


def control_of(variant: str) -> str:
    """The variant `variant` is paired against (the study's control when not registered)."""
    return VARIANTS[variant].control if variant in VARIANTS else CONTROL
