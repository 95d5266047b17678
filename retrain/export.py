"""Merged weights from a base model and a verified PEFT adapter (`servoloop models export --merge`)."""

from __future__ import annotations

from pathlib import Path


def merge_adapter(base_dir: Path, adapter_dir: Path, out: Path) -> Path:
    """Load `base_dir`, apply the LoRA adapter at `adapter_dir`, merge it into the weights, save model and
    tokenizer to `out` (a plain Transformers directory any engine loads). Blocking and CPU-heavy."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base_dir)
    merged = PeftModel.from_pretrained(model, adapter_dir).merge_and_unload()
    out.mkdir(parents=True, exist_ok=True)
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(base_dir).save_pretrained(out)
    return out
