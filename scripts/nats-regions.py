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

`relays` runs the relay on the chosen layout (leaf nodes, a domain per
region): two relays in region a, one with `replicas_in_other_regions = 1`
(each accepted clip also in b's JetStream before `Accepted`) and one with
0 (the clip in a only), the same `client-sim load` against each in turn,
and prints the time from a clip's end to its `Accepted` (p50/p99) and the
clip rate, with lost/duplicated. Results: docs/benchmarks.md, "Regions".

    cargo build --release -p relay -p client-sim
    scripts/nats-regions.py --delay-ms 20 --rounds 3 relays

With `--lossy-delay-ms D --loss L` it compares, on the relay with a copy
in b, the clean link with a slow lossy one (D each way; a share L of the
TCP segments held back a retransmission timeout, as TCP holds a lost one,
what follows waiting behind it): first-frame latency inside region a and
the time to `Accepted`.

    scripts/nats-regions.py --delay-ms 20 --lossy-delay-ms 75 --loss 0.05 --rounds 3 relays

With `--floors` it measures what a channel's floor costs across regions:
one talker and 19 listeners in one channel (client-sim's first channel,
`load-ch-00000`), on two relays of region a whose `regions` lists differ
in order only, so the channel's home (where its floor is taken, by
compare-and-set) is region a for one and region b for the other. The
first-frame latency of the listeners includes the take.

    scripts/nats-regions.py --delay-ms 20 --rounds 3 --floors relays
