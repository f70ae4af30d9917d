"""FSDP2 sharding of a training run, for teachers that do not fit one GPU (``lrkd-fast distill --fsdp``).

Under torchrun, :func:`shard_training` shards a :class:`~lrkd_fast.training.TrainingLoop`'s frozen
teacher and its trainable parameters across the processes with
``torch.distributed.fsdp.fully_shard`` (FSDP2): each process keeps 1/N of every weight, the
gradients and the optimizer state; a unit's weights are gathered just before it runs (and again in
backward) and freed after it, and the gradients are reduce-scattered (averaged) into the shards. The
loop then skips its DDP-style ``broadcast_parameters`` / ``average_gradients`` path (which stays for
unsharded runs) and checkpoints through ``torch.distributed.checkpoint`` (DCP): every process writes
its own shard, and the files load into a run on any number of processes, sharded or not (a plain
single-process run reads them too).

The plan (:func:`lrc_plan`, :func:`distiller_plan`) is one FSDP unit per transformer block and one for
the rest:

* Low-Rank Clone (:class:`~lrkd_fast.clone.LRCTrainer`): unit ``layer{i}`` holds the teacher's block i
  with the block's projections and norms, and runs the whole co-training block
  (:meth:`LowRankClone.block_step`: teacher block, the student weights W_T P formed from the gathered
  teacher weights, student block, clone terms); unit ``top`` holds the teacher's embeddings, final
  norm and head with P_emb (P_head) and the student's other norms.
* Swap distillation (:class:`~lrkd_fast.distillation.Distiller`): every block of the teacher and of the
  student is a unit (the student's LowRankLinear factors shard with their block); ``teacher`` and
  ``student`` hold the rest of each model. The teacher's root stays gathered after its forward (its
  LM head feeds the fused KD loss).

The modules are wrapped, not changed in place: :meth:`ShardedTraining.unshard` gathers every weight
back into the original modules (on every process), after which the models are plain again (for
evaluation and export). Parameter names in checkpoints are the unsharded model's own
(``proj.layer0_q``, ``model.layers.0.mlp.up_proj.U``).
"""
from __future__ import annotations

import contextlib
import os
import random
import shutil
import uuid
import warnings
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import nn

__all__ = ["ShardedTraining", "Unit", "distiller_plan", "is_sharded_checkpoint", "load_sharded_checkpoint",
           "lrc_plan", "parameters_on_meta", "remove_checkpoint", "shard_training"]

SHARD_SUFFIX = ".shards-"  # a sharded checkpoint X.pt keeps its DCP shards in the folder X.pt.shards-<step>-<id>


@dataclass(frozen=True)
class Unit:
    """One FSDP unit of a plan: its weights are gathered together before it runs and freed after.

    name: the unit's name; modules: the names of the teacher / student modules whose weights it holds
    (``teacher:`` / ``student:`` prefixed); params: the trainable parameters in it, by their names in
    the loop's model."""
    name: str
    modules: tuple
    params: tuple


# ----------------------------------------------------------------------------- plans

def _top_modules(model: nn.Module, inner: list) -> list:
    """(name, module) of the modules of ``model`` that own parameters and are not inside one of ``inner``."""
    inside = {id(m) for blk in inner for m in blk.modules()}
    return [(n, m) for n, m in model.named_modules()
            if id(m) not in inside and next(m.parameters(recurse=False), None) is not None]


