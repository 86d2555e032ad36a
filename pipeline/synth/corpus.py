"""The synthetic talking-face corpus: planning, rendering and writing clips, with ground truth.

Output layout (``out``)::

    manifest.jsonl   one row per clip: video_id, uri (relative to the manifest), split,
                     labels, description, utterance_labels, and either inline
                     `utterances` or an `srt` sidecar path (or neither: segment from audio)
    truth.jsonl      everything the generator knows: emotion, which channels carry it,
                     exact utterance times and voice settings, planted micro-events with
                     times and boxes, scene parameters and the per-frame mouth envelope
    corpus.json      counts, generator version and the resolved config
    videos/          CLIP.mp4 (H.264 + AAC, 25 fps), CLIP.srt sidecars, CLIP.json records

Every clip is a pure function of (seed, clip index, identity photos), so runs are
deterministic and a rerun skips clips that already exist with the same fingerprint.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing as mp
import os
import time
from collections import Counter
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from pipeline.srt import Cue, format_srt
from pipeline.synth.emotions import ACTIONS, EMOTION_NAMES, EMOTIONS, NEUTRAL_VOICE, sentence_space
from pipeline.synth.encode import encode_mp4
from pipeline.synth.identities import Identity, load_identities
from pipeline.synth.render import ClipRenderer, FaceRig, Scene
from pipeline.synth.speech import SAMPLE_RATE, Voice, envelope, range_name, speak

log = logging.getLogger(__name__)

GENERATOR_VERSION = "synth-1"
SPLITS = ("train", "val", "test")
MODES = ("all", "face_only", "voice_only", "text_only")
SOURCES = ("inline", "srt", "none")
SPLIT_BLOCK = 20  # splits are assigned in seeded blocks of this many clips


@dataclass
class SynthConfig:
    """``microemo synth`` settings. Durations in seconds, sizes in pixels."""

    out: str = "corpus"
    videos: int = 20
    seed: int = 0
    workers: int = 0  # processes; 0 = one per CPU core
    width: int = 384
    height: int = 288
    fps: int = 25
    min_duration_s: float = 3.0
    max_duration_s: float = 10.0
    max_utterances: int = 4
    split_ratios: tuple[float, float, float] = (0.7, 0.15, 0.15)
    # Which channels carry a non-neutral clip's emotion.
    mode_weights: dict = field(default_factory=lambda: {"all": 0.5, "face_only": 0.2, "voice_only": 0.2,
                                                        "text_only": 0.1})
    # Where the manifest gets utterances: inline, an SRT sidecar, or none (segment from audio).
    source_weights: dict = field(default_factory=lambda: {"inline": 0.6, "srt": 0.3, "none": 0.1})
    event_duration_s: tuple[float, float] = (0.1, 0.4)
    event_amplitude_fw: tuple[float, float] = (0.05, 0.09)  # peak displacement, face widths
    blinks_per_minute: float = 10.0
    crf: int = 18

    def __post_init__(self):
        if self.videos < 1:
            raise ValueError(f"videos must be at least 1, got {self.videos}")
        if self.workers < 0:
            raise ValueError(f"workers must be >= 0, got {self.workers}")
        if self.width % 2 or self.height % 2 or self.width < 128 or self.height < 96:
            raise ValueError(f"frame size must be even and at least 128x96, got {self.width}x{self.height}")
        if not 1 <= self.fps <= 120:
            raise ValueError(f"fps must be in 1..120, got {self.fps}")
        if not 1.0 <= self.min_duration_s <= self.max_duration_s:
            raise ValueError("need 1 <= min_duration_s <= max_duration_s")
        if not 1 <= self.max_utterances <= 8:
            raise ValueError(f"max_utterances must be in 1..8, got {self.max_utterances}")
        if len(self.split_ratios) != 3 or any(r < 0 for r in self.split_ratios) or sum(self.split_ratios) <= 0:
            raise ValueError(f"split_ratios must be three non-negative numbers, got {self.split_ratios}")
        for name, weights, allowed in (("mode_weights", self.mode_weights, MODES),
                                       ("source_weights", self.source_weights, SOURCES)):
            bad = set(weights) - set(allowed)
            if bad:
                raise ValueError(f"{name}: unknown key {sorted(bad)[0]} (allowed: {', '.join(allowed)})")
            if any(float(w) < 0 for w in weights.values()) or sum(float(w) for w in weights.values()) <= 0:
                raise ValueError(f"{name}: weights must be non-negative with a positive sum")
        lo, hi = self.event_duration_s
        if not 0.02 <= lo <= hi <= 1.0:
            raise ValueError(f"event_duration_s must satisfy 0.02 <= lo <= hi <= 1.0, got {self.event_duration_s}")

    def content_key(self) -> dict:
        """The settings a clip's content depends on (not where it goes or how fast)."""
        d = asdict(self)
        for k in ("out", "videos", "workers"):
            d.pop(k)
        return d


