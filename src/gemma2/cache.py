"""Key/value caches with a length per row: an object passed into the model's forward, never module state.

A `Gemma2Cache` is a pool of rows (`max_batch`), each holding one sequence at its own length, so
requests of different lengths share one batch, and a finished request's row is given back
(`free_row`) and taken by the next one (`allocate_row`) while its neighbours keep decoding.

Gemma 2 alternates two kinds of layers, and each gets the buffers it needs:

- Full-attention layers keep every past key: buffers [rows, K, capacity, D], preallocated to the
  caller's capacity (prompt + new tokens) and grown by doubling only when none was given. Slot s
  of a row holds its position s.
- Sliding-window layers keep a ring of W slots per row: a decode step writes its key into the slot
  of the key that just left the window, then attends over the ring, exactly the last W keys
  (including itself), never W + 1 (a known off-by-one elsewhere). Each row has its own slot
  positions (-1 for a slot never written), so one row can wrap while its neighbour has not. A
  chunk of several tokens attends over ring + chunk before writing, because the chunk's own writes
  would overwrite keys its earlier queries still need. When the caller's capacity is below W the
  ring is that long instead, and grows to W if a row outgrows it (no slot has wrapped by then);
  without a capacity it starts at the first forward's length and doubles up to W.

All layers of a kind share one set of slot positions, so the model computes them (and the masks)
once per forward: `begin` says where a forward's tokens go, each layer's `update` writes there,
and `commit` records the new lengths. Writes are index operations at per-row positions: no
`torch.cat` of the cache per step, and no shape that changes from step to step once the capacity
is known.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from gemma2.config import Gemma2Config
from gemma2.errors import InputError


@dataclass
class CacheStep:
    """Where one forward's T new tokens per row go, and which slots they attend over."""

    rows: torch.Tensor  # [B] the cache row of each batch row
    row_list: list[int]  # the same, as Python ints
    row_range: tuple[int, int] | None  # (first, stop) when rows are consecutive: buffers[first:stop] is a view
    starts: torch.Tensor  # [B] each row's length before this forward
    query_positions: torch.Tensor  # [B, T]
    full_slots: int  # full layers attend over slots 0 .. full_slots - 1
    full_key_positions: torch.Tensor  # [B, full_slots], -1 past a row's new length
    sliding_key_positions: torch.Tensor | None  # [B, ring] (T == 1) or [B, ring + T]; None without sliding layers
    ring_slots: torch.Tensor | None  # [B, kept] ring slots the last `kept` new tokens are written to
    kept: int  # how many of the T new tokens stay in the ring (min(T, ring))

    @property
    def length(self) -> int:
        return self.query_positions.shape[1]


