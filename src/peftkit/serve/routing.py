"""Mixed-adapter batches: each row of one forward pass goes through its own LoRA adapter.

The gathered per-row matmul of Punica (BGMV) and S-LoRA: per layer, the adapters' A and B are
stacked into `(N + 1, r_max, in)` and `(N + 1, out, r_max)` (scaling folded into B, ranks
zero-padded, slot N all zeros for base rows), and each batch row gathers its own slice by
adapter id. The base matmul runs once for the whole batch.

`RoutedLoraLinear` is a `LoraLinear` that shares its parameters (same state-dict keys, so
adapters still load and save the same way); inject.py places it. With no rows set it *is*
a LoraLinear (active adapter, merges), so training code never sees a difference.

Example:
    >>> routing = enable_row_routing(adapted)            # once, and again after loading adapters
    >>> with routing.route(["outcome", None, "challenge"]):
    ...     logits = adapted(input_ids=ids, attention_mask=mask).logits   # row 1 is the base
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator, Sequence

import torch

from .. import inject
from ..adapters import AdaptedModel
from ..methods.lora import LoraLinear, ModulesToSave
from ..methods.registry import method_for_config

PLAIN_LORA_ATTRS = ("lora_A", "lora_B", "lora_dropout")


class RowRouting:
    """The adapter name of every batch row (None = base), shared by all routed layers of a model."""

    def __init__(self) -> None:
        self.rows: list[str | None] | None = None
        self.version = 0
        """Bumped whenever the routed rows or the adapters change, so layers rebuild their per-row weights then only."""
        self._planned: list[str | None] | None = None

    @contextmanager
    def route(self, rows: Sequence[str | None]) -> Iterator[None]:
        """Route row i through adapter rows[i] inside the block."""
        self.set_rows(rows)
        try:
            yield
        finally:
            self.set_rows(None)

    def set_rows(self, rows: Sequence[str | None] | None) -> None:
        """Route these rows from now on (None: no routing); the same rows again cost nothing."""
        self.rows = None if rows is None else list(rows)
        if self.rows is not None and self.rows != self._planned:
            self._planned = self.rows
            self.version += 1

    def refresh(self) -> None:
        """An adapter was loaded, unloaded or changed: layers rebuild their per-row weights at the next forward."""
        self.version += 1


class RoutedLoraLinear(LoraLinear):
    """A LoraLinear that can route each batch row through a different adapter."""

    routing: RowRouting

    @classmethod
    def from_lora(cls, layer: LoraLinear, routing: RowRouting) -> "RoutedLoraLinear":
        """A view of `layer`: the same modules, adapters and scalings, not copies.

        The whole instance dict is taken over so state other LoRA variants keep on the layer
        (e.g. DoRA magnitudes) comes along without this class knowing its names.
        """
        routed = cls.__new__(cls)
        routed.__dict__.update(layer.__dict__)
        routed.routing = routing
        routed._stack_key = None
        routed._stack = None
        routed._rows_version = -1
        routed._rows_plan = None
        return routed

    def add_adapter(self, name: str, config: Any) -> None:
        super().add_adapter(name, config)
        self._stack = None  # a reused name must not find the old adapter's stacked weights

    def remove_adapter(self, name: str) -> None:
        super().remove_adapter(name)
        self._stack = None

    def is_plain(self, name: str) -> bool:
        """True when adapter `name` here is B A * scaling and nothing else (so it can be gathered)."""
        extra = [attr for attr in self.adapter_attrs if attr not in PLAIN_LORA_ATTRS]
        return not any(name in getattr(self, attr) for attr in extra)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows = self.routing.rows
        if rows is None:
            return super().forward(x, *args, **kwargs)
        if x.dim() != 3 or x.shape[0] != len(rows):
            raise RuntimeError(f"routed LoRA expects (batch={len(rows)}, T, in) inputs, got {tuple(x.shape)}")
        result = self.base_layer(x, *args, **kwargs)
        plan = self._row_plan()
        if plan is None:  # every row is the base here
            return result
        if isinstance(plan, str):  # every row uses one adapter: the plain LoRA matmuls
            lora_a, lora_b = self.lora_A[plan], self.lora_B[plan]
            return result + (lora_b(lora_a(x.to(lora_a.weight.dtype))) * self.scaling[plan]).to(result.dtype)
        a_rows, b_rows = plan  # (B, r, in), (B, out, r)
        h = torch.bmm(x.to(a_rows.dtype), a_rows.transpose(1, 2))  # (B, T, r)
        return result + torch.bmm(h, b_rows.transpose(1, 2)).to(result.dtype)  # (B, T, out)

    def _row_plan(self) -> tuple[torch.Tensor, torch.Tensor] | str | None:
        """None (all rows base), one adapter name (all rows alike), or each row's A and scaled B.

        Computed once per batch: rows stay fixed between decode steps.
        """
        if self._rows_version != self.routing.version:
            self._rows_version = self.routing.version
            self._rows_plan = self._make_plan(self.routing.rows or [])
        return self._rows_plan

    def _make_plan(self, rows: list[str | None]) -> tuple[torch.Tensor, torch.Tensor] | str | None:
        a_stack, b_stack, slots = self._stacked()
        unroutable = [n for n in rows if n is not None and n in self.lora_A and n not in slots]
        if unroutable:
            raise RuntimeError(f"adapter {unroutable[0]!r} is not plain LoRA and cannot share a mixed batch")
        index = [slots.get(name, len(slots)) if name is not None else len(slots) for name in rows]
        if all(i == len(slots) for i in index):
            return None
        if len(set(index)) == 1:
            return rows[0]
        ids = torch.tensor(index, device=a_stack.device)
        return a_stack[ids], b_stack[ids]

    def _stacked(self) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
        """(A stack, scaled B stack, adapter name -> slot), rebuilt when an adapter is added, removed or changed."""
        names = [n for n in self.adapter_names() if self.is_plain(n)]
        key = tuple((n, self.lora_A[n].weight._version, self.lora_B[n].weight._version, self.scaling[n]) for n in names)
        if self._stack is None or key != self._stack_key:
            weight = self.lora_A[names[0]].weight if names else self.base_layer.weight
            dtype = weight.dtype if weight.is_floating_point() else torch.float32
            rank = max((self.lora_A[n].weight.shape[0] for n in names), default=1)
            a_stack = torch.zeros(len(names) + 1, rank, self.in_features, dtype=dtype, device=weight.device)
            b_stack = torch.zeros(len(names) + 1, self.out_features, rank, dtype=dtype, device=weight.device)
            with torch.no_grad():
                for slot, name in enumerate(names):
                    r = self.lora_A[name].weight.shape[0]
                    a_stack[slot, :r] = self.lora_A[name].weight
                    b_stack[slot, :, :r] = self.lora_B[name].weight * self.scaling[name]
            self._stack, self._stack_key = (a_stack, b_stack, {n: i for i, n in enumerate(names)}), key
        return self._stack


def enable_row_routing(adapted: AdaptedModel, routing: RowRouting | None = None) -> RowRouting:
    """Make every LoRA layer of `adapted` row-routable (idempotent; call again after adding adapters)."""
    existing = [layer.routing for _, layer in inject.adapter_layers(adapted.model) if isinstance(layer, RoutedLoraLinear)]
    routing = routing or (existing[0] if existing else RowRouting())
    inject.convert_layers(adapted.model, LoraLinear, lambda layer: RoutedLoraLinear.from_lora(layer, routing))
    return routing


def routable(adapted: AdaptedModel, name: str) -> bool:
    """Can adapter `name` share a mixed batch? (a row-routable method, plain LoRA in every layer it touches,
    no modules_to_save)"""
    if not method_for_config(adapted.adapter_configs[name]).capabilities.row_routable:
        return False
    for _, layer in inject.adapter_layers(adapted.model):
        if name not in layer.adapter_names():
            continue
        if isinstance(layer, ModulesToSave) or not isinstance(layer, RoutedLoraLinear) or not layer.is_plain(name):
            return False
    return True
