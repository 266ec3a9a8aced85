"""Holds references on keys k0..kN-1 and waits to be killed.

Usage: holder.py URL NAMESPACE N
Prints "ready" once it holds them all.
"""

from __future__ import annotations

import sys
import time

from widgets import WidgetUpdate

from phonon_cli import Process


def main() -> None:
    url, namespace, n = sys.argv[1:4]
    process = Process(url, namespace=namespace, heartbeat_interval=0.2)
    held = [WidgetUpdate(process, f"k{i}", doc={"c": 100}) for i in range(int(n))]
    print("ready", flush=True)
    while held:
        time.sleep(1)


if __name__ == "__main__":
    main()
