"""Static-shape decoding: every technique's cache as fixed-size slot buffers, one compiled step.

A decode step of a 135M model on a CPU, or of any model at batch 1 on a GPU, is dominated by
per-operation overhead when run eagerly (hundreds of small kernels and the Python around them).
gpt-fast removes it by compiling the decode step over a preallocated cache; this module does the
same for dense and for every KV technique whose cache size is fixed once the prompt is in.

After the prefill (eager: scoring and compression hooks run there, outside any compiled code),
`Technique.static_cache` turns the technique's cache into a `StaticDecodeCache`: per layer, one or
more `SlotGroup`s, each a buffer of `C` slots for a run of KV heads, with the text position held in
every slot (-1: empty). Every step writes the new token into the slot the group's rule picks and
attends over the valid slots:

- the write slot is the lowest position among the slots that may be overwritten: an empty slot
  first, else the oldest entry that is not a sink (positions < `n_sink` stay). This one rule is a
  growing cache when `C` holds the prompt plus the new tokens (dense, SnapKV, PyramidKV), a
  StreamingLLM ring when `C` = sinks + window + 1, and a MoA head's ring when `C` = sinks + span;
- a group whose layer evicts by score (H2O) frees a slot after attending (`ScoredGroup`).

Shapes never change during a generation (the capacity is fixed from the prompt's kept entries and
the token budget), positions and slots live on the device, and the step reads nothing back but the
next token. `torch.compile` traces it once per cache structure (the slot axis is symbolic, budgets
are device scalars) and replays it: on CUDA with CUDA graphs; on a CPU with one-row products
lowered to multiply-and-sum reductions that stream the weights at memory bandwidth (`_matvec_mm`).
A step that compiled is left out of the measured ones and reported apart (`warmup_watch`).

Batches (`stack`): each sequence is prefilled alone (its technique's hooks select for it alone),
its cache converted, then the B caches are stacked into one of B rows. A row's slots beyond its own
capacity hold `DISABLED` (never written, never attended): a ring keeps its own size whatever the
others', so every row decodes exactly as its sequence would alone. `position` is then one per row
([B]): each row continues at its own text position.

Speculative decoding uses `RollbackCache`: the slot is the position, several tokens are written at
once and attend causally by position, and rolling back is moving the length.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.cache_utils import Cache

from paretoray.actors.generation import Step, attention_installed, with_cache

ATTENTION = "paretoray_static"
CACHE_KWARG = "paretoray_static_cache"  # how the attention function finds the cache (transformers forwards it)
NEVER = torch.iinfo(torch.int64).max
DISABLED = -2  # a slot past its row's capacity in a stacked batch: never written, never attended
CUDA_GRAPH_WARMUP = 2  # steps of a new CUDA-graph cache that warm up and record before replays


class SlotGroup:
    """A run of KV heads of one layer sharing `capacity` slots.

    keys/values: [B, h, C, D]; positions: [B, h, C] int64, -1 where the slot is empty (`DISABLED`
    past a row's capacity in a stacked batch). Entries at positions < `n_sink` are never overwritten.
    The step's `position` is [] (one sequence) or [B] (one per row of a batch).
    """

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, positions: torch.Tensor, capacity: int, n_sink: int = 0):
        batch, heads, kept, dim = keys.shape
        if kept > capacity:
            raise ValueError(f"{kept} kept entries do not fit {capacity} slots")
        self.n_sink = n_sink
        # Numbers a step compares against are device scalars, not Python ints: a new budget or sink
        # count must not make a new graph (dynamo specializes on the ints it reads).
        self.sink_limit = torch.tensor(n_sink, device=keys.device)
        self.keys = keys.new_zeros(batch, heads, capacity, dim)
        self.values = values.new_zeros(batch, heads, capacity, values.shape[-1])
        self.positions = torch.full((batch, heads, capacity), -1, dtype=torch.int64, device=keys.device)
        self.keys[:, :, :kept] = keys
        self.values[:, :, :kept] = values
        self.positions[:, :, :kept] = positions.to(device=keys.device, dtype=torch.int64).expand(batch, heads, kept)

    @property
    def heads(self) -> int:
        return self.keys.shape[1]

    def buffers(self) -> list[torch.Tensor]:
        """The tensors a step reads and writes in place (their slot axis is 2)."""
        return [self.keys, self.values, self.positions]

    def write(self, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        """Store one token per head in the slot the rule picks: an empty one, else the oldest
        non-sink entry. key/value: [B, h, 1, D]; position: [] or [B] int64. Returns the slots [B, h, 1]."""
        position = position.view(-1, 1, 1)
        pinned = ((self.positions >= 0) & (self.positions < self.sink_limit)) | (self.positions == DISABLED)
        slot = torch.where(pinned, NEVER, self.positions).argmin(dim=-1, keepdim=True)  # [B, h, 1]
        self.keys.scatter_(2, slot[..., None].expand_as(key), key)
        self.values.scatter_(2, slot[..., None].expand_as(value), value)
        self.positions.scatter_(2, slot, position.expand_as(slot))
        return slot

    def attend(self, query: torch.Tensor, scaling: float, position: torch.Tensor) -> torch.Tensor:
        """One query per head over the valid slots. query: [B, h * groups, 1, D] -> same shape."""
        groups = query.shape[1] // self.heads
        valid = (self.positions >= 0)[:, :, None, :].repeat_interleave(groups, dim=1)  # [B, hq, 1, C]
        return F.scaled_dot_product_attention(query, self.keys, self.values, attn_mask=valid, scale=scaling, enable_gqa=True)

    def weights(self, query: torch.Tensor, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
        """The query's softmax attention over the valid slots in fp32, for groups that evict by it.
        query: [B, h * groups, 1, D] -> weights [B, h, groups, C], valid [B, h, C]."""
        batch, heads, _, dim = self.keys.shape
        q = query.float().view(batch, heads, -1, dim)  # [B, h, groups, D]
        valid = self.positions >= 0
        logits = torch.einsum("bhgd,bhcd->bhgc", q, self.keys.float()) * scaling
        return logits.masked_fill(~valid[:, :, None], float("-inf")).softmax(dim=-1), valid

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()

    @classmethod
    def stacked(cls, members: list[tuple[SlotGroup, slice]]) -> SlotGroup:
        """One group of len(members) rows from one-sequence groups of this kind (member i: a group
        and the run of its heads that row i contributes), the slot axis padded to the largest
        capacity with `DISABLED` slots."""
        group = cls.__new__(cls)
        group._stack(members)
        return group

    def _stack(self, members: list[tuple[SlotGroup, slice]]) -> None:
        capacity = max(row.keys.shape[2] for row, _ in members)
        if len({int(row.sink_limit) for row, _ in members}) != 1:
            raise ValueError("sequences of a batch keep different numbers of sinks")
        self.n_sink, self.sink_limit = members[0][0].n_sink, members[0][0].sink_limit
        self.keys = torch.cat([_pad_slots(row.keys[:, heads], capacity, 0) for row, heads in members])
        self.values = torch.cat([_pad_slots(row.values[:, heads], capacity, 0) for row, heads in members])
        self.positions = torch.cat([_pad_slots(row.positions[:, heads], capacity, DISABLED) for row, heads in members])


def _pad_slots(tensor: torch.Tensor, capacity: int, fill) -> torch.Tensor:
    """[1, h, C, ...] -> [1, h, capacity, ...], the new slots set to `fill`."""
    extra = capacity - tensor.shape[2]
    if extra == 0:
        return tensor
    pad = tensor.new_full((*tensor.shape[:2], extra, *tensor.shape[3:]), fill)
    return torch.cat([tensor, pad], dim=2)


def _per_row(members: list, name: str) -> torch.Tensor:
    """A device scalar of each row's group, as [B, 1, 1] (it broadcasts against [B, h, C])."""
    return torch.stack([getattr(row, name).reshape(()) for row, _ in members]).view(-1, 1, 1)


class SinkGroup(SlotGroup):
    """StreamingLLM's ring: sinks + window + one slot for the incoming token. Before attending, the
    sink keys are rotated forward by the tokens evicted so far (the paper's cache-index positions;
    see techniques/streaming_llm.py), recomputed from the unshifted sinks each step."""

    def __init__(self, keys, values, positions, capacity, n_sink, sinks_unshifted, inv_freq, window_capacity):
        super().__init__(keys, values, positions, capacity, n_sink)
        self.sinks_unshifted = sinks_unshifted.clone()  # [B, h, n_sink, D]
        self.inv_freq = inv_freq.to(self.keys.device)
        self.window_capacity = torch.tensor(window_capacity, device=self.keys.device)  # sinks + window

    def attend(self, query, scaling, position):
        from paretoray.actors.techniques.streaming_llm import rotate_by

        # Tokens before this one that no longer fit: position - (sinks + window), at least 0 ([B|1, 1, 1, 1]).
        evicted = (position.view(-1, 1, 1) - self.window_capacity).clamp(min=0)
        self.keys[:, :, : self.n_sink] = rotate_by(self.sinks_unshifted, evicted[..., None], self.inv_freq)
        return super().attend(query, scaling, position)

    def _stack(self, members):
        super()._stack(members)
        self.sinks_unshifted = torch.cat([row.sinks_unshifted[:, heads] for row, heads in members])
        self.inv_freq = members[0][0].inv_freq
        self.window_capacity = _per_row(members, "window_capacity")


class ScoredGroup(SlotGroup):
    """H2O while decoding: every query's attention (fp32) accrues to the keys it saw, and once the
    group holds more than `budget` entries, the lowest-scoring one outside the `recent` newest is
    freed (its slot takes the next token). Capacity: budget + 1."""

    def __init__(self, keys, values, positions, capacity, scores, budget: int, recent: int):
        super().__init__(keys, values, positions, capacity)
        self.scores = torch.zeros(self.positions.shape, dtype=torch.float32, device=self.keys.device)
        self.scores[:, :, : scores.shape[-1]] = scores
        self.budget = torch.tensor(budget, device=self.keys.device)
        self.recent = torch.tensor(recent, device=self.keys.device)

    def buffers(self):
        return [*super().buffers(), self.scores]

    def write(self, key, value, position):
        slot = super().write(key, value, position)
        self.scores.scatter_(2, slot, 0.0)
        return slot

    def attend(self, query, scaling, position):
        out = super().attend(query, scaling, position)
        weights, valid = self.weights(query, scaling)
        self.scores += weights.mean(dim=2)  # averaged over the KV head's group of query heads
        protected = ~valid | (self.positions > position.view(-1, 1, 1) - self.recent)
        victim = self.scores.masked_fill(protected, float("inf")).argmin(dim=-1, keepdim=True)  # [B, h, 1]
        over = valid.sum(dim=-1, keepdim=True) > self.budget
        self.positions.scatter_(2, victim, torch.where(over, -1, self.positions.gather(2, victim)))
        self.scores.scatter_(2, victim, torch.where(over, 0.0, self.scores.gather(2, victim)))
        return out

    def _stack(self, members):
        super()._stack(members)
        self.scores = torch.cat([_pad_slots(row.scores[:, heads], self.keys.shape[2], 0.0) for row, heads in members])
        self.budget, self.recent = _per_row(members, "budget"), _per_row(members, "recent")  # per row: from its prompt length


class StaticLayer:
    """One decoder layer's cache: its stored heads split into `groups` (consecutive, in head
    order). `repeat` > 1: the layer stores one head per query head (SnapKV's per-query-head rule),
    so each incoming KV head is repeated that many times."""

    def __init__(self, groups: list[SlotGroup], repeat: int = 1):
        self.groups, self.repeat = groups, repeat

    def update(self, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> None:
        if self.repeat > 1:
            key = key.repeat_interleave(self.repeat, dim=1)
            value = value.repeat_interleave(self.repeat, dim=1)
        start = 0
        for group in self.groups:
            stop = start + group.heads
            group.write(key[:, start:stop], value[:, start:stop], position)
            start = stop

    def attend(self, query: torch.Tensor, scaling: float, position: torch.Tensor) -> torch.Tensor:
        per_head = query.shape[1] // sum(g.heads for g in self.groups)  # query heads per stored head
        outs, start = [], 0
        for group in self.groups:
            stop = start + group.heads * per_head
            outs.append(group.attend(query[:, start:stop], scaling, position))
            start = stop
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)

    def nbytes(self) -> int:
        return sum(g.nbytes() for g in self.groups)

    def bounds(self) -> list[int]:
        """Where each group's heads end, in stored-head order."""
        ends, end = [], 0
        for group in self.groups:
            end += group.heads
            ends.append(end)
        return ends

    @classmethod
    def stacked(cls, rows: list[StaticLayer]) -> StaticLayer:
        """One layer of len(rows) rows from one-sequence layers. Rows may split their heads into
        groups differently (MoA's capacities follow each prompt's length): the stacked layer's groups
        are the common refinement, each a run of heads grouped alike in every row."""
        if len({row.repeat for row in rows}) != 1 or len({row.bounds()[-1] for row in rows}) != 1:
            raise ValueError("sequences of a batch must store the same heads")
        cuts = sorted({end for row in rows for end in row.bounds()})
        groups, start = [], 0
        for end in cuts:
            members = []
            for row in rows:  # the group of this row that holds heads [start, end), and where they sit in it
                first = 0
                for group, group_end in zip(row.groups, row.bounds()):
                    if start < group_end:
                        members.append((group, slice(start - first, end - first)))
                        break
                    first = group_end
            kinds = {type(group) for group, _ in members}
            if len(kinds) != 1:
                raise ValueError(f"sequences of a batch decode with different slot rules: {sorted(k.__name__ for k in kinds)}")
            groups.append(kinds.pop().stacked(members))
            start = end
        return cls(groups, rows[0].repeat)


def grouped(entries: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]], n_sink: int = 0) -> list[SlotGroup]:
    """One group per run of consecutive heads with the same capacity. entries: per head
    (keys [B, 1, n, D], values, positions [n], capacity); heads of a run must hold as many entries."""
    groups, run = [], []

    def close():
        if run:
            keys = torch.cat([e[0] for e in run], dim=1)
            values = torch.cat([e[1] for e in run], dim=1)
            positions = torch.stack([e[2] for e in run])[None]  # [1, h, n]
            groups.append(SlotGroup(keys, values, positions, run[0][3], n_sink))
            run.clear()

    for entry in entries:
        if run and (entry[3], entry[0].shape[2]) != (run[0][3], run[0][0].shape[2]):
            close()
        run.append(entry)
    close()
    return groups


