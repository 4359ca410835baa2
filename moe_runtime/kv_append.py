"""A decode step's new key and value written into room kept behind a DynamicCache layer's own.

transformers' DynamicLayer appends a step's key and value with torch.cat: each step copies the
whole cache of every layer, twice. On the CPU of BENCHMARKS.md the two cats took about 4% of
an int4 decode step of the peer benchmark's small model at 16-80 tokens of context (py-spy),
and a cat grows with the context (6 us at 80 tokens, 19 at 400, in a hot loop). Here the layer's
`keys` and `values` become views of buffers with room for more tokens: a step writes one
position and narrows the view, and a full buffer is replaced by one a quarter longer (at least
MIN_ROOM positions more: the copies over a whole generation add up to about five of the final
cache, where the cats copy it about T/2 times).

The layer stays transformers' own: anything else that updates it (a prefill through
transformers' forward, crop, reorder for beam search) leaves plain tensors there, which the
next step takes over into new buffers. Only a plain DynamicLayer, updated through the base
Cache.update and not offloaded, is taken; any other cache is updated as its class says. The
views are not contiguous (each head's rows are): the native attention reads them in place,
SDPA through their strides. A buffer holds up to a quarter more than the context it serves
(MIN_ROOM positions for short ones).
"""

from __future__ import annotations

import weakref

import torch
from transformers.cache_utils import Cache, DynamicLayer

MIN_ROOM = 64  # positions a new buffer holds beyond the context it takes over, at least
GROWTH = 4  # ... and a 1/GROWTH of that context


class Room:
    """One layer's key and value buffers [B, H, capacity, D] and the views handed to the layer."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        length = keys.shape[-2]
        capacity = length + max(MIN_ROOM, length // GROWTH)
        self.keys = _grown(keys, capacity)
        self.values = _grown(values, capacity)
        self.length = length
        self.views = (self.keys[..., :length, :], self.values[..., :length, :])

    def holds(self, layer: DynamicLayer, key: torch.Tensor, value: torch.Tensor) -> bool:
        """Whether the layer still holds this room's views and one more position of this key
        and value fits (same batch, heads, head dims, dtype)."""
        return (
            layer.keys is self.views[0] and layer.values is self.views[1] and self.length < self.keys.shape[-2]
            and _fits(key, self.keys) and _fits(value, self.values)
        )

    def append(self, key: torch.Tensor, value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write a one-position key and value [B, H, 1, D] at the end; the views one longer."""
        self.keys[..., self.length : self.length + 1, :].copy_(key)
        self.values[..., self.length : self.length + 1, :].copy_(value)
        return self.advance()

    def advance(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The views one position longer: the one at `length` has been written (by append, or by
        cpu_decode_ops.attend_step straight into the buffers)."""
        self.length += 1
        self.views = (self.keys[..., : self.length, :], self.values[..., : self.length, :])
        return self.views


def _grown(states: torch.Tensor, capacity: int) -> torch.Tensor:
    """[B, H, capacity, D] holding `states` [B, H, T, D] in its first T positions."""
    buffer = states.new_empty((*states.shape[:-2], capacity, states.shape[-1]))
    buffer[..., : states.shape[-2], :].copy_(states)
    return buffer


def _fits(states: torch.Tensor, buffer: torch.Tensor) -> bool:
    return states.dim() == 4 and states.shape[-2] == 1 and states.dtype == buffer.dtype and states.device == buffer.device and (
        states.shape[:2] == buffer.shape[:2] and states.shape[-1] == buffer.shape[-1]
    )


_rooms: weakref.WeakKeyDictionary[DynamicLayer, Room] = weakref.WeakKeyDictionary()


def append_kv(cache: Cache, layer_idx: int, key: torch.Tensor, value: torch.Tensor, kwargs: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """cache.update(key, value, layer_idx) for a one-position key and value [B, H, 1, D]: the
    layer's keys and values [B, H, T + 1, D] with them appended, written in place where the
    layer is a plain DynamicLayer that already holds a context (else the cache's own update)."""
    found = room_for(cache, layer_idx, key, value)
    if found is None:
        return cache.update(key, value, layer_idx, kwargs=kwargs)
    layer, room = found
    layer.keys, layer.values = room.append(key, value)
    return layer.keys, layer.values


def room_for(cache: Cache, layer_idx: int, key: torch.Tensor, value: torch.Tensor) -> tuple[DynamicLayer, Room] | None:
    """(the layer, its room with space for one more position) where append_kv would write a
    one-position key and value of these shapes [B, H, 1, D] in place, else None; the caller
    writes at room.length, then `advance`s the room and hands its views to the layer."""
    layer = _plain_layer(cache, layer_idx)
    if layer is None:
        return None
    room = _rooms.get(layer)
    if room is None or not room.holds(layer, key, value):
        if not (_fits(key, layer.keys) and _fits(value, layer.values)):
            return None
        room = _rooms[layer] = Room(layer.keys, layer.values)
    return layer, room


def _plain_layer(cache: Cache, layer_idx: int) -> DynamicLayer | None:
    """The cache's layer `layer_idx` where Cache.update would only cat onto it, else None."""
    if type(cache).update is not Cache.update or getattr(cache, "offloading", True) or layer_idx >= len(cache.layers):
        return None
    layer = cache.layers[layer_idx]
    if type(layer) is not DynamicLayer or not layer.is_initialized or layer.keys.dim() != 4 or layer.keys.shape[-2] == 0:
        return None
    return layer
