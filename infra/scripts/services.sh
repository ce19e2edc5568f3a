#!/usr/bin/env bash
# Make sure RabbitMQ and Redis answer on localhost for the integration tests: start them when
# installed but stopped; install them from the OS packages when absent and we are allowed to
# (root, or ENRICH_TEST_INSTALL_SERVICES=1). Otherwise say exactly what is missing and fail.
set -uo pipefail

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
wait_port() { for _ in $(seq 1 "${3:-60}"); do port_open "$1" && return 0; sleep 1; done; echo "error: $2 did not come up on 127.0.0.1:$1" >&2; return 1; }
can_install() { [ "$(id -u)" = 0 ] || [ "${ENRICH_TEST_INSTALL_SERVICES:-0}" = 1 ]; }
apt_install() { can_install || return 1; (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$@") >/dev/null; }

if ! port_open 5672; then
  if ! command -v rabbitmq-server >/dev/null; then
    echo "services: installing rabbitmq-server" >&2
    apt_install rabbitmq-server || { echo "error: RabbitMQ is not running on 127.0.0.1:5672 and cannot be installed here; start one (guest/guest) or set ENRICH_TEST_AMQP_URL" >&2; exit 1; }
  fi
  echo "services: starting rabbitmq-server" >&2
  rabbitmq-server -detached >/dev/null 2>&1 || true
  wait_port 5672 RabbitMQ 90 || exit 1
fi
if ! port_open 6379; then
  if ! command -v redis-server >/dev/null; then
    echo "services: installing redis-server" >&2
    apt_install redis-server || { echo "error: Redis is not running on 127.0.0.1:6379 and cannot be installed here; start one or set ENRICH_TEST_REDIS_URL" >&2; exit 1; }
  fi
  echo "services: starting redis-server" >&2
  mkdir -p /var/lib/redis /var/log/redis 2>/dev/null || true
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no >/dev/null 2>&1 || true
  wait_port 6379 Redis 30 || exit 1
fi
echo "services: RabbitMQ 127.0.0.1:5672 and Redis 127.0.0.1:6379 up" >&2
