#!/usr/bin/env python3
"""Reloads under load, and server-only changes without reloads, against a real HAProxy.

Starts `haconfd run` (supervise mode; file source, or with `--source etcd` a private etcd) in a
temp dir, with two local HTTP backends, all on 127.0.0.1, then:

  (a) runs keep-alive and `Connection: close` clients through HAProxy while triggering
      structural registry changes (a new service each time), each waiting for its reload to be
      confirmed in haconfd's log, and prints failed/total requests per client kind;
  (b) flips one instance's port between the two backends, and prints the number of reloads
      and p50/p99 of change -> served (registry file written -> a request answered by the new
      backend; with `--source etcd`, the put returned -> a request answered by the new backend).

`--source etcd` starts its own etcd (the Debian `etcd` binary, 3.4) with its data dir under
/dev/shm and free 127.0.0.1 client and peer ports, writes the registry through etcd's v3 JSON
gateway (`/v3/kv/put`, `/v3/kv/txn`, `/v3/kv/deleterange`), seeds the `--fill` services in
transactions of at most 128 puts before haconfd starts, and stops etcd by its PID at the end
(SIGTERM, then SIGKILL after 10 s).

Limit: HAProxy needs about one file descriptor per server line plus 2 x maxconn, and it cannot
raise its FD limit past the hard RLIMIT_NOFILE it inherits. On a machine whose hard limit is
20000 (`ulimit -Hn`), with `spare_slots = 2` (12 server lines per 10-instance service) the
largest registry HAProxy starts with is about `--fill 1500`; past that HAProxy refuses to start
(`Cannot raise FD limit` in haconfd's log) and the script says so.

Python 3 standard library only. Every wait is bounded; every process is ended by its PID.
"""

import argparse
import base64
import http.client
import http.server
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(sock_path, cmd, timeout=2.0):
    """One command on an HAProxy CLI socket (master or runtime); the whole answer, or None."""
    try:
        with socket.socket(socket.AF_UNIX) as s:
            s.settimeout(timeout)
            s.connect(sock_path)
            s.sendall(cmd.encode() + b"\n")
            s.shutdown(socket.SHUT_WR)
            out = b""
            while True:
                chunk = s.recv(65536)
                if not chunk:
                    return out.decode(errors="replace")
                out += chunk
    except OSError:
        return None


def show_proc(master_sock):
    """(master pid, reloads, failed, workers) from `show proc`, or None."""
    text = cli(master_sock, "show proc")
    if not text:
        return None
    master = None
    workers = 0
    section = ""
    for line in text.splitlines():
        if line.startswith("#"):
            section = line
            continue
        f = line.split()
        if len(f) > 2 and f[1] == "master":
            failed = 0
            m = re.search(r"\[failed: (\d+)\]", line)
            if m:
                failed = int(m.group(1))
            master = (int(f[0]), int(f[2]), failed)
        elif len(f) > 1 and f[1] == "worker" and "workers" in section:
            workers += 1
    if master is None:
        return None
    return master + (workers,)


class FdLimitError(RuntimeError):
    """HAProxy refused to start: the registry needs more FDs than the hard limit allows."""


def hard_nofile():
    try:
        import resource
        return resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    except (ImportError, OSError, ValueError):
        return "unknown"


def wait_until(timeout, what, fn, interval=0.01):
    deadline = time.monotonic() + timeout
    while True:
        v = fn()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Backend:
    """A local HTTP/1.1 server answering every GET with its name (keep-alive capable)."""

    def __init__(self, name):
        body = name.encode()

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self):
                # One write: headers and body in two small writes meet Nagle and delayed ACKs
                # on a kept-alive connection (a 40 ms stall per request).
                close = self.headers.get("Connection", "").lower() == "close"
                self.close_connection = close
                self.wfile.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n%s\r\n%s"
                    % (len(body), b"Connection: close\r\n" if close else b"", body))

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

            def handle_error(self, request, client_address):
                pass  # HAProxy's TCP health checks connect and reset: not an error.

        self.name = name
        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()


