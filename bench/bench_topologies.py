"""End-to-end and intake throughput of postroom on its three topologies, in one run:

- ``redis``: one Redis for state, results and the broker (the default);
- ``rabbitmq``: RabbitMQ as the broker (a quorum queue, publisher confirms), one Redis for
  state;
- ``rabbitmq+cluster``: RabbitMQ as the broker, a three-master Redis Cluster for state.

Run on purpose (not part of the test suite):

    .venv/bin/python bench/bench_topologies.py --messages 2000 --repeat 3

Each topology runs ``bench/bench_pipeline.py``'s postroom measurement (the same API under
gunicorn, the same worker processes, the same sink, the same checks: every Message-ID
received once, every task document ``sent``), on a fresh Redis (or cluster) and a fresh
RabbitMQ virtual host (``BENCH_AMQP_URL``, default ``amqp://guest:guest@127.0.0.1:5672``;
the virtual host is made with ``rabbitmqctl``, named ``BENCH_AMQP_VHOST_PREFIX`` + a random
suffix, and deleted after). Rounds alternate which topology starts; the medians of each
topology's figures and of the ratios against ``redis`` in the same round are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_pipeline as bp  # noqa: E402

from postroom.shared.crypto import generate_key  # noqa: E402
from postroom.shared.redis_client import redis_client  # noqa: E402

TOPOLOGIES = ("redis", "rabbitmq", "rabbitmq+cluster")
AMQP_URL = os.environ.get("BENCH_AMQP_URL", "amqp://guest:guest@127.0.0.1:5672")
VHOST_PREFIX = os.environ.get("BENCH_AMQP_VHOST_PREFIX", "postroom-bench-")


def rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", "-q", *args], check=True, capture_output=True, timeout=60)


def rabbitmq_pid() -> int | None:
    """The RabbitMQ server's Erlang VM on this machine, when there is one to read."""
    found = subprocess.run(["pgrep", "-o", "beam.smp"], capture_output=True, text=True)
    return int(found.stdout.split()[0]) if found.returncode == 0 and found.stdout else None


class TopologyStack(bp.PostroomStack):
    """bench_pipeline's stack with the broker and the state Redis of one topology."""

    topology = "redis"

    def __init__(self, sink: bp.Sink, log_dir: Path, options: bp.Options) -> None:
        super().__init__(sink, log_dir, options)
        self.vhost = ""
        self.cluster: Any = None
        self.cluster_dir = ""

    @property
    def state_url(self) -> str:
        return self.cluster.url if self.cluster is not None else self.redis.url

    @property
    def env(self) -> dict[str, str]:
        env = super().env
        env["POSTROOM_REDIS_URL"] = self.state_url
        if self.vhost:
            env["POSTROOM_BROKER_URL"] = f"{AMQP_URL}/{self.vhost}"
        return env

    def start(self) -> TopologyStack:
        self._key = generate_key()
        if self.topology.startswith("rabbitmq"):
            self.vhost = f"{VHOST_PREFIX}{uuid.uuid4().hex[:8]}"
            rabbitmqctl("add_vhost", self.vhost)
            user = AMQP_URL.split("://", 1)[1].split(":", 1)[0]
            rabbitmqctl("set_permissions", "-p", self.vhost, user, ".*", ".*", ".*")
        if self.topology.endswith("cluster"):
            from tests.topologies import start_cluster

            self.cluster_dir = tempfile.mkdtemp(prefix="postroom-bench-cluster-")
            self.cluster = start_cluster(Path(self.cluster_dir))
        else:
            self.redis.start()
        self.client = redis_client(self.state_url, socket_timeout=None)
        cli = [sys.executable, "-m", "postroom.cli"]
        api_argv = [*cli, "api", "--bind", f"{bp.HOST}:{self.api_port}"]
        if self.options.api_workers:
            api_argv += ["--workers", str(self.options.api_workers)]
        self.api = bp.spawn("api", api_argv, self.env, self.log_dir)
        bp.wait_http(f"http://{bp.HOST}:{self.api_port}/api/v1/solution/health", self.api)
        self.token = self._create_solution()
        for n in range(self.options.workers):
            argv = [*cli, "worker", "--hostname", f"bench{n + 1}@%h"]
            if self.options.worker_concurrency:
                argv += ["--concurrency", str(self.options.worker_concurrency)]
            self.workers.append(bp.spawn(f"worker{n + 1}", argv, self.env, self.log_dir))
        return self

    def parts(self) -> list[bp.Part]:
        assert self.api is not None
        parts = [self.api.part(), *(w.part() for w in self.workers)]
        if self.cluster is not None:
            nodes = enumerate(self.cluster.nodes)
            parts += [bp.Part(f"redis{i + 1}", node.proc.pid) for i, node in nodes]
        else:
            assert self.redis.proc is not None
            parts.append(bp.Part("redis", self.redis.proc.pid))
        parts.append(bp.Part("sink", self.sink.proc.pid or 0))
        broker = rabbitmq_pid() if self.vhost else None
        if broker is not None:  # the whole server's CPU: other users of it count too
            parts.append(bp.Part("rabbitmq", broker))
        return parts

    def documents(self, task_ids: list[str]) -> list[dict[str, Any] | None]:
        if self.cluster is None:
            return super().documents(task_ids)
        import json

        from postroom.shared import keys

        assert self.client is not None
        pipe = self.client.pipeline(transaction=False)
        for task_id in task_ids:
            pipe.get(keys.task(bp.SID, task_id))
        return [json.loads(raw) if raw else None for raw in pipe.execute()]

    def stop(self) -> None:
        for spawned in [*self.workers, *([self.api] if self.api else [])]:
            bp.stop(spawned)
        if self.client is not None:
            self.client.close()
        if self.cluster is not None:
            import shutil

            for node in self.cluster.nodes:
                node.stop()
            shutil.rmtree(self.cluster_dir, ignore_errors=True)
        else:
            self.redis.cleanup()
        if self.vhost:
            rabbitmqctl("delete_vhost", self.vhost)


