"""Model-based test: every backend behaves exactly like the memory reference model.

A Hypothesis state machine drives the memory backend and one other backend with the same
random sequence of operations (enqueue, lease with limit/per_key, ack, nack with or without
delay or dead, extend and extend_many, release_many, pause/resume, intervals, weights, replay,
schedules (create or replace, fire, pause, resume, remove), cancel and get by id and by ref
(refs drawn on enqueue, shared by several messages), time passing on both fake clocks)
under random queue settings (backpressure limits included: an enqueue refused with
QueueFull must be refused by both, naming the same key and limit), and after every step checks that both delivered the same
payloads in the same order with the same attempts, refused the same stale leases, and
report equal stats and dead letters. Message ids differ between backends, so they are
mapped through payloads, which are unique.
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Callable

import pytest
from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import (
    Bundle,
    RuleBasedStateMachine,
    initialize,
    invariant,
    multiple,
    precondition,
    rule,
    run_state_machine_as_test,
)

import sharded_broker
from sharded_broker import Broker, Lease, Message, QueueFull
from sharded_broker.models import DROPPED_REASON
from support.backends import FakeClock

Q = "q"
KEYS = st.sampled_from(["a", "b", "c", None])
PRIORITIES = st.sampled_from([0, 0, 0, 1, 2])
DELAYS = st.sampled_from([0.0, 0.0, 0.0, 2.0, 7.0])
DEDUP_IDS = st.sampled_from([None, None, None, None, "d1", "d2"])
REFS = st.sampled_from([None, None, "r1", "r2"])
TIMEOUTS = st.sampled_from([5.0, 20.0])
SCHEDULE_NAMES = st.sampled_from(["s1", "s2"])
SCHEDULE_SPECS = st.sampled_from([{"every": 5.0}, {"every": 12.0}, {"cron": "* * * * *"}])

_stores = itertools.count()


def lease_view(lease: Lease) -> tuple:
    """What two backends must agree on for one lease (ids, tokens and batch ids differ)."""
    return (
        lease.payload, lease.key, lease.priority, lease.attempts, round(lease.deadline, 3), round(lease.enqueued_at, 3),
        lease.ref,
    )


def batches_view(leases: list[Lease]) -> list[list[bytes]]:
    """Which payloads share a batch, in order."""
    groups: dict[str, list[bytes]] = {}
    for lease in leases:
        groups.setdefault(lease.batch_id, []).append(lease.payload)
    return list(groups.values())


def schedule_view(s: sharded_broker.Schedule) -> tuple:
    last = None if s.last_fired is None else round(s.last_fired, 3)
    return (s.name, s.payload, s.key, s.spec, round(s.next_due, 3), s.paused, last, s.fired)


class SameAsModel(RuleBasedStateMachine):
    """Compares the backend opened by ``open_other`` with a memory model.

    Each side has two connections to its store, and a rule switches which one the next
    operations use: a lease taken on one connection is settled on the other, as when
    workers and producers live in different processes.
    """

    open_other: Callable[[FakeClock, dict, bool], Broker]

    leases = Bundle("leases")

    def __init__(self) -> None:
        super().__init__()
        self.model_clock = FakeClock()
        self.other_clock = FakeClock()
        self.payloads = itertools.count()
        self.model: Broker | None = None
        self.other: Broker | None = None
        self.connections: list[tuple[Broker, Broker]] = []
        # Payload of each id, per backend: how a duplicate's answer is compared.
        self.model_ids: dict[str, bytes] = {}
        self.other_ids: dict[str, bytes] = {}
        # (model id, other id) of each message stored, by payload: what cancel and get name.
        self.stored: dict[bytes, tuple[str, str]] = {}

    @initialize(
        retry_position=st.sampled_from(["head", "head", "tail"]),
        key_concurrency=st.sampled_from([1, 1, 2]),
        interval=st.sampled_from([0.0, 0.0, 3.0]),
        max_deliveries=st.sampled_from([2, 3, None]),
        unique_while_pending=st.booleans(),
        max_pending_per_key=st.sampled_from([None, None, 1, 2, 3]),
        max_pending=st.sampled_from([None, None, None, 6]),
        on_full=st.sampled_from(["reject", "drop_oldest", "replace"]),
    )
    def open_brokers(self, **options) -> None:
        options["dedup_window"] = 10.0
        model_url = f"memory://model-{next(_stores)}"
        for fresh in (True, False):
            self.connections.append((
                sharded_broker.connect(model_url, clock=self.model_clock, **options),
                self.open_other(self.other_clock, options, fresh),
            ))
        self.model, self.other = self.connections[0]
        for pair in self.connections:
            for broker in pair:
                # A lease's look at the schedules goes by real time: on both sides only
                # each connection's first lease looks, so they stay in step; the
                # fire_schedules rule fires them.
                broker.schedule_check_interval = 1e9

    def teardown(self) -> None:
        for pair in self.connections:
            for broker in pair:
                broker.close()

    @rule(index=st.sampled_from([0, 1]))
    def switch_connection(self, index) -> None:
        self.model, self.other = self.connections[index]

    # -- operations ---------------------------------------------------------------------

    def _new_payload(self) -> bytes:
        return f"m{next(self.payloads)}".encode()

    def _compare_ids(self, model_ids: list[str], other_ids: list[str], payloads: list[bytes]) -> None:
        for model_id, other_id, payload in zip(model_ids, other_ids, payloads, strict=True):
            self.model_ids.setdefault(model_id, payload)
            self.other_ids.setdefault(other_id, payload)
            # Both stored the message, or both answered with the same earlier message.
            assert self.model_ids[model_id] == self.other_ids[other_id]
            if self.model_ids[model_id] == payload:
                self.stored[payload] = (model_id, other_id)

    @staticmethod
    def _enqueued(call: Callable[[], list[str]]) -> list[str] | tuple:
        """The ids ``call`` answers, or what a QueueFull it raised names."""
        try:
            return call()
        except QueueFull as full:
            return ("full", full.key, full.setting, full.limit, full.note)

    def _enqueue_both(self, model_call: Callable[[], list[str]], other_call: Callable[[], list[str]], payloads: list[bytes]) -> None:
        model, other = self._enqueued(model_call), self._enqueued(other_call)
        if isinstance(model, tuple) or isinstance(other, tuple):
            assert other == model  # both refused the call, for the same reason
            return
        self._compare_ids(model, other, payloads)

    @rule(key=KEYS, priority=PRIORITIES, delay=DELAYS, at_head=st.booleans(), dedup_id=DEDUP_IDS, ref=REFS)
    def enqueue(self, key, priority, delay, at_head, dedup_id, ref) -> None:
        payload = self._new_payload()
        options = dict(key=key, priority=priority, delay=delay, at_head=at_head, dedup_id=dedup_id, ref=ref)
        self._enqueue_both(
            lambda: [self.model.enqueue(Q, payload, **options)], lambda: [self.other.enqueue(Q, payload, **options)],
            [payload],
        )

    @rule(specs=st.lists(
        st.tuples(KEYS, PRIORITIES, DELAYS, DEDUP_IDS, st.sampled_from([False, False, True]), REFS),
        min_size=1, max_size=4,
    ))
    def enqueue_many(self, specs) -> None:
        messages = [
            Message(
                self._new_payload(), key=key, priority=priority, delay=delay, dedup_id=dedup_id, at_head=at_head,
                ref=ref,
            )
            for key, priority, delay, dedup_id, at_head, ref in specs
        ]
        self._enqueue_both(
            lambda: self.model.enqueue_many(Q, messages),
            lambda: self.other.enqueue_many(Q, messages),
            [m.payload for m in messages],
        )

    @rule(target=leases, limit=st.integers(1, 4), per_key=st.sampled_from([1, 1, 2, 3]), timeout=TIMEOUTS)
    def lease(self, limit, per_key, timeout):
        model = self.model.lease(Q, limit, per_key=per_key, visibility_timeout=timeout)
        other = self.other.lease(Q, limit, per_key=per_key, visibility_timeout=timeout)
        assert [lease_view(x) for x in other] == [lease_view(x) for x in model]
        assert batches_view(other) == batches_view(model)
        return multiple(*zip(model, other))

    @rule(pair=leases)
    def ack(self, pair) -> None:
        model, other = pair
        assert self.other.ack(other) == self.model.ack(model)

    @rule(pairs=st.lists(leases, min_size=1, max_size=3))
    def ack_many(self, pairs) -> None:
        model = self.model.ack_many([m for m, _ in pairs])
        assert self.other.ack_many([o for _, o in pairs]) == model

    @rule(pair=leases, delay=st.sampled_from([0.0, 0.0, 3.0]), dead=st.booleans(),
          reason=st.sampled_from([None, "boom"]))
    def nack(self, pair, delay, dead, reason) -> None:
        model, other = pair
        assert self.other.nack(other, delay=delay, dead=dead, reason=reason) == self.model.nack(
            model, delay=delay, dead=dead, reason=reason
        )

    @rule(pair=leases, timeout=TIMEOUTS)
    def extend(self, pair, timeout) -> None:
        model, other = pair
        assert self.other.extend(other, timeout) == self.model.extend(model, timeout)
        assert round(other.deadline, 3) == round(model.deadline, 3)

    @rule(pairs=st.lists(leases, min_size=1, max_size=3), timeout=TIMEOUTS)
    def extend_many(self, pairs, timeout) -> None:
        model = self.model.extend_many([m for m, _ in pairs], timeout)
        assert self.other.extend_many([o for _, o in pairs], timeout) == model
        assert [round(o.deadline, 3) for _, o in pairs] == [round(m.deadline, 3) for m, _ in pairs]

    @rule(pairs=st.lists(leases, min_size=1, max_size=3))
    def release_many(self, pairs) -> None:
        model = self.model.release_many([m for m, _ in pairs])
        assert self.other.release_many([o for _, o in pairs]) == model

    @rule(seconds=st.sampled_from([0.001, 0.5, 1.0, 2.5, 6.0, 21.0]))
    def time_passes(self, seconds) -> None:
        self.model_clock.advance(seconds)
        self.other_clock.advance(seconds)

    @rule(key=st.sampled_from(["a", "b", None]), paused=st.booleans())
    def pause_or_resume(self, key, paused) -> None:
        for broker in (self.model, self.other):
            (broker.pause if paused else broker.resume)(Q, key=key)

    @rule(key=st.sampled_from(["a", "b"]), seconds=st.sampled_from([None, 0.0, 4.0]))
    def set_interval(self, key, seconds) -> None:
        for broker in (self.model, self.other):
            broker.set_interval(Q, key, seconds)

    @rule(key=st.sampled_from(["a", "b", "c"]), weight=st.sampled_from([None, 1, 2, 3]))
    def set_weight(self, key, weight) -> None:
        for broker in (self.model, self.other):
            broker.set_weight(Q, key, weight)

    @rule(position=st.sampled_from(["head", "tail"]), first_only=st.booleans())
    def replay(self, position, first_only) -> None:
        if first_only:
            model_dead = self.model.dead_letters(Q, limit=1)
            other_dead = self.other.dead_letters(Q, limit=1)
            assert [d.payload for d in other_dead] == [d.payload for d in model_dead]
            model = self.model.replay(Q, [d.id for d in model_dead], position=position)
            other = self.other.replay(Q, [d.id for d in other_dead], position=position)
        else:
            model = self.model.replay(Q, position=position)
            other = self.other.replay(Q, position=position)
        assert other == model

    @rule(name=SCHEDULE_NAMES, spec=SCHEDULE_SPECS, key=st.sampled_from(["a", None]))
    def schedule(self, name, spec, key) -> None:
        payload = self._new_payload()
        views = [schedule_view(broker.schedule(Q, name, payload, key=key, **spec)) for broker in (self.model, self.other)]
        assert views[1] == views[0]

    @rule()
    def fire_schedules(self) -> None:
        # What is due, earliest first and ties by name, on every backend: the fired
        # messages take their seqs in this order.
        # A due schedule whose key (or queue) is at a backpressure limit does not fire
        # (it fires at a later look): the fired ones are a subsequence of the due ones.
        payloads = [due.payload for due in self.model.backend.due_schedules(Q, 100)[1]]
        model = self.model.fire_due_schedules(Q)
        other = self.other.fire_due_schedules(Q)
        assert len(other) == len(model) <= len(payloads)
        fired = [self.model.backend._store.queues[Q].messages[mid].payload for mid in model]
        remaining = iter(payloads)
        assert all(payload in remaining for payload in fired), (fired, payloads)
        self._compare_ids(model, other, fired)

    @rule(name=SCHEDULE_NAMES, action=st.sampled_from(["pause", "resume", "remove"]))
    def change_schedule(self, name, action) -> None:
        answers = []
        for broker in (self.model, self.other):
            try:
                if action == "remove":
                    answers.append(broker.unschedule(Q, name))
                else:
                    (broker.pause_schedule if action == "pause" else broker.resume_schedule)(Q, name)
                    answers.append(None)
            except sharded_broker.InvalidArgument as exc:
                answers.append(str(exc))
        assert answers[1] == answers[0]

    @rule(dead=st.booleans())
    def purge(self, dead) -> None:
        assert self.other.purge(Q, dead=dead) == self.model.purge(Q, dead=dead)

    def _stored_message(self, data: st.DataObject) -> tuple[str, str]:
        return self.stored[data.draw(st.sampled_from(sorted(self.stored)), label="payload")]

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def cancel(self, data) -> None:
        model_id, other_id = self._stored_message(data)
        model, other = self.model.cancel(Q, model_id), self.other.cancel(Q, other_id)
        assert (other.cancelled, other.state, other.key, other.ref) == (model.cancelled, model.state, model.key, model.ref)

    def _same_message(self, model_id: str | None, other_id: str | None) -> None:
        """Both name no message, or the same one (by payload)."""
        assert (other_id is None) == (model_id is None)
        if model_id is not None and other_id is not None:
            assert self.other_ids[other_id] == self.model_ids[model_id]

    @rule(ref=st.sampled_from(["r1", "r2"]))
    def cancel_by_ref(self, ref) -> None:
        model, other = self.model.cancel(Q, ref=ref), self.other.cancel(Q, ref=ref)
        assert (other.cancelled, other.state, other.key, other.ref) == (model.cancelled, model.state, model.key, model.ref)
        self._same_message(model.id, other.id)

    @rule(ref=st.sampled_from(["r1", "r2"]))
    def get_by_ref_agrees(self, ref) -> None:
        model, other = self.model.get(Q, ref=ref), self.other.get(Q, ref=ref)
        self._same_message(model and model.id, other and other.id)
        if model is not None and other is not None:
            assert (other.state, other.attempts, other.ref) == (model.state, model.attempts, model.ref)

    @precondition(lambda self: self.stored)
    @rule(data=st.data())
    def get_agrees(self, data) -> None:
        """broker.get agrees with the model on a message's state, attempts and times."""
        model_id, other_id = self._stored_message(data)
        rounded = lambda t: None if t is None else round(t, 3)  # noqa: E731

        def view(info) -> tuple | None:
            if info is None:
                return None
            reason = info.dead_reason if info.dead_reason in (None, "boom", "rejected") else ""
            return (
                info.key, info.state, info.priority, info.attempts, rounded(info.enqueued_at), info.size, info.dedup_id,
                rounded(info.available_at), rounded(info.lease_deadline), rounded(info.leased_at), reason,
                rounded(info.died_at), info.ref,
            )

        assert view(self.other.get(Q, other_id)) == view(self.model.get(Q, model_id))

    @rule(key=st.sampled_from(["a", "b", "c"]))
    def why_agrees(self, key) -> None:
        """broker.why agrees with the model (ids, tokens and batch ids differ). A rule, not
        an invariant: checked in the states the machine reaches, at a fraction of the cost
        of checking after every step. A batch's size is not stored by SQLite (it counts up
        to the last unsettled message), so there only the unsettled count is compared."""
        exact_sizes = not self.other.backend.__class__.__name__.startswith("SQLite")

        def view(broker: Broker, key: str) -> tuple:
            d = broker.why(Q, key)
            head = None if d.head is None else (d.head.priority, d.head.attempts, round(d.head.enqueued_at, 3), round(d.head.not_before, 3))
            holds = sorted(
                (h.attempts, round(h.deadline, 3), h.size - h.settled, (h.size, h.settled) if exact_sizes else None)
                for h in d.holds
            )
            rounded = lambda t: None if t is None else round(t, 3)  # noqa: E731
            return (
                d.reason, rounded(d.until), d.backlog, head, holds, d.interval, d.paused_scope,
                rounded(d.ready_since), d.last_delivered_minute, d.weight,
            )

        assert view(self.other, key) == view(self.model, key)

    # -- what must agree after every step ------------------------------------------------

    @invariant()
    def same_stats(self) -> None:
        if self.model is None:
            return
        model, other = self.model.stats(Q).as_dict(), self.other.stats(Q).as_dict()
        assert other.pop("oldest_age") == pytest.approx(model.pop("oldest_age"), abs=2e-3)
        assert other == model

    @invariant()
    def same_schedules(self) -> None:
        if self.model is None:
            return
        assert [schedule_view(x) for x in self.other.schedules(Q)] == [schedule_view(x) for x in self.model.schedules(Q)]

    @invariant()
    def same_dead_letters(self) -> None:
        if self.model is None:
            return

        def view(broker: Broker) -> list[tuple]:
            return [
                (d.payload, d.key, d.attempts, round(d.died_at, 3), d.reason if d.reason in ("boom", "rejected", DROPPED_REASON) else "")
                for d in broker.dead_letters(Q, limit=1000)
            ]

        assert view(self.other) == view(self.model)


