#!/usr/bin/env bash
# Compares callseal's HTTPS upload and download throughput with nginx's, using the same client
# (`callseal bench`) and payload in one run.
#
# nginx is configured as a TLS-terminating reverse proxy (the same development certificate,
# TLS 1.2 and 1.3, h2 and http/1.1, at most 64 h2 streams per connection like callseal) in front
# of a second nginx server on loopback. That sink stores each PUT body with the WebDAV module
# and serves it back on GET. The sink must read the whole body before it responds: nginx's
# `return 201` responds as soon as the headers arrive, and the client then stops sending. Storing
# the body is the cheapest way stock nginx has to read it all, and it lets downloads be checked
# byte for byte with the same client settings on both sides.
#
# Everything lives in a temporary directory on tmpfs (/dev/shm unless BENCH_DIR says otherwise):
# nginx's configuration, pid and log files, the bodies it stores, and the started callseal
# gateway's local storage. Neither side waits on a disk and neither fsyncs to one, so the
# figures compare the two servers' own costs. Every server listens on 127.0.0.1 only and is
# stopped on exit.
#
# Usage: benches/nginx.sh [callseal bench options]
#   The options go to both runs, for example: --size 64MiB --concurrency 8 --requests 16 --http1
#   Defaults: --size 64MiB --concurrency 8 --requests 16.
# Environment:
#   CALLSEAL_BIN  the callseal binary (default: target/release/callseal; build it with
#                 `cargo build --release`)
#   BENCH_DIR     where to create the temporary directory (default: /dev/shm)
#   ROUNDS        how many times to run the pair, alternating which server goes first (default: 2)
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
callseal="${CALLSEAL_BIN:-$repo_root/target/release/callseal}"
rounds="${ROUNDS:-2}"
if [ "$#" -eq 0 ]; then
    set -- --size 64MiB --concurrency 8 --requests 16
fi

if ! command -v nginx >/dev/null 2>&1; then
    echo "nginx is not installed. On Debian or Ubuntu: apt-get update && apt-get install -y nginx" >&2
    exit 1
fi
if [ ! -x "$callseal" ]; then
    echo "no callseal binary at $callseal: run \`cargo build --release\` or set CALLSEAL_BIN" >&2
    exit 1
fi
if ! command -v python3 >/dev/null 2>&1; then
    echo "python3 is needed to pick free ports and to read the JSON results" >&2
    exit 1
fi

work="$(mktemp -d "${BENCH_DIR:-/dev/shm}/callseal-nginx.XXXXXX")"
nginx_pid_file="$work/nginx.pid"

stop_nginx() {
    local pid
    [ -f "$nginx_pid_file" ] || return 0
    pid="$(cat "$nginx_pid_file")"
    kill -QUIT "$pid" 2>/dev/null || true
    # The master removes its pid file once every worker has exited.
    for _ in $(seq 100); do
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
}

