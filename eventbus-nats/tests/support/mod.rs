//! Test servers: nats-server processes on loopback ports, started and killed by the tests.

#![allow(dead_code, clippy::expect_used, clippy::panic)] // Test code; not every test uses all.

use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dualbus_nats::{JetStreamConfig, NatsConfig};

/// The nats-server binary (`DUALBUS_NATS_SERVER`, set by `scripts/test.sh`). Without it the
/// test is skipped, unless `DUALBUS_TEST_REQUIRE_SERVERS` is set: then it fails.
pub(crate) fn server_binary() -> Option<PathBuf> {
    match std::env::var_os("DUALBUS_NATS_SERVER") {
        Some(p) => Some(PathBuf::from(p)),
        None if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => panic!(
            "DUALBUS_NATS_SERVER is not set but DUALBUS_TEST_REQUIRE_SERVERS is (scripts/test.sh sets it)"
        ),
        None => {
            eprintln!("skipped: DUALBUS_NATS_SERVER is not set");
            None
        }
    }
}

/// The shared server of the test run (`DUALBUS_TEST_NATS_URL`), skipping as above.
pub(crate) fn shared_url() -> Option<String> {
    match std::env::var("DUALBUS_TEST_NATS_URL") {
        Ok(u) => Some(u),
        Err(_) if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => {
            panic!("DUALBUS_TEST_NATS_URL is not set but DUALBUS_TEST_REQUIRE_SERVERS is")
        }
        Err(_) => {
            eprintln!("skipped: DUALBUS_TEST_NATS_URL is not set");
            None
        }
    }
}

/// Broker timeouts of a few seconds.
pub(crate) fn fast_config(url: String) -> NatsConfig {
    let mut js = JetStreamConfig::default();
    js.consumer.ack_wait = Duration::from_secs(2);
    js.consumer.lease_ttl = Duration::from_secs(5);
    js.request_timeout = Duration::from_secs(2);
    NatsConfig::new([url]).with_jetstream(js)
}

/// A nats-server process of its own, with JetStream on file storage in a fresh directory.
pub(crate) struct Server {
    bin: PathBuf,
    dir: PathBuf,
    port: u16,
    args: Vec<String>,
    child: Option<Child>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Server {
    /// Starts a server.
    pub(crate) fn start(bin: PathBuf) -> Self {
        Self::start_with(bin, Vec::new())
    }

    /// Starts a server with extra command-line arguments.
    pub(crate) fn start_with(bin: PathBuf, args: Vec<String>) -> Self {
        let dir =
            std::env::temp_dir().join(format!("dualbus-nats-{}", uuid::Uuid::now_v7().simple()));
        let mut s = Self {
            bin,
            dir,
            port: free_port(),
            args,
            child: None,
        };
        s.spawn();
        s
    }

    /// The storage and scratch directory of this server.
    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    /// The client URL.
    pub(crate) fn url(&self) -> String {
        format!("nats://127.0.0.1:{}", self.port)
    }

    fn spawn(&mut self) {
        let child = Command::new(&self.bin)
            .arg("-js")
            .arg("-sd")
            .arg(&self.dir)
            .args(["-a", "127.0.0.1", "-p", &self.port.to_string()])
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start nats-server");
        self.child = Some(child);
        let start = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(
                start.elapsed() < Duration::from_secs(20),
                "nats-server did not start"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Kills the server (SIGKILL: no clean shutdown).
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts the killed server again on the same port and storage.
    pub(crate) fn restart(&mut self) {
        self.kill();
        self.spawn();
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Three nats-server processes clustered on loopback ports, each with its own store, named
/// `s0`, `s1` and `s2`.
pub(crate) struct Cluster {
    pub(crate) servers: Vec<Server>,
}

impl Cluster {
    pub(crate) fn start(bin: &std::path::Path) -> Self {
        let routes: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let servers = (0..3)
            .map(|i| {
                let others: Vec<String> = routes
                    .iter()
                    .enumerate()
                    .filter(|(j, _)| *j != i)
                    .map(|(_, p)| format!("nats://127.0.0.1:{p}"))
                    .collect();
                Server::start_with(
                    bin.to_path_buf(),
                    vec![
                        "-n".to_owned(),
                        format!("s{i}"),
                        "--cluster_name".to_owned(),
                        "dualbus".to_owned(),
                        "--cluster".to_owned(),
                        format!("nats://127.0.0.1:{}", routes[i]),
                        "--routes".to_owned(),
                        others.join(","),
                    ],
                )
            })
            .collect();
        Self { servers }
    }

    /// Every server's client URL.
    pub(crate) fn urls(&self) -> Vec<String> {
        self.servers.iter().map(Server::url).collect()
    }

    /// The server named `name` (`s0`, `s1`, `s2`).
    pub(crate) fn named(&mut self, name: &str) -> &mut Server {
        let i: usize = name
            .strip_prefix('s')
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("not a server of the cluster: {name}"));
        &mut self.servers[i]
    }
}
