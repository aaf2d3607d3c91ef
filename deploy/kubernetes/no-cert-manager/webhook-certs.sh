#!/usr/bin/env bash
# The serving certificates without cert-manager: a CA kept in --dir (made on the first
# run, reused after, so the webhook's caBundle and the CA the agents trust do not change
# when a serving certificate is renewed), and, signed by it,
#   - the injector's certificate for its Service, the Secret the injector mounts, and the
#     CA in the webhook's caBundle;
#   - the broker's certificate for its Service (and localhost, for brokerctl through
#     kubectl port-forward), the Secret the broker mounts (its ca.crt is also what the
#     injector hands to the agents).
#
#   kubectl apply -k deploy/kubernetes/no-cert-manager     # first: the namespace and webhook
#   deploy/kubernetes/no-cert-manager/webhook-certs.sh --dir ./injector-ca
#
# Run it again before the serving certificates expire (--days, default 365): the injector
# and the broker re-read the files when the Secrets' new content reaches their pods. Keep
# --dir private (ca.key signs anything the API server and the agents will trust);
# KUBECTL names another kubectl.
set -euo pipefail

dir=""
namespace="ephemeral-broker"
service="ephemeral-broker-injector"
secret="ephemeral-broker-injector-tls"
webhook="ephemeral-broker-injector"
broker_service="ephemeral-broker"
broker_secret="ephemeral-broker-tls"
days=365
kubectl="${KUBECTL:-kubectl}"

usage() {
    echo "usage: $0 --dir DIR [--namespace NS] [--service NAME] [--secret NAME]" \
        "[--webhook NAME] [--broker-service NAME] [--broker-secret NAME] [--days N]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="${2:?}"; shift 2 ;;
        --namespace) namespace="${2:?}"; shift 2 ;;
        --service) service="${2:?}"; shift 2 ;;
        --secret) secret="${2:?}"; shift 2 ;;
        --webhook) webhook="${2:?}"; shift 2 ;;
        --broker-service) broker_service="${2:?}"; shift 2 ;;
        --broker-secret) broker_secret="${2:?}"; shift 2 ;;
        --days) days="${2:?}"; shift 2 ;;
        *) usage ;;
    esac
done
[ -n "$dir" ] || usage
case "$days" in ''|*[!0-9]*) usage ;; esac

umask 077
mkdir -p "$dir"
host="$service.$namespace.svc"

if [ ! -s "$dir/ca.key" ] || [ ! -s "$dir/ca.crt" ]; then
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/ca.key"
    openssl req -x509 -new -key "$dir/ca.key" -sha256 -days 3650 \
        -subj "/CN=$service-ca" \
        -addext "basicConstraints=critical,CA:TRUE" \
        -addext "keyUsage=critical,keyCertSign,cRLSign" \
        -out "$dir/ca.crt"
    echo "made a new CA in $dir (valid 10 years)" >&2
fi

# serve NAME HOST [DNS...]: NAME.key and NAME.crt in --dir, a serving certificate for
# HOST (and HOST.cluster.local, and any further DNS names) signed by the CA.
serve() {
    local name="$1" host="$2" sans="DNS:$2,DNS:$2.cluster.local"
    shift 2
    for extra in "$@"; do sans="$sans,DNS:$extra"; done
    openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/$name.key"
    openssl req -new -key "$dir/$name.key" -subj "/CN=$host" -out "$dir/$name.csr"
    cat > "$dir/$name.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=$sans
EXT
    openssl x509 -req -in "$dir/$name.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
        -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
        -extfile "$dir/$name.ext" -out "$dir/$name.crt" 2>/dev/null
    rm -f "$dir/$name.csr" "$dir/$name.ext"
    openssl verify -CAfile "$dir/ca.crt" "$dir/$name.crt" >/dev/null
}

broker_host="$broker_service.$namespace.svc"
serve tls "$host"
serve broker "$broker_host" localhost

b64() { base64 < "$1" | tr -d '\n'; }

# The Secrets as manifests on stdin: no key material on a command line.
"$kubectl" apply -f - <<SECRETS
apiVersion: v1
kind: Secret
metadata:
  name: $secret
  namespace: $namespace
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$dir/tls.crt")
  tls.key: $(b64 "$dir/tls.key")
  ca.crt: $(b64 "$dir/ca.crt")
---
apiVersion: v1
kind: Secret
metadata:
  name: $broker_secret
  namespace: $namespace
type: kubernetes.io/tls
data:
  tls.crt: $(b64 "$dir/broker.crt")
  tls.key: $(b64 "$dir/broker.key")
  ca.crt: $(b64 "$dir/ca.crt")
SECRETS

# The CA (public) into every webhook of the configuration.
count="$("$kubectl" get mutatingwebhookconfiguration "$webhook" \
    -o jsonpath='{range .webhooks[*]}x{end}')"
[ -n "$count" ] || { echo "webhook configuration $webhook not found: apply first" >&2; exit 1; }
ca="$(b64 "$dir/ca.crt")"
ops=""
for i in $(seq 0 $((${#count} - 1))); do
    ops="$ops${ops:+,}{\"op\":\"add\",\"path\":\"/webhooks/$i/clientConfig/caBundle\",\"value\":\"$ca\"}"
done
"$kubectl" patch mutatingwebhookconfiguration "$webhook" --type=json -p "[$ops]"

for name in tls broker; do
    echo "serving certificate $(openssl x509 -subject -noout -in "$dir/$name.crt" | sed 's/.*CN *= *//')" \
        "valid until $(openssl x509 -enddate -noout -in "$dir/$name.crt" | cut -d= -f2)" >&2
done
