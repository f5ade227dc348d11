"""A small synthetic corpus in WikiText raw layout, written by the project itself.

The text comes from a tiny probabilistic grammar: a fixed lexicon of a few hundred
words with Zipf-like frequencies, sentence templates (determiner, adjective, noun,
verb, preposition), verbs that prefer certain objects, topic words and a topic name
that recur within an article, ` = Title = ` headings, ` = = Section = = ` headings,
blank lines between paragraphs, and WikiText's spaced punctuation (` , ` ` . `
` @-@ ` ` @,@ `). A tiny model learns it within a few dozen steps, so tests and
demos run offline and fast. Only `random.Random` is used: the same arguments give
byte-identical files on every platform.
"""

from __future__ import annotations

import itertools
import os
import random
import shutil
import tempfile
from pathlib import Path

FIXTURE_VERSION = 1  # bump whenever the generator's output changes
SPLITS = ("train", "valid", "test")

_ADJECTIVES = ["new", "old", "large", "small", "early", "late", "major", "local", "first",
               "second", "main", "national", "royal", "northern", "southern", "ancient", "modern",
               "famous", "young", "heavy", "short", "common", "public", "private", "original",
               "final", "central", "western", "eastern", "popular", "strong", "quiet", "dark",
               "bright", "wooden"]
_NOUNS = ["city", "river", "church", "album", "song", "village", "castle", "station", "bridge",
          "road", "island", "ship", "army", "battle", "king", "queen", "game", "team", "season",
          "film", "book", "school", "bishop", "tower", "harbour", "garden", "forest", "valley",
          "mountain", "lake", "temple", "market", "house", "court", "museum", "college", "railway",
          "canal", "fleet", "crew", "regiment", "province", "county", "district", "council",
          "parliament", "election", "emperor", "general", "captain", "artist", "writer", "singer",
          "player", "band", "novel", "poem", "painting", "statue", "coin", "storm", "hurricane",
          "species", "bird", "fish", "tree", "flower", "insect", "family", "tribe", "colony",
          "fort", "wall", "gate", "mill", "mine", "farm", "field", "well", "harbor", "route",
          "line", "series", "episode", "chapter", "record"]
_VERBS = ["built", "found", "described", "destroyed", "captured", "released", "recorded", "wrote",
          "painted", "founded", "defeated", "joined", "left", "visited", "named", "replaced",
          "restored", "opened", "closed", "crossed", "won", "lost", "published", "designed",
          "ruled", "reached", "attacked", "defended", "sold", "bought", "discovered"]
_INTRANSITIVE = ["arrived", "declined", "grew", "returned", "collapsed", "survived", "retired",
                 "fell", "rose", "died"]
_ADVERBS = ["quickly", "later", "again", "slowly", "finally", "soon", "rapidly", "briefly", "also",
            "eventually"]
_PREPOSITIONS = ["in", "near", "from", "with", "after", "during", "before", "across", "under",
                 "beside"]
_SECTIONS = ["History", "Description", "Reception", "Legacy", "Background", "Career", "Design",
             "Release", "Geography", "Distribution", "Aftermath", "Construction"]
_COMPOUNDS = [("well", "known"), ("long", "term"), ("high", "speed"), ("full", "time"),
              ("two", "storey"), ("left", "wing"), ("short", "lived")]
_YEARS = [str(year) for year in range(1850, 1955, 5)]
_SYLLABLES = ["ka", "lo", "ri", "ven", "dar", "mo", "sel", "tur", "an", "bel", "cor", "fi", "na",
              "ost", "lim", "ra", "gu", "ed", "har", "vo"]


def _invented_names(count: int) -> list[str]:
    """Capitalised two- or three-syllable names, the same for every seed."""
    rng = random.Random("physlm-fixture-names")
    names: list[str] = []
    while len(names) < count:
        name = "".join(rng.choice(_SYLLABLES) for _ in range(rng.choice((2, 2, 3)))).capitalize()
        if name not in names:
            names.append(name)
    return names


_NAMES = _invented_names(60)


class _Zipf:
    """Draw from a word list with weight 1 / rank."""

    def __init__(self, words: list[str]) -> None:
        self.words = words
        weights = (1.0 / rank for rank in range(1, len(words) + 1))
        self.cum_weights = list(itertools.accumulate(weights))

    def __call__(self, rng: random.Random) -> str:
        return rng.choices(self.words, cum_weights=self.cum_weights)[0]


_adjective, _noun, _verb = _Zipf(_ADJECTIVES), _Zipf(_NOUNS), _Zipf(_VERBS)
_intransitive, _adverb, _preposition = _Zipf(_INTRANSITIVE), _Zipf(_ADVERBS), _Zipf(_PREPOSITIONS)
_name, _year = _Zipf(_NAMES), _Zipf(_YEARS)
_determiner = _Zipf(["the", "a", "its", "this", "every", "that"])
# Each verb prefers three objects, so the word after a verb is partly predictable.
_rng_objects = random.Random("physlm-fixture-objects")
_PREFERRED_OBJECTS = {verb: _rng_objects.sample(_NOUNS, 3) for verb in _VERBS}


