#!/usr/bin/env python3
"""Which NATS topology joins two regions: gateways (one super-cluster, one
JetStream) or leaf nodes with a JetStream domain per region. Starts two
regions of three real nats-server nodes each on loopback (ports 24000+),
a TCP delay proxy on the link between them (--delay-ms each way), then
for each topology: live messages across, a durable publish from region a
into region b's stream and into a's own (medians of 20), then kill -9
every node of a and asks b's JetStream for what a relay needs (publish,
read the last message of a subject, a new ordered consumer, a new
stream). Results: docs/cluster.md, "Regions: which NATS topology".

    pip install nats-py   # once (PyPI)
    scripts/nats-regions.py --delay-ms 20 gateways leafdomains
"""
import argparse
import asyncio
import atexit
import os
import shutil
import signal
import subprocess
import tempfile
import time

import nats
from nats.js.api import DeliverPolicy, Placement, StreamConfig

BASE = 24000
DELAY = 0.0
RUNNING = []
DIRS = []


def _cleanup():
    for p in RUNNING:
        if p.poll() is None:
            p.kill()
    for d in DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


async def pipe(r, w):
    q = asyncio.Queue()
    async def reader():
        while True:
            d = await r.read(65536)
            await q.put((time.perf_counter() + DELAY, d))
            if not d:
                return
    async def writer():
        while True:
            due, d = await q.get()
            now = time.perf_counter()
            if due > now:
                await asyncio.sleep(due - now)
            if not d:
                w.close(); return
            w.write(d); await w.drain()
    await asyncio.gather(reader(), writer(), return_exceptions=True)

async def proxy(listen, to):
    async def handle(r, w):
        try:
            ur, uw = await asyncio.open_connection("127.0.0.1", to)
        except OSError:
            w.close(); return
        await asyncio.gather(pipe(r, uw), pipe(ur, w), return_exceptions=True)
    return await asyncio.start_server(handle, "127.0.0.1", listen)

def conf(name, port, extra):
    d = tempfile.mkdtemp(prefix=f"nats-regions-{name}-")
    DIRS.append(d)
    path = os.path.join(d, "s.conf")
    with open(path, "w") as f:
        f.write(f'server_name: {name}\nlisten: 127.0.0.1:{port}\njetstream {{ store_dir: "{d}/js", {extra.get("js","")} }}\n{extra.get("rest","")}\n')
    return path

def start(path):
    p = subprocess.Popen(["nats-server", "-c", path], stdout=subprocess.DEVNULL, stderr=open(path + ".log", "w"))
    RUNNING.append(p)
    return p

async def noerr(e):
    pass

async def timed(what, coro):
    t = time.perf_counter()
    try:
        r = await asyncio.wait_for(coro, 5)
        return f"{what}: ok {1000*(time.perf_counter()-t):.1f} ms"
    except Exception as e:
        return f"{what}: FAILED {type(e).__name__} {e}"[:160]

