"""The flow's state: the fast constructor and copy equal the plain ones, and what the flow carries stays plain."""
from __future__ import annotations

import dataclasses
import json

import pytest
from mitmproxy.test import tflow

from addon.traffic.flow_state import META, FlowState


@pytest.mark.parametrize("client,fmt", [("session:s1", "chat"), ("cred:ab", "messages"), ("anon:1.2.3.4", None)])
def test_fresh_state_is_the_plain_constructors_and_shares_nothing(client, fmt):
    a, b = FlowState.fresh(client, fmt), FlowState.fresh(client, fmt)
    assert a == FlowState(client=client, format=fmt)
    assert list(a.__dict__) == [f.name for f in dataclasses.fields(FlowState)]
    a.tried.append("k1")
    assert b.tried == [] and FlowState().tried == []


def test_the_saved_dict_is_a_copy_a_later_change_does_not_reach():
    st = FlowState.fresh("session:s", "chat")
    st.tried, st.tokens = ["k1"], {"input": 1, "output": 2}
    data = st.to_json()
    st.tried.append("k2")
    st.tokens["input"] = 9
    assert data["tried"] == ["k1"] and data["tokens"] == {"input": 1, "output": 2}
    assert FlowState.from_json(json.loads(json.dumps(data))) == FlowState.from_json(data)


def test_a_saved_state_reads_back_and_the_flow_carries_only_plain_data():
    f = tflow.tflow()
    st = FlowState.fresh("session:s", "chat")
    st.key_id, st.tried = "k1", ["k1"]
    st.save(f)
    assert FlowState.of(f) is st
    copy = f.copy()  # (a copy, a -w file: the flow's state, without what the sidecar remembers beside it)
    assert copy.metadata[META] == f.metadata[META] and FlowState.of(copy) == st and FlowState.of(copy) is not st
    assert not any(k.startswith("_openhands") for k in json.dumps(f.get_state(), default=repr).split('"'))
    f.metadata[META] = {**f.metadata[META], "key_id": "k2"}
    assert FlowState.of(f).key_id == "k2"
