//! A nats-server for the benchmarks: started on a loopback port with JetStream on file
//! storage in a temporary directory, stopped when dropped.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// The server process and its storage directory.
pub(crate) struct Server(Child, std::path::PathBuf);

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
        let _ = std::fs::remove_dir_all(&self.1);
    }
}

/// `DUALBUS_BENCH_NATS_URL` if set (no server of our own), else a server of our own: the
/// binary from `DUALBUS_NATS_SERVER`, else the one `scripts/nats-server.sh` builds.
fn start_server() -> Option<(String, Option<Server>)> {
    if let Ok(url) = std::env::var("DUALBUS_BENCH_NATS_URL") {
        return Some((url, None));
    }
    let bin = std::env::var("DUALBUS_NATS_SERVER").ok().or_else(|| {
        let out = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/nats-server.sh"
        ))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    })?;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .ok()?
        .local_addr()
        .ok()?
        .port();
    let dir = std::env::temp_dir().join(format!("dualbus-bench-nats-{port}"));
    let child = Command::new(&bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .ok()?;
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Some((format!("nats://127.0.0.1:{port}"), Some(Server(child, dir))))
}

/// The server's URL, the server if it is our own, and a multi-threaded runtime; `None`
/// (with a message) when no nats-server is available.
pub(crate) fn setup() -> Option<(String, Option<Server>, tokio::runtime::Runtime)> {
    let Some((url, server)) = start_server() else {
        println!(
            "no nats-server available (set DUALBUS_NATS_SERVER or DUALBUS_BENCH_NATS_URL): skipped"
        );
        return None;
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    Some((url, server, rt))
}
