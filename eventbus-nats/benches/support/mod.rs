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

/// The nats-server binary: `DUALBUS_NATS_SERVER`, else the one `scripts/nats-server.sh`
/// builds.
pub(crate) fn server_bin() -> Option<String> {
    std::env::var("DUALBUS_NATS_SERVER").ok().or_else(|| {
        let out = Command::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../scripts/nats-server.sh"
        ))
        .stderr(Stdio::inherit())
        .output()
        .ok()?;
        Some(String::from_utf8(out.stdout).ok()?.trim().to_owned())
    })
}

fn free_port() -> Option<u16> {
    Some(
        std::net::TcpListener::bind("127.0.0.1:0")
            .ok()?
            .local_addr()
            .ok()?
            .port(),
    )
}

/// A server of `bin` on `port` with JetStream in a fresh directory and `args`, once it
/// accepts connections.
fn spawn(bin: &str, port: u16, args: &[String]) -> Option<Server> {
    let dir = std::env::temp_dir().join(format!("dualbus-bench-nats-{port}"));
    let child = Command::new(bin)
        .args(["-a", "127.0.0.1", "-p", &port.to_string(), "-js", "-sd"])
        .arg(&dir)
        .args(args)
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
    Some(Server(child, dir))
}

/// `DUALBUS_BENCH_NATS_URL` if set (no server of our own), else a server of our own.
fn start_server() -> Option<(String, Option<Server>)> {
    if let Ok(url) = std::env::var("DUALBUS_BENCH_NATS_URL") {
        return Some((url, None));
    }
    let bin = server_bin()?;
    let port = free_port()?;
    let server = spawn(&bin, port, &[])?;
    Some((format!("nats://127.0.0.1:{port}"), Some(server)))
}

/// Three servers clustered on loopback ports (`s0`..`s2`): their client URLs and the
/// processes.
#[allow(dead_code)] // Not every benchmark uses it.
pub(crate) fn start_cluster() -> Option<(Vec<String>, Vec<Server>)> {
    let bin = server_bin()?;
    let ports: Vec<u16> = (0..3).map(|_| free_port()).collect::<Option<_>>()?;
    let routes: Vec<u16> = (0..3).map(|_| free_port()).collect::<Option<_>>()?;
    let mut servers = Vec::new();
    for i in 0..3 {
        let others: Vec<String> = (0..3)
            .filter(|j| *j != i)
            .map(|j| format!("nats://127.0.0.1:{}", routes[j]))
            .collect();
        let args = [
            "-n".to_owned(),
            format!("s{i}"),
            "--cluster_name".to_owned(),
            "bench".to_owned(),
            "--cluster".to_owned(),
            format!("nats://127.0.0.1:{}", routes[i]),
            "--routes".to_owned(),
            others.join(","),
        ];
        servers.push(spawn(&bin, ports[i], &args)?);
    }
    let urls = ports
        .iter()
        .map(|p| format!("nats://127.0.0.1:{p}"))
        .collect();
    Some((urls, servers))
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
