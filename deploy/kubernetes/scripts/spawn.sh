#!/bin/sh
# spawn.sh: dynamollm's exec `spawn` on Kubernetes (deploy/kubernetes/).
#
# The service's [actuators.exec] runs it with the spawn Command as JSON on
# stdin (not needed here) and these variables (actuators/src/exec.rs):
# DYNAMOLLM_ACTION_ID, DYNAMOLLM_INSTANCE (the new instance's id),
# DYNAMOLLM_POOL, DYNAMOLLM_TP, DYNAMOLLM_CLOCK_MHZ, DYNAMOLLM_FROM.
#
# What it does:
#  1. The engine Deployment of the pool and TP degree is
#     <prefix>-pool<POOL>-tp<TP> (vllm-pool0-tp4, …; engines.yaml).
#  2. A pod of that Deployment labelled dynamollm.io/instance=<INSTANCE>
#     already exists (this action tried before): go to 4.
#  3. Scale the Deployment up by one (`kubectl scale --current-replicas`, so
#     that two spawns at once each add one), then claim a pod of it that no
#     instance holds by labelling it dynamollm.io/instance=<INSTANCE>
#     (`--resource-version`: two spawns never claim the same pod). The label
#     is the instance → pod mapping retire.sh reads.
#  4. Wait for the claimed pod to be Ready, then print its placement as the
#     last line of stdout:
#     {"placement": {"node": "<site>/<node name>", "gpus": [], "endpoint": "http://<pod IP>:<port>"}}
#     The node is <site>/<the pod's spec.nodeName>, as the node agent
#     DaemonSet names itself on MQTT, so set-clock commands reach the agent
#     of the pod's node. "gpus" is empty: Kubernetes does not tell which of
#     the node's GPUs the device plugin gave the pod, so a set-clock locks
#     every GPU of the node (exact for one engine per node, e.g. TP8 on
#     8-GPU nodes).
#  Past DYNAMOLLM_K8S_SPAWN_TIMEOUT_S without a Ready pod (no GPU free,
#  image pull, weights download, crash loop), the claimed pod is retired
#  again (retire.sh) so that no engine is left behind that the service does
#  not know, and it exits 1.
#
# Spawns always start a pod cold (DYNAMOLLM_FROM is not used).
#
# LIMITATION: stopped between the scale-up and the claim (the service's pod
# killed in those seconds), a spawn leaves one replica that no instance
# holds; the service sends the spawn again, which scales up once more. Such
# a pod (`kubectl get pods -l 'app.kubernetes.io/name=vllm,!dynamollm.io/instance'`
# Ready for long) is a leftover: scale its Deployment down by one.
#
# Settings (the service Deployment sets them): DYNAMOLLM_K8S_NAMESPACE
# (default: the service account's namespace), DYNAMOLLM_K8S_ENGINE_PREFIX
# (vllm), DYNAMOLLM_K8S_ENGINE_PORT (8000), DYNAMOLLM_K8S_SITE (k8s; the
# agents' [agent] site), DYNAMOLLM_K8S_SPAWN_TIMEOUT_S (1920: a cold pod may
# take 30 min, see engines.yaml; keep it below the exec timeout_ms),
# DYNAMOLLM_K8S_POLL_S (2).
#
# Needs kubectl and RBAC: get/list/patch/update deployments and
# deployments/scale, get/list/patch pods (rbac.yaml).
set -eu

log() { printf 'spawn.sh: %s\n' "$*" >&2; }
die() { log "$*"; exit 1; }
number() {
  case $2 in
    '' | *[!0-9]*) die "$1 must be a whole number, got '$2' (run by dynamollm's exec backend?)" ;;
  esac
}

instance=${DYNAMOLLM_INSTANCE:-}
pool=${DYNAMOLLM_POOL:-}
tp=${DYNAMOLLM_TP:-}
number DYNAMOLLM_INSTANCE "$instance"
number DYNAMOLLM_POOL "$pool"
number DYNAMOLLM_TP "$tp"

ns=${DYNAMOLLM_K8S_NAMESPACE:-}
if [ -z "$ns" ]; then
  ns=$(cat /var/run/secrets/kubernetes.io/serviceaccount/namespace 2>/dev/null) ||
    die "set DYNAMOLLM_K8S_NAMESPACE (no service account namespace to default to)"
fi
prefix=${DYNAMOLLM_K8S_ENGINE_PREFIX:-vllm}
port=${DYNAMOLLM_K8S_ENGINE_PORT:-8000}
site=${DYNAMOLLM_K8S_SITE:-k8s}
timeout_s=${DYNAMOLLM_K8S_SPAWN_TIMEOUT_S:-1920}
poll_s=${DYNAMOLLM_K8S_POLL_S:-2}
number DYNAMOLLM_K8S_ENGINE_PORT "$port"
number DYNAMOLLM_K8S_SPAWN_TIMEOUT_S "$timeout_s"
number DYNAMOLLM_K8S_POLL_S "$poll_s"

deployment="$prefix-pool$pool-tp$tp"
deadline=$(($(date +%s) + timeout_s))
# One pod a line: name|resourceVersion|node|pod IP|Ready|deletionTimestamp.
pod_fields='{.metadata.name}{"|"}{.metadata.resourceVersion}{"|"}{.spec.nodeName}{"|"}{.status.podIP}{"|"}{.status.conditions[?(@.type=="Ready")].status}{"|"}{.metadata.deletionTimestamp}{"\n"}'

