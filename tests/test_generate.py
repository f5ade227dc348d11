"""Sampling from a run (physlm.generate): determinism, argmax, top-k, the causal window,
the LSTM's carried state, the fixed prompts and the command's one-line errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from physlm import generate as gen
from physlm.__main__ import main
from physlm.config import from_flat
from physlm.data import load_corpus, split_lines
from physlm.errors import DamagedFileError
from physlm.runs import RunDirectory
from physlm.trainer import Trainer, train

from .conftest import REPO_ROOT, TINY, one_error_line

ARCHITECTURES = {
    "resnet_bk": {},
    "transformer": {"architecture": "transformer", "energy_heads": False},
    "lstm": {"architecture": "lstm", "energy_heads": False, "batching": "stream"},
}
# Two optimizer steps: enough for real weights to be saved and loaded, in about a second.
QUICK = {**TINY, "epochs": 1, "max_train_batches": 2, "max_eval_batches": 1,
         "energy_penalty": False}


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    """A trained tiny run of each architecture on the fixture corpus."""
    root = tmp_path_factory.mktemp("runs")
    made = {}
    for name, overrides in ARCHITECTURES.items():
        made[name] = root / name
        train(from_flat({**QUICK, **overrides}), made[name])
    return made


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def loaded(request, runs) -> gen.RunModel:
    return gen.load_run_model(runs[request.param])


def _reference_logits(run_model: gen.RunModel, ids: list[int]) -> torch.Tensor:
    """The next-word logits after `ids`, computed afresh: the LSTM reads the whole text from
    a zero state, the others the last n_seq tokens."""
    if run_model.config.model.architecture != "lstm":
        ids = ids[-run_model.config.model.n_seq:]
    with torch.no_grad():
        return run_model.model(torch.tensor([ids])).logits[0, -1]


def _prompt(run_model: gen.RunModel, length: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(2, len(run_model.vocab), (length,), generator=generator)


# --- sampling ----------------------------------------------------------------------------------

def test_the_weights_are_the_checkpoints(runs):
    run_model = gen.load_run_model(runs["resnet_bk"])
    saved = torch.load(RunDirectory(runs["resnet_bk"]).checkpoint, weights_only=True)["model"]
    for name, tensor in run_model.model.state_dict().items():
        assert torch.equal(tensor, saved[name]), name
    assert not run_model.model.training


def test_the_best_checkpoint_is_the_best_epochs_weights(runs, tmp_path, capsys):
    """`--checkpoint best` reads checkpoints/best.pt (physlm.trainer), not last.pt."""
    run = RunDirectory(shutil.copytree(runs["resnet_bk"], tmp_path / "run"))
    state = torch.load(run.best_checkpoint, weights_only=True)
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}
    torch.save(state, run.best_checkpoint)   # weights that no last.pt holds
    best = gen.load_run_model(run.root, "best")
    assert best.checkpoint == "best" and gen.checkpoint_path(run, "best") == run.best_checkpoint
    assert all(not t.any() for t in best.model.state_dict().values())
    assert main(["generate", str(run.root), "--checkpoint", "best", "--tokens", "3"]) == 0
    assert len(capsys.readouterr().out.strip().splitlines()) == gen.PROMPT_COUNT


def test_same_seed_same_text_and_the_global_rng_untouched(loaded):
    settings = gen.SampleSettings(tokens=20, temperature=1.0, seed=3)
    before = torch.get_rng_state()
    first = gen.generate(loaded, "The church of the city", settings)
    assert torch.equal(torch.get_rng_state(), before)
    again = gen.generate(loaded, "The church of the city", settings)
    other = gen.generate(loaded, "The church of the city",
                         gen.SampleSettings(tokens=20, temperature=1.0, seed=4))
    assert first.continuation == again.continuation
    assert first.continuation != other.continuation
    assert len(first.continuation.split()) == 20


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_each_word_comes_from_the_models_logits(loaded, temperature):
    """Temperature 0 takes the argmax; top-k never leaves the k most likely words."""
    k = 3
    prompt = _prompt(loaded, 5)
    settings = gen.SampleSettings(tokens=25, temperature=temperature, top_k=k, seed=1)
    new = gen.continue_ids(loaded.model, prompt, settings)
    ids = prompt.tolist()
    outside = 0
    for token in new:
        logits = _reference_logits(loaded, ids)
        if temperature == 0:
            assert token == int(logits.argmax())
        assert token in logits.topk(k).indices.tolist()
        outside += token != int(logits.argmax())
        ids.append(token)
    if temperature:
        assert outside > 0  # it did sample, not only take the argmax


@pytest.mark.parametrize(("temperature", "top_k"), [(0.5, None), (2.0, None), (2.0, 2)])
def test_draws_follow_the_tempered_softmax(temperature, top_k):
    """Frequencies of 4000 draws within 0.03 of softmax(logits / T) over the top k (the
    binomial standard deviation is at most 0.008)."""
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    generator = torch.Generator().manual_seed(0)
    draws = [gen.choose(logits, temperature, top_k, generator) for _ in range(4000)]
    expected = torch.softmax(logits / temperature, dim=0)
    if top_k:
        expected[top_k:] = 0
        expected /= expected.sum()
    frequencies = torch.bincount(torch.tensor(draws), minlength=4) / len(draws)
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.03)


@pytest.mark.parametrize("architecture", ["resnet_bk", "transformer"])
def test_position_i_does_not_see_later_tokens(runs, architecture):
    model = gen.load_run_model(runs[architecture]).model
    n = model.config.n_seq
    x = torch.randint(2, 300, (1, n))
    later = x.clone()
    later[0, 6:] = torch.randint(2, 300, (n - 6,))
    with torch.no_grad():
        a, b = model(x).logits, model(later).logits
    torch.testing.assert_close(a[0, :6], b[0, :6], rtol=0, atol=1e-5)
    assert not torch.allclose(a[0, 6:], b[0, 6:], atol=1e-3)


def test_the_check_fails_on_the_bidirectional_core():
    """The same check on the replica's core: position i reads the token after it."""
    config = from_flat({**QUICK, "bk_mode": "bidirectional"})
    model = gen._build_model(config, 300).eval()
    x = torch.randint(2, 300, (1, config.model.n_seq))
    later = x.clone()
    later[0, 6] = (x[0, 6] + 1) % 300
    with torch.no_grad():
        a, b = model(x).logits, model(later).logits
    assert not torch.allclose(a[0, 5], b[0, 5], atol=1e-5)