# ---------------------------------------------------------------------------- planning

def split_of(index: int, seed: int, ratios: tuple[float, float, float]) -> str:
    """Split of clip ``index``: seeded blocks of SPLIT_BLOCK clips, each holding every split in
    proportion, with one clip of each non-empty split among a block's first positions so even
    a tiny corpus has all three. Independent of the corpus size, so growing a corpus keeps splits."""
    block, pos = divmod(index, SPLIT_BLOCK)
    total = sum(ratios)
    counts = [int(round(SPLIT_BLOCK * r / total)) for r in ratios]
    counts = [max(1, c) if r > 0 else 0 for c, r in zip(counts, ratios)]
    counts[0] = SPLIT_BLOCK - sum(counts[1:])
    rng = np.random.default_rng([seed, 7919, block])
    firsts = [i for i, c in enumerate(counts) if c > 0]
    rest = [i for i, c in enumerate(counts) for _ in range(c - 1 if c > 0 else 0)]
    order = list(rng.permutation(firsts)) + list(rng.permutation(rest))
    return SPLITS[order[pos]]


def sentence_split(sentence: str, ratios: tuple[float, float, float]) -> str:
    """Every distinct sentence belongs to exactly one split (hash bucket), so splits share none."""
    bucket = int(hashlib.sha1(sentence.encode()).hexdigest()[:8], 16) / 16**8
    total, acc = sum(ratios), 0.0
    for name, r in zip(SPLITS, ratios):
        acc += r / total
        if bucket < acc:
            return name
    return SPLITS[-1]


_POOLS: dict[tuple, list[str]] = {}


def sentence_pool(emotion: str, split: str, ratios: tuple[float, float, float]) -> list[str]:
    key = (emotion, split, tuple(ratios))
    if key not in _POOLS:
        _POOLS[key] = [s for s in sentence_space(emotion) if sentence_split(s, ratios) == split]
    return _POOLS[key]


def _weighted(rng: np.random.Generator, weights: dict) -> str:
    names = sorted(weights)
    p = np.array([float(weights[n]) for n in names])
    return names[int(rng.choice(len(names), p=p / p.sum()))]


@dataclass
class UtterancePlan:
    index: int
    text: str
    emotional: bool
    label: str
    voice: Voice


@dataclass
class ClipPlan:
    video_id: str
    index: int
    split: str
    identity: int
    emotion: str
    mode: str  # all | face_only | voice_only | text_only | neutral
    labels: list[str]
    source: str
    utterances: list[UtterancePlan]

    @property
    def channels(self) -> dict[str, bool]:
        emo = self.emotion != "neutral"
        return {"text": emo and self.mode in ("all", "text_only"),
                "voice": emo and self.mode in ("all", "voice_only"),
                "face": emo and self.mode in ("all", "face_only")}


