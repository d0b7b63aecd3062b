#!/usr/bin/env python3
"""How long each forensic command takes at scale, against a real etcd with a history.

Starts a private etcd (as `reload_under_load.py` does: /dev/shm, free 127.0.0.1 ports), fills
`--scale` services x instances (default 2000x10) in transactions, starts `haconfd run` (HAProxy
not driven, `check = false`, the fleet view published) so that applies are dated, then makes
`--changes` changes (instances moved, added, removed, drained; default 300) at `--pace` seconds
apart, and times, `--repeat` times each (median and max printed):

  render --print --revision <a revision in the middle of the changes>
  render --print --at <a time in the middle of the changes>
  render --diff --from <the revision before the changes>
  render --explain
  render --explain --json
  history
  history --service <a changed service>
  history --since 1m

Every address is 127.0.0.1. Every wait is bounded; etcd and haconfd are ended by their PIDs.
Python 3 standard library only.

  python3 bench/forensics.py --haconfd-bin target/release/haconfd
"""

import argparse
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reload_under_load import REPO, Etcd, free_port, stop_process, wait_until  # noqa: E402

CONFIG = """[source]
kind = "etcd"
[etcd]
endpoints = ["{endpoint}"]
[[template]]
name = "haproxy"
src = "{repo}/templates/haproxy.cfg.tera"
dest = "{dir}/haproxy.cfg"
check = false
[haproxy]
mode = "none"
[frontend]
bind = ["127.0.0.1:{port}"]
[guard]
max_drop_percent = 100
[admin]
listen = "127.0.0.1:{admin}"
[fleet]
node = "bench-node"
"""


def timed(binary, config, args, repeat):
    times = []
    out = b""
    for _ in range(repeat):
        start = time.monotonic()
        p = subprocess.run([binary, *args, "--config", config], stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=120)
        times.append(time.monotonic() - start)
        if p.returncode != 0:
            raise RuntimeError(f"{' '.join(args)} exited {p.returncode}: {p.stderr[-2000:]!r}")
        out = p.stdout
    return times, out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haconfd-bin", default=os.path.join(REPO, "target/release/haconfd"))
    ap.add_argument("--scale", default="2000x10")
    ap.add_argument("--changes", type=int, default=300)
    ap.add_argument("--pace", type=float, default=0.01, help="seconds between two changes")
    ap.add_argument("--repeat", type=int, default=5)
    args = ap.parse_args()
    services, instances = (int(x) for x in args.scale.split("x"))
    rng = random.Random(13)

    etcd = Etcd()
    work = tempfile.mkdtemp(prefix="hc-bench-forensics-")
    daemon = None
    try:
        etcd.start()
        pairs = [(f"/services/svc{s:05d}/i{i:02d}", f"127.0.0.1:{20000 + i}")
                 for s in range(services) for i in range(instances)]
        etcd.put_many(pairs)
        config = os.path.join(work, "haconfd.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(endpoint=etcd.endpoint, repo=REPO, dir=work,
                                  port=free_port(), admin=free_port()))
        log = open(os.path.join(work, "haconfd.log"), "wb")
        daemon = subprocess.Popen([args.haconfd_bin, "run", "--config", config],
                                  stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
        dest = os.path.join(work, "haproxy.cfg")
        wait_until(60, "the first apply", lambda: os.path.exists(dest), 0.05)
        time.sleep(1.5)  # the fleet record of the first apply
        before = int(etcd.call("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        middle_rev, middle_time = None, None
        changed = f"/services/svc{7:05d}/"
        for n in range(args.changes):
            s = 7 if n % 10 == 0 else rng.randrange(services)
            key = f"/services/svc{s:05d}/i{rng.randrange(instances + 2):02d}"
            kind = n % 4
            if kind == 0:
                etcd.put(key, f"127.0.0.1:{21000 + rng.randrange(1000)}")
            elif kind == 1:
                etcd.put(key, '{"addr":"127.0.0.1:%d","weight":%d,"state":"drain"}'
                         % (22000 + rng.randrange(1000), rng.randrange(257)))
            elif kind == 2:
                etcd.delete(key)
            else:
                etcd.put(key, f"127.0.0.1:{23000 + rng.randrange(1000)}")
            if n == args.changes // 2:
                time.sleep(1.2)
                middle_time = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
                middle_rev = int(etcd.call("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
                time.sleep(1.2)
            time.sleep(args.pace)
        time.sleep(1.5)  # the last fleet record
        now = int(etcd.call("/v3/kv/range", {"key": "AA=="})["header"]["revision"])
        print(f"scale {args.scale}, {args.changes} changes, revisions {before}..{now}; "
              f"median / max of {args.repeat} runs (wall clock, process start to exit)")
        cases = [
            ("render --print --revision", ["render", "--print", "--revision", str(middle_rev)]),
            ("render --print --at", ["render", "--print", "--at", middle_time]),
            ("render --diff --from", ["render", "--diff", "--from", str(before)]),
            ("render --explain", ["render", "--explain"]),
            ("render --explain --json", ["render", "--explain", "--json"]),
            ("history", ["history"]),
            ("history --service", ["history", "--service", changed.split("/")[2]]),
            ("history --since 1m", ["history", "--since", "1m"]),
        ]
        for name, cmd in cases:
            try:
                times, out = timed(args.haconfd_bin, config, cmd, args.repeat)
            except RuntimeError as e:
                print(f"{name:28} failed: {e}")
                continue
            print(f"{name:28} {statistics.median(times) * 1000:7.0f} ms  "
                  f"max {max(times) * 1000:6.0f} ms  ({len(out) / 1e6:.1f} MB out)")
    finally:
        stop_process(daemon, 15, "haconfd")
        etcd.stop()


if __name__ == "__main__":
    main()
