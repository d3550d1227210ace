#!/usr/bin/env bash
# The test command (README "Set up: two commands"): installs the system packages the tests start for real,
# when they are missing, then runs every test. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian packages the integration tests need, as "command:package" pairs.
NEEDED=(
  "slapd:slapd"
  "slapadd:slapd"
  "ldapsearch:ldap-utils"
  "promtool:prometheus"
  "prometheus:prometheus"
  "sslscan:sslscan"
  "openssl:openssl"
  "python3:python3"
)
# slapd's tools live in /usr/sbin, which is not on every user's PATH.
export PATH="$PATH:/usr/sbin:/sbin"
missing=()
for pair in "${NEEDED[@]+"${NEEDED[@]}"}"; do
  command -v "${pair%%:*}" >/dev/null 2>&1 || missing+=("${pair#*:}")
done
# PyYAML, with which tests/deploy.rs reads the Kubernetes manifests, is a module, not a command.
python3 -c 'import yaml' >/dev/null 2>&1 || missing+=("python3-yaml")
if [ ${#missing[@]} -gt 0 ]; then
  echo "installing: ${missing[*]}"
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

cargo test --locked --all-targets "$@"
