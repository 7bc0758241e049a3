#!/usr/bin/env python3
"""End-to-end benchmark: the processor (exactly-once, shipped topology) against a raw
transactional passthrough with the same client settings, on the local stack.

Run it through scripts/bench.sh, which starts a stack of its own and builds the release binary.
For each of the two it measures, as separate processes:
  * throughput: N simulated events produced beforehand, then the time from the first commit to
    the commit of the last event; CPU seconds (user + system) and peak RSS of the process;
    for the processor, also the feature-state changelog bytes it wrote per event, and the
    restore a restart then does of the state it committed (records, bytes, seconds);
  * latency: the same process fed at half the processor's maximum rate (paced simulator, event
    time = wall clock) for a while; p50/p99/max of event time (for the passthrough, the record
    timestamp, set when the simulator sends) to commit, from the process's own histogram
    (quantiles interpolated within buckets; the maximum as its bucket's upper bound), and the
    share of a core the broker used meanwhile. p50/p99 leave out the events committed in the
    first WARMUP_S seconds of paced input (the first seconds of a run gather events that
    waited on start-up effects, in the simulator as in the process: one run had 3,760 of its
    200,000 events over 400 ms in its first second); p99 over the whole run is reported too.
Every measurement starts on an emptied stack: the stand-in broker rewrites its whole log as one
JSON file about once a second while records arrive, so its CPU cost grows with everything it
holds, and a run would otherwise pay for the runs before it.
Standard library only.
"""

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KSCORE = os.path.join(ROOT, "target", "release", "kscore")
TICK = os.sysconf("SC_CLK_TCK")
PARTITIONS = 4


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def fresh_stack():
    """Stops, empties and restarts the benchmark's stack (names and ports from the environment)."""
    stack = os.path.join(ROOT, "scripts", "stack.sh")
    for step in ["stop", "reset", "start"]:
        subprocess.run([stack, step], check=True, stdout=subprocess.DEVNULL,
                       stderr=subprocess.DEVNULL)


def broker_cpu_seconds():
    """CPU seconds the stack's broker has used (it shares the two cores with everything else)."""
    stack = os.environ.get("KSCORE_STACK_DIR", os.path.join(ROOT, ".local"))
    name = os.environ.get("KSCORE_STACK_NAME", "default")
    try:
        pid = int(open(os.path.join(stack, name, "run", "broker.pid")).read().strip())
        return cpu_seconds(pid)
    except (OSError, ValueError):
        return float("nan")


def simulate(topic, count, rate=None, seed=7):
    cmd = [KSCORE, "simulate", "--topic", topic, "--partitions", str(PARTITIONS),
           "--count", str(count), "--cards", "20000", "--event-rate", "6.7",
           "--seed", str(seed), "--progress", "1h"]
    if rate:
        cmd += ["--rate", str(rate)]
    return subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def topology(directory, input_topic, name):
    text = open(os.path.join(ROOT, "topologies", "fraud.toml")).read()
    for old, new in [('topic = "payments"', f'topic = "{input_topic}"'),
                     ('group = "kscore-fraud"', f'group = "{name}-group"'),
                     ('"payments-scored"', f'"{name}-scored"'),
                     ('"payments-alerts"', f'"{name}-alerts"'),
                     ('"payments-dlq"', f'"{name}-dlq"'),
                     ('"../', f'"{ROOT}/')]:
        assert old in text, old
        text = text.replace(old, new)
    path = os.path.join(directory, f"{name}.toml")
    with open(path, "w") as f:
        f.write(text)
    return path


def start(kind, directory, input_topic, name, port, log_name=None, env=None):
    listen = ["--metrics-listen", f"127.0.0.1:{port}"]
    if kind == "processor":
        cmd = [KSCORE, *listen, "run", "--topology", topology(directory, input_topic, name),
               "--instance-id", "bench"]
    else:
        cmd = [KSCORE, *listen, "passthrough", "--input", input_topic,
               "--output", f"{name}-out", "--group", f"{name}-group"]
    logfile = open(os.path.join(directory, f"{log_name or name}.log"), "w")
    return subprocess.Popen(cmd, stdout=logfile, stderr=logfile, env=env)