kc() { kubectl -n "$ns" "$@"; }

# The live pods (not being deleted) of `kubectl get pods -l SELECTOR`, one a
# line: name|resourceVersion|node|pod IP|Ready. Fails when kubectl does.
live_pods() {
  out=$(kc get pods -l "$1" -o jsonpath="{range .items[*]}$pod_fields{end}") || return 1
  printf '%s\n' "$out" | while IFS='|' read -r name rv node ip ready deleting; do
    if [ -n "$name" ] && [ -z "$deleting" ]; then
      printf '%s|%s|%s|%s|%s\n' "$name" "$rv" "$node" "$ip" "$ready"
    fi
  done
}

# The pod NAME as live_pods prints it; nothing when it is gone or being deleted.
live_pod() {
  out=$(kc get pod "$1" --ignore-not-found -o jsonpath="$pod_fields") || return 1
  printf '%s\n' "$out" | while IFS='|' read -r name rv node ip ready deleting; do
    if [ -n "$name" ] && [ -z "$deleting" ]; then
      printf '%s|%s|%s|%s|%s\n' "$name" "$rv" "$node" "$ip" "$ready"
    fi
  done
}

replicas=$(kc get deployment "$deployment" -o jsonpath='{.spec.replicas}') ||
  die "no Deployment $deployment in namespace $ns: make one per pool and TP degree the service may use (deploy/kubernetes/engines.yaml)"

# A retry of this spawn finds its pod (never scale up twice for one instance).
mine=$(live_pods "dynamollm.io/instance=$instance") || { log "cannot list pods"; exit 75; }
claimed=$(printf '%s\n' "$mine" | sed -n 1p)
if [ -n "$claimed" ]; then
  log "instance $instance already has pod ${claimed%%|*}; waiting for it"
else
  # Up by one, from the count read just before: after a concurrent change
  # kubectl refuses (precondition or conflict), and we read again.
  tries=0
  until kc scale deployment "$deployment" --current-replicas="$replicas" --replicas="$((replicas + 1))" >&2; do
    tries=$((tries + 1))
    [ "$tries" -lt 10 ] || { log "cannot scale $deployment up"; exit 75; }
    sleep 1
    replicas=$(kc get deployment "$deployment" -o jsonpath='{.spec.replicas}') || true
  done
  log "scaled $deployment from $replicas to $((replicas + 1)) replicas for instance $instance"
fi

# Claim a pod, then wait for it to be Ready. A claimed pod that goes away
# (evicted, deleted by hand) is replaced by the ReplicaSet: claim that one.
# Transient kubectl failures are retried until the deadline.
name=""
while :; do
  if [ -z "$claimed" ]; then
    if free=$(live_pods "dynamollm.io/deployment=$deployment,!dynamollm.io/instance"); then
      free=$(printf '%s\n' "$free" | sed -n 1p)
      if [ -n "$free" ]; then
        IFS='|' read -r name rv _ <<POD
$free
POD
        if kc label pod "$name" "dynamollm.io/instance=$instance" --resource-version="$rv" >&2; then
          log "pod $name is instance $instance"
          claimed=$free
        fi
      fi
    fi
  elif now=$(live_pod "${claimed%%|*}"); then
    [ -n "$now" ] || log "pod ${claimed%%|*} of instance $instance is gone; claiming its replacement"
    claimed=$now
  fi
  if [ -n "$claimed" ]; then
    IFS='|' read -r name _ node ip ready <<POD
$claimed
POD
    if [ "$ready" = True ] && [ -n "$ip" ] && [ -n "$node" ]; then
      case $ip in
        *:*) host="[$ip]" ;; # IPv6
        *) host=$ip ;;
      esac
      printf '{"placement": {"node": "%s/%s", "gpus": [], "endpoint": "http://%s:%s"}, "detail": "pod %s of deployment %s"}\n' \
        "$site" "$node" "$host" "$port" "$name" "$deployment"
      exit 0
    fi
  fi
  if [ "$(date +%s)" -ge "$deadline" ]; then
    break
  fi
  sleep "$poll_s"
done

# Timed out: give the pod (or the replica) back.
if [ -n "$claimed" ]; then
  log "pod $name of instance $instance not Ready within $timeout_s s; retiring it"
  DYNAMOLLM_INSTANCE=$instance DYNAMOLLM_K8S_NAMESPACE=$ns sh "$(dirname "$0")/retire.sh" || log "retiring pod $name failed: scale $deployment down by hand"
else
  log "no pod of $deployment to claim within $timeout_s s; scaling it back down by one"
  if replicas=$(kc get deployment "$deployment" -o jsonpath='{.spec.replicas}') && [ "$replicas" -gt 0 ]; then
    kc scale deployment "$deployment" --current-replicas="$replicas" --replicas="$((replicas - 1))" >&2 ||
      log "scaling $deployment down failed: scale it down by hand"
  fi
fi
die "instance $instance (pool $pool, TP$tp): no Ready pod of $deployment within $timeout_s s"
