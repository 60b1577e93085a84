//! The test server: its URL (a server started by `scripts/test.sh`), and servers of a
//! test's own for the tests that stop one.

#![allow(dead_code, clippy::expect_used, clippy::panic)] // Test code; not every test uses all.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use dualbus_redis::RedisConfig;

/// The shared server of the test run (`DUALBUS_TEST_REDIS_URL`, set by
/// `scripts/test.sh`). Without it the test is skipped, unless
/// `DUALBUS_TEST_REQUIRE_SERVERS` is set: then it fails.
pub(crate) fn shared_url() -> Option<String> {
    match std::env::var("DUALBUS_TEST_REDIS_URL") {
        Ok(u) => Some(u),
        Err(_) if std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_some() => {
            panic!("DUALBUS_TEST_REDIS_URL is not set but DUALBUS_TEST_REQUIRE_SERVERS is")
        }
        Err(_) => {
            eprintln!("skipped: DUALBUS_TEST_REDIS_URL is not set");
            None
        }
    }
}

/// Settings with short timeouts and quick reconnects.
pub(crate) fn fast_config(url: &str) -> RedisConfig {
    let mut c = RedisConfig::new(url);
    c.connect_timeout = Duration::from_secs(2);
    c.response_timeout = Duration::from_secs(5);
    c.reconnect.min_delay = Duration::from_millis(50);
    c.reconnect.max_delay = Duration::from_millis(500);
    c.reconnect.retries = 40;
    c
}

/// A port nobody listens on (bound, then released).
pub(crate) fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// A `redis-server` of one test, on its own port and directory; killed when dropped.
pub(crate) struct Server {
    pub(crate) port: u16,
    dir: std::path::PathBuf,
    child: Option<Child>,
    args: Vec<String>,
}

impl Server {
    /// Starts one (`redis-server` from `PATH`, as `scripts/test.sh` installs it) with extra
    /// arguments (`--appendonly yes`, ...).
    pub(crate) fn start(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("dualbus-redis-{}-{port}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("server dir");
        let mut s = Self {
            port,
            dir,
            child: None,
            args: extra.iter().map(|a| (*a).to_owned()).collect(),
        };
        s.run();
        s
    }

    /// `redis://127.0.0.1:<port>`.
    pub(crate) fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Starts the process again on the same port and directory, and waits until it
    /// answers.
    pub(crate) fn run(&mut self) {
        let child = Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
            ])
            .arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server (install it: apt-get install redis-server)");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = std::net::TcpStream::connect(("127.0.0.1", self.port)) {
                use std::io::{Read as _, Write as _};
                let mut buf = [0u8; 64];
                if s.write_all(b"PING\r\n").is_ok()
                    // `+PONG`, or `-NOAUTH` from a server with a password: it answers.
                    && s.read(&mut buf).is_ok_and(|n| n > 0)
                {
                    return;
                }
            }
            assert!(Instant::now() < deadline, "redis-server did not start");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGKILL, waited for.
    pub(crate) fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
