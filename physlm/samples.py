"""What the models write, side by side: the samples tables of the run report and the study
report, from each run's samples.json (physlm.generate writes it). Every cell is escaped
(text.literal): a continuation is model output, never markup."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import pandas as pd

from physlm.runs import RunData
from physlm.text import NA, Table, fmt, literal


@dataclass
class Samples:
    """Continuations of the fixed validation prompts by several models, side by side, from
    their samples.json (physlm.generate); every cell escaped (text.literal)."""

    table: Table
    drawn: list[str]       # how they were drawn: one entry when every model drew alike, else
                           # "model: how" for each
    same_draws: bool       # every model drew at random with the same settings and seed
    missing: list[str]     # models without samples.json (n/a in the table)
    prompt: str | None = None   # the one prompt (escaped) of a table without a prompt column


def drawn_with(record: dict[str, Any]) -> str:
    """How one sample was drawn, in words."""
    if not record.get("temperature"):
        how = "the most likely word each time (temperature 0)"
    else:
        top_k = f"top-k {record['top_k']}" if record.get("top_k") else "no top-k"
        how = (f"drawn at temperature {fmt(record['temperature'])}, {top_k}, "
               f"seed {record.get('seed', NA)}")
    return (f"{record.get('tokens', NA)} words, {how}, by the "
            f"{record.get('checkpoint', 'last')} checkpoint")


def samples_table(frame: pd.DataFrame, models: dict[str, list[dict[str, Any]]]) -> Samples:
    """`frame`, the continuations of `models` (name -> its samples.json records), with how
    they were drawn."""
    ways = {name: list(dict.fromkeys(map(drawn_with, model))) for name, model in models.items()
            if model}
    alike = len({way for model in ways.values() for way in model}) == 1
    drawn = next(iter(ways.values())) if alike else [
        f"{name.lower()}: {way}" for name, model in ways.items() for way in model]
    return Samples(Table(frame), drawn, same_draws=alike and all(
        r.get("temperature") for model in models.values() for r in model),
        missing=[name for name, model in models.items() if not model])


def continuation(records: list[dict[str, Any]], prompt: str) -> str | None:
    """The continuation of `prompt` among `records`, escaped; None when there is none."""
    found = [r["continuation"] for r in records if r["prompt"] == prompt]
    return literal(found[0]) if found else None


def run_samples(run: RunData, control: RunData | None) -> Samples | None:
    """The run's and its control's continuations, one row per prompt of the run's; None when
    the run has no samples.json."""
    models = {"Run": run.run.read_samples(),
              **({"Control": control.run.read_samples()} if control else {})}
    if not models["Run"]:
        return None
    prompts = [r["prompt"] for r in models["Run"]]
    frame = pd.DataFrame({"Prompt": [literal(p) for p in prompts],
                          **{name: [continuation(records, p) for p in prompts]
                             for name, records in models.items()}}, dtype=object)
    return samples_table(frame, models)