def plan_clip(cfg: SynthConfig, index: int, identities: list[Identity], rng: np.random.Generator) -> ClipPlan:
    """Decide who speaks, which emotion, through which channels, and what is said."""
    split = split_of(index, cfg.seed, cfg.split_ratios)
    ident = int(rng.integers(len(identities)))
    emotion = str(rng.choice(EMOTION_NAMES))
    mode = "neutral" if emotion == "neutral" else _weighted(rng, cfg.mode_weights)
    emo = EMOTIONS[emotion]
    synonyms = [w for w in emo.vocabulary[1:]]
    labels = [emo.name, str(rng.choice(synonyms))]
    source = _weighted(rng, cfg.source_weights)
    n = int(rng.integers(1, cfg.max_utterances + 1))
    emotional = {int(rng.integers(n))} | {k for k in range(n) if rng.random() < 0.5}
    plan = ClipPlan(f"syn{index:06d}", index, split, ident, emotion, mode, labels, source, [])
    ch = plan.channels
    speaker = identities[ident].voice
    rate_jitter, pitch_jitter = float(rng.uniform(0.92, 1.08)), int(rng.integers(-5, 6))
    used: set[str] = set()
    for k in range(n):
        is_emo = emotion != "neutral" and k in emotional
        pool = sentence_pool(emotion if is_emo and ch["text"] else "neutral", split, cfg.split_ratios)
        text = str(rng.choice(pool))
        while text in used and len(used) < len(pool):
            text = str(rng.choice(pool))
        used.add(text)
        profile = emo.voice if is_emo and ch["voice"] else NEUTRAL_VOICE
        voice = Voice(speaker, int(profile.rate_wpm * rate_jitter), int(np.clip(profile.pitch + pitch_jitter, 0, 99)),
                      range_name(profile.pitch_range), profile.amplitude)
        label = str(rng.choice(emo.vocabulary)) if is_emo else "neutral"
        plan.utterances.append(UtterancePlan(k, text, is_emo, label, voice))
    return plan


def layout_speech(clips: list[np.ndarray], rng: np.random.Generator, cfg: SynthConfig
                  ) -> tuple[np.ndarray, list[tuple[float, float]], int]:
    """Place utterance audio on one track with pauses; returns (track, [(start_s, end_s)], n_frames).

    Utterances that would push the clip past ``max_duration_s`` are dropped from the end
    (at least one stays); short clips are padded with trailing silence to ``min_duration_s``.
    Start times are whole milliseconds; the track is exactly ``n_frames / fps`` long.
    """
    lead = float(rng.uniform(0.2, 0.7))
    gaps = [float(rng.uniform(0.3, 0.9)) for _ in clips]
    tail = float(rng.uniform(0.3, 0.8))
    while True:
        times, cursor = [], lead
        for k, audio in enumerate(clips):
            start = round(cursor, 3)
            end = start + audio.size / SAMPLE_RATE
            times.append((start, end))
            cursor = end + gaps[k]
        total = times[-1][1] + tail
        if total <= cfg.max_duration_s or len(clips) == 1:
            break
        clips = clips[:-1]
    if total > cfg.max_duration_s:
        raise ValueError(f"a single utterance lasts {times[0][1] - times[0][0]:.2f} s, over max_duration_s")
    total = max(total, cfg.min_duration_s)
    n_frames = int(np.ceil(total * cfg.fps - 1e-9))
    track = np.zeros(int(round(n_frames / cfg.fps * SAMPLE_RATE)), np.int16)
    for (start, _), audio in zip(times, clips):
        offset = int(round(start * SAMPLE_RATE))
        track[offset: offset + audio.size] = audio[: track.size - offset]
    times = [(start, round(start + audio.size / SAMPLE_RATE, 3)) for (start, _), audio in zip(times, clips)]
    return track, times, n_frames