class Gemma2Cache:
    """Per-layer key/value buffers for a pool of rows, each row at its own length.

    `max_length` (prompt + new tokens) sizes the full-layer buffers once; without it they grow as
    needed. `max_batch` fixes the number of rows; without it the first forward's batch sets it.
    """

    def __init__(self, config: Gemma2Config, max_length: int | None = None, max_batch: int | None = None) -> None:
        if max_length is not None and max_length < 1:
            raise InputError(f"max_length must be >= 1, got {max_length}")
        if max_batch is not None and max_batch < 1:
            raise InputError(f"max_batch must be >= 1, got {max_batch}")
        self.num_layers = config.num_hidden_layers
        self.kv_heads, self.head_dim = config.num_key_value_heads, config.head_dim
        self.sliding = [config.is_sliding(i) and config.sliding_window is not None for i in range(self.num_layers)]
        self.window = config.sliding_window if any(self.sliding) else None
        self.capacity = max_length
        # The ring of the sliding layers: W slots, or fewer when no sequence will be that long; without
        # a capacity it grows with the longest row (by doubling) up to W, as the full layers do: a
        # ring of W = 4096 slots from the start costs every decode step an attention over 4096 slots.
        self.ring = 0 if self.window is None or max_length is None else min(self.window, max_length)
        self.max_batch = max_batch
        self.keys: list[torch.Tensor | None] = [None] * self.num_layers  # [rows, K, slots, D]
        self.values: list[torch.Tensor | None] = [None] * self.num_layers
        self._lengths: list[int] = []  # each row's length, as Python ints (read every step without a sync)
        self.ring_positions: torch.Tensor | None = None  # [rows, ring], -1 for a slot not yet written
        self.free: list[int] = []
        self.full_slots = 0  # slots the full-layer buffers hold
        if max_batch is not None:
            self._create_rows(max_batch, torch.device("cpu"))

    # ---- rows ------------------------------------------------------------------------------

    def _create_rows(self, rows: int, device: torch.device) -> None:
        self.max_batch = rows
        self._lengths = [0] * rows
        self.ring_positions = torch.full((rows, self.ring), -1, dtype=torch.long, device=device)
        self.free = list(range(rows))

    @property
    def rows(self) -> int:
        return self.max_batch or 0

    @property
    def lengths(self) -> torch.Tensor | None:
        """Each row's length [rows] (None before the first forward of a cache made without max_batch)."""
        return None if self.ring_positions is None else torch.tensor(self._lengths, dtype=torch.long)

    def allocate_row(self) -> int:
        """Take a free row (the lowest, so running rows stay packed) and return its index."""
        if self.max_batch is None:
            raise InputError("allocate_row needs a cache made with max_batch")
        if not self.free:
            raise InputError(f"all {self.max_batch} cache rows are in use")
        self.free.sort()
        return self.free.pop(0)

    def free_row(self, row: int) -> None:
        """Give a row back: its length becomes 0 and its slots are wiped, so no old key is ever seen."""
        if not 0 <= row < self.rows or row in self.free:
            raise InputError(f"cache row {row} is not in use")
        self.reset_row(row)
        self.free.append(row)

    def reset_row(self, row: int) -> None:
        """Empty one row (its keys zeroed, its slots unwritten) without giving it back."""
        assert self.ring_positions is not None
        self._lengths[row] = 0
        self.ring_positions[row] = -1
        # Zeros, not stale keys: the op-by-op path multiplies masked slots by 0, and 0 * NaN is NaN.
        for buffers in (self.keys, self.values):
            for tensor in buffers:
                if tensor is not None:
                    tensor[row].zero_()

    def copy_row(self, source: int, target: int) -> None:
        """Make row `target` hold what row `source` holds (keys, values, length, ring slots): a fork
        of one prompt read once, for several samples of it."""
        assert self.ring_positions is not None
        self._lengths[target] = self._lengths[source]
        self.ring_positions[target] = self.ring_positions[source]
        for buffers in (self.keys, self.values):
            for tensor in buffers:
                if tensor is not None:
                    tensor[target] = tensor[source]

    def row_length(self, row: int) -> int:
        return self._lengths[row] if self._lengths else 0

    def get_seq_length(self) -> int:
        """Slots (tokens, padding included) already in the cache: the longest row's."""
        return max(self._lengths, default=0)

    # ---- one forward ---------------------------------------------------------------------------

    def begin(
        self, batch: int, length: int, device: torch.device, rows: torch.Tensor | list[int] | None = None
    ) -> CacheStep:
        """Plan a forward of `length` new tokens for `batch` rows (cache rows `rows`, default 0..batch-1)."""
        if self.ring_positions is None:
            self._create_rows(batch, device)
        assert self.ring_positions is not None
        if self.ring_positions.device != device:
            self.ring_positions = self.ring_positions.to(device)
        if rows is None:
            if batch != self.rows:
                raise InputError(f"batch size {batch} does not match the cache's batch size {self.rows}")
            row_list = list(range(batch))
        else:
            row_list = rows if isinstance(rows, list) else torch.as_tensor(rows, dtype=torch.long).reshape(-1).tolist()
            if not all(isinstance(row, int) for row in row_list):
                raise InputError(f"cache_rows must be integer row indices, got {row_list}")
            if len(row_list) != batch:
                raise InputError(f"cache_rows has {len(row_list)} entries for a batch of {batch}")
            if any(not 0 <= row < self.rows for row in row_list):
                raise InputError(f"cache_rows must be in [0, {self.rows}), got {row_list}")
            if len(set(row_list)) != len(row_list):
                raise InputError(f"cache_rows must not repeat a row, got {row_list}")
        rows = torch.tensor(row_list, dtype=torch.long, device=device)
        first = row_list[0] if batch else 0
        consecutive = row_list == list(range(first, first + batch))
        start_list = [self._lengths[row] for row in row_list]
        longest = max(start_list) + length
        starts = torch.tensor(start_list, dtype=torch.long, device=device)
        stops = starts + length
        query_positions = starts[:, None] + torch.arange(length, device=device)  # [B, T]

        self._reserve_full(longest)
        slots = torch.arange(longest, device=device)
        full_key_positions = torch.where(slots[None] < stops[:, None], slots[None], -1)  # [B, S]

        sliding_key_positions = ring_slots = None
        kept = 0
        if self.window is not None:
            self._reserve_ring(longest)
            ring = self.ring
            kept = min(length, ring)
            ring_slots = query_positions[:, length - kept :] % ring  # [B, kept]
            before = self.ring_positions[rows]  # [B, ring]
            if length == 1:
                sliding_key_positions = before.scatter(1, ring_slots, query_positions)
            else:
                sliding_key_positions = torch.cat([before, query_positions], dim=1)
        return CacheStep(
            rows=rows,
            row_list=row_list,
            row_range=(first, first + batch) if consecutive else None,
            starts=starts,
            query_positions=query_positions,
            full_slots=longest,
            full_key_positions=full_key_positions,
            sliding_key_positions=sliding_key_positions,
            ring_slots=ring_slots,
            kept=kept,
        )

    def _reserve_full(self, needed: int) -> None:
        """Make the full-layer buffers hold `needed` slots (the caller's capacity, else doubling)."""
        if needed <= self.full_slots:
            return
        size = max(needed, self.capacity or 0) if self.full_slots == 0 else max(needed, 2 * self.full_slots)
        for i in range(self.num_layers):
            if not self.sliding[i]:
                self.keys[i] = _grown(self.keys[i], size)
                self.values[i] = _grown(self.values[i], size)
        self.full_slots = size

    def _reserve_ring(self, needed: int) -> None:
        """Grow a short ring when a row outgrows it: to W when the caller gave a capacity, else by
        doubling up to W. No row has wrapped while the ring is shorter than W, so slots are positions
        and the keys stay where they are."""
        assert self.window is not None and self.ring_positions is not None
        if needed <= self.ring or self.ring >= self.window:
            return
        size = self.window if self.capacity is not None else min(self.window, max(needed, 2 * self.ring))
        extra = size - self.ring
        self.ring_positions = torch.cat([self.ring_positions, self.ring_positions.new_full((self.rows, extra), -1)], 1)
        for i in range(self.num_layers):
            if self.sliding[i]:
                self.keys[i] = _grown(self.keys[i], size)
                self.values[i] = _grown(self.values[i], size)
        self.ring = size

    def buffers(self, layer: int, like: torch.Tensor, kv_heads: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer's key and value buffers [rows, K, slots, D], allocated (zeros) on first use like `like`.

        K is `kv_heads`, else `like`'s dimension 1 (a key [B, K, T, D]): the heads the model holds,
        not the config's, since a tensor-parallel rank holds only some of them.
        """
        keys, values = self.keys[layer], self.values[layer]
        if keys is None or values is None:
            slots = self.ring if self.sliding[layer] else self.full_slots
            shape = (self.rows, kv_heads or like.shape[1], slots, self.head_dim)
            keys = self.keys[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
            values = self.values[layer] = torch.zeros(shape, dtype=like.dtype, device=like.device)
        return keys, values

    def update(
        self, layer: int, key: torch.Tensor, value: torch.Tensor, step: CacheStep
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write key/value [B, K, T, D] of this forward; return the keys and values [B, K, S, D] to attend over.

        S and the key positions are the step's: full layers `full_key_positions`, sliding layers
        `sliding_key_positions`.
        """
        keys, values = self.buffers(layer, key)
        T = key.shape[2]
        rows = step.rows[:, None]  # [B, 1]
        if not self.sliding[layer]:
            slots = step.query_positions  # [B, T]: a full layer's slot is the position
            # keys[rows, :, slots] has shape [B, T, K, D] (the indexed dimensions come first).
            keys[rows, :, slots] = key.transpose(1, 2)
            values[rows, :, slots] = value.transpose(1, 2)
            return _rows_of(keys, step)[:, :, : step.full_slots], _rows_of(values, step)[:, :, : step.full_slots]
        assert step.ring_slots is not None
        if T == 1:
            keys[rows, :, step.ring_slots] = key.transpose(1, 2)
            values[rows, :, step.ring_slots] = value.transpose(1, 2)
            return _rows_of(keys, step), _rows_of(values, step)
        attended_keys = torch.cat([_rows_of(keys, step), key], dim=2)
        attended_values = torch.cat([_rows_of(values, step), value], dim=2)
        # Only the chunk's last W keys can be seen by later queries.
        keys[rows, :, step.ring_slots] = key[:, :, T - step.kept :].transpose(1, 2)
        values[rows, :, step.ring_slots] = value[:, :, T - step.kept :].transpose(1, 2)
        return attended_keys, attended_values

    def commit(self, step: CacheStep) -> None:
        """Record a forward's tokens: the rows' new lengths and the positions of the ring slots written."""
        assert self.ring_positions is not None
        for row in step.row_list:
            self._lengths[row] += step.length
        if step.ring_slots is not None:
            kept_positions = step.query_positions[:, step.length - step.kept :]
            self.ring_positions[step.rows[:, None], step.ring_slots] = kept_positions

    # ---- sizes -------------------------------------------------------------------------------

    def memory_bytes(self) -> int:
        return sum(_nbytes(t) for t in (*self.keys, *self.values))

    def __len__(self) -> int:
        return self.num_layers


def _rows_of(buffer: torch.Tensor, step: CacheStep) -> torch.Tensor:
    """The step's rows of a buffer: a view when they are consecutive, else a gathered copy."""
    if step.row_range is not None:
        first, stop = step.row_range
        return buffer[first:stop]
    return buffer.index_select(0, step.rows)


def _grown(buffer: torch.Tensor | None, slots: int) -> torch.Tensor | None:
    """buffer [rows, K, s, D] extended with zero slots to `slots` (None stays None: allocated on use)."""
    if buffer is None or buffer.shape[2] >= slots:
        return buffer
    grown = buffer.new_zeros(*buffer.shape[:2], slots, buffer.shape[3])
    grown[:, :, : buffer.shape[2]] = buffer
    return grown


def cache_memory_bytes(config: Gemma2Config, length: int, bytes_per_value: int = 2, batch: int = 1) -> int:
    """Bytes of keys and values for `length` tokens: full layers hold all, sliding layers the window."""
    per_token = 2 * batch * config.num_key_value_heads * config.head_dim * bytes_per_value
    total = 0
    for i in range(config.num_hidden_layers):
        slots = min(length, config.sliding_window or length) if config.is_sliding(i) else length
        total += slots * per_token
    return total


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()
