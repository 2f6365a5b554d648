"""A part of the conformance suite (tests/test_conformance.py), one test or more per
guarantee, run through the asyncio API on every backend.

Each test's ``broker`` and ``connect`` fixtures give an AsyncBroker behind a blocking
facade: every call is awaited on an event loop running in a thread of its own, so the
unchanged synchronous test drives the asyncio code path (the operations' steps awaited on
redis.asyncio, or in the broker's threads) and must see exactly what Broker gives.
"""

from __future__ import annotations

import asyncio
import inspect
import threading
from typing import Any, Callable, Iterator

import pytest

import sharded_broker.aio
import test_conformance as conformance
from support.backends import FakeClock, partition_options

# Tests that reach past the Broker API into the (synchronous) backend are left out.
TESTS = [
    "test_lease_carries_the_message_and_its_lease",
    "test_enqueue_many_keeps_order_and_gives_distinct_ids",
    "test_per_key_fifo_with_interleaved_keys",
    "test_per_key_fifo_under_concurrent_consumers",
    "test_one_message_of_a_key_in_flight",
    "test_key_concurrency_two",
    "test_priorities_inside_a_key",
    "test_expired_lease_returns_to_the_head_and_blocks_its_key",
    "test_nack_with_delay_holds_its_key",
    "test_retry_position_can_be_set_per_queue",
    "test_stale_lease_is_refused_and_changes_nothing",
    "test_extend_pushes_the_deadline",
    "test_hot_key_cannot_starve_a_cold_key",
    "test_ready_keys_are_served_round_robin",
    "test_interval_set_per_key_is_persisted",
    "test_delay_does_not_block_due_messages",
    "test_enqueue_at_head_with_delay_holds_its_key",
    "test_dedup_window",
    "test_unique_while_pending",
    "test_max_deliveries_dead_letters_with_reason_attempts_and_times",
    "test_dead_letters_listing_is_oldest_death_first_with_paging",
    "test_replay_to_the_head_keeps_order_and_resets_attempts",
    "test_replay_ids_from_a_generator",
    "test_purge_waiting_messages_leaves_leases",
    "test_purge_of_more_than_a_chunk",
    "test_pause_and_resume_a_queue",
    "test_batch_holds_the_key_until_every_message_settles",
    "test_nack_in_a_batch_returns_it_and_the_later_ones_in_order",
    "test_release_in_a_batch_returns_it_and_the_later_ones_in_order",
    "test_extend_many_with_a_stale_lease_among_fresh_ones",
    "test_stats_fields",
    "test_bindings",
    "test_lease_wait_returns_when_a_message_arrives",
    "test_why_a_leased_key_names_its_lease",
    "test_why_a_rate_interval",
    "test_stuck_keys_lists_long_waits_with_their_reasons",
    "test_lagging_keys_in_bounded_pages",
    "test_cancel_and_get_by_ref_from_another_broker",
    "test_a_ref_names_the_newest_message_enqueued_with_it",
    "test_a_ref_lives_as_long_as_its_message",
    "test_cancel_and_get_name_a_message_by_exactly_one_of_id_and_ref",
]
for _name in TESTS:
    globals()[_name] = getattr(conformance, _name)


class BlockingFacade:
    """An AsyncBroker called like a Broker: each coroutine method runs on ``loop`` (in
    another thread) and its answer is waited for."""

    def __init__(self, broker: sharded_broker.aio.AsyncBroker, loop: asyncio.AbstractEventLoop) -> None:
        self._broker = broker
        self._loop = loop

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._broker, name)
        if not inspect.iscoroutinefunction(attribute):
            return attribute  # settings, configure_queue, defaults
        return lambda *args, **kwargs: self._await(attribute(*args, **kwargs))

    def _await(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(120)


@pytest.fixture
def event_loop_thread() -> Iterator[asyncio.AbstractEventLoop]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield loop
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)
    loop.close()


@pytest.fixture
def connect(
    broker_url: str, clock: FakeClock, event_loop_thread: asyncio.AbstractEventLoop, request: pytest.FixtureRequest
) -> Iterator[Callable[..., BlockingFacade]]:
    opened: list[BlockingFacade] = []
    defaults = partition_options(broker_url, request)

    def open_broker(**options: Any) -> BlockingFacade:
        facade = BlockingFacade(
            sharded_broker.aio.connect(broker_url, clock=clock, **{**defaults, **options}), event_loop_thread
        )
        opened.append(facade)
        return facade

    yield open_broker
    for facade in opened:
        facade.close()


@pytest.fixture
def broker(connect: Callable[..., BlockingFacade]) -> BlockingFacade:
    return connect()