class StaticDecodeCache(Cache):
    """What the compiled step decodes with: a `StaticLayer` per decoder layer and the position of
    the token being fed (a device scalar, advanced inside the step)."""

    def __init__(self, model: PreTrainedModel, layers: list[StaticLayer], position: int):
        super().__init__(layers=layers)
        device = layers[0].groups[0].keys.device
        self.keyword = next(iter(with_cache(model, None)))  # resolved here, outside the compiled step
        self.position = torch.tensor(position, dtype=torch.int64, device=device)
        for layer in layers:
            for group in layer.groups:
                for buffer in group.buffers():
                    # One graph for every capacity (prompt length, budget): the slot axis is symbolic.
                    torch._dynamo.mark_dynamic(buffer, 2)
                    if device.type == "cuda":  # CUDA graphs replay on fixed addresses: these never move
                        torch._dynamo.mark_static_address(buffer)
        if device.type == "cuda":
            torch._dynamo.mark_static_address(self.position)

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.layers[layer_idx].update(key_states, value_states, self.position)
        return key_states, value_states  # unused: the attention reads the layer's slots

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return int(self.position.max())

    def nbytes(self) -> int:
        """KV bytes physically held: every slot, the decode region preallocated included."""
        return sum(layer.nbytes() for layer in self.layers)

    def rewind(self, length: int | list[int]) -> None:
        """Forget every token at a position >= `length` (their slots become empty) and continue
        from there: a draft's rejected proposals (self_spec). A batch takes one length per row.
        An entry a rejected token's write displaced (a full ring's oldest, an H2O eviction) does
        not come back."""
        if isinstance(length, list):
            lengths = torch.tensor(length, dtype=torch.int64, device=self.position.device)
            limit = lengths.view(-1, 1, 1)
        else:
            lengths = limit = length
        for layer in self.layers:
            for group in layer.groups:
                stale = group.positions >= limit
                group.positions.masked_fill_(stale, -1)
                if isinstance(getattr(group, "scores", None), torch.Tensor):
                    group.scores.masked_fill_(stale, 0.0)
        if isinstance(length, list):
            self.position.copy_(lengths)
        else:
            self.position.fill_(length)