async def scenario(kind, n=3):
    # region r (0: a, 1: b), node i: client port BASE+100r+i, route +10, gateway +20, leaf +30
    procs = {"a": [], "b": []}
    proxies = []
    if kind == "gateways":
        proxies.append(await proxy(BASE + 40, BASE + 20))
        proxies.append(await proxy(BASE + 50, BASE + 120))
    else:
        for j in range(n):
            proxies.append(await proxy(BASE + 40 + j, BASE + 30 + j))
    for r, name in enumerate("ab"):
        other = "ba"[r]
        for i in range(n):
            p = BASE + 100 * r + i
            routes = ",".join(f'"nats://127.0.0.1:{BASE+100*r+j+10}"' for j in range(n) if j != i)
            rest = f'cluster {{ name: {name}, listen: 127.0.0.1:{p+10}, routes: [{routes}] }}\n'
            js = ""
            gwp = BASE + 40 if name == "b" else BASE + 50
            if kind == "gateways":
                rest += f'gateway {{ name: {name}, listen: 127.0.0.1:{p+20}, gateways: [{{name: {other}, urls: ["nats://127.0.0.1:{gwp}"]}}] }}\n'
            else:
                js = f"domain: {name}"
                if name == "a":
                    rest += f'leafnodes {{ listen: 127.0.0.1:{p+30} }}\n'
                else:
                    rest += f'leafnodes {{ remotes: [{{urls: [{",".join(chr(34)+"nats-leaf://127.0.0.1:"+str(BASE+j+40)+chr(34) for j in range(n))}]}}] }}\n'
            procs[name].append(start(conf(f"{name}{i}", p, {"js": js, "rest": rest})))
    pa, pb = BASE, BASE + 100
    await asyncio.sleep(6)
    out = [f"== {kind}"]
    a = await nats.connect(f"nats://127.0.0.1:{pa}", allow_reconnect=False, error_cb=noerr)
    b = await nats.connect(f"nats://127.0.0.1:{pb}", error_cb=noerr)
    ja, jb = a.jetstream(), b.jetstream()
    if kind == "gateways":
        out.append(await timed("B: stream placed in b", jb.add_stream(StreamConfig(name="SB", subjects=["x.b.>"], num_replicas=3, placement=Placement(cluster="b")))))
        out.append(await timed("A: stream placed in a", ja.add_stream(StreamConfig(name="SA", subjects=["x.a.>"], num_replicas=3, placement=Placement(cluster="a")))))
        jab = ja
    else:
        out.append(await timed("B: stream in domain b", jb.add_stream(StreamConfig(name="SB", subjects=["x.b.>"], num_replicas=3))))
        out.append(await timed("A: stream in domain a", ja.add_stream(StreamConfig(name="SA", subjects=["x.a.>"], num_replicas=3))))
        jab = a.jetstream(domain="b")
    # live across regions
    got = asyncio.Event()
    async def cb_(m): got.set()
    await b.subscribe("live.bob", cb=cb_)
    await b.flush(); await asyncio.sleep(0.5)
    await a.publish("live.bob", b"hi"); 
    try:
        await asyncio.wait_for(got.wait(), 5); out.append("live A->B: ok")
    except Exception:
        out.append("live A->B: FAILED")
    # durable write from A into B's stream
    lat = []
    for i in range(20):
        t = time.perf_counter()
        try:
            await asyncio.wait_for(jab.publish("x.b.clip", b"c" * 2000, stream="SB"), 5)
            lat.append(1000 * (time.perf_counter() - t))
        except Exception as e:
            out.append(f"A->B durable publish FAILED {e}"[:120]); break
    if lat:
        lat.sort(); out.append(f"A->B durable publish: ok, median {lat[len(lat)//2]:.2f} ms (one-way delay {DELAY*1000:.0f} ms between regions)")
    loc = []
    for i in range(20):
        t = time.perf_counter()
        await ja.publish("x.a.clip", b"c" * 2000, stream="SA")
        loc.append(1000 * (time.perf_counter() - t))
    loc.sort(); out.append(f"A->A durable publish: median {loc[len(loc)//2]:.2f} ms")
    # kill A
    for p in procs['a']:
        p.send_signal(signal.SIGKILL); p.wait()
    await asyncio.sleep(4)
    out.append(await timed("after A's death, B: publish to SB", jb.publish("x.b.clip", b"d", stream="SB")))
    out.append(await timed("after A's death, B: last msg by subject", jb.get_last_msg("SB", "x.b.clip")))
    async def consume():
        sub = await jb.subscribe("x.b.>", ordered_consumer=True, deliver_policy=DeliverPolicy.ALL)
        m = await sub.next_msg(timeout=3)
        return m
    out.append(await timed("after A's death, B: new ordered consumer reads", consume()))
    out.append(await timed("after A's death, B: new stream", jb.add_stream(StreamConfig(name="SB2", subjects=["y.b.>"]) if kind != "gateways" else StreamConfig(name="SB2", subjects=["y.b.>"], placement=Placement(cluster="b")))))
    for c in (a, b):
        try: await c.close()
        except Exception: pass
    for p in procs['b']:
        p.send_signal(signal.SIGKILL); p.wait()
    for srv in proxies:
        srv.close()
    print("\n".join(out), flush=True)

async def main():
    global DELAY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=0, help="one-way delay on the link between the regions")
    ap.add_argument("topologies", nargs="+", choices=["gateways", "leafdomains"])
    args = ap.parse_args()
    asyncio.get_running_loop().set_exception_handler(lambda *_: None)
    DELAY = args.delay_ms / 1000
    for k in args.topologies:
        await scenario(k)
        await asyncio.sleep(1)


asyncio.run(main())
