#!/usr/bin/env bash
# Soak test: a locally started gateway (with its embedded mock provider) under steady load for
# a bounded time, sampling its RSS, open file descriptors, threads and request latency every
# few seconds; fails when any of them keeps growing beyond a threshold, or on errors.
#
#   scripts/soak.sh [--duration SECONDS] [--interval SECONDS] [--concurrency N] [--bin PATH]
#
#   --duration N      load time in seconds (default: $SOAK_DURATION, else 600 = 10 minutes)
#   --interval N      seconds between samples (default: $SOAK_INTERVAL, else 10)
#   --concurrency N   load workers (default: $SOAK_CONCURRENCY, else 4)
#   --bin PATH        the ssp-gateway binary (default: target/release/ssp-gateway, built if
#                     missing)
#   --out DIR         where samples.csv, the gateway log and the load logs go (default: a new
#                     temporary directory, printed)
#
# Thresholds (environment): SOAK_RSS_GROWTH_PCT (20) and SOAK_RSS_GROWTH_MIN_KB (16384): RSS
# may not grow by more than both between the early and late samples (medians of the first and
# last third) while still growing over the last half; SOAK_FD_GROWTH (32): the same for open
# descriptors; SOAK_LATENCY_FACTOR (3): late median probe latency may not exceed this many
# times the early one (and SOAK_LATENCY_MIN_MS (50) more); SOAK_MAX_ERROR_PCT (0.1): share of
# load requests answered with an unexpected status or not at all. The first SOAK_WARMUP
# seconds (60, or a fifth of the run if shorter) are not judged.
#
# Everything runs on loopback only: the gateway, admin and mock provider listen on free
# 127.0.0.1 ports of a temporary copy of config/, with their own development certificates.
# Load: `ssp-gateway loadtest --json` when the binary has it, otherwise curl workers (batches
# of requests on kept-alive connections, plus fresh connections and refused requests).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

duration=${SOAK_DURATION:-600}
interval=${SOAK_INTERVAL:-10}
concurrency=${SOAK_CONCURRENCY:-4}
bin=""
out=""
while [ $# -gt 0 ]; do
  case "$1" in
    --duration) duration=${2:?}; shift 2 ;;
    --interval) interval=${2:?}; shift 2 ;;
    --concurrency) concurrency=${2:?}; shift 2 ;;
    --bin) bin=${2:?}; shift 2 ;;
    --out) out=${2:?}; shift 2 ;;
    -h|--help) sed -n '2,27p' "$0"; exit 0 ;;
    *) echo "unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
done
for v in duration interval concurrency; do
  case "${!v}" in ''|*[!0-9]*|0) echo "--$v must be a positive whole number" >&2; exit 2 ;; esac
done
for tool in curl python3; do
  command -v "$tool" >/dev/null || { echo "soak needs $tool" >&2; exit 2; }
done

if [ -z "$bin" ]; then
  bin=$root/target/release/ssp-gateway
  if [ ! -x "$bin" ]; then
    echo "building the release binary"
    cargo build --release --locked
  fi
fi
[ -x "$bin" ] || { echo "no binary at $bin" >&2; exit 2; }
bin=$(cd "$(dirname "$bin")" && pwd)/$(basename "$bin")

out=${out:-$(mktemp -d "${TMPDIR:-/tmp}/ssp-soak.XXXXXX")}
mkdir -p "$out"
rm -f "$out"/load-*.log "$out/statuses.log" "$out/samples.csv" "$out/loadtest.json"
work=$(mktemp -d "${TMPDIR:-/tmp}/ssp-soak-world.XXXXXX")
gw_pid=""
loader_pids=()

stop_all() {
  local pid
  for pid in "${loader_pids[@]+"${loader_pids[@]}"}"; do
    kill "$pid" 2>/dev/null || true
  done
  for pid in "${loader_pids[@]+"${loader_pids[@]}"}"; do
    wait "$pid" 2>/dev/null || true
  done
  loader_pids=()
  if [ -n "$gw_pid" ] && kill -0 "$gw_pid" 2>/dev/null; then
    kill -TERM "$gw_pid" 2>/dev/null || true
    for _ in $(seq 1 100); do kill -0 "$gw_pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL "$gw_pid" 2>/dev/null || true
    wait "$gw_pid" 2>/dev/null || true
  fi
  gw_pid=""
}
trap 'stop_all; rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# --- A private world: config copy, free ports, development certificates. ---------------------
read -r gw_port admin_port mock_port < <(python3 - <<'EOF'
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks:
    s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))
