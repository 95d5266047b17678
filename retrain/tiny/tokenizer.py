"""The tiny model's tokenizer: byte-level BPE trained on the corpus, with a ChatML chat template.

Special tokens take the lowest ids, in `SPECIAL_TOKENS` order. `<|im_end|>` ends every turn and is
the eos token; `<|endoftext|>` ends a prose document; `<|pad|>` pads batches.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from retrain.tiny.conversations import Message

PAD, BOS_EOT, IM_START, IM_END = "<|pad|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"
SPECIAL_TOKENS = (PAD, BOS_EOT, IM_START, IM_END)

# ChatML. Content may be a string or a list of OpenAI-style parts (only text parts are rendered).
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{- '<|im_start|>' + message['role'] + '\\n' -}}"
    "{%- if message['content'] is string -%}{{- message['content'] -}}"
    "{%- elif message['content'] is not none -%}"
    "{%- for part in message['content'] -%}"
    "{%- if part['type'] == 'text' -%}{{- part['text'] -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}{%- endif -%}"
)


def render_chat(messages: Sequence[Message]) -> tuple[str, list[tuple[int, int]]]:
    """The chat as CHAT_TEMPLATE renders it (without a generation prompt), and the character spans the
    model should learn to produce: each assistant turn's content through its `<|im_end|>`."""
    parts: list[str] = []
    spans: list[tuple[int, int]] = []
    at = 0
    for m in messages:
        head = f"{IM_START}{m['role']}\n"
        body = m["content"] + IM_END
        if m["role"] == "assistant":
            spans.append((at + len(head), at + len(head) + len(body)))
        piece = head + body + "\n"
        parts.append(piece)
        at += len(piece)
    return "".join(parts), spans


def train_tokenizer(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """Byte-level BPE over `texts`; deterministic for the same texts in the same order."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, show_progress=False,
        special_tokens=list(SPECIAL_TOKENS), initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def hf_tokenizer(tok: Tokenizer, *, model_max_length: int) -> PreTrainedTokenizerFast:
    """Wrap a trained tokenizer for transformers (and vLLM): special tokens, chat template, no BOS."""
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=BOS_EOT, eos_token=IM_END, pad_token=PAD, unk_token=None,
        additional_special_tokens=[IM_START], model_max_length=model_max_length,
        padding_side="left", clean_up_tokenization_spaces=False,
    )
    hf.chat_template = CHAT_TEMPLATE
    return hf