def lrc_plan(clone) -> list:
    """The FSDP units of a :class:`~lrkd_fast.clone.LowRankClone` (module docstring): ``top``, then
    ``layer0`` ... ``layer{L-1}``. Every trainable parameter of the clone is in exactly one unit."""
    from .clone import LowRankClone

    if not isinstance(clone, LowRankClone):
        raise TypeError(f"clone must be a LowRankClone, got {type(clone).__name__}")
    if clone._owners:
        raise ValueError("clone is sharded already")
    prefix = clone.base_prefix + clone.family.layers
    layers = []
    for i in range(clone.n_layers):
        keys = [(r[0] == "norm", r[2]) for r in clone.layer_plans[i].values() if len(r) > 2]
        params = [f"{'norms' if is_norm else 'proj'}.{k}" for is_norm, k in dict.fromkeys(keys)]
        layers.append(Unit(f"layer{i}", (f"teacher:{prefix}.{i}",), tuple(params)))
    in_layers = {p for u in layers for p in u.params}
    top_params = tuple(n for n, _ in clone.named_parameters() if n not in in_layers)
    top = _top_modules(clone.teacher, list(clone.t_layers))
    return [Unit("top", tuple(f"teacher:{n}" for n, _ in top), top_params)] + layers


def distiller_plan(distiller) -> list:
    """The FSDP units of a :class:`~lrkd_fast.distillation.Distiller` (module docstring): ``teacher``,
    one per teacher block, ``student``, one per student block (``student:model.layers.0`` ...)."""
    from .model_utils import find_blocks

    ids = {id(p) for p in distiller.params}
    units = []
    for side, model in (("teacher", distiller.teacher), ("student", distiller.student)):
        blocks = find_blocks(model)
        if not blocks:
            raise ValueError(f"found no transformer blocks in the {side} ({type(model).__name__}) to shard")
        in_blocks = set()
        per_block = []
        for b in blocks:
            names = tuple(f"{b}.{n}" for n, p in model.get_submodule(b).named_parameters() if id(p) in ids)
            in_blocks.update(names)
            per_block.append(Unit(f"{side}:{b}", (f"{side}:{b}",), names if side == "student" else ()))
        rest = tuple(n for n, p in model.named_parameters() if id(p) in ids and n not in in_blocks)
        top = _top_modules(model, [model.get_submodule(b) for b in blocks])
        units.append(Unit(side, tuple(f"{side}:{n}" for n, _ in top), rest if side == "student" else ()))
        units += per_block
    return units


# ----------------------------------------------------------------------------- wrappers (the FSDP units)

class _Holder(nn.Module):
    """The trainable parameters of one LRC unit, under the clone's own keys."""

    def __init__(self, proj: dict, norms: dict):
        super().__init__()
        self.proj = nn.ParameterDict(proj)
        self.norms = nn.ParameterDict(norms)


class _LRCBlock(nn.Module):
    def __init__(self, clone, i: int, teacher_layer: nn.Module, holder: _Holder):
        super().__init__()
        self.teacher_layer, self.params, self.i = teacher_layer, holder, i
        object.__setattr__(self, "clone", clone)

    def forward(self, hT, hS, clone_total, term_sums):
        return self.clone.block_step(self.i, hT, hS, clone_total, term_sums)


class _LRCRoot(nn.Module):
    def __init__(self, clone, blocks: list, top: list, holder: _Holder):
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.teacher_top = nn.ModuleList(top)
        self.params = holder
        object.__setattr__(self, "clone", clone)

    def forward(self, **batch):
        return self.clone(**batch)


class _Wrapped(nn.Module):
    """An FSDP unit around a module the model itself calls (a block, or the whole model as the root);
    attributes the model reads on its blocks (``attention_type``, ...) come from the wrapped module."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.inner = inner

    def forward(self, *args, **kwargs):
        return self.inner(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(self._modules["inner"], name)


# ----------------------------------------------------------------------------- sharding a loop

def _mesh(device: torch.device):
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("sharding needs torch.distributed: launch with torchrun (torchrun --nproc_per_node N ...) "
                         "and join the process group first (lrkd_fast.recipes.base.init_distributed does)")
    return init_device_mesh(device.type, (dist.get_world_size(),))


def _device_of(mesh) -> torch.device:
    """This process's device in ``mesh`` (its GPU under CUDA)."""
    return torch.device("cuda", torch.cuda.current_device()) if mesh.device_type == "cuda" else \
        torch.device(mesh.device_type)


def _fully_shard(module: nn.Module, mesh, **kw):
    from torch.distributed.fsdp import fully_shard

    return fully_shard(module, mesh=mesh, **kw)