def stack(model: PreTrainedModel, caches: list[StaticDecodeCache]) -> StaticDecodeCache:
    """One cache of len(caches) rows from one-sequence caches (each converted after its own prefill):
    row i decodes exactly as caches[i] would, at its own position. The one-sequence caches are
    consumed (their buffers are copied into the rows)."""
    if any(cache.position.dim() != 0 or cache.layers[0].groups[0].keys.shape[0] != 1 for cache in caches):
        raise ValueError("stack takes one-sequence caches")
    layers = []
    for index in range(len(caches[0].layers)):
        layers.append(StaticLayer.stacked([cache.layers[index] for cache in caches]))
        for cache in caches:  # one layer at a time: the copy never holds the whole batch twice
            cache.layers[index] = None
    batched = StaticDecodeCache(model, layers, 0)
    batched.position = torch.stack([cache.position for cache in caches])
    if batched.position.device.type == "cuda":
        torch._dynamo.mark_static_address(batched.position)
    return batched


def static_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The attention every static cache decodes with: its layer's groups do the work."""
    cache: StaticDecodeCache = kwargs[CACHE_KWARG]
    out = cache.layers[module.layer_idx].attend(query, scaling, cache.position)
    return out.transpose(1, 2).contiguous(), None


AttentionInterface.register(ATTENTION, static_attention)  # no mask function: none is built


