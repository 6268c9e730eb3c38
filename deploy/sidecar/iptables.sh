#!/bin/sh
# Transparent interception for a Trellis sidecar, as OSM's init container set
# it up: inbound TCP to Envoy's inbound listener (15003), outbound TCP to its
# outbound listener (15001). Envoy's own traffic (PROXY_UID) and loopback are
# exempt, as are Envoy's admin, Prometheus and probe ports inbound.
#
# The sidecar init container and the end-to-end tests run this same script,
# in the pod's network namespace, as root.
#
# Environment (all optional):
#   PROXY_UID                    Envoy's UID (default 1500)
#   INBOUND_PORT_EXCLUSIONS      comma-separated ports not intercepted inbound
#   OUTBOUND_PORT_EXCLUSIONS     comma-separated ports not intercepted outbound
#   OUTBOUND_IP_RANGE_EXCLUSIONS comma-separated CIDRs not intercepted outbound
#   OUTBOUND_IP_RANGE_INCLUSIONS comma-separated CIDRs: if set, only these are
#                                intercepted outbound (after the exclusions)
#   NETWORK_INTERFACE_EXCLUSIONS comma-separated interfaces whose traffic is
#                                not intercepted, either way
set -eu

PROXY_UID="${PROXY_UID:-1500}"
IPT="${IPTABLES:-iptables}"

nat() { "$IPT" -t nat "$@"; }

for chain in PROXY_INBOUND PROXY_IN_REDIRECT PROXY_OUTPUT PROXY_REDIRECT; do
  nat -N "$chain"
done

nat -A PROXY_REDIRECT -p tcp -j REDIRECT --to-port 15001
nat -A PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-port 15003

# Inbound: everything but Envoy's own ports goes to the inbound listener.
nat -A PREROUTING -p tcp -j PROXY_INBOUND
for interface in $(echo "${NETWORK_INTERFACE_EXCLUSIONS:-}" | tr ',' ' '); do
  nat -A PROXY_INBOUND -i "$interface" -j RETURN
done
for port in 15000 15010 15901 15902 15903 15904; do
  nat -A PROXY_INBOUND -p tcp --dport "$port" -j RETURN
done
for port in $(echo "${INBOUND_PORT_EXCLUSIONS:-}" | tr ',' ' '); do
  nat -A PROXY_INBOUND -p tcp --dport "$port" -j RETURN
done
nat -A PROXY_INBOUND -p tcp -j PROXY_IN_REDIRECT

# Outbound: the application's connections go to the outbound listener.
nat -A OUTPUT -p tcp -j PROXY_OUTPUT
# An application calling its own pod through a service comes back inbound.
nat -A PROXY_OUTPUT -o lo ! -d 127.0.0.1/32 -m owner --uid-owner "$PROXY_UID" -j PROXY_IN_REDIRECT
nat -A PROXY_OUTPUT -m owner --uid-owner "$PROXY_UID" -j RETURN
nat -A PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
for interface in $(echo "${NETWORK_INTERFACE_EXCLUSIONS:-}" | tr ',' ' '); do
  nat -A PROXY_OUTPUT -o "$interface" -j RETURN
done
for port in $(echo "${OUTBOUND_PORT_EXCLUSIONS:-}" | tr ',' ' '); do
  nat -A PROXY_OUTPUT -p tcp --dport "$port" -j RETURN
done
for range in $(echo "${OUTBOUND_IP_RANGE_EXCLUSIONS:-}" | tr ',' ' '); do
  nat -A PROXY_OUTPUT -d "$range" -j RETURN
done
if [ -n "${OUTBOUND_IP_RANGE_INCLUSIONS:-}" ]; then
  for range in $(echo "$OUTBOUND_IP_RANGE_INCLUSIONS" | tr ',' ' '); do
    nat -A PROXY_OUTPUT -d "$range" -j PROXY_REDIRECT
  done
  nat -A PROXY_OUTPUT -j RETURN
else
  nat -A PROXY_OUTPUT -j PROXY_REDIRECT
fi
