"""The node's process memory settings (mace_ros/ros/memory.py); their effect is measured by bench/reliability.py."""
from __future__ import annotations

import os
import xml.etree.ElementTree as ElementTree

import pytest

from mace_ros.core.resources import config_dir
from mace_ros.ros.memory import (
    INTAKE_GLIBC_TUNABLES, REPLY_WRITER_PROFILES, USER_MIDDLEWARE_SETTINGS, free_reply_buffers, with_huge_page_malloc,
    without_reply_buffer_settings)

NAMESPACE = {"dds": "http://www.eprosima.com"}


@pytest.fixture
def clean_environment(monkeypatch):
    for name in (*USER_MIDDLEWARE_SETTINGS, "RMW_IMPLEMENTATION"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def test_shipped_profile_frees_service_replies_and_requests_only():
    root = ElementTree.parse(config_dir() / REPLY_WRITER_PROFILES).getroot()
    writers = root.findall("dds:profiles/dds:data_writer", NAMESPACE)
    assert [writer.get("profile_name") for writer in writers] == ["service"]  # rmw_fastrtps' profile for replies
    assert writers[0].findtext("dds:historyMemoryPolicy", namespaces=NAMESPACE) == "DYNAMIC"  # Fast DDS's DYNAMIC_RESERVE_MEMORY_MODE
    # Fast DDS takes the publication mode from the XML too once it takes the memory policy from it.
    assert writers[0].findtext("dds:qos/dds:publishMode/dds:kind", namespaces=NAMESPACE) == "SYNCHRONOUS"
    # The services' request readers, and no topic's: a DYNAMIC reader of 30 MB camera clouds took a tenth of them.
    readers = root.findall("dds:profiles/dds:data_reader", NAMESPACE)
    assert [reader.get("profile_name") for reader in readers] == ["service"]
    assert readers[0].findtext("dds:historyMemoryPolicy", namespaces=NAMESPACE) == "DYNAMIC"
    assert not any(profile.get("is_default_profile") for profile in [*writers, *readers])


def test_applies_under_fast_dds_without_user_settings(clean_environment):
    assert free_reply_buffers(config_dir())
    assert os.environ["FASTDDS_DEFAULT_PROFILES_FILE"] == str(config_dir() / REPLY_WRITER_PROFILES)
    assert os.environ["RMW_FASTRTPS_USE_QOS_FROM_XML"] == "1"


@pytest.mark.parametrize("name, value", [
    ("RMW_IMPLEMENTATION", "rmw_cyclonedds_cpp"),
    ("FASTDDS_DEFAULT_PROFILES_FILE", "/somewhere/profiles.xml"),
    ("RMW_FASTRTPS_PUBLICATION_MODE", "ASYNCHRONOUS"),
])
def test_leaves_other_middlewares_and_user_settings_alone(clean_environment, name, value):
    clean_environment.setenv(name, value)
    assert not free_reply_buffers(config_dir())
    assert os.environ.get("RMW_FASTRTPS_USE_QOS_FROM_XML") is None
    assert os.environ.get("FASTDDS_DEFAULT_PROFILES_FILE", "") in ("", value)


def test_the_intake_process_gets_the_users_environment(clean_environment):
    """The intake runs Fast DDS as the user configured it: without the node's own reply profile, with the
    user's own profile file."""
    clean_environment.setenv("ROS_DOMAIN_ID", "7")
    user = dict(os.environ)
    assert free_reply_buffers(config_dir())
    assert without_reply_buffer_settings(dict(os.environ), config_dir()) == user
    users_profiles = {**user, "FASTDDS_DEFAULT_PROFILES_FILE": "/somewhere/profiles.xml"}
    assert without_reply_buffer_settings(users_profiles, config_dir()) == users_profiles


@pytest.mark.parametrize("user, expected", [
    ({}, INTAKE_GLIBC_TUNABLES),
    ({"GLIBC_TUNABLES": "glibc.pthread.rseq=0"}, "glibc.pthread.rseq=0:" + INTAKE_GLIBC_TUNABLES),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "glibc.malloc.hugetlb=0"),  # the user's malloc tuning stays
    ({"MALLOC_ARENA_MAX": "4"}, None),
])
def test_the_intake_asks_malloc_for_huge_pages_unless_the_user_tunes_malloc(user, expected):
    environment = with_huge_page_malloc({"PATH": "/usr/bin", **user})
    assert environment.get("GLIBC_TUNABLES") == expected
    assert {name: value for name, value in environment.items() if name != "GLIBC_TUNABLES"} == {
        "PATH": "/usr/bin", **{name: value for name, value in user.items() if name != "GLIBC_TUNABLES"}}


def test_freezing_leaves_a_full_collection_nothing_loaded_to_walk():
    """In a fresh interpreter that loaded torch and the engines' modules: after freeze_loaded_objects a
    full collection walks almost nothing (what it walks is what takes the time), and the intake's
    thresholds are set. Run apart: freezing the test process's objects would outlive this test."""
    import subprocess
    import sys

    script = (
        "import gc, torch, mace_ros.core.ik_engine, mace_ros.core.shape_engine\n"
        "from mace_ros.ros.memory import INTAKE_GC_THRESHOLDS, freeze_loaded_objects\n"
        "before = len(gc.get_objects())\n"
        "freeze_loaded_objects(INTAKE_GC_THRESHOLDS)\n"
        "print(before, len(gc.get_objects()), gc.get_freeze_count(), gc.get_threshold() == INTAKE_GC_THRESHOLDS)\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120)
    before, after, frozen, thresholds_set = result.stdout.split()[-4:]
    assert int(before) > 50_000 and int(after) < 0.01 * int(before) and int(frozen) >= 0.9 * int(before)
    assert thresholds_set == "True"
