#!/usr/bin/env bash
# The gateway's user-space instructions per keep-alive request, counted by valgrind's callgrind:
# the figure docs/performance.md "The same request counted in instructions" cites, which this shared
# machine's noise does not move the way it moves CPU time.
#
#   scripts/callgrind.sh [OUT]        (OUT: the callgrind profile, default /tmp/ssp-callgrind.out)
#
# Builds the bench (release), lets it make a scratch world (certificates, LDIF directory, the
# gateway config with audit `buffered`) with one quick run, then starts the bench's provider and
# the release gateway under `valgrind --tool=callgrind --instr-atstart=no`, warms up with 10
# requests on one connection (not counted), switches instrumentation on and sends 2,000 slot
# searches at 100/s over 4 keep-alive connections (`ssp-gateway loadtest`, after its own 2 s
# warm-up: 2,200 requests counted), and prints the total and the count per request. Needs
# valgrind (`apt-get install valgrind`). Read the profile with
# `callgrind_annotate --inclusive=yes OUT`. The handshakes inside the window are counted too:
# the load generator's 4 and the provider-leg connections the gateway's pool opens, a number
# that varies from run to run (one run had 10 RSA signatures, 8% of its total). Compare builds
# over runs whose RSA totals (`aws_lc_*_RSA_sign_pss_mgf1`) are equal, or over several runs.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-/tmp/ssp-callgrind.out}
for tool in valgrind callgrind_control curl; do
    command -v "$tool" >/dev/null || { echo "callgrind.sh: needs $tool (apt-get install valgrind curl)" >&2; exit 1; }
done

scratch=$(mktemp -d)
pids=()
cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$scratch"
}
trap cleanup EXIT

printf '[audit]\ndurability = "buffered"\n' > "$scratch/buffered.toml"
cargo bench --bench e2e -- --quick --no-nginx --keep --duration 1s --warmup 1s \
    --gateway "buffered=$scratch/buffered.toml" get-4k > "$scratch/bench.log" 2>&1 || {
    cat "$scratch/bench.log" >&2; exit 1; }
world=$(sed -n 's/^scratch directory kept: //p' "$scratch/bench.log")
[ -d "$world" ] || { echo "callgrind.sh: the bench kept no scratch directory" >&2; exit 1; }
trap 'cleanup; rm -rf "$world"' EXIT

provider_port=$(grep -m1 nhsMHSEndPoint "$world/directory.ldif" | sed 's#.*127.0.0.1:\([0-9]*\)/.*#\1#')
gateway_addr=$(grep -A1 '^\[listener\]' "$world/gateway-0.toml" | sed -n 's/^address = "\(.*\)"/\1/p')
admin_addr=$(grep -A1 '^\[admin\]' "$world/gateway-0.toml" | sed -n 's/^address = "\(.*\)"/\1/p')
bench_bin=$(ls -t target/release/deps/e2e-* | grep -v '\.d$' | head -1)
rm -rf "$world"/audit-*/*

SSP_E2E_ROLE=provider SSP_E2E_ADDR=127.0.0.1:$provider_port SSP_E2E_DIR=$world \
    "$bench_bin" > "$scratch/provider.log" 2>&1 &
pids+=($!)
valgrind --tool=callgrind --instr-atstart=no --callgrind-out-file="$out" \
    target/release/ssp-gateway run --config "$world/gateway-0.toml" > "$scratch/gateway.log" 2>&1 &
gateway=$!
pids+=("$gateway")
for _ in $(seq 120); do
    curl -sf "http://$admin_addr/readyz" >/dev/null 2>&1 && break
    kill -0 "$gateway" 2>/dev/null || { cat "$scratch/gateway.log" >&2; exit 1; }
    sleep 0.5
done
curl -sf "http://$admin_addr/readyz" >/dev/null || { echo "callgrind.sh: the gateway never became ready" >&2; exit 1; }

load() {
    target/release/ssp-gateway loadtest \
        --url "https://$gateway_addr/https://127.0.0.1:$provider_port/B82617/STU3/1/gpconnect" \
        --cert "$world/consumer.pem" --key "$world/consumer-key.pem" --cacert "$world/ca.pem" \
        --mix search=1 "$@"
}
# Uncounted warm-up, until a request gets through: on a busy machine the gateway under
# valgrind can take longer than a short run to finish its first handshakes.
for try in 1 2 3 4 5; do
    load --connections 1 --rate 10 --warmup 0s --duration 2s > /dev/null 2>&1 && break
    [ "$try" -lt 5 ] || { echo "callgrind.sh: no request got through the warm-up" >&2; tail -20 "$scratch/gateway.log" >&2; exit 1; }
done
callgrind_control -i on "$gateway" > /dev/null 2>&1
load --connections 4 --rate 100 --warmup 2s --duration 20s | grep -E '^  (responses|status)' || true
callgrind_control -i off "$gateway" > /dev/null 2>&1
kill "$gateway"
wait "$gateway" 2>/dev/null || true
total=$(callgrind_annotate "$out" 2>/dev/null | sed -n 's/^ *\([0-9,]*\) .*PROGRAM TOTALS.*/\1/p' | tr -d ,)
[ -n "$total" ] || { echo "callgrind.sh: no totals in $out" >&2; exit 1; }
echo "instructions: $total in all, $((total / 2200)) per request (2,200 requests); profile: $out"
