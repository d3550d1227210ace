#!/usr/bin/env bash
# Search -> book -> read -> cancel through the gateway with the development certificates.
# Needs the gateway running (`cargo run --release -- run`), curl and jq.
set -euo pipefail
GW=${GW:-https://localhost:8443}   # the gateway (GW=... to point elsewhere)
EP=${EP:-https://localhost:9443/B82617/STU3/1/gpconnect}   # the provider's registered endpoint (SDS nhsMhsEndPoint)
BIN=${BIN:-target/release/ssp-gateway}
TLS=(--cacert certs-dev/ca.pem --cert certs-dev/consumer.pem --key certs-dev/consumer-key.pem)
IX=urn:nhs:names:services:gpconnect:fhir:rest

# gpc INTERACTION SCOPE [curl arguments...]: one GP Connect call through the gateway.
gpc() {
  local interaction=$1 scope=$2; shift 2
  curl -sS "${TLS[@]}" \
    -H "Ssp-TraceID: $(cat /proc/sys/kernel/random/uuid)" \
    -H "Ssp-From: 200000000359" -H "Ssp-To: 918999198993" \
    -H "Ssp-InteractionID: $interaction" \
    -H "Authorization: Bearer $($BIN dev-jwt --scope "$scope")" \
    -H "Accept: application/fhir+json" "$@"
}

# 1. Search for free slots over the next week.
FROM=$(date -d '+1 day' +%F); TO=$(date -d '+7 days' +%F)
SLOT=$(gpc "$IX:search:slot-1" 'organization/*.read' \
  "$GW/$EP/Slot?status=free&start=ge$FROM&end=le$TO&_include=Slot%3Aschedule" \
  | jq '[.entry[].resource | select(.resourceType == "Slot")][0]')
echo "first free slot: $(jq -r '.id + " at " + .start' <<<"$SLOT")"

# 2. Find the patient by NHS number (the | percent-encoded as %7C).
PATIENT=$(gpc "$IX:search:patient-1" 'patient/*.read' \
  "$GW/$EP/Patient?identifier=https%3A%2F%2Ffhir.nhs.uk%2FId%2Fnhs-number%7C9000000009" \
  | jq -r '.entry[0].resource.id')
echo "patient: Patient/$PATIENT"

# 3. Book the slot.
BOOKING=$(jq -n --argjson slot "$SLOT" --arg patient "$PATIENT" '{
  resourceType: "Appointment",
  meta: {profile: ["https://fhir.nhs.uk/STU3/StructureDefinition/GPConnect-Appointment-1"]},
  contained: [{resourceType: "Organization", id: "1",
    identifier: [{system: "https://fhir.nhs.uk/Id/ods-organization-code", value: "A20047"}],
    name: "Development consumer practice",
    telecom: [{system: "phone", value: "0300 311 22 33", use: "work"}]}],
  extension: [{url: "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-BookingOrganisation-1",
    valueReference: {reference: "#1"}}],
  status: "booked", start: $slot.start, end: $slot.end,
  slot: [{reference: ("Slot/" + $slot.id)}],
  description: "Booked through ssp-gateway", created: (now | todate),
  participant: [{actor: {reference: ("Patient/" + $patient)}, status: "accepted"}]}')
APPT=$(gpc "$IX:create:appointment-1" 'patient/*.write' \
  -H "Content-Type: application/fhir+json;charset=utf-8" --data "$BOOKING" "$GW/$EP/Appointment")
ID=$(jq -r .id <<<"$APPT")
echo "booked: Appointment/$ID, status $(jq -r .status <<<"$APPT")"

# 4. Read it back; its version goes in If-Match.
APPT=$(gpc "$IX:read:appointment-1" 'patient/*.read' "$GW/$EP/Appointment/$ID")
VERSION=$(jq -r .meta.versionId <<<"$APPT")

# 5. Cancel it: the same PUT as an amend; only Ssp-InteractionID tells them apart.
CANCELLED=$(jq '.status = "cancelled" | .extension += [{
  url: "https://fhir.nhs.uk/STU3/StructureDefinition/Extension-GPConnect-AppointmentCancellationReason-1",
  valueString: "Patient no longer needs the appointment"}]' <<<"$APPT")
gpc "$IX:cancel:appointment-1" 'patient/*.write' -X PUT \
  -H "If-Match: W/\"$VERSION\"" -H "Content-Type: application/fhir+json;charset=utf-8" \
  --data "$CANCELLED" "$GW/$EP/Appointment/$ID" | jq -r '"cancelled: Appointment/" + .id + ", status " + .status'

# 6. And a refusal: the same search from a certificate registered nowhere.
TLS=(--cacert certs-dev/ca.pem --cert certs-dev/rogue.pem --key certs-dev/rogue-key.pem)
gpc "$IX:search:slot-1" 'organization/*.read' "$GW/$EP/Slot?status=free&start=ge$FROM&end=le$TO" \
  | jq -r '"rogue certificate: " + .issue[0].diagnostics'