for s in socks:
    s.close()
EOF
)
cp -r "$root/config" "$work/config"
cfg=$work/config/gateway.toml
sed -i \
  -e "s#^address = \"127.0.0.1:8443\"#address = \"127.0.0.1:$gw_port\"#" \
  -e "s#^address = \"127.0.0.1:9100\"#address = \"127.0.0.1:$admin_port\"#" \
  -e "s#^address = \"127.0.0.1:9443\"#address = \"127.0.0.1:$mock_port\"#" \
  -e "s#https://localhost:9443/#https://localhost:$mock_port/#" \
  -e 's#^level = "info"#level = "warn"#' \
  -e 's#^format = "pretty"#format = "json"#' \
  -e 's#^requests_per_second = 50$#requests_per_second = 1000000#' \
  -e 's#^burst = 100$#burst = 1000000#' \
  "$cfg"
sed -i "s#https://localhost:9443/#https://localhost:$mock_port/#g" "$work/config/directory.ldif"
for port in "$gw_port" "$admin_port" "$mock_port"; do
  grep -q "$port" "$cfg" || { echo "could not move a listener to port $port in $cfg" >&2; exit 1; }
done
grep -q "localhost:$mock_port/" "$work/config/directory.ldif" ||
  { echo "could not move the provider endpoint in directory.ldif" >&2; exit 1; }
certs=$work/certs-dev

"$bin" run --config "$cfg" >"$out/gateway.log" 2>&1 &
gw_pid=$!
deadline=$((SECONDS + 60))
until curl -fsS -o /dev/null "http://127.0.0.1:$admin_port/readyz" 2>/dev/null; do
  kill -0 "$gw_pid" 2>/dev/null || { echo "the gateway exited:" >&2; tail -n 20 "$out/gateway.log" >&2; exit 1; }
  [ $SECONDS -lt $deadline ] || { echo "the gateway was not ready within 60 s" >&2; exit 1; }
  sleep 0.2
done

GW=https://localhost:$gw_port
EP=https://localhost:$mock_port/B82617/STU3/1/gpconnect
IX=urn:nhs:names:services:gpconnect:fhir:rest
TLS=(--cacert "$certs/ca.pem" --cert "$certs/consumer.pem" --key "$certs/consumer-key.pem")
ROGUE=(--cacert "$certs/ca.pem" --cert "$certs/rogue.pem" --key "$certs/rogue-key.pem")
jwt_file=$work/jwt
refresh_jwt() {
  for scope in 'organization/*.read' 'patient/*.read'; do
    "$bin" dev-jwt --scope "$scope" >"$jwt_file.${scope%%/*}.tmp"
    mv "$jwt_file.${scope%%/*}.tmp" "$jwt_file.${scope%%/*}"
  done
}
refresh_jwt

# curl arguments for one GP Connect call: INTERACTION SCOPE-FILE URL
gpc_args() {
  printf '%s\n' -H "Ssp-TraceID: $(cat /proc/sys/kernel/random/uuid)" -H "Ssp-From: 200000000359" \
    -H "Ssp-To: 918999198993" -H "Ssp-InteractionID: $IX:$1" \
    -H "Authorization: Bearer $(<"$jwt_file.$2")" -H "Accept: application/fhir+json"
}
SLOT_URL="$GW/$EP/Slot?status=free&start=ge$(date -d '+1 day' +%F)&end=le$(date -d '+7 days' +%F)&_include=Slot%3Aschedule"
PATIENT_URL="$GW/$EP/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009"