def _continuations(run_model: gen.RunModel, prompt: torch.Tensor, temperature: float):
    return gen.continue_ids(run_model.model, prompt,
                            gen.SampleSettings(tokens=10, temperature=temperature, seed=2))


@pytest.mark.parametrize("architecture", ["resnet_bk", "transformer"])
@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_tokens_older_than_the_window_have_no_effect(runs, architecture, temperature):
    run_model = gen.load_run_model(runs[architecture])
    n = run_model.config.model.n_seq
    prompt = _prompt(run_model, n + 4)
    changed = prompt.clone()
    changed[:4] = _prompt(run_model, 4, seed=9)
    assert not torch.equal(prompt, changed)
    assert (_continuations(run_model, prompt, temperature)
            == _continuations(run_model, changed, temperature))
    # ... while a token inside the window does change the next word's distribution
    inside = prompt.clone()
    inside[-1] = (prompt[-1] + 1) % len(run_model.vocab)
    assert not torch.allclose(gen.Context(run_model.model, prompt).logits,
                              gen.Context(run_model.model, inside).logits, atol=1e-5)


def test_the_lstm_carries_its_state(runs):
    """Stepping word by word equals reading the whole text at once, and a token older than
    n_seq still acts, through the state."""
    run_model = gen.load_run_model(runs["lstm"])
    n = run_model.config.model.n_seq
    prompt = _prompt(run_model, n + 4)
    context = gen.Context(run_model.model, prompt)
    for token in _prompt(run_model, 2 * n, seed=5).tolist():
        context.append(token)
        torch.testing.assert_close(context.logits, _reference_logits(run_model, context.ids))
    changed = prompt.clone()
    changed[0] = (prompt[0] + 1) % len(run_model.vocab)
    assert not torch.allclose(gen.Context(run_model.model, prompt).logits,
                              gen.Context(run_model.model, changed).logits, atol=1e-6)


def test_unknown_words_become_unk(loaded):
    sample = gen.generate(loaded, "the zzqx city zzqx ywv", gen.SampleSettings(tokens=3))
    assert sample.unknown == ["zzqx", "ywv"]
    ids, _ = gen.encode_prompt(loaded.vocab, "the zzqx city")
    assert ids.tolist() == [loaded.vocab.stoi["the"], 1, loaded.vocab.stoi["city"]]


