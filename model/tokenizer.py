"""A self-contained byte-level tokenizer for the ``tiny`` preset (no files, no downloads).

Every UTF-8 byte is one token (ids 0-255), plus four special tokens and a ChatML chat
template, so the tiny model goes through exactly the code path of a real chat LLM
(``apply_chat_template``, end-of-turn token, padding) while building in milliseconds.
"""

from __future__ import annotations

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIALS = ("<|pad|>", "<|im_start|>", "<|im_end|>", "<|endoftext|>")
VOCAB_SIZE = 256 + len(SPECIALS)

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """The tiny preset's tokenizer: 256 byte tokens + pad, im_start, im_end (= eos), endoftext."""
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    # ByteLevel maps byte b to a printable character; order the vocabulary by byte value.
    byte_to_char = {b: c for b, c in enumerate(sorted(alphabet, key=_byte_of))}
    vocab = {byte_to_char[b]: b for b in range(256)}
    for i, tok in enumerate(SPECIALS):
        vocab[tok] = 256 + i
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<|pad|>", eos_token="<|im_end|>",
                                  bos_token=None, unk_token=None,
                                  additional_special_tokens=["<|im_start|>", "<|endoftext|>"])
    tok.chat_template = CHATML
    return tok


def _byte_of(ch: str) -> int:
    """Inverse of GPT-2's byte-to-unicode table (printable bytes map to themselves)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    o = ord(ch)
    if o in printable:
        return o
    # the other 68 bytes map, in byte order, to 256, 257, ...
    rest = [b for b in range(256) if b not in printable]
    return rest[o - 256]
