"""Exports of a version for other tools, and what each costs: size, load time, tokens/s, quality delta.

Formats:

- `peft`: the adapter directory as registered (needs the base model beside it).
- `merged`: the adapter merged into the base weights (PEFT `merge_and_unload`), safetensors, a plain
  Transformers directory any engine loads.
- `int8`: the merged model with every linear layer's weight stored as int8 with one float32 scale per output
  channel (symmetric, weight-only). `load_export` rebuilds the model with `Int8Linear` layers that keep the int8
  weights in memory and multiply with them (`torch._weight_int8pack_mm` on CPU). Embeddings and norms stay
  float32. Files: `model.int8.safetensors` + `servoloop_quantization.json` + config and tokenizer.
- `bnb-int8` / `bnb-nf4`: bitsandbytes 8/4-bit, GPU only. On a machine without CUDA (this one) they raise
  ExportUnavailable naming why; nothing is faked.

`measure_export` loads an export fresh and records, against the unquantized reference (base + adapter,
float32): perplexity on a held-out prose set, preference accuracy on held-out chosen/rejected pairs (and how
often its preference agrees with the reference's), greedy tokens/s, load time and bytes on disk.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from schemas.errors import FailedPrecondition, InvalidRequest

Format = Literal["peft", "merged", "int8", "bnb-int8", "bnb-nf4"]
FORMATS: tuple[Format, ...] = ("peft", "merged", "int8", "bnb-int8", "bnb-nf4")
GPU_FORMATS = frozenset({"bnb-int8", "bnb-nf4"})
INT8_WEIGHTS = "model.int8.safetensors"
QUANT_CONFIG = "servoloop_quantization.json"
EXPORT_INFO = "servoloop_export.json"


class ExportUnavailable(FailedPrecondition):
    """The format cannot be produced on this machine (e.g. a GPU format without CUDA)."""

    code = "export_format_unavailable"


def check_format(fmt: str) -> Format:
    """`fmt` as a Format; raises InvalidRequest naming the formats, ExportUnavailable for GPU formats without CUDA."""
    if fmt not in FORMATS:
        raise InvalidRequest(f"unknown export format {fmt!r}; formats: {', '.join(FORMATS)}", param="format")
    if fmt in GPU_FORMATS:
        import torch

        if not torch.cuda.is_available():
            raise ExportUnavailable(f"format {fmt!r} needs bitsandbytes on a CUDA GPU; this machine has no GPU "
                                    "(use 'int8' for the CPU path)", param="format")
    return fmt  # type: ignore[return-value]


# --- int8 weight-only --------------------------------------------------------------------------------------


def _int8_linear_class() -> type:
    import torch

    class Int8Linear(torch.nn.Module):
        """A linear layer holding an int8 weight and per-output-channel float32 scales."""

        def __init__(self, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> None:
            super().__init__()
            self.register_buffer("weight", weight.contiguous())
            self.register_buffer("weight_scale", scale.contiguous())
            self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None
            self.in_features, self.out_features = weight.shape[1], weight.shape[0]

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            shape = x.shape
            flat = x.reshape(-1, shape[-1]).to(torch.float32).contiguous()
            try:
                out = torch._weight_int8pack_mm(flat, self.weight, self.weight_scale)
            except (RuntimeError, AttributeError):  # no packed kernel for this device or build
                out = flat @ (self.weight.to(torch.float32) * self.weight_scale[:, None]).T
            if self.bias is not None:
                out = out + self.bias
            return out.reshape(*shape[:-1], self.out_features).to(x.dtype)

    return Int8Linear


def quantize_weight(w: Any) -> tuple[Any, Any]:
    """(int8 weight, float32 scale per output row): symmetric, scale = max|row| / 127."""
    import torch

    w = w.detach().to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.clamp(torch.round(w / scale[:, None]), -127, 127).to(torch.int8)
    return q, scale


def _linear_names(model: Any) -> list[str]:
    """Linear layers to quantize: every nn.Linear whose weight is not shared (tied) with another tensor."""
    import torch

    shared = {id(model.get_input_embeddings().weight)} if model.get_input_embeddings() is not None else set()
    return [n for n, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and id(m.weight) not in shared]


def save_int8(model: Any, out: Path) -> dict[str, Any]:
    """Write `model` (a merged float model) as weight-only int8 to `out`; returns the quantization config."""
    from safetensors.torch import save_file

    names = set(_linear_names(model))
    tensors: dict[str, Any] = {}
    for key, value in model.state_dict().items():
        module = key.rsplit(".", 1)[0]
        if module in names and key.endswith(".weight"):
            q, scale = quantize_weight(value)
            tensors[key] = q
            tensors[f"{module}.weight_scale"] = scale
        else:
            tensors[key] = value.detach().clone()  # a copy: safetensors refuses tied (shared) tensors
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / INT8_WEIGHTS), metadata={"format": "pt"})
    model.config.save_pretrained(out)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out)
    config = {"method": "weight-only-int8", "granularity": "per-output-channel", "symmetric": True,
              "modules": sorted(names), "compute": "torch._weight_int8pack_mm (CPU), dequantize fallback"}
    (out / QUANT_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
    return config


def load_int8(path: Path) -> Any:
    """Rebuild a model saved by `save_int8`: int8 linear layers, everything else float32. Raises
    FailedPrecondition when `path` is not an int8 export or its tensors do not fit the config."""
    import torch
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path)
    if not (path / QUANT_CONFIG).is_file() or not (path / INT8_WEIGHTS).is_file():
        raise FailedPrecondition(f"{path} is not an int8 export (no {QUANT_CONFIG} / {INT8_WEIGHTS})")
    qconfig = json.loads((path / QUANT_CONFIG).read_text())
    tensors = load_file(str(path / INT8_WEIGHTS))
    # built on the CPU (not the meta device): non-persistent buffers such as rotary frequencies get real values
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=torch.float32)
    int8_linear = _int8_linear_class()
    for name in qconfig["modules"]:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        bias = tensors.pop(f"{name}.bias", None)
        setattr(parent, child, int8_linear(tensors.pop(f"{name}.weight"), tensors.pop(f"{name}.weight_scale"), bias))
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not m.endswith(("weight", "weight_scale", "bias"))
               or m.rsplit(".", 1)[0] not in qconfig["modules"]]
    if missing or unexpected:
        raise FailedPrecondition(f"int8 export {path} does not fit its config: missing {missing[:5]}, "
                                 f"unexpected {unexpected[:5]}")
    model.tie_weights()
    return model.eval()


# --- exporting ---------------------------------------------------------------------------------------------


def export_version(fmt: str, *, base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Write the `fmt` export of base + adapter to `out` (must not exist or be empty); returns `out`.

    Raises InvalidRequest (unknown format), ExportUnavailable (GPU format here), FailedPrecondition (`out` not
    empty). Blocking and CPU-heavy.
    """
    fmt = check_format(fmt)
    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FailedPrecondition(f"export directory {out} is not empty", param="out")
    if fmt == "peft":
        shutil.copytree(adapter_dir, out, dirs_exist_ok=True)
        return out
    from transformers import AutoTokenizer

    merged = _merged(base_dir, adapter_dir)
    if fmt == "merged":
        merged.save_pretrained(out)
    elif fmt == "int8":
        save_int8(merged, out)
    else:  # pragma: no cover - needs CUDA, refused above on this machine
        from transformers import AutoModelForCausalLM, BitsAndBytesConfig

        merged.save_pretrained(out)
        bnb = BitsAndBytesConfig(load_in_8bit=True) if fmt == "bnb-int8" else BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4")
        AutoModelForCausalLM.from_pretrained(out, quantization_config=bnb, device_map="cuda").save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out