@pytest.mark.parametrize(("settings", "message"), [
    ({"tokens": 0}, "tokens must be >= 1"),
    ({"temperature": -0.5}, "temperature must be >= 0"),
    ({"temperature": float("nan")}, "temperature must be >= 0"),
    ({"top_k": 0}, "top_k must be >= 1"),
])
def test_bad_settings_are_refused(settings, message):
    with pytest.raises(gen.GenerationError, match=message):
        gen.SampleSettings(**settings).check()


# --- the fixed prompts and samples.json -----------------------------------------------------

def test_fixed_prompts_are_evenly_spaced_paragraphs():
    lines = [" = Title = ", " ", " p0 a b c ", " = = Section = = ", "p1 d", "", "p2 e f",
             "p3", "p4 g h i j k l m n o p", "p5"]
    assert gen.fixed_prompts(lines, count=3, words=3) == ["p0 a b", "p2 e f", "p4 g h"]
    assert gen.fixed_prompts(lines[:3], count=3) == ["p0 a b c"]
    assert gen.fixed_prompts([" = Only a heading = ", ""]) == []


def test_samples_json_holds_the_fixed_prompts(runs):
    """The same prompts for every run on the same data, the same file when written again."""
    run_dir = runs["resnet_bk"]
    samples = gen.write_samples(run_dir)
    written = RunDirectory(run_dir).samples.read_bytes()
    prompts = gen.fixed_prompts(split_lines(from_flat(QUICK).data, "valid"))
    assert len(prompts) == gen.PROMPT_COUNT
    assert [s.prompt for s in samples] == prompts
    records = json.loads(written)
    assert [r["prompt"] for r in records] == prompts
    defaults = gen.SampleSettings()
    for record in records:
        assert len(record["continuation"].split()) == defaults.tokens
        assert (record["temperature"], record["seed"], record["checkpoint"]) == (
            defaults.temperature, defaults.seed, "last")
    gen.write_samples(run_dir)
    assert RunDirectory(run_dir).samples.read_bytes() == written
    assert RunDirectory(run_dir).read_samples() == records
    lstm = [s.prompt for s in gen.write_samples(runs["lstm"])]
    assert lstm == prompts


def test_training_writes_samples_json_when_the_run_finishes(tmp_path):
    """Not before: an unfinished run has none. A finished run's is the continuations of its
    last checkpoint; a resume that adds epochs removes it (its weights will change) and the
    finished run writes it again."""
    run = RunDirectory(tmp_path / "run")
    trainer = Trainer(from_flat({**QUICK, "epochs": 2}), run.root)
    trainer.fit(until_epoch=1)
    assert trainer.run.checkpoint.is_file() and not run.samples.exists()
    trainer.fit()
    first = run.read_samples()
    assert first == [asdict(s) for s in gen.write_samples(run.root)]     # the same file again
    assert [r["prompt"] for r in first] == gen.fixed_prompts(
        split_lines(from_flat(QUICK).data, "valid"))

    longer = from_flat({**QUICK, "epochs": 3})
    resumed = Trainer(longer, run.root)
    assert not run.samples.exists()                   # unfinished again: no stale samples
    resumed.fit()                                     # written again, by epoch 3's weights
    assert run.read_samples() == [asdict(s) for s in gen.write_samples(run.root)]
    Trainer(longer, run.root)                         # a finished run's samples stay
    assert run.samples.exists()


def test_a_run_on_a_given_corpus_finishes_without_samples(tmp_path):
    """The benchmarks' runs: tensors without text, so no prompts (and no data is read)."""
    config = from_flat(QUICK)
    corpus = load_corpus(config.data, config.model.n_seq)
    elsewhere = from_flat({**QUICK, "dataset": "wikitext-2-raw-v1",
                           "data_dir": str(tmp_path / "none")})
    assert len(train(elsewhere, tmp_path / "run", corpus=corpus)) == 1
    assert not RunDirectory(tmp_path / "run").samples.exists()


def test_a_bidirectional_run_finishes_without_samples(tmp_path):
    records = train(from_flat({**QUICK, "bk_mode": "bidirectional"}), tmp_path / "run")
    assert len(records) == 1 and not RunDirectory(tmp_path / "run").samples.exists()


@pytest.mark.parametrize(("content", "problem"), [
    ("", "empty"), ("{\"prompt\": \"a\"}", "a JSON dict, not a list"),
    ("[{\"prompt\": \"a\"}]", "a record is not an object with a prompt and a continuation")])
