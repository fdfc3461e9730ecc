"""mace_ros.ros.executors over real rclpy and DDS (in this process, a context of its own): the
multi-threaded executor's spinning thread rests while a callback waits for a worker, work a service
callback leaves for after its answer runs once the response is sent, and a polled subscription delivers
every message, in order and in batches."""
from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import pytest
import rclpy
from rclpy.callback_groups import MutuallyExclusiveCallbackGroup
from rclpy.context import Context
from rclpy.executors import SingleThreadedExecutor
from rclpy.node import Node
from rclpy.qos import QoSProfile
from std_msgs.msg import Int64

from mace_ros.ros.executors import MultiThreadedExecutor, PolledSubscription, after_callback

RELIABLE = QoSProfile(depth=10)


@pytest.fixture
def context(ros_isolation) -> Iterator[Context]:
    context = Context()
    rclpy.init(context=context)
    yield context
    rclpy.try_shutdown(context=context)


def wait_for_subscribers(publisher, count: int = 1, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while publisher.get_subscription_count() < count:
        assert time.monotonic() < deadline, "the subscription never matched"
        time.sleep(0.01)


def test_the_spinning_thread_rests_while_a_callback_waits_for_a_worker(context):
    """Both workers are held by 1-s callbacks while a third message waits for one: rclpy's (9.1) executor
    spun through that second at a full core, handing the waiting callback out again and again."""
    node = Node("executor_under_test", context=context)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(node)
    ran: list[str] = []
    release = threading.Event()

    def blocking(name: str):
        def callback(_: Int64) -> None:
            ran.append(name)
            release.wait(1.0)
        return callback

    for name in ("a", "b", "c"):
        node.create_subscription(Int64, f"/executor_test/{name}", blocking(name), RELIABLE,
                                 callback_group=MutuallyExclusiveCallbackGroup())
    publishers = {name: node.create_publisher(Int64, f"/executor_test/{name}", RELIABLE) for name in ("a", "b", "c")}
    spin_cpu_s: list[float] = []

    def spin() -> None:
        started = time.thread_time()
        try:
            executor.spin()
        finally:
            spin_cpu_s.append(time.thread_time() - started)

    spinner = threading.Thread(target=spin, daemon=True)
    spinner.start()
    try:
        for publisher in publishers.values():
            wait_for_subscribers(publisher)
        publishers["a"].publish(Int64(data=1))
        publishers["b"].publish(Int64(data=2))
        deadline = time.monotonic() + 5.0
        while len(ran) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert sorted(ran) == ["a", "b"], ran
        publishers["c"].publish(Int64(data=3))  # no worker free for ~1 s
        deadline = time.monotonic() + 5.0
        while len(ran) < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert ran[-1] == "c", "the waiting callback never ran"
    finally:
        release.set()
        executor.shutdown(timeout_sec=2.0)
        spinner.join(5.0)
        node.destroy_node()
    assert spin_cpu_s and spin_cpu_s[0] < 0.25, f"the spinning thread took {spin_cpu_s} s of CPU"


def test_work_left_for_after_a_service_callback_runs_once_its_response_is_sent(context):
    from mace_ros.srv import GetIK

    server = Node("after_callback_server", context=context, start_parameter_services=False)
    caller = Node("after_callback_client", context=context, start_parameter_services=False)
    caller_executor = SingleThreadedExecutor(context=context)
    caller_executor.add_node(caller)
    executor = MultiThreadedExecutor(num_threads=2, context=context)
    executor.add_node(server)
    sent = threading.Event()
    seen_at_work: list[bool] = []
    work_done = threading.Event()

    def work() -> None:
        seen_at_work.append(sent.is_set())
        work_done.set()

    def callback(request: GetIK.Request, response: GetIK.Response) -> GetIK.Response:
        after_callback(work)
        response.success = True
        return response

    service = server.create_service(GetIK, "/after_callback_test", callback)
    send_response = service.send_response

    def send_and_note(response, header) -> None:  # the executor sends through the service object
        send_response(response, header)
        sent.set()

    service.send_response = send_and_note
    client = caller.create_client(GetIK, "/after_callback_test")
    spinner = threading.Thread(target=executor.spin, daemon=True)
    spinner.start()
    try:
        assert client.wait_for_service(timeout_sec=10.0)
        future = client.call_async(GetIK.Request())
        caller_executor.spin_until_future_complete(future, timeout_sec=10.0)
        assert future.done() and future.result().success
        assert work_done.wait(5.0), "the work left for after the answer never ran"
        assert seen_at_work == [True], "the work ran before the response was sent"
    finally:
        executor.shutdown(timeout_sec=2.0)
        spinner.join(5.0)
        caller.destroy_node()
        server.destroy_node()
    ran_at_once: list[int] = []
    after_callback(lambda: ran_at_once.append(1))  # outside an executor's callback
    assert ran_at_once == [1]


def test_a_polled_subscription_delivers_every_message_in_order_in_batches(context):
    node = Node("polled_under_test", context=context, start_parameter_services=False)
    publisher_node = Node("polled_publisher", context=context, start_parameter_services=False)
    batches: list[list[int]] = []
    polled = PolledSubscription(node, Int64, "/polled_test", qos=QoSProfile(depth=1000), period_s=0.01,
                                on_messages=lambda messages: batches.append([m.data for m in messages]),
                                name="polled-test")
    publisher = publisher_node.create_publisher(Int64, "/polled_test", QoSProfile(depth=1000))
    try:
        wait_for_subscribers(publisher)
        count = 300
        for value in range(count):  # ~1 kHz, as a controller's joint states
            publisher.publish(Int64(data=value))
            time.sleep(0.001)
        deadline = time.monotonic() + 10.0
        while sum(map(len, batches)) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        received = [value for batch in batches for value in batch]
        assert received == list(range(count))
        assert len(batches) < count / 3, f"{len(batches)} batches for {count} messages"
    finally:
        polled.destroy(timeout_s=2.0)
        publisher_node.destroy_node()
        node.destroy_node()
    assert not any(thread.name == "polled-test" for thread in threading.enumerate())