def _merged(base_dir: Path, adapter_dir: Path) -> Any:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    return PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def load_export(fmt: str, path: Path, *, base_dir: Path | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) of an export, ready to generate. `peft` needs `base_dir`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = Path(path)
    if fmt == "peft":
        if base_dir is None:
            raise InvalidRequest("a peft export needs its base model directory", param="base")
        from peft import PeftModel

        base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
        return PeftModel.from_pretrained(base, str(path)).eval(), AutoTokenizer.from_pretrained(base_dir)
    if fmt == "int8":
        return load_int8(path), AutoTokenizer.from_pretrained(path)
    if fmt in GPU_FORMATS:  # pragma: no cover - CUDA only
        return AutoModelForCausalLM.from_pretrained(path, device_map="cuda").eval(), AutoTokenizer.from_pretrained(path)
    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


# --- measuring ---------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Quality:
    perplexity: float
    preference_accuracy: float
    margins: tuple[float, ...] = ()


@dataclass(frozen=True, slots=True)
class ExportFigures:
    """What one export costs and how it compares with the unquantized reference (base + adapter, float32)."""

    format: str
    path: str
    size_bytes: int
    load_s: float
    tokens_per_s: float
    perplexity: float
    reference_perplexity: float
    perplexity_delta: float  # export - reference
    preference_accuracy: float
    reference_preference_accuracy: float
    preference_accuracy_delta: float
    preference_agreement: float  # share of pairs ranked the same way as the reference
    eval_pairs: int
    eval_texts: int
    device: str = "cpu"
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def dir_bytes(path: Path) -> int:
    path = Path(path)
    return path.stat().st_size if path.is_file() else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def held_out_pairs(n: int = 48, seed: int = 4242) -> list[dict[str, Any]]:
    """Held-out chosen/rejected pairs (the tiny corpus' style preference at a seed no training run uses)."""
    from retrain.tiny.preferences import style_preference_events

    inferences, feedback = style_preference_events(n, seed=seed)
    by_id = {i.event_id: i for i in inferences}
    pairs = []
    for f in feedback:
        a, b = by_id.get(f.preferred_id), by_id.get(f.other_id)
        if a is None or b is None:
            continue
        prompt = [{"role": m.role, "content": m.content} for m in a.messages]
        pairs.append({"prompt": prompt, "chosen": a.response, "rejected": b.response})
    return pairs[:n]


