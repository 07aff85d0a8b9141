#!/usr/bin/env bash
# Local Redis + Kafka (KRaft, single node) on loopback for streamrec dev/CI.
# Usage: services.sh start|stop|status|logs|restart-kafka|restart-redis
# See deploy/local/README.md for env vars and folders.
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
STATE_DIR=${STREAMREC_SERVICES_DIR:-$HOME/.cache/streamrec/services}
CACHE_DIR=${STREAMREC_CACHE_DIR:-$HOME/.cache/streamrec}
SERVICES=${STREAMREC_SERVICES:-redis kafka}
REDIS_PORT=${STREAMREC_REDIS_PORT:-16379}
KAFKA_PORT=${STREAMREC_KAFKA_PORT:-19092}
KAFKA_CONTROLLER_PORT=${STREAMREC_KAFKA_CONTROLLER_PORT:-19093}
KAFKA_VERSION=${STREAMREC_KAFKA_VERSION:-4.1.2}
read -r -a KAFKA_HEAP <<<"${STREAMREC_KAFKA_HEAP:--Xmx512m}"
START_TIMEOUT=${STREAMREC_START_TIMEOUT:-120}
STOP_TIMEOUT=${STREAMREC_STOP_TIMEOUT:-30}

LOG_DIR=$STATE_DIR/logs
RUN_DIR=$STATE_DIR/run
REDIS_DIR=$STATE_DIR/redis
KAFKA_DIR=$STATE_DIR/kafka
KAFKA_DATA=$KAFKA_DIR/data
KAFKA_LIBS=$CACHE_DIR/kafka-$KAFKA_VERSION/libs

say() { printf '%s\n' "$*"; }
now() { date +%s.%N; }
since() { awk -v a="$1" -v b="$(now)" 'BEGIN { printf "%.1f", b - a }'; }

# ---------------------------------------------------------------- helpers
port_of() { if [[ $1 == redis ]]; then echo "$REDIS_PORT"; else echo "$KAFKA_PORT"; fi; }
cmd_marker() { if [[ $1 == redis ]]; then echo redis-server; else echo kafka.Kafka; fi; }
pidfile() { echo "$RUN_DIR/$1.pid"; }

