"""Flower's side of the benchmark: the same task as ``fedge simulate``, on Flower's simulation
engine (``flwr.simulation.run_simulation``, Ray backend, in-memory link state).

Runs in Flower's own virtual environment (``bench/vs_flower/.venv-flower``), imports nothing
from fedge, and reads the partition that ``run.py`` wrote with fedge's ``write_npz_partitions``
(``device-NNN.npz`` and ``test.npz``, arrays ``x`` float32 and ``y`` int64), so both frameworks
train on exactly the same samples per device.

    python flower_app.py --data DIR --out DIR [--rounds 30 --epochs 1 --batch-size 32 --lr 0.05]

Writes ``DIR/metrics.jsonl`` (one line per round: accuracy, loss, bytes) and
``DIR/summary.json`` in the shape of fedge's, so ``fedge report`` can plot both.

Bytes: Flower's simulation engine moves messages in memory, so nothing is on a wire. We count
what a deployment would have to move at the least: the float32 bytes of every array of every
``ArrayRecord`` in each train message (downlink, server -> node) and each reply (uplink,
node -> server), measured on the messages themselves (``Array.data``, the serialized numpy
buffer, is reported as well: it adds a ~128 B ``.npy`` header per tensor). Message metadata,
protobuf framing and gRPC/TLS overheads are not counted, which favours Flower.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# Never phone home, never bind outside loopback: set before flwr and ray are imported.
os.environ["FLWR_TELEMETRY_ENABLED"] = "0"
os.environ["RAY_USAGE_STATS_ENABLED"] = "0"
os.environ.setdefault("RAY_DEDUP_LOGS", "0")

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg
from flwr.simulation import run_simulation
from torch import nn

DATA_ENV = "FEDGE_BENCH_DATA"


class MLP(nn.Module):
    """fedge's ``mlp`` (models/zoo.py): 64-64-10 with ReLU, same attribute names."""

    def __init__(self, input_dim: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.fc1 = nn.Linear(input_dim, hidden)
        self.fc2 = nn.Linear(hidden, hidden)
        self.fc3 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.fc1(x))
        x = torch.relu(self.fc2(x))
        return self.fc3(x)


def build_model(input_dim: int, num_classes: int, seed: int) -> nn.Module:
    # Same recipe as fedge's build_model: torch.manual_seed(seed), then construct, so both
    # frameworks start from bit-identical weights.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return MLP(input_dim, num_classes)


def load_split(name: str) -> tuple[np.ndarray, np.ndarray]:
    with np.load(Path(os.environ[DATA_ENV]) / name) as f:
        return f["x"].astype(np.float32), f["y"].astype(np.int64)


def meta() -> dict:
    m = json.loads((Path(os.environ[DATA_ENV]) / "meta.json").read_text())
    m["devices"] = len(m["sizes"])
    return m


# -- ClientApp ------------------------------------------------------------------------------

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    torch.set_num_threads(1)  # as fedge: one intra-op thread per training step
    pid = int(context.node_config["partition-id"])
    cfg = msg.content["config"]
    m = meta()
    x, y = load_split(f"device-{pid:03d}.npz")
    model = build_model(m["input_dim"], m["num_classes"], 0)
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=float(cfg["lr"]))
    loss_fn = nn.CrossEntropyLoss()
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)
    gen = torch.Generator().manual_seed(pid * 1_000_003 + int(cfg["server-round"]))
    bs, total, seen = int(cfg["batch-size"]), 0.0, 0
    for _ in range(int(cfg["epochs"])):
        order = torch.randperm(len(yt), generator=gen)
        for s in range(0, len(yt), bs):
            idx = order[s : s + bs]
            opt.zero_grad(set_to_none=True)
            loss = loss_fn(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(idx)
            seen += len(idx)
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.state_dict()),
            "metrics": MetricRecord({"train_loss": total / max(seen, 1), "num-examples": len(y)}),
        }
    )
    return Message(content=content, reply_to=msg)


# -- ServerApp ------------------------------------------------------------------------------


def record_bytes(rec: ArrayRecord) -> tuple[int, int]:
    """(float32 payload bytes, serialized Array.data bytes) of one ArrayRecord."""
    raw = ser = 0
    for arr in rec.values():
        raw += int(np.prod(arr.shape, dtype=np.int64)) * np.dtype(arr.dtype).itemsize
        ser += len(arr.data)
    return raw, ser


