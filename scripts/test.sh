#!/usr/bin/env bash
# The whole test suite, from a fresh machine: installs what the tests need, checks formatting
# and lints, builds the guest image, then runs every test (unit, vhost-user integration,
# hostile guest, durability, real QEMU guests, third-party front-end, fuzz corpus replay,
# C client). Exits non-zero on the first failure.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh
cargo fmt --all -- --check
cargo clippy --workspace --all-targets --locked -- -D warnings
python3 scripts/check-imports.py
bash scripts/build-guest.sh target/guest >/dev/null
bash scripts/migration-qemu.sh target/qemu-migration
cargo test --locked --workspace --all-targets --features novacron/test-hooks
