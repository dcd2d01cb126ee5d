"""The per-step, per-layer selection decision: what each layer attends and what must be fetched.

``SelectionPlanner`` is the one object that decides residency of selected tokens. The backend
calls ``begin_step`` before layer 0 and ``at_layer`` when a layer's query is known, and issues
the ``LayerFetch`` orders it gets back; the policy only scores. Per step:

- Layers whose candidates all fit in their budget (dense layers always; every layer while the
  sequence is short) take every candidate: the bank's slots hold them in order, so the new ones
  are appended for all those layers at once in ``begin_step`` (no scoring, no top-k, no search).
- On a prediction step (every ``interval`` steps), a predictive policy's producer scores the
  layers it serves in one batched call, the selector takes top-k for all of them in one call and
  the residency map updates their rows in one call; their copies start right away, ahead of
  their attention. Query-aware policies score at the layer's own attention time.
- Between prediction steps the selection is reused and nothing is fetched; the window advances,
  except in ``refresh`` layers, which select afresh at every step (their producers plan only them).

Nothing here reads a device value back to the host: every size it needs (candidates, slots in
use) is arithmetic on positions.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from .. import native
from ..errors import ConfigError
from .ranking import HeldTerms, favour_held, held_terms
from .residency import FetchPlan
from .scores import GroupScores, NativeScoring
from .selector import Candidates, Selector

if TYPE_CHECKING:  # pragma: no cover
    from ..cpu_cache.working_set import Bank, WorkingSet


class DeferredPlan:
    """A producer group's fetch plan, made by the first to ask for it: the copy thread, which runs the
    selection (``ResidencyMap.prepare_select``) ahead of the first layer's copies while the model goes on."""

    def __init__(self, make: Callable[[], FetchPlan]):
        self._make: Callable[[], FetchPlan] | None = make
        self._plan: FetchPlan | None = None
        self._error: BaseException | None = None
        self._lock = threading.Lock()

    def result(self) -> FetchPlan:
        """The plan, made at the first call; a failure is raised to every caller, never retried (the
        first attempt may have written part of the rows)."""
        with self._lock:
            if self._make is not None:
                make, self._make = self._make, None
                try:
                    self._plan = make()
                except BaseException as error:
                    self._error = error
            if self._error is not None:
                raise self._error
            return self._plan


@dataclass(frozen=True, slots=True)
class DeferredRows:
    """Rows ``[start, stop)`` of a ``DeferredPlan``: one layer's part, known once the plan is made."""

    source: DeferredPlan
    start: int
    stop: int

    def resolve(self) -> FetchPlan:
        return self.source.result().rows(self.start, self.stop)


@dataclass(slots=True)
class LayerFetch:
    """Copies for one layer: ``plan`` rows are its KV heads (``[KvH, m]``); a ``DeferredRows`` where the
    selection itself is left to the copy thread (``SelectionPlanner.defer``)."""

    layer: int
    plan: FetchPlan | DeferredRows


@dataclass(slots=True)
class Orders:
    """What to issue now: per-layer fetches, and how many fragments they move.

    ``moved`` is a Python int when the count is known on the host, else a 0-d device tensor; it counts the
    fragments a selection already copied too (``SelectionPlanner.row_copies``), and ``copied_seconds`` the time
    that copying took inside the selection (measured where the backend asked for it).
    """

    fetches: list[LayerFetch]
    moved: int | torch.Tensor = 0
    copied_seconds: float = 0.0


NOTHING = Orders([], 0)