# One worker: until END, a batch of 20 calls on one kept-alive connection, one call on a fresh
# connection, and one refused call (unregistered certificate); every status is logged as
# "<expected> <got>".
worker() {
  local end=$1 log=$2 i=0 args
  while [ $SECONDS -lt "$end" ]; do
    i=$((i + 1))
    case $((i % 3)) in
      0) mapfile -t args < <(gpc_args read:metadata-1 organization); url="$GW/$EP/metadata" ;;
      1) mapfile -t args < <(gpc_args search:slot-1 organization); url=$SLOT_URL ;;
      *) mapfile -t args < <(gpc_args search:patient-1 patient); url=$PATIENT_URL ;;
    esac
    local urls=()
    for _ in $(seq 1 20); do urls+=(-o /dev/null "$url"); done
    curl -s "${TLS[@]}" "${args[@]}" -w '200 %{http_code}\n' --max-time 30 "${urls[@]}" >>"$log" 2>/dev/null || true
    curl -s "${TLS[@]}" "${args[@]}" -o /dev/null -w '200 %{http_code}\n' --max-time 30 "$url" >>"$log" 2>/dev/null || true
    curl -s "${ROGUE[@]}" "${args[@]}" -o /dev/null -w '403 %{http_code}\n' --max-time 30 "$url" >>"$log" 2>/dev/null || true
  done
}

end=$((SECONDS + duration))
loadgen="curl workers x $concurrency"
if "$bin" loadtest --help 2>/dev/null | grep -q -- '--json'; then
  # The gateway's own load generator (documented in README "Performance").
  loadgen="ssp-gateway loadtest x $concurrency"
  "$bin" loadtest --json \
    --url "https://localhost:$gw_port/https://localhost:$mock_port/B82617/STU3/1/gpconnect" \
    --cert "$certs/consumer.pem" --key "$certs/consumer-key.pem" --cacert "$certs/ca.pem" \
    --mix "search=3,metadata=1" --connections "$concurrency" --warmup 0s --duration "${duration}s" \
    >"$out/loadtest.json" 2>"$out/loadtest.log" &
  loader_pids+=($!)
  sleep 2
  if ! kill -0 "${loader_pids[0]}" 2>/dev/null && ! [ -s "$out/loadtest.json" ]; then
    echo "ssp-gateway loadtest did not run (see $out/loadtest.log); using curl workers" >&2
    loader_pids=()
    loadgen="curl workers x $concurrency"
  fi
fi
if [[ $loadgen == curl* ]]; then
  for w in $(seq 1 "$concurrency"); do
    worker "$end" "$out/load-$w.log" &
    loader_pids+=($!)
  done
fi

# --- Sampling. -----------------------------------------------------------------------------
probe_latency_ms() {
  # Median of 5 sequential calls on fresh connections (full handshake + request), in ms.
  local args
  mapfile -t args < <(gpc_args read:metadata-1 organization)
  for _ in 1 2 3 4 5; do
    curl -s "${TLS[@]}" "${args[@]}" -o /dev/null -w '%{time_total}\n' --max-time 30 "$GW/$EP/metadata" || echo 30
  done | sort -n | sed -n 3p | awk '{ printf "%.1f", $1 * 1000 }'
}
count_requests() {
  cat "$out"/load-*.log 2>/dev/null | wc -l
}