def restore(directory, input_topic, name, port):
    """Starts the processor again on the state a throughput run left and reads its restore
    (records, bytes and seconds, from its log)."""
    env = dict(os.environ, RUST_LOG="warn,kscore::telemetry::events=info,kscore::pipeline=info")
    proc = start("processor", directory, input_topic, name, port, f"{name}-restart", env)
    path = os.path.join(directory, f"{name}-restart.log")
    deadline = time.time() + 600
    found = None
    while time.time() < deadline and found is None and proc.poll() is None:
        time.sleep(0.2)
        for line in open(path, errors="replace"):
            if "feature state restored" in line:
                found = {k: float(v) for k, v in re.findall(r"(records|bytes|keys|seconds)=([0-9.]+)", line)}
    stop(proc)
    if found is None:
        sys.exit(f"the restart did not restore; see {path}")
    log(f"processor restore: {json.dumps(found)}")
    return found


def scrape(port):
    try:
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2).read()
    except OSError:
        return {}
    out = {}
    for line in body.decode().splitlines():
        if line.startswith("#") or not line.strip():
            continue
        key, _, value = line.rpartition(" ")
        out[key] = float(value)
    return out


def consumed(metrics):
    return sum(v for k, v in metrics.items() if k.startswith("kscore_records_consumed_total"))


def buckets(metrics):
    """(upper bound, cumulative count) of the event-time-to-commit histogram, ascending."""
    out = []
    for key, value in metrics.items():
        m = re.match(r'kscore_event_time_to_commit_seconds_bucket\{le="([^"]+)"\}', key)
        if m:
            out.append((float(m.group(1)), value))
    return sorted(out)


def quantile(metrics, q):
    """The q-quantile, interpolated within its bucket as Prometheus' histogram_quantile does."""
    b = buckets(metrics)
    if not b or b[-1][1] == 0:
        return None
    rank = q * b[-1][1]
    lower, below = 0.0, 0.0
    for upper, count in b:
        if count >= rank:
            if upper == float("inf"):
                return lower
            return lower + (upper - lower) * (rank - below) / max(count - below, 1e-9)
        lower, below = upper, count
    return lower


def max_bound(metrics):
    """The upper bound of the highest non-empty bucket: the maximum is at most this."""
    b = buckets(metrics)
    below = 0.0
    top = None
    for upper, count in b:
        if count > below:
            top = upper
        below = count
    return top


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK


def peak_rss_mib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def throughput(kind, directory, events, port):
    fresh_stack()
    run = uuid.uuid4().hex[:8]
    topic = f"bench-{kind}-{run}"
    sim = simulate(topic, events)
    if sim.wait() != 0:
        sys.exit("simulator failed")
    proc = start(kind, directory, topic, f"{kind}-{run}", port)
    first = None
    deadline = time.time() + 1800
    while time.time() < deadline:
        time.sleep(0.1)
        if proc.poll() is not None:
            sys.exit(f"{kind} exited early; see {directory}")
        metrics = scrape(port)
        n = consumed(metrics)
        if n > 0 and first is None:
            first = (time.time(), n, cpu_seconds(proc.pid), broker_cpu_seconds())
        if n >= events:
            end = (time.time(), cpu_seconds(proc.pid), peak_rss_mib(proc.pid),
                   broker_cpu_seconds())
            break
    else:
        sys.exit(f"{kind} did not finish")
    stop(proc)
    restored = restore(directory, topic, f"{kind}-{run}", port) if kind == "processor" else None
    t0, n0, cpu0, broker0 = first
    seconds = end[0] - t0
    result = {
        "events": events,
        "events_per_s": (events - n0) / seconds,
        "cpu_s": end[1],
        "cpu_s_per_1M_events": (end[1] - cpu0) / (events - n0) * 1e6,
        "peak_rss_mib": end[2],
        "broker_cpu_s_per_1M_events": (end[3] - broker0) / (events - n0) * 1e6,
        # Feature-state changelog bytes (keys and values) written per input event.
        "changelog_bytes_per_event": metrics.get("kscore_changelog_bytes_total", 0.0) / events,
        # A restart's restore of the state this run committed.
        "restore": restored,
    }
    log(f"{kind} throughput: {json.dumps(result)}")
    return result


WARMUP_S = 2


def since(later, earlier):
    """Histogram counts accumulated between two scrapes."""
    return {k: v - earlier.get(k, 0.0) for k, v in later.items()}