def schedule_events(plan: ClipPlan, times: list[tuple[float, float]], duration_s: float,
                    cfg: SynthConfig, rng: np.random.Generator) -> list[dict]:
    """Planted micro-expressions inside emotional utterances (when the face carries the
    emotion) and random blinks anywhere; no two events overlap (0.2 s apart at least)."""
    events: list[dict] = []

    def free(onset: float, dur: float) -> bool:
        return all(onset + dur + 0.2 <= e["onset_s"] or onset >= e["onset_s"] + e["duration_s"] + 0.2
                   for e in events)

    def place(kind: str, lo: float, hi: float, emotional: bool, utterance: int | None) -> bool:
        for _ in range(30):
            dur = round(float(rng.uniform(*cfg.event_duration_s)), 2) if kind != "blink" \
                else round(float(rng.uniform(0.1, 0.18)), 2)
            if hi - lo < dur:
                return False
            onset = round(float(rng.uniform(lo, hi - dur)), 2)
            if free(onset, dur):
                amp = float(rng.uniform(*cfg.event_amplitude_fw)) if kind != "blink" else 0.06
                events.append({"kind": kind, "emotional": emotional, "region": ACTIONS[kind]["region"],
                               "onset_s": onset, "duration_s": dur, "amplitude_fw": round(amp, 4),
                               "utterance": utterance})
                return True
        return False

    if plan.channels["face"]:
        actions = EMOTIONS[plan.emotion].actions
        for u, (start, end) in zip(plan.utterances, times):
            if not u.emotional:
                continue
            for _ in range(int(rng.integers(1, 3))):
                place(str(rng.choice(actions)), start, end, True, u.index)
        if not any(e["emotional"] for e in events):  # the face must show it somewhere
            place(str(rng.choice(actions)), 0.1, duration_s - 0.1, True, None)
    n_blinks = int(rng.poisson(cfg.blinks_per_minute * duration_s / 60))
    for _ in range(n_blinks):
        place("blink", 0.1, duration_s - 0.1, False, None)
    events.sort(key=lambda e: e["onset_s"])
    for e in events:
        e["offset_s"] = round(e["onset_s"] + e["duration_s"], 3)
        e["peak_s"] = round(e["onset_s"] + e["duration_s"] / 2, 3)
    return events


def explain(plan: ClipPlan, times: list[tuple[float, float]], events: list[dict]) -> str:
    """The reference explanation: which clues, when, and the conclusion."""
    emo, ch = EMOTIONS[plan.emotion], plan.channels
    face = [e for e in events if e["emotional"]]
    if face:
        parts = [f"at {e['onset_s']:.2f}-{e['offset_s']:.2f} s {ACTIONS[e['kind']]['clue']}" for e in face]
        visual = "In the video, " + "; ".join(parts) + "."
    else:
        blinks = sum(1 for e in events if e["kind"] == "blink")
        visual = "In the video, the face stays composed" + (" apart from ordinary blinks." if blinks else ".")
    voiced = [(u, t) for u, t in zip(plan.utterances, times) if u.emotional and ch["voice"]]
    if voiced:
        spans = ", ".join(f"{s:.2f}-{e:.2f} s" for _, (s, e) in voiced)
        audio = f"In the audio, the voice is {emo.voice_clue} ({spans})."
    else:
        audio = "In the audio, the voice is even, at a steady rate and pitch."
    said = " ".join(f'At {s:.2f}-{e:.2f} s the speaker says "{u.text}"' + ("" if i + 1 < len(times) else ".")
                    for i, (u, (s, e)) in enumerate(zip(plan.utterances, times)))
    said = said.replace('" At', '". At')
    words = f"The words express {plan.emotion} feelings." if ch["text"] else "The words themselves are neutral."
    if plan.emotion == "neutral":
        verdict = f"Nothing in the face, voice or words departs from a steady baseline, so the speaker is {plan.labels[0]} and {plan.labels[1]}."
    else:
        carriers = [name for name, on in (("face", ch["face"]), ("voice", ch["voice"]), ("words", ch["text"])) if on]
        lead = "Only the " + carriers[0] + " reveals" if len(carriers) == 1 else "The " + " and ".join(carriers) + " reveal"
        verdict = f"{lead} the emotion: the speaker is {plan.labels[0]}, {plan.labels[1]}."
    return " ".join([visual, audio, said, words, verdict])


# ---------------------------------------------------------------------------- one clip