def _step(model: PreTrainedModel, cache: StaticDecodeCache, token: torch.Tensor) -> torch.Tensor:
    """One decode step: token [B, 1] -> the next greedy token [B, 1]; the cache advances in place."""
    position_ids = cache.position.view(-1, 1).expand(token.shape[0], 1)  # [] or [B] positions -> [B, 1]
    logits = model(input_ids=token, position_ids=position_ids, use_cache=True,
                   **{cache.keyword: cache, CACHE_KWARG: cache}).logits
    cache.position.add_(1)
    return logits[:, -1].argmax(dim=-1, keepdim=True)


_COMPILED: dict[str, Callable] = {}


def compile_mode(device: torch.device) -> str | None:
    """inductor's default on a CPU; on CUDA, CUDA graphs replay the whole step (one launch)."""
    return "reduce-overhead" if device.type == "cuda" else None


def _matvec_mm(a: torch.Tensor, b: torch.Tensor, out_dtype=None):
    """A one-row product as a multiply-and-sum over each output's row of the weight: inductor then
    writes one vectorized reduction that streams the weight at memory bandwidth (and fuses what
    follows), where the CPU BLAS's matrix-vector product reads it at about half that. Inductor
    does the same on GPUs under coordinate-descent tuning (gpt-fast's setting); on a CPU it does
    not by itself. a: [1, K]; b: [K, N] (a linear layer's weight, transposed) -> [1, N]."""
    from torch.fx.experimental.symbolic_shapes import statically_known_true

    if out_dtype is not None or not statically_known_true(a.shape[0] == 1):
        return NotImplemented
    return (b.t() * a).sum(dim=-1)[None]


