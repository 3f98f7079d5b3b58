"""The EMA of the trained weights, always in fp32, fed from the optimizer's fp32 master weights.

Under DeepSpeed bf16 the module's parameters are bf16: an EMA copied from them is bf16 too, and an update of
(1 - 0.9999) x (s - p) is below bf16's resolution, so such an EMA stops moving. `ExponentialMovingAverage` keeps
fp32 shadows of what the optimizer really holds: its fp32 masters, where DeepSpeed keeps them apart from the module
(ZeRO 1-3 partitions; under ZeRO 0 with bf16/fp16, the unfused optimizer's fp32 copies), the parameter itself where
the module is fp32 (no master copy exists).

The loop keeps a `PartitionedEMA`: each rank averages the master elements its ZeRO partition owns, so an update
sends nothing. A full copy is gathered to rank 0 only for a checkpoint (`ema.pt`, the full EMA, whatever the world
size), a validation grid, and DreamBooth's export (`rank0_masters`). `master_weights` (a collective per tensor on
every rank) stays for checks that want every rank to see the full masters.

The decay schedule is diffusers' `EMAModel` one: without warm-up (1 + step) / (10 + step), with it
1 - (1 + step)^-power, capped at `decay`; its state dict uses `EMAModel`'s key names.
"""

from __future__ import annotations

import torch

from emoji_ldm.errors import UserError


class ExponentialMovingAverage:
    def __init__(self, tensors, decay: float, use_warmup: bool = False, power: float = 2 / 3):
        self.shadow_params = [t.detach().to(torch.float32).clone() for t in tensors]
        self.decay, self.use_warmup, self.power = decay, use_warmup, power
        self.optimization_step = 0

    def get_decay(self, optimization_step: int) -> float:
        step = max(0, optimization_step - 1)
        if step <= 0:
            return 0.0
        decay = 1 - (1 + step) ** -self.power if self.use_warmup else (1 + step) / (10 + step)
        return min(decay, self.decay)

    @torch.no_grad()
    def step(self, tensors) -> None:
        """One update towards `tensors` (any dtype; upcast to fp32), taken one at a time: `tensors` may be a
        generator that gathers each as it goes (`master_weights`), so no second full copy is ever held."""
        self.optimization_step += 1
        weight = 1 - self.get_decay(self.optimization_step)
        for s, t in zip(self.shadow_params, tensors, strict=True):
            s.lerp_(t.detach().to(s.device, torch.float32), weight)  # s += (1 - decay) (p - s)

    @torch.no_grad()
    def copy_to(self, params) -> None:
        for s, p in zip(self.shadow_params, params):
            p.data.copy_(s.to(p.device, p.dtype))

    def to(self, device) -> ExponentialMovingAverage:
        self.shadow_params = [s.to(device) for s in self.shadow_params]
        return self

    def state_dict(self) -> dict:
        return {"decay": self.decay, "use_ema_warmup": self.use_warmup, "power": self.power,
                "optimization_step": self.optimization_step, "shadow_params": self.shadow_params}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow_params"]) != len(self.shadow_params):
            raise ValueError(f"the EMA in the checkpoint has {len(state['shadow_params'])} tensors, the model "
                             f"{len(self.shadow_params)}")
        self.optimization_step = int(state["optimization_step"])
        device = self.shadow_params[0].device if self.shadow_params else "cpu"
        self.shadow_params = [s.to(device, torch.float32) for s in state["shadow_params"]]


def make_ema(params, recipe) -> ExponentialMovingAverage:
    """An fp32 EMA of `params` with the preset's decay and warm-up (`recipe` is the preset's `TrainSpec`)."""
    return ExponentialMovingAverage(params, decay=recipe.ema_decay, use_warmup=recipe.ema_warmup,
                                    power=recipe.ema_power)


def master_weights(params):
    """The fp32 weights the optimizer updates, one full tensor per parameter, yielded one at a time.

    A collective under ZeRO (the fp32 masters are partitioned, each is gathered as it is yielded): every rank
    must consume all of it, in the same order. An fp32 parameter outside ZeRO-3 is its own master and is yielded
    as it is, without a gather. Under ZeRO-3 only one parameter is ever gathered at once, so the ranks never
    hold a second full copy of the model; only rank 0 keeps an EMA.
    """
    from deepspeed.utils import safe_get_full_fp32_param

    for p in params:
        if p.dtype == torch.float32 and not hasattr(p, "ds_id"):
            yield p.detach()
            continue
        master = safe_get_full_fp32_param(p)
        yield p.detach().float() if master is None else master


# --- the EMA the loop keeps: each rank averages the fp32 master elements it owns --------------------------------


def _optimizer_masters(optimizer) -> dict:
    """id(parameter) -> its fp32 master, where the optimizer keeps masters beside the module without linking them
    to it: DeepSpeed's unfused fp16/bf16 optimizer (ZeRO 0 with --precision bf16 or fp16) holds them in
    `fp32_groups`, parallel to `fp16_groups` (the module's own parameters). Empty for any other optimizer."""
    low, high = getattr(optimizer, "fp16_groups", None), getattr(optimizer, "fp32_groups", None)
    if not low or not high:
        return {}
    return {id(p): m for lg, hg in zip(low, high) for p, m in zip(lg, hg)}


