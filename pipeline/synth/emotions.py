"""The emotion catalogue of the synthetic corpus: how each emotion shows in words, voice and face.

Each emotion has an open vocabulary (labels are drawn from it, so models must handle
synonyms), a voice profile for espeak-ng (rate in words per minute, pitch 0-99, pitch
range 0-99, amplitude 0-200) and the facial action units whose brief activation is planted
as a micro-expression. Sentences are built from templates so the corpus has thousands of
distinct lines and train/val/test can be kept disjoint at the sentence level.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class VoiceProfile:
    rate_wpm: int
    pitch: int
    pitch_range: int
    amplitude: int


@dataclass(frozen=True)
class Emotion:
    name: str
    vocabulary: tuple[str, ...]  # open-vocabulary labels, canonical name first
    voice: VoiceProfile
    actions: tuple[str, ...]  # facial action units planted as micro-expressions
    voice_clue: str  # how the voice sounds, for the reference explanation
    templates: tuple[str, ...]


NEUTRAL_VOICE = VoiceProfile(rate_wpm=165, pitch=50, pitch_range=50, amplitude=110)

# Facial action units: which landmarks move, and how (unit vectors in face coordinates,
# x to the subject's left in the image, y down; scaled by the face width at render time).
# Landmark indices follow the 68-point iBUG scheme that dlib predicts.
ACTIONS: dict[str, dict] = {
    "mouth_corners_up": {"region": "mouth", "points": {48: (-0.35, -1.0), 54: (0.35, -1.0)},
                         "clue": "the corners of the mouth lift briefly"},
    "mouth_corners_down": {"region": "mouth", "points": {48: (-0.15, 1.0), 54: (0.15, 1.0)},
                           "clue": "the corners of the mouth pull down briefly"},
    "brows_raise": {"region": "brows", "points": {17: (0, -0.8), 19: (0, -1.0), 21: (0, -0.9),
                                                   22: (0, -0.9), 24: (0, -1.0), 26: (0, -0.8)},
                    "clue": "the eyebrows shoot up"},
    "brows_furrow": {"region": "brows", "points": {20: (0.5, 0.7), 21: (0.8, 1.0),
                                                    22: (-0.8, 1.0), 23: (-0.5, 0.7)},
                     "clue": "the brows draw together and down"},
    "brows_inner_raise": {"region": "brows", "points": {20: (0.2, -0.6), 21: (0.3, -1.0),
                                                         22: (-0.3, -1.0), 23: (-0.2, -0.6)},
                          "clue": "the inner corners of the brows rise"},
    "eyes_widen": {"region": "eyes", "points": {37: (0, -1.0), 38: (0, -1.0), 43: (0, -1.0), 44: (0, -1.0),
                                                 40: (0, 0.5), 41: (0, 0.5), 46: (0, 0.5), 47: (0, 0.5)},
                   "clue": "the eyes widen"},
    "eyes_squint": {"region": "eyes", "points": {40: (0, -0.9), 41: (0, -0.9), 46: (0, -0.9), 47: (0, -0.9),
                                                  37: (0, 0.4), 38: (0, 0.4), 43: (0, 0.4), 44: (0, 0.4)},
                    "clue": "the eyes narrow"},
    "upper_lip_raise": {"region": "mouth", "points": {50: (0, -1.0), 51: (0, -1.0), 52: (0, -1.0),
                                                       31: (0, -0.5), 35: (0, -0.5)},
                        "clue": "the upper lip curls up and the nose wrinkles"},
    "lips_press": {"region": "mouth", "points": {51: (0, 0.6), 57: (0, -0.6), 62: (0, 0.4), 66: (0, -0.4),
                                                  48: (0.3, 0), 54: (-0.3, 0)},
                   "clue": "the lips press tight"},
    # Not emotional: planted at random as distractors, like real blinks.
    "blink": {"region": "eyes", "points": {37: (0, 1.2), 38: (0, 1.2), 43: (0, 1.2), 44: (0, 1.2)},
              "clue": "a blink"},
}

_SUBJECTS = ("the project", "the trip", "my sister", "our team", "the new job", "the report",
             "the concert", "the house", "the interview", "my brother", "the exam", "the car",
             "the party", "the contract", "the garden", "the doctor", "our neighbours", "the results")
_TIMES = ("today", "this morning", "last night", "yesterday", "this week", "after lunch",
          "on Monday", "at the meeting", "this year", "just now", "before the call", "again")

EMOTIONS: dict[str, Emotion] = {
    "happy": Emotion(
        "happy", ("happy", "joyful", "cheerful", "delighted", "excited", "pleased"),
        VoiceProfile(rate_wpm=200, pitch=72, pitch_range=85, amplitude=130),
        ("mouth_corners_up", "eyes_squint"), "fast and bright, with a high, lively pitch",
        ("I am so happy about {s} {t}!", "This is wonderful, {s} went perfectly {t}.",
         "I love it, {s} made my day {t}.", "What great news about {s} {t}!",
         "We did it, {s} is finally done {t}.", "I can't stop smiling about {s} {t}.")),
    "sad": Emotion(
        "sad", ("sad", "sorrowful", "disappointed", "downcast", "gloomy", "heartbroken"),
        VoiceProfile(rate_wpm=115, pitch=28, pitch_range=15, amplitude=80),
        ("mouth_corners_down", "brows_inner_raise"), "slow and quiet, with a low, flat pitch",
        ("I miss how {s} used to be before {t}.", "It hurts that {s} fell apart {t}.",
         "Nothing went right with {s} {t}.", "I feel so alone since {s} ended {t}.",
         "I really hoped {s} would work out {t}.", "We lost {s} {t}, and I can't bear it.")),
    "angry": Emotion(
        "angry", ("angry", "furious", "irritated", "annoyed", "frustrated", "outraged"),
        VoiceProfile(rate_wpm=190, pitch=38, pitch_range=70, amplitude=180),
        ("brows_furrow", "lips_press"), "loud and clipped, with hard stresses",
        ("How dare they ruin {s} {t}!", "I am sick of {s} failing {t}.",
         "Stop lying to me about {s} {t}!", "This is unacceptable, {s} was wrecked {t}.",
         "I told you to fix {s} {t}, and you ignored me.", "Who broke {s} {t}? I want an answer!")),
    "surprised": Emotion(
        "surprised", ("surprised", "astonished", "amazed", "startled", "stunned"),
        VoiceProfile(rate_wpm=175, pitch=82, pitch_range=95, amplitude=140),
        ("brows_raise", "eyes_widen"), "high and rising, with sudden emphasis",
        ("Wait, {s} happened {t}? Really?", "No way, {s} changed {t}!",
         "I never expected {s} to show up {t}!", "Wow, is that {s} {t}?",
         "What? {s} is already here {t}?", "I can't believe {s} turned out like this {t}!")),
    "fearful": Emotion(
        "fearful", ("fearful", "afraid", "anxious", "nervous", "scared", "worried"),
        VoiceProfile(rate_wpm=210, pitch=66, pitch_range=30, amplitude=95),
        ("eyes_widen", "brows_inner_raise"), "rushed and thin, with a tense, unsteady pitch",
        ("I am scared that {s} will go wrong {t}.", "What if {s} falls apart {t}?",
         "Something is wrong with {s} {t}, I can feel it.", "Please, I can't face {s} {t}.",
         "I keep worrying about {s} {t}.", "I heard a noise near {s} {t}, did you?")),
    "disgusted": Emotion(
        "disgusted", ("disgusted", "repulsed", "revolted", "grossed out"),
        VoiceProfile(rate_wpm=135, pitch=34, pitch_range=40, amplitude=120),
        ("upper_lip_raise", "brows_furrow"), "slow and drawn out, with a low, sneering tone",
        ("Ugh, {s} smelled awful {t}.", "That is revolting, look at {s} {t}.",
         "I can't even look at {s} after {t}.", "Gross, {s} was covered in mould {t}.",
         "How can anyone touch {s} {t}? Disgusting.", "Yuck, {s} tasted rotten {t}.")),
    "neutral": Emotion(
        "neutral", ("neutral", "calm", "composed"),
        NEUTRAL_VOICE, (), "even, at a steady rate and pitch",
        ("The meeting about {s} moved to {t}.", "I sent the notes on {s} {t}.",
         "We need to check {s} {t}.", "The form for {s} is due {t}.",
         "I will call about {s} {t}.", "They updated {s} {t}.",
         "Let me write down what {s} needs {t}.", "The schedule for {s} changed {t}.")),
}

EMOTION_NAMES: tuple[str, ...] = tuple(EMOTIONS)
NON_NEUTRAL: tuple[str, ...] = tuple(n for n in EMOTIONS if n != "neutral")


def sentence_space(emotion: str) -> list[str]:
    """Every sentence the templates of ``emotion`` can produce, in a fixed order."""
    e = EMOTIONS[emotion]
    out = []
    for template in e.templates:
        for s in _SUBJECTS:
            for t in _TIMES:
                line = template.format(s=s, t=t)
                out.append(line[0].upper() + line[1:])
    return out
