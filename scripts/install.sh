#!/usr/bin/env bash
# Installs pdserve on this node for systemd: binaries into $PREFIX/bin (router as
# pdserve-router), NIXL's and UCX's libraries (from scripts/setup.sh's wheels) into
# /usr/lib/pdserve/{nixl,ucx} where the daemons look by default, the units into
# /etc/systemd/system, default configs into /etc/pdserve
# (existing ones are kept), a `pdserve` system user owning /var/lib/pdserve, and the
# synthetic tiny model there (the shipped configs' default model) unless one exists.
#   sudo scripts/install.sh [--bin-dir target/release] [--prefix /usr/local] [--strip]
#   sudo scripts/install.sh --uninstall   # removes binaries, units and the user; keeps
#                                         # /etc/pdserve and /var/lib/pdserve (--purge removes them)
# Then: systemctl enable --now pdserve-prefill (on prefill nodes), pdserve-decode and
# pdserve-router (on decode nodes); see README "Deploy on two GPU nodes".
# DESTDIR=/some/root installs into a staging root (no user, no systemctl), for packaging and tests.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX=/usr/local BIN_DIR=target/release MODE=install PURGE= STRIP=
while [ $# -gt 0 ]; do
  case $1 in
    --prefix) PREFIX=$2; shift 2 ;;
    --bin-dir) BIN_DIR=$2; shift 2 ;;
    --uninstall) MODE=uninstall; shift ;;
    --purge) MODE=uninstall PURGE=1; shift ;;
    --strip) STRIP=-s; shift ;;
    *) echo "install.sh: unknown argument $1" >&2; exit 64 ;;
  esac
done
ROOT=${DESTDIR:-}
UNITS=(pdserve-prefill.service pdserve-decode.service pdserve-router.service pdserve-prefill@.service pdserve-decode@.service)
BINS=(pdserve prefill-server decode-server router)
installed_name() { [ "$1" = router ] && echo pdserve-router || echo "$1"; }
live() { [ -z "$ROOT" ] && command -v systemctl >/dev/null && [ -d /run/systemd/system ]; }

if [ "$MODE" = uninstall ]; then
  if live; then
    for u in "${UNITS[@]}"; do systemctl disable --now "${u/@/@*}" 2>/dev/null || true; done
  fi
  for b in "${BINS[@]}"; do rm -f "$ROOT$PREFIX/bin/$(installed_name "$b")"; done
  for u in "${UNITS[@]}"; do rm -f "$ROOT/etc/systemd/system/$u"; done
  rm -rf "$ROOT$PREFIX/share/doc/pdserve" "$ROOT/usr/lib/pdserve"
  if [ -n "$PURGE" ]; then rm -rf "$ROOT/etc/pdserve" "$ROOT/var/lib/pdserve"; fi
  if [ -z "$ROOT" ] && id pdserve >/dev/null 2>&1; then userdel pdserve || true; fi
  live && systemctl daemon-reload
  echo "install.sh: pdserve removed${PURGE:+ (configs and state too)}"
  exit 0
fi

for b in "${BINS[@]}"; do
  [ -x "$BIN_DIR/$b" ] || { echo "install.sh: $BIN_DIR/$b missing: cargo build --release --workspace (or scripts/build-cuda.sh)" >&2; exit 1; }
done
install -d "$ROOT$PREFIX/bin" "$ROOT/etc/systemd/system" "$ROOT/etc/pdserve" "$ROOT/var/lib/pdserve/models" "$ROOT$PREFIX/share/doc/pdserve"
for b in "${BINS[@]}"; do install $STRIP -m 0755 "$BIN_DIR/$b" "$ROOT$PREFIX/bin/$(installed_name "$b")"; done
for u in "${UNITS[@]}"; do
  sed "s#/usr/local/#$PREFIX/#g" "deploy/systemd/$u" > "$ROOT/etc/systemd/system/$u"
  chmod 0644 "$ROOT/etc/systemd/system/$u"
done
for c in prefill decode router; do
  [ -e "$ROOT/etc/pdserve/$c.toml" ] || install -m 0644 "configs/$c.toml" "$ROOT/etc/pdserve/$c.toml"
done
install -m 0644 README.md configs/README.md "$ROOT$PREFIX/share/doc/pdserve/" 2>/dev/null || install -m 0644 README.md "$ROOT$PREFIX/share/doc/pdserve/"
# The libraries keep the wheels' relative layout (their RPATHs point at sibling folders).
DEPS=${PDSERVE_DEPS_DIR:-.deps}
if [ -e "$DEPS/nixl/.nixl_cu13.mesonpy.libs/libnixl_capi.so" ] && [ -d "$DEPS/ucx/libucx/lib" ]; then
  rm -rf "$ROOT/usr/lib/pdserve"; install -d "$ROOT/usr/lib/pdserve/nixl-wheel" "$ROOT/usr/lib/pdserve/ucx-wheel"
  cp -a "$DEPS/nixl/.nixl_cu13.mesonpy.libs" "$DEPS/nixl/nixl_cu13.libs" "$ROOT/usr/lib/pdserve/nixl-wheel/"
  cp -a "$DEPS/ucx/libucx" "$ROOT/usr/lib/pdserve/ucx-wheel/"
  [ -d "$DEPS/ucx/libucx_cu13.libs" ] && cp -a "$DEPS/ucx/libucx_cu13.libs" "$ROOT/usr/lib/pdserve/ucx-wheel/"
  rm -rf "$ROOT"/usr/lib/pdserve/ucx-wheel/libucx/lib/*.a
  ln -sfn nixl-wheel/.nixl_cu13.mesonpy.libs "$ROOT/usr/lib/pdserve/nixl"
  ln -sfn ucx-wheel/libucx/lib "$ROOT/usr/lib/pdserve/ucx"
else
  echo "install.sh: no NIXL/UCX libraries in $DEPS (run scripts/setup.sh); only the tcp backend will work" >&2
fi
[ -e "$ROOT/var/lib/pdserve/models/tiny/config.json" ] || "$BIN_DIR/pdserve" model synth --preset tiny --out "$ROOT/var/lib/pdserve/models/tiny" >/dev/null
if [ -z "$ROOT" ]; then
  for g in video render; do getent group $g >/dev/null || groupadd --system $g; done
  id pdserve >/dev/null 2>&1 || useradd --system --home-dir /var/lib/pdserve --shell /usr/sbin/nologin --user-group pdserve
  chown -R pdserve:pdserve /var/lib/pdserve
fi
live && systemctl daemon-reload
echo "install.sh: installed into ${ROOT:-/} (binaries in $PREFIX/bin, configs in /etc/pdserve, units in /etc/systemd/system)"
