#!/bin/sh
# Print the Secret `layermux-redis` with fresh random passwords, for namespace NAMESPACE.
#
#   deploy/k8s/make-secret.sh NAMESPACE > layermux-redis-secret.yaml   # keep it out of git
#   kubectl -n NAMESPACE apply -f layermux-redis-secret.yaml
#
# The ACL rules come from deploy/redis/users.acl (one source of truth); each user's password is
# replaced by the SHA-256 of a new random one (`#<hex>`), so Redis never holds a cleartext
# password. The keys (deploy/k8s/secret.example.yaml shows the same layout):
#   users.acl         mounted by the Redis StatefulSet at /etc/redis/users.acl
#   worker-url        LAYERMUX_REDIS_URL of the workers
#   producer-url      for your producers (the least-privilege `producer` user)
#   monitor-url       for `layermux status` / dashboards
#   gateway-url       LAYERMUX_REDIS_URL of the OpenAI gateway (k8s/gateway.yaml)
#   monitor-username, monitor-password   the Redis readiness probe and KEDA
#   redis-address     host:port for KEDA, fully qualified (the operator runs in its own namespace)
#   admin-password    operators only (redis-cli --user admin)
# Rotating: run again, apply, then `kubectl rollout restart statefulset/layermux-redis
# deployment/layermux-worker deployment/layermux-gateway` (and your producers).
set -eu

ns=${1:?usage: $0 NAMESPACE [REDIS_SERVICE_HOST]}
host=${2:-layermux-redis.$ns.svc.cluster.local}
here=$(cd "$(dirname "$0")" && pwd)
acl_template=$here/../redis/users.acl

rand() {
    # 64 hex characters: URL-safe, which matters because arq does not percent-decode passwords.
    if command -v openssl >/dev/null 2>&1; then openssl rand -hex 32
    else od -An -tx1 -N32 /dev/urandom | tr -d ' \n'; fi
}
sha() { printf %s "$1" | sha256sum | cut -d' ' -f1; }
b64() { printf %s "$1" | base64 | tr -d '\n'; }

worker_pw=$(rand); producer_pw=$(rand); monitor_pw=$(rand); admin_pw=$(rand); gateway_pw=$(rand)

acl=$(sed \
    -e "s/>dev-worker-password-CHANGE-ME/#$(sha "$worker_pw")/" \
    -e "s/>dev-producer-password-CHANGE-ME/#$(sha "$producer_pw")/" \
    -e "s/>dev-monitor-password-CHANGE-ME/#$(sha "$monitor_pw")/" \
    -e "s/>dev-gateway-password-CHANGE-ME/#$(sha "$gateway_pw")/" \
    -e "s/>dev-admin-password-CHANGE-ME/#$(sha "$admin_pw")/" \
    "$acl_template")
case $acl in
    *CHANGE-ME*) echo "$0: a user in $acl_template has a password this script does not know" >&2; exit 1 ;;
esac

cat <<EOF
apiVersion: v1
kind: Secret
metadata:
  name: layermux-redis
  labels:
    app.kubernetes.io/part-of: layermux
type: Opaque
data:
  users.acl: $(b64 "$acl
")
  worker-url: $(b64 "redis://worker:$worker_pw@layermux-redis:6379/0")
  producer-url: $(b64 "redis://producer:$producer_pw@layermux-redis:6379/0")
  monitor-url: $(b64 "redis://monitor:$monitor_pw@layermux-redis:6379/0")
  gateway-url: $(b64 "redis://gateway:$gateway_pw@layermux-redis:6379/0")
  monitor-username: $(b64 monitor)
  monitor-password: $(b64 "$monitor_pw")
  redis-address: $(b64 "$host:6379")
  admin-password: $(b64 "$admin_pw")
EOF
