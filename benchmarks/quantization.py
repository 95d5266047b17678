"""Export formats of the bundled tiny model: size, load time, tokens/s and quality delta vs the unquantized model.

    .venv/bin/python benchmarks/quantization.py            # every CPU format, 32 prose texts, 96 pairs, 3 load runs
    .venv/bin/python benchmarks/quantization.py --quick    # smoke run: 4 texts, 12 pairs, 1 load run

The adapter is a LoRA (r=8 on q/k/v/o, seeded non-zero weights, B scaled by 0.05) on the bundled `tiny-chat` model; the
reference is base + adapter in float32 through PEFT. Each format is exported once (`retrain.release.exports`),
then loaded fresh `--runs` times (load time: the median), measured for greedy tokens/s at batch 1 (exactly
`--new-tokens` per prompt, after a warm-up), perplexity on held-out prose and preference accuracy on held-out
chosen/rejected pairs (and agreement with the reference's ranking). GPU formats (bitsandbytes) are listed as
unavailable when there is no CUDA device. Writes `benchmarks/results/quantization.json`.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import write_result


def _adapter(base: Path, out: Path) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(base)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"], init_lora_weights=False))
    with torch.no_grad():  # a gentle adapter, like a trained one: random B at full scale wrecks the model
        for name, param in peft.named_parameters():
            if "lora_B" in name:
                param.mul_(0.05)
    peft.save_pretrained(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="smoke run: small sets, one load run")
    p.add_argument("--base", type=Path, default=Path(".servoloop/models/tiny-chat"), help="base model directory")
    p.add_argument("--runs", type=int, default=3, help="fresh loads per format (median load time)")
    p.add_argument("--new-tokens", type=int, default=64, help="tokens generated per prompt for tokens/s")
    p.add_argument("--name", default="quantization", help="result file name under benchmarks/results/")
    args = p.parse_args()

    import torch

    from retrain.gate import general_texts
    from retrain.release import exports as ex

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    texts = general_texts(4 if args.quick else 32)
    pairs = ex.held_out_pairs(12 if args.quick else 96)
    runs = 1 if args.quick else args.runs
    new_tokens = 16 if args.quick else args.new_tokens
    t0 = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="servoloop-quant-") as tmp:
        root = Path(tmp)
        adapter = _adapter(args.base, root / "adapter")
        reference = ex.reference_quality(args.base, adapter, texts, pairs)
        formats: dict[str, dict[str, object]] = {}
        for fmt in ex.FORMATS:
            try:
                ex.check_format(fmt)
            except ex.ExportUnavailable as e:
                formats[fmt] = {"available": False, "reason": e.message}
                print(f"{fmt:<9} unavailable: {e.message}", flush=True)
                continue
            out = root / fmt
            t = time.perf_counter()
            ex.export_version(fmt, base_dir=args.base, adapter_dir=adapter, out=out)
            export_s = time.perf_counter() - t
            measured = [ex.measure_export(fmt, out, base_dir=args.base, reference=reference, texts=texts, pairs=pairs,
                                          new_tokens=new_tokens) for _ in range(runs)]
            f = measured[0]
            row = {"available": True, "export_s": round(export_s, 3), "size_bytes": f.size_bytes,
                   "size_mib": round(f.size_bytes / 2**20, 3),
                   "load_s_median": round(statistics.median(m.load_s for m in measured), 3),
                   "tokens_per_s_median": round(statistics.median(m.tokens_per_s for m in measured), 2),
                   "perplexity": round(f.perplexity, 4), "perplexity_delta": round(f.perplexity_delta, 5),
                   "perplexity_delta_pct": round(100 * f.perplexity_delta / reference.perplexity, 3),
                   "preference_accuracy": round(f.preference_accuracy, 4),
                   "preference_accuracy_delta": round(f.preference_accuracy_delta, 4),
                   "preference_agreement": round(f.preference_agreement, 4), **f.extra}
            formats[fmt] = row
            print(f"{fmt:<9} {row['size_mib']:>8.2f} MiB  load {row['load_s_median']:.3f} s  "
                  f"{row['tokens_per_s_median']:>7.1f} tok/s  ppl {row['perplexity']:.4f} "
                  f"({row['perplexity_delta_pct']:+.3f} %)  pref acc {row['preference_accuracy']:.3f} "
                  f"(agreement {row['preference_agreement']:.3f})", flush=True)
    path = write_result(args.name, {
        "quick": args.quick, "base_model": str(args.base), "adapter": "LoRA r=8 q/k/v/o, seeded non-zero weights, B scaled by 0.05",
        "eval_texts": len(texts), "eval_pairs": len(pairs), "load_runs": runs, "new_tokens_per_prompt": new_tokens,
        "reference_perplexity": round(reference.perplexity, 4),
        "reference_preference_accuracy": round(reference.preference_accuracy, 4),
        "cuda_available": torch.cuda.is_available(), "formats": formats,
        "wall_s": round(time.monotonic() - t0, 1)})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
