#!/bin/sh
# retire.sh: drain and stop one engine instance for dynamollm's exec backend.
#
# dynamollm serve runs it for every `retire` action ([actuators.exec] retire),
# after it has stopped sending the instance new requests. It gets:
#
#   DYNAMOLLM_ACTION_ID     the command's id
#   DYNAMOLLM_INSTANCE      the instance to retire
#   DYNAMOLLM_NODE, DYNAMOLLM_GPUS, DYNAMOLLM_ENDPOINT
#                           where it lives, as spawn.sh reported it
#
# Exit 0 when the instance is gone (its GPUs are free); the service then
# forgets it. Any other exit is a failed retire: the instance stays serving
# and the controller decides again. A retire of an instance that is not
# running succeeds (the service may send it twice after a crash).
#
# This example stops the `dynamollm twin serve` engines spawn.sh starts. It
# reads the same settings (ENGINES_DIR, ENGINE_HOST, ENGINE_PORT_BASE) and:
#   ENGINE_DRAIN_S    longest wait for the engine's requests to finish (default 600)
set -eu

ENGINES_DIR="${ENGINES_DIR:-/var/lib/dynamollm-engines}"
ENGINE_HOST="${ENGINE_HOST:-127.0.0.1}"
ENGINE_PORT_BASE="${ENGINE_PORT_BASE:-8100}"
ENGINE_DRAIN_S="${ENGINE_DRAIN_S:-600}"

instance="${DYNAMOLLM_INSTANCE:?DYNAMOLLM_INSTANCE is not set (the exec backend of dynamollm serve runs this script)}"
endpoint="${DYNAMOLLM_ENDPOINT:-http://$ENGINE_HOST:$((ENGINE_PORT_BASE + instance))}"
pidfile="$ENGINES_DIR/i$instance.pid"

if [ ! -f "$pidfile" ] || ! kill -0 "$(cat "$pidfile")" 2>/dev/null; then
    echo "instance $instance is not running here: nothing to do" >&2
    rm -f "$pidfile"
    exit 0
fi
pid=$(cat "$pidfile")

# Requests the engine holds: vLLM's running and waiting gauges (SGLang's
# page has its own names: sglang:num_running_reqs, sglang:num_queue_reqs).
held() {
    curl -sf "$endpoint/metrics" |
        awk '/^vllm:num_requests_(running|waiting)/ { n += $NF } END { print n + 0 }'
}

# Drain: wait until the engine holds no request twice in a row.
echo "draining instance $instance ($endpoint, action $DYNAMOLLM_ACTION_ID)" >&2
empty=0
waited=0
while [ "$empty" -lt 2 ] && [ "$waited" -lt "$ENGINE_DRAIN_S" ]; do
    n=$(held) || break # the page does not answer: nothing left to drain
    if [ "$n" = 0 ]; then empty=$((empty + 1)); else empty=0; fi
    sleep 1
    waited=$((waited + 1))
done

# Stop: SIGTERM, then SIGKILL after 10 s.
kill "$pid" 2>/dev/null || true
i=0
while kill -0 "$pid" 2>/dev/null && [ "$i" -lt 10 ]; do
    sleep 1
    i=$((i + 1))
done
kill -9 "$pid" 2>/dev/null || true
rm -f "$pidfile"
echo "instance $instance stopped" >&2
