"""The state of rows decoded together: KV cache, attention mask, positions; rows can leave and join."""

from __future__ import annotations

from typing import Any

import torch


class RunningBatch:
    """Rows sharing one KV cache; finished rows are dropped and new rows are merged in between steps."""

    def __init__(self, rows: list[Any], cache: Any, attention: torch.Tensor, next_pos: torch.Tensor,
                 logits: torch.Tensor) -> None:
        self.rows = rows
        self.cache = cache
        self.attention = attention  # (rows, cached length): 0 over left padding
        self.next_pos = next_pos  # (rows,): each row's next M-RoPE position
        self.logits = logits  # (rows, vocab): the distribution of each row's next token

    @classmethod
    def prefill(cls, model: Any, rows: list[Any], inputs: dict[str, torch.Tensor]) -> RunningBatch:
        """Run the prompts (left-padded, with their images) through the model once."""
        position_ids, _ = model.model.get_rope_index(
            inputs["input_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
            image_grid_thw=inputs.get("image_grid_thw"), attention_mask=inputs["attention_mask"],
        )
        out = model(**inputs, position_ids=position_ids, use_cache=True, logits_to_keep=1)
        next_pos = position_ids.amax(dim=(0, 2)) + 1
        return cls(rows, out.past_key_values, inputs["attention_mask"], next_pos, out.logits[:, -1, :])

    @classmethod
    def resume(cls, model: Any, row: Any, inputs: dict[str, Any], layers: list[tuple[torch.Tensor, torch.Tensor]],
               reused: int) -> RunningBatch:
        """Prefill one row whose first ``reused`` tokens are already in ``layers`` (its session's last turn)."""
        from transformers import DynamicCache

        ids, mask = inputs["input_ids"], inputs["attention_mask"]
        position_ids, _ = model.model.get_rope_index(
            ids, mm_token_type_ids=inputs["mm_token_type_ids"], image_grid_thw=inputs.get("image_grid_thw"),
            attention_mask=mask,
        )
        # torch.cat in DynamicLayer.update copies: the cached entry itself is never written to.
        cache = DynamicCache(ddp_cache_data=[(k[:, :, :reused], v[:, :, :reused]) for k, v in layers])
        extra = {"mm_encoder_outputs": inputs["mm_encoder_outputs"]} if "mm_encoder_outputs" in inputs else {}
        out = model(input_ids=ids[:, reused:], attention_mask=mask, position_ids=position_ids[:, :, reused:],
                    past_key_values=cache, use_cache=True, logits_to_keep=1, **extra)
        next_pos = position_ids.amax(dim=(0, 2)) + 1
        return cls([row], out.past_key_values, mask, next_pos, out.logits[:, -1, :])

    def row_cache(self, index: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """Return a copy of one row's keys and values, without the padding before them."""
        start = int(self.attention[index].nonzero()[0])
        return [(layer.keys[index:index + 1, :, start:].clone(), layer.values[index:index + 1, :, start:].clone())
                for layer in self.cache.layers]

    def row_bytes(self, index: int) -> int:
        """Return the bytes one row's keys and values take (what ``row_cache`` would copy)."""
        layers = self.cache.layers
        per_position = sum(2 * layer.keys[index, :, 0].numel() * layer.keys.element_size() for layer in layers)
        return per_position * self.row_length(index)

    def row_length(self, index: int) -> int:
        """Return how many cached positions one row attends to."""
        return int(self.attention[index].sum())

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows (in this order), shrinking the cache."""
        if len(indices) == len(self.rows):
            return
        if not indices:  # the batch is over; the cache is dropped with it
            self.rows = []
            return
        index = torch.tensor(indices, dtype=torch.long, device=self.attention.device)
        self.cache.batch_select_indices(index)
        self.attention, self.next_pos = self.attention[index], self.next_pos[index]
        self.logits = self.logits[index]
        self.rows = [self.rows[i] for i in indices]
        self._trim_padding()

    def step(self, model: Any, tokens: list[int]) -> None:
        """Feed each row its newly chosen token and compute the next distributions."""
        step_ids = torch.tensor(tokens, device=self.attention.device).unsqueeze(1)
        self.attention = torch.cat([self.attention, self.attention.new_ones((len(tokens), 1))], dim=1)
        positions = self.next_pos.view(1, -1, 1).expand(3, -1, 1)
        out = model(input_ids=step_ids, attention_mask=self.attention, position_ids=positions,
                    past_key_values=self.cache, use_cache=True)
        self.cache = out.past_key_values
        self.logits = out.logits[:, -1, :]
        self.next_pos = self.next_pos + 1

    def extend(self, other: RunningBatch) -> RunningBatch:
        """Merge freshly prefilled rows into this batch, left-padding the shorter cache (continuous batching)."""
        width = max(self.attention.shape[1], other.attention.shape[1])
        for mine, theirs in zip(self.cache.layers, other.cache.layers, strict=True):
            mine.keys = torch.cat([_left_pad(mine.keys, width), _left_pad(theirs.keys, width)])
            mine.values = torch.cat([_left_pad(mine.values, width), _left_pad(theirs.values, width)])
        self.attention = torch.cat([_left_pad_mask(self.attention, width), _left_pad_mask(other.attention, width)])
        self.next_pos = torch.cat([self.next_pos, other.next_pos])
        self.logits = torch.cat([self.logits, other.logits])
        self.rows = self.rows + other.rows
        return self

    def _trim_padding(self) -> None:
        """Drop leading cache columns that no remaining row attends to (left by rows that left)."""
        used = self.attention.any(dim=0).nonzero()
        start = int(used[0]) if used.numel() else 0
        if start == 0:
            return
        self.attention = self.attention[:, start:]
        for layer in self.cache.layers:
            layer.keys = layer.keys[:, :, start:, :]
            layer.values = layer.values[:, :, start:, :]


def _left_pad(states: torch.Tensor, width: int) -> torch.Tensor:
    """Pad (batch, heads, length, dim) cache states with zeros on the left to `width`."""
    missing = width - states.shape[2]
    return torch.nn.functional.pad(states, (0, 0, missing, 0)) if missing else states


def _left_pad_mask(mask: torch.Tensor, width: int) -> torch.Tensor:
    """Pad an attention mask with zeros (ignored positions) on the left to `width`."""
    missing = width - mask.shape[1]
    return torch.nn.functional.pad(mask, (missing, 0), value=0) if missing else mask
