"""What a run's model writes: sampling continuations of a prompt.

    p(w | context) = softmax(logits(context) / T),  restricted to the k most likely words

A run's language model is rebuilt from its config.yaml and given the weights of one of
its checkpoints (loaded weights only, as a resume loads them), its vocabulary from
vocab.json. A prompt is read as physlm's data is: whitespace tokens, and a word the
vocabulary lacks becomes `<unk>` (the sample lists such words). Each new word is drawn
from the next-word distribution at the end of the text so far:

- ResNet-BK (causal) and the Transformer read the last n_seq tokens, at positions
  0..n-1 as in training (a sliding window): older tokens have no effect.
- a recurrent model (one with an `initial_state`: the LSTM) reads the prompt once and
  then each new word once, carrying its (h, c) state, so every earlier word acts on the
  next through that state.

Temperature 0 takes the argmax. Otherwise the draw comes from a `torch.Generator` of its
own, seeded: the same seed gives the same text, and the global RNG is left alone. A
bidirectional ResNet-BK (the replica) is refused: its position i reads the potential of
the token at i + 1, the word it is asked to predict, so it has no next-word distribution.

`write_samples` puts the continuations of the fixed prompts into the run directory
(samples.json). The prompts are the first PROMPT_WORDS words of PROMPT_COUNT evenly
spaced paragraphs of the validation text (`fixed_prompts`): the same for every run on
the same data, whatever its model, vocabulary or n_seq.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from physlm.build import build_model
from physlm.checkpoint import WEIGHT_FORMATS, load_checkpoint
from physlm.config import Config, ModelConfig
from physlm.data import Vocabulary, split_lines, tokenize
from physlm.errors import CheckpointError, GenerationError
from physlm.runs import RunDirectory

CHECKPOINTS = ("last", "best")  # a run's checkpoints by name; the first is the default
PROMPT_COUNT = 3   # fixed prompts per run
PROMPT_WORDS = 8   # words of each


@dataclass(frozen=True)
class SampleSettings:
    """How to sample: `tokens` new words at `temperature` (0: argmax) from the `top_k` most
    likely (None: all), drawn with `seed`. The defaults are those of the command and of
    samples.json."""

    tokens: int = 40
    temperature: float = 0.8
    top_k: int | None = None
    seed: int = 0

    def check(self) -> SampleSettings:
        if self.tokens < 1:
            raise GenerationError(f"tokens must be >= 1, got {self.tokens}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise GenerationError(f"temperature must be >= 0 (0: argmax), got {self.temperature}")
        if self.top_k is not None and self.top_k < 1:
            raise GenerationError(f"top_k must be >= 1, got {self.top_k}")
        return self


@dataclass
class Sample:
    """One continuation, with what produced it (a record of samples.json)."""

    prompt: str
    continuation: str
    tokens: int
    temperature: float
    top_k: int | None
    seed: int
    checkpoint: str
    unknown: list[str] = field(default_factory=list)  # prompt words read as <unk>


@dataclass
class RunModel:
    """A run's language model in eval mode, with its vocabulary and configuration."""

    model: nn.Module
    vocab: Vocabulary
    config: Config
    checkpoint: str        # whose weights: "last" or "best"


# ------------------------------------------------------------------ loading a run
def _build_model(config: Config, vocab_size: int) -> nn.Module:
    """The run's language model with fresh weights (the trainer's constructor), without
    moving the global RNG, which the constructor seeds."""
    with torch.random.fork_rng(devices=[]):
        model, _penalty = build_model(config, vocab_size)
    return model


def is_causal(model: ModelConfig) -> bool:
    """Whether position i's output depends on tokens <= i only: whether the model can write."""
    return not (model.architecture == "resnet_bk" and model.bk_mode == "bidirectional")


def checkpoint_path(run: RunDirectory, which: str) -> Path:
    """The file of checkpoint `which`: "last", or "best" (the weights of the best epoch so
    far, on the held-out split when the run has one: physlm.rundata)."""
    if which in CHECKPOINTS:
        return run.checkpoint if which == "last" else run.best_checkpoint
    raise GenerationError(f"checkpoint must be one of {', '.join(CHECKPOINTS)}, got {which!r}")


