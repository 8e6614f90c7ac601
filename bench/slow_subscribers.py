#!/usr/bin/env python3
"""Gateway memory with slow subscribers.

Opens N subscriber connections through the gateway that subscribe and then never read,
publishes messages at full speed for a while, and samples the gateway's RSS. Prints the
peak RSS, how many subscribers Valkey's pub/sub output-buffer limit disconnected, and
whether the gateway still answers. Usage (against a running `shoal dev`):

    bench/slow_subscribers.py --port 6380 --token TOKEN --pid GATEWAY_PID [--subscribers 1000]
"""
import argparse
import asyncio
import os
import time


def rss_mb(pid):
    """Resident memory of a process in MiB (0 once it is gone)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def cmd(*args):
    out = b"*%d\r\n" % len(args)
    for a in args:
        a = a if isinstance(a, bytes) else str(a).encode()
        out += b"$%d\r\n%s\r\n" % (len(a), a)
    return out


async def subscriber(port, token, channel, conns):
    r, w = await asyncio.open_connection("127.0.0.1", port)
    w.write(cmd("AUTH", token) + cmd("SUBSCRIBE", channel))
    await w.drain()
    await r.readuntil(b":1\r\n")  # the subscription confirmation; then never read again
    conns.append((r, w))


async def main():
    p = argparse.ArgumentParser()
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--token", required=True)
    p.add_argument("--pid", type=int, required=True)
    p.add_argument("--subscribers", type=int, default=1000)
    p.add_argument("--seconds", type=float, default=20)
    p.add_argument("--message-bytes", type=int, default=1024)
    a = p.parse_args()

    conns = []
    base = rss_mb(a.pid)
    for i in range(0, a.subscribers, 100):
        await asyncio.gather(*(subscriber(a.port, a.token, "news", conns) for _ in range(min(100, a.subscribers - i))))
    after_subscribe = rss_mb(a.pid)

    pr, pw = await asyncio.open_connection("127.0.0.1", a.port)
    pw.write(cmd("AUTH", a.token))
    await pw.drain()
    await pr.readline()
    payload = b"x" * a.message_bytes
    peak, published, receivers = after_subscribe, 0, []
    deadline = time.time() + a.seconds
    while time.time() < deadline:
        pw.write(cmd("PUBLISH", "news", payload) * 64)
        await pw.drain()
        for _ in range(64):
            line = await pr.readline()
            receivers.append(int(line[1:]))
        published += 64
        peak = max(peak, rss_mb(a.pid))
    alive = receivers[-1] if receivers else 0
    pw.write(cmd("PING"))
    await pw.drain()
    pong = await asyncio.wait_for(pr.readline(), 5)
    print(f"subscribers={a.subscribers} published={published} x {a.message_bytes} B in {a.seconds:.0f} s")
    print(f"gateway RSS: before {base:.0f} MB, after subscribing {after_subscribe:.0f} MB, peak {peak:.0f} MB, "
          f"end {rss_mb(a.pid):.0f} MB")
    print(f"subscribers still receiving at the end: {alive} (the rest were cut off by Valkey's "
          f"pub/sub output-buffer limit, then closed by the gateway)")
    print(f"gateway answers: {pong.strip().decode()}")
    for _, w in conns:
        w.close()


if __name__ == "__main__":
    asyncio.run(main())
