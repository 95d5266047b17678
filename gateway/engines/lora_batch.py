"""Rows of one batch through different LoRA adapters: stacked adapter weights, one gather and two bmm per layer.

PEFT's own mixed-adapter batches (`adapter_names=[...]`) loop over the distinct adapters in every LoRA layer at
every step (index lists, a gather, two matmuls and a scatter each): with twenty adapters in a batch that Python
loop costs more than the model. Here each LoRA layer's adapters are stacked once (`A`: adapters x rank x in,
`B`: adapters x out x rank, zero-padded to the largest rank; slot 0 is the base model, all zeros), each batch
gathers its rows' slices once, and a forward hook adds `(x @ A_row^T) @ B_row^T * scale_row` to the base
layer's output: the batched form of what PEFT computes per adapter (the punica/S-LoRA idea, on CPU tensors).

Memory: the stacks hold every loaded adapter once more (zero-padded), and a batch's gathered slices take
rows x rank x (in + out) values per LoRA layer: small for this engine's CPU-sized models, and bounded by
`max_batch` and `max_loaded_adapters`.

Only plain LoRA on linear layers qualifies (`supported`); anything else (DoRA and other variants, embedding or
convolution LoRA, fan-in-fan-out weights) uses PEFT's `adapter_names` path instead.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any


def _lora_layers(model: Any) -> list[Any]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


def supported(model: Any) -> bool:
    """True when every LoRA layer of `model` is plain LoRA on a linear layer (what `MixedLoRA` handles)."""
    from peft.tuners.lora.layer import Linear

    for m in _lora_layers(model):
        if type(m) is not Linear or m.fan_in_fan_out or m.lora_variant or m.lora_embedding_A or m.merged:
            return False
    return True


class MixedLoRA:
    """Stacked weights of a PEFT model's loaded adapters (rebuilt when they change), applied per row by hooks.

    The model's adapter layers must be disabled while `rows(...)` is active (the hooks add every row's LoRA term
    themselves, the base model's rows add nothing). Not thread-safe: one batch at a time, on the model thread.
    """

    def __init__(self) -> None:
        self._names: tuple[str, ...] = ()
        self._stacks: dict[Any, tuple[Any, Any, Any]] | None = None  # layer -> (A, B, scale)

    def invalidate(self) -> None:
        """Forget the stacks (an adapter was loaded or deleted)."""
        self._stacks = None

    def _build(self, model: Any, names: tuple[str, ...]) -> dict[Any, tuple[Any, Any, Any]]:
        import torch

        stacks = {}
        for layer in _lora_layers(model):
            here = [n for n in names if n in layer.lora_A]
            base = layer.get_base_layer()
            rank = max((layer.lora_A[n].out_features for n in here), default=1)
            dtype = next((layer.lora_A[n].weight.dtype for n in here), base.weight.dtype)
            a = torch.zeros(len(names) + 1, rank, base.in_features, dtype=dtype)
            b = torch.zeros(len(names) + 1, base.out_features, rank, dtype=dtype)
            scale = torch.zeros(len(names) + 1, dtype=dtype)
            for slot, name in enumerate(names, start=1):
                if name in here:
                    r = layer.lora_A[name].out_features
                    a[slot, :r] = layer.lora_A[name].weight
                    b[slot, :, :r] = layer.lora_B[name].weight
                    scale[slot] = layer.scaling[name]
            stacks[layer] = (a, b, scale)
        return stacks

    @contextmanager
    def rows(self, model: Any, adapters: Sequence[str | None]) -> Iterator[None]:
        """Within the block, row i of every forward pass goes through `adapters[i]` (None: the base model)."""
        import torch

        names = tuple(sorted(model.peft_config))
        if self._stacks is None or names != self._names:
            self._stacks, self._names = self._build(model, names), names
        index = torch.tensor([0 if a is None else names.index(a) + 1 for a in adapters])
        handles = []
        for layer, (a, b, scale) in self._stacks.items():
            a_t = a[index].transpose(1, 2).contiguous()  # rows x in x rank
            b_t = b[index].transpose(1, 2).contiguous()  # rows x rank x out
            s = scale[index].view(-1, 1, 1)

            def add_lora(module: Any, args: tuple[Any, ...], output: Any, a_t: Any = a_t, b_t: Any = b_t,
                         s: Any = s) -> Any:
                x = args[0]
                delta = torch.bmm(torch.bmm(x.to(a_t.dtype), a_t), b_t) * s
                return output + delta.to(output.dtype)

            handles.append(layer.register_forward_hook(add_lora))
        try:
            yield
        finally:
            for h in handles:
                h.remove()