def fingerprint(cfg: SynthConfig, index: int, identities: list[Identity]) -> str:
    key = {"v": GENERATOR_VERSION, "cfg": cfg.content_key(), "index": index,
           "ids": [i.name for i in identities]}
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def make_clip(cfg: SynthConfig, index: int, identities: list[Identity], videos_dir: Path) -> dict:
    """Render clip ``index`` into ``videos_dir``; returns its record {manifest, truth, fingerprint}."""
    rng = np.random.default_rng([cfg.seed, index])
    plan = plan_clip(cfg, index, identities, rng)
    speech = [speak(u.text, u.voice) for u in plan.utterances]
    track, times, n_frames = layout_speech(speech, rng, cfg)
    plan.utterances = plan.utterances[: len(times)]
    duration = n_frames / cfg.fps
    events = schedule_events(plan, times, duration, cfg, rng)
    identity = identities[plan.identity]
    rig = FaceRig(identity)
    scene = Scene.random(rng, cfg.width, cfg.height, rig.size)
    renderer = ClipRenderer(rig, scene, cfg.fps)
    mouth = envelope(track, cfg.fps, n_frames)
    mp4 = videos_dir / f"{plan.video_id}.mp4"
    encode_mp4((renderer.frame(i, events, float(mouth[i])) for i in range(n_frames)), track, SAMPLE_RATE,
               cfg.fps, (cfg.width, cfg.height), mp4, crf=cfg.crf)
    for e in events:
        e["bbox_px"] = renderer.event_box(e["kind"], e["peak_s"])
        e["amplitude_px"] = round(e["amplitude_fw"] * identity.face_width * scene.scale, 2)

    utterances = [{"index": u.index, "start_s": s, "end_s": e, "text": u.text, "speaker": "A"}
                  for u, (s, e) in zip(plan.utterances, times)]
    manifest = {"video_id": plan.video_id, "uri": f"videos/{mp4.name}", "split": plan.split,
                "labels": plan.labels, "description": explain(plan, times, events),
                "utterance_labels": [{"index": u["index"], "start_s": u["start_s"], "end_s": u["end_s"],
                                      "labels": [p.label]} for u, p in zip(utterances, plan.utterances)]}
    if plan.source == "inline":
        manifest["utterances"] = utterances
    elif plan.source == "srt":
        srt = videos_dir / f"{plan.video_id}.srt"
        srt.write_text(format_srt([Cue(u["start_s"], u["end_s"], u["text"]) for u in utterances]))
        manifest["srt"] = f"videos/{srt.name}"
    truth = {
        "video_id": plan.video_id, "split": plan.split, "emotion": plan.emotion, "mode": plan.mode,
        "channels": plan.channels, "labels": plan.labels, "identity": identity.name,
        "identity_source": identity.source, "utterance_source": plan.source,
        "duration_s": round(duration, 3), "fps": cfg.fps, "n_frames": n_frames,
        "width": cfg.width, "height": cfg.height, "sample_rate": SAMPLE_RATE,
        "utterances": [dict(u, emotional=p.emotional, label=p.label, voice=asdict(p.voice))
                       for u, p in zip(utterances, plan.utterances)],
        "micro_events": events,
        "scene": asdict(scene),
        "mouth_open": [round(float(m), 3) for m in mouth],
    }
    return {"fingerprint": fingerprint(cfg, index, identities), "manifest": manifest, "truth": truth}


# ---------------------------------------------------------------------------- the corpus

_WORKER_IDS: list[Identity] | None = None


def _init_worker(identities: list[Identity]) -> None:
    global _WORKER_IDS
    _WORKER_IDS = identities
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    import cv2
    cv2.setNumThreads(1)


def _clip_task(cfg: SynthConfig, index: int, videos_dir: str) -> dict:
    record = make_clip(cfg, index, _WORKER_IDS, Path(videos_dir))
    _write_json_atomic(Path(videos_dir) / f"{record['manifest']['video_id']}.json", record)
    return record


def _write_json_atomic(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(obj))
    os.replace(tmp, path)