def _answer_logps(model: Any, tok: Any, items: Sequence[tuple[Sequence[dict[str, str]], str]],
                  max_length: int = 256) -> list[float]:
    import torch

    out = []
    with torch.no_grad():
        for prompt, answer in items:
            p = tok.apply_chat_template(list(prompt), add_generation_prompt=True, tokenize=False)
            full = tok.apply_chat_template([*prompt, {"role": "assistant", "content": answer}], tokenize=False)
            start = len(tok(p, add_special_tokens=False)["input_ids"])
            ids = tok(full, add_special_tokens=False)["input_ids"][:max_length]
            start = min(start, len(ids) - 1)
            x = torch.tensor([ids])
            lp = torch.log_softmax(model(input_ids=x).logits[:, :-1].float(), -1).gather(-1, x[:, 1:, None])[0, :, 0]
            out.append(float(lp[start - 1:].sum()))
    return out


def quality(model: Any, tok: Any, texts: Sequence[str], pairs: Sequence[dict[str, Any]]) -> Quality:
    """Perplexity over `texts` (first 256 tokens each) and preference accuracy (logp chosen > rejected)."""
    import torch

    from retrain.gate import PERPLEXITY_LENGTH, preference_accuracy

    total, count = 0.0, 0
    with torch.no_grad():
        for t in texts:
            ids = tok(t, add_special_tokens=False, return_tensors="pt")["input_ids"][:, :PERPLEXITY_LENGTH]
            if ids.shape[1] < 2:
                continue
            total += float(model(input_ids=ids, labels=ids).loss) * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
    chosen = _answer_logps(model, tok, [(p["prompt"], p["chosen"]) for p in pairs])
    rejected = _answer_logps(model, tok, [(p["prompt"], p["rejected"]) for p in pairs])
    margins = tuple(c - r for c, r in zip(chosen, rejected, strict=True))
    return Quality(math.exp(total / max(count, 1)), preference_accuracy(margins), margins)