def _matvec_addmm(bias: torch.Tensor, a: torch.Tensor, b: torch.Tensor, beta=1, alpha=1):
    out = _matvec_mm(a, b)
    if out is NotImplemented or beta != 1 or alpha != 1:
        return NotImplemented
    return out + bias


def _backend(device: torch.device):
    """inductor, with one-row products as reductions on a CPU (see `_matvec_mm`)."""
    if device.type != "cpu":
        return "inductor"
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    aten = torch.ops.aten
    decompositions = {**select_decomp_table(), aten.mm.default: _matvec_mm, aten.addmm.default: _matvec_addmm}

    def backend(graph, example_inputs):
        return compile_fx(graph, example_inputs, decompositions=decompositions)

    # AOTAutograd's cache keys a graph before these decompositions apply: it would serve a graph
    # compiled without them. Inductor's own cache keys the decomposed graph, and still serves.
    import torch._functorch.config as functorch_config

    functorch_config.enable_autograd_cache = False

    return backend


def _compile(fn: Callable, device: torch.device) -> Callable:
    import torch._dynamo.config as dynamo_config

    # Every technique structure, model and shape family is a graph of its own: allow many
    # before dynamo would fall back to eager (it does so silently).
    for name in ("recompile_limit", "cache_size_limit"):
        if hasattr(dynamo_config, name):
            setattr(dynamo_config, name, max(getattr(dynamo_config, name), 256))
    if device.type == "cpu":
        return torch.compile(fn, backend=_backend(device))
    return torch.compile(fn, mode=compile_mode(device))


def _compiled(device: torch.device) -> Callable:
    key = device.type
    if key not in _COMPILED:
        _COMPILED[key] = _compile(_step, device)
    return _COMPILED[key]


def compiled_step(model: PreTrainedModel, cache: StaticDecodeCache, compile: bool = True) -> Step:
    """The decode step over a static cache: compiled, or the same code run eagerly (tests, and the
    reference the compiled one is checked against)."""
    fn = _compiled(cache.position.device) if compile else _step
    return lambda token: fn(model, cache, token)


