"""Sharded aggregation as processes: the shard worker (``python -m aggregator.sharded.service``)
and a reducer on its own MQTT session, driven from a plain thread (scripts, tests, the demo in
``bench/scale``).

    python -m aggregator.sharded.service --broker mqtt://HOST:PORT --fleet NAME \\
        --worker aggregator-0 --state-dir state/aggregator-0

The worker's username is its name; the broker must give each worker name read access to
``{p}/update/+`` and write access to ``{p}/partial/<name>`` (``broker_config/acl.sharded``).
"""

from __future__ import annotations

import argparse
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from aggregator.sharded.partials import ShardTopics
from aggregator.sharded.reducer import Merged, Reducer
from aggregator.sharded.worker import ShardWorker, WorkerConfig
from fedge.errors import AggregationError, TransportError
from fedge.limits import DEFAULT_LIMITS, Limits
from fedge.support.runtime import exit_user_error, log_level
from fedge.tensors import TensorSpec
from fedge.topics import Topics
from fedge.transport.base import SessionFactory, SessionRequest
from fedge.transport.mqtt import BrokerURL
from fedge.transport.mux import Mux
from fedge.transport.session import MqttSessions

__all__ = ["ReducerSession", "add_arguments", "main", "run"]


class ReducerSession:
    """A ``Reducer`` on its own session (username ``aggregator``); methods block, bounded.

    Call from any thread but the mux's. In the aggregator service the reducer shares the
    service's session instead (one client id per identity).
    """

    def __init__(
        self,
        mux: Mux,
        broker: str,
        fleet: str,
        workers: Sequence[str],
        *,
        username: str = "aggregator",
        password: str | None = None,
        limits: Limits = DEFAULT_LIMITS,
        session_factory: SessionFactory | None = None,
    ) -> None:
        self.mux = mux
        self.topics = Topics(fleet)
        st = ShardTopics(self.topics)
        self._connected = threading.Event()
        sessions = session_factory or MqttSessions(mux, BrokerURL.parse(broker), username, password)
        self.session = sessions(
            SessionRequest(
                username,
                subscriptions=[st.all_partials],
                on_message=self._on_message,
                on_connected=self._connected.set,
            )
        )
        self.reducer = Reducer(st, workers, self.session.publish, limits=limits)

    def _on_message(self, topic: str, payload: bytes) -> None:
        self.reducer.handle(topic, payload)

    def start(self, timeout: float = 10.0) -> ReducerSession:
        self.session.start()
        if not self._connected.wait(timeout):
            raise TransportError(f"reducer: not connected within {timeout}s")
        return self

    def close(self) -> None:
        self.mux.call_soon(self.session.close)

    def publish(
        self, topic: str, payload: bytes, *, retain: bool = False, timeout: float = 10.0
    ) -> None:
        """Publish QoS 1 and wait for the broker's PUBACK."""
        done = threading.Event()
        result: list[tuple[bool, str]] = []

        def on_done(ok: bool, reason: str) -> None:
            result.append((ok, reason))
            done.set()

        self.mux.call_soon(
            lambda: self.session.publish(topic, payload, retain=retain, on_done=on_done)
        )
        if not done.wait(timeout) or not result[0][0]:
            raise TransportError(f"publish on {topic} not acknowledged: {result or 'timeout'}")

    def collect(
        self,
        round_id: int,
        base_version: int,
        spec: TensorSpec,
        *,
        min_count: int = 0,
        timeout: float = 30.0,
        poll: float = 0.2,
        retry: float = 2.0,
        ask: bool = True,
    ) -> Merged:
        """Ask every worker for its partial and return the merge once ``min_count`` updates
        are counted across them; ``AggregationError`` after ``timeout`` s.

        Short of ``min_count`` it asks again after ``poll`` s; when not every worker answered
        (one had not seen the task yet) after ``retry`` s. ``ask=False`` asks nothing and
        waits for the partials the workers send at the task's deadline."""
        got: list[Merged] = []
        ready = threading.Event()

        def on_merged(m: Merged) -> None:
            got.append(m)
            ready.set()

        self.mux.call_soon(self.reducer.begin, round_id, base_version, spec, on_merged)
        end = time.monotonic() + timeout
        while True:
            ready.clear()
            if ask:
                self.mux.call_soon(self.reducer.request)
            left = max(0.0, end - time.monotonic())
            if ready.wait(min(left, retry) if ask else left):
                if got[-1].count >= min_count:
                    return got[-1]
                time.sleep(poll)
            if time.monotonic() >= end:
                last = f"{got[-1].count} counted" if got else "not every worker answered"
                raise AggregationError(
                    f"round {round_id}: {last} within {timeout}s (want {min_count})"
                )


