"""Re-planning in one process: the membership watch, and carrying out each membership decision
here (reload what a local node's new layer range needs, reconfigure the shard actors, start or
stop the head's engine and monitor). What the decision is, is `membership.decide`'s to say."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import structlog

from mlxring.aio import wait_for
from mlxring.config import Config
from mlxring.engine.draft import DraftError, DraftModel
from mlxring.engine.lifecycle import Engine
from mlxring.model.sharded import ShardModel, config_value
from mlxring.ring.loading import LoadError, ModelMeta, load_layers
from mlxring.ring.membership import CannotPlan, NewRing, convoy_stages, decide, next_in_ring
from mlxring.ring.monitor import RingMonitor
from mlxring.ring.plan import Plan
from mlxring.ring.routing import Router
from mlxring.shard.actor import Reconfigure
from mlxring.shard.compute import Compute
from mlxring.tasks import TaskScope

log = structlog.get_logger()

# A failed re-plan is tried again after RETRY_FIRST_S, doubling up to RETRY_MAX_S: soon enough to
# heal quickly once the cause is gone, seldom enough not to reload in a tight loop meanwhile.
RETRY_FIRST_S = 0.5
RETRY_MAX_S = 10.0


class Replanner:
    """This process's view of the ring (the plan, why it cannot serve) and its changes; the
    members, engine and monitor it sets are the router's, which routes by them."""

    def __init__(
        self,
        config: Config,
        router: Router,
        compute: Compute,
        tasks: TaskScope,
        live: Callable[[], tuple[str, ...]],
        memory_of: Callable[[str], int | None],
    ) -> None:
        self.config = config
        self.router = router
        self.compute = compute
        self.tasks = tasks
        self.live = live  # the nodes up now, in config order
        self.memory_of = memory_of  # a node's memory where known
        self.convoys = config.tuning.convoys
        self.meta: ModelMeta | None = None  # set before the first decision
        self.plan: Plan = []  # one range per member
        self.unavailable = "the ring has not formed yet"  # why the ring cannot serve, or ""
        self._changed = asyncio.Event()
        self._replanning = asyncio.Lock()
        self._monitoring: asyncio.Task[None] | None = None
        # `[cluster] draft_model`, loaded whole while this process is the head.
        self.draft: DraftModel | None = None

    @property
    def layout(self) -> dict[str, tuple[int, int]]:
        """Each live member's layer range."""
        return dict(zip(self.router.members, self.plan, strict=True))

    def link_changed(self, up: bool) -> None:
        """A link to another node went up or down: the watch looks again."""
        self._changed.set()

    def decide(self) -> NewRing | CannotPlan | None:
        """What the ring becomes over the nodes live now (None: it stays as it is)."""
        assert self.meta is not None
        live = self.live()
        memory = {n: m for n in live if (m := self.memory_of(n)) is not None}
        decision = decide(self.config, self.meta.info, live, self.router.members, memory)
        return decision if isinstance(decision, NewRing | CannotPlan) else None

    async def watch(self) -> None:
        """Re-plan when the live set changes and stays changed for a heartbeat (so that the
        survivors, which notice at slightly different moments, settle on the same view)."""
        settle = self.config.cluster.heartbeat_s
        while True:
            try:
                await wait_for(self._changed.wait(), settle / 2)
            except TimeoutError:
                pass
            self._changed.clear()
            live = self.live()
            if live == self.router.members:
                continue
            if self.router.engine is not None:
                self.router.engine.fail_all(f"ring membership changed: live nodes are {list(live)}")
            self.unavailable = "the ring is re-planning"
            await asyncio.sleep(settle)
            await self._replan()

    async def _replan(self) -> None:
        """Decide over the nodes live now and carry it out. An attempt that fails, for any
        cause (a file that cannot be read, a fetch, the model), is logged and shown as the
        reason the ring cannot serve, and tried again after a backoff (sooner when a link
        changes), decided anew each time: a node must never stay down after the cause is gone."""
        delay = RETRY_FIRST_S
        while True:
            try:
                decision = self.decide()
                if decision is None:  # it flapped back: nothing to re-plan
                    self.unavailable = ""
                    return
                await self.apply(decision)  # logs a CannotPlan itself
                if isinstance(decision, NewRing):
                    return
                # The live nodes cannot hold the model: what is live (or known of their
                # memory) may change without a link changing here.
                self.unavailable = f"re-plan failed: {decision.reason} (retrying in {delay:g} s)"
            except Exception as e:  # noqa: BLE001 - any failure is retried; the watch lives on
                cause = str(e) if isinstance(e, LoadError) else f"{type(e).__name__}: {e}"
                # Forgotten, so that the next attempt decides and loads every local range anew
                # (this one may have stopped halfway).
                self.plan, self.router.members = [], ()
                self.unavailable = f"re-plan failed: {cause} (retrying in {delay:g} s)"
                unexpected = None if isinstance(e, LoadError) else e
                log.error("replan_failed", error=cause, retry_s=delay, exc_info=unexpected)
            await self._backoff(delay)
            delay = min(2 * delay, RETRY_MAX_S)

    async def _backoff(self, delay: float) -> None:
        """Wait `delay` s before the next attempt, or until a link changes (a node coming back
        may be what the attempt needs) and the view settles."""
        try:
            await wait_for(self._changed.wait(), delay)
        except TimeoutError:
            return
        self._changed.clear()
        await asyncio.sleep(self.config.cluster.heartbeat_s)

    async def apply(self, decision: NewRing | CannotPlan) -> None:
        """Carry out a membership decision: reload what changed, (re)start the head."""
        async with self._replanning:
            assert self.meta is not None
            self._stop_head()
            self.unavailable = "the ring is re-planning"
            if isinstance(decision, CannotPlan):
                self.plan, self.router.members = [], ()
                self.unavailable = decision.reason
                log.error("replan_failed", live=list(decision.live), error=decision.error)
                return
            if decision.members[0] in self.router.nodes:  # the head here: its draft first
                await self._load_draft()
            elif self.draft is not None:  # no longer the head: its memory goes back
                await self.close()
                log.info("draft_model_unloaded", head=decision.members[0])
            old = self.layout
            live = self.router.members = decision.members
            self.plan = decision.plan
            log.info("ring_plan", members=list(live), plan=[list(r) for r in self.plan])
            nodes = self.router.nodes
            stages = convoy_stages(self.convoys, live, nodes)
            c = self.config.cluster
            shards: dict[str, ShardModel] = {}
            for name, node in nodes.items():
                rng = self.layout[name]
                local = next_in_ring(live, name) in nodes
                if old.get(name) == rng and node.actor.model is not None:
                    shards[name] = node.actor.model
                    node.actor.send(Reconfigure(stages=stages, next_local=local))
                    continue
                shard = shards[name] = await load_layers(
                    c.model, self.meta, name, rng, self.compute, c.allow_unverified
                )
                node.actor.send(Reconfigure(shard, stages, local))
            self.unavailable = ""
            if live[0] in nodes:
                self._start_head(live[0], shards[live[0]])
            else:
                self._stop_head()

    async def _load_draft(self) -> None:
        """The draft model, where the config names one and it is not loaded yet: refused
        (DraftError) where it cannot draft for the model, as a model that cannot be loaded."""
        spec = self.config.cluster.draft_model
        if not spec or self.draft is not None:
            return
        assert self.meta is not None
        vocab = config_value(self.meta.config, "vocab_size")
        draft = DraftModel(
            spec, vocab if isinstance(vocab, int) else None, self.config.cluster.speculative
        )
        try:
            await draft.load(self.meta.tokenizer)
        except BaseException as e:
            await draft.close(10)
            if isinstance(e, DraftError):
                raise LoadError(str(e)) from e
            raise
        log.info("draft_model_loaded", model=spec)
        self.draft = draft

    async def close(self) -> None:
        """Free the draft model's thread (its MLX streams), if this process loaded one."""
        if self.draft is not None:
            await self.draft.close(10)
            self.draft = None

    def _start_head(self, name: str, shard: ShardModel) -> None:
        """Serve from local node `name`, the ring's first: its engine, and a monitor that
        probes the ring (in the node's task group; vital: while it is down, nothing sees the
        ring fail)."""
        self._stop_head()
        assert self.meta is not None
        head = self.router.nodes[name]
        c = self.config.cluster
        engine = Engine(
            head,
            self.meta.tokenizer.eos_token_ids,
            prefill_chunk=c.prefill_chunk,
            step_timeout_s=c.request_timeout_s,
            one_convoy=self.convoys == 1,
            prompt_cache=c.prompt_cache,
            # Drafts rejected are dropped from every shard's caches: only where every layer's
            # cache can drop positions (not a sliding window's, not a linear-attention state).
            speculative=(c.speculative or self.draft is not None) and shard.trims_every_layer(),
            drafts=self.draft,
        )
        expected = tuple((n, s, e) for n, (s, e) in self.layout.items())
        monitor = RingMonitor(self.config, name, expected, head, engine.fail_all)
        self.router.engine, self.router.monitor = engine, monitor
        self._monitoring = self.tasks.start(monitor.run, "ring-monitor", vital=True)

    def _stop_head(self) -> None:
        if self.router.engine is not None:
            self.router.engine.fail_all("this node is no longer the head")
        if self._monitoring is not None:
            self._monitoring.cancel()
        self.router.engine = self.router.monitor = self._monitoring = None