class ShardedTraining:
    """A loop's FSDP2 sharding (made by :func:`shard_training`). What the loop calls:
    :meth:`named_parameters` (the shards it optimizes, by the unsharded names), :meth:`save_checkpoint`
    (DCP, every process) and :meth:`agree` (one decision for every process); the models run through
    ``forward_module(side)``. :meth:`unshard` undoes it."""

    def __init__(self, loop, plan: list, named: dict, fsdp_modules: list, restore, mesh):
        self.loop, self.plan, self._named = loop, plan, named
        self._fsdp_modules, self._restore = fsdp_modules, restore
        self.forward_modules: dict = {}
        self._lrc = None  # a Low-Rank Clone's (root unit, block units)
        # where small collectives run: NCCL takes only tensors on the process's GPU
        self._device = _device_of(mesh)

    def named_parameters(self) -> dict:
        """{name in the unsharded model: sharded parameter (a DTensor)}, the loop's trainable parameters."""
        return dict(self._named)

    def forward_module(self, side: str) -> nn.Module:
        """The module to run for ``side`` ("clone", "student" or "teacher"): the FSDP root around it."""
        return self.forward_modules[side]

    def agree(self, flag: bool) -> bool:
        """True on every process when it is True on any (so a time-based decision is the same everywhere)."""
        from .training import any_process

        return any_process(flag, self._device)

    def save_checkpoint(self, loop, path: str, step: int, opt, sched, history: dict) -> None:
        """Write the checkpoint ``path`` of a sharded run, on every process together: the parameters and
        optimizer state through DCP into the folder ``path.shards-<step>-<id>`` (each process writes its
        own shard file), then rank 0 writes ``path`` itself (step, schedule, history, random state, data
        position and the name of that folder; read by :func:`~lrkd_fast.training.read_checkpoint`) and
        removes the folders of earlier saves to ``path``."""
        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        rank = dist.get_rank()
        folder = os.path.dirname(path) or "."
        name = [f"{os.path.basename(path)}{SHARD_SUFFIX}{step}-{uuid.uuid4().hex[:8]}" if rank == 0 else None]
        if rank == 0:
            os.makedirs(folder, exist_ok=True)
        dist.broadcast_object_list(name, src=0)
        shards = os.path.join(folder, name[0])
        state = _dcp_state(self._named, opt)
        dcp.save(state, checkpoint_id=shards)
        if rank == 0:
            meta = _meta(loop, step, opt, sched, history, self._named, state, name[0], dist.get_world_size())
            tmp = path + ".tmp"
            torch.save(meta, tmp)
            os.replace(tmp, path)
            _remove_shards(path, keep=name[0])
        dist.barrier()
        loop._good_checkpoint = path

    # -------------------------------------------------- a sharded Low-Rank Clone's teacher, without gathering it
    def _lrc_units(self) -> tuple:
        if self._lrc is None:
            raise TypeError("only a sharded LRCTrainer runs its teacher and forms its student unit by unit")
        return self._lrc

    @contextlib.contextmanager
    def teacher_forward(self):
        """Inside, the sharded teacher's own forward works (``clone.teacher(**batch)``, e.g. its embeddings
        for a fidelity table or the pca init's calibration), on every process together and with the same
        batches: each block's weights are gathered just before it runs and freed after, the weights
        outside the blocks for the whole context. No process holds more of the teacher than that."""
        root, blocks = self._lrc_units()
        hooks = []
        for blk in blocks:
            hooks.append(blk.teacher_layer.register_forward_pre_hook(lambda m, a, b=blk: b.unshard()))
            hooks.append(blk.teacher_layer.register_forward_hook(lambda m, a, o, b=blk: b.reshard()))
        root.unshard()
        try:
            yield
        finally:
            for h in hooks:
                h.remove()
            root.reshard()

    @torch.no_grad()
    def student_state_dict(self) -> dict:
        """The Low-Rank Clone's student weights (:meth:`LowRankClone.student_state_dict`), formed unit by
        unit: one block of the teacher gathered at a time. Every process takes part and gets them all
        (the student is the small model)."""
        root, blocks = self._lrc_units()
        clone = self.loop.model
        state = {}
        for part, unit in [("top", root)] + list(enumerate(blocks)):
            unit.unshard()
            try:
                state.update({n: w.detach().clone() for n, w in clone.student_state_dict(part).items()})
            finally:
                unit.reshard()
        return state

    def export_student(self) -> nn.Module:
        """The student as a plain Hugging Face model (:meth:`LowRankClone.export_student`), on every process,
        formed without gathering the teacher (:meth:`student_state_dict`)."""
        return self.loop.model.export_student(self.student_state_dict())

    @torch.no_grad()
    def set_values(self, values: dict) -> None:
        """Copy whole tensors into the trainable shards: ``values`` maps names of
        :meth:`named_parameters` to tensors of the parameters' shapes, the same on every process."""
        from torch.distributed.tensor import distribute_tensor

        named = self._named
        bad = [n for n in values if n not in named or tuple(values[n].shape) != tuple(named[n].shape)]
        if bad:
            raise ValueError(f"values has entries that are not trainable parameters of this shape: {bad[:3]}")
        for n, v in values.items():
            p = named[n]
            p.copy_(distribute_tensor(v.detach().to(device=p.device, dtype=p.dtype), p.device_mesh, p.placements,
                                      src_data_rank=None))

    @torch.no_grad()
    def load_parameters(self, checkpoint: dict) -> None:
        """The trainable parameters of a resume checkpoint (:func:`~lrkd_fast.training.read_checkpoint`)
        into the shards: each process reads its parts of a sharded run's DCP shards, or its slices of a
        plain checkpoint's tensors. ValueError names a parameter that does not fit; CheckpointError a
        sharded checkpoint whose shards are missing."""
        if is_sharded_checkpoint(checkpoint):
            saved = checkpoint["sharded"]["params"]
            named = {n: list(p.shape) for n, p in self._named.items()}
            bad = sorted(n for n in set(saved) | set(named) if saved.get(n) is None or list(saved[n]) != named.get(n))
            if bad:
                raise ValueError(f"parameter {bad[0]!r} is {saved.get(bad[0])} in the checkpoint but "
                                 f"{named.get(bad[0])} here (written with other settings?)")
            _dcp_load({"params": {n: p.detach() for n, p in self._named.items()}}, _shard_dir(checkpoint))
            return
        params = checkpoint["params"]
        missing = [n for n in self._named if n not in params]
        if missing:
            raise ValueError(f"it lacks {missing[:3]}")
        self.set_values(params)

    @torch.no_grad()
    def pca_init(self, calibration: list) -> None:
        """The Low-Rank Clone's ``init="pca"`` for a clone sharded before it was calibrated: the principal
        directions from the sharded teacher's forward on ``calibration`` (the same batches on every process;
        rank 0's result is broadcast), then every projection and norm (:meth:`LowRankClone.pca_values`; a
        teacher norm is gathered alone, it is a vector)."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        if not calibration:
            raise ValueError("calibration must be a non-empty list of tokenized batch dicts for init='pca'")
        clone = self.loop.model
        with self.teacher_forward():
            U, frac = clone._principal(calibration)
        U = U.contiguous()
        box = [frac]
        dist.broadcast(U, src=0)
        dist.broadcast_object_list(box, src=0)
        norms = {r[1] for r in clone.plan.values() if r[0] == "norm"}
        tparams = {n: (p.full_tensor() if isinstance(p, DTensor) else p)
                   for n, p in clone.teacher.named_parameters(remove_duplicate=False) if n in norms}
        self.set_values({f"{kind}.{key}": v for (kind, key), v in clone.pca_values(U, box[0], tparams).items()})

    def unshard(self) -> None:
        """Gather every weight back into the original modules (a collective: every process calls it) and
        detach the loop from the sharding: afterwards the teacher, the student and the loop are unsharded
        (``loop.params`` the full parameters), as before :func:`shard_training`."""
        for m in self._fsdp_modules:
            m.reshard()
        self._restore()
        self.loop.sharding = None


def _full(p: nn.Parameter) -> nn.Parameter:
    from torch.distributed.tensor import DTensor

    data = p.full_tensor() if isinstance(p, DTensor) else p.detach()
    return nn.Parameter(data.detach().clone(), requires_grad=p.requires_grad)


def _gather_modules(modules) -> None:
    """Replace the DTensor parameters registered on ``modules`` by full ones (tied parameters stay tied)."""
    from torch.distributed.tensor import DTensor

    done: dict = {}
    for m in modules:
        for name, p in list(m._parameters.items()):
            if isinstance(p, DTensor):
                if id(p) not in done:
                    done[id(p)] = _full(p)
                m._parameters[name] = done[id(p)]


@contextlib.contextmanager
def parameters_on_meta():
    """Modules built inside have their parameters on the meta device (no memory, no values) and their
    buffers as usual (rotary frequencies, position ids: computed, not loaded). For the processes other
    than rank 0 of ``shard_training(..., from_rank0=True)``: they build the teacher's skeleton and get
    their shards of rank 0's weights. (Each parameter is still created, and initialized, on the CPU
    before it moves: one at a time.)"""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = type(param)(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def shard_training(loop, mesh=None, from_rank0: bool = False) -> ShardedTraining:
    """Shard ``loop`` (an :class:`~lrkd_fast.clone.LRCTrainer` or a
    :class:`~lrkd_fast.distillation.Distiller`, not trained yet) with FSDP2 by its plan, across the
    processes of the running ``torch.distributed`` group (or ``mesh``, a 1-D DeviceMesh; its device is
    where the shards go). Rank 0's trainable values are broadcast first (as the unsharded path does), so
    an init calibrated on each process's own data still starts every process from one model. Sets
    ``loop.sharding`` and ``loop.params``; returns the :class:`ShardedTraining`.

    from_rank0 (LRCTrainer): only rank 0 holds the teacher's weights (on the CPU, say); every other
    process built the teacher with its parameters on the meta device (:func:`parameters_on_meta`) and
    the clone from it. Each process's shards are then filled from rank 0's weights, one tensor at a
    time, so no process ever holds the whole teacher on its device. Then use
    :meth:`ShardedTraining.teacher_forward`, :meth:`~ShardedTraining.pca_init` and
    :meth:`~ShardedTraining.export_student` rather than :meth:`~ShardedTraining.unshard`."""
    from .clone import LRCTrainer
    from .distillation import Distiller
    from .training import TrainingLoop, broadcast_parameters

    if not isinstance(loop, TrainingLoop):
        raise TypeError(f"loop must be a TrainingLoop (LRCTrainer or Distiller), got {type(loop).__name__}")
    if getattr(loop, "sharding", None) is not None:
        raise ValueError("loop is sharded already")
    if loop.cfg.diagnostics_every:
        raise ValueError("diagnostics_every must be 0 for a sharded run: the diagnostics run the models on rank 0 "
                         "alone, and sharded models run on every process together")
    if mesh is None:  # where the parameters are (from rank 0: on the GPU if there is one, the others are on meta)
        mesh = _mesh(torch.device("cuda" if torch.cuda.is_available() else "cpu") if from_rank0
                     else next(iter(loop.params)).device)
    elif getattr(mesh, "ndim", None) != 1:
        raise ValueError(f"mesh must be a 1-D torch.distributed DeviceMesh (the processes to shard across), got {mesh!r}")
    if from_rank0 and not isinstance(loop, LRCTrainer):
        raise TypeError(f"from_rank0 is for an LRCTrainer, got {type(loop).__name__}")
    if not from_rank0:
        broadcast_parameters(loop.params)
    if isinstance(loop, LRCTrainer):
        sharding = _shard_lrc(loop, mesh, from_rank0)
    elif isinstance(loop, Distiller):
        sharding = _shard_distiller(loop, mesh)
    else:
        raise TypeError(f"no sharding plan for {type(loop).__name__}: LRCTrainer and Distiller have one")
    loop.sharding = sharding
    loop.params = list(sharding.named_parameters().values())
    return sharding


def _fill_from_rank0(root: nn.Module, full: Optional[dict], device: torch.device) -> None:
    """The shards of every parameter of the sharded ``root`` from rank 0's whole tensors ``full`` (by
    name in ``root``; None on the other processes, whose shards are on the meta device until now), one
    tensor at a time; the buffers each process built stay its own."""
    import torch.distributed as dist
    from torch.distributed.tensor import distribute_tensor

    rank = dist.get_rank()
    if rank != 0:
        bufs = [(m, n, b) for m in root.modules() for n, b in m._buffers.items() if b is not None]
        root.to_empty(device=device)
        for m, n, b in bufs:  # the same objects: the clone's student borrows the teacher's buffers
            b.data = b.data.to(device)
            m._buffers[n] = b
    with torch.no_grad():
        for n, p in root.named_parameters():
            whole = full[n].to(device) if rank == 0 else torch.empty(p.shape, dtype=p.dtype, device=device)
            dist.broadcast(whole, src=0)
            p.copy_(distribute_tensor(whole, p.device_mesh, p.placements, src_data_rank=None))
            del whole


def _shard_lrc(trainer, mesh, from_rank0: bool = False) -> ShardedTraining:
    clone = trainer.model
    plan = lrc_plan(clone)
    holders = []
    for u in plan:
        proj = {n.split(".", 1)[1]: clone.proj[n.split(".", 1)[1]] for n in u.params if n.startswith("proj.")}
        norms = {n.split(".", 1)[1]: clone.norms[n.split(".", 1)[1]] for n in u.params if n.startswith("norms.")}
        holders.append(_Holder(proj, norms))
    teacher_mods = dict(clone.teacher.named_modules())
    top = [teacher_mods[m.split(":", 1)[1]] for m in plan[0].modules]
    blocks = [_LRCBlock(clone, i, clone.t_layers[i], holders[i + 1]) for i in range(clone.n_layers)]
    root = _LRCRoot(clone, blocks, top, holders[0])
    import torch.distributed as dist

    full = {n: p.detach() for n, p in root.named_parameters()} if from_rank0 and dist.get_rank() == 0 else None
    for b in blocks:
        _fully_shard(b, mesh)
    _fully_shard(root, mesh)
    if from_rank0:
        _fill_from_rank0(root, full, _device_of(mesh))
        del full
    # from here on the clone reads its projections and norms from the units (LowRankClone._param)
    named = {}
    for holder in holders:
        for kind in ("proj", "norms"):
            for key, p in getattr(holder, kind).items():
                del getattr(clone, kind)[key]
                clone._owners[(kind, key)] = holder
                named[f"{kind}.{key}"] = p
    clone._run_block = lambda i, *t: root.blocks[i](*t)
    order = [n for u in plan for n in u.params]
    named = {n: named[n] for n in order}

    def restore():
        _gather_modules([m for b in blocks for m in b.teacher_layer.modules()] + [m for t in top for m in t.modules()])
        for holder in holders:
            for kind in ("proj", "norms"):
                for key, p in getattr(holder, kind).items():
                    getattr(clone, kind)[key] = _full(p)
        clone._owners.clear()
        clone._run_block = None
        trainer.params = [p for p in clone.parameters() if p.requires_grad]

    s = ShardedTraining(trainer, plan, named, [root] + blocks, restore, mesh)
    s.forward_modules["clone"] = root
    s._lrc = (root, blocks)
    return s


def _shard_distiller(d, mesh) -> ShardedTraining:
    from .model_utils import find_blocks, set_module

    plan = distiller_plan(d)
    ids = {id(p) for p in d.params}
    slots = {}  # name -> (module, attribute): where each trainable parameter is registered
    for name, p in d.student.named_parameters():
        if id(p) in ids:
            mod_name, _, attr = name.rpartition(".")
            slots[name] = (d.student.get_submodule(mod_name), attr)
    fsdp_modules, undo = [], []
    for side in ("teacher", "student"):
        model = getattr(d, side)
        for b in find_blocks(model):
            inner = model.get_submodule(b)
            unit = _Wrapped(inner)
            set_module(model, b, unit)
            undo.append((model, b, inner))
            fsdp_modules.append(_fully_shard(unit, mesh))
        root = _Wrapped(model)
        # the teacher runs without a backward, in which FSDP would reshard its root: keep the root gathered
        fsdp_modules.append(_fully_shard(root, mesh, **({"reshard_after_forward": False} if side == "teacher" else {})))
        d._forward[side] = root
    named = {n: mod._parameters[attr] for n, (mod, attr) in slots.items()}
    order = [n for u in plan for n in u.params]
    named = {n: named[n] for n in order}

    def restore():
        for model, b, inner in undo:
            set_module(model, b, inner)
        _gather_modules(list(d.teacher.modules()) + list(d.student.modules()))
        for side in ("teacher", "student"):
            d._forward[side] = getattr(d, side)
        d.params = [slots[n][0]._parameters[slots[n][1]] for n in order]

    s = ShardedTraining(d, plan, named, fsdp_modules, restore, mesh)
    s.forward_modules.update(d._forward)
    return s


# ----------------------------------------------------------------------------- DCP checkpoints

def _dcp_state(named: dict, opt) -> dict:
    """What DCP writes: the parameters and each one's optimizer state, by parameter name."""
    optim = {}
    for n, p in named.items():
        st = opt.state.get(p, {})
        optim[n] = {k: v for k, v in st.items() if isinstance(v, torch.Tensor)}
    return {"params": dict(named), "optimizer": optim}


