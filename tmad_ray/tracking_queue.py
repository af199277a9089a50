"""MLflow writes off the training path: a study's queue, a Ray actor that retries until the server answers.

Rank 0 of a trial hands its epoch's metrics to the queue and goes on training; the trial function
hands it the trial's child run to open. The actor (``TrackingQueue``, one per study, owned by the
study's driver, no CPU) writes them in order from a thread; a write that fails because the store
cannot be reached (refused connection, timeout, HTTP 5xx) stays at the head and is tried again with
back-off, so an outage delays tracking, never training, and nothing is redone. A write MLflow refuses
(HTTP 4xx: a bad value) is dropped and said once. The driver's ``TrackingWatch`` (a Tune callback)
prints one line when the store goes away and one when it is back; ``flush`` waits for the queue at
the study's end, before the driver closes the runs.

The queue holds at most ``MAX_QUEUED`` writes (the oldest are dropped past it, and counted): a night's
study of 100 trials × 50 epochs is 5,000.
"""

from __future__ import annotations

import collections
import threading
import time

from tmad_ray import tracking

MAX_QUEUED = 20_000
FLUSH_TIMEOUT_S = 300.0  # at the study's end, how long the driver waits for a store that is still away
BACKOFF_S = (1, 2, 5, 10, 20, 30)
# The actor's own MLflow client fails fast (MLflow retries for minutes otherwise); the queue retries.
ACTOR_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10"}


def unreachable(e: BaseException) -> bool:
    """Whether a failed MLflow write is worth trying again: the store could not be reached (a refused
    or reset connection, a timeout, HTTP 5xx, a locked sqlite file) rather than refusing the write."""
    from mlflow.exceptions import MlflowException

    if isinstance(e, MlflowException):
        return e.get_http_status_code() >= 500
    import requests

    return isinstance(e, (OSError, requests.RequestException))


class TrackingQueue:
    """The queue's state and its writer thread (``ray.remote`` makes it the study's actor: ``start``)."""

    def __init__(self, uri: str, backoff_s: tuple = BACKOFF_S):
        self.uri, self.backoff_s = uri, backoff_s
        self.items: collections.deque = collections.deque()
        self.lock, self.wake = threading.Lock(), threading.Event()
        self.runs: dict[str, str] = {}  # trial -> its child run's id, as opened here
        self.down_since: float | None = None
        self.outages: list[tuple[float, float]] = []  # (from, to) of each outage that ended
        self.delivered = self.dropped = 0
        self.errors: list[str] = []
        self.said: dict = {}  # what the driver has been told (``news``)
        threading.Thread(target=self._drain, name="mlflow-queue", daemon=True).start()

    # ---- called by the trials (each call returns at once)
    def open_child(self, exp_id: str, parent_id: str, study: str, trial: str, run_name: str, description: str,
                   trial_number: int | None, params: dict) -> None:
        self._put(("open_child", (exp_id, parent_id, study, trial, run_name, description, trial_number, params)))

    def log_epoch(self, run: dict, metrics: dict, labels: list[str], timestamp_ms: int) -> None:
        # two writes, each safe to try again: the metrics (stamped by the trial, so a retry is no second
        # point) and the artifacts (which replace the last epoch's)
        self._put(("epoch_metrics", (run, metrics, timestamp_ms)))
        self._put(("epoch_artifacts", (run, metrics, labels)))

    def set_tag(self, run: dict, key: str, value: str) -> None:
        self._put(("set_tag", (run, key, value)))

    # ---- called by the driver
    def status(self) -> dict:
        with self.lock:
            return {"uri": tracking.redact(self.uri), "queued": len(self.items),
                    "down_since": self.down_since, "outages": list(self.outages), "delivered": self.delivered,
                    "dropped": self.dropped, "errors": list(self.errors)}

    def news(self) -> list[str]:
        """The lines the driver has not said yet (an outage, its end, a refused write), each said once."""
        return watch_lines(self.status(), self.said)

    def flush(self, timeout_s: float) -> dict:
        """Wait until every queued write is done (or ``timeout_s``); the status then."""
        deadline = time.time() + timeout_s
        while time.time() < deadline:
            with self.lock:
                if not self.items:  # the head stays queued until it is written
                    break
            self.wake.set()  # an outage's back-off is cut short: the driver wants it now
            time.sleep(0.2)
        return self.status()

    # ---- the writer thread
    def _put(self, item: tuple) -> None:
        with self.lock:
            if len(self.items) >= MAX_QUEUED:
                self.items.popleft()
                self.dropped += 1
            self.items.append(item)
        self.wake.set()

    def _drain(self) -> None:
        client, tries = None, 0
        while True:
            with self.lock:
                item = self.items[0] if self.items else None
            if item is None:
                self.wake.wait(1.0)
                self.wake.clear()
                continue
            refused = None
            try:
                client = client or tracking.client(self.uri)  # made here: a store that cannot open is retried too
                self._write(client, *item)
            except Exception as e:  # noqa: BLE001 (an outage waits; a refused write is said and dropped)
                if unreachable(e):
                    with self.lock:
                        self.down_since = self.down_since or time.time()
                    self.wake.wait(self.backoff_s[min(tries, len(self.backoff_s) - 1)])
                    self.wake.clear()
                    tries += 1
                    continue
                why = str(e).splitlines()[0] if str(e) else repr(e)
                refused = f"{item[0]} for {self._whose(item)}: {tracking.redact(why)[:300]}"
            with self.lock:
                self.items.popleft()
                if refused:
                    self.errors.append(refused)
                else:
                    self.delivered += 1
                if self.down_since is not None:  # the store answered: the outage is over
                    self.outages.append((self.down_since, time.time()))
                    self.down_since = None
            tries = 0

    def _write(self, client, kind: str, args: tuple) -> None:
        if kind == "open_child":
            exp_id, parent_id, study, trial, run_name, description, number, params = args
            run_id = tracking.open_child(client, exp_id, parent_id, study, trial, run_name, description,
                                         trial_number=number)
            tracking.log_params(client, run_id, params)
            self.runs[trial] = run_id
        elif kind == "epoch_metrics":
            run, metrics, stamp = args
            tracking.log_epoch_metrics(client, self._run_id(client, run), metrics, stamp)
        elif kind == "epoch_artifacts":
            run, metrics, labels = args
            tracking.log_epoch_artifacts(client, self._run_id(client, run), metrics, labels)
        elif kind == "set_tag":
            run, key, value = args
            client.set_tag(self._run_id(client, run), key, value)

    def _run_id(self, client, run: dict) -> str:
        """A trial's run id: given (a confirmation run), opened here, or found by its tags (a study
        resumed by a new driver, whose trial was opened by the old queue)."""
        return self.runs.get(run["trial"]) or tracking.trial_run_id(client, run)

    @staticmethod
    def _whose(item: tuple) -> str:
        kind, args = item
        return f"trial {args[3]}" if kind == "open_child" else f"run {args[0].get('run_id') or args[0]['trial']}"


