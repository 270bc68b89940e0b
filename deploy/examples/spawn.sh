#!/bin/sh
# spawn.sh: start one engine instance for dynamollm's exec backend.
#
# dynamollm serve runs it for every `spawn` action ([actuators.exec] spawn).
# It gets the action in DYNAMOLLM_* environment variables (and the whole
# command as JSON on stdin, which this script does not need):
#
#   DYNAMOLLM_ACTION_ID     the command's id (the same id if the service re-sends it)
#   DYNAMOLLM_INSTANCE      the new instance's number (0, 1, 2, ...)
#   DYNAMOLLM_POOL          the pool it will serve (a number)
#   DYNAMOLLM_TP            tensor-parallel degree: GPUs the engine spans (2, 4 or 8)
#   DYNAMOLLM_CLOCK_MHZ     the GPU clock to start at
#   DYNAMOLLM_FROM          cold | warm-standby
#
# It must start the engine, wait until it answers, and print where it lives
# as the last line of stdout:
#
#   {"placement": {"node": "host", "gpus": [0, 1], "endpoint": "http://host:port"}}
#
# The service then reads <endpoint>/metrics (and sends requests there through
# its router); the instance serves once that page answers. Exit 0 means
# started; any other exit is a failed spawn (75 asks for a retry), quoted
# with the end of stderr. Log to stderr, never to stdout.
#
# This example starts a `dynamollm twin serve` engine (the digital twin behind
# vLLM's API and metrics) on this machine, one port per instance, so the
# whole loop can be tried without GPUs. The place where a real cluster
# starts vLLM or SGLang is marked below.
#
# Settings (from the service's environment, e.g. systemd Environment=):
#   ENGINES_DIR       pid files and engine logs   (default /var/lib/dynamollm-engines)
#   ENGINE_BIN        the dynamollm binary         (default: dynamollm on PATH)
#   ENGINE_HOST       address engines listen on    (default 127.0.0.1)
#   ENGINE_PORT_BASE  instance N listens on this + N (default 8100)
#   ENGINE_NODE       the node name placements give (default: this host's name)
#   ENGINE_READY_S    longest wait for an engine to answer (default 120)
# An engine started with DYNAMOLLM_TWIN_API_KEY in its environment requires
# that key; give the router the same one ([router] api_key).
set -eu

ENGINES_DIR="${ENGINES_DIR:-/var/lib/dynamollm-engines}"
ENGINE_BIN="${ENGINE_BIN:-dynamollm}"
ENGINE_HOST="${ENGINE_HOST:-127.0.0.1}"
ENGINE_PORT_BASE="${ENGINE_PORT_BASE:-8100}"
ENGINE_NODE="${ENGINE_NODE:-$(hostname)}"
ENGINE_READY_S="${ENGINE_READY_S:-120}"

instance="${DYNAMOLLM_INSTANCE:?DYNAMOLLM_INSTANCE is not set (the exec backend of dynamollm serve runs this script)}"
tp="${DYNAMOLLM_TP:-8}"
clock="${DYNAMOLLM_CLOCK_MHZ:-1980}"
port=$((ENGINE_PORT_BASE + instance))
endpoint="http://$ENGINE_HOST:$port"
pidfile="$ENGINES_DIR/i$instance.pid"
log="$ENGINES_DIR/i$instance.log"
mkdir -p "$ENGINES_DIR"

# The one line of stdout the service reads. A real script lists the GPU
# indices it gave the engine: the service matches DCGM and agent readings to
# instances by node and GPU index.
reply() {
    printf '{"placement": {"node": "%s", "gpus": [], "endpoint": "%s"}, "detail": "%s"}\n' \
        "$ENGINE_NODE" "$endpoint" "$1"
}

# Idempotent: after a crash the service sends the same spawn again (same id,
# same instance). An engine already running for this instance is the answer.
if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "instance $instance already runs (pid $(cat "$pidfile"))" >&2
    reply "already running, pid $(cat "$pidfile")"
    exit 0
fi

echo "starting instance $instance: TP$tp at $clock MHz on $endpoint (action $DYNAMOLLM_ACTION_ID)" >&2
# setsid: the engine gets its own session, so it outlives this script (the
# exec backend kills the script's whole process group past timeout_ms).
#
# On a real GPU node, start the engine here instead, for example vLLM on the
# GPUs you picked for it (and lock their clock, or leave clocks to
# [actuators.nvml] or an agent):
#   CUDA_VISIBLE_DEVICES="$gpus" setsid vllm serve meta-llama/Llama-2-70b-chat-hf \
#       --tensor-parallel-size "$tp" --host "$ENGINE_HOST" --port "$port" \
#       </dev/null >/dev/null 2>>"$log" &
setsid "$ENGINE_BIN" twin serve --listen "$ENGINE_HOST:$port" --tp "$tp" --clock-mhz "$clock" \
    </dev/null >/dev/null 2>>"$log" &
pid=$!
echo "$pid" >"$pidfile"

# Wait until the engine answers (vLLM and twin serve both have /health).
waited=0
until curl -sf -o /dev/null "$endpoint/health"; do
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "the engine exited; the end of its log ($log):" >&2
        tail -n 20 "$log" >&2
        rm -f "$pidfile"
        exit 1
    fi
    if [ "$waited" -ge "$ENGINE_READY_S" ]; then
        echo "the engine did not answer on $endpoint within $ENGINE_READY_S s; stopping it" >&2
        kill "$pid" 2>/dev/null || true
        rm -f "$pidfile"
        exit 1
    fi
    sleep 1
    waited=$((waited + 1))
done

reply "pid $pid"