def _meta(loop, step, opt, sched, history, named, state, shards: str, world: int) -> dict:
    layout = {n: {k: {"shape": list(v.shape), "dtype": str(v.dtype).removeprefix("torch."),
                      "like_param": tuple(v.shape) == tuple(named[n].shape) and v.dim() > 0}
                  for k, v in st.items()} for n, st in state["optimizer"].items()}
    meta = {"step": step, "params": {}, "optimizer": {"param_groups": [{k: v for k, v in g.items() if k != "params"}
                                                                        for g in opt.param_groups]},
            "scheduler": sched.state_dict(), "history": history, "config": asdict(loop.cfg),
            "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
            "sharded": {"dir": shards, "world_size": world,
                        "params": {n: list(p.shape) for n, p in named.items()}, "optimizer_state": layout}}
    data = getattr(loop, "_data", None)
    if data is not None:
        meta["data"] = data.state_dict()
    return meta


def is_sharded_checkpoint(state) -> bool:
    """Whether ``state`` (what :func:`~lrkd_fast.training.read_checkpoint` returned) was written by a sharded run."""
    return isinstance(state, dict) and isinstance(state.get("sharded"), dict)


def _shard_dir(state: dict) -> str:
    from .training import CheckpointError

    path = state.get("path")
    if path is None:
        raise CheckpointError("a sharded checkpoint must be given by its path (or read_checkpoint's dict with 'path')")
    shards = os.path.join(os.path.dirname(path) or ".", state["sharded"]["dir"])
    if not os.path.isfile(os.path.join(shards, ".metadata")):
        raise CheckpointError(f"checkpoint {path!r}: its shards {shards!r} are missing or incomplete")
    return shards


