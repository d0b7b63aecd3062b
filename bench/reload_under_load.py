#!/usr/bin/env python3
"""Reloads under load, and server-only changes without reloads, against a real HAProxy.

Starts `haconfd run` (supervise mode, file source) in a temp dir, with two local HTTP backends,
all on 127.0.0.1, then:

  (a) runs keep-alive and `Connection: close` clients through HAProxy while triggering
      structural registry changes (a new service each time), each waiting for its reload to be
      confirmed in haconfd's log, and prints failed/total requests per client kind;
  (b) flips one instance's port between the two backends, and prints the number of reloads
      and p50/p99 of change -> served (registry file written -> a request answered by the new
      backend).

Python 3 standard library only. Every wait is bounded; every process is ended by its PID.
"""

import argparse
import http.client
import http.server
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

    # -- setup -------------------------------------------------------------------------------

    def write_atomic(self, path, text):
        tmp = path + ".tmp-write"
        with open(tmp, "w") as f:
            f.write(text)
        os.rename(tmp, path)

    def write_registry(self, web_addr, route_host=None):
        """web: one instance `a`; with `route_host`, a route for web on hosts web and that one
        (a changed route is new acl lines: a reload, and no instance ever goes away)."""
        text = "services:\n  web:\n    a: \"%s\"\n" % web_addr
        if route_host:
            text += "routes:\n  web: '{\"hosts\":[\"web\",\"%s\"]}'\n" % route_host
        self.write_atomic(self.registry, text)

    def start(self):
        self.backends = [Backend("backend-1"), Backend("backend-2")]
        b1 = self.backends[0]
        self.write_registry(f"127.0.0.1:{b1.port}")
        template = os.path.join(REPO, "templates", "haproxy.cfg.tera")
        self.write_atomic(
            self.config,
            f"""[source]
kind = "file"
prefixes = ["/services/", "/routes/"]

[file]
path = "{self.registry}"

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
        env["HACONFD_LOG"] = "info"
        self.log = open(self.log_path, "wb")
        self.daemon = subprocess.Popen(
            [self.args.haconfd, "run", "--config", self.config],
            cwd=self.dir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        info = wait_until(30, "HAProxy started by haconfd", self.proc_with_worker)
        self.masters.add(info[0])
        wait_until(30, "HAProxy to serve backend-1", lambda: self.served("backend-1"))

    def proc_with_worker(self):
        if self.daemon.poll() is not None:
            raise RuntimeError("haconfd exited:\n" + self.log_text()[-3000:])
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
        lat = []
        started = time.monotonic()
        for i in range(a.changes):
            if time.monotonic() - started > a.max_seconds:
                print(f"  stopped after {a.max_seconds}s with {i} changes", flush=True)
                break
            target = self.backends[(i + 1) % 2]
            t0 = time.monotonic()
            self.write_registry(f"127.0.0.1:{target.port}", route)
            wait_until(30, f"change #{i + 1} to be served",
                       lambda: self.served(target.name), interval=0)
            lat.append(time.monotonic() - t0)
        after = show_proc(self.master_sock)
        # The last change may still be logging.
        wait_until(10, "the last apply in the log",
                   lambda: self.applied("runtime") - runtime_logged >= len(lat)
                   or self.applied("reload") != reloads_logged, interval=0.05)
        reloads = after[1] - before[1]
        runtime = self.applied("runtime") - runtime_logged
        lat.sort()
        print(f"(b) {len(lat)} server-only changes: reloads = {reloads} "
              f"(show proc {before[1]} -> {after[1]}, failed {after[2]}), "
              f"{runtime} applied through the Runtime API")
        print(f"    change -> served: p50 = {percentile(lat, 50) * 1000:.1f} ms, "
              f"p99 = {percentile(lat, 99) * 1000:.1f} ms, max = {lat[-1] * 1000:.1f} ms")
        return reloads, lat

    # -- teardown ---------------------------------------------------------------------------

    def stop(self):
        if self.daemon is not None:
            p = show_proc(self.master_sock)
            if p:
                self.masters.add(p[0])
            if self.daemon.poll() is None:
                self.daemon.send_signal(signal.SIGTERM)
                try:
                    code = self.daemon.wait(timeout=60)
                    print(f"haconfd exited with {code}")
                except subprocess.TimeoutExpired:
                    print("haconfd did not stop within 60s: killing it", file=sys.stderr)
                    self.daemon.kill()
                    self.daemon.wait(timeout=10)
            for pid in self.masters:
                try:
                    os.kill(pid, signal.SIGTERM)
                    print(f"HAProxy master {pid} was still running: SIGTERM", file=sys.stderr)
                except ProcessLookupError:
                    pass
            self.log.close()
        for b in self.backends:
            b.stop()
        if self.args.keep:
            print(f"kept {self.dir}")
        else:
            shutil.rmtree(self.dir, ignore_errors=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--haconfd", default=os.path.join(REPO, "target", "release", "haconfd"))
    p.add_argument("--reloads", type=int, default=100)
    p.add_argument("--changes", type=int, default=1000)
    p.add_argument("--keepalive-clients", type=int, default=2)
    p.add_argument("--close-clients", type=int, default=2)
    p.add_argument("--max-requests", type=int, default=200000, help="per client")
    p.add_argument("--pause", type=float, default=0.001, help="seconds between a client's requests")
    p.add_argument("--max-seconds", type=float, default=300, help="bound of each phase")
    p.add_argument("--keep", action="store_true", help="keep the temp dir (log, config)")
    args = p.parse_args()
    if not os.access(args.haconfd, os.X_OK):
        sys.exit(f"{args.haconfd}: not found; run `cargo build --release` first")
    bench = Bench(args)
    ok = False
    try:
        bench.start()
        ka, cl, proc = bench.reloads_under_load()
        reloads, _ = bench.server_only_changes()
        ok = ka.failed == 0 and cl.failed == 0 and proc[2] == 0 and reloads == 0
    finally:
        bench.stop()
    print("targets met" if ok else "targets NOT met")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
