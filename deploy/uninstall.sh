#!/bin/sh
# Removes Trellis from a cluster, in the order that never blocks a pod:
#
#   1. the webhooks, first: the injector's has failurePolicy: Fail, so once
#      the injector is gone every pod created in a mesh namespace would be
#      refused while its configuration stayed;
#   2. the control plane: leaders, edges, injector, their RBAC, and the
#      trellis-system namespace (with the MeshConfig and Secrets in it);
#   3. only with --crds: the CRDs, and every SMI and policy object with
#      them (keep them to move back, or to OSM).
#
# Running pods are not touched: their sidecars keep the configuration they
# hold until the pods are restarted (without a sidecar, once the webhook is
# gone). KUBECTL names the kubectl to use (default: kubectl).
set -eu
KUBECTL="${KUBECTL:-kubectl}"
selector="app.kubernetes.io/part-of=trellis"

"$KUBECTL" delete mutatingwebhookconfigurations,validatingwebhookconfigurations \
  -l "$selector" --ignore-not-found
"$KUBECTL" delete clusterrolebindings,clusterroles -l "$selector" --ignore-not-found
"$KUBECTL" delete namespace trellis-system --ignore-not-found --wait=false
if [ "${1:-}" = "--crds" ]; then
  "$KUBECTL" delete customresourcedefinitions -l "$selector" --ignore-not-found
fi