def _loop_named(loop) -> dict:
    sharding = getattr(loop, "sharding", None)
    if sharding is not None:
        return sharding.named_parameters()
    ids = {id(p) for p in loop.params}
    return {n: p for n, p in loop.model.named_parameters() if id(p) in ids}


def _dcp_load(state: dict, shards: str) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    distributed = dist.is_available() and dist.is_initialized()
    with warnings.catch_warnings():  # one process reading every shard is what is meant here, not a mistake
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        dcp.load(state, checkpoint_id=shards, no_dist=not distributed)


def load_sharded_checkpoint(loop, state: dict, opt, sched) -> tuple:
    """Load a sharded checkpoint (:meth:`ShardedTraining.save_checkpoint`) into ``loop``, ``opt`` and
    ``sched``: sharded or not, on any number of processes (each reads the parts of the shards it
    holds). Returns (step, history) like :meth:`~lrkd_fast.training.TrainingLoop.load_checkpoint`,
    which calls it for such a checkpoint."""
    from .training import CheckpointError

    where = state.get("path", "given as a dict")
    shards = _shard_dir(state)
    named = _loop_named(loop)
    saved = state["sharded"]["params"]
    missing = [n for n in named if n not in saved]
    extra = [n for n in saved if n not in named]
    if missing or extra:
        raise CheckpointError(f"checkpoint {where!r} does not fit this student: it lacks {missing[:3]} and has "
                              f"{extra[:3]} (written with other settings?)")
    for n, p in named.items():
        if list(p.shape) != list(saved[n]):
            raise CheckpointError(f"checkpoint {where!r} does not fit this student: parameter {n!r} has shape "
                                  f"{tuple(saved[n])} in the checkpoint but {tuple(p.shape)} here")
    optim = {}
    for n, layout in state["sharded"]["optimizer_state"].items():
        p = named[n]
        optim[n] = {k: torch.zeros_like(p.detach()) if v["like_param"]
                    else torch.zeros(v["shape"], dtype=getattr(torch, v["dtype"])) for k, v in layout.items()}
    target = {"params": {n: p.detach() for n, p in named.items()}, "optimizer": optim}
    with torch.no_grad():
        _dcp_load(target, shards)
    for n, p in named.items():
        if optim[n]:
            opt.state[p] = optim[n]
    groups = state["optimizer"].get("param_groups", [])
    if len(groups) != len(opt.param_groups):
        raise CheckpointError(f"checkpoint {where!r}: its optimizer has {len(groups)} parameter groups, this run "
                              f"{len(opt.param_groups)}")
    for g, s in zip(opt.param_groups, groups):
        g.update(s)
    try:
        sched.load_state_dict(state["scheduler"])
    except (ValueError, KeyError, RuntimeError) as exc:
        raise CheckpointError(f"checkpoint {where!r}: its schedule does not fit this run: {exc}") from None
    from .training import restore_data_and_rng

    return restore_data_and_rng(loop, state, where)