MODEL_SETTINGS = settings(
    max_examples=200,
    stateful_step_count=60,
    deadline=None,
    # Six rules draw leases from a bundle that starts empty, so early steps are often
    # filtered out: that is the state machine's shape, not a slow strategy.
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture, HealthCheck.filter_too_much],
)


@pytest.mark.parametrize("backend_name", ["sqlite", "redis", "redis-cluster"])
def test_backend_behaves_like_the_memory_model(backend_name: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    stores = itertools.count()

    if backend_name == "redis":
        import redis

        url = request.getfixturevalue("redis_server").url
        client = redis.Redis.from_url(url)
        request.addfinalizer(client.close)

        def open_other(clock: FakeClock, options: dict, fresh: bool) -> Broker:
            if fresh:
                client.flushall()
            return sharded_broker.connect(url, clock=clock, **options)
    elif backend_name == "redis-cluster":
        cluster = request.getfixturevalue("redis_cluster")

        def open_other(clock: FakeClock, options: dict, fresh: bool) -> Broker:
            if fresh:
                cluster.flushall()
            # The model orders every key of a queue against the others, as one partition
            # does (tests/test_partitions.py pins what partitions change): the cluster
            # executor, its routing and pipelines, on queues of one partition.
            return sharded_broker.connect(cluster.url, clock=clock, partitions=1, **options)
    else:
        path = tmp_path / "model.db"

        def open_other(clock: FakeClock, options: dict, fresh: bool) -> Broker:
            nonlocal path
            if fresh:
                path = tmp_path / f"model-{next(stores)}.db"
            return sharded_broker.connect(f"sqlite:///{path}", clock=clock, **options)

    machine = type(f"SameAsModel_{backend_name}", (SameAsModel,), {"open_other": staticmethod(open_other)})
    # On the cluster a fresh store is a FLUSHALL of six nodes: fewer examples keep the
    # suite's time (the operations' semantics are the one server's, run in full above).
    examples = MODEL_SETTINGS.max_examples // 4 if backend_name == "redis-cluster" else MODEL_SETTINGS.max_examples
    run_state_machine_as_test(machine, settings=settings(MODEL_SETTINGS, max_examples=examples))
