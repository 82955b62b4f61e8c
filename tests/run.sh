#!/usr/bin/env bash
# The one test command (README and .ci/run both call it): on Debian 12, as
# root, installs whatever the suite needs that is missing, then runs pytest.
# Every install step is skipped when its inputs have not changed, so a re-run
# goes straight to the tests. Extra arguments are passed to pytest.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo_root"

venv_dir="$repo_root/.venv"
requirements="$repo_root/tests/requirements.txt"
node_dir="$repo_root/tests/node"
# Stamps record the hash of the file an install step consumed; a matching
# stamp means the step already ran with exactly these inputs.
requirements_stamp="$venv_dir/.mds-requirements.sha256"
node_stamp="$node_dir/node_modules/.mds-package-lock.sha256"

# Toolchains and libraries the client tests drive: Go client libraries come
# from Debian's packaged sources (compiled offline under /usr/share/gocode),
# the Java Google auth library is Debian's jar (compiled against with bookworm's
# JDK, whose java and javac come from openjdk-17-jdk-headless), the TPM tests
# need swtpm + tpm2-tss, tpm2-pytss compiles against libtss2-dev with gcc and
# the Python headers.
apt_packages=(
  golang-go golang-google-cloud-dev golang-golang-x-oauth2-google-dev golang-google-api-dev
  golang-github-aws-aws-sdk-go-dev golang-github-aws-aws-sdk-go-v2-dev
  openjdk-17-jdk-headless libgoogle-auth-java
  swtpm swtpm-tools tpm2-tools libtss2-dev pkg-config openssl
  gcc python3 python3-dev python3-venv
)

log() { printf '[tests/run.sh] %s\n' "$*" >&2; }

# Runs a step and reports how long it took, so slow installs are visible in CI logs.
timed() {
  local label="$1"; shift
  local started=$SECONDS
  "$@"
  log "$label took $((SECONDS - started))s"
}

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

package_installed() {
  dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'
}

install_apt_packages() {
  local missing=()
  local package
  for package in "${apt_packages[@]}"; do
    package_installed "$package" || missing+=("$package")
  done
  # The machine image ships node/npm outside apt; only fall back to Debian's
  # packages when there is no node at all.
  if ! command -v node >/dev/null 2>&1; then
    missing+=(nodejs npm)
  fi
  if [ "${#missing[@]}" -eq 0 ]; then
    return 0
  fi
  if ! command -v apt-get >/dev/null 2>&1; then
    log "missing packages (${missing[*]}) and no apt-get: install them by hand"
    return 1
  fi
  local sudo=()
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || { log "need root to install: ${missing[*]}"; return 1; }
    sudo=(sudo)
  fi
  log "apt-get install ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  "${sudo[@]}" apt-get update -qq
  # Slim Debian images drop /usr/share/man; the JDK's postinst links its man pages
  # there with update-alternatives, which fails when man1 is missing.
  "${sudo[@]}" mkdir -p /usr/share/man/man1
  "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

# cloud-init's EC2 datasource, the first reader of a booting instance's metadata, is a
# test client too. It is unpacked from Debian's package, not installed: installed, it
# would configure this machine at its next boot. Its Python dependencies are in the venv.
cloud_init_dir="$repo_root/tests/.build/cloud-init"

install_cloud_init() {
  local version
  version="$(apt-cache policy cloud-init 2>/dev/null | sed -n 's/^ *Candidate: //p')"
  if [ -z "$version" ] || [ "$version" = "(none)" ]; then
    # Images that drop the package lists after installing need them back.
    if [ "$(id -u)" -eq 0 ]; then apt-get update -qq; else sudo apt-get update -qq; fi
    version="$(apt-cache policy cloud-init | sed -n 's/^ *Candidate: //p')"
  fi
  if [ -f "$cloud_init_dir/.version" ] && [ "$(cat "$cloud_init_dir/.version")" = "$version" ]; then
    return 0
  fi
  log "unpacking Debian's cloud-init $version into tests/.build/cloud-init"
  local scratch
  scratch="$(mktemp -d)"
  chmod 0777 "$scratch"      # apt downloads as its own _apt user when it can
  (cd "$scratch" && apt-get download -qq "cloud-init=$version" >/dev/null)
  rm -rf "$cloud_init_dir"
  mkdir -p "$cloud_init_dir"
  dpkg-deb -x "$scratch"/cloud-init_*.deb "$cloud_init_dir"
  rm -rf "$scratch"
  printf '%s\n' "$version" >"$cloud_init_dir/.version"
}

venv_works() {
  [ -x "$venv_dir/bin/python" ] && "$venv_dir/bin/python" -c 'import sys' >/dev/null 2>&1
}

install_python_requirements() {
  local wanted
  wanted="$(sha256_of "$requirements")"
  if venv_works && [ -f "$requirements_stamp" ] && [ "$(cat "$requirements_stamp")" = "$wanted" ]; then
    return 0
  fi
  if ! venv_works; then
    # A venv whose base interpreter vanished cannot be repaired in place.
    rm -rf "$venv_dir"
    python3 -m venv "$venv_dir"
  fi
  log "pip install -r tests/requirements.txt"
  "$venv_dir/bin/python" -m pip install -q --disable-pip-version-check -r "$requirements"
  printf '%s\n' "$wanted" >"$requirements_stamp"
}

install_node_modules() {
  local wanted
  wanted="$(sha256_of "$node_dir/package-lock.json")"
  if [ -f "$node_stamp" ] && [ "$(cat "$node_stamp")" = "$wanted" ]; then
    return 0
  fi
  log "npm ci in tests/node"
  (cd "$node_dir" && npm ci --no-audit --no-fund --loglevel=error >/dev/null)
  printf '%s\n' "$wanted" >"$node_stamp"
}

timed "apt packages" install_apt_packages
timed "python venv" install_python_requirements
timed "node modules" install_node_modules
timed "cloud-init" install_cloud_init

status=0
"$venv_dir/bin/python" -m pytest -q tests "$@" || status=$?
if [ "$status" -eq 5 ]; then
  # pytest's "no tests collected": a suite that ran nothing must not pass.
  log "pytest collected no tests"
  exit 1
fi
exit "$status"
