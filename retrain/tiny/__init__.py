"""The bundled tiny chat model: built from a corpus in this repository, on CPU, with no downloads."""

from retrain.tiny.build import DEFAULT_TINY_MODEL_DIR, TinyModelBuildError, build_tiny_model
from retrain.tiny.conversations import CorpusError
from retrain.tiny.styles import ANSWER_STYLES, AnswerStyle, classify_style
from retrain.tiny.tokenizer import CHAT_TEMPLATE, SPECIAL_TOKENS

__all__ = [
    "ANSWER_STYLES",
    "CHAT_TEMPLATE",
    "DEFAULT_TINY_MODEL_DIR",
    "SPECIAL_TOKENS",
    "AnswerStyle",
    "CorpusError",
    "TinyModelBuildError",
    "build_tiny_model",
    "classify_style",
]