def get_close(port, host, timeout=5.0):
    """One request on a new connection with `Connection: close`; (status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", "/", headers={"Host": host, "Connection": "close"})
        r = conn.getresponse()
        return r.status, r.read().decode(errors="replace")
    finally:
        conn.close()


class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.total = 0
        self.failed = 0
        self.retried = 0
        self.errors = {}

    def add(self, ok, retried=False, error=None):
        with self.lock:
            self.total += 1
            if not ok:
                self.failed += 1
                key = error or "?"
                self.errors[key] = self.errors.get(key, 0) + 1
            if retried:
                self.retried += 1


def keepalive_client(port, stop, stats, max_requests, pause):
    """Persistent connections. Like every HTTP client, it retries once an idempotent request
    whose reused connection was closed before any byte of the answer came (RFC 9112 9.3.1):
    that is a close racing the request, not a lost request. Such retries are counted."""
    conn = None
    reused = False
    n = 0
    while not stop.is_set() and n < max_requests:
        n += 1
        attempt = 0
        while True:
            attempt += 1
            if conn is None:
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
                reused = False
            try:
                conn.request("GET", "/", headers={"Host": "web"})
                r = conn.getresponse()
                body = r.read()
                ok = r.status == 200 and body.startswith(b"backend-")
                stats.add(ok, retried=attempt > 1, error=None if ok else f"status {r.status}")
                if r.will_close:
                    conn.close()
                    conn = None
                else:
                    reused = True
                break
            except (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError) as e:
                was_reused = reused
                conn.close()
                conn = None
                if was_reused and attempt == 1:
                    continue
                stats.add(False, retried=attempt > 1, error=type(e).__name__)
                break
            except (OSError, http.client.HTTPException) as e:
                conn.close()
                conn = None
                stats.add(False, retried=attempt > 1, error=type(e).__name__)
                break
        if pause:
            time.sleep(pause)
    if conn is not None:
        conn.close()


def close_client(port, stop, stats, max_requests, pause):
    n = 0
    while not stop.is_set() and n < max_requests:
        n += 1
        try:
            status, body = get_close(port, "web")
            ok = status == 200 and body.startswith("backend-")
            stats.add(ok, error=None if ok else f"status {status}")
        except (OSError, http.client.HTTPException) as e:
            stats.add(False, error=type(e).__name__)
        if pause:
            time.sleep(pause)


def percentile(sorted_values, p):
    if not sorted_values:
        return float("nan")
    k = min(len(sorted_values) - 1, max(0, int(round(p / 100.0 * len(sorted_values))) - 1))
    return sorted_values[k]


def b64(text):
    return base64.b64encode(text.encode()).decode()


def stop_process(proc, grace, what):
    """SIGTERM to a process this bench started (by its Popen, so by PID), SIGKILL after `grace`
    seconds; returns its exit code (None: it had exited already, or never started)."""
    if proc is None or proc.poll() is not None:
        return None
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        print(f"{what} did not stop within {grace:.0f}s: SIGKILL", file=sys.stderr)
        proc.kill()
        return proc.wait(timeout=10)


class Etcd:
    """A private etcd on 127.0.0.1: data dir under /dev/shm, free client and peer ports, written
    through the v3 JSON gateway with urllib."""

    START_TIMEOUT = 20.0
    STOP_TIMEOUT = 10.0
    MAX_TXN_OPS = 128  # etcd's default --max-txn-ops

    def __init__(self, binary="etcd"):
        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        self.dir = tempfile.mkdtemp(prefix="hc-bench-etcd-", dir=base)
        self.client_port = free_port()
        self.peer_port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.client_port}"
        self.log_path = os.path.join(self.dir, "etcd.log")
        self.binary = binary
        self.proc = None

    def start(self):
        client = self.endpoint
        peer = f"http://127.0.0.1:{self.peer_port}"
        self.log = open(self.log_path, "wb")
        self.proc = subprocess.Popen(
            [self.binary, "--name", "bench", "--data-dir", os.path.join(self.dir, "data"),
             "--listen-client-urls", client, "--advertise-client-urls", client,
             "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
             "--initial-cluster", f"bench={peer}", "--initial-cluster-state", "new"],
            stdin=subprocess.DEVNULL, stdout=self.log, stderr=self.log)
        wait_until(self.START_TIMEOUT, f"etcd on {client} to be healthy", self.healthy, 0.05)

    def log_text(self):
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def healthy(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"etcd exited with {self.proc.returncode}:\n"
                               + self.log_text()[-3000:])
        try:
            with urllib.request.urlopen(self.endpoint + "/health", timeout=2) as r:
                return r.status == 200 and json.loads(r.read()).get("health") == "true"
        except (OSError, ValueError, http.client.HTTPException):
            return False

    def call(self, path, body):
        """POST a JSON body to the v3 gateway; the decoded answer."""
        req = urllib.request.Request(
            self.endpoint + path, data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        try:
            with urllib.request.urlopen(req, timeout=10) as r:
                return json.loads(r.read())
        except urllib.error.HTTPError as e:
            raise RuntimeError(f"etcd {path}: HTTP {e.code}: {e.read()[:500]!r}") from None

    def put(self, key, value):
        self.call("/v3/kv/put", {"key": b64(key), "value": b64(value)})

    def delete(self, key):
        self.call("/v3/kv/deleterange", {"key": b64(key)})

    def put_many(self, pairs):
        """Puts in transactions of at most MAX_TXN_OPS puts each; returns the number of txns."""
        n = 0
        for i in range(0, len(pairs), self.MAX_TXN_OPS):
            ops = [{"requestPut": {"key": b64(k), "value": b64(v)}}
                   for k, v in pairs[i:i + self.MAX_TXN_OPS]]
            r = self.call("/v3/kv/txn", {"success": ops})
            if not r.get("succeeded"):
                raise RuntimeError(f"etcd txn not succeeded: {str(r)[:500]}")
            n += 1
        return n

    def count(self, prefix):
        end = prefix[:-1] + chr(ord(prefix[-1]) + 1)
        r = self.call("/v3/kv/range", {"key": b64(prefix), "range_end": b64(end),
                                       "count_only": True})
        return int(r.get("count", 0))

    def stop(self, keep=False):
        stop_process(self.proc, self.STOP_TIMEOUT, "etcd")
        if self.proc is not None:
            self.log.close()
        if keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


class Bench:
    def __init__(self, args):
        self.args = args
        self.dir = tempfile.mkdtemp(prefix="hc-bench-")
        self.registry = os.path.join(self.dir, "registry.yaml")
        self.config = os.path.join(self.dir, "haconfd.toml")
        self.dest = os.path.join(self.dir, "out", "haproxy.cfg")
        self.run = os.path.join(self.dir, "run")
        self.master_sock = os.path.join(self.run, "master.sock")
        self.runtime_sock = os.path.join(self.run, "admin.sock")
        self.log_path = os.path.join(self.dir, "haconfd.log")
        self.port = free_port()
        self.backends = []
        self.daemon = None
        self.masters = set()
        self.route_host = None
        self.etcd = None
        # etcd mode: what this script last wrote under /services/web/ and /routes/, so that a
        # write puts only what changed and deletes what the file mode would leave out.
        self.etcd_written = {}
        # --fill: services of --fill-instances instances each, in maintenance (`disabled`, so
        # HAProxy sends them no health check) on 127.0.0.1 ports nothing listens on: the scale
        # of the registry without load on the machine.
        if args.source == "file":
            self.filler = "".join(
                "  fill-%05d:\n" % n
                + "".join("    i%02d: '{\"addr\":\"127.0.0.1:%d\",\"state\":\"maint\"}'\n"
                          % (k, 20000 + k) for k in range(args.fill_instances))
                for n in range(args.fill))
        else:
            # The same services and values as keys, seeded once before haconfd starts.
            self.filler = ""
            self.filler_pairs = [
                ("/services/fill-%05d/i%02d" % (n, k),
                 '{"addr":"127.0.0.1:%d","state":"maint"}' % (20000 + k))
                for n in range(args.fill) for k in range(args.fill_instances)]

    # -- setup -------------------------------------------------------------------------------

    def write_atomic(self, path, text):
        tmp = path + ".tmp-write"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)

    def write_registry(self, web_addr, route_host=None):
        """web: one instance `a`; with `route_host`, a route for web on hosts web and that one
        (a changed route is new acl lines: a reload, and no instance ever goes away)."""
        if self.etcd is not None:
            return self.write_etcd(web_addr, route_host)
        text = "services:\n  web:\n    a: \"%s\"\n" % web_addr
        text += self.filler
        if route_host:
            text += "routes:\n  web: '{\"hosts\":[\"web\",\"%s\"]}'\n" % route_host
        self.write_atomic(self.registry, text)

    def write_etcd(self, web_addr, route_host):
        """The registry of write_registry as etcd keys: puts what changed since the last write,
        the web instance first, and deletes the route when the file mode would leave it out."""
        want = {"/services/web/a": web_addr}
        if route_host:
            want["/routes/web"] = '{"hosts":["web","%s"]}' % route_host
        for key, value in want.items():
            if self.etcd_written.get(key) != value:
                self.etcd.put(key, value)
                self.etcd_written[key] = value
        for key in [k for k in self.etcd_written if k not in want]:
            self.etcd.delete(key)
            del self.etcd_written[key]

    def start(self):
        self.backends = [Backend("backend-1"), Backend("backend-2")]
        b1 = self.backends[0]
        if self.args.source == "etcd":
            self.etcd = Etcd(self.args.etcd)
            t0 = time.monotonic()
            self.etcd.start()
            print(f"etcd {self.etcd.endpoint} healthy in {time.monotonic() - t0:.1f}s "
                  f"(data dir {self.etcd.dir})", flush=True)
            if self.filler_pairs:
                t0 = time.monotonic()
                txns = self.etcd.put_many(self.filler_pairs)
                n = self.etcd.count("/services/")
                print(f"seeded {len(self.filler_pairs)} filler keys in {txns} txns in "
                      f"{time.monotonic() - t0:.1f}s ({n} keys under /services/)", flush=True)
                if n != len(self.filler_pairs):
                    raise RuntimeError(f"etcd holds {n} keys under /services/, "
                                       f"expected {len(self.filler_pairs)}")
            source = f"""[source]
