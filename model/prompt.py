"""Prompt template, training targets and the answer format.

The prompt (one chat turn, rendered with the tokenizer's chat template)::

    Video of the whole clip (0.00-7.72 s): <video tokens>
    Video of utterance 1 (0.53-2.70 s): <video tokens>
    Video of utterances 3-5 (5.10-12.40 s): <video tokens>       (merged neighbours)
    Audio (0.00-8.00 s): <audio tokens>                          or "Audio: none."
    Transcript:
    Utterance 1 (0.53-2.70 s, speaker A): "The schedule changed this week."
    ...                                                          or "(no speech)"
    <instruction>                                               (PromptConfig.instruction)

Placeholders are marked in the rendered text and become runs of placeholder positions in
``input_ids``; the model writes its projected tokens there through ``inputs_embeds``. No
tokens are added to the vocabulary.

The answer (what training targets look like and what ``parse_answer`` reads)::

    <explanation: the visual, acoustic and spoken clues, with times>
    Emotions: happy, delighted
    Utterance 1 (0.53-2.70 s): neutral
    Utterance 2 (3.17-4.92 s): pleased

With ``PromptConfig.labels_first`` the ``Emotions:`` line comes first, then the explanation, then
the utterance lines (``parse_answer`` reads both orders).

``parse_answer`` never raises: a missing ``Emotions:`` line gives no labels and
``well_formed=False``; stray markdown, numbering and odd separators are tolerated.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass, field

from model.config import PromptConfig
from model.video import Segment

TEXT, VIDEO, AUDIO = 0, 1, 2  # kinds of prompt positions (``Batch.mm_kind``)
_MARK = "\ue000"  # private-use character: stripped from all untrusted text, so it cannot forge placeholders
_PLACEHOLDER = re.compile(f"{_MARK}(video|audio):(\\d+){_MARK}")


def placeholder(kind: str, n: int) -> str:
    """Text standing for ``n`` positions to be filled with ``kind`` ("video" or "audio") tokens."""
    return f"{_MARK}{kind}:{n}{_MARK}"


def clean_text(text: str, forbidden: Iterable[str] = (), limit: int = 300) -> str:
    """Untrusted text for the prompt: one line, no placeholder marks or special-token strings, <= ``limit`` chars."""
    text = " ".join(str(text).replace(_MARK, "").split())
    for tok in forbidden:
        if tok:
            text = text.replace(tok, "")
    return text[:limit]


def _span(start: float, end: float) -> str:
    return f"{start:.2f}-{end:.2f} s"


def sorted_utterances(utterances: list[dict]) -> list[dict]:
    """The transcript order (by start time); utterance numbers in prompts and answers are 1-based indices into it."""
    return sorted(utterances, key=lambda u: (float(u["start_s"]), float(u["end_s"])))


def user_message(utterances: list[dict], segments: list[Segment], duration_s: float,
                 audio_span: tuple[float, float] | None, n_video: int, n_audio: int, cfg: PromptConfig,
                 forbidden: Iterable[str] = ()) -> str:
    """The user turn with placeholders.

    utterances: transcript order (``sorted_utterances``); segments: planned video segments;
    n_video / n_audio: tokens per video segment (0: no video) / for the audio; audio_span: seconds, or None
    when the clip has no audio tokens.
    """
    if n_video > 0:
        lines = [f"Video of the whole clip ({_span(0.0, duration_s)}): {placeholder('video', n_video)}"]
    else:  # the video branch is off (text-only baseline)
        lines, segments = ["Video: none."], []
    for seg in segments:
        who = f"utterance {seg.first}" if seg.first == seg.last else f"utterances {seg.first}-{seg.last}"
        lines.append(f"Video of {who} ({_span(seg.start_s, seg.end_s)}): {placeholder('video', n_video)}")
    if audio_span is not None:
        lines.append(f"Audio ({_span(*audio_span)}): {placeholder('audio', n_audio)}")
    else:
        lines.append("Audio: none.")
    lines.append("Transcript:")
    for i, u in enumerate(utterances, 1):
        speaker = clean_text(u.get("speaker") or "", forbidden, 40)
        who = f", speaker {speaker}" if speaker else ""
        text = clean_text(u.get("text") or "", forbidden, cfg.max_utterance_chars)
        lines.append(f"Utterance {i} ({_span(float(u['start_s']), float(u['end_s']))}{who}): \"{text}\"")
    if not utterances:
        lines.append("(no speech)")
    instruction = cfg.instruction_labels_first if cfg.labels_first else cfg.instruction
    lines.append(instruction + (cfg.instruction_utterances if cfg.utterance_labels and utterances else ""))
    return "\n".join(lines)


def render_prompt(tokenizer, system: str, user: str) -> str:
    """The full prompt text up to where the answer starts (chat template when the tokenizer has one)."""
    messages = [{"role": "system", "content": system}, {"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return f"{system}\n\n### User:\n{user}\n\n### Assistant:\n"


def encode_prompt(tokenizer, text: str, placeholder_id: int) -> tuple[list[int], list[int]]:
    """Token ids and position kinds (TEXT / VIDEO / AUDIO) of a rendered prompt.

    Text pieces between placeholders are tokenized separately (special tokens of the chat
    template are honoured; the BOS, if the tokenizer adds one, only at the very start).
    """
    ids: list[int] = []
    kinds: list[int] = []
    pos = 0
    for m in [*_PLACEHOLDER.finditer(text), None]:
        piece = text[pos:m.start() if m else len(text)]
        if piece:
            piece_ids = tokenizer(piece, add_special_tokens=False).input_ids
            if not ids and tokenizer.bos_token_id is not None and not piece.startswith(tokenizer.bos_token or "\0"):
                piece_ids = [tokenizer.bos_token_id, *piece_ids]
            ids += piece_ids
            kinds += [TEXT] * len(piece_ids)
        if m is None:
            break
        n = int(m.group(2))
        ids += [placeholder_id] * n
        kinds += [VIDEO if m.group(1) == "video" else AUDIO] * n
        pos = m.end()
    return ids, kinds


# ---------------------------------------------------------------------------------------- answers

@dataclass
class UtteranceAnswer:
    index: int  # 1-based, transcript order
    start_s: float | None
    end_s: float | None
    labels: list[str]


@dataclass
class Answer:
    """A parsed answer. ``well_formed``: the model wrote an ``Emotions:`` line with at least one label
    (``forced``: the line was appended by ``MicroEmo.generate`` and the model wrote only the labels after
    it; such an answer has labels but is not well formed)."""

    explanation: str
    labels: list[str]
    utterances: list[UtteranceAnswer] = field(default_factory=list)
    well_formed: bool = False
    raw: str = ""
    forced: bool = False


def format_answer(explanation: str | None, labels: list[str], utterance_labels: list[UtteranceAnswer],
                  labels_first: bool = False) -> str:
    """The answer text in the documented format (training targets): explanation, ``Emotions:`` line,
    utterance lines; ``labels_first``: the ``Emotions:`` line, then the explanation."""
    lines = [explanation.strip()] if explanation and explanation.strip() else []
    emotions = "Emotions: " + ", ".join(labels)
    lines.insert(0, emotions) if labels_first else lines.append(emotions)
    for u in utterance_labels:
        when = f" ({_span(u.start_s, u.end_s)})" if u.start_s is not None and u.end_s is not None else ""
        lines.append(f"Utterance {u.index}{when}: " + ", ".join(u.labels))
    return "\n".join(lines)


def _overlap(a0: float, a1: float, b0: float, b1: float) -> float:
    return min(a1, b1) - max(a0, b0)


def build_target(sample: dict, cfg: PromptConfig) -> str:
    """Answer text for a store sample (``description``, ``labels``, ``utterance_labels``); with
    ``cfg.target == "labels"`` only its ``Emotions:`` line.

    Per-utterance labels are numbered by the transcript utterance they overlap most (their
    own order when the sample has no transcript). Raises ValueError when the sample has
    neither labels nor a description (nothing to learn from).
    """
    labels = [str(x) for x in sample.get("labels") or []]
    description = sample.get("description")
    if not labels and not (description and description.strip()):
        raise ValueError(f"sample {sample.get('video_id')!r} has no labels and no description to train on")
    if cfg.target == "labels":
        if not labels:
            raise ValueError(f"sample {sample.get('video_id')!r} has no labels (prompt.target=labels)")
        return format_answer(None, labels, [])
    utts = sorted_utterances(sample.get("utterances") or [])
    per_utt = []
    if cfg.utterance_labels:
        for j, ul in enumerate(sorted(sample.get("utterance_labels") or [], key=lambda u: float(u["start_s"]))):
            s, e = float(ul["start_s"]), float(ul["end_s"])
            index = j + 1
            if utts:
                overlaps = [_overlap(s, e, float(u["start_s"]), float(u["end_s"])) for u in utts]
                index = max(range(len(utts)), key=overlaps.__getitem__) + 1
            per_utt.append(UtteranceAnswer(index, s, e, [str(x) for x in ul.get("labels") or []]))
    return format_answer(description, labels or ["unknown"], per_utt, cfg.labels_first)


def label_spans(target: str) -> list[tuple[int, int]]:
    """Character spans of a ``format_answer`` text's label lines, in order: the ``Emotions:`` line and
    the run of utterance lines, either order of the answer (each span ends before its newline-joined
    successor starts; the last ends at the end)."""
    lines = target.split("\n")
    spans, pos, start = [], 0, None
    for line in lines:
        is_label = line.startswith("Emotions: ") or bool(_UTTERANCE.match(line))
        if is_label and start is None:
            start = pos
        elif not is_label and start is not None:
            spans.append((start, pos))
            start = None
        pos += len(line) + 1
    if start is not None:
        spans.append((start, len(target)))
    return spans


_EMOTIONS = re.compile(r"^[\s>*#_-]*emotions?(?:\s+labels?)?[\s*_]*[:：=-]\s*(.*)$", re.IGNORECASE)
_LIST_ITEM = re.compile(r"^\s*(?:[-*•]|\d+[.)])\s+(.*)$")
_UTTERANCE = re.compile(
    r"^[\s>*#_-]*utterance\s*#?\s*(\d+)[\s*_]*"
    r"(?:[(\[]\s*(\d+(?:\.\d+)?)\s*s?\s*(?:-|–|—|to)\s*(\d+(?:\.\d+)?)\s*s?\s*[)\]])?"
    r"[\s*_]*[:：=-]\s*(.*)$", re.IGNORECASE)


def _label(part: str) -> str:
    return part.strip().strip(" .!\"'`*_()[]{}").strip().lower()


def _is_label(label: str) -> bool:
    # longer pieces are sentences, not labels
    return bool(label) and len(label) <= 40 and len(label.split()) <= 4


def split_labels(text: str, limit: int = 12) -> list[str]:
    """'Happy, excited and joyful.' -> ['happy', 'excited', 'joyful'].

    Lowercased, deduplicated, at most ``limit``; pieces longer than 4 words or 40 characters are
    dropped.
    """
    out: list[str] = []
    for part in re.split(r"[,;/|]|\band\b|\n", text):
        label = _label(part)
        if _is_label(label) and label not in out:
            out.append(label)
    return out[:limit]


def _list_labels(items: list[str]) -> list[str]:
    """Labels from list items under an empty ``Emotions:`` line, only if every item is label-like
    (a list of sentences there is not an answer)."""
    if not items or not all(_is_label(_label(x)) for x in items):
        return []
    return split_labels(", ".join(items))


def parse_answer(text: str) -> Answer:
    """Explanation, clip labels and per-utterance labels from generated text (never raises).

    Clip labels come from the first ``Emotions:`` line or, when that line is empty, from the
    list items right below it ("- happy") if all of them are label-like. The explanation is the
    text before that line, or, when there is none (a labels-first answer), the text after it that
    is not an utterance line.
    """
    explanation: list[str] = []
    after: list[str] = []  # text after the Emotions line (the explanation of a labels-first answer)
    labels: list[str] | None = None
    items: list[str] | None = None  # list items under an empty "Emotions:" line, while reading them
    utterances: list[UtteranceAnswer] = []
    seen: set[int] = set()
    for line in (text or "").splitlines():
        item = _LIST_ITEM.match(line) if items is not None else None
        if item and not _UTTERANCE.match(line):
            items.append(item.group(1))
            continue
        if items is not None:
            labels, items = _list_labels(items), None
        m = _UTTERANCE.match(line)
        if m:
            index = int(m.group(1))
            if index not in seen:  # a repeated line (degenerate generation) keeps the first
                seen.add(index)
                start = float(m.group(2)) if m.group(2) else None
                end = float(m.group(3)) if m.group(3) else None
                utterances.append(UtteranceAnswer(index, start, end, split_labels(m.group(4))))
            continue
        m = _EMOTIONS.match(line)
        if m and labels is None:
            labels = split_labels(m.group(1))
            if not m.group(1).strip():
                items = []
            continue
        (explanation if labels is None else after).append(line)
    if items is not None:
        labels = _list_labels(items)
    text_before = "\n".join(explanation).strip()
    return Answer(explanation=text_before or "\n".join(after).strip(), labels=labels or [], utterances=utterances,
                  well_formed=bool(labels), raw=text or "")