def run(topology: str, sink: bp.Sink, log_dir: Path, options: bp.Options) -> bp.Figures:
    class Stack(TopologyStack):
        pass

    Stack.topology = topology
    bp.PostroomStack = Stack  # type: ignore[misc]  # run_postroom builds its stack by this name
    fig = bp.run_postroom(sink, log_dir, options)
    fig.name = f"postroom on {topology}"
    return fig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=2000, help="per topology and round")
    parser.add_argument("--repeat", type=int, default=3, help="rounds")
    parser.add_argument("--topologies", default=",".join(TOPOLOGIES))
    args = parser.parse_args(argv)
    topologies = [t for t in args.topologies.split(",") if t]
    options = bp.parse_args(["--messages", str(args.messages), "--no-baselines",
                             "--paced-seconds", "3"])  # fmt: skip
    bp.say(f"bench_topologies: {options.messages} messages per topology, {args.repeat} rounds")
    bp.say(f"before: {bp.load_avg()}")
    log_dir = Path(tempfile.mkdtemp(prefix="postroom-bench-"))
    rows: dict[str, list[bp.Figures]] = {t: [] for t in topologies}
    ratios: dict[str, list[float]] = {}
    failed: list[str] = []
    with bp.running_sink() as sink:
        for n in range(args.repeat):
            bp.say(f"\n#### round {n + 1} of {args.repeat}")
            shift = n % len(topologies)
            this_round: dict[str, bp.Figures] = {}
            for topology in topologies[shift:] + topologies[:shift]:
                fig = run(topology, sink, log_dir, options)
                bp.print_figures(fig)
                failed += [line for line in fig.checks if "FAILED" in line]
                rows[topology].append(fig)
                this_round[topology] = fig
            base = this_round.get("redis")
            for topology, fig in this_round.items():
                if base is None or topology == "redis":
                    continue
                ratios.setdefault(f"{topology} / redis, end to end", []).append(fig.e2e / base.e2e)
                if fig.intake and base.intake:
                    ratios.setdefault(f"{topology} / redis, intake", []).append(
                        fig.intake.rate / base.intake.rate)
    bp.say(f"\nafter: {bp.load_avg()}")
    bp.say("\n== medians (lowest - highest)")
    bp.say(f"  {'topology':<18} {'end to end msg/s':>26} {'intake req/s':>26}")
    for topology, figs in rows.items():
        e2e = sorted(f.e2e for f in figs)
        intake = sorted(f.intake.rate for f in figs if f.intake)
        bp.say(f"  {topology:<18} {statistics.median(e2e):>9.0f} ({e2e[0]:.0f} - {e2e[-1]:.0f})"
               f"      {statistics.median(intake):>9.0f} ({intake[0]:.0f} - {intake[-1]:.0f})")
    for name, values in ratios.items():
        values.sort()
        bp.say(f"  {name:<36} {statistics.median(values):.2f} "
               f"({values[0]:.2f} - {values[-1]:.2f})")
    if failed:
        bp.say(f"\nchecks FAILED (logs kept in {log_dir}):")
        for line in failed:
            bp.say(f"  {line}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