def graphs_compiled() -> int:
    """Graphs dynamo has compiled in this process (a step that raised it paid for a compile)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def warmup_watch(device: torch.device) -> Callable[[int], bool]:
    """Which decode steps are not measured: one that compiled a graph, and on CUDA the first
    steps of a cache (CUDA graphs warm up, then record, before they replay)."""
    seen = [graphs_compiled()]

    def unmeasured(i: int) -> bool:
        now = graphs_compiled()
        compiled, seen[0] = now != seen[0], now
        return compiled or (device.type == "cuda" and i < CUDA_GRAPH_WARMUP)

    return unmeasured


def static_attention_installed(model: PreTrainedModel):
    """The static slots' attention installed on `model` for the duration (a context manager)."""
    return attention_installed(model, ATTENTION)


def convert(model: PreTrainedModel, cache: Cache, layer_to_static: Callable, release: bool = False):
    """`layer_to_static(layer)` for every layer of an eager cache: a `StaticDecodeCache`, or None
    when the first layer cannot be continued statically. `release`: each eager layer's tensors are
    dropped as soon as it is converted, so the copy costs one layer at a time, not the cache twice
    (peak memory is what a trial reports)."""
    position = cache.get_seq_length()
    layers = []
    for index, layer in enumerate(cache.layers):
        static = layer_to_static(layer)
        if static is None:
            if index:
                raise RuntimeError("a cache whose first layer converts must convert every layer")
            return None
        layers.append(static)
        if release:
            for name, value in list(vars(layer).items()):
                if isinstance(value, torch.Tensor):
                    setattr(layer, name, None)
    return StaticDecodeCache(model, layers, position)


def dynamic_to_static(layer, steps: int) -> StaticLayer:
    """transformers' full layer (dense) as one appending group: the prompt plus `steps` slots."""
    kept = layer.keys.shape[-2]
    positions = torch.arange(kept, device=layer.keys.device)
    return StaticLayer([SlotGroup(layer.keys, layer.values, positions, kept + steps)])


# ---- speculative decoding: several tokens a forward, rolled back by moving the length ----------


