#!/usr/bin/env python3
"""A cluster manager for dynamollm's exec backend that runs each instance as a
`dynamollm twin serve` engine process on this machine: what `dynamollm
rehearse` uses, and a worked example of the script an operator writes for
their own cluster (start an engine, answer its placement, drain and stop it,
set its clock).

The exec backend runs it once per action with the action in
DYNAMOLLM_ACTION_KIND and its fields in DYNAMOLLM_* variables (see
actuators/src/exec.rs). Its own settings:

  DYNAMOLLM_TWIN_STATE        a directory for its state (engines.json, logs)
  DYNAMOLLM_TWIN_BIN          the dynamollm binary (default: dynamollm on PATH)
  DYNAMOLLM_TWIN_SPEED        the engines' speed (virtual seconds per wall second)
  DYNAMOLLM_TWIN_API_KEY      the key every engine requires (optional)
  DYNAMOLLM_ENGINES_PER_NODE  engines placed on one 8-GPU node at most (default 1)

Every action is idempotent by instance: a second spawn of a running instance
answers its placement again, a retire of a stopped one does nothing. A spawn
prints {"placement": {"node", "gpus", "endpoint"}}. A retire drains first (no
request running or waiting on the engine twice in a row), records the
engine's GPU energy counter, then stops it (SIGTERM, SIGKILL after 10 s).
`stop-all` (not an action of the service: the caller's clean-up) stops every
engine and prints what each ran and spent.
"""
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

GPUS_PER_NODE = 8
STATE = os.environ["DYNAMOLLM_TWIN_STATE"]
ENERGY = "dynamollm_twin_gpu_energy_joules_total"


def lock():
    f = open(os.path.join(STATE, "lock"), "w")
    fcntl.flock(f, fcntl.LOCK_EX)
    return f


def load():
    try:
        with open(os.path.join(STATE, "engines.json")) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def save(engines):
    path = os.path.join(STATE, "engines.json")
    with open(path + ".tmp", "w") as f:
        json.dump(engines, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)


def alive(pid):
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    # A zombie of ours is not alive.
    try:
        return os.waitpid(pid, os.WNOHANG) == (0, 0)
    except ChildProcessError:
        return True


def page(url):
    with urllib.request.urlopen(url + "/metrics", timeout=10) as r:
        return r.read().decode()


def total(text, name):
    return sum(float(l.rsplit(" ", 1)[1]) for l in text.splitlines() if l.startswith(name))


def start_engine(instance, tp, clock_mhz, listen):
    log = os.path.join(STATE, f"engine-{instance}-{time.time_ns()}.log")
    args = [os.environ.get("DYNAMOLLM_TWIN_BIN", "dynamollm"), "twin", "serve", "--listen", listen,
            "--tp", str(tp), "--clock-mhz", str(clock_mhz), "--speed", os.environ.get("DYNAMOLLM_TWIN_SPEED", "1")]
    env = dict(os.environ)
    if os.environ.get("DYNAMOLLM_TWIN_API_KEY"):
        env["DYNAMOLLM_TWIN_API_KEY"] = os.environ["DYNAMOLLM_TWIN_API_KEY"]
    # Its own session: the engine outlives this command (and the exec backend's process-group kill).
    with open(log, "w") as out:
        p = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=out,
                             env=env, start_new_session=True)
    deadline = time.time() + 30
    while time.time() < deadline:
        with open(log) as f:
            for word in f.read().split():
                if word.startswith("http://"):
                    return p.pid, word.rstrip(",.;")
        if p.poll() is not None:
            sys.exit(f"the engine exited with {p.returncode}: {open(log).read()[-500:]}")
        time.sleep(0.02)
    p.kill()
    sys.exit("the engine did not say where it listens within 30 s")