"""
import argparse
import asyncio
import atexit
import os
import random
import shutil
import signal
import subprocess
import tempfile
import time

import nats
from nats.js.api import DeliverPolicy, Placement, StreamConfig

BASE = 24000
DELAY = 0.0
# Share of the segments on the link between the regions held back as TCP
# holds a lost one: an extra retransmission timeout, the data behind it
# waiting in order.
LOSS = 0.0
RUNNING = []
DIRS = []


def _cleanup():
    for p in RUNNING:
        if p.poll() is None:
            p.kill()
    if os.environ.get("KEEP"):
        print("kept:", *DIRS)
        return
    for d in DIRS:
        shutil.rmtree(d, ignore_errors=True)


atexit.register(_cleanup)


async def pipe(r, w):
    q = asyncio.Queue()
    async def reader():
        while True:
            d = await r.read(65536)
            hold = DELAY
            if LOSS and random.random() < LOSS:
                hold += max(0.2, 6 * DELAY)
            await q.put((time.perf_counter() + hold, d))
            if not d:
                return
    async def writer():
        last = 0.0
        while True:
            due, d = await q.get()
            last = max(last, due)
            due = last
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
        f.write(f'server_name: {name}\nlisten: 127.0.0.1:{port}\nhttp: 127.0.0.1:{port + 60}\njetstream {{ store_dir: "{d}/js", {extra.get("js","")} }}\n{extra.get("rest","")}\n')
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

def home_index(channel, n):
    """The index in `regions` of a channel's home (the relay's FNV-1a rule,
    relay/src/cluster/regions.rs `home_of`)."""
    h = 0xcbf29ce484222325
    for b in channel.encode():
        h = ((h ^ b) * 0x100000001b3) & 0xFFFFFFFFFFFFFFFF
    return h % n


async def relay(binary, work, name, port, nats_url, replicas, share_from=None, regions="a,b"):
    """Starts a relay of region a on loopback; returns (process, data dir)."""
    d = os.path.join(work, name)
    os.makedirs(d, exist_ok=True)
    if share_from:
        for f in ("cert.pem", "key.pem", "token.secret"):
            shutil.copy(os.path.join(share_from, f), d)
    args = [binary, "serve", "--data-dir", d, "--listen", f"127.0.0.1:{port}",
            "--admin", f"127.0.0.1:{port + 1}", "--web", "off", "--cluster", nats_url,
            "--region", "a", "--regions", regions, "--replicas-in-other-regions", str(replicas),
            # Every clip written to JetStream (and copied), even those
            # their recipient acks at once: the cost measured.
            "--cluster-keep-wait", "0s",
            "--max-clips-per-minute", "0", "--max-clip-bytes-per-minute", "0",
            "--max-handshakes-per-second", "0"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=open(d + ".log", "w"),
                         env=dict(os.environ, RUST_LOG=os.environ.get("RELAY_LOG", "info")))
    RUNNING.append(p)
    for _ in range(100):
        if os.path.exists(os.path.join(d, "token.secret")) and "listening on QUIC" in open(d + ".log").read():
            break
        await asyncio.sleep(0.2)
    return p, d


async def relays(args, n=3):
    """The relay on two regions; see the module's doc."""
    import json
    global DELAY, LOSS
    proxies = [await proxy(BASE + 40 + j, BASE + 30 + j) for j in range(n)]
    for r, name in enumerate("ab"):
        for i in range(n):
            p = BASE + 100 * r + i
            routes = ",".join(f'"nats://127.0.0.1:{BASE+100*r+j+10}"' for j in range(n) if j != i)
            rest = f'cluster {{ name: {name}, listen: 127.0.0.1:{p+10}, routes: [{routes}] }}\n'
            if name == "a":
                rest += f'leafnodes {{ listen: 127.0.0.1:{p+30} }}\n'
            else:
                urls = ",".join(f'"nats-leaf://127.0.0.1:{BASE+40+j}"' for j in range(n))
                rest += f'leafnodes {{ remotes: [{{urls: [{urls}]}}] }}\n'
            start(conf(f"{name}{i}", p, {"js": f"domain: {name}", "rest": rest}))
    await asyncio.sleep(6)
    work = tempfile.mkdtemp(prefix="nats-regions-relays-")
    DIRS.append(work)
    nats_a = ",".join(f"nats://127.0.0.1:{BASE+i}" for i in range(n))
    one, d1 = await relay(args.relay_bin, work, "copy1", BASE + 500, nats_a, 1)
    zero, _ = await relay(args.relay_bin, work, "copy0", BASE + 510, nats_a, 0, share_from=d1)
    await asyncio.sleep(2)
    clean = DELAY
    runs = [("copy1", BASE + 500, one, clean, 0.0), ("copy0", BASE + 510, zero, clean, 0.0)]
    extra, users = [], args.users
    if args.floors:
        # load-ch-00000's home: region a with one order, b with the other.
        here = "a,b" if home_index("load-ch-00000", 2) == 0 else "b,a"
        there = ",".join(reversed(here.split(",")))
        home_a, _ = await relay(args.relay_bin, work, "floor-a", BASE + 520, nats_a, 1,
                                share_from=d1, regions=here)
        home_b, _ = await relay(args.relay_bin, work, "floor-b", BASE + 530, nats_a, 1,
                                share_from=d1, regions=there)
        await asyncio.sleep(2)
        runs = [("floor home a", BASE + 520, home_a, clean, 0.0),
                ("floor home b", BASE + 530, home_b, clean, 0.0)]
        extra = ["--channel-size", "20", "--talkers-per-channel", "1",
                 "--clip-min", "500ms", "--clip-max", "500ms", "--talk-interval", "1500ms"]
        users = 20
        print(f"== one channel (1 talker, 19 listeners) on a relay in region a, its floor's home "
              f"in a or in b, {DELAY*2000:.0f} ms round trip to region b", flush=True)
    elif args.lossy_delay_ms is not None:
        lossy = args.lossy_delay_ms / 1000
        runs = [("clean link", BASE + 500, one, clean, 0.0),
                ("lossy link", BASE + 500, one, lossy, args.loss)]
        print(f"== relay in region a (a copy in b), link to b: clean {clean*2000:.0f} ms round trip "
              f"against {lossy*2000:.0f} ms and {args.loss:.0%} of segments held as if lost", flush=True)
    else:
        print(f"== relays in region a, {DELAY*2000:.0f} ms round trip to region b", flush=True)
    for rnd in range(args.rounds):
        order = runs if rnd % 2 == 0 else runs[::-1]
        for name, port, proc, delay, loss in order:
            DELAY, LOSS = delay, loss
            out = os.path.join(work, "r.json")
            if os.path.exists(out):
                os.remove(out)
            # Awaited, not run blocking: the delay proxy runs on this
            # event loop.
            load = await asyncio.create_subprocess_exec(
                args.load_bin, "load", "--relay", f"127.0.0.1:{port}",
                "--ca", os.path.join(d1, "cert.pem"),
                "--secret", os.path.join(d1, "token.secret"),
                "--relay-pid", str(proc.pid),
                "--users", str(users), "--duration", args.duration,
                *(extra or ["--talk-interval", "2s", "--clip-min", "1s", "--clip-max", "1s"]),
                "--report-json", out,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            await load.wait()
            try:
                r = json.load(open(out))
            except (OSError, ValueError):
                print(f"round {rnd+1} {name}: no report", flush=True)
                continue
            a, f = r["ack_ms"], r["first_frame_ms"]
            print(f"round {rnd+1} {name}: first frame p50 {f['p50']:.2f} ms p90 {f['p90']:.2f} ms "
                  f"p99 {f['p99']:.2f} ms; "
                  f"Accepted after the clip's end p50 {a['p50']:.1f} ms p99 {a['p99']:.1f} ms; "
                  f"{r['clips_per_s']:.1f} clips/s; lost {r['lost']} dup {r['duplicated']}", flush=True)
    if os.environ.get("PAUSE"):
        await asyncio.sleep(float(os.environ["PAUSE"]))
    for srv in proxies:
        srv.close()


async def main():
    global DELAY
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--delay-ms", type=float, default=0, help="one-way delay on the link between the regions")
    ap.add_argument("--rounds", type=int, default=3, help="relays: rounds of load")
    ap.add_argument("--lossy-delay-ms", type=float, default=None,
                    help="relays: compare the clean link (--delay-ms) with this one-way delay and --loss")
    ap.add_argument("--loss", type=float, default=0.05, help="relays: share of segments held as if lost")
    ap.add_argument("--users", type=int, default=100, help="relays: users of each load run")
    ap.add_argument("--floors", action="store_true",
                    help="relays: a channel's floor at home against in the other region")
    ap.add_argument("--duration", default="10s", help="relays: length of each load run")
    ap.add_argument("--relay-bin", default="target/release/ptt-relay")
    ap.add_argument("--load-bin", default="target/release/client-sim")
    ap.add_argument("topologies", nargs="+", choices=["gateways", "leafdomains", "relays"])
    args = ap.parse_args()
    asyncio.get_running_loop().set_exception_handler(lambda *_: None)
    DELAY = args.delay_ms / 1000
    for k in args.topologies:
        if k == "relays":
            await relays(args)
        else:
            await scenario(k)
        await asyncio.sleep(1)


asyncio.run(main())
