#!/bin/sh
# retire.sh: dynamollm's exec `retire` on Kubernetes (deploy/kubernetes/).
#
# The service's [actuators.exec] runs it with the retire Command as JSON on
# stdin (not needed here) and DYNAMOLLM_ACTION_ID, DYNAMOLLM_INSTANCE and
# the instance's placement (DYNAMOLLM_NODE, DYNAMOLLM_GPUS,
# DYNAMOLLM_ENDPOINT) in the environment (actuators/src/exec.rs). The
# service has stopped routing to the instance before it retires it.
#
# What it does:
#  1. Finds the instance's pod by the label spawn.sh put on it,
#     dynamollm.io/instance=<INSTANCE>; no such pod: the instance is gone
#     already, exit 0 (a retry of a retire that finished).
#  2. Annotates the pod controller.kubernetes.io/pod-deletion-cost=-1000
#     (and dynamollm.io/retiring=<action id>, so that a retry does not scale
#     down twice), then scales its Deployment down by one
#     (`kubectl scale --current-replicas`, read just before).
#  3. Waits for the pod to be gone (its preStop hook lets answers in flight
#     finish; see engines.yaml), then exits 0.
#
# LIMITATION: `kubectl scale` does not name the pod to remove: the
# ReplicaSet chooses. It removes pods not yet scheduled, then pending, then
# not Ready, before any Ready pod whatever their deletion cost, and only
# among equals the lowest controller.kubernetes.io/pod-deletion-cost first
# (a preference, on by default since Kubernetes 1.22, not a guarantee). So
# this script annotates the retired pod with the lowest cost first, and
# scales down only while every other live pod of the Deployment is Ready
# (a spawn still starting one would otherwise lose it instead); it waits
# for that up to its timeout and then exits 75 (retryable). Two retires in
# one Deployment at once may each see the other's pod go first; both still
# finish, each scale-down taking one of the two.
#
# Settings (the service Deployment sets them): DYNAMOLLM_K8S_NAMESPACE
# (default: the service account's namespace), DYNAMOLLM_K8S_RETIRE_TIMEOUT_S
# (600: keep it below the exec timeout_ms), DYNAMOLLM_K8S_POLL_S (2).
#
# Needs kubectl and RBAC: get/list/patch/update deployments and
# deployments/scale, get/list/patch pods (rbac.yaml).
set -eu

log() { printf 'retire.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
number() {
  case $2 in
    '' | *[!0-9]*) die "$1 must be a whole number, got '$2' (run by dynamollm's exec backend?)" ;;
  esac
}

instance=${DYNAMOLLM_INSTANCE:-}
number DYNAMOLLM_INSTANCE "$instance"
action=${DYNAMOLLM_ACTION_ID:-manual}
ns=${DYNAMOLLM_K8S_NAMESPACE:-}
if [ -z "$ns" ]; then
  ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace 2>/dev/null) ||
    die "set DYNAMOLLM_K8S_NAMESPACE (no service account namespace to default to)"
fi
timeout_s=${DYNAMOLLM_K8S_RETIRE_TIMEOUT_S:-600}
poll_s=${DYNAMOLLM_K8S_POLL_S:-2}
number DYNAMOLLM_K8S_RETIRE_TIMEOUT_S "$timeout_s"
number DYNAMOLLM_K8S_POLL_S "$poll_s"
deadline=$(($(date +%s) + timeout_s))

kc() { kubectl -n "$ns" "$@"; }
late() { [ "$(date +%s)" -ge "$deadline" ]; }

# One pod a line: name|resourceVersion|its Deployment|retiring|Ready|deletionTimestamp.
pod_fields='{.metadata.name}{"|"}{.metadata.resourceVersion}{"|"}{.metadata.labels.dynamollm\.io/deployment}{"|"}{.metadata.annotations.dynamollm\.io/retiring}{"|"}{.status.conditions[?(@.type=="Ready")].status}{"|"}{.metadata.deletionTimestamp}{"\n"}'

tries=0
while :; do
  pods=$(kc get pods -l "dynamollm.io/instance=$instance" -o jsonpath="{range .items[*]}$pod_fields{end}") ||
    { log "cannot list pods"; exit 75; }
  line=$(printf '%s\n' "$pods" | sed -n 1p)
  if [ -z "$line" ]; then
    log "instance $instance has no pod: gone already"
    exit 0
  fi
  IFS='|' read -r name rv deployment retiring _ deleting <<POD
$line
POD
  [ -n "$deployment" ] || die "pod $name has no dynamollm.io/deployment label: not an engine of engines.yaml"
  if [ -n "$deleting" ] || [ -n "$retiring" ]; then
    log "pod $name of instance $instance is already being retired${retiring:+ (by $retiring)}"
    break
  fi

  # Every other live pod of the Deployment Ready? (Else the ReplicaSet would remove that one.)
  if all=$(kc get pods -l "dynamollm.io/deployment=$deployment" -o jsonpath="{range .items[*]}$pod_fields{end}"); then
    starting=$(printf '%s\n' "$all" | while IFS='|' read -r other _ _ _ ready gone; do
      if [ -n "$other" ] && [ "$other" != "$name" ] && [ -z "$gone" ] && [ "$ready" != True ]; then
        printf '%s ' "$other"
      fi
    done)
  else
    starting="(cannot list the pods)"
  fi
  if [ -n "$starting" ]; then
    if late; then
      log "pods of $deployment still starting: $starting; scaling down now could remove one of them instead of $name"
      exit 75
    fi
    log "waiting for pods of $deployment to be Ready before scaling down: $starting"
    sleep "$poll_s"
    continue
  fi

  # Lowest deletion cost first, then one replica fewer.
  if kc annotate pod "$name" controller.kubernetes.io/pod-deletion-cost=-1000 "dynamollm.io/retiring=$action" \
    --overwrite --resource-version="$rv" >&2; then
    tries=0
    until replicas=$(kc get deployment "$deployment" -o jsonpath='{.spec.replicas}') &&
      [ "$replicas" -gt 0 ] &&
      kc scale deployment "$deployment" --current-replicas="$replicas" --replicas="$((replicas - 1))" >&2; do
      tries=$((tries + 1))
      [ "$tries" -lt 10 ] || { log "cannot scale $deployment down (pod $name is annotated: scale it down by hand)"; exit 1; }
      sleep 1
    done
    log "scaled $deployment from $replicas to $((replicas - 1)) replicas to retire pod $name (instance $instance)"
    break
  fi
  # The pod changed since it was read (or the API failed): read it again.
  tries=$((tries + 1))
  [ "$tries" -lt 10 ] || { log "cannot annotate pod $name"; exit 75; }
  sleep 1
done

# Wait for the pod to be gone.
while :; do
  if left=$(kc get pod "$name" --ignore-not-found -o name) && [ -z "$left" ]; then
    log "pod $name of instance $instance is gone"
    exit 0
  fi
  if late; then
    die "pod $name of instance $instance still there after $timeout_s s (if it is not terminating, the ReplicaSet removed another pod: delete it by hand)"
  fi
  sleep "$poll_s"
done
