"""Property-based fuzzing (hypothesis): recorded frames of every message kind, mutated, fed to the
codec, the endpoints, and the server's and the agent's handlers. A bounded run here; the long run
with counts is bench/fuzz_frames.py (docs/security.md).

Properties: nothing but a ProtocolError ever leaves the codec; nothing leaves an endpoint or a
handler; no handler fails on its input; a rejected frame changes no model parameter; the
endpoint's memory stays within its budgets."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.fuzzing import (
    AgentHarness,
    ServerHarness,
    decode_only,
    endpoint_only,
    mutate,
    parameters_digest,
    recorded_frames,
)
from toolkit.protocol import Kind, decode, topics
from toolkit.protocol.endpoint import Endpoint

FRAMES = recorded_frames()
DOWN = {Kind.ASSIGN, Kind.WEIGHTS_DOWN, Kind.GRADIENT, Kind.STOP, Kind.PROBE}
FUZZ = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)


def test_the_recorded_corpus_has_every_kind_and_decodes() -> None:
    assert {frame.kind for frame in FRAMES} == set(Kind)
    for frame in FRAMES:
        assert decode(frame.frame).kind is frame.kind
        assert topics.role_of(frame.topic) is not None


frames = st.sampled_from(FRAMES)
seeds = st.integers(min_value=0, max_value=2**32 - 1)


@FUZZ
@given(frames, seeds)
def test_codec_refuses_with_protocol_errors_only(recorded, seed) -> None:
    assert decode_only(mutate(recorded.frame, random.Random(seed))) is None


@FUZZ
@given(frames, seeds)
def test_endpoint_never_raises_and_counts_what_it_drops(recorded, seed) -> None:
    endpoint = Endpoint("fuzz")
    frame = mutate(recorded.frame, random.Random(seed))
    assert endpoint_only(recorded.topic, frame, endpoint) is None
    assert endpoint._inbox_bytes == 0 and endpoint._reassembler.reserved_bytes <= endpoint._reassembler.max_bytes_total


@pytest.fixture(scope="module")
def server_harness():
    return ServerHarness()


@pytest.fixture(scope="module")
def agent_harness():
    return AgentHarness()


@FUZZ
@given(st.sampled_from([f for f in FRAMES if f.kind not in DOWN]), seeds)
def test_server_handlers_survive_and_rejected_frames_change_nothing(server_harness, recorded, seed) -> None:
    frame = mutate(recorded.frame, random.Random(seed))
    server_harness.feed(recorded.topic, frame)
    outcome = server_harness.outcome
    assert outcome.uncaught == [] and outcome.changed_by_rejected == 0


@FUZZ
@given(st.sampled_from([f for f in FRAMES if f.kind in DOWN and "/dev0/" in f.topic]), seeds, st.booleans())
def test_agent_handlers_survive_anything_the_server_topic_carries(agent_harness, recorded, seed, intact) -> None:
    # intact frames too: replayed and out-of-order ASSIGN, WEIGHTS_DOWN, GRADIENT, STOP and PROBE
    frame = recorded.frame if intact else mutate(recorded.frame, random.Random(seed))
    agent_harness.feed(recorded.topic, frame)
    assert agent_harness.outcome.uncaught == []


def test_server_trains_on_the_intact_frames(server_harness) -> None:
    """The harness is not vacuous: intact SMASHED and WEIGHTS_UP frames are accepted and change the model."""
    before = parameters_digest(server_harness.server.model.net)
    accepted = server_harness.outcome.accepted
    for recorded in FRAMES:
        if recorded.kind in (Kind.SMASHED, Kind.WEIGHTS_UP):
            server_harness.server.endpoint._seen.clear()  # the property tests may have seen their sequence numbers
            server_harness.feed(recorded.topic, recorded.frame)
    assert server_harness.outcome.accepted > accepted
    assert parameters_digest(server_harness.server.model.net) != before