def load_weights(config: Config, vocab_size: int, path: Path) -> nn.Module:
    """The model of `config` with the weights of checkpoint `path`, in eval mode (CPU)."""
    state = load_checkpoint(path, formats=WEIGHT_FORMATS)
    model = _build_model(config, vocab_size)
    try:
        model.load_state_dict(state["model"])
    except (KeyError, RuntimeError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise CheckpointError(f"{path} does not hold this run's model ({first}); was the "
                              "run's config.yaml or vocab.json replaced?") from error
    return model.eval()


def load_run_model(run_dir: str | Path, checkpoint: str = CHECKPOINTS[0]) -> RunModel:
    """The model of the run in `run_dir` with the weights of its `checkpoint`."""
    run = RunDirectory(run_dir)
    if not run.root.is_dir():
        raise GenerationError(f"run directory {run.root} not found")
    if not run.config.is_file():
        raise GenerationError(f"{run.root} is not a run directory: it has no config.yaml")
    config = run.read_config()
    if not is_causal(config.model):
        raise GenerationError(f"{run.root} uses the bidirectional BK core (bk_mode: "
                              "bidirectional), whose position i reads the token it predicts: "
                              "it is not a causal language model and cannot generate")
    path = checkpoint_path(run, checkpoint)
    if not path.is_file():
        older = (", or train it again: it was trained before physlm kept the best epoch's "
                 "weights" if checkpoint == "best" and run.checkpoint.is_file() else "")
        raise GenerationError(f"{run.root} has no {checkpoint} checkpoint ({path}): train the "
                              f"run (a run restored from its record keeps no weights){older}")
    vocab = Vocabulary.load(run.vocab)
    return RunModel(load_weights(config, len(vocab), path), vocab, config, checkpoint)


# ------------------------------------------------------------------ sampling
def encode_prompt(vocab: Vocabulary, text: str) -> tuple[torch.Tensor, list[str]]:
    """The prompt's ids, and its words that the vocabulary lacks (each once, in order)."""
    words = tokenize(text.splitlines())
    if not words:
        raise GenerationError("the prompt is empty: give at least one word")
    unknown = list(dict.fromkeys(word for word in words if word not in vocab.stoi))
    return vocab.encode(words), unknown


class Context:
    """The text so far as the model reads it, and the logits (V,) of the word after it.

    A recurrent model reads each token once and carries its state; any other model reads
    the last n_seq tokens again after every new word.
    """

    def __init__(self, model: nn.Module, prompt: torch.Tensor) -> None:
        self.model = model
        self.recurrent = hasattr(model, "initial_state")
        self.ids: list[int] = prompt.tolist()
        self.state = None
        self.logits = self._read(self.ids)

    def append(self, token: int) -> None:
        self.ids.append(token)
        self.logits = self._read([token] if self.recurrent else self.ids)

    def _read(self, ids: list[int]) -> torch.Tensor:
        if not self.recurrent:
            ids = ids[-self.model.config.n_seq:]
        device = next(self.model.parameters()).device
        with torch.no_grad():
            out = self.model(torch.tensor([ids], device=device), state=self.state)
        self.state = out.state
        return out.logits[0, -1].float().cpu()


def choose(logits: torch.Tensor, temperature: float, top_k: int | None,
           generator: torch.Generator) -> int:
    """The next word: the argmax at temperature 0, else a draw from softmax(logits / T)
    over the top_k most likely words (all of them when top_k is None)."""
    if temperature == 0:
        return int(logits.argmax())
    indices = None
    if top_k is not None and top_k < len(logits):
        logits, indices = logits.topk(top_k)
    drawn = int(torch.multinomial(torch.softmax(logits / temperature, dim=-1), 1,
                                  generator=generator))
    return drawn if indices is None else int(indices[drawn])


def continue_ids(model: nn.Module, prompt: torch.Tensor, settings: SampleSettings) -> list[int]:
    """`settings.tokens` new ids after the 1-D `prompt`, deterministic for its seed."""
    settings.check()
    generator = torch.Generator().manual_seed(settings.seed)
    context = Context(model, prompt)
    new: list[int] = []
    for _ in range(settings.tokens):
        new.append(choose(context.logits, settings.temperature, settings.top_k, generator))
        context.append(new[-1])
    return new


def generate(run_model: RunModel, prompt: str,
             settings: SampleSettings = SampleSettings()) -> Sample:
    """The run's continuation of `prompt` (whitespace-tokenised, unknown words as <unk>)."""
    ids, unknown = encode_prompt(run_model.vocab, prompt)
    words = run_model.vocab.decode(continue_ids(run_model.model, ids, settings))
    return Sample(prompt=prompt, continuation=" ".join(words), checkpoint=run_model.checkpoint,
                  unknown=unknown, **asdict(settings))


# ------------------------------------------------------------------ the fixed prompts
def fixed_prompts(lines: Iterable[str], count: int = PROMPT_COUNT,
                  words: int = PROMPT_WORDS) -> list[str]:
    """The first `words` words of `count` evenly spaced paragraphs of `lines` (lines that
    are neither blank nor ` = Heading = `), the first paragraph first."""
    paragraphs = [line.split() for line in lines if line.strip() and line.split()[0] != "="]
    chosen = dict.fromkeys(i * len(paragraphs) // count for i in range(count))
    return [" ".join(paragraphs[i][:words]) for i in chosen if paragraphs]


def validation_prompts(config: Config) -> list[str]:
    """The fixed prompts of a run: from its validation text."""
    return fixed_prompts(split_lines(config.data, "valid"))


def write_samples(run_dir: str | Path, settings: SampleSettings = SampleSettings(),
                  checkpoint: str = CHECKPOINTS[0]) -> list[Sample]:
    """Write the continuations of the run's fixed prompts into its samples.json."""
    run_model = load_run_model(run_dir, checkpoint)
    samples = [generate(run_model, prompt, settings)
               for prompt in validation_prompts(run_model.config)]
    RunDirectory(run_dir).write_samples([asdict(sample) for sample in samples])
    return samples