# kill -0 succeeds on zombies (an orphan waits for init to reap it): count those as dead.
alive() {
  local st
  kill -0 "$1" 2>/dev/null || return 1
  st=$(cat "/proc/$1/stat" 2>/dev/null || true); st=${st##*) }
  [[ -n $st && ${st%% *} != Z ]]
}

port_open() { timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null; }

# Prints the recorded PID if that process is alive and is really our service
# (guards against PID reuse); otherwise removes a stale PID file and prints nothing.
live_pid() {
  local f pid cmd
  f=$(pidfile "$1")
  [[ -f $f ]] || return 0
  pid=$(cat "$f" 2>/dev/null || true)
  if [[ $pid =~ ^[0-9]+$ ]] && alive "$pid"; then
    # The command line reads empty while the process is inside exec (just spawned):
    # wait for it rather than take our own service for a stranger and forget it
    # (seen in CI as "redis-server exited during start").
    for _ in $(seq 40); do
      cmd=$(tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null || true)
      [[ -z ${cmd// /} ]] && alive "$pid" || break  # empty, or NULs only
      sleep 0.05
    done
    if [[ $cmd == *"$(cmd_marker "$1")"* ]]; then echo "$pid"; return 0; fi
  fi
  rm -f "$f"
}

# Start "$@" detached (own session) with stdout/stderr appended to $2; PID -> pidfile $1.
# fd 9 (the lock) is closed so the daemon does not hold it.
spawn() {
  local name=$1 out=$2 f; shift 2
  f=$(pidfile "$name"); rm -f "$f"
  # shellcheck disable=SC2016 # $$ and $@ belong to the inner shell
  setsid bash -c 'echo $$ >"$0"; exec "$@"' "$f" "$@" >>"$out" 2>&1 </dev/null 9>&- &
  for _ in $(seq 50); do [[ -s $f ]] && return 0; sleep 0.1; done
  echo "$name: process did not record its PID" >&2; return 1
}

stop_service() {
  local name=$1 pid
  pid=$(live_pid "$name")
  if [[ -z $pid ]]; then say "$name: not running"; return 0; fi
  say "$name: stopping pid $pid..."
  kill -TERM "$pid" 2>/dev/null || true
  local deadline=$((SECONDS + STOP_TIMEOUT))
  while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  if alive "$pid"; then
    say "$name: still alive after ${STOP_TIMEOUT}s, sending SIGKILL"
    kill -KILL "$pid" 2>/dev/null || true
    deadline=$((SECONDS + 10))
    while alive "$pid" && ((SECONDS < deadline)); do sleep 0.1; done
  fi
  rm -f "$(pidfile "$name")"
  say "$name: stopped"
}

# Loud failure: show log tails (default: the service's logs), kill a half-started
# process, exit non-zero.
fail_start() {
  local name=$1 msg=$2 f; shift 2
  (($#)) || set -- "$LOG_DIR/$name.log" "$LOG_DIR/$name.out"
  {
    echo "ERROR: $name: $msg"
    for f in "$@"; do
      [[ -s $f ]] || continue
      echo "----- last 60 lines of $f -----"; tail -n 60 "$f"
    done
  } >&2
  local pid; pid=$(live_pid "$name")
  if [[ -n $pid ]]; then kill -KILL "$pid" 2>/dev/null || true; rm -f "$(pidfile "$name")"; fi
  exit 1
}

# Common start prologue; returns 1 (caller: nothing to do) if already running.
needs_start() {
  local name=$1 port pid
  port=$(port_of "$name"); pid=$(live_pid "$name")
  if [[ -n $pid ]]; then
    # Alive but not answering: maybe another `start` is still bringing it up; wait for it.
    local deadline=$((SECONDS + START_TIMEOUT))
    until port_open "$port"; do
      ((SECONDS < deadline)) || fail_start "$name" "pid $pid alive but port $port not answering"
      [[ -n $(live_pid "$name") ]] || return 0 # it died: start a fresh one
      sleep 0.5
    done
    say "$name: already running (pid $pid, port $port)"; return 1
  elif port_open "$port"; then
    fail_start "$name" "port $port is in use by a process we did not start (stop it or pick another port)" /dev/null
  fi
  return 0
}

# ---------------------------------------------------------------- prometheus
# Installed, not started: tests/test_dashboards.py runs its own against a streamrec
# process, to check that the Grafana dashboard's queries return data.
ensure_prometheus() {
  command -v prometheus >/dev/null && return 0
  say "prometheus: installing (apt)..."
  local sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
  { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq prometheus; } \
    || { say "prometheus: apt-get install failed" >&2; return 1; }
  # Debian's package may start its own daemon on :9090; the test needs none of it.
  $sudo pkill -x prometheus 2>/dev/null || true
}

# ---------------------------------------------------------------- redis
redis_ping() {
  timeout 3 bash -c "exec 3<>/dev/tcp/127.0.0.1/$REDIS_PORT; printf 'PING\r\n' >&3;
    IFS= read -r line <&3; [[ \$line == +PONG* ]]" 2>/dev/null
}

start_redis() {
  needs_start redis || return 0
  if ! command -v redis-server >/dev/null; then
    say "redis: installing redis-server (apt)..."
    local sudo=""; [[ $(id -u) == 0 ]] || sudo=sudo
    { $sudo apt-get update -qq && $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server; } \
      || fail_start redis "apt-get install redis-server failed"
  fi
  mkdir -p "$REDIS_DIR"
  cat >"$REDIS_DIR/redis.conf" <<EOF
# generated by deploy/local/services.sh
port $REDIS_PORT
bind 127.0.0.1
protected-mode yes
daemonize no
save ""
appendonly no
# Store rows live in small per-bucket hashes; keep them in the compact listpack
# encoding even though one packed row is larger than Redis' 64-byte default.
hash-max-listpack-entries 512
hash-max-listpack-value 1024
dir $REDIS_DIR
logfile ""
loglevel notice
EOF
  local t0; t0=$(now)
  spawn redis "$LOG_DIR/redis.log" redis-server "$REDIS_DIR/redis.conf" || fail_start redis "spawn failed"
  local deadline=$((SECONDS + START_TIMEOUT))
  until redis_ping; do
    [[ -n $(live_pid redis) ]] || fail_start redis "redis-server exited during start"
    ((SECONDS < deadline)) || fail_start redis "not answering PING after ${START_TIMEOUT}s"
    sleep 0.1
  done
  say "redis: started on 127.0.0.1:$REDIS_PORT in $(since "$t0")s (pid $(live_pid redis))"
}

# ---------------------------------------------------------------- kafka
kafka_fetch_jars() {
  [[ -f $KAFKA_LIBS/.complete ]] && return 0
  command -v mvn >/dev/null || fail_start kafka "mvn not found (needed once to fetch the Kafka jars)"
  say "kafka: fetching jars for $KAFKA_VERSION (first run only)..."
  local tmp="$KAFKA_LIBS.tmp.$$"
  rm -rf "$tmp"; mkdir -p "$(dirname "$KAFKA_LIBS")"
  mvn -B -q -Dstyle.color=never -f "$SCRIPT_DIR/kafka/pom.xml" -Dkafka.version="$KAFKA_VERSION" \
      dependency:copy-dependencies -DincludeScope=runtime -DoutputDirectory="$tmp" \
      >"$LOG_DIR/kafka-fetch.log" 2>&1 || { rm -rf "$tmp"; fail_start kafka "mvn could not fetch kafka_2.13:$KAFKA_VERSION" "$LOG_DIR/kafka-fetch.log"; }
  [[ -f $tmp/kafka_2.13-$KAFKA_VERSION.jar ]] || { rm -rf "$tmp"; fail_start kafka "jar set incomplete"; }
  rm -rf "$KAFKA_LIBS"; mv "$tmp" "$KAFKA_LIBS"
  (cd "$KAFKA_LIBS" && ls -1 -- *.jar >.complete)
  say "kafka: $(wc -l <"$KAFKA_LIBS/.complete") jars cached in $KAFKA_LIBS"
}

KAFKA_JAVA=(java "${KAFKA_HEAP[@]}" -XX:+UseG1GC -Djava.awt.headless=true -Dkafka.logs.dir="$LOG_DIR"
  -Dlog4j2.configurationFile="file:$SCRIPT_DIR/kafka/log4j2.properties" -cp "$KAFKA_LIBS/*")

kafka_write_config() {
  mkdir -p "$KAFKA_DATA"
  cat >"$KAFKA_DIR/server.properties" <<EOF
# generated by deploy/local/services.sh
process.roles=broker,controller
node.id=1
controller.quorum.voters=1@127.0.0.1:$KAFKA_CONTROLLER_PORT
listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT,CONTROLLER://127.0.0.1:$KAFKA_CONTROLLER_PORT
advertised.listeners=PLAINTEXT://127.0.0.1:$KAFKA_PORT
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT
log.dirs=$KAFKA_DATA
num.partitions=1
default.replication.factor=1
min.insync.replicas=1
auto.create.topics.enable=true
delete.topic.enable=true
num.network.threads=2
num.io.threads=2
num.recovery.threads.per.data.dir=1
background.threads=2
group.initial.rebalance.delay.ms=0
offsets.topic.replication.factor=1
offsets.topic.num.partitions=4
transaction.state.log.replication.factor=1
transaction.state.log.min.isr=1
transaction.state.log.num.partitions=4
share.coordinator.state.topic.replication.factor=1
share.coordinator.state.topic.min.isr=1
share.coordinator.state.topic.num.partitions=1
log.retention.hours=24
EOF
}

start_kafka() {
  needs_start kafka || return 0
  command -v java >/dev/null || fail_start kafka "java (17+) not found"
  mkdir -p "$KAFKA_DIR"
  kafka_fetch_jars
  kafka_write_config
  if [[ ! -f $KAFKA_DATA/meta.properties ]]; then
    say "kafka: formatting storage in $KAFKA_DATA"
    local cid
    cid=$("${KAFKA_JAVA[@]}" kafka.tools.StorageTool random-uuid 2>>"$LOG_DIR/kafka.out" | tail -n 1) \
      || fail_start kafka "StorageTool random-uuid failed"
    [[ $cid =~ ^[A-Za-z0-9_-]{22}$ ]] || fail_start kafka "StorageTool random-uuid printed '$cid'"
    "${KAFKA_JAVA[@]}" kafka.tools.StorageTool format -t "$cid" -c "$KAFKA_DIR/server.properties" \
      >>"$LOG_DIR/kafka.out" 2>&1 || fail_start kafka "StorageTool format failed"
  fi
  # Only log lines written after this offset count as "started" for this run.
  local log="$LOG_DIR/kafka.log" offset=0 t0
  [[ -f $log ]] && offset=$(wc -c <"$log")
  t0=$(now)
  spawn kafka "$LOG_DIR/kafka.out" "${KAFKA_JAVA[@]}" kafka.Kafka "$KAFKA_DIR/server.properties" \
    || fail_start kafka "spawn failed"
  local deadline=$((SECONDS + START_TIMEOUT))
  while :; do
    if [[ -f $log ]]; then
      local size; size=$(wc -c <"$log")
      ((size >= offset)) || offset=0 # log rolled over
      grep -qF "Kafka Server started" <(tail -c "+$((offset + 1))" "$log") && break
    elif port_open "$KAFKA_PORT"; then
      break # no log file (logging misconfigured?): fall back to the TCP check
    fi
    [[ -n $(live_pid kafka) ]] || fail_start kafka "broker exited during start"
    ((SECONDS < deadline)) || fail_start kafka "not started after ${START_TIMEOUT}s"
    sleep 0.2
  done
  port_open "$KAFKA_PORT" || fail_start kafka "logged 'started' but port $KAFKA_PORT is closed"
  say "kafka: started on 127.0.0.1:$KAFKA_PORT in $(since "$t0")s (pid $(live_pid kafka), version $KAFKA_VERSION)"
}

# ---------------------------------------------------------------- commands
status() {
  local name pid rc=0
  for name in $SERVICES; do
    pid=$(live_pid "$name")
    if [[ -n $pid ]] && port_open "$(port_of "$name")"; then
      say "$name: running pid=$pid port=$(port_of "$name")"
    elif [[ -n $pid ]]; then
      say "$name: not answering pid=$pid port=$(port_of "$name")"; rc=1
    else
      say "$name: stopped port=$(port_of "$name")"; rc=1
    fi
  done
  return "$rc"
}

logs() {
  local f
  for f in "$LOG_DIR"/redis.log "$LOG_DIR"/kafka.log "$LOG_DIR"/kafka.out; do
    [[ -s $f ]] || continue
    echo "===== $f (last 50 lines) ====="; tail -n 50 "$f"
  done
}

check_service() { [[ $1 == redis || $1 == kafka ]] || { echo "unknown service '$1' in STREAMREC_SERVICES" >&2; exit 2; }; }

main() {
  local cmd=${1:-} name
  for name in $SERVICES; do check_service "$name"; done
  mkdir -p "$LOG_DIR" "$RUN_DIR"
  if [[ $cmd == start || $cmd == stop || $cmd == restart-* ]]; then
    # One start/stop at a time per state folder (parallel CI jobs, test sessions).
    exec 9>"$RUN_DIR/.lock"
    flock -w $((START_TIMEOUT + STOP_TIMEOUT + 60)) 9 || { echo "could not lock $RUN_DIR/.lock" >&2; exit 1; }
  fi
  case $cmd in
    start) for name in $SERVICES; do "start_$name"; done; ensure_prometheus ;;
    stop) for name in $SERVICES; do stop_service "$name"; done ;;
    status) status ;;
    logs) logs ;;
    restart-kafka) stop_service kafka; start_kafka ;;
    restart-redis) stop_service redis; start_redis ;;
    *) echo "usage: $0 start|stop|status|logs|restart-kafka|restart-redis" >&2; exit 2 ;;
  esac
}

main "$@"