def _password(args: argparse.Namespace) -> str | None:
    if args.password_file is None:
        return args.password
    try:
        return args.password_file.read_text().strip()
    except OSError as e:
        raise ValueError(f"cannot read --password-file {args.password_file}: {e}") from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--broker", required=True, help="mqtt://HOST:PORT or mqtts://HOST:PORT")
    p.add_argument("--fleet", required=True, help="topic prefix is fedge/<fleet>")
    p.add_argument("--worker", required=True, help="broker username = client id, e.g. aggregator-0")
    p.add_argument("--password", default=None, help="visible to `ps`: prefer --password-file")
    p.add_argument("--password-file", type=Path, default=None, help="file holding the password")
    p.add_argument("--state-dir", type=Path, required=True, help="the worker's round journal")
    p.add_argument("--group", default="aggregators", help="shared subscription group")
    p.add_argument("--max-num-samples", type=int, default=100_000)
    p.add_argument(
        "--aggregator-key",
        type=Path,
        default=None,
        help="the aggregator's public key: tasks not signed by it are refused",
    )
    p.add_argument(
        "--max-sample-ratio",
        type=float,
        default=4.0,
        help="the aggregator's max_sample_ratio (weight cap relative to the last round)",
    )
    p.add_argument("--clip-norm", type=float, default=0.0, help="the strategy's clip_norm")
    p.add_argument(
        "--device-keys",
        type=Path,
        default=None,
        help="key registry (`fedge ca init`): set = every update must be signed, as the "
        "aggregator's device_keys",
    )
    p.add_argument("--ca-cert", default=None, help="mqtts://: the fleet CA (CA/ca.crt)")
    p.add_argument("--client-cert", default=None, help="mutual TLS: this worker's certificate")
    p.add_argument("--client-key", default=None, help="mutual TLS: its key")
    p.add_argument(
        "--metrics-port",
        type=int,
        default=None,
        metavar="PORT",
        help="serve Prometheus /metrics on this port (0: any free port; default off)",
    )
    p.add_argument("--metrics-bind", default="127.0.0.1", help="address of --metrics-port")
    p.add_argument("--log-level", type=log_level, default="INFO", help="DEBUG … CRITICAL")


def run(args: argparse.Namespace) -> None:
    from fedge.identity import load_verify_key
    from fedge.support.runtime import setup_logging, wait_for_signal

    setup_logging(args.log_level)
    cfg = WorkerConfig(
        broker=args.broker,
        fleet=args.fleet,
        worker=args.worker,
        state_dir=args.state_dir,
        group=args.group,
        password=_password(args),
        max_num_samples=args.max_num_samples,
        max_sample_ratio=args.max_sample_ratio,
        aggregator_key=load_verify_key(args.aggregator_key) if args.aggregator_key else None,
        clip_norm=args.clip_norm,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )
    mux = Mux(cfg.worker).start()
    keyring = None
    if args.device_keys is not None:
        from aggregator.keyring import KeyRing

        keyring = KeyRing(args.device_keys)
    web, metrics = None, None
    if args.metrics_port is not None:
        from prometheus_client import CollectorRegistry

        from aggregator.observe.prometheus import PrometheusSink
        from aggregator.observe.server import ObserveServer

        registry = CollectorRegistry()
        metrics = PrometheusSink(registry, codec=lambda: worker.task_codec)
        web = ObserveServer(args.metrics_bind, args.metrics_port, registry)
    worker = ShardWorker(cfg, mux, keyring=keyring, metrics=metrics)
    print(f"fedge shard-worker {cfg.worker}: {cfg.broker}, fleet {cfg.fleet}", flush=True)
    if web is not None:
        web.start()
        print(f"Prometheus {web.url}metrics", flush=True)
    worker.start()
    try:
        wait_for_signal()
    finally:
        if web is not None:
            web.stop()
        worker.stop()
        time.sleep(0.3)
        mux.stop()


def main(argv: list[str] | None = None) -> None:
    from fedge.errors import FedgeError

    p = argparse.ArgumentParser(prog="fedge shard-worker", description="sharded aggregation")
    add_arguments(p)
    try:
        run(p.parse_args(argv))
    except (FedgeError, ValueError) as e:
        exit_user_error("fedge shard-worker", e)


if __name__ == "__main__":
    main()
