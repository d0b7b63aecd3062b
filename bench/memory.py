#!/usr/bin/env python3
"""Peak memory of `haconfd run` against a real etcd, at several scales: a regression shows here.

For each `--scale` (default 100x10 and 2000x10), starts a private etcd (as
`reload_under_load.py` does: /dev/shm, free 127.0.0.1 ports), fills S services x I instances
(`/services/svc-NNNNN/iNN` = a unique 127.x.y.z address) in transactions, then starts
`haconfd run` (etcd source, the chosen template, `check = false`, HAProxy not driven, `[wait]`
200ms / 2s) and reads its peak RSS (VmHWM) after each phase:

  initial  start -> the file holds every instance; the peak of the first read and apply
  changes  `--changes` single changes one after the other (an instance gets a new address;
           each waits until the file shows it): change -> file p50 / p99
  burst    `--burst` puts back to back (new instances across the services): the applies it
           took, and how long after the last put the file held them all (the count depends on
           the pace of the puts: a lone change that arrived during an apply is applied as soon
           as that apply ends, see src/reactor.rs)

and the RSS once the burst has settled (what the process keeps). The template is the repo's
default one (`--template default`) or one server line per instance (`--template servers`, as
`../shared/bench/reactor_bench.py` renders).

Figures are printed (and with `--json-out`, one JSON line per scale), not asserted; with
`--max-rss-mib N` the exit code is 1 when a peak is above N MiB. Every wait is bounded; etcd
and haconfd are ended by their PIDs. Python 3 standard library only.

  cargo build --release
  python3 bench/memory.py                       # 100x10 and 2000x10, about a minute
  python3 bench/memory.py --scale 10000x10 --template servers
"""

import argparse
import http.client
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from reload_under_load import (  # noqa: E402
    REPO, Etcd, b64, free_port, percentile, stop_process, wait_until)

SERVERS_TEMPLATE = """global
    master-worker
defaults
    mode http
    timeout connect 5s
    timeout client 30s
    timeout server 30s
frontend fe
    bind 127.0.0.1:{port}
    default_backend _none
backend _none
{{% for svc in services %}}
backend be_{{{{ svc.name }}}}
    balance roundrobin
{{% for i in svc.instances %}}    server {{{{ i.id }}}} {{{{ i.addr }}}} check
{{% endfor %}}{{% endfor %}}"""

CONFIG = """[source]
kind = "etcd"
[etcd]
endpoints = ["{endpoint}"]
[[template]]
name = "haproxy"
src = "{template}"
dest = "{dir}/haproxy.cfg"
check = false
[haproxy]
mode = "none"
[frontend]
bind = ["127.0.0.1:{port}"]
[wait]
min = "200ms"
max = "2s"
[admin]
listen = "127.0.0.1:{admin}"
"""


def addr(n):
    """A unique loopback address per n (n < 2**24): the file shows it once it is applied."""
    return "127.%d.%d.%d:8080" % ((n >> 16) & 255, (n >> 8) & 255, n & 255)