class NativeProducer:
    """A producer's whole selection at a prediction step in one native call (with a copy thread, two: its queries
    now, the rest on the thread): the policy's query network (``NativeScoring.network``), then scores, top-k and
    residency update of every layer it serves (the bank's ``ResidencyMap.bind_select``, bound here once), and
    with the backend's ``row_copies`` the copies of what it places. The step's conditions are the map's
    (``accepts``), as for ``prepare_select``; what this adds is the query network and the rows' binding without
    the ~60 Python operations of ``plan(..., describe=True)`` and ``prepare_select`` (the same selections:
    tests/test_selection_planner.py, tests/test_selection_copies.py). In the engine on the CPU those cost about as much as the kernels
    (profiled at 3k-8k tokens): Python's data is out of the caches after the model's matrix products."""

    def __init__(self, scoring: NativeScoring, bank: "Bank", bound: "native.BoundSelectRows"):
        self.layers = list(scoring.layers)
        self.bank, self.bound, self.scoring = bank, bound, scoring
        self.network = scoring.network if bound.network is not None else None  # the selection runs the network
        self.held: HeldTerms | None = None  # the top-k's hysteresis (SelectionPlanner.held)

    @property
    def copies(self) -> "native.RowCopies | None":
        """The copies the selection makes as it places its rows, or None (the backend gathers them)."""
        return self.bound.copies

    @classmethod
    def bind(cls, scoring: NativeScoring, bank: "Bank", copies: "native.RowCopies | None" = None,
             network: bool = False) -> "NativeProducer | None":
        """Bound to the rows of ``scoring``'s layers in ``bank`` (copying what it places with ``copies``; with
        ``network``, running the policy's query network in the same call where it offers one), or None where the
        map binds none."""
        step = scoring.network if network else None
        mlp = step.current() if step is not None else None
        bound = cls._bind(scoring, bank, copies, mlp)
        return None if bound is None else cls(scoring, bank, bound)

    @staticmethod
    def _bind(scoring: NativeScoring, bank: "Bank", copies: "native.RowCopies | None",
              mlp: "native.BoundQueryMLP | None") -> "native.BoundSelectRows | None":
        runs = None
        if mlp is not None:
            runs = native.QueryNetwork(mlp, scoring.network.scale, len(scoring.layers) * bank.kv_heads,
                                       scoring.keys.shape[1])
        return bank.residency.bind_select(bank.rows(scoring.layers), scoring.keys, scoring.reduction, scoring.scales,
                                          scoring.pages, copies, runs, scoring.reweight)

    def plan(self, x: torch.Tensor, candidates: "Candidates") -> Callable[[], FetchPlan] | None:
        """The queries now and the selection returned, to be made now or on the copy thread; None (nothing
        computed) where the map does not take this step (the general path selects)."""
        c, residency, network = candidates, self.bank.residency, self.network
        keep = min(c.keep, c.count)
        if not residency.accepts(self.bound, c.position, c.lo, c.hi, keep):
            return None
        if network is None:
            return residency.prepare_bound(self.bound, self.scoring.queries(x, c.position), c.position, c.lo, c.hi, keep,
                                           held=self.held)
        if x.dim() != 1:  # (the query network's native form takes one token's [E]; the general path the rest)
            return None
        mlp = network.current()
        if mlp is not self.bound.network.mlp:  # a predictor parameter was replaced: bound again to the new weights
            bound = self._bind(self.scoring, self.bank, self.bound.copies, mlp)
            if bound is None or bound.network is None:
                return None
            self.bound = bound
        network.before(c.position, self.bound.network.raw)
        if x.dtype is not torch.float32 or not x.is_contiguous():
            x = x.to(torch.float32).contiguous()
        return residency.prepare_bound(self.bound, None, c.position, c.lo, c.hi, keep, x, held=self.held)


