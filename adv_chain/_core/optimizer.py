"""``ChainOptimizer``: any complete chain as a real ``torch.optim.Optimizer``."""
from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping

import torch

from . import checks, guard
from .chain import Chain
from .hparams import resolve_all
from .compile import ScalarCache, layout_and_tensors, make_kernel, noise_key_tensors, tensor_scalars
from .numerics import noise_key
from .barrier import run_barrier, run_barrier_lagged
from . import distributed
from .plan import (COMPILED_PART_GROUPS, Segment, Work, accumulation_transforms, build_plan, flat_view, pipelines,
                   reduce_direction, segment_body, separate_buffers, split_work, store_materialized)
from .tags import param_tags, route_tags, with_tags
from .state import STATE_DTYPES, allocate_state, match_checkpoint, restore_saved_state, state_specs
from .transform import HostView, StateSpec, Transform

# elementwise segments run on groups of flat slices: at most PIECE elements per slice and about
# GROUP elements per group (a few MB of fp32 per state stream: resident in L2/L3 while the whole
# chain runs on it). Tuned on the 27.8M set at 1 and 2 threads (benchmarks/step_time.py).
DEFAULT_PIECE = 1 << 18
DEFAULT_GROUP = 1 << 18


class ChainOptimizer(torch.optim.Optimizer):
    """Run a complete chain (or a preset by name) as a ``torch.optim.Optimizer``.

    Args:
        params: parameters or param groups. A group may override any hyperparameter of any
            transform: the plain keys torch schedulers write (``lr``, ``betas``, ``momentum``,
            ``weight_decay``, ``eps``) or a namespaced key ``"<transform name>.<argument>"``
            (``"adam.betas"``), which wins over the plain one.
        chain: a :class:`Chain` ending in a terminal, or a preset name (``"adamw"``); extra keyword
            arguments go to the preset.
        lr: learning rate (``group["lr"]``, read at every step, so every LR scheduler works).
        compile: ``True`` (or a dict of ``torch.compile`` keyword arguments) compiles the chain's
            segment kernels; hyperparameters reach them as cached 0-d tensors, so changing ``lr``
            never recompiles. State allocation stays eager.
        state_dtype: ``"fp32"`` (default: moments in fp32 even for bf16/fp16 params) or ``"param"``
            (torch's behaviour: state in the parameter dtype).
        chunk_elems: elements per cache-sized group of an elementwise segment (tuning knob).
        nonfinite: what a NaN/inf gradient does: ``"raise"`` (default; nothing changes),
            ``"skip"`` (the step is skipped and counted in ``nonfinite_steps``) or ``"off"`` (no
            check: saves one read of the gradients and one device sync per step). See guard.py.

    ``optimizer.optimizer_accumulation = True`` (optimi's optimizer accumulation, e.g. on the
    micro-batches of gradient release but the last): a step then runs only the gradient stage and the
    moments (the step counter advances); no normalization, decay or parameter write.

    State lives in ``optimizer.state[p]`` as a flat dict with keys ``"<transform>/<key>"`` plus
    ``"step"``; ``state_dict``/``load_state_dict`` round-trip it with its declared dtypes.

    >>> import torch, adv_chain as ac
    >>> model = torch.nn.Linear(4, 2)
    >>> opt = ac.ChainOptimizer(model.parameters(), ac.chain(
    ...     ac.scale_by_adam(), ac.eps_divide(1e-8), ac.weight_decay(0.01), ac.apply()), lr=1e-3)
    >>> model(torch.randn(8, 4)).square().mean().backward()
    >>> opt.step(); opt.zero_grad()
    """

    def __init__(self, params: Iterable[Any], chain: "Chain | str" = "adamw", lr: float = 1e-3, *,
                 compile: "bool | Mapping[str, Any]" = False, state_dtype: str = "fp32",
                 chunk_elems: int = DEFAULT_GROUP, nonfinite: str = "raise", **preset_kwargs: Any) -> None:
        if isinstance(chain, str):
            from ..presets import get as get_preset
            chain = get_preset(chain, **preset_kwargs)
        elif preset_kwargs:
            raise TypeError(f"ChainOptimizer got unexpected keyword argument(s) {sorted(preset_kwargs)}; "
                            "keywords other than lr/compile/state_dtype/chunk_elems only apply to a preset name")
        if not isinstance(chain, Chain):
            raise TypeError(f"ChainOptimizer: chain must be an adv_chain Chain or a preset name, got {type(chain).__name__}")
        if not chain.is_complete:
            raise ValueError("ChainOptimizer: the chain has no terminal; end it with ac.apply(), "
                             "ac.stochastic_round_apply() or ac.kahan_apply()")
        checks.nonneg("ChainOptimizer", "lr", lr)
        checks.choice("ChainOptimizer", "state_dtype", state_dtype, STATE_DTYPES)
        self.nonfinite = nonfinite
        self.nonfinite_steps = 0
        if not isinstance(chunk_elems, int) or chunk_elems < 1024:
            raise ValueError(f"ChainOptimizer: chunk_elems={chunk_elems!r} must be an int >= 1024")
        if not (isinstance(compile, bool) or isinstance(compile, Mapping)):
            raise ValueError(f"ChainOptimizer: compile={compile!r} must be True, False or a dict of torch.compile options")
        self.chain = chain
        self.state_dtype = state_dtype
        self._group_elems = chunk_elems
        self._piece_elems = min(DEFAULT_PIECE, chunk_elems)
        #: optimi's optimizer accumulation: while True a step updates the moments only (no decay, no write)
        self.optimizer_accumulation = False
        self._plans = {False: build_plan(chain.transforms), True: build_plan(accumulation_transforms(chain.transforms))}
        self._pipelined: dict[tuple[Segment, ...], bool] = {}
        self._terminal = chain.transforms[-1]
        self._compile_options = (dict(compile) if isinstance(compile, Mapping) else {}) if compile else None
        self._kernels: dict[Any, Callable[..., Any]] = {}
        self._kernel_buffers: dict[Any, torch.Tensor] = {}  # plan.separate_buffers
        self._scalar_cache = ScalarCache()
        self._ready: set[torch.Tensor] = set()
        self._tags: dict[torch.Tensor, frozenset[str]] = {}  # read once per parameter (tags.py)
        self._validated: dict[Any, tuple[Any, Any]] = {}
        self._param_index: dict[torch.Tensor, int] = {}
        self._devices: dict[torch.Tensor, torch.device] = {}
        #: per-step results of global transforms, e.g. ``step_info["clip_by_global_norm"]["total_norm"]``
        self.step_info: dict[str, dict[str, torch.Tensor]] = {}
        defaults: dict[str, Any] = {"lr": lr}
        for t in chain.all_transforms:
            for arg, spec in t.hparams.items():
                if spec.group_key and spec.group_key not in defaults:
                    defaults[spec.group_key] = t.args[arg]
        super().__init__(params, defaults)

    # -- construction-time checks ------------------------------------------------------------------
    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        gi = len(self.param_groups) - 1
        for p in group["params"]:
            if p.is_complex():
                del self.param_groups[-1]
                raise ValueError(f"ChainOptimizer: param group {gi} holds a complex parameter of shape {tuple(p.shape)}; "
                                 "complex parameters are not supported, optimize torch.view_as_real(p) instead")
            if not p.is_floating_point():
                del self.param_groups[-1]
                raise ValueError(f"ChainOptimizer: param group {gi} holds a {p.dtype} parameter; parameters must be floating point")
        try:
            self._resolve_all(group, gi)
        except Exception:
            del self.param_groups[-1]
            raise
        for p in group["params"]:
            self._param_index.setdefault(p, len(self._param_index))

    def _resolve_all(self, group: Mapping[str, Any], gi: int) -> dict[str, dict[str, Any]]:
        """Resolved hyperparameters of every transform for one group (validated; see hparams.py)."""
        return resolve_all(self, group, gi)

    # -- state -------------------------------------------------------------------------------------
    def _tags_of(self, p: torch.Tensor, group: Mapping[str, Any]) -> frozenset[str]:
        tags = self._tags.get(p)
        if tags is None:
            tags = self._tags[p] = param_tags(p, group) | route_tags(self, p, group)
        return tags

    def _specs(self, p: torch.Tensor, hps: Mapping[str, Mapping[str, Any]], group: Any) -> dict[str, StateSpec]:
        return state_specs(self.chain.transforms, p, with_tags(hps, self._tags_of(p, group)))

    def _init_state(self, p: torch.Tensor, hps: Mapping[str, Mapping[str, Any]], group: Any) -> None:
        allocate_state(self.state[p], p, self._specs(p, hps, group), self.state_dtype)
        self._ready.add(p)

    def init_state(self) -> None:
        """Allocate every state tensor now (otherwise it happens on a parameter's first step)."""
        for gi, group in enumerate(self.param_groups):
            hps = self._resolve_all(group, gi)
            for p in group["params"]:
                if p not in self._ready:
                    self._init_state(p, hps, group)

    @property
    def nonfinite(self) -> str:
        """``"raise"``, ``"skip"`` or ``"off"``: what a NaN/inf gradient does (settable on drop-ins)."""
        return self._nonfinite

    @nonfinite.setter
    def nonfinite(self, value: str) -> None:
        self._nonfinite = checks.choice(type(self).__name__, "nonfinite", value, guard.NONFINITE)

    @property
    def _plan(self) -> tuple[Segment, ...]:
        return self._plans[bool(self.optimizer_accumulation)]

    # -- the step ----------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        works = self._collect()
        if works:
            self._run(works)
        return loss

    def _collect(self, only: tuple[torch.Tensor, int] | None = None) -> list[Work]:
        """The buckets of this step (``only``: one parameter and its group index)."""
        needs_noise = getattr(self._terminal, "needs_noise", False)
        # validate everything first: an error leaves no step counted and no state touched
        todo = []
        for gi, group in enumerate(self.param_groups):
            if only is not None and gi != only[1]:
                continue
            candidates = group["params"] if only is None else [only[0]]
            with_grad = [p for p in candidates if p.grad is not None]
            if not with_grad:
                continue
            hps = self._resolve_all(group, gi)
            for p in with_grad:
                if p.grad.is_sparse:
                    raise RuntimeError(f"ChainOptimizer: parameter {self._param_index[p]} (shape {tuple(p.shape)}, "
                                       f"group {gi}) has a sparse gradient; adv_chain supports dense gradients only")
                self._tags_of(p, group)
            todo.append((gi, with_grad, hps))
        if not guard.gradients_finite(self, todo):
            return []
        works: dict[Any, Work] = {}
        for gi, with_grad, hps in todo:
            for p in with_grad:
                if p not in self._ready:
                    self._init_state(p, hps, self.param_groups[gi])
                elif self._devices.get(p, p.device) != p.device:
                    guard.follow_device(self, p)
                self._devices[p] = p.device
            steps = [self.state[p]["step"] for p in with_grad]
            torch._foreach_add_(steps, 1.0)
            for p, s in zip(with_grad, steps):
                step = int(s)  # a CPU tensor (torch's non-capturable convention): no device sync
                tags = self._tags[p]
                key = (gi, p.device, p.dtype, step, tags)
                w = works.get(key)
                if w is None:
                    w = works[key] = Work(gi, step)
                    w.hps = with_tags(hps, tags)
                w.params.append(p)
                w.partials.append(None)
                g = p.grad
                if g.stride() != p.stride():
                    g = torch.empty_like(p, dtype=g.dtype, memory_format=torch.preserve_format).copy_(g)
                w.grads.append(g)
                w.indices.append(self._param_index[p])
        out = list(works.values())
        for w in out:
            group = self.param_groups[w.group_index]
            lr = group["lr"]
            w.scalars = {t.name: t.host_scalars(HostView(w.hps[t.name], w.step, lr)) for t in self.chain.all_transforms}
            w.states = {t.name: {} for t in self.chain.all_transforms}
            for key in self.state[w.params[0]]:
                if "/" in key:
                    tname, _, sub = key.partition("/")
                    if tname in w.states:
                        w.states[tname][sub] = [self.state[p][key] for p in w.params]
            w.noise_keys = ([noise_key(self._terminal.args["seed"], w.step, i) for i in w.indices]
                            if needs_noise else None)
        return out

    # -- gradient release / fused backward ------------------------------------------------------
    def supports_fused_back_pass(self) -> bool:
        """OneTrainer's contract: :meth:`step_parameter` may be called from backward hooks."""
        return True

    def step_parameter(self, p: torch.Tensor, group: Mapping[str, Any], i: int | None = None) -> None:
        """Run the chain on one parameter now (its gradient must be ready): the entry point of
        gradient release / fused backward (``ac.enable_gradient_release``). Elementwise and
        per-tensor chains give exactly the numbers of :meth:`step`. Transforms that reduce over many
        parameters (``clip_by_global_norm``, ``kourkoutas_beta``) work one step lagged here: each
        parameter uses the result of the last complete round of per-parameter steps."""
        gi = next((k for k, g in enumerate(self.param_groups) if g is group), None)
        if gi is None:
            raise ValueError("step_parameter: `group` is not one of this optimizer's param_groups")
        with torch.no_grad():
            works = self._collect(only=(p, gi))
            if works:
                self._run(works, lagged=True)

    def _run(self, works: list[Work], lagged: bool = False) -> None:
        if distributed.localize(works):  # FSDP2: DTensor params run on their local shards
            return distributed.run(self, works, lagged)
        plan = self._plan
        if plan not in self._pipelined:
            self._pipelined[plan] = pipelines(plan)
        if not lagged and self._pipelined[plan]:
            # per-tensor barriers only: the whole plan runs on a few tensors at a time, so the
            # direction handed across a barrier exists for those tensors only (in one reused buffer)
            pool: dict[Any, torch.Tensor] = {}
            budget = self._group_elems * (COMPILED_PART_GROUPS if self._compile_options is not None else 1)
            for w in works:
                for part in split_work(w, budget):
                    part.pool = pool
                    self._run_plan([part], lagged)
            return None
        return self._run_plan(works, lagged)

    def _run_plan(self, works: list[Work], lagged: bool) -> None:
        for si, seg in enumerate(self._plan):
            if seg.barrier is not None:
                (run_barrier_lagged if lagged else run_barrier)(self, seg.barrier, works)
            for w in works:
                if seg.whole:
                    self._run_whole(si, seg, w)
                else:
                    self._run_chunked(si, seg, w)
                if seg.materialize:
                    w.full_u, w.full_g = w.next_u, (w.next_g if w.next_g is not None else w.full_g)
                    w.next_u = w.next_g = None

    def _call(self, si: int, seg: Segment, *args: Any) -> Any:
        """Run ``segment_body`` eagerly, or through the compiled kernel for this segment and layout."""
        if not self._compiled(seg):
            return segment_body(seg.transforms, *args[:-2], seg.materialize, *args[-2:])
        layout, tensors = layout_and_tensors(*args[:-2], seg.materialize, *args[-2:])
        kernel = self._kernels.get((id(seg), layout))
        if kernel is None:
            kernel = self._kernels[(id(seg), layout)] = make_kernel(seg.transforms, layout, self._compile_options)
        return kernel(*tensors)

    def _compiled(self, seg: Segment) -> bool:
        """``compile=True`` and every transform of ``seg`` compiles. A segment that cannot (a state
        wrapper's) runs exactly as in eager mode: Python-number scalars, cache-sized slices."""
        return self._compile_options is not None and seg.compilable

    def _seg_states(self, seg: Segment, w: Work) -> dict[str, dict[str, list[torch.Tensor]]]:
        return {t.name: w.states[t.name] for t in seg.all_transforms}

    def _run_chunked(self, si: int, seg: Segment, w: Work) -> None:
        source = w.full_u if w.full_u is not None else w.grads
        owned = w.full_u is not None
        states = self._seg_states(seg, w)
        if self._compiled(seg):
            scalars = tensor_scalars(self._scalar_cache, w, seg.transforms)
            keys = noise_key_tensors(self._scalar_cache, w)
            # one call per group of same-sized tensors (the kernel loops over them), or per part of
            # a pipelined step (mixed sizes: compiled once per part layout)
            by_size: dict[int, list[tuple[int, Any, Any]]] = {}
            for i, p in enumerate(w.params):
                by_size.setdefault(0 if w.pool is not None else p.numel(), []).append((i, None, None))
            for pieces in by_size.values():
                self._run_pieces(si, seg, w, pieces, source, owned, states, scalars, keys)
            return
        pieces = []
        total = 0
        for i, p in enumerate(w.params):
            n = p.numel()
            if flat_view(p) is None or n <= self._piece_elems:
                pieces.append((i, None, None))
                total += n
            else:
                for start in range(0, n, self._piece_elems):
                    pieces.append((i, start, min(n, start + self._piece_elems)))
                    total += min(n, start + self._piece_elems) - start
                    if total >= self._group_elems:
                        self._run_pieces(si, seg, w, pieces, source, owned, states, w.scalars, w.noise_keys)
                        pieces, total = [], 0
                continue
            if total >= self._group_elems:
                self._run_pieces(si, seg, w, pieces, source, owned, states, w.scalars, w.noise_keys)
                pieces, total = [], 0
        if pieces:
            self._run_pieces(si, seg, w, pieces, source, owned, states, w.scalars, w.noise_keys)

    def _run_pieces(self, si: int, seg: Segment, w: Work, pieces: list[tuple[int, Any, Any]],
                    source: list[torch.Tensor], owned: bool, states: dict[str, dict[str, list[torch.Tensor]]],
                    scalars: dict[str, dict[str, Any]], keys: list[Any] | None) -> None:
        whole = seg.whole
        # compiled kernels take flat views (one dynamic size per call); eager ops take contiguous
        # tensors as they are (same element order, no view to build)
        flatten = self._compiled(seg)

        def cut(x: torch.Tensor, start: Any, end: Any) -> torch.Tensor:
            if x.dim() == 0:  # per-tensor scalar state: every slice sees the whole value
                return x
            if start is None:
                if whole or (not flatten and x.is_contiguous()):
                    return x
                v = flat_view(x)
                return x if v is None else v
            return flat_view(x)[start:end]

        params = [cut(w.params[i], s, e) for i, s, e in pieces]
        grads = [cut(source[i], s, e) for i, s, e in pieces]
        ref = [cut(w.full_g[i], s, e) for i, s, e in pieces] if w.full_g is not None else None
        piece_states = {tname: {k: [cut(lst[i], s, e) for i, s, e in pieces] for k, lst in d.items()}
                        for tname, d in states.items()}
        offsets = [(0 if s is None else s) + (w.dist.bases[i] if w.dist else 0) for i, s, _ in pieces]
        if any(isinstance(v, list) for d in scalars.values() for v in d.values()):
            # per-parameter results of a reduce: one entry per piece
            scalars = {tname: {k: ([v[i] for i, _, _ in pieces] if isinstance(v, list) else v) for k, v in d.items()}
                       for tname, d in scalars.items()}
        piece_keys = [keys[i] for i, _, _ in pieces] if keys is not None else None
        dest = reducer = None
        if seg.materialize:
            nxt = self._plan[si + 1].barrier
            # reduce the next barrier on these slices while they are in cache, summed per tensor
            # (a compiled kernel: in its own pass, if the reduce traces; it then writes the direction
            # straight into the buffers the next segment reads)
            if nxt is not None and nxt.additive_reduce and (not flatten or nxt.traceable_reduce):
                reducer = nxt
                if flatten:
                    if w.next_u is None:
                        w.next_u = separate_buffers(w, si, self._kernel_buffers)
                    dest = [cut(w.next_u[i], s, e) for i, s, e in pieces]
        out = self._call(si, seg, params, grads, ref, piece_states, scalars, owned, offsets, piece_keys, dest, reducer)
        if seg.materialize:
            store_materialized(w, si, pieces, cut, out)
            values = out[2]
            if nxt is not None and nxt.additive_reduce and values is None:
                values = reduce_direction(nxt, params, out[0], out[1], grads, w.states, w.scalars)
            if values is not None:
                for (i, _, _), value in zip(pieces, values):
                    w.partials[i] = value if w.partials[i] is None else w.partials[i] + value

    def _run_whole(self, si: int, seg: Segment, w: Work) -> None:
        source = w.full_u if w.full_u is not None else w.grads
        scalars, keys = w.scalars, w.noise_keys
        compiled = self._compiled(seg)
        if compiled:
            scalars = tensor_scalars(self._scalar_cache, w, seg.transforms)
            keys = noise_key_tensors(self._scalar_cache, w)
        # whole tensors, a few at a time: temporaries stay near one group's size (compiled: one call
        # per group of same-sized tensors, as in _run_chunked)
        batches: dict[Any, list[tuple[int, Any, Any]]] = {}
        total = 0
        for i, p in enumerate(w.params):
            key = p.numel() if compiled else total // self._group_elems
            batches.setdefault(key, []).append((i, None, None))
            total += p.numel()
        for pieces in batches.values():
            self._run_pieces(si, seg, w, pieces, source, w.full_u is not None, self._seg_states(seg, w), scalars, keys)

    # -- checkpoints -------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True) -> None:
        """Load a ``state_dict``; state tensors keep their saved dtypes (fp32 moments stay fp32 with
        bf16 params, integer state stays integer). A checkpoint from a different chain raises a
        ``ValueError`` listing the differing keys; ``strict=False`` loads the keys both chains share
        and initializes the rest on the next step."""
        def expected_keys(p: torch.Tensor, group: Mapping[str, Any], gi: int) -> set[str]:
            return set(self._specs(p, self._resolve_all(group, gi), group)) | {"step"}

        kept, id_to_param = match_checkpoint(state_dict, self.param_groups, expected_keys, strict)
        super().load_state_dict({**state_dict, "state": kept})
        restore_saved_state(self.state, kept, id_to_param)
        self._ready.clear()
        self._scalar_cache.clear()
        self._validated.clear()

    def __repr__(self) -> str:
        return f"ChainOptimizer(lr={self.defaults['lr']}, chain={self.chain!r})"
