#!/usr/bin/env bash
# Installs what the sidecar needs on Debian/Ubuntu and a virtualenv in .venv.
#   deploy/install.sh          runtime: redis-server (for the embedded default) + package
#   deploy/install.sh --dev    also the test and benchmark tools: nginx (+ njs, lua),
#                              prometheus + promtool, wrk, the package's [dev] extra,
#                              and the npm linters the tests run, in .tools/
set -euo pipefail
cd "$(dirname "$0")/.."
dev=0; [ "${1:-}" = "--dev" ] && dev=1

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
# A user's PATH may lack /usr/sbin (where Debian puts nginx): look there too.
have() { command -v "$1" >/dev/null || [ -x "/usr/sbin/$1" ]; }
need=()
have redis-server || need+=(redis-server)
python3 -m venv --help >/dev/null 2>&1 || need+=(python3-venv)
if [ $dev = 1 ]; then
  have nginx || need+=(nginx)
  [ -e /usr/lib/nginx/modules/ngx_http_js_module.so ] || need+=(libnginx-mod-http-js)
  [ -e /usr/lib/nginx/modules/ndk_http_module.so ] || need+=(libnginx-mod-http-lua)
  # Debian's lua-nginx-redis installs resty.redis as nginx/redis.lua
  [ -e /usr/share/lua/5.1/resty/redis.lua ] || [ -e /usr/share/lua/5.1/nginx/redis.lua ] \
    || need+=(lua-nginx-redis)
  dpkg -s lua-cjson >/dev/null 2>&1 || need+=(lua-cjson)   # benchmarks/nginx_lua peer
  have prometheus && have promtool || need+=(prometheus)
  have npm || need+=(npm)
  have wrk || need+=(wrk)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "install.sh: installing ${need[*]}" >&2
  as_root env DEBIAN_FRONTEND=noninteractive apt-get update -q >/dev/null
  # policy-rc.d 101: install the packages without starting their system services
  as_root sh -c 'printf "#!/bin/sh\nexit 101\n" > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d'
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends \
    "${need[@]}" >/dev/null
  as_root rm -f /usr/sbin/policy-rc.d
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
if [ $dev = 1 ]; then
  .venv/bin/python -m pip install -q -e '.[dev]'
  # Pinned, project-local (git-ignored): redocly lints the admin OpenAPI document,
  # TypeScript checks the Grafana dashboard against @grafana/schema's Dashboard type.
  npm install -s --prefix .tools --no-audit --no-fund \
    @redocly/cli@2.77.0 typescript@5.9.3 @grafana/schema@13.2.3 >/dev/null
else
  .venv/bin/python -m pip install -q -e .
fi
echo "install.sh: ready (.venv). To run \`sidecar\` by name, put it on your PATH:" >&2
echo "  export PATH=\"$PWD/.venv/bin:\$PATH\"" >&2
