"""Why is this key not moving? One reason, decided from a backend's :class:`KeyFacts`.

Every backend reads the same facts about a key (:meth:`Backend.key_facts`); this module
decides from them, in one place, which rule of the lease algorithm stops the key's next
message now, in the order ``lease`` applies them:

1. nothing waiting (no ready head, nothing delayed): ``empty``;
2. the queue or the key is paused: ``paused``, until resumed;
3. every slot is held (``key_concurrency``, default 1): ``leased`` (one slot) or
   ``key_concurrency`` (several), until the earliest deadline of the holds at the latest;
4. nothing ready, only delayed messages not due yet: ``delayed``, until the first is due;
5. a rate interval since the last delivery, or a head that holds the key until a
   not-before time (a retry, an ``at_head`` delay): ``interval`` or ``retry``, whichever
   ends later (the binding one), until then;
6. otherwise the key is deliverable now: ``ready``, waiting for a consumer.
"""

from __future__ import annotations

import math

from .models import KeyDiagnosis, KeyFacts, QueueSettings


def describe_seconds(seconds: float) -> str:
    """A duration as people read it: ``0.4 s``, ``12 s``, ``3 min 5 s``, ``2 h 4 min``, ``3 d 2 h``."""
    seconds = max(0.0, seconds)
    if seconds < 10:
        return f"{seconds:.1f} s"
    if seconds < 60:
        return f"{int(seconds)} s"
    whole = int(seconds)
    if whole < 3600:
        return f"{whole // 60} min {whole % 60} s" if whole % 60 else f"{whole // 60} min"
    if whole < 86400:
        return f"{whole // 3600} h {whole % 3600 // 60} min"
    return f"{whole // 86400} d {whole % 86400 // 3600} h"


def diagnose(facts: KeyFacts, settings: QueueSettings) -> KeyDiagnosis:
    """The one reason ``facts``' key does not deliver its next message now."""
    now = facts.now
    interval = facts.own_interval if facts.own_interval is not None else settings.interval

    def answer(reason: str, until: float | None, summary: str, **extra: object) -> KeyDiagnosis:
        return KeyDiagnosis(
            queue=facts.queue, key=facts.key, reason=reason, until=until, summary=summary, now=now,  # type: ignore[arg-type]
            backlog=facts.backlog, head=facts.head, holds=facts.holds, interval=interval, weight=facts.weight, **extra,  # type: ignore[arg-type]
        )

    held = f"{len(facts.holds)} lease(s) held" if facts.holds else "no lease held"
    if facts.head is None and facts.next_delayed is None:
        return answer("empty", None, f"nothing is waiting on key {facts.key!r} ({held})")
    if facts.queue_paused:
        return answer("paused", None, f"queue {facts.queue!r} is paused: resume it to deliver", paused_scope="queue")
    if facts.key_paused:
        return answer("paused", None, f"key {facts.key!r} is paused: resume it to deliver", paused_scope="key")
    if facts.slots >= settings.key_concurrency:
        until = min((hold.deadline for hold in facts.holds), default=None)
        if until is None:
            expiry = ""
        elif until > now:
            expiry = f"; the lease expires in {describe_seconds(until - now)} unless acked or extended"
        else:
            # Leases expire when a consumer next asks for messages: none has since.
            expiry = (
                f"; the lease expired {describe_seconds(now - until)} ago and goes back to the key "
                "at the next lease call of any consumer (none since: is one running?)"
            )
        if settings.key_concurrency == 1:
            hold = facts.holds[0] if facts.holds else None
            who = "" if hold is None else (
                f" by message {hold.message_id} (delivery {hold.attempts}"
                + (f", batch {hold.settled}/{hold.size} settled" if hold.size > 1 else "") + ")"
            )
            return answer("leased", until, f"the key is leased{who}{expiry}")
        return answer(
            "key_concurrency", until,
            f"all {settings.key_concurrency} slots of the key are in use (key_concurrency){expiry}",
        )
    if facts.head is None and facts.next_delayed is not None and facts.next_delayed > now:
        return answer(
            "delayed", facts.next_delayed,
            f"nothing is due yet: the first delayed message is due in {describe_seconds(facts.next_delayed - now)}",
        )
    interval_until = (
        facts.last_delivery + interval if interval and facts.last_delivery is not None else -math.inf
    )
    # A delayed message already due enters the key's order at the next lease call.
    retry_until = facts.head.not_before if facts.head is not None else -math.inf
    if max(interval_until, retry_until) > now:
        if interval_until >= retry_until or facts.head is None:  # (no head: retry_until is -inf)
            return answer(
                "interval", interval_until,
                f"rate interval of {describe_seconds(interval)}: next delivery allowed in "
                f"{describe_seconds(interval_until - now)}",
            )
        return answer(
            "retry", retry_until,
            f"the head message (delivery {facts.head.attempts} done) is a retry holding the key for "
            f"{describe_seconds(retry_until - now)}",
        )
    return answer("ready", None, "ready: waiting for a consumer", ready_since=facts.ready_at)
