#!/bin/sh
# Start a single-node KRaft broker+controller from the jars in /opt/kafka/libs (PID 1: SIGTERM
# shuts it down cleanly). Formats the storage on first start.
#
# Defaults: PLAINTEXT on :9092 advertised as $(hostname):9092, CONTROLLER on localhost:9093, one
# partition per topic, replication factor 1 everywhere, topics auto-created. Any environment
# variable KAFKA_FOO_BAR=value sets foo.bar=value (as in the apache/kafka image: "__" is "_" and
# "___" is "-"), e.g. KAFKA_ADVERTISED_LISTENERS=PLAINTEXT://kafka:9092, KAFKA_NUM_PARTITIONS=3.
# Not properties: CLUSTER_ID (default: random), KAFKA_HEAP_OPTS (default -Xms256m -Xmx1g),
# KAFKA_JVM_OPTS (extra JVM options), KAFKA_DATA_DIR (default /var/lib/kafka/data).
set -eu

data=${KAFKA_DATA_DIR:-/var/lib/kafka/data}
props=/var/lib/kafka/server.properties
host=$(hostname)

{
    echo "# written by kafka-start.sh"
    echo "process.roles=broker,controller"
    echo "node.id=1"
    echo "controller.quorum.voters=1@localhost:9093"
    echo "listeners=PLAINTEXT://:9092,CONTROLLER://localhost:9093"
    echo "advertised.listeners=PLAINTEXT://${host}:9092"
    echo "listener.security.protocol.map=CONTROLLER:PLAINTEXT,PLAINTEXT:PLAINTEXT"
    echo "inter.broker.listener.name=PLAINTEXT"
    echo "controller.listener.names=CONTROLLER"
    echo "log.dirs=${data}"
    echo "num.partitions=1"
    echo "default.replication.factor=1"
    echo "min.insync.replicas=1"
    echo "offsets.topic.replication.factor=1"
    echo "offsets.topic.num.partitions=4"
    echo "transaction.state.log.replication.factor=1"
    echo "transaction.state.log.min.isr=1"
    echo "transaction.state.log.num.partitions=4"
    echo "share.coordinator.state.topic.replication.factor=1"
    echo "share.coordinator.state.topic.min.isr=1"
    echo "group.initial.rebalance.delay.ms=0"
    echo "auto.create.topics.enable=true"
    echo "delete.topic.enable=true"
    echo "num.network.threads=2"
    echo "num.io.threads=4"
    echo "log.cleaner.dedupe.buffer.size=16777216"
    # overrides from KAFKA_* (later lines win in a properties file)
    env | grep '^KAFKA_' | grep -v -e '^KAFKA_HEAP_OPTS=' -e '^KAFKA_JVM_OPTS=' -e '^KAFKA_DATA_DIR=' \
        | while IFS='=' read -r name value; do
            key=$(printf '%s' "${name#KAFKA_}" | sed -e 's/___/-/g' -e 's/__/@/g' -e 's/_/./g' \
                -e 's/@/_/g' | tr 'A-Z' 'a-z')
            printf '%s=%s\n' "$key" "$value"
        done
} > "$props"

java_opts="${KAFKA_HEAP_OPTS:--Xms256m -Xmx1g} -XX:+UseG1GC -XX:MaxGCPauseMillis=20 \
 -XX:+ExitOnOutOfMemoryError -Djava.awt.headless=true \
 -Dlog4j2.configurationFile=/opt/kafka/config/log4j2.properties ${KAFKA_JVM_OPTS:-}"

if [ ! -f "$data/meta.properties" ]; then
    cluster_id=${CLUSTER_ID:-}
    while [ -z "$cluster_id" ] || [ "${cluster_id#-}" != "$cluster_id" ]; do
        cluster_id=$(head -c 16 /dev/urandom | base64 | tr '+/' '-_' | tr -d '=')
    done
    # shellcheck disable=SC2086
    java -XX:TieredStopAtLevel=1 $java_opts -cp '/opt/kafka/libs/*' kafka.tools.StorageTool \
        format -t "$cluster_id" -c "$props" --ignore-formatted
fi
echo "kafka-start: starting the broker ($(grep '^advertised.listeners=' "$props" | tail -n 1))"
# shellcheck disable=SC2086
exec java $java_opts -cp '/opt/kafka/libs/*' kafka.Kafka "$props"
