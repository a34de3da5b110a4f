"""An offline character-level tokenizer with a chat template.

Nothing can be downloaded in CI or on an air-gapped box, so the tiny policies use a tokenizer built
from scratch: one token per printable ASCII character plus a few special tokens. It is a real
``PreTrainedTokenizerFast`` (saved and re-loaded with ``AutoTokenizer.from_pretrained``), so the rest of
rlvr treats it exactly like a hub tokenizer.

The chat template ends every assistant turn with ``<|end|>``, which is also the ``eos_token``:
generation stops at the end of the turn instead of running to the length limit.
"""

from __future__ import annotations

import string

from tokenizers import Tokenizer, decoders, models
from transformers import PreTrainedTokenizerFast

PAD, END, USER, ASSISTANT, SYSTEM = "<|pad|>", "<|end|>", "<|user|>", "<|assistant|>", "<|system|>"
SPECIAL_TOKENS = [PAD, END, USER, ASSISTANT, SYSTEM]
CHARACTERS = list(string.printable[:95]) + ["\n"]  # letters, digits, punctuation, space, newline

CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}" + SYSTEM + "{{ message['content'] }}"
    "{%- elif message['role'] == 'user' -%}" + USER + "{{ message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}" + ASSISTANT + "{{ message['content'] }}" + END + "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}" + ASSISTANT + "{%- endif -%}"
)


def build_char_tokenizer() -> PreTrainedTokenizerFast:
    """Character-level tokenizer: ids 0-4 are special tokens, then one id per character.

    Characters outside the vocabulary raise at encoding time rather than being silently dropped.
    """
    vocab = {token: index for index, token in enumerate(SPECIAL_TOKENS + CHARACTERS)}
    # BPE with no merges and no pre-tokenizer splits text into single characters.
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], fuse_unk=False))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(SPECIAL_TOKENS)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token=PAD,
        eos_token=END,
        padding_side="left",  # decoder-only generation pads on the left
        model_max_length=4096,
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer
