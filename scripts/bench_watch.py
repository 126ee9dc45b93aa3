"""What scripts/bench-scale.sh reads from a watch of Connections: (name, state) of every change, as
it arrives. One kubectl watch, without its initial list (at 10,000 connections that list alone took
seconds to print and parse, and every event behind it was timestamped late)."""
import subprocess
import threading
import time


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
