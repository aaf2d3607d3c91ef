#!/usr/bin/env bash
# The injector's serving certificate without cert-manager: a CA kept in --dir (made on
# the first run, reused after, so the webhook's caBundle does not change when the
# serving certificate is renewed), a serving certificate for the injector's Service
# signed by it, the Secret the injector mounts, and the CA in the webhook's caBundle.
#
#   kubectl apply -k deploy/kubernetes/no-cert-manager     # first: the namespace and webhook
#   deploy/kubernetes/no-cert-manager/webhook-certs.sh --dir ./injector-ca
#
# Run it again before the serving certificate expires (--days, default 365): the injector
# re-reads the files when the Secret's new content reaches its pods. Keep --dir private
# (ca.key signs anything the API server will trust as the injector); KUBECTL names
# another kubectl.
set -euo pipefail

dir=""
namespace="ephemeral-broker"
service="ephemeral-broker-injector"
secret="ephemeral-broker-injector-tls"
webhook="ephemeral-broker-injector"
days=365
kubectl="${KUBECTL:-kubectl}"

usage() {
    echo "usage: $0 --dir DIR [--namespace NS] [--service NAME] [--secret NAME]" \
        "[--webhook NAME] [--days N]" >&2
    exit 2
}

while [ $# -gt 0 ]; do
    case "$1" in
        --dir) dir="${2:?}"; shift 2 ;;
        --namespace) namespace="${2:?}"; shift 2 ;;
        --service) service="${2:?}"; shift 2 ;;
        --secret) secret="${2:?}"; shift 2 ;;
        --webhook) webhook="${2:?}"; shift 2 ;;
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

openssl genpkey -algorithm EC -pkeyopt ec_paramgen_curve:P-256 -out "$dir/tls.key"
openssl req -new -key "$dir/tls.key" -subj "/CN=$host" -out "$dir/tls.csr"
cat > "$dir/tls.ext" <<EXT
basicConstraints=critical,CA:FALSE
keyUsage=critical,digitalSignature
extendedKeyUsage=serverAuth
subjectAltName=DNS:$host,DNS:$host.cluster.local
EXT
openssl x509 -req -in "$dir/tls.csr" -CA "$dir/ca.crt" -CAkey "$dir/ca.key" \
    -set_serial "0x$(openssl rand -hex 16)" -days "$days" -sha256 \
    -extfile "$dir/tls.ext" -out "$dir/tls.crt" 2>/dev/null
rm -f "$dir/tls.csr" "$dir/tls.ext"
openssl verify -CAfile "$dir/ca.crt" "$dir/tls.crt" >/dev/null

b64() { base64 < "$1" | tr -d '\n'; }

# The Secret as a manifest on stdin: no key material on a command line.
"$kubectl" apply -f - <<SECRET
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
SECRET

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

echo "serving certificate for $host valid until $(openssl x509 -enddate -noout -in "$dir/tls.crt" | cut -d= -f2)" >&2
