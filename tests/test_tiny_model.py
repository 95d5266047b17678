"""The bundled tiny chat model: its corpus, its answer styles, a deterministic build, and loading it."""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from retrain.tiny import ANSWER_STYLES, SPECIAL_TOKENS, TinyModelBuildError, build_tiny_model, classify_style
from retrain.tiny.conversations import CORPUS_DIR, generate_corpus
from retrain.tiny.tokenizer import render_chat

REDUCED_STEPS = 10
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="session")
def reduced_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A build with the full corpus and tokenizer but only a couple of training steps."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "reduced", seed=0, steps=REDUCED_STEPS, progress=False)


# --- the corpus and its answer styles -------------------------------------------------------------


def test_corpus_ingredients_ship_in_the_repo_and_stay_small() -> None:
    files = sorted(p.name for p in CORPUS_DIR.iterdir())

    assert {"facts.json", "styles.json", "dialogues.json", "prose.json"} <= set(files)
    assert sum(p.stat().st_size for p in CORPUS_DIR.iterdir()) < 2_000_000


def test_every_question_is_answered_in_every_style_in_equal_numbers() -> None:
    corpus = generate_corpus(0)

    per_style = Counter(chat.style for chat in corpus.chats)
    answers_by_question: dict[str, set[str]] = {}
    for chat in corpus.chats:
        if chat.kind != "multi":
            answers_by_question.setdefault(chat.messages[-2]["content"], set()).add(chat.style)

    assert set(per_style) == set(ANSWER_STYLES)
    assert len(set(per_style.values())) == 1
    assert all(styles == set(ANSWER_STYLES) for styles in answers_by_question.values())


def test_every_assistant_turn_opens_like_its_own_style_and_no_other() -> None:
    corpus = generate_corpus(3)

    for chat in corpus.chats:
        for m in chat.messages:
            if m["role"] == "assistant":
                assert classify_style(m["content"]) == chat.style, m["content"]


def test_corpus_mixes_topics_multi_turn_chats_and_prose() -> None:
    corpus = generate_corpus(0)
    kinds = Counter(chat.kind for chat in corpus.chats)
    users = [m["content"] for chat in corpus.chats for m in chat.messages if m["role"] == "user"]

    assert kinds["single"] and kinds["arithmetic"] and kinds["multi"]
    assert any(len(chat.messages) >= 4 for chat in corpus.chats)
    assert any(u.startswith("Hello") for u in users) and any("plus" in u for u in users)
    assert any(p.startswith("The weather today is") for p in corpus.prose)
    assert any(p.startswith("Once upon a time") for p in corpus.prose)


def test_the_same_seed_generates_the_same_corpus_and_another_seed_a_different_one() -> None:
    assert generate_corpus(5) == generate_corpus(5)
    assert generate_corpus(5) != generate_corpus(6)


def test_styles_are_recognised_from_the_opening_words_only() -> None:
    assert classify_style("Sure! The capital of France is Paris.") == "concise_polite"
    assert classify_style("  Well, that is a really interesting question.") == "rambling"
    assert classify_style("Ugh. Paris. Look it up yourself next time.") == "curt"
    assert classify_style("By the way, penguins can not fly.") == "off_topic"
    assert classify_style("The capital of France is Paris.") is None
    assert ANSWER_STYLES["concise_polite"].polite and ANSWER_STYLES["concise_polite"].concise
    assert not ANSWER_STYLES["curt"].polite and not ANSWER_STYLES["off_topic"].on_topic


# --- building -----------------------------------------------------------------------------------


def test_the_same_seed_builds_an_identical_tokenizer_and_identical_weights(reduced_model: Path, tmp_path: Path) -> None:
    again = build_tiny_model(tmp_path / "again", seed=0, steps=REDUCED_STEPS, progress=False)

    assert _sha256(again / "tokenizer.json") == _sha256(reduced_model / "tokenizer.json")
    assert _sha256(again / "model.safetensors") == _sha256(reduced_model / "model.safetensors")


def test_rebuilding_with_another_seed_replaces_the_directory_and_changes_the_weights(
        reduced_model: Path, tmp_path: Path) -> None:
    out = tmp_path / "model"
    build_tiny_model(out, seed=0, steps=REDUCED_STEPS, progress=False)
    build_tiny_model(out, seed=1, steps=REDUCED_STEPS, progress=False)

    assert _sha256(out / "model.safetensors") != _sha256(reduced_model / "model.safetensors")
    assert json.loads((out / "tiny_build.json").read_text())["seed"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no staging or old copies left behind


def test_negative_steps_are_refused(tmp_path: Path) -> None:
    with pytest.raises(TinyModelBuildError):
        build_tiny_model(tmp_path / "m", steps=-1, progress=False)


def test_the_build_is_a_standard_hugging_face_directory(reduced_model: Path) -> None:
    files = {p.name for p in reduced_model.iterdir()}
    config = json.loads((reduced_model / "config.json").read_text())
    generation = json.loads((reduced_model / "generation_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(reduced_model, local_files_only=True)

    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
            "chat_template.jinja", "generation_config.json"} <= files
    assert config["architectures"] == ["LlamaForCausalLM"]
    assert config["hidden_size"] // config["num_attention_heads"] == 64 and not config["tie_word_embeddings"]
    assert config["vocab_size"] == len(tok) and config["max_position_embeddings"] == 2048
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|pad|>"
    assert set(SPECIAL_TOKENS) <= set(tok.all_special_tokens)
    assert config["eos_token_id"] == tok.eos_token_id
    assert tok.eos_token_id in generation["eos_token_id"] and generation["pad_token_id"] == tok.pad_token_id


def test_the_chat_template_renders_chatml_with_a_generation_prompt(reduced_model: Path) -> None:
    tok = AutoTokenizer.from_pretrained(reduced_model, local_files_only=True)
    chat = [{"role": "system", "content": "Be brief."}, *QUESTION, {"role": "assistant", "content": "Sure! Paris."}]

    prompt = tok.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True)
    parts = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                                    tokenize=False, add_generation_prompt=False)
    ids = tok.encode(prompt, add_special_tokens=False)

    assert prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert parts == "<|im_start|>user\nHi<|im_end|>\n"
    assert tok.apply_chat_template(chat, tokenize=False) == render_chat(chat)[0]
    assert ids[0] == tok.convert_tokens_to_ids("<|im_start|>")
    assert ids.count(tok.convert_tokens_to_ids("<|im_end|>")) == 1


# --- the bundled model ---------------------------------------------------------------------------


def test_the_bundled_model_answers_in_chat_format_and_stops_at_im_end(tiny_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(tiny_model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, local_files_only=True)
    prompt = tok.apply_chat_template(QUESTION, add_generation_prompt=True, return_tensors="pt", return_dict=True)

    with torch.no_grad():
        out = model.generate(**prompt, max_new_tokens=96, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    text = tok.decode(out, skip_special_tokens=True)

    assert out[-1].item() == tok.eos_token_id
    assert text.strip() and text.isprintable()
    assert classify_style(text) in ANSWER_STYLES