kind = "etcd"
prefixes = ["/services/", "/routes/"]

[etcd]
endpoints = ["{self.etcd.endpoint}"]
"""
        else:
            source = f"""[source]
kind = "file"
prefixes = ["/services/", "/routes/"]

[file]
path = "{self.registry}"
"""
        self.write_registry(f"127.0.0.1:{b1.port}")
        template = os.path.join(REPO, "templates", "haproxy.cfg.tera")
        self.write_atomic(
            self.config,
            f"""{source}
[[template]]
name = "haproxy"
src = "{template}"
dest = "{self.dest}"
check = true

[haproxy]
mode = "supervise"
master_socket = "{self.master_sock}"
runtime_socket = "{self.runtime_sock}"
state_file = "{self.run}/server-state"
spare_slots = 2
reload_timeout = "20s"

[wait]
min = "50ms"
max = "500ms"

[frontend]
bind = ["127.0.0.1:{self.port}"]

[admin]
listen = "127.0.0.1:{free_port()}"
""",
        )
        env = dict(os.environ)
        env.pop("HACONFD_CONFIG", None)
        env["HACONFD_LOG"] = self.args.log
        self.log = open(self.log_path, "wb")
        self.daemon = subprocess.Popen(
            [self.args.haconfd, "run", "--config", self.config],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        t0 = time.monotonic()
        try:
            info = wait_until(30, "HAProxy started by haconfd", self.proc_with_worker)
        except TimeoutError as e:
            raise TimeoutError(f"{e}; the end of haconfd's log:\n"
                               + self.log_text()[-3000:]) from None
        print(f"HAProxy started after {time.monotonic() - t0:.1f}s", flush=True)
        self.masters.add(info[0])
        wait_until(30, "HAProxy to serve backend-1", lambda: self.served("backend-1"))

    def proc_with_worker(self):
        if self.daemon.poll() is not None:
            raise RuntimeError("haconfd exited:\n" + self.log_text()[-3000:])
        if "Cannot raise FD limit" in self.log_text():
            lines = self.args.fill * (self.args.fill_instances + 2) + 1 + 2
            raise FdLimitError(
                f"HAProxy could not start: `Cannot raise FD limit` in haconfd's log "
                f"({self.log_path}, kept with --keep). The registry makes about {lines} server "
                f"lines; HAProxy needs about one file descriptor per server line plus 2 x "
                f"maxconn, and the hard "
                f"RLIMIT_NOFILE here is {hard_nofile()}. Lower --fill (about 1500 fits a hard "
                f"limit of 20000 with spare_slots = 2) or raise the hard limit.")
        p = show_proc(self.master_sock)
        return p if p and p[3] > 0 else None

    def served(self, body, host="web"):
        try:
            status, got = get_close(self.port, host, timeout=2)
            return status == 200 and got == body
        except (OSError, http.client.HTTPException):
            return False

    def log_text(self):
        with open(self.log_path, "rb") as f:
            return f.read().decode(errors="replace")

    def applied(self, kind):
        needle = f'apply.kind="{kind}"'
        return sum(1 for line in self.log_text().splitlines() if " applied " in line and needle in line)

    def served_ahead(self):
        """Server-only changes HAProxy took before their file (logged `served`, the file follows
        as an `applied` of its own)."""
        return sum(1 for line in self.log_text().splitlines()
                   if "served through the Runtime API" in line)

    def failed_applies(self):
        return sum(1 for line in self.log_text().splitlines() if "apply failed" in line)

    # -- (a) reloads under load -------------------------------------------------------------

    def reloads_under_load(self):
        a = self.args
        stop = threading.Event()
        ka, cl = Stats(), Stats()
        threads = []
        for _ in range(a.keepalive_clients):
            threads.append(threading.Thread(
                target=keepalive_client, args=(self.port, stop, ka, a.max_requests, a.pause)))
        for _ in range(a.close_clients):
            threads.append(threading.Thread(
                target=close_client, args=(self.port, stop, cl, a.max_requests, a.pause)))
        for t in threads:
            t.start()
        b1 = self.backends[0]
        before = show_proc(self.master_sock)
        logged = self.applied("reload")
        started = time.monotonic()
        done = 0
        try:
            for i in range(a.reloads):
                if time.monotonic() - started > a.max_seconds:
                    print(f"  stopped after {a.max_seconds}s with {done} reloads", flush=True)
                    break
                # A new route host each time: new acl lines, so a reload.
                self.write_registry(f"127.0.0.1:{b1.port}", f"h{i}.example")
                wait_until(30, f"reload #{i + 1} in the log",
                           lambda: self.applied("reload") >= logged + i + 1 or self.failed_applies())
                if self.failed_applies():
                    raise RuntimeError("an apply failed:\n" + self.log_text()[-3000:])
                done += 1
                self.route_host = f"h{i}.example"
        finally:
            # Let the clients run a moment past the last reload, then stop them.
            time.sleep(0.5)
            stop.set()
            for t in threads:
                t.join(timeout=30)
        after = show_proc(self.master_sock)
        elapsed = time.monotonic() - started
        print(f"(a) {done} reloads under load in {elapsed:.1f}s "
              f"(show proc: reloads {before[1]} -> {after[1]}, failed {after[2]})")
        for name, s in (("keep-alive", ka), ("close", cl)):
            extra = f", {s.retried} retried on a reused connection closed before the answer" \
                if name == "keep-alive" else ""
            print(f"    {name:10s} failed/total = {s.failed}/{s.total}{extra}")
            if s.errors:
                print(f"               errors: {s.errors}")
        return ka, cl, after

    # -- (b) server-only changes ------------------------------------------------------------

    def server_only_changes(self):
        a = self.args
        # The route stays as the last reload left it: only the instance's port changes.
        route = self.route_host
        wait_until(30, "backend-1 to be served", lambda: self.served("backend-1"))
        before = show_proc(self.master_sock)
        reloads_logged = self.applied("reload")
        runtime_logged = self.applied("runtime")
        served_logged = self.served_ahead()
        lat = []
        puts = []
        started = time.monotonic()
        for i in range(a.changes):
            if time.monotonic() - started > a.max_seconds:
                print(f"  stopped after {a.max_seconds}s with {i} changes", flush=True)
                break
            target = self.backends[(i + 1) % 2]
            t0 = time.monotonic()
            self.write_registry(f"127.0.0.1:{target.port}", route)
            if self.etcd is not None:
                # The put returned: the change is committed, and the clock starts there.
                t1 = time.monotonic()
                puts.append(t1 - t0)
                t0 = t1
            wait_until(30, f"change #{i + 1} to be served",
                       lambda: self.served(target.name), interval=0)
            lat.append(time.monotonic() - t0)
        after = show_proc(self.master_sock)
        # The last change may still be logging.
        # Each change is one `applied` line, or one `served` line ahead of its file, whose
        # install is an `applied` line of its own (one for all the changes sent before it).
        wait_until(10, "the last apply in the log",
                   lambda: self.applied("runtime") - runtime_logged
                   + self.served_ahead() - served_logged >= len(lat)
                   or self.applied("reload") != reloads_logged, interval=0.05)
        reloads = after[1] - before[1]
        runtime = self.applied("runtime") - runtime_logged
        served = self.served_ahead() - served_logged
        lat.sort()
        print(f"(b) {len(lat)} server-only changes: reloads = {reloads} "
              f"(show proc {before[1]} -> {after[1]}, failed {after[2]}), "
              f"{served} sent ahead of their file, {runtime} applied through the Runtime API "
              f"(file installed)")
        print(f"    change -> served: p50 = {percentile(lat, 50) * 1000:.1f} ms, "
              f"p99 = {percentile(lat, 99) * 1000:.1f} ms, max = {lat[-1] * 1000:.1f} ms")
        if puts:
            puts.sort()
            print(f"    (the etcd put itself, not counted above: p50 = "
                  f"{percentile(puts, 50) * 1000:.1f} ms, p99 = {percentile(puts, 99) * 1000:.1f} ms, "
                  f"max = {puts[-1] * 1000:.1f} ms)")
        return reloads, lat

    # -- teardown ---------------------------------------------------------------------------

    def stop(self):
        if self.daemon is not None:
            p = show_proc(self.master_sock)
            if p:
                self.masters.add(p[0])
            if self.daemon.poll() is None:
                code = stop_process(self.daemon, 60, "haconfd")
                print(f"haconfd exited with {code}")
            for pid in self.masters:
                try:
                    os.kill(pid, signal.SIGTERM)
                    print(f"HAProxy master {pid} was still running: SIGTERM", file=sys.stderr)
                except ProcessLookupError:
                    pass
            self.log.close()
        for b in self.backends:
            b.stop()
        if self.etcd is not None:
            self.etcd.stop(keep=self.args.keep)
        if self.args.keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haconfd", default=os.path.join(REPO, "target", "release", "haconfd"))
    p.add_argument("--source", choices=("file", "etcd"), default="file",
                   help="the registry: a file, or a private etcd started by this script")
    p.add_argument("--etcd", default="etcd", help="the etcd binary (3.4) for --source etcd")
    p.add_argument("--reloads", type=int, default=100)
    p.add_argument("--changes", type=int, default=1000)
    p.add_argument("--keepalive-clients", type=int, default=2)
    p.add_argument("--close-clients", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=200000, help="per client")
    p.add_argument("--pause", type=float, default=0.001, help="seconds between a client's requests")
    p.add_argument("--max-seconds", type=float, default=300, help="bound of each phase")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (log, config)")
    p.add_argument("--log", default="info", help="HACONFD_LOG for the daemon (e.g. haconfd=debug)")
    p.add_argument("--fill", type=int, default=0,
                   help="extra services, in maintenance (2000 is the 2,000x10 scale; a hard "
                        "RLIMIT_NOFILE of 20000 lets HAProxy start with about 1500 at most)")
    p.add_argument("--fill-instances", type=int, default=10, help="instances per extra service")
    args = p.parse_args()
    if not os.access(args.haconfd, os.X_OK):
        sys.exit(f"{args.haconfd}: not found; run `cargo build --release` first")
    if args.source == "etcd" and shutil.which(args.etcd) is None:
        sys.exit(f"{args.etcd}: not found; install etcd (Debian: apt-get install etcd-server)")
    bench = Bench(args)
    ok = False
    fd_limit = None
    try:
        bench.start()
        ka, cl, proc = bench.reloads_under_load()
        reloads, _ = bench.server_only_changes()
        ok = ka.failed == 0 and cl.failed == 0 and proc[2] == 0 and reloads == 0
    except FdLimitError as e:
        fd_limit = e
    finally:
        bench.stop()
    if fd_limit is not None:
        print(fd_limit, file=sys.stderr)
        sys.exit(2)
    print("targets met" if ok else "targets NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