csv=$out/samples.csv
echo "t_s,rss_kb,fds,threads,p50_ms,requests" >"$csv"
echo "soak: $duration s, sample every $interval s, load: $loadgen; gateway pid $gw_pid; output $out"
printf '%6s %10s %6s %8s %9s %10s\n' t_s rss_kb fds threads probe_ms requests
started=$SECONDS
last_jwt=$SECONDS
while :; do
  now=$((SECONDS - started))
  kill -0 "$gw_pid" 2>/dev/null || { echo "the gateway died during the soak:" >&2; tail -n 20 "$out/gateway.log" >&2; exit 1; }
  rss=$(awk '/^VmRSS:/ { print $2 }' "/proc/$gw_pid/status")
  threads=$(awk '/^Threads:/ { print $2 }' "/proc/$gw_pid/status")
  fds=$(find "/proc/$gw_pid/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l)
  p50=$(probe_latency_ms)
  reqs=$(count_requests)
  echo "$now,$rss,$fds,$threads,$p50,$reqs" >>"$csv"
  printf '%6s %10s %6s %8s %9s %10s\n' "$now" "$rss" "$fds" "$threads" "$p50" "$reqs"
  [ $SECONDS -lt $end ] || break
  if [ $((SECONDS - last_jwt)) -ge 60 ]; then refresh_jwt; last_jwt=$SECONDS; fi
  sleep "$interval"
done
stop_all_load() {
  local pid
  for pid in "${loader_pids[@]+"${loader_pids[@]}"}"; do wait "$pid" 2>/dev/null || true; done
  loader_pids=()
}
stop_all_load

# --- Verdict. ------------------------------------------------------------------------------
if [ -s "$out/loadtest.json" ]; then
  echo "loadtest summary ($out/loadtest.json):"
  head -c 2000 "$out/loadtest.json"; echo
fi
cat "$out"/load-*.log >"$out/statuses.log" 2>/dev/null || true
python3 - "$csv" "$out/statuses.log" "$duration" <<'EOF'
import csv, os, statistics, sys

path, statuses, duration = sys.argv[1], sys.argv[2], int(sys.argv[3])
env = lambda k, d: float(os.environ.get(k, d))
rows = [{k: float(v) for k, v in r.items()} for r in csv.DictReader(open(path))]
warmup = env("SOAK_WARMUP", min(60, duration / 5))
judged = [r for r in rows if r["t_s"] >= warmup]
problems = []
if len(judged) < 6:
    problems.append(f"only {len(judged)} samples after the warm-up: run longer or sample more often")
else:
    third = max(2, len(judged) // 3)
    early, late = judged[:third], judged[-third:]
    med = lambda rs, k: statistics.median(r[k] for r in rs)

    def slope(k, rs=judged):
        xs = [r["t_s"] for r in rs]; ys = [r[k] for r in rs]
        mx, my = statistics.mean(xs), statistics.mean(ys)
        den = sum((x - mx) ** 2 for x in xs)
        return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / den if den else 0.0

    def rising(k):
        # Share of sample-to-sample steps that do not go down.
        steps = [b[k] - a[k] for a, b in zip(judged, judged[1:])]
        return sum(s >= 0 for s in steps) / len(steps)

    rss0, rss1 = med(early, "rss_kb"), med(late, "rss_kb")
    grow = rss1 - rss0
    print(f"RSS: early median {rss0:.0f} kB, late median {rss1:.0f} kB ({grow:+.0f} kB, "
          f"{100 * grow / rss0:+.1f} %), trend {slope('rss_kb') * 60:+.0f} kB/min, "
          f"{100 * rising('rss_kb'):.0f} % of steps up or flat")
    # Growth counts when it passes the threshold and is still going on over the last half of
    # the run (a step up that then stays flat, such as a cache filling, is not a leak).
    second_half = judged[len(judged) // 2:]
    still_growing = lambda k: slope(k, second_half) > 0
    if (grow > env("SOAK_RSS_GROWTH_MIN_KB", 16384)
            and 100 * grow / rss0 > env("SOAK_RSS_GROWTH_PCT", 20) and still_growing("rss_kb")):
        problems.append(f"RSS grew {grow:.0f} kB ({100 * grow / rss0:.1f} %) and is still growing")
    fd0, fd1 = med(early, "fds"), med(late, "fds")
    print(f"open fds: early median {fd0:.0f}, late median {fd1:.0f}, max {max(r['fds'] for r in judged):.0f}")
    if fd1 - fd0 > env("SOAK_FD_GROWTH", 32) and still_growing("fds"):
        problems.append(f"open file descriptors grew by {fd1 - fd0:.0f} and are still growing")
    l0, l1 = med(early, "p50_ms"), med(late, "p50_ms")
    print(f"probe latency: early median {l0:.1f} ms, late median {l1:.1f} ms")
    if l1 > env("SOAK_LATENCY_FACTOR", 3) * l0 and l1 - l0 > env("SOAK_LATENCY_MIN_MS", 50):
        problems.append(f"probe latency grew from {l0:.1f} ms to {l1:.1f} ms")

total = bad = 0
if os.path.exists(statuses):
    for line in open(statuses):
        parts = line.split()
        if len(parts) != 2:
            continue
        total += 1
        bad += parts[0] != parts[1]
if total:
    print(f"load: {total} requests, {bad} with an unexpected status or no answer "
          f"({100 * bad / total:.3f} %), {total / duration:.0f} requests/s")
    if 100 * bad / total > env("SOAK_MAX_ERROR_PCT", 0.1):
        problems.append(f"{bad} of {total} requests failed")
if problems:
    print("SOAK FAILED: " + "; ".join(problems))
    sys.exit(1)
print("soak passed")
EOF
