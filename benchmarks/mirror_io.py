#!/usr/bin/env python3
"""The mirror's cost, against baselines measured in the same run, on a real S3 endpoint.

  * loop stall per save with --mirror on vs off, the same run otherwise (goal: ratio <= 1.05);
  * upload throughput of the mirror vs a plain `fs.put_file` of the same file to the same endpoint
    (goal: >= 0.8): on S3, one read, concurrent parts, each checked by the server's MD5; and, for
    reference, the protocol of stores without server MD5s (temporary key, streamed read-back, move);
  * bytes uploaded per save / bytes of the checkpoint file (goal: <= 1.05; below 1 when the uploader
    skips intermediate rolling files while it lags).

The endpoint is moto's server mode in a separate process on 127.0.0.1 (so it does not share this
process's CPU time with training).

    python benchmarks/mirror_io.py                      # a 37 MB state, saved every 10 steps
    python benchmarks/mirror_io.py --n-embd 64 --steps 10 --every 5 --large-mb 8   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from train_improved.checkpoint import CheckpointManager, CheckpointOptions, read_footer
from train_improved.checkpoint.remote import RemoteStore
from train_improved.config import resolve
from train_improved.metrics import MetricsLogger
from train_improved.signals import GracefulStop
from train_improved.trainer import Trainer

CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


def start_s3() -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    # niced: a real endpoint does not take this machine's cores from training
    proc = subprocess.Popen(["nice", "-n", "19", sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.1).close()
            return proc, url
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("moto server did not start")


def run(options: dict, workdir: Path, mirror: RemoteStore | None) -> tuple[list[dict], int]:
    """The run's metrics records, and the bytes its mirror uploaded (0 without one)."""
    cfg = resolve(cli={**options, "checkpoint_dir": str(workdir / "ck"), "metrics_file": str(workdir / "m.jsonl"),
                       "sample_length": 0, "eval_interval": 10**6}, environ={}, config_file=None)
    trainer = Trainer(cfg)
    manager = CheckpointManager(cfg.checkpoint_dir, CheckpointOptions(save_every=cfg.checkpoint_freq))
    if mirror is not None:
        manager.attach_mirror(mirror)
    with GracefulStop() as stop:
        trainer.run(stop, manager, MetricsLogger(cfg.metrics_path))
    uploader = manager.mirror
    manager.close()
    sent = uploader.uploaded_bytes if uploader is not None else 0
    return [json.loads(line) for line in cfg.metrics_path.read_text().splitlines()], sent


def compare_uploads(remote: RemoteStore, path: Path, repeats: int = 3) -> None:
    """Median seconds of: a plain fs.put_file, the mirror's upload, the mirror's read-back protocol."""
    size, digest = path.stat().st_size, read_footer(path)["digest"]
    times: dict[str, list[float]] = {"plain": [], "mirror": [], "read-back": []}
    for i in range(repeats):
        t = time.perf_counter()
        remote.fs.put_file(str(path), f"{remote.root}-plain/{i}.pt")
        times["plain"].append(time.perf_counter() - t)
        for name, server_md5 in (("mirror", True), ("read-back", False)):
            remote.delete({f"objects/{digest}.pt"})
            remote.server_md5 = server_md5
            t = time.perf_counter()
            remote.upload(path)
            times[name].append(time.perf_counter() - t)
    remote.server_md5 = True
    p, o, r = (statistics.median(times[k]) for k in ("plain", "mirror", "read-back"))
    print(f"upload of {size / 2**20:.1f} MiB: plain fs.put_file {size / p / 2**20:.0f} MiB/s; mirror "
          f"{size / o / 2**20:.0f} MiB/s, throughput ratio {p / o:.2f}; with a read-back instead of the "
          f"server's MD5s {size / r / 2**20:.0f} MiB/s, ratio {p / r:.2f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-embd", type=int, default=256)
    ap.add_argument("--steps", type=int, default=160)
    ap.add_argument("--every", type=int, default=10)
    ap.add_argument("--large-mb", type=int, default=200, help="a second, larger file for the upload comparison")
    args = ap.parse_args()
    os.environ.update(CREDENTIALS)
    server, endpoint = start_s3()
    try:
        import s3fs

        s3fs.S3FileSystem(endpoint_url=endpoint).makedirs("bench", exist_ok=True)
        # Steps of ~0.15 s and a save every 10 of them: the local writer keeps up without a mirror, so a
        # change in stall is the mirror's (saves faster than the disk can take them measure the disk).
        options = {"n_layer": 4, "n_head": 4, "n_embd": args.n_embd, "block_size": 64, "batch_size": 16,
                   "mini_batch_size": 16, "max_steps": args.steps, "checkpoint_freq": args.every, "device": "cpu"}
        with tempfile.TemporaryDirectory() as tmp:
            off, _ = run(options, Path(tmp) / "off", None)
            remote = RemoteStore.open("s3://bench/run", {"endpoint_url": endpoint})
            on, sent = run(options, Path(tmp) / "on", remote)
            stall = {name: statistics.median(r["stall_s"] for r in recs if r["event"] == "checkpoint")
                     for name, recs in (("off", off), ("on", on))}
            saves = [r for r in on if r["event"] == "checkpoint"]
            objects = len(remote.fs.ls("bench/run/objects"))
            file_bytes = (Path(tmp) / "on" / "ck" / "latest.pt").stat().st_size
            distinct = len({r["step"] for r in saves})
            print(f"state file {file_bytes / 2**20:.1f} MiB, {len(saves)} saves at {distinct} steps, "
                  f"every {args.every} steps")
            print(f"loop stall per save: mirror off {1e3 * stall['off']:.1f} ms, on {1e3 * stall['on']:.1f} ms, "
                  f"on/off {stall['on'] / stall['off']:.3f}")
            # Retention deletes old objects, so count uploads, not what the mirror holds at the end.
            print(f"uploaded {sent / 2**20:.1f} MiB = {sent / file_bytes:.2f} files for {len(saves)} checkpoint files "
                  f"saved ({objects} on the mirror now): bytes uploaded per save / file "
                  f"{sent / len(saves) / file_bytes:.3f}")
            large = Path(tmp) / "large"
            with CheckpointManager(large, CheckpointOptions(async_save=False)) as m:
                m.save({"w": torch.randn(args.large_mb << 18)}, step=1)
            # Seven rounds of the small upload (a quarter second each on this machine, noisy), three of the large.
            for path, repeats in ((Path(tmp) / "on" / "ck" / "latest.pt", 7), (large / "latest.pt", 3)):
                compare_uploads(remote, path, repeats)
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
