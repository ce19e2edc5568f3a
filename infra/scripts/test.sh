#!/usr/bin/env bash
# The test command: environment, services, then the whole suite (integration and slow included).
set -euo pipefail
cd "$(dirname "$0")/../.."
bash infra/scripts/bootstrap.sh
bash infra/scripts/services.sh

# Tools tests drive: Node.js with the AsyncAPI parser (tests/workers/test_asyncapi.py),
# headless Chromium (tests/workers/test_report.py) and Prometheus (tests/integration/test_prometheus.py).
# The OS packages when absent and allowed (the services' rule: root or ENRICH_TEST_INSTALL_SERVICES=1);
# `npm ci` whenever the lock file changed.
may_install() { [ "$(id -u)" = 0 ] || [ "${ENRICH_TEST_INSTALL_SERVICES:-0}" = 1 ]; }
tools=()
{ command -v node && command -v npm; } >/dev/null || tools+=(nodejs npm)
command -v chromium >/dev/null || tools+=(chromium)
command -v prometheus >/dev/null || tools+=(prometheus)
if [ ${#tools[@]} -gt 0 ] && may_install; then
  echo "test: installing ${tools[*]} from the OS packages" >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${tools[@]}") >/dev/null \
    || echo "test: could not install ${tools[*]}; the tests that need them skip" >&2
fi
npm_stamp=infra/asyncapi/node_modules/.installed-$(sha256sum infra/asyncapi/package-lock.json | cut -c1-16)
if command -v npm >/dev/null && [ ! -f "$npm_stamp" ]; then
  echo "test: npm ci in infra/asyncapi (the AsyncAPI parser)" >&2
  (cd infra/asyncapi && npm ci --no-audit --no-fund --loglevel=error >/dev/null) && touch "$npm_stamp" \
    || echo "test: npm ci failed in infra/asyncapi; tests/workers/test_asyncapi.py will say so" >&2
fi
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec .venv/bin/python -m pytest "$@"