class _Article:
    """Sentence generator for one article: a topic name and a few topic nouns."""

    def __init__(self, rng: random.Random) -> None:
        self.rng = rng
        self.name = _name(rng)
        self.topics = [_noun(rng) for _ in range(3)]

    def noun_phrase(self, noun: str | None = None) -> list[str]:
        rng = self.rng
        if noun is None and rng.random() < 0.15:
            return [self.name]
        if noun is None:
            noun = rng.choice(self.topics) if rng.random() < 0.5 else _noun(rng)
        words = [_adjective(rng)] if rng.random() < 0.4 else []
        if rng.random() < 0.1:
            first, second = rng.choice(_COMPOUNDS)
            words += [first, "@-@", second]
        words.append(noun)
        determiner = _determiner(self.rng)
        if determiner == "a" and words[0][0] in "aeiou":
            determiner = "an"
        phrase = [determiner, *words]
        if rng.random() < 0.1:
            phrase += ["of", _name(rng)]
        return phrase

    def object_phrase(self, verb: str) -> list[str]:
        preferred = self.rng.choice(_PREFERRED_OBJECTS[verb]) if self.rng.random() < 0.5 else None
        return self.noun_phrase(preferred)

    def sentence(self) -> list[str]:
        rng = self.rng
        verb = _verb(rng)
        kind = rng.randrange(6)
        if kind == 0:
            words = [*self.noun_phrase(), verb, *self.object_phrase(verb)]
        elif kind == 1:
            words = [*self.noun_phrase(), verb, *self.object_phrase(verb), _preposition(rng),
                     *self.noun_phrase()]
        elif kind == 2:
            words = ["in", _year(rng), ",", *self.noun_phrase(), verb, *self.object_phrase(verb)]
        elif kind == 3:
            words = [*self.noun_phrase(), _intransitive(rng), _adverb(rng)]
        elif kind == 4:
            words = [*self.noun_phrase(), verb, *self.object_phrase(verb), ",", "and",
                     *self.noun_phrase(), _intransitive(rng)]
        else:
            count = f"{rng.randrange(1, 10)} @,@ {rng.randrange(10) * 100:03d}".split()
            words = [self.name, ",", "a", _adjective(rng), _noun(rng), ",", verb, *count,
                     rng.choice(self.topics) + "s"]
        words[0] = words[0][0].upper() + words[0][1:]
        return [*words, "."]

    def paragraph(self) -> str:
        sentences = [self.sentence() for _ in range(self.rng.randint(3, 6))]
        return " ".join(word for sentence in sentences for word in sentence)

    def lines(self) -> list[str]:
        """Content lines of the article; "" is a blank line."""
        rng = self.rng
        title = self.name if rng.random() < 0.6 else f"{self.name} {_name(rng)}"
        lines = [f"= {title} =", "", self.paragraph(), ""]
        for section in rng.sample(_SECTIONS, rng.randint(1, 3)):
            lines += [f"= = {section} = =", ""]
            for _ in range(rng.randint(1, 2)):
                lines += [self.paragraph(), ""]
        return lines


def generate_text(num_tokens: int, rng: random.Random) -> str:
    """Whole articles until at least `num_tokens` whitespace tokens, in WikiText raw layout."""
    if num_tokens < 1:
        raise ValueError(f"num_tokens must be >= 1, got {num_tokens}")
    lines, count = [""], 0  # WikiText files start with a blank line
    while count < num_tokens:
        article = _Article(rng).lines()
        lines += article
        count += sum(len(line.split()) for line in article)
    return "".join(f" {line} \n" if line else " \n" for line in lines)


def write_fixture_corpus(directory: str | Path, *, train_tokens: int = 60_000,
                         valid_tokens: int = 8_000, test_tokens: int = 8_000,
                         seed: int = 0) -> Path:
    """Write wiki.{train,valid,test}.raw into `directory` and return it."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    sizes = {"train": train_tokens, "valid": valid_tokens, "test": test_tokens}
    for split in SPLITS:
        rng = random.Random(f"physlm-fixture:{seed}:{split}")
        text = generate_text(sizes[split], rng)
        (directory / f"wiki.{split}.raw").write_text(text, encoding="utf-8", newline="\n")
    return directory


def cache_root() -> Path:
    """$PHYSLM_CACHE, else $XDG_CACHE_HOME/physlm, else ~/.cache/physlm."""
    if os.environ.get("PHYSLM_CACHE"):
        return Path(os.environ["PHYSLM_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "physlm"


def fixture_dir() -> Path:
    """The default fixture corpus, written once into the cache on first use.

    It is written to a temporary folder and renamed into place, so concurrent
    processes never see a half-written corpus.
    """
    final = cache_root() / f"fixture-{FIXTURE_VERSION}"
    if all((final / f"wiki.{split}.raw").is_file() for split in SPLITS):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=final.parent))
    try:
        write_fixture_corpus(tmp)
        tmp.chmod(0o755)  # mkdtemp makes it private
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a lost race with another process: a real error
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return final