def local_master(param, masters: dict, rank: int):
    """(start, fp32 tensor): the piece of `param`'s fp32 master that this rank owns (flat, or the whole master in
    its own shape), and where it starts in the flattened parameter; None when it owns none. Never a collective.

    - ZeRO-3: the rank's partition (`safe_get_local_fp32_param`); partitions are laid out rank after rank;
    - ZeRO 1/2 (and DeepSpeed's bf16 optimizer): the fragment the rank's fp32 partition holds, as DeepSpeed's own
      `safe_get_full_fp32_param` reads it before its all-reduce (0.19 has no public local accessor for them);
    - a parameter DeepSpeed does not partition (ZeRO 0): rank 0 owns all of it; its master is the optimizer's
      fp32 copy, or the parameter itself when it is fp32. A bf16/fp16 parameter without a master is refused.
    """
    import torch

    if hasattr(param, "ds_id"):
        from deepspeed.utils import safe_get_local_fp32_param  # only under ZeRO-3: a plain process has no DeepSpeed

        local = safe_get_local_fp32_param(param).view(-1)
        start = rank * local.numel()
        count = max(0, min(local.numel(), param.ds_numel - start))  # the last partitions are padded
        return (start, local.narrow(0, 0, count)) if count else None
    if hasattr(param, "_hp_mapping"):
        mapping = param._hp_mapping
        return None if mapping is None else (mapping.lp_fragment_address.start, mapping.get_hp_fragment().view(-1))
    master = masters.get(id(param), param if param.dtype == torch.float32 else None)
    if master is None:
        raise UserError(f"the EMA follows fp32 master weights, and the optimizer keeps none for a {param.dtype} "
                        f"weight of shape {tuple(param.shape)}: train with --zero-stage 1 or more, or --precision no")
    return (0, master.detach()) if rank == 0 else None  # in its own shape and layout (ZeRO 0 may be channels-last)


def _partitioned(param) -> bool:
    """Whether DeepSpeed splits `param`'s master over the ranks (then a full copy needs a collective)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def _full_numel(param) -> int:
    return param.ds_numel if hasattr(param, "ds_id") else param.numel()


def _full_shape(param):
    return param.ds_shape if hasattr(param, "ds_id") else param.shape


def gather_to_rank0(params, pieces, rank: int):
    """Each full fp32 tensor of `params`, on rank 0's CPU, one at a time (None on the other ranks), from each
    rank's `pieces` ({index: (start, tensor)}). A collective for a partitioned parameter: every rank must consume
    all of it, in order. Each element is owned by one rank, and the pieces are summed as int32 bit patterns over
    zeros, so the result is bit-exact (a float sum would turn -0.0 into 0.0)."""
    import torch
    import torch.distributed as dist

    world = dist.get_world_size() if dist.is_initialized() else 1
    for i, p in enumerate(params):
        if not _partitioned(p) and rank != 0:
            yield None
            continue
        full = torch.zeros(_full_numel(p), dtype=torch.float32, device=p.device)  # flattened, where NCCL can send it
        if i in pieces:
            start, piece = pieces[i]
            full.narrow(0, start, piece.numel()).copy_(piece.reshape(-1))
        if _partitioned(p) and world > 1:
            dist.reduce(full.view(torch.int32), dst=0)
        yield full.view(_full_shape(p)).cpu() if rank == 0 else None


def rank0_masters(engine, params, rank: int):
    """The full fp32 masters of `params` on rank 0's CPU, one at a time; None on the other ranks, which hold no
    full copy (a collective under ZeRO: every rank consumes all of it)."""
    masters = _optimizer_masters(getattr(engine, "optimizer", None))
    pieces = {i: piece for i, p in enumerate(params) if (piece := local_master(p, masters, rank)) is not None}
    return gather_to_rank0(params, pieces, rank)


class _FlatPartitions:
    """ZeRO-3: this rank's fp32 masters as DeepSpeed keeps them, one flat tensor per sub-group
    (`fp32_partitioned_groups_flat`), and the EMA's own flat copies of them. DeepSpeed's per-parameter accessor
    (`safe_get_local_fp32_param`) synchronizes its reduce stream on every call; an update reads the flat tensors
    instead, one lerp per sub-group. Each parameter's shadow is a view of a flat copy."""

    def __init__(self, optimizer, groups: list[int], shadows: list):
        self.optimizer, self.groups, self.shadows = optimizer, groups, shadows

    @classmethod
    def of(cls, optimizer, pieces: list) -> tuple[_FlatPartitions, list] | None:
        """(the flat partitions, each piece's shadow: a view of their copy), where every piece of `pieces` (views
        that `safe_get_local_fp32_param` returned, read once) lies in one of the optimizer's flat tensors; None
        otherwise (ZeRO 0-2, or an offloaded optimizer whose masters are copies)."""
        flats = getattr(optimizer, "fp32_partitioned_groups_flat", None)
        if not flats or not pieces:
            return None
        where = []  # (sub-group, offset in it) of each piece
        for piece in pieces:
            found = [g for g, flat in enumerate(flats) if flat.numel() and flat.dtype == piece.dtype
                     and flat.untyped_storage().data_ptr() == piece.untyped_storage().data_ptr()
                     and 0 <= piece.storage_offset() - flat.storage_offset() <= flat.numel() - piece.numel()]
            if len(found) != 1:
                return None
            where.append((found[0], piece.storage_offset() - flats[found[0]].storage_offset()))
        groups = sorted({g for g, _ in where})
        copies = {g: flats[g].detach().to(torch.float32, copy=True) for g in groups}
        views = [copies[g].narrow(0, offset, piece.numel()).view(piece.shape)
                 for (g, offset), piece in zip(where, pieces)]
        return cls(optimizer, groups, [copies[g] for g in groups]), views

    @torch.no_grad()
    def lerp(self, weight: float) -> None:
        flats = self.optimizer.fp32_partitioned_groups_flat  # read again: a checkpoint load may replace them
        for shadow, g in zip(self.shadows, self.groups):
            shadow.lerp_(flats[g], weight)  # s += (1 - decay) (p - s), padding included


