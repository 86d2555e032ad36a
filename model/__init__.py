"""MicroEmo model package: pure torch (no I/O beyond loading weights).

Public API::

    from model import MicroEmo, preset, count_parameters, Collator, Batch, parse_answer
    from model.weights import save_weights, load_weights, load_config
"""

from model.batch import Batch, Collator
from model.config import PRESETS, MicroEmoConfig, preset
from model.microemo import MicroEmo, Output, count_parameters
from model.prompt import Answer, build_target, format_answer, parse_answer

__all__ = ["PRESETS", "Answer", "Batch", "Collator", "MicroEmo", "MicroEmoConfig", "Output", "build_target",
           "count_parameters", "format_answer", "parse_answer", "preset"]
