"""What scripts/bench-scale.sh and scripts/bench-reauth-rounds.sh read from a watch of Connections:
(name, state) of every change, as it arrives. One kubectl watch, without its initial list (at 10,000
connections that list alone took seconds to print and parse, and every event behind it was
timestamped late)."""
import json
import subprocess
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor


def watch_states(namespace, on_change):
    """Calls on_change(name, state, monotonic time) for every change of a Connection in namespace,
    from a background thread; returns the kubectl process (kill it to stop)."""
    watch = subprocess.Popen(
        ["kubectl", "get", "conn", "-n", namespace, "--watch-only", "-o",
         'jsonpath={.metadata.name} {.status.state}{"\\n"}'],
        stdout=subprocess.PIPE, text=True)

    def read():
        for line in watch.stdout:
            name, _, state = line.strip().partition(" ")
            if name:
                on_change(name, state, time.monotonic())

    threading.Thread(target=read, daemon=True).start()
    return watch


def reauthorize(namespace, k, token, proxy_port=18001, timeout=300):
    """Puts token(i) as the refresh token of Secrets c0..c{k-1} at once (a thread each, through
    `kubectl proxy`: no kubectl start-up per update) and times each connection from the moment its
    update is sent to its first Active on the watch. Returns (p50, p99, max, not Active)."""
    names = [f"c{i}" for i in range(k)]
    active, started = {}, {}

    def seen(name, state, at):
        if name in started and name not in active and state == "Active":
            active[name] = at

    watch = watch_states(namespace, seen)
    time.sleep(2)  # the watch is open
    proxy = subprocess.Popen(["kubectl", "proxy", f"--port={proxy_port}"], stdout=subprocess.DEVNULL)
    time.sleep(1)

    def update(i):
        body = json.dumps({"stringData": {"refresh_token": token(i)}}).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{proxy_port}/api/v1/namespaces/{namespace}/secrets/c{i}", data=body,
            method="PATCH", headers={"Content-Type": "application/merge-patch+json"})
        started[f"c{i}"] = time.monotonic()
        urllib.request.urlopen(request).read()

    with ThreadPoolExecutor(max_workers=k) as pool:
        list(pool.map(update, range(k)))
    deadline = time.monotonic() + timeout
    while len(active) < k and time.monotonic() < deadline:
        time.sleep(0.1)
    watch.kill()
    proxy.kill()
    lat = sorted(active[n] - started[n] for n in names if n in active)
    pick = lambda q: lat[min(len(lat) - 1, int(q * len(lat)))] if lat else float("nan")
    return pick(0.5), pick(0.99), pick(1.0), k - len(lat)
