"""Scene warm start for GetIK: a copy of the IK prior tuned in the background for the current scene.

Requests in an unchanged scene reuse what tuning learned there: the engine samples its fast stage's
starts from, and starts its per-request tuning at, the scene's tuned prior. A background thread tunes
that prior by MACE on the goals recently requested in the scene (each goal's elites in one batch,
conditioned on their own goals), and publishes a copy after every iteration: published models are
never changed, so a request reads one without a lock. The scene is keyed by identity (the node's
obstacle snapshot is one object until the obstacles change): a new scene drops the tuned prior and the
background starts over from the trained one for it. The background works only while no request runs
(it pauses between goals and between gradient steps), so requests never wait for it.
"""
from __future__ import annotations

import atexit
import copy
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch

from mace_ros.core.collision import TensorScene
from mace_ros.core.ik_domain import IKGoal
from mace_ros.core.ik_prior import AutoregressiveIKPrior
from mace_ros.core.mace import MacePreset, elite_threshold
from mace_ros.core.scene import Scene

# The background starts only after this long without a request: back-to-back requests (a burst from one
# client) would otherwise each find it mid-step, competing for the interpreter lock.
IDLE_BEFORE_WORK_S = 0.02
_INSTANCES: weakref.WeakSet[SceneWarmStart] = weakref.WeakSet()


@atexit.register
def _stop_all() -> None:
    """Stops the background threads before the interpreter tears torch down under them."""
    for instance in list(_INSTANCES):
        instance.close()


@dataclass
class _SceneState:
    scene: Scene
    tensor_scene: TensorScene
    goals: deque[tuple[IKGoal, torch.Tensor]]  # (goal, prior features [1, 10]) of recent requests
    published: AutoregressiveIKPrior | None = None
    iterations_done: int = 0
    iterations_left: int = 0


class SceneWarmStart:
    """The current scene's tuned IK prior, tuned by a background thread between requests.

    `score(goal, tensor_scene, q) -> [B]` is the IK domain's score (the engine's IKDomain); `preset`
    gives samples per goal (num_samples), gradient steps, elite quantile and learning rate;
    `iterations` is how many background iterations a new goal earns (0 = off); `max_goals` how many
    recent goals are tuned on.
    """

    def __init__(
        self,
        trained: AutoregressiveIKPrior,
        score: Callable[[IKGoal, TensorScene, torch.Tensor], torch.Tensor],
        preset: MacePreset,
        iterations: int,
        max_goals: int,
        seed: int = 0,
    ):
        self._trained = trained
        self._score = score
        self._preset = preset
        self._iterations = iterations
        self._max_goals = max_goals
        self._generator = torch.Generator(device=next(trained.parameters()).device).manual_seed(seed)
        self._state: _SceneState | None = None
        self._requests = 0
        self._last_request_end = time.monotonic()
        self._closed = False
        self._condition = threading.Condition()
        self._thread: threading.Thread | None = None
        _INSTANCES.add(self)

    @property
    def enabled(self) -> bool:
        return self._iterations > 0

    def model(self, scene: Scene) -> AutoregressiveIKPrior | None:
        """The tuned prior of `scene` (None until one iteration is done, or for another scene)."""
        state = self._state
        return state.published if state is not None and state.scene is scene else None

    def iterations_done(self, scene: Scene) -> int:
        state = self._state
        return state.iterations_done if state is not None and state.scene is scene else 0

    @contextmanager
    def request(self) -> Iterator[None]:
        """Marks a request in progress: the background pauses at its next check until none is."""
        with self._condition:
            self._requests += 1
        try:
            yield
        finally:
            with self._condition:
                self._requests -= 1
                self._last_request_end = time.monotonic()
                self._condition.notify_all()

    def record(self, scene: Scene, tensor_scene: TensorScene, goal: IKGoal, features: torch.Tensor) -> None:
        """Adds a requested goal of `scene` (a new scene replaces the old one's state) and earns it tuning."""
        if not self.enabled:
            return
        with self._condition:
            state = self._state
            if state is None or state.scene is not scene:
                state = self._state = _SceneState(scene, tensor_scene, deque(maxlen=self._max_goals))
            state.goals.append((goal, features.detach()))
            state.iterations_left = self._iterations
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="ik-scene-warm-start", daemon=True)
                self._thread.start()
            self._condition.notify_all()

    def forget(self) -> None:
        """Drops the scene's tuned prior and goals (the background stops at its next check)."""
        with self._condition:
            self._state = None

    def settle(self, timeout_s: float) -> bool:
        """Waits until the background has no iterations left (True) or `timeout_s` passed (False)."""
        deadline = time.monotonic() + timeout_s
        with self._condition:
            while self._state is not None and self._state.iterations_left > 0:
                if time.monotonic() >= deadline:
                    return False
                self._condition.wait(deadline - time.monotonic())
            return True

    def close(self) -> None:
        """Stops the background thread (at its next check) and waits for it."""
        with self._condition:
            self._closed, self._state = True, None
            self._condition.notify_all()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _idle_wait(self) -> float | None:
        """Seconds to wait before the background may work (None: until notified, a request runs); 0 = now. Holds the condition."""
        if self._closed:
            return 0.0
        if self._requests > 0:
            return None
        return max(0.0, self._last_request_end + IDLE_BEFORE_WORK_S - time.monotonic())

    def _wait_for_turn(self, state: _SceneState) -> bool:
        """Blocks while a request runs or ran just now; False once `state` is no longer the current scene's."""
        with self._condition:
            while self._state is state and (wait := self._idle_wait()) != 0.0:
                self._condition.wait(wait)
            return self._state is state

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._closed and (self._state is None or self._state.iterations_left <= 0):
                    self._condition.wait()
                if self._closed:
                    return
                state = self._state
            self._tune(state)

    def _tune(self, state: _SceneState) -> None:
        """Background MACE iterations on `state`'s goals until its iterations are spent or the scene changes."""
        model = copy.deepcopy(state.published or self._trained)
        optimizer = torch.optim.Adam(list(model.parameters()), lr=self._preset.learning_rate, foreach=True)
        while state.iterations_left > 0:
            elites, conditions = [], []
            for goal, features in list(state.goals):
                if not self._wait_for_turn(state):
                    return
                with torch.no_grad():
                    samples = model.sample(features.expand(self._preset.num_samples, -1), self._generator)
                    scores = self._score(goal, state.tensor_scene, samples)
                chosen = (scores >= elite_threshold(scores, self._preset.num_elites)) & (scores > 0)
                elites.append(samples[chosen])
                conditions.append(features.expand(int(chosen.sum()), -1))
            batch, goals = torch.cat(elites), torch.cat(conditions)
            if batch.shape[0]:
                for _ in range(self._preset.grad_steps_per_iteration):
                    if not self._wait_for_turn(state):
                        return
                    optimizer.zero_grad(set_to_none=True)
                    (-model.log_prob(batch, goals).mean()).backward()
                    optimizer.step()
            with self._condition:
                if self._state is not state:
                    return
                state.published = copy.deepcopy(model)
                state.iterations_done += 1
                state.iterations_left -= 1
                self._condition.notify_all()