class CountingFedAvg(FedAvg):
    """FedAvg that counts the array bytes of every train message and reply."""

    def __init__(self, **kw) -> None:  # type: ignore[no-untyped-def]
        super().__init__(**kw)
        self.per_round: dict[int, dict[str, int]] = {}

    def _tally(self, rnd: int) -> dict[str, int]:
        return self.per_round.setdefault(
            rnd, {"down": 0, "up": 0, "down_ser": 0, "up_ser": 0, "devices": 0}
        )

    def configure_train(self, server_round, arrays, config, grid):  # type: ignore[no-untyped-def]
        msgs = list(super().configure_train(server_round, arrays, config, grid))
        t = self._tally(server_round)
        for m in msgs:
            raw, ser = record_bytes(m.content[self.arrayrecord_key])
            t["down"] += raw
            t["down_ser"] += ser
        return msgs

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        t = self._tally(server_round)
        for r in replies:
            if r.has_content():
                raw, ser = record_bytes(r.content[self.arrayrecord_key])
                t["up"] += raw
                t["up_ser"] += ser
                t["devices"] += 1
        return super().aggregate_train(server_round, replies)


def make_server_app(args: argparse.Namespace) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        torch.set_num_threads(1)
        m = meta()
        x_test, y_test = load_split("test.npz")
        xt, yt = torch.from_numpy(x_test), torch.from_numpy(y_test)
        out = Path(args.out)
        metrics_path = out / "metrics.jsonl"
        metrics_path.unlink(missing_ok=True)
        strategy = CountingFedAvg(
            fraction_train=1.0,
            fraction_evaluate=0.0,  # central evaluation only, as fedge
            min_train_nodes=m["devices"],
            min_available_nodes=m["devices"],
        )
        t_last = [time.perf_counter()]

        def evaluate(server_round: int, arrays: ArrayRecord) -> MetricRecord:
            model = build_model(m["input_dim"], m["num_classes"], 0)
            model.load_state_dict(arrays.to_torch_state_dict())
            model.eval()
            with torch.no_grad():
                logits = model(xt)
                loss = float(nn.functional.cross_entropy(logits, yt))
                acc = float((logits.argmax(1) == yt).float().mean())
            now = time.perf_counter()
            if server_round > 0:
                t = strategy.per_round.get(server_round, {})
                rec = {
                    "round": server_round,
                    "version": server_round,
                    "devices": t.get("devices", 0),
                    "accuracy": acc,
                    "loss": loss,
                    "uplink_bytes": t.get("up", 0),
                    "downlink_bytes": t.get("down", 0),
                    "uplink_serialized_bytes": t.get("up_ser", 0),
                    "downlink_serialized_bytes": t.get("down_ser", 0),
                    "seconds": now - t_last[0],
                }
                with metrics_path.open("a") as f:
                    f.write(json.dumps(rec) + "\n")
            t_last[0] = now
            return MetricRecord({"accuracy": acc, "loss": loss})

        t0 = time.perf_counter()
        strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord(
                build_model(m["input_dim"], m["num_classes"], 0).state_dict()
            ),
            num_rounds=args.rounds,
            train_config=ConfigRecord(
                {"lr": args.lr, "epochs": args.epochs, "batch-size": args.batch_size}
            ),
            evaluate_fn=evaluate,
        )
        wall = time.perf_counter() - t0
        recs = [json.loads(line) for line in metrics_path.read_text().splitlines()]
        summary = {
            "framework": f"flwr {__import__('flwr').__version__}",
            "rounds": len(recs),
            "final_accuracy": recs[-1]["accuracy"] if recs else None,
            "final_loss": recs[-1]["loss"] if recs else None,
            "uplink_bytes": sum(r["uplink_bytes"] for r in recs),
            "downlink_bytes": sum(r["downlink_bytes"] for r in recs),
            "uplink_serialized_bytes": sum(r["uplink_serialized_bytes"] for r in recs),
            "downlink_serialized_bytes": sum(r["downlink_serialized_bytes"] for r in recs),
            "wall_seconds": round(wall, 3),
            "metrics": str(metrics_path.resolve()),
            "config": {
                "framework": "flower",
                "dataset": m["name"],
                "devices": m["devices"],
                "partition": args.partition,
                "seed": args.seed,
                "rounds": args.rounds,
                "epochs": args.epochs,
                "batch_size": args.batch_size,
                "lr": args.lr,
                "codec": "float32 arrays",
                "backend": "ray",
            },
        }
        (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")

    return app


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=0.05)
    # Only recorded (the partition is what --data holds); fedge report labels runs with them.
    p.add_argument("--partition", default="dirichlet:0.5")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-cpus", type=int, default=2, help="Ray CPUs (one actor per CPU)")
    args = p.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    os.environ[DATA_ENV] = str(args.data.resolve())
    m = meta()
    backend_config = {
        "client_resources": {"num_cpus": 1, "num_gpus": 0.0},
        "init_args": {
            "num_cpus": args.num_cpus,
            "num_gpus": 0,
            "include_dashboard": False,
            "_node_ip_address": "127.0.0.1",
            "logging_level": "ERROR",
        },
    }
    run_simulation(
        server_app=make_server_app(args),
        client_app=client_app,
        num_supernodes=m["devices"],
        backend_config=backend_config,
    )
    if not (args.out / "summary.json").is_file():
        sys.exit("flower run wrote no summary")


if __name__ == "__main__":
    main()
