#!/usr/bin/env python3
"""Init time of Lambda bootstraps under a minimal Runtime API (README, Deploy).

Each bootstrap is started as Lambda starts a `provided.al2023` function: with the Runtime API's
address in AWS_LAMBDA_RUNTIME_API, the function's environment and dummy credentials. Its init
time is from starting the process to its first `GET /2018-06-01/runtime/invocation/next`, what
Lambda reports as Init Duration (the same span tests/src/runtime_api.rs measures). No event is
ever handed out: the process is killed once it has polled, so nothing reaches DynamoDB or
@connections and no moto is needed (init builds the SDK clients, which connect lazily).

The binaries run alternately, the order rotated each round, after one untimed warm-up round
(page cache), so that a machine shared with other builds loads each one alike.

    scripts/init_time.py --runs 15 before=/tmp/a/chat-api-handler after=target/release/chat-api-handler
"""

import argparse
import http.server
import os
import statistics
import subprocess
import sys
import threading
import time


class RuntimeApi(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), Handler)
        self.polled = threading.Event()
        self.polled_at = None
        self.init_error = None
        self.release = threading.Event()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        server = self.server
        if self.path == "/2018-06-01/runtime/invocation/next":
            if not server.polled.is_set():
                server.polled_at = time.perf_counter()
                server.polled.set()
            # Long-poll as Lambda does, until the process is killed.
            server.release.wait(30)
        self.send_response(404)
        self.end_headers()

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length)
        if self.path == "/2018-06-01/runtime/init/error":
            self.server.init_error = body.decode(errors="replace")
            self.server.polled.set()
        self.send_response(202)
        self.end_headers()

    def log_message(self, *args):
        pass


def environment(addr, function):
    return {
        "PATH": os.environ.get("PATH", ""),
        "AWS_LAMBDA_RUNTIME_API": addr,
        "AWS_LAMBDA_FUNCTION_NAME": function,
        "AWS_LAMBDA_FUNCTION_MEMORY_SIZE": "256",
        "AWS_LAMBDA_FUNCTION_VERSION": "$LATEST",
        "AWS_LAMBDA_LOG_GROUP_NAME": f"/aws/lambda/{function}",
        "AWS_LAMBDA_LOG_STREAM_NAME": "2026/11/30/[$LATEST]init",
        "AWS_LAMBDA_LOG_FORMAT": "JSON",
        "AWS_REGION": "us-east-1",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "test",
        "AWS_SECRET_ACCESS_KEY": "test",
        "AWS_SESSION_TOKEN": "test",
        "AWS_EC2_METADATA_DISABLED": "true",
        # What template.yaml gives both functions (the fan-out also needs its endpoint).
        "EVENTS_TABLE": "events",
        "CONNECTIONS_TABLE": "connections",
        "CONNECTIONS_ENDPOINT": "http://127.0.0.1:9/prod",
        "RUST_LOG": "info",
        "METRICS_NAMESPACE": "InitTime",
    }


def init_once(binary):
    """Seconds from spawning `binary` to its first poll."""
    server = RuntimeApi()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    addr = f"127.0.0.1:{server.server_address[1]}"
    function = os.path.basename(binary)
    started = time.perf_counter()
    child = subprocess.Popen(
        [binary],
        env=environment(addr, function),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        if not server.polled.wait(30):
            raise RuntimeError(f"{binary} did not poll within 30 s")
        if server.init_error is not None:
            raise RuntimeError(f"{binary} reported an init error: {server.init_error}")
        return server.polled_at - started
    finally:
        child.kill()
        child.wait()
        server.release.set()
        server.shutdown()
        server.server_close()


def percentile(values, p):
    ordered = sorted(values)
    rank = max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))
    return ordered[rank]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15, help="timed runs of each binary")
    parser.add_argument("binaries", nargs="+", metavar="LABEL=PATH")
    args = parser.parse_args()
    labelled = [b.split("=", 1) for b in args.binaries]
    for label, path in labelled:
        if not os.access(path, os.X_OK):
            sys.exit(f"{label}: {path} is not an executable")
    for _, path in labelled:  # warm-up: page cache, untimed
        init_once(path)
    times = {label: [] for label, _ in labelled}
    for i in range(args.runs):
        shift = i % len(labelled)
        for label, path in labelled[shift:] + labelled[:shift]:
            times[label].append(init_once(path))
    print(f"{'binary':<24} {'bytes':>10} {'N':>3} {'median ms':>10} {'p90 ms':>8} {'min ms':>8} {'max ms':>8}")
    for label, path in labelled:
        t = [x * 1000 for x in times[label]]
        print(
            f"{label:<24} {os.path.getsize(path):>10} {len(t):>3} {statistics.median(t):>10.1f}"
            f" {percentile(t, 90):>8.1f} {min(t):>8.1f} {max(t):>8.1f}"
        )


if __name__ == "__main__":
    main()
