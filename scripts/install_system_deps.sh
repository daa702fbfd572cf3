#!/usr/bin/env bash
# System packages the DICOM tests and the PACS demo need: Orthanc with its DICOMweb plugin (a real PACS), Chromium
# (OHIF driven headless by Playwright) and npm (fetches the pinned OHIF viewer, apps/sam_med2d/ohif_viewer.py).
# Debian/Ubuntu only; idempotent: installs only what is missing,
# and does nothing (with a note) where apt-get is absent or the user is not root, so the tests that need these
# binaries skip with their reason instead.
set -euo pipefail

packages=()
command -v Orthanc >/dev/null 2>&1 || [ -x /usr/sbin/Orthanc ] || packages+=(orthanc)
[ -f /usr/share/orthanc/plugins/libOrthancDicomWeb.so ] || packages+=(orthanc-dicomweb)
command -v chromium >/dev/null 2>&1 || packages+=(chromium)
command -v npm >/dev/null 2>&1 || packages+=(npm)

if [ ${#packages[@]} -eq 0 ]; then
    echo "system deps: orthanc, orthanc-dicomweb, chromium and npm are installed"
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "system deps: apt-get not found; install ${packages[*]} by hand (the tests that need them skip)" >&2
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "system deps: run as root to install ${packages[*]} (the tests that need them skip)" >&2
    exit 0
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq "${packages[@]}" >/dev/null
# The package starts no daemon here (no systemd in containers); where it does, stop it: tests and users start
# their own Orthanc with scripts/orthanc.py on a chosen port and storage.
if command -v service >/dev/null 2>&1 && service orthanc status >/dev/null 2>&1; then
    service orthanc stop >/dev/null 2>&1 || true
fi
echo "system deps: installed ${packages[*]}"
