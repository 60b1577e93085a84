//! A broker of a test's (or benchmark's) own.

#![allow(dead_code, clippy::expect_used)] // Test code.

use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use dualbus_core::conformance::process::now_nanos;

/// A broker of the test's own, started by `scripts/kafka-broker.sh` (Java and the cached
/// jars), killed and restarted on the same ports and data.
pub(crate) struct Broker {
    dir: PathBuf,
    port: u16,
    cport: u16,
    pid: Option<u32>,
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

impl Broker {
    fn script() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../scripts/kafka-broker.sh")
    }

    pub(crate) fn start() -> Self {
        let dir = std::env::temp_dir().join(format!("dualbus-kafka-{}", now_nanos()));
        let mut b = Self {
            dir,
            port: free_port(),
            cport: free_port(),
            pid: None,
        };
        b.run();
        b
    }

    pub(crate) fn run(&mut self) {
        let out = Command::new(Self::script())
            .args([
                self.dir.to_str().expect("utf-8 path"),
                &self.port.to_string(),
                &self.cport.to_string(),
            ])
            .stderr(Stdio::inherit())
            .output()
            .expect("run scripts/kafka-broker.sh");
        assert!(out.status.success(), "the broker did not start");
        let pid = String::from_utf8_lossy(&out.stdout)
            .trim()
            .parse()
            .expect("pid");
        self.pid = Some(pid);
    }

    pub(crate) fn kill(&mut self) {
        if let Some(pid) = self.pid.take() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
            // Until the process is gone (its ports free).
            while Command::new("kill")
                .args(["-0", &pid.to_string()])
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
            {
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) to the broker process.
    pub(crate) fn signal(&self, signal: &str) {
        if let Some(pid) = self.pid {
            let ok = Command::new("kill")
                .args([&format!("-{signal}"), &pid.to_string()])
                .status()
                .is_ok_and(|s| s.success());
            assert!(ok, "kill -{signal} {pid}");
        }
    }

    pub(crate) fn bootstrap(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