def actor_name(study: str) -> str:
    return f"tmad-mlflow-queue-{study}"


def start(uri: str, study: str):
    """The study's queue actor, on the driver's node (which has reached the store), holding no CPU;
    named after the study, so that a resumed study's restored Tune callback finds the new one."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    actor = ray.remote(num_cpus=0, max_restarts=0)(TrackingQueue)
    return actor.options(name=actor_name(study), runtime_env={"env_vars": ACTOR_ENV},
                         scheduling_strategy=NodeAffinitySchedulingStrategy(
                             ray.get_runtime_context().get_node_id(), soft=False)).remote(uri)


def drain(queue, timeout_s: float = FLUSH_TIMEOUT_S, say=print) -> dict:
    """Wait for every queued write (up to ``timeout_s``) and say what could not be written: the
    driver's last step before it closes the study's runs."""
    import ray

    try:
        st = ray.get(queue.flush.remote(0.0))
        if st["queued"]:
            for line in ray.get(queue.news.remote()):
                say(line)
            say(f"MLflow: writing the last {st['queued']} queued writes to {st['uri']} (up to {timeout_s:.0f} s)")
            st = ray.get(queue.flush.remote(timeout_s))
        for line in ray.get(queue.news.remote()):
            say(line)
    except ray.exceptions.RayActorError as e:  # the study ends as it would have; its lost writes are said
        say(f"MLflow: the study's queue died ({str(e).splitlines()[0][:160]}); the writes it held are lost, "
            "each trial's train_log.jsonl under storage.output_dir has every epoch")
        return {"queued": 0, "dropped": 0, "errors": [], "lost": True}
    if st["queued"] or st["dropped"]:
        lost = ([f"{st['queued']} writes could not be delivered to {st['uri']}"] if st["queued"] else []) + \
            ([f"{st['dropped']} were dropped because the queue was full"] if st["dropped"] else [])
        say(f"MLflow: {'; '.join(lost)}; each trial's train_log.jsonl under storage.output_dir has every epoch")
    return st


def clock(t: float) -> str:
    return time.strftime("%H:%M:%S", time.localtime(t))


def watch_lines(st: dict, seen: dict) -> list[str]:
    """What the driver says about the queue since it last looked (``seen`` holds what it has said)."""
    lines = []
    if st["down_since"] is not None and seen.get("down") != st["down_since"]:
        seen["down"] = st["down_since"]
        lines.append(f"MLflow at {st['uri']} unreachable since {clock(st['down_since'])}; {st['queued']} writes "
                     "queued; training continues")
    for since, until in st["outages"][seen.get("outages", 0):]:
        lines.append(f"MLflow at {st['uri']} is back at {clock(until)} (down {until - since:.0f} s); the queued "
                     "writes are being delivered")
    seen["outages"] = len(st["outages"])
    for e in st["errors"][seen.get("errors", 0):]:
        lines.append(f"MLflow refused a write (dropped): {e}")
    seen["errors"] = len(st["errors"])
    return lines


def watch(study: str, every_s: float = 5.0):
    """A Tune callback for the driver: every ``every_s`` it asks the study's queue how it is and prints
    what changed. It finds the queue by name, because Tune pickles its callbacks with the experiment
    and a ``--resume`` restores them."""
    from ray.tune import Callback

    class TrackingWatch(Callback):
        def __init__(self):
            self.last = 0.0

        def on_step_end(self, iteration, trials, **info):
            import ray

            if time.time() - self.last < every_s:
                return
            self.last = time.time()
            try:
                lines = ray.get(ray.get_actor(actor_name(study)).news.remote(), timeout=5)
            except Exception:  # noqa: BLE001 (a busy or not yet started queue is asked again next time)
                return
            for line in lines:
                print(line, flush=True)

    return TrackingWatch()
