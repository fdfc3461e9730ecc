"""MaceClient finds the node's services under its name and namespace, or by explicit names."""
from __future__ import annotations

import pytest

from mace_ros.ros.client import MaceClient, server_prefix


@pytest.mark.parametrize("node_name, namespace, expected", [
    ("mace", "", "/mace"),
    ("mace", "robot1", "/robot1/mace"),
    ("mace", "/robot1/", "/robot1/mace"),
    ("mace_fr3", "/lab/left", "/lab/left/mace_fr3"),
])
def test_server_prefix(node_name, namespace, expected):
    assert server_prefix(node_name, namespace) == expected


def test_service_names(ros_isolation):
    client = MaceClient("name_test_client", namespace="robot1")
    try:
        assert client.get_ik_client.srv_name == "/robot1/mace/get_ik"
        assert client.infer_shape_client.srv_name == "/robot1/mace/infer_shape"
        assert client.topic("obstacles") == "/robot1/mace/obstacles"
        assert client.infer_shape_action_name == "/robot1/mace/infer_shape"
    finally:
        client.close()
    client = MaceClient("name_test_client", get_ik_service="/ik", infer_shape_service="/shapes")
    try:
        assert (client.get_ik_client.srv_name, client.infer_shape_client.srv_name) == ("/ik", "/shapes")
        # `-r ~/infer_shape:=/shapes` moves the action with the service (it looked for /mace/infer_shape).
        assert client.infer_shape_action_name == "/shapes"
    finally:
        client.close()
    client = MaceClient("name_test_client", infer_shape_action_name="/shape_action")
    try:
        assert client.infer_shape_action_name == "/shape_action"
    finally:
        client.close()
