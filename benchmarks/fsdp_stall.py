#!/usr/bin/env python3
"""The loop's stall per sharded save under `torchrun --fsdp`: async (the default) vs --no-async-save.

Runs the same 2-rank FSDP2 job twice (gloo on CPU, or nccl where there are 2 GPUs) and reads each
save's `stall_s` and `write_s` from the metrics file. With async saving each rank only copies its
shards to host memory and the loop goes on; with --no-async-save it waits for the whole commit
(every rank's DCP write, the digests, state.pt, the backup copy, latest).

    python benchmarks/fsdp_stall.py --n-layer 6 --n-embd 512 --steps 12 --every 3

With --node-local (root, `unshare`): the async job on one shared directory against the same job as
two "nodes", each a torchrun launcher in its own mount namespace with a directory of its own at the
--checkpoint-dir path, where rank 0 collects node 1's shards at every save (issue 24). Adding
--mirror runs it a third time with --mirror on a real S3 endpoint on loopback (moto's server, as
the tests use): node 1 then uploads its own shards and rank 0 commits once they are verified.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from conftest_free_corpus import write_corpus

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def s3_on_loopback() -> tuple[object, str]:
    """moto's S3 server on 127.0.0.1 with a bucket "bench"; returns (server, its endpoint URL)."""
    import s3fs
    from moto.server import ThreadedMotoServer

    os.environ.update(CREDENTIALS)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    url = f"http://127.0.0.1:{server._server.port}"  # noqa: SLF001 - moto exposes the bound port only here
    s3fs.S3FileSystem(endpoint_url=url).makedirs("bench", exist_ok=True)
    return server, url


def train_args(args: argparse.Namespace, async_save: bool) -> list[str]:
    return ["-m", "train_improved", "--fsdp", "--data", "corpus.txt", "--n-layer", str(args.n_layer),
            "--n-embd", str(args.n_embd), "--n-head", "8", "--block-size", "64", "--batch-size", "4",
            "--mini-batch-size", "2", "--max-steps", str(args.steps), "--checkpoint-freq", str(args.every),
            "--eval-interval", str(10**6), "--eval-steps", "1", "--sample-length", "0", "--keep-checkpoints", "2",
            "--async-save" if async_save else "--no-async-save"]


def run(workdir: Path, args: argparse.Namespace, async_save: bool, node_local: bool = False,
        mirror: list[str] = ()) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", **CREDENTIALS}
    if not node_local:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               *train_args(args, async_save)]
        proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, env=env)
        failed = proc.stderr if proc.returncode != 0 else None
    else:  # two launchers, each with its own directory mounted at the same --checkpoint-dir path
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        nodes = []
        for node in (0, 1):
            (workdir / f"disk_{node}").mkdir()
            (workdir / "checkpoints").mkdir(exist_ok=True)
            torchrun = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--node-rank", str(node),
                        "--nproc-per-node", "1", "--master-addr", "127.0.0.1", "--master-port", str(port),
                        *train_args(args, async_save), *mirror]
            script = f"mount --bind {workdir / f'disk_{node}'} {workdir / 'checkpoints'} && exec {shlex.join(torchrun)}"
            nodes.append(subprocess.Popen(["unshare", "--mount", "--propagation", "private", "bash", "-c", script],
                                          cwd=workdir, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                          text=True))
        errors = [p.communicate()[1] for p in nodes]
        failed = next((e for p, e in zip(nodes, errors, strict=True) if p.returncode != 0), None)
    if failed is not None:
        raise SystemExit(f"torchrun failed:\n{failed[-3000:]}")
    records = [json.loads(line) for line in (workdir / "runs" / "metrics.jsonl").read_text().splitlines()]
    # The final save at the last step is waited for either way: only the saves the loop ran past count.
    return [r for r in records if r["event"] == "checkpoint" and r["kind"] == "rolling" and r["step"] < args.steps]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-layer", type=int, default=6)
    ap.add_argument("--n-embd", type=int, default=512)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--every", type=int, default=3)
    ap.add_argument("--node-local", action="store_true", help="one shared directory vs two nodes' own disks")
    ap.add_argument("--mirror", action="store_true", help="with --node-local: also each node uploading its own shards")
    args = ap.parse_args()
    runs = [("shared", True, False), ("node-local", True, True)] if args.node_local else \
        [("async", True, False), ("sync", False, False)]
    mirror: list[str] = []
    if args.node_local and args.mirror:
        import logging

        logging.getLogger("werkzeug").setLevel(logging.WARNING)
        server, url = s3_on_loopback()
        mirror = ["--mirror", "s3://bench/run", "--mirror-options", json.dumps({"endpoint_url": url})]
        runs.append(("node-local+mirror", True, True))
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, async_save, node_local in runs:
            d = Path(tmp) / name
            d.mkdir()
            write_corpus(d / "corpus.txt")
            rows[name] = run(d, args, async_save, node_local, mirror if name.endswith("mirror") else [])
    med = statistics.median
    first, *others = rows
    size = rows[first][0]["bytes"] / 1e6
    print(f"2 ranks, --fsdp, {args.n_layer} layers x {args.n_embd}: {len(rows[first])} rolling saves of {size:.0f} MB "
          "(checkpoint and its backup); medians")
    for name, saves in rows.items():
        print(f"{name:>17}: stall {med(r['stall_s'] for r in saves):.3f} s   write {med(r['write_s'] for r in saves):.3f} s")
    for other in others:
        for what in ("stall", "write"):
            print(f"{what} {first} / {other}: "
                  f"{med(r[what + '_s'] for r in rows[first]) / med(r[what + '_s'] for r in rows[other]):.3f}")


if __name__ == "__main__":
    main()
