"""Training the tiny Llama from scratch on CPU: examples, length-bucketed batches, a plain torch loop.

Deterministic: the data order comes from `random.Random(seed)` and the weights from `torch.manual_seed`,
so the same seed, steps and torch build (and thread count) give bit-identical weights.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer
from transformers import LlamaConfig, LlamaForCausalLM

from retrain.tiny.conversations import TinyCorpus
from retrain.tiny.tokenizer import BOS_EOT, IM_END, PAD, render_chat

IGNORE = -100


@dataclass(frozen=True, slots=True)
class TrainingPlan:
    """How long and how hard to train; the defaults finish in about a minute on 2 CPU cores."""

    steps: int = 1000
    batch_tokens: int = 256  # padded tokens per batch: small batches learn more per token at this size
    lr: float = 1e-3  # 3e-3 learns the templates but not which answer belongs to which question
    min_lr_ratio: float = 0.1
    warmup: int = 40
    weight_decay: float = 0.1
    max_len: int = 320


@dataclass(frozen=True, slots=True)
class Example:
    """Token ids and labels (IGNORE where the model only reads: system and user turns)."""

    ids: tuple[int, ...]
    labels: tuple[int, ...]


def model_config(tok: Tokenizer, *, max_position_embeddings: int = 2048) -> LlamaConfig:
    """A ~4M-parameter Llama: head_dim 64 (a size vLLM's CPU attention supports), untied embeddings."""
    return LlamaConfig(
        vocab_size=tok.get_vocab_size(), hidden_size=256, intermediate_size=688, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=4, head_dim=64, max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5, tie_word_embeddings=False, hidden_act="silu",
        bos_token_id=tok.token_to_id(BOS_EOT), eos_token_id=tok.token_to_id(IM_END), pad_token_id=tok.token_to_id(PAD),
        dtype="float32",
    )


def encode_examples(corpus: TinyCorpus, tok: Tokenizer, max_len: int) -> list[Example]:
    """Chats learn only the assistant turns (content and `<|im_end|>`); prose learns every token."""
    texts, spans = zip(*(render_chat(c.messages) for c in corpus.chats), strict=True)
    examples = []
    for enc, chat_spans in zip(tok.encode_batch(list(texts)), spans, strict=True):
        labels = [
            i if any(a <= start and end <= b for a, b in chat_spans) else IGNORE
            for i, (start, end) in zip(enc.ids, enc.offsets, strict=True)
        ]
        examples.append(Example(tuple(enc.ids[:max_len]), tuple(labels[:max_len])))
    for enc in tok.encode_batch([p + BOS_EOT for p in corpus.prose]):
        examples.append(Example(tuple(enc.ids[:max_len]), tuple(enc.ids[:max_len])))
    return examples


def batches(examples: Sequence[Example], rng: random.Random, batch_tokens: int) -> Iterator[list[Example]]:
    """Endless batches, reshuffled every epoch; examples of similar length go together to waste little
    on padding, and batch order is shuffled so lengths do not trend within an epoch."""
    while True:
        order = rng.sample(range(len(examples)), len(examples))
        epoch: list[list[Example]] = []
        for start in range(0, len(order), 512):
            chunk = sorted((examples[i] for i in order[start:start + 512]), key=lambda e: len(e.ids))
            batch: list[Example] = []
            for ex in chunk:
                if batch and (len(batch) + 1) * len(ex.ids) > batch_tokens:
                    epoch.append(batch)
                    batch = []
                batch.append(ex)
            if batch:
                epoch.append(batch)
        rng.shuffle(epoch)
        yield from epoch


def collate(batch: Sequence[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded tensors; padding is masked out of attention and loss."""
    width = max(len(e.ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for row, e in enumerate(batch):
        n = len(e.ids)
        ids[row, :n] = torch.tensor(e.ids)
        labels[row, :n] = torch.tensor(e.labels)
        mask[row, :n] = 1
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def _lr_at(step: int, plan: TrainingPlan) -> float:
    """Linear warmup, then cosine decay to `min_lr_ratio` of the peak."""
    if step < plan.warmup:
        return plan.lr * (step + 1) / plan.warmup
    progress = (step - plan.warmup) / max(1, plan.steps - plan.warmup)
    return plan.lr * (plan.min_lr_ratio + (1 - plan.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def train(config: LlamaConfig, examples: Sequence[Example], plan: TrainingPlan, seed: int,
          on_step: Callable[[int, float], None] | None = None) -> LlamaForCausalLM:
    """A freshly initialised model trained for `plan.steps` steps; the caller's torch RNG is untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        model.train()
        decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embed" not in n]
        keep = [p for n, p in model.named_parameters() if p.ndim < 2 or "embed" in n]
        opt = torch.optim.AdamW([{"params": decay, "weight_decay": plan.weight_decay},
                                 {"params": keep, "weight_decay": 0.0}], lr=plan.lr, betas=(0.9, 0.95), eps=1e-8)
        stream = batches(examples, random.Random(seed), plan.batch_tokens)
        for step in range(plan.steps):
            for group in opt.param_groups:
                group["lr"] = _lr_at(step, plan)
            loss = model(**collate(next(stream), config.pad_token_id)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if on_step is not None:
                on_step(step, loss.item())
    model.eval()
    return model