def _existing(videos_dir: Path, video_id: str, fp: str) -> dict | None:
    rec_path = videos_dir / f"{video_id}.json"
    if not rec_path.is_file() or not (videos_dir / f"{video_id}.mp4").is_file():
        return None
    try:
        rec = json.loads(rec_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return rec if rec.get("fingerprint") == fp else None


def generate_corpus(cfg: SynthConfig, progress: bool = True) -> dict:
    """Generate (or complete) the corpus in ``cfg.out``; returns the summary written to corpus.json."""
    from tqdm import tqdm

    out = Path(cfg.out)
    videos_dir = out / "videos"
    videos_dir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    identities = load_identities()
    records: dict[int, dict] = {}
    todo = []
    for i in range(cfg.videos):
        rec = _existing(videos_dir, f"syn{i:06d}", fingerprint(cfg, i, identities))
        if rec is not None:
            records[i] = rec
        else:
            todo.append(i)
    workers = cfg.workers or os.cpu_count() or 1
    bar = tqdm(total=cfg.videos, initial=len(records), unit="clip", desc="synth", disable=not progress)
    failures: list[tuple[int, str]] = []
    if todo:
        # spawn, not fork: the parent already runs OpenCV/dlib thread pools, which do not
        # survive a fork (the children deadlock on their first parallel call).
        with ProcessPoolExecutor(max_workers=min(workers, len(todo)), initializer=_init_worker,
                                 initargs=(identities,), mp_context=mp.get_context("spawn")) as pool:
            pending = {pool.submit(_clip_task, cfg, i, str(videos_dir)): i for i in todo[: 2 * workers]}
            queue = todo[2 * workers:]
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for fut in done:
                    i = pending.pop(fut)
                    try:
                        records[i] = fut.result()
                    except Exception as exc:  # one bad clip must not lose the others
                        failures.append((i, f"{type(exc).__name__}: {exc}"))
                    bar.update(1)
                    if queue:
                        j = queue.pop(0)
                        pending[pool.submit(_clip_task, cfg, j, str(videos_dir))] = j
    bar.close()
    if failures:
        i, msg = failures[0]
        raise RuntimeError(f"{len(failures)} clip(s) failed; first: clip {i}: {msg}")
    ordered = [records[i] for i in range(cfg.videos)]
    _write_jsonl(out / "manifest.jsonl", [r["manifest"] for r in ordered])
    _write_jsonl(out / "truth.jsonl", [r["truth"] for r in ordered])
    summary = summarize([r["truth"] for r in ordered])
    summary.update({"generator": GENERATOR_VERSION, "seed": cfg.seed, "generated": len(todo),
                    "reused": cfg.videos - len(todo), "seconds": round(time.perf_counter() - t0, 1),
                    "identities": [i.name for i in identities]})
    _write_json_atomic(out / "corpus.json", summary)
    return summary


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    tmp = path.with_name(path.name + ".part")
    with open(tmp, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)


def summarize(truths: list[dict]) -> dict:
    """Counts by split, emotion, channel mode, utterance source; durations; events."""
    dur = [t["duration_s"] for t in truths]
    return {
        "videos": len(truths),
        "hours": round(sum(dur) / 3600, 4),
        "duration_s": {"min": min(dur), "mean": round(float(np.mean(dur)), 2), "max": max(dur)},
        "utterances": sum(len(t["utterances"]) for t in truths),
        "micro_events": sum(1 for t in truths for e in t["micro_events"] if e["emotional"]),
        "blinks": sum(1 for t in truths for e in t["micro_events"] if not e["emotional"]),
        "by_split": dict(Counter(t["split"] for t in truths)),
        "by_split_emotion": {s: dict(Counter(t["emotion"] for t in truths if t["split"] == s)) for s in SPLITS},
        "by_emotion": dict(Counter(t["emotion"] for t in truths)),
        "by_mode": dict(Counter(t["mode"] for t in truths)),
        "by_utterance_source": dict(Counter(t["utterance_source"] for t in truths)),
        "by_identity": dict(Counter(t["identity"] for t in truths)),
    }


def read_jsonl(path: str | Path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]