def tokens_per_s(model: Any, tok: Any, *, prompts: Sequence[str] = ("Who wrote Romeo and Juliet?",
                                                                    "What is the capital of France?"),
                 new_tokens: int = 32) -> float:
    """Greedy decoding speed, batch 1: exactly `new_tokens` generated per prompt (after one warm-up)."""
    import torch

    encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                       return_tensors="pt", return_dict=True) for p in prompts]
    with torch.no_grad():
        model.generate(**encoded[0], max_new_tokens=4, min_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        for enc in encoded:
            model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                           pad_token_id=tok.pad_token_id)
        wall = time.perf_counter() - t0
    return len(encoded) * new_tokens / wall


def greedy(model: Any, tok: Any, prompt: str, new_tokens: int = 16) -> str:
    """The greedy answer to one user message (for round-trip checks)."""
    import torch

    enc = tok.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, pad_token_id=tok.pad_token_id)
    return tok.decode(out[0, enc["input_ids"].shape[1]:], skip_special_tokens=True)


def reference_quality(base_dir: Path, adapter_dir: Path, texts: Sequence[str],
                      pairs: Sequence[dict[str, Any]]) -> Quality:
    """The unquantized reference: base + adapter in float32 (PEFT, not merged)."""
    model, tok = load_export("peft", adapter_dir, base_dir=base_dir)
    return quality(model, tok, texts, pairs)


def measure_export(fmt: str, path: Path, *, base_dir: Path, reference: Quality, texts: Sequence[str],
                   pairs: Sequence[dict[str, Any]], new_tokens: int = 32) -> ExportFigures:
    """Load the export at `path` fresh and measure it against `reference` (see `reference_quality`)."""
    import gc

    t0 = time.perf_counter()
    model, tok = load_export(fmt, path, base_dir=base_dir)
    load_s = time.perf_counter() - t0
    q = quality(model, tok, texts, pairs)
    speed = tokens_per_s(model, tok, new_tokens=new_tokens)
    agree = [(a > 0) == (b > 0) for a, b in zip(q.margins, reference.margins, strict=True)]
    size = dir_bytes(path)
    extra: dict[str, Any] = {"new_tokens": new_tokens}
    if fmt == "peft":
        extra["needs_base_bytes"] = dir_bytes(base_dir)
    del model
    gc.collect()
    return ExportFigures(
        format=fmt, path=str(path), size_bytes=size, load_s=round(load_s, 3), tokens_per_s=round(speed, 2),
        perplexity=q.perplexity, reference_perplexity=reference.perplexity,
        perplexity_delta=q.perplexity - reference.perplexity, preference_accuracy=q.preference_accuracy,
        reference_preference_accuracy=reference.preference_accuracy,
        preference_accuracy_delta=q.preference_accuracy - reference.preference_accuracy,
        preference_agreement=sum(agree) / len(agree) if agree else float("nan"), eval_pairs=len(pairs),
        eval_texts=len(texts), extra=extra)


def export_and_measure(fmt: str, *, base_dir: Path, adapter_dir: Path, out: Path, texts: Sequence[str] | None = None,
                       pairs: Sequence[dict[str, Any]] | None = None, reference: Quality | None = None,
                       info: dict[str, Any] | None = None) -> ExportFigures:
    """`export_version` then `measure_export`; writes `servoloop_export.json` (the figures + `info`) into the
    export. Defaults: the gate's general prose set and `held_out_pairs()`."""
    from retrain.gate import general_texts

    texts = list(texts) if texts is not None else general_texts(16)
    pairs = list(pairs) if pairs is not None else held_out_pairs()
    export_version(fmt, base_dir=base_dir, adapter_dir=adapter_dir, out=out)
    reference = reference or reference_quality(base_dir, adapter_dir, texts, pairs)
    figures = measure_export(fmt, out, base_dir=base_dir, reference=reference, texts=texts, pairs=pairs)
    (Path(out) / EXPORT_INFO).write_text(json.dumps({**(info or {}), "figures": figures.as_dict()}, indent=2,
                                                    default=str) + "\n")
    return figures
