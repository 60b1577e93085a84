#!/usr/bin/env bash
# Installs Apache Kafka (pinned) once from Maven Central and prints the folder of its jars.
# The broker runs as `java -cp "<folder>/*" kafka.Kafka server.properties` (KRaft, no
# ZooKeeper); scripts/kafka-broker.sh formats and starts one. Cached under
# ~/.cache/dualbus, so a second run costs nothing. Needs Java 17 and Maven.
set -euo pipefail
KAFKA_VERSION="${KAFKA_VERSION:-4.4.0}"
LOG4J_VERSION="2.25.5"
dir="${XDG_CACHE_HOME:-$HOME/.cache}/dualbus/kafka-$KAFKA_VERSION"
if [ ! -f "$dir/lib/.complete" ]; then
  command -v mvn >/dev/null || { echo "kafka: Maven (mvn) is needed to fetch the jars" >&2; exit 1; }
  command -v java >/dev/null || { echo "kafka: Java 17 or later is needed" >&2; exit 1; }
  echo "fetching Apache Kafka $KAFKA_VERSION from Maven Central (once)..." >&2
  rm -rf "$dir"
  mkdir -p "$dir"
  # The broker and a logging binding (without one the broker logs nothing).
  cat > "$dir/pom.xml" <<EOF
<project xmlns="http://maven.apache.org/POM/4.0.0">
  <modelVersion>4.0.0</modelVersion>
  <groupId>dualbus.test</groupId>
  <artifactId>kafka-broker</artifactId>
  <version>1</version>
  <packaging>pom</packaging>
  <dependencies>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka_2.13</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.kafka</groupId>
      <artifactId>kafka-tools</artifactId>
      <version>$KAFKA_VERSION</version>
    </dependency>
    <dependency>
      <groupId>org.apache.logging.log4j</groupId>
      <artifactId>log4j-slf4j-impl</artifactId>
      <version>$LOG4J_VERSION</version>
    </dependency>
  </dependencies>
</project>
EOF
  (cd "$dir" && mvn -q -B -Dstyle.color=never dependency:copy-dependencies -DoutputDirectory=lib -DincludeScope=runtime >&2)
  touch "$dir/lib/.complete"
fi
echo "$dir/lib"