cleanup() {
    local status=$?
    stop_nginx
    rm -rf "$work"
    exit "$status"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

free_port() {
    python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

"$callseal" certs dev --dir "$work/certs" >/dev/null
mkdir -p "$work/logs" "$work/temp" "$work/sink/bodies" "$work/sink/objects"
# nginx ignores the token; `callseal bench --url` needs one to send.
head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$work/token"
# Run as root, nginx's workers switch to `nobody`, which must write the sink's directories.
if [ "$(id -u)" -eq 0 ]; then
    chmod 755 "$work"
    chown -R nobody "$work/sink" "$work/temp"
fi

front_port="$(free_port)"
sink_port="$(free_port)"
cat >"$work/nginx.conf" <<EOF
worker_processes auto;
pid $nginx_pid_file;
error_log $work/logs/error.log warn;
events {
    worker_connections 4096;
}
http {
    access_log off;
    sendfile on;
    tcp_nopush on;
    # Bodies move in 256 KiB buffers, the size callseal hands to storage and reads from it,
    # rather than nginx's default of one or two pages.
    client_body_buffer_size 256k;
    proxy_buffer_size 256k;
    proxy_buffers 4 256k;
    proxy_busy_buffers_size 256k;
    http2_chunk_size 16k;
    client_body_temp_path $work/sink/bodies;
    proxy_temp_path $work/temp/proxy;
    fastcgi_temp_path $work/temp/fastcgi;
    uwsgi_temp_path $work/temp/uwsgi;
    scgi_temp_path $work/temp/scgi;

    upstream sink {
        server 127.0.0.1:$sink_port;
        keepalive 256;
    }

    # The TLS-terminating reverse proxy: streams request and response bodies through.
    server {
        listen 127.0.0.1:$front_port ssl http2;
        ssl_certificate $work/certs/server.pem;
        ssl_certificate_key $work/certs/server-key.pem;
        ssl_protocols TLSv1.2 TLSv1.3;
        http2_max_concurrent_streams 64;
        client_max_body_size 0;
        location / {
            proxy_pass http://sink;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_request_buffering off;
            proxy_buffering off;
        }
    }

    # The sink: reads each PUT body whole into a file before it responds 201, serves GET.
    server {
        listen 127.0.0.1:$sink_port;
        client_max_body_size 0;
        location / {
            root $work/sink/objects;
            dav_methods PUT;
            create_full_put_path on;
        }
    }
}
EOF
nginx -p "$work" -c "$work/nginx.conf" -e "$work/logs/error.log"
for _ in $(seq 50); do
    [ -s "$nginx_pid_file" ] && break
    sleep 0.1
done
master="$(cat "$nginx_pid_file")"
# The master and its workers: their CPU time and peak memory are reported together.
pid_options=(--pid "$master")
for worker in $(pgrep -P "$master"); do
    pid_options+=(--pid "$worker")
done

run_nginx() {
    "$callseal" bench --url "https://localhost:$front_port" --token-file "$work/token" \
        --ca "$work/certs/ca.pem" "${pid_options[@]}" --json "$@"
    # The sink keeps what was uploaded; drop it before the next run.
    find "$work/sink/objects" -mindepth 1 -delete
}

run_callseal() {
    "$callseal" bench --work-dir "$work" --json "$@"
}

summarize() {
    python3 - "$1" "$2" "$3" <<'PYTHON'
import json
import sys

round_label, nginx_path, callseal_path = sys.argv[1:]
nginx = json.load(open(nginx_path))
callseal = json.load(open(callseal_path))
print(f"round {round_label}: {callseal['requests']} requests of {callseal['size_bytes']} bytes, "
      f"{callseal['concurrency']} in flight, {callseal['http_version']} (nginx: {nginx['http_version']})")
print(f"  {'':<9} {'callseal MB/s':>14} {'nginx MB/s':>11} {'ratio':>6}   "
      f"{'CPU s/GB':>17}   {'peak RSS MiB':>17}")
for phase in ("upload", "download"):
    ours, theirs = callseal.get(phase), nginx.get(phase)
    if not ours or not theirs:
        continue
    ratio = ours["mb_per_s"] / theirs["mb_per_s"]
    cpu = f"{ours['server']['cpu_seconds_per_gb']:.2f} vs {theirs['server']['cpu_seconds_per_gb']:.2f}"
    rss = f"{ours['server']['peak_rss_mib']:.1f} vs {theirs['server']['peak_rss_mib']:.1f}"
    print(f"  {phase:<9} {ours['mb_per_s']:>14.1f} {theirs['mb_per_s']:>11.1f} {ratio:>6.2f}   "
          f"{cpu:>17}   {rss:>17}")
PYTHON
}

echo "nginx $(nginx -v 2>&1 | sed 's/.*nginx\///') on 127.0.0.1:$front_port (workers: ${pid_options[*]}), work directory $work"
echo "client options: $*"
for round in $(seq "$rounds"); do
    if [ $((round % 2)) -eq 1 ]; then
        run_nginx "$@" >"$work/nginx-$round.json"
        run_callseal "$@" >"$work/callseal-$round.json"
    else
        run_callseal "$@" >"$work/callseal-$round.json"
        run_nginx "$@" >"$work/nginx-$round.json"
    fi
    summarize "$round" "$work/nginx-$round.json" "$work/callseal-$round.json"
done