def stop(e):
    """Record the engine's energy and stop it."""
    try:
        e["energy_j"] = e.get("past_energy_j", 0.0) + total(page(e["url"]), ENERGY)
    except OSError:
        e.setdefault("energy_j", e.get("past_energy_j", 0.0))
    pid = e["pid"]
    if alive(pid):
        os.kill(pid, signal.SIGTERM)
        deadline = time.time() + 10
        while alive(pid) and time.time() < deadline:
            time.sleep(0.02)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)
    e["stopped"] = time.time()


def place(engines, tp):
    """The first node with room for one more engine and `tp` aligned free GPUs."""
    per_node = max(1, int(os.environ.get("DYNAMOLLM_ENGINES_PER_NODE", "1")))
    node = 0
    while True:
        here = [e for e in engines.values() if "stopped" not in e and e["node_index"] == node]
        used = {g for e in here for g in e["gpus"]}
        if len(here) < per_node:
            for first in range(0, GPUS_PER_NODE - tp + 1, tp):
                block = list(range(first, first + tp))
                if not used.intersection(block):
                    return node, block
        node += 1


def main():
    kind = os.environ.get("DYNAMOLLM_ACTION_KIND", sys.argv[1] if len(sys.argv) > 1 else "")
    inst = os.environ.get("DYNAMOLLM_INSTANCE")
    if kind == "spawn":
        tp = int(os.environ["DYNAMOLLM_TP"])
        with lock():
            engines = load()
            e = engines.get(inst)
            if e is None or "stopped" in e:
                node, gpus = place(engines, tp)
                pid, url = start_engine(inst, tp, int(os.environ["DYNAMOLLM_CLOCK_MHZ"]), "127.0.0.1:0")
                e = {"pid": pid, "url": url, "node_index": node, "gpus": gpus, "tp": tp, "started": time.time()}
                engines[inst] = e
                save(engines)
        print(json.dumps({"placement": {"node": f"rehearse/node{e['node_index']}", "gpus": e["gpus"],
                                        "endpoint": e["url"]}, "detail": f"pid {e['pid']}"}))
    elif kind == "retire":
        e = load().get(inst)
        if e is None or "stopped" in e:
            return
        empty, deadline = 0, time.time() + 600
        while empty < 2 and time.time() < deadline:
            try:
                text = page(e["url"])
            except OSError:
                break
            held = total(text, "vllm:num_requests_running") + total(text, "vllm:num_requests_waiting")
            empty = empty + 1 if held == 0 else 0
            time.sleep(0.2 if empty else 0.02)
        with lock():
            engines = load()
            stop(engines[inst])
            save(engines)
    elif kind == "set-clock":
        e = load()[inst]
        body = json.dumps({"clock_mhz": int(os.environ["DYNAMOLLM_CLOCK_MHZ"])}).encode()
        req = urllib.request.Request(e["url"] + "/admin/clock", data=body, headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).read()
    elif kind == "reshard":
        # Restart with the new degree on the same port (the service keeps the endpoint).
        tp = int(os.environ["DYNAMOLLM_TP"])
        with lock():
            engines = load()
            e = engines[inst]
            if e["tp"] != tp and "stopped" not in e:
                clock = json.loads(urllib.request.urlopen(e["url"] + "/admin/clock", timeout=10).read())["clock_mhz"]
                stop(e)
                e["past_energy_j"] = e.pop("energy_j")
                e["gpu_seconds"] = e.get("gpu_seconds", 0.0) + e["tp"] * (e.pop("stopped") - e["started"])
                e["pid"], e["url"] = start_engine(inst, tp, clock, e["url"].split("//", 1)[1])
                e["tp"], e["started"] = tp, time.time()
                save(engines)
    elif kind == "stop-all":
        with lock():
            engines = load()
            for e in engines.values():
                if "stopped" not in e:
                    stop(e)
            save(engines)
        print(json.dumps(engines))
    else:
        sys.exit(f"no such action here: {kind!r}")


if __name__ == "__main__":
    main()