class Puts:
    """Puts over one kept-alive connection to etcd's JSON gateway: about a millisecond each, so
    a burst arrives as fast as the harness's (a connection per put took several)."""

    def __init__(self, endpoint):
        host, port = endpoint.rsplit("/", 1)[1].split(":")
        self.conn = http.client.HTTPConnection(host, int(port), timeout=10)

    def put(self, key, value):
        body = json.dumps({"key": b64(key), "value": b64(value)})
        self.conn.request("POST", "/v3/kv/put", body, {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        data = r.read()
        if r.status != 200:
            raise RuntimeError(f"etcd put: HTTP {r.status}: {data[:300]!r}")

    def close(self):
        self.conn.close()


def status(pid):
    """VmHWM and VmRSS of `pid`, in KiB."""
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmHWM:", "VmRSS:")):
                k, v = line.split(":", 1)
                out[k] = int(v.split()[0])
    return out


class Dest:
    """The rendered file, read again only when a rename replaced it."""

    def __init__(self, path):
        self.path = path
        self.seen = None
        self.text = b""

    def read(self):
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return b""
        key = (st.st_ino, st.st_mtime_ns, st.st_size)
        if key != self.seen:
            with open(self.path, "rb") as f:
                self.text = f.read()
            self.seen = key
        return self.text

    def has(self, *addrs):
        text = self.read()
        return all(b" " + a.encode() + b" " in text for a in addrs)


def applies(log_path):
    """How many applies the log shows that wrote something."""
    n = 0
    with open(log_path, "rb") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            # Flattened fields (haconfd's JSON logs): "message", "apply.kind".
            if rec.get("message") == "applied" and rec.get("apply.kind") != "none":
                n += 1
    return n


def run_scale(args, services, instances):
    work = tempfile.mkdtemp(prefix="hc-bench-memory-")
    etcd = Etcd(args.etcd)
    proc = None
    try:
        etcd.start()
        keys = []
        pairs = []
        for s in range(services):
            for i in range(instances):
                key = f"/services/svc-{s:05d}/i{i:02d}"
                keys.append(key)
                pairs.append((key, addr(len(pairs))))
        etcd.put_many(pairs)
        next_addr = len(pairs)
        template = os.path.join(REPO, "templates", "haproxy.cfg.tera")
        if args.template == "servers":
            template = os.path.join(work, "servers.cfg.tera")
            with open(template, "w") as f:
                f.write(SERVERS_TEMPLATE.format(port=free_port()))
        config = os.path.join(work, "haconfd.toml")
        with open(config, "w") as f:
            f.write(CONFIG.format(endpoint=etcd.endpoint, template=template, dir=work,
                                  port=free_port(), admin=free_port()))
        dest = Dest(os.path.join(work, "haproxy.cfg"))
        log_path = os.path.join(work, "haconfd.log")
        log = open(log_path, "wb")
        started = time.monotonic()
        proc = subprocess.Popen([args.haconfd_bin, "--log-format", "json", "run", "--config",
                                 config], stdin=subprocess.DEVNULL, stdout=log, stderr=log)
        first, last = pairs[0][1], pairs[-1][1]
        wait_until(args.timeout, "the first apply", lambda: dest.has(first, last), 0.002)
        result = {"scale": f"{services}x{instances}", "template": args.template,
                  "first_apply_ms": round((time.monotonic() - started) * 1e3, 1)}
        time.sleep(0.5)
        result["initial_hwm_kib"] = status(proc.pid)["VmHWM"]

        puts = Puts(etcd.endpoint)
        rng = random.Random(1)
        times = []
        for _ in range(args.changes):
            new = addr(next_addr)
            next_addr += 1
            t0 = time.monotonic()
            puts.put(rng.choice(keys), new)
            wait_until(args.timeout, f"{new} in the file", lambda: dest.has(new), 0.001)
            times.append((time.monotonic() - t0) * 1e3)
        times.sort()
        result["change_ms_p50"] = round(percentile(times, 50), 1)
        result["change_ms_p99"] = round(percentile(times, 99), 1)
        time.sleep(0.5)
        result["changes_hwm_kib"] = status(proc.pid)["VmHWM"]

        before = applies(log_path)
        burst = []
        for j in range(args.burst):
            burst.append((f"/services/svc-{j % services:05d}/b{j:05d}", addr(next_addr)))
            next_addr += 1
        burst_start = time.monotonic()
        for key, value in burst:
            puts.put(key, value)
        put_done = time.monotonic()
        result["burst_write_ms"] = round((put_done - burst_start) * 1e3, 1)
        wait_until(args.timeout, "the burst in the file",
                   lambda: dest.has(burst[-1][1]) and dest.has(*[a for _, a in burst]), 0.002)
        result["burst_after_last_put_ms"] = round((time.monotonic() - put_done) * 1e3, 1)
        time.sleep(2.5)  # longer than [wait] max: every apply the burst causes has run
        result["burst_applies"] = applies(log_path) - before
        st = status(proc.pid)
        result["burst_hwm_kib"] = st["VmHWM"]
        result["settled_rss_kib"] = st["VmRSS"]
        puts.close()
        return result
    finally:
        stop_process(proc, 10, "haconfd")
        etcd.stop()
        if args.keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--haconfd-bin", default=os.path.join(REPO, "target", "release", "haconfd"))
    ap.add_argument("--etcd", default="etcd", help="the etcd binary (3.4+)")
    ap.add_argument("--scale", default="100x10,2000x10",
                    help="comma list of SERVICESxINSTANCES (default 100x10,2000x10)")
    ap.add_argument("--template", choices=("default", "servers"), default="default")
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--burst", type=int, default=1000)
    ap.add_argument("--timeout", type=float, default=120.0, help="bound of every wait, seconds")
    ap.add_argument("--max-rss-mib", type=float, help="exit 1 when a peak RSS is above this")
    ap.add_argument("--json-out", help="also write one JSON line per scale to this file")
    ap.add_argument("--keep", action="store_true", help="keep the temp dir (config, log, file)")
    args = ap.parse_args()
    if not os.access(args.haconfd_bin, os.X_OK):
        sys.exit(f"{args.haconfd_bin} is not executable: cargo build --release first")
    mib = lambda kib: kib / 1024.0  # noqa: E731
    print(f"{'scale':>9}  {'first apply':>11}  {'change p50/p99':>15}  {'burst (puts in)':>15}"
          f"  {'applies':>7}  {'after last put':>14}  {'peak RSS initial/changes/burst':>30}"
          f"  {'settled':>8}")
    over = False
    for scale in args.scale.split(","):
        services, instances = (int(x) for x in scale.lower().split("x"))
        r = run_scale(args, services, instances)
        peaks = (r["initial_hwm_kib"], r["changes_hwm_kib"], r["burst_hwm_kib"])
        print(f"{r['scale']:>9}  {r['first_apply_ms']:>9.0f}ms"
              f"  {r['change_ms_p50']:>6.1f}/{r['change_ms_p99']:<6.1f}ms"
              f"  {r['burst_write_ms']:>13.0f}ms  {r['burst_applies']:>7}"
              f"  {r['burst_after_last_put_ms']:>12.0f}ms"
              f"  {'%.1f / %.1f / %.1f MiB' % tuple(mib(p) for p in peaks):>30}"
              f"  {mib(r['settled_rss_kib']):>5.1f}MiB", flush=True)
        if args.json_out:
            with open(args.json_out, "a") as f:
                f.write(json.dumps(r) + "\n")
        if args.max_rss_mib is not None and max(peaks) > args.max_rss_mib * 1024:
            over = True
    if over:
        print(f"a peak RSS is above {args.max_rss_mib} MiB", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main()