class PositionalLayer:
    """A full layer cache whose slot is the token's position: T tokens are written at
    [position, position + T) and attend causally by position, so rolling back is moving the
    length (stale slots beyond it are masked, then overwritten). keys/values: [B, Hkv, C, D]."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, capacity: int):
        batch, heads, kept, dim = keys.shape
        self.keys = keys.new_zeros(batch, heads, capacity, dim)
        self.values = values.new_zeros(batch, heads, capacity, values.shape[-1])
        self.keys[:, :, :kept] = keys
        self.values[:, :, :kept] = values
        self.groups = [self]  # what StaticDecodeCache's set-up walks

    def buffers(self) -> list[torch.Tensor]:
        return [self.keys, self.values]

    def update(self, key: torch.Tensor, value: torch.Tensor, position: torch.Tensor) -> None:
        if position.dim():  # a batch: row b writes at [position[b], position[b] + T)
            slots = position.view(-1, 1) + torch.arange(key.shape[-2], device=key.device)  # [B, T]
            index = slots[:, None, :, None].expand(-1, key.shape[1], -1, key.shape[-1])
            self.keys.scatter_(2, index, key)
            self.values.scatter_(2, index, value)
            return
        slots = position + torch.arange(key.shape[-2], device=key.device)  # [T]
        self.keys.index_copy_(2, slots, key)
        self.values.index_copy_(2, slots, value)

    def attend(self, query: torch.Tensor, scaling: float, position: torch.Tensor) -> torch.Tensor:
        """query [B, Hq, T, D]: query t sees the slots up to its own position (its row's, in a batch)."""
        if position.dim():
            queries = position.view(-1, 1) + torch.arange(query.shape[-2], device=query.device)  # [B, T]
            visible = torch.arange(self.keys.shape[2], device=query.device) <= queries[:, None, :, None]  # [B, 1, T, C]
        else:
            queries = position + torch.arange(query.shape[-2], device=query.device)  # [T]
            visible = torch.arange(self.keys.shape[2], device=query.device)[None, :] <= queries[:, None]  # [T, C]
        return F.scaled_dot_product_attention(query, self.keys, self.values, attn_mask=visible, scale=scaling, enable_gqa=True)

    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size() + self.values.numel() * self.values.element_size()


class RollbackCache(StaticDecodeCache):
    """A dense cache for draft-and-verify: room for `room` more tokens, `crop(-n)` exact and free.
    `length` mirrors the device position on the host, so the loop reads lengths without a sync."""

    def __init__(self, model: PreTrainedModel, cache: Cache, room: int):
        layers = [PositionalLayer(layer.keys, layer.values, layer.keys.shape[-2] + room) for layer in cache.layers]
        self.length = cache.get_seq_length()
        self.lengths: list[int] | None = None  # a batch's rows (`stacked`)
        super().__init__(model, layers, self.length)

    @classmethod
    def stacked(cls, model: PreTrainedModel, caches: list[Cache], room: int) -> RollbackCache:
        """One cache of len(caches) rows, each a sequence's full cache after its own prefill, with
        room for `room` more tokens past the longest; row b continues at its own length."""
        lengths = [cache.get_seq_length() for cache in caches]
        capacity = max(lengths) + room
        layers = []
        for index in range(len(caches[0].layers)):
            rows = [cache.layers[index] for cache in caches]
            layer = PositionalLayer(rows[0].keys[:, :, :0], rows[0].values[:, :, :0], capacity)
            layer.keys, layer.values = (torch.cat([layer.keys] * len(rows)), torch.cat([layer.values] * len(rows)))
            for row, source in enumerate(rows):
                layer.keys[row, :, : lengths[row]] = source.keys[0]
                layer.values[row, :, : lengths[row]] = source.values[0]
                source.keys = source.values = None  # one layer at a time: never the batch twice
            layers.append(layer)
        self = cls.__new__(cls)
        StaticDecodeCache.__init__(self, model, layers, 0)
        self.position = torch.tensor(lengths, dtype=torch.int64, device=self.position.device)
        if self.position.device.type == "cuda":
            torch._dynamo.mark_static_address(self.position)
        self.length, self.lengths = max(lengths), list(lengths)
        return self

    def set_lengths(self, lengths: list[int]) -> None:
        """A batch: row b keeps its first lengths[b] tokens (its rollback)."""
        self.lengths = list(lengths)
        self.length = max(lengths)
        self.position.copy_(torch.tensor(lengths, dtype=torch.int64))

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self.length

    def crop(self, tokens_to_remove: int) -> None:
        if tokens_to_remove >= 0:
            raise ValueError("crop takes the negative number of tokens to remove")
        self.length += tokens_to_remove
        self.position.fill_(self.length)

    def advance(self, tokens: int) -> None:
        self.length += tokens
        if self.lengths is not None:
            self.lengths = [length + tokens for length in self.lengths]

    def forward(self, model: PreTrainedModel, ids: torch.Tensor) -> torch.Tensor:
        """ids [1, T] through `model` (compiled), appended to this cache: logits or hidden states [1, T, .]."""
        return compiled_forward(model, self, ids)


def _forward(model: PreTrainedModel, cache: StaticDecodeCache, ids: torch.Tensor) -> torch.Tensor:
    """ids [1, T] appended at the cache's position (a batch: [B, T], each row at its own): the
    causal LM's logits [B, T, V], or a base model's last hidden states [B, T, H]."""
    if cache.position.dim():
        position_ids = cache.position.view(-1, 1) + torch.arange(ids.shape[1], device=ids.device)
    else:
        position_ids = (cache.position + torch.arange(ids.shape[1], device=ids.device))[None]
    out = model(input_ids=ids, position_ids=position_ids, use_cache=True, **{cache.keyword: cache, CACHE_KWARG: cache})
    cache.position.add_(ids.shape[1])
    return out.logits if hasattr(out, "logits") else out.last_hidden_state


_COMPILED_FORWARD: dict[str, Callable] = {}


def compiled_forward(model: PreTrainedModel, cache: RollbackCache, ids: torch.Tensor) -> torch.Tensor:
    """`_forward` through torch.compile (one graph per model, cache structure and token count: 1,
    then a symbolic count once a second one is seen). A `StaticDecodeCache` takes one token a call."""
    key = ids.device.type
    if key not in _COMPILED_FORWARD:
        _COMPILED_FORWARD[key] = _compile(_forward, ids.device)
    out = _COMPILED_FORWARD[key](model, cache, ids)
    if isinstance(cache, RollbackCache):
        cache.advance(ids.shape[1])
    return out
