#!/bin/sh
# set-clock.sh: lock one instance's GPU clock for dynamollm's exec backend.
#
# dynamollm serve runs it for every `set-clock` action ([actuators.exec]
# set_clock) it does not hand to [actuators.nvml] or an agent. It gets:
#
#   DYNAMOLLM_ACTION_ID     the command's id
#   DYNAMOLLM_INSTANCE      the instance
#   DYNAMOLLM_CLOCK_MHZ     the clock to lock its GPUs to
#   DYNAMOLLM_NODE, DYNAMOLLM_GPUS, DYNAMOLLM_ENDPOINT
#                           where it lives, as spawn.sh reported it
#
# Exit 0 when the clock is set. This example sets the clock of a
# `dynamollm twin serve` engine through its /admin/clock endpoint. On a real
# node, lock the instance's GPUs instead (root or CAP_SYS_ADMIN, on that node):
#   nvidia-smi -i "$DYNAMOLLM_GPUS" --lock-gpu-clocks="$DYNAMOLLM_CLOCK_MHZ,$DYNAMOLLM_CLOCK_MHZ"
set -eu

endpoint="${DYNAMOLLM_ENDPOINT:?DYNAMOLLM_ENDPOINT is not set: the instance has no placement yet}"
clock="${DYNAMOLLM_CLOCK_MHZ:?DYNAMOLLM_CLOCK_MHZ is not set}"

curl -sf -X POST -H 'Content-Type: application/json' \
    -d "{\"clock_mhz\": $clock}" "$endpoint/admin/clock" >/dev/null
echo "instance $DYNAMOLLM_INSTANCE: clock $clock MHz" >&2