def latency(kind, directory, rate, seconds, port):
    fresh_stack()
    run = uuid.uuid4().hex[:8]
    topic = f"lat-{kind}-{run}"
    # Create the topic first, so the process is running and caught up before paced input.
    prime = simulate(topic, 1, rate=1000)
    prime.wait()
    proc = start(kind, directory, topic, f"lat-{kind}-{run}", port)
    while consumed(scrape(port)) < 1:
        time.sleep(0.2)
        if proc.poll() is not None:
            sys.exit(f"{kind} exited early; see {directory}")
    count = int(rate * seconds)
    broker0, started = broker_cpu_seconds(), time.time()
    sim = simulate(topic, count, rate=rate, seed=8)
    while consumed(scrape(port)) < 1 + rate * WARMUP_S and sim.poll() is None:
        time.sleep(0.05)
    warm = scrape(port)
    sim.wait()
    deadline = time.time() + 120
    while consumed(scrape(port)) < count + 1 and time.time() < deadline:
        time.sleep(0.2)
    m = scrape(port)
    broker = (broker_cpu_seconds() - broker0) / (time.time() - started)
    stop(proc)
    steady = since(m, warm)
    result = {
        "rate": rate,
        "events": count,
        "warmup_s": WARMUP_S,
        "p50_ms": 1000 * (quantile(steady, 0.5) or float("nan")),
        "p99_ms": 1000 * (quantile(steady, 0.99) or float("nan")),
        "p99_ms_with_warmup": 1000 * (quantile(m, 0.99) or float("nan")),
        "max_ms_at_most": 1000 * (max_bound(m) or float("nan")),
        "broker_cpu_share": broker,
    }
    log(f"{kind} latency: {json.dumps(result)}")
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=200_000)
    parser.add_argument("--latency-seconds", type=int, default=20)
    parser.add_argument("--latency-rate", type=int,
                        help="events/s for the latency runs (default: half the processor's "
                             "backlog throughput)")
    parser.add_argument("--port", type=int, default=9470)
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args()
    directory = tempfile.mkdtemp(prefix="kscore-bench-")
    log(f"logs in {directory}")
    results = {}
    for kind in ["passthrough", "processor"]:
        results[kind] = {"throughput": throughput(kind, directory, args.events, args.port)}
    half = args.latency_rate or round(results["processor"]["throughput"]["events_per_s"] / 2)
    for kind in ["passthrough", "processor"]:
        results[kind]["latency"] = latency(kind, directory, half, args.latency_seconds, args.port)
    p, b = results["processor"], results["passthrough"]
    print()
    print(f"{'':14}{'events/s':>10}{'CPU s/1M ev':>13}{'broker s/1M':>13}{'peak RSS MiB':>14}"
          f"{'rate/s':>9}{'p50 ms':>8}{'p99 ms':>8}{'p99 all':>9}{'max ≤ ms':>9}{'broker CPU':>12}"
          f"{'changelog B/ev':>16}")
    for name, r in [("passthrough", b), ("processor", p)]:
        t, l = r["throughput"], r["latency"]
        print(f"{name:14}{t['events_per_s']:>10.0f}{t['cpu_s_per_1M_events']:>13.1f}"
              f"{t['broker_cpu_s_per_1M_events']:>13.1f}"
              f"{t['peak_rss_mib']:>14.0f}{l['rate']:>9}{l['p50_ms']:>8.0f}{l['p99_ms']:>8.0f}"
              f"{l['p99_ms_with_warmup']:>9.0f}"
              f"{l['max_ms_at_most']:>9.0f}{l['broker_cpu_share']:>11.0%}"
              f"{t['changelog_bytes_per_event']:>16.1f}")
    ratio = p["throughput"]["events_per_s"] / b["throughput"]["events_per_s"]
    print(f"(p50/p99 after {WARMUP_S} s of paced input; 'p99 all' includes those seconds)")
    print(f"\nprocessor / passthrough throughput: {ratio:.2f} "
          f"({args.events} events, exactly-once, commit interval 100 ms, 4 partitions)")
    r = p["throughput"]["restore"]
    print(f"processor restart: restored {r['keys']:.0f} keys from {r['records']:.0f} changelog "
          f"records ({r['bytes'] / 1e6:.1f} MB) in {r['seconds']:.2f} s")
    results["ratio"] = ratio
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