class PartitionedEMA:
    """The loop's fp32 EMA: each rank averages only the master elements it owns (its ZeRO partition; under ZeRO 0
    rank 0 owns everything), so a step sends nothing; under ZeRO-3 it reads DeepSpeed's flat partitions, without a
    stream synchronization per parameter (`_FlatPartitions`). A full copy is gathered at a checkpoint
    (`state_dict`) and for a grid (`gathered`) only, on rank 0; a checkpoint's `ema.pt` is the full EMA, whatever
    the world size.

    `state_dict`, `gathered` and `load_state_dict` are called by every rank."""

    def __init__(self, engine, params, recipe, rank: int):
        self.params, self.rank = list(params), rank
        self.masters = _optimizer_masters(getattr(engine, "optimizer", None))
        pieces = self._pieces()
        self.index = list(pieces)  # which parameters this rank holds a piece of
        self.starts = [pieces[i][0] for i in self.index]
        self.device = pieces[self.index[0]][1].device if self.index else self.params[0].device
        self.ema = make_ema([pieces[i][1] for i in self.index], recipe)
        flat = _FlatPartitions.of(getattr(engine, "optimizer", None), [pieces[i][1] for i in self.index])
        self.flat = None
        if flat is not None:
            self.flat, self.ema.shadow_params = flat  # the same values, now views of the flat copies

    def _pieces(self) -> dict:
        return {i: piece for i, p in enumerate(self.params)
                if (piece := local_master(p, self.masters, self.rank)) is not None}

    @property
    def optimization_step(self) -> int:
        return self.ema.optimization_step

    def step(self) -> None:
        """One update from the masters this rank owns: no collective, and under ZeRO-3 no per-parameter read."""
        if self.flat is not None:
            self.ema.optimization_step += 1
            self.flat.lerp(1 - self.ema.get_decay(self.ema.optimization_step))
            return
        pieces = self._pieces()  # read again: a checkpoint load may have replaced the optimizer's tensors
        self.ema.step(pieces[i][1] for i in self.index)

    def _full(self):
        pieces = dict(zip(self.index, zip(self.starts, self.ema.shadow_params)))
        return gather_to_rank0(self.params, pieces, self.rank)

    def state_dict(self) -> dict | None:
        """Every rank: the full EMA (`EMAModel`'s keys) on rank 0's CPU; None on the others."""
        shadows = list(self._full())
        return None if self.rank != 0 else {**self.ema.state_dict(), "shadow_params": shadows}

    def gathered(self) -> ExponentialMovingAverage | None:
        """Every rank: the full EMA on rank 0's CPU (for a grid: `copy_to`); None on the others."""
        state = self.state_dict()
        if state is None:
            return None
        full = ExponentialMovingAverage([], self.ema.decay, self.ema.use_warmup, self.ema.power)
        full.shadow_params, full.optimization_step = state["shadow_params"], state["optimization_step"]
        return full

    def load_state_dict(self, state: dict) -> None:
        """Every rank: take this rank's pieces of a full EMA (as `state_dict` wrote it, on the CPU)."""
        shadows = state["shadow_params"]
        if len(shadows) != len(self.params):
            raise ValueError(f"the EMA in the checkpoint has {len(shadows)} tensors, the model {len(self.params)}")
        self.ema.optimization_step = int(state["optimization_step"])
        for i, start, s in zip(self.index, self.starts, self.ema.shadow_params):  # in place: ZeRO-3's are views
            s.copy_(shadows[i].reshape(-1).narrow(0, start, s.numel()).reshape(s.shape))

    def to(self, device) -> PartitionedEMA:
        return self  # each piece lives where its master does