class SelectionPlanner:
    """Drives a policy through the selector and the working set's residency maps.

    ``batched=False`` scores, selects and updates one layer at a time (the reference the batched
    path is tested against). ``defer``: selections the residency map makes in one native call are
    handed to the backend as ``DeferredRows``, to be made on the copy thread ahead of their copies.
    """

    def __init__(self, selector: Selector, policy, working_set: "WorkingSet", interval: int, batched: bool = True,
                 refresh: frozenset[int] = frozenset()):
        self.selector, self.policy, self.ws = selector, policy, working_set
        self.interval, self.batched = interval, batched
        self.defer = False  # set by a backend whose copies run on a copy thread
        # set by a backend that lets a producer's one-call selection copy what it places (the CPU, no copy thread):
        # layers -> the RowCopies of their rows, or None
        self.row_copies: Callable[[list[int]], "native.RowCopies | None"] | None = None
        self.refresh = refresh if interval > 1 else frozenset()  # layers selected at every step
        self.dense = selector.dense_layers
        self.local = selector.local_layers  # sliding-window layers: never selected for
        # the top-k's hysteresis: a token held in a slot keeps it unless a newcomer beats it by --keep-bonus
        # (a policy whose scores are not one scale applies it itself, each stage on its scale: keeps_held)
        bonus = selector.config.keep_bonus
        keeps_held = getattr(policy, "keeps_held", None)
        if keeps_held is not None and keeps_held(self._held_of if bonus else None, bonus):
            self.held = None
        else:
            self.held = policy_held_terms(bonus, policy)
        self._selection_steps = 0  # steps since selection (not "take everything") began
        self._predict = False
        self._refreshing = False  # a step between predictions on which the refresh layers select
        self._taken_all: set[int] = set()  # layers that attend every candidate this step
        self._planned: set[int] = set()
        self.candidates: Candidates | None = None  # of the layers that select, this step
        self.position = 0
        self._candidate_count = 0
        self.attends_everything = True  # this step every layer attends every token (no layer selects)
        self.notes: list[str] = []
        self._native: dict[int, NativeProducer | None] = {}  # producer -> its bound selection, where it has one

    def reset(self) -> None:
        """Start over, as for a new sequence (after the backend rewound its working set)."""
        self._selection_steps, self._predict, self._refreshing = 0, False, False
        self._taken_all.clear()
        self._planned.clear()
        self._native.clear()
        for bank in self.ws.banks if self.ws is not None else ():
            bank.residency.unbind()  # its bound selections hold the policy's compact keys
        self.candidates, self.position, self.attends_everything, self.notes = None, 0, True, []
        self._candidate_count = 0

    # ------------------------------------------------------------------------------ per step
    def begin_step(self, position: int) -> Orders:
        """Bookkeeping before layer 0; returns the appends of every layer that takes all."""
        self.ws.begin_step(position, self.selector.window(position + 1))
        self.position = position
        self._candidate_count = self.selector.candidates(0, position).count  # (only keep differs by layer)
        self._planned.clear()
        self._taken_all.clear()
        self._note_floor(position + 1)
        orders = Orders([])
        selecting = False
        for bank in self.ws.banks:
            candidates = self.selector.candidates(bank.layers[0], position)
            if candidates.fits and bank.residency.appending:
                self._append(bank, candidates, orders)
            elif bank.layers[0] not in self.dense:
                self.candidates, selecting = candidates, True
        self.attends_everything = not selecting
        # a share budget still below the floor keeps no candidate: the selecting layers attend their sinks
        # and window, and nothing is scored until the share grows past them (the first step that keeps
        # one predicts, whatever the interval)
        choosing = selecting and self.candidates.keep > 0
        self._predict = choosing and self._selection_steps % self.interval == 0
        # the first selecting step predicts for every layer; after it the refresh layers select every step
        self._refreshing = choosing and not self._predict and bool(self.refresh)
        self._selection_steps += int(choosing)
        if self._predict and self.batched:
            self._select_fixed(orders)
        return orders

    def _select_fixed(self, orders: Orders) -> None:
        """A policy whose selection needs no scores (recency) selects for every layer now, in one update.

        The neighbour rules add positions after selected ones, so they add nothing to a suffix of
        the candidates; the selection is taken as it is.
        """
        fixed = self.policy.fixed_selection(self.candidates)
        if fixed is None:
            return
        for bank in self.ws.banks:
            layers = [layer for layer in bank.layers if layer not in self._taken_all and layer not in self.dense]
            for run in bank.adjacent_runs(layers) if layers else []:
                plan = bank.residency.update(fixed.expand(len(run) * bank.kv_heads, -1), bank.rows(run))
                _emit(bank, run, plan, orders)
                self._planned.update(run)

    def _append(self, bank: "Bank", candidates: Candidates, orders: Orders) -> None:
        self._taken_all.update(bank.layers)
        plan = bank.residency.append(candidates.lo, candidates.hi)
        if plan is not None:
            _emit(bank, bank.layers, plan, orders, moved=plan.width * plan.positions.shape[0])

    def _note_floor(self, length: int) -> None:
        if not self.notes and self.selector.below_floor(length):
            budget, floor = self.selector.config.budget, self.selector.floor
            self.notes.append(
                f"--budget {budget} of {length} tokens is {budget.tokens_for(length)} tokens, below --sinks + "
                f"the narrowest window = {floor}: the selected layers attend their sinks and window "
                f"({min(length, floor)} tokens) until the share grows past them."
            )

    # ----------------------------------------------------------------------------- per layer
    def at_layer(self, layer: int, x: torch.Tensor, q: torch.Tensor) -> Orders:
        """Orders to issue once ``layer``'s query is known. x ``[E]``, q ``[H, D]``."""
        if not (self._predict or self._refreshing):
            return NOTHING
        orders = Orders([])
        if self.policy.plans_ahead and self.policy.is_producer(layer):
            self._plan_ahead(layer, x, orders)
        if layer not in self._taken_all and layer not in self._planned and layer not in self.dense \
                and layer not in self.local and self._selects_now(layer):
            scores = self.policy.score(layer, q, self.candidates)  # [KvH, n]
            self._select([layer], scores.unsqueeze(0), orders)
        return orders

    def _plan_ahead(self, producer: int, x: torch.Tensor, orders: Orders) -> None:
        """A producer scores the layers it serves and their copies start now."""
        wanted = [layer for layer in self.policy.served_by(producer) if layer not in self.dense
                  and layer not in self.local and layer not in self._taken_all and self._selects_now(layer)]
        if not wanted:
            return
        fast = self._native_producer(producer)
        run = fast.plan(x, self.candidates) if fast is not None and wanted == fast.layers else None
        if run is not None:
            if fast.copies is not None:  # selected and copied in one call: nothing left to issue but the count
                plan = run()
                orders.moved = orders.moved + sum(plan.counts.tolist())
                orders.copied_seconds += fast.copies.take_seconds()
            else:
                self._emit_run(fast.bank, wanted, run, orders)
            self._planned.update(wanted)
            return
        # only the layers that select now (on a refresh step, the refresh layers): range, [Lg, KvH, n]
        # (or their GroupScores, which the residency map may score, rank and place in one call)
        layers, scores = self.policy.plan(producer, x, self.candidates, range(wanted[0], wanted[-1] + 1),
                                          describe=self.batched)
        if self.batched:
            bank = self.ws.bank_of[wanted[0]]
            for run in bank.adjacent_runs(wanted):  # one run unless the group skips layers of the bank
                first = run[0] - layers.start
                if isinstance(scores, GroupScores):
                    self._select_described(run, scores.layers(first, len(run)), orders)
                else:
                    self._select(run, scores[first : first + len(run)], orders)
        else:
            for layer in wanted:
                self._select([layer], self.policy.score(layer, None, self.candidates).unsqueeze(0), orders)
        self._planned.update(wanted)

    def _native_producer(self, producer: int) -> NativeProducer | None:
        """The producer's bound native selection (made at its first prediction step), or None where the
        general path must select: the reference path (``batched=False``), a neighbour rule, a policy without
        ``native_scoring``, layers that are dense, local or not next to each other in one host bank."""
        if producer in self._native:
            return self._native[producer]
        fast = None
        ready = self.batched and self.selector.plain_topk and native.kernels() is not None
        scoring = self.policy.native_scoring(producer) if ready else None
        layers = list(scoring.layers) if scoring is not None else []
        if (layers and not set(layers) & (self.dense | self.local)
                and all(layer in self.ws.bank_of for layer in layers)):
            bank = self.ws.bank_of[layers[0]]
            if all(self.ws.bank_of[layer] is bank for layer in layers) and len(bank.adjacent_runs(layers)) == 1:
                copies = self.row_copies(layers) if self.row_copies is not None and not self.defer else None
                # the query network in the same call, except where the call is made later, on the copy thread
                fast = NativeProducer.bind(scoring, bank, copies, network=not self.defer)
                if fast is not None:
                    fast.held = self.held
        self._native[producer] = fast
        return fast

    def _selects_now(self, layer: int) -> bool:
        """Whether ``layer`` selects at this step: every layer on a prediction step, else the refresh ones."""
        return self._predict or layer in self.refresh

    def _select_described(self, layers: list[int], scores: GroupScores, orders: Orders) -> None:
        """``_select`` of described scores: scored, ranked and placed by the residency map in one call
        where the selector keeps a plain top-k (no neighbour rule), else computed and selected as usual."""
        bank = self.ws.bank_of[layers[0]]
        run = None
        if self.selector.plain_topk:
            keep = min(self.candidates.keep, self.candidates.count)
            run = bank.residency.prepare_select(scores, keep, bank.rows(layers), self.held)
        if run is None:
            self._select(layers, scores.compute(), orders)
        else:
            self._emit_run(bank, layers, run, orders)

    def _emit_run(self, bank: "Bank", layers: list[int], run: Callable[[], FetchPlan], orders: Orders) -> None:
        """The orders of a selection made by ``run``: now, or by the copy thread ahead of its copies."""
        if self.defer:  # the copy thread selects, then copies; what moved it counts itself
            deferred, heads = DeferredPlan(run), bank.kv_heads
            orders.fetches += [LayerFetch(layer, DeferredRows(deferred, i * heads, (i + 1) * heads))
                               for i, layer in enumerate(layers)]
        else:
            plan = run()
            _emit(bank, layers, plan, orders, moved=sum(plan.counts.tolist()))  # host counts: no tensor op

    def _select(self, layers: list[int], scores: torch.Tensor, orders: Orders) -> None:
        """Top-k of ``scores [Lg, KvH, n]`` for consecutive ``layers`` of one bank, one residency update."""
        bank = self.ws.bank_of[layers[0]]
        if self.held is not None:
            c = self.candidates
            held = bank.residency.held(bank.rows(layers), c.lo, c.hi).view(scores.shape)
            scores = favour_held(scores, held, self.held)
        chosen = self.selector.select(scores, self.candidates, bank.num_slots)  # [Lg, KvH, k]
        _emit(bank, layers, bank.residency.update(chosen.flatten(0, 1), bank.rows(layers)), orders)

    def _held_of(self, layers: range, candidates: Candidates) -> torch.Tensor:
        """Which candidates of ``layers`` are in a device slot: bool ``[Lg, KvH, n]`` (a layer with no residency
        rows, dense or local, holds none). The policy that applies the keep bonus itself asks (``keeps_held``)."""
        held = []
        for layer in layers:
            bank = self.ws.bank_of.get(layer)
            if bank is None:
                held.append(torch.zeros((self.ws.banks[0].kv_heads, candidates.count), dtype=torch.bool,
                                        device=self.ws.banks[0].residency.slot_of.device))
            else:
                held.append(bank.residency.held(bank.rows([layer]), candidates.lo, candidates.hi))
        return torch.stack(held)

    # ------------------------------------------------------------------------------ queries
    def used_slots(self, layer: int) -> int:
        """Selected slots ``layer`` may hold this step: the filled prefix bound, host arithmetic only (the
        candidates' count is every layer's alike: made once a step, in ``begin_step``)."""
        return min(self.ws.bank_of[layer].num_slots, self._candidate_count)


