"""How the node's two processes take ROS messages and requests: rclpy's MultiThreadedExecutor without
its busy loop, subscriptions polled in batches for high-rate topics such as /joint_states, and the
services' queue depth. Measurements: BENCHMARKS.md, "Joint states at a controller's rate, and request
bursts" (bench/joint_states.py).
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import rclpy.executors
from rclpy.executors import ConditionReachedException, ExternalShutdownException, ShutdownException, TimeoutException
from rclpy.exceptions import InvalidHandle
from rclpy.impl.implementation_singleton import rclpy_implementation as _rclpy
from rclpy.node import Node
from rclpy.qos import QoSProfile

# The services' (and the InferShape action's) queues: requests held until a thread takes them, replies
# until delivered. ROS's default depth, 10, loses requests: of 24 GetIK requests sent at once, 11 were
# answered and the rest never (the request reader keeps only the latest 10). Fast DDS allocates the slots
# as they are used (config/fastdds_reply_writers.xml), so an idle deep queue costs nothing.
SERVICE_QOS = QoSProfile(depth=100)
# How often a spinning thread that waits for its callback's worker checks whether the executor was shut down.
SHUTDOWN_CHECK_PERIOD_S = 0.05
# How long a PolledSubscription's thread waits for a message before it checks whether it should stop.
WAIT_TIMEOUT_NS = 100_000_000
ERROR_PERIOD_S = 5.0  # at most one error line per this period and subscription
# The work callbacks leave for after their answer (see after_callback), per executor thread.
_after_callback = threading.local()


def after_callback(work: Callable[[], Any]) -> None:
    """Runs `work` in this thread once the callback it runs for MultiThreadedExecutor has returned (for a
    service: once the response is sent); at once anywhere else.

    Why: work handed to another thread while the response is still to be sent competes with the
    sending for the GIL (up to its 5 ms switch interval) and added 0.5-1 ms to GetIK's round trip.
    """
    pending = getattr(_after_callback, "work", None)
    if pending is None:
        work()
    else:
        pending.append(work)


class MultiThreadedExecutor(rclpy.executors.MultiThreadedExecutor):
    """rclpy's MultiThreadedExecutor, except that the spinning thread waits until the worker has started
    each callback it hands out before it waits for more work, and that callbacks can leave work for after
    their answer (after_callback).

    Why: rclpy's (up to 10.0.3; ros2/rclpy#1452) hands a callback to its thread pool, and while the
    callback waits in the pool's queue the next wait finds it still pending and hands it out again, at
    once: the spinning thread loops, holding the GIL, until a worker gets the GIL to start it. Each
    message or request then costs milliseconds of a core, and at 100 messages a second the loop never
    stops: a subscriber took a whole core and received 21 of them a second (this one: 0.08 of a core, all
    100). Callbacks still run in the pool, so a long one blocks no other; when every worker is busy the
    spinning thread waits for one instead of looping.
    """

    def _spin_once_impl(self, timeout_sec: Any = None, wait_condition: Callable[[], bool] = lambda: False) -> None:
        try:
            handler, _, _ = self.wait_for_ready_callbacks(timeout_sec, None, wait_condition)
        except (ExternalShutdownException, ShutdownException, TimeoutException, ConditionReachedException):
            return
        started = threading.Event()

        def run() -> None:
            started.set()
            _after_callback.work = []
            try:
                handler()
            finally:
                pending, _after_callback.work = _after_callback.work, None
                for work in pending:
                    work()

        self._executor.submit(run)
        self._futures.append(handler)
        for future in self._futures[:]:
            if future.done():
                self._futures.remove(future)
                future.result()  # raise any exceptions
        while not started.wait(SHUTDOWN_CHECK_PERIOD_S):
            if self._is_shutdown or not self._context.ok():
                return


class PolledSubscription:
    """A subscription whose messages one thread takes in batches and hands to `on_messages` as one list,
    oldest first: when a message arrives it waits `period_s` more, then takes all that came.

    Why: an executor's cost is per message (it builds a wait set in Python for each), and controllers
    publish joint states at their own rate, up to 1 kHz (ros2_control's joint_state_broadcaster): taken
    by rclpy's SingleThreadedExecutor, 0.36 of a core; in 10 ms batches, 0.075. The delay added is at
    most `period_s` (plus the processing); of a burst beyond the QoS depth the latest that many are kept.
    The subscription's node must not be spun by an executor: the executor would take its messages too.
    """

    def __init__(self, node: Node, message_type: type, topic: str, qos: QoSProfile, period_s: float,
                 on_messages: Callable[[list[Any]], None], name: str) -> None:
        self._node = node
        self._depth = qos.depth
        self._period_s = period_s
        self._on_messages = on_messages
        self.subscription = node.create_subscription(message_type, topic, lambda _: None, qos)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        # A wait set of this one subscription, as rclpy's own wait_for_message builds it: the thread
        # sleeps in rcl, without the GIL, while nothing arrives.
        wait_set = _rclpy.WaitSet(1, 0, 0, 0, 0, 0, self._node.context.handle)
        while not self._stopped.is_set() and self._node.context.ok():
            try:
                with self.subscription.handle:
                    wait_set.clear_entities()
                    wait_set.add_subscription(self.subscription.handle)
                    wait_set.wait(WAIT_TIMEOUT_NS)
                    if not wait_set.get_ready_entities("subscription"):
                        continue
                time.sleep(self._period_s)  # what else arrives meanwhile joins the batch
                messages = self.take()
            except InvalidHandle:
                return  # the subscription or its node was destroyed
            except Exception as error:  # rcl refuses once the context is shut down
                if self._stopped.is_set() or not self._node.context.ok():
                    return
                self._node.get_logger().error(f"{self.subscription.topic_name}: not taken: {type(error).__name__}: {error}",
                                              throttle_duration_sec=ERROR_PERIOD_S)
                time.sleep(self._period_s)
                continue
            try:
                self._on_messages(messages)
            except Exception as error:  # one bad batch must not end the thread
                self._node.get_logger().error(f"{self.subscription.topic_name}: {type(error).__name__}: {error}",
                                              throttle_duration_sec=ERROR_PERIOD_S)

    def destroy(self, timeout_s: float) -> None:
        """Ends the thread (after the batch in hand, if any; waiting at most `timeout_s`) and destroys the subscription."""
        self._stopped.set()
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout_s)
        self._node.destroy_subscription(self.subscription)

    def take(self) -> list[Any]:
        """Every message waiting, oldest first (at most `depth`)."""
        subscription, messages = self.subscription, []
        with subscription.handle:
            while len(messages) < self._depth:
                taken = subscription.handle.take_message(subscription.msg_type, subscription.raw)
                if taken is None:
                    break
                messages.append(taken[0])
        return messages