def test_a_damaged_samples_json_is_named(tmp_path, content, problem):
    run = RunDirectory(tmp_path)
    run.samples.write_text(content)
    with pytest.raises(DamagedFileError, match=re.escape(f"{run.samples} is damaged: {problem}")):
        run.read_samples()


# --- the command -------------------------------------------------------------------------------

def test_command_prints_the_continuation(runs, capsys):
    assert main(["generate", str(runs["transformer"]), "--prompt", "the zzqx city",
                 "--tokens", "7", "--temperature", "0"]) == 0
    out, err = capsys.readouterr()
    assert len(out.strip().splitlines()) == 1 and len(out.split()) == 7
    assert err.strip() == "physlm: note: read as <unk> (not in the run's vocabulary): zzqx"
    assert main(["generate", str(runs["transformer"]), "--tokens", "4"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == gen.PROMPT_COUNT and all(line.startswith("[") for line in lines)


def test_command_writes_samples_json(runs, tmp_path, capsys):
    run_dir = tmp_path / "lstm"
    shutil.copytree(runs["lstm"], run_dir)
    RunDirectory(run_dir).samples.unlink()
    assert main(["generate", str(run_dir), "--write", "--tokens", "6", "--seed", "5"]) == 0
    out, err = capsys.readouterr()
    records = RunDirectory(run_dir).read_samples()
    assert [(r["tokens"], r["seed"]) for r in records] == [(6, 5)] * gen.PROMPT_COUNT
    assert out.splitlines() == [f"[{r['prompt']}] {r['continuation']}" for r in records]
    assert err.strip().splitlines()[-1] == f"physlm: note: wrote {run_dir / 'samples.json'}"
    assert not (run_dir / ".lock").exists()
    assert main(["generate", str(run_dir), "--write", "--prompt", "The city"]) == 2
    assert "--write keeps the continuations of the run's fixed prompts" in one_error_line(capsys)


def _run_without_checkpoint(tmp_path: Path, **overrides) -> Path:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    RunDirectory(run_dir).write_config(from_flat({**QUICK, **overrides}))
    return run_dir


@pytest.mark.parametrize(("case", "expected"), [
    ("missing run", "run directory"),
    ("no checkpoint", "has no last checkpoint"),
    ("bidirectional", "bidirectional BK core"),
    ("no best", "has no best checkpoint"),
    ("empty prompt", "the prompt is empty"),
    ("tokens 0", "tokens must be >= 1, got 0"),
    ("tokens -3", "tokens must be >= 1, got -3"),
    ("negative temperature", "temperature must be >= 0"),
    ("top-k 0", "top_k must be >= 1, got 0"),
])
def test_command_errors_are_one_line(runs, tmp_path, capsys, case, expected):
    run, extra = str(runs["resnet_bk"]), []
    if case == "missing run":
        run = str(tmp_path / "nowhere")
    elif case == "no checkpoint":
        run = str(_run_without_checkpoint(tmp_path))
    elif case == "bidirectional":
        run = str(_run_without_checkpoint(tmp_path, bk_mode="bidirectional"))
    elif case == "no best":   # a run trained before physlm kept its best epoch
        run = str(shutil.copytree(runs["resnet_bk"], tmp_path / "old"))
        RunDirectory(run).best_checkpoint.unlink()
        extra = ["--checkpoint", "best"]
    else:
        extra = {"empty prompt": ["--prompt", "  "],
                 "tokens 0": ["--tokens", "0"], "tokens -3": ["--tokens", "-3"],
                 "negative temperature": ["--temperature", "-1"],
                 "top-k 0": ["--top-k", "0"]}[case]
    assert main(["generate", run, *extra]) == 2
    line = one_error_line(capsys)
    assert line.startswith("physlm: cannot generate: ") and expected in line


def test_command_in_a_process(runs, tmp_path):
    """The real entry point: a continuation on stdout; an error as one line, exit 2."""
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "physlm", "generate", *args],
                              capture_output=True, text=True, env=env, timeout=120)

    good = run(str(runs["lstm"]), "--prompt", "The city", "--tokens", "5")
    assert good.returncode == 0 and len(good.stdout.split()) == 5, good.stderr
    bad = run(str(_run_without_checkpoint(tmp_path)), "--prompt", "The city")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert bad.stderr.strip().splitlines() == [
        f"physlm: cannot generate: {tmp_path / 'run'} has no last checkpoint "
        f"({tmp_path / 'run' / 'checkpoints' / 'last.pt'}): train the run (a run restored "
        "from its record keeps no weights)"]