def policy_held_terms(bonus: float, policy) -> HeldTerms | None:
    """The top-k's hysteresis of ``--keep-bonus`` for a prepared policy's scores (``held_terms`` by its
    ``score_kind``, "logit" where it names none), or None for 0. Refused where it does not apply by
    ``check_keep_bonus``, which ``sized_policy`` (and before it the engine's construction) has run."""
    return held_terms(bonus, getattr(policy, "score_kind", "logit"))


def check_keep_bonus(bonus: float, policy) -> None:
    """Refuse a keep bonus where it would not do what it says (``keep_bonus_refusal``; a wrapper such as
    critical(...) by what it wraps)."""
    while getattr(policy, "wraps", False):
        policy = policy.base
    refusal = keep_bonus_refusal(bonus, getattr(policy, "name", ""), getattr(policy, "prefilter", None) is not None)
    if refusal is not None:
        raise ConfigError(refusal)


def keep_bonus_refusal(bonus: float, policy_name: str, prefiltered: bool) -> str | None:
    """Why a keep bonus cannot go with this policy, or None: a policy that ranks no tokens by score (streaming,
    dense: nothing to raise), a page prefilter (it ranks pages before any token's bonus could apply).
    ``policy_name``: the policy that scores, a wrapper's base (``critical(tokenbutler)``: tokenbutler; the wrapper
    takes the bonus on each of its stages)."""
    if not bonus:
        return None
    if policy_name in UNSCORED_POLICIES:
        return (f"--keep-bonus raises the scores of tokens already on the device; --policy {policy_name} ranks no "
                "tokens by score: drop --keep-bonus.")
    if prefiltered:
        return ("--keep-bonus does not combine with tokenbutler's page prefilter (the prefilter ranks pages before "
                "any token's bonus applies): drop one of them.")
    return None


UNSCORED_POLICIES = ("streaming", "dense")  # policies whose selection no score decides


def _emit(bank: "Bank", layers: list[int], plan: FetchPlan, orders: Orders, moved: int | None = None) -> None:
    """Split a plan over consecutive ``layers`` of ``bank`` into per-layer fetches; count its fragments
    (``moved`` when known on the host, else the plan's counts, on the device)."""
    heads = bank.kv_heads
    orders.fetches += [LayerFetch(layer, plan.rows(i * heads, (i + 1) * heads)) for i, layer in enumerate(layers)]
    orders.moved = orders.moved + (plan.counts.sum() if moved is None else moved)