def load_sharded_parameters(model: nn.Module, state: dict) -> None:
    """Copy the parameters of a sharded checkpoint into the unsharded ``model`` (every parameter the
    checkpoint holds must be one of ``model``'s, with its shape); for a model that is not trained by a
    loop yet, e.g. to measure a resumed student before training goes on."""
    from .training import CheckpointError

    where = state.get("path", "given as a dict")
    shards = _shard_dir(state)
    params = dict(model.named_parameters())
    saved = state["sharded"]["params"]
    bad = [n for n in saved if n not in params or list(params[n].shape) != list(saved[n])]
    if bad:
        raise CheckpointError(f"checkpoint {where!r} does not fit this model: {bad[:3]} are not its parameters "
                              f"(with those shapes)")
    with torch.no_grad():
        _dcp_load({"params": {n: params[n].detach() for n in saved}}, shards)


def _remove_shards(path: str, keep: Optional[str] = None) -> None:
    folder = os.path.dirname(path) or "."
    stem = os.path.basename(path) + SHARD_SUFFIX
    if not os.path.isdir(folder):
        return
    for entry in os.listdir(folder):
        if entry.startswith(stem) and entry != keep:
            shutil.rmtree(os.path.join(folder, entry), ignore_errors=True)


def remove_checkpoint(path: str) -> None:
    """Remove the checkpoint ``path`` and, for a sharded one, its shard folders."""
    if os.path.exists(path):
        os.remove(path)
    _remove_shards(path)
