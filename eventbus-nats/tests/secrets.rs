//! Credentials in server URLs (`nats://user:password@host`) stay secret: they authenticate
//! (passed as connect options, not left in the URL, which async-nats ignores for
//! authentication and prints in its debug logs), and no `Debug`/`Display` output, error or
//! log line shows them.
//!
//! Every test of this binary runs under one global tracing subscriber at TRACE level that
//! writes into a buffer; the end-to-end test checks that buffer.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::io::Write;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use dualbus_core::conformance::{event, unique_topic};
use dualbus_core::{DomainBus, Error, ErrorKind, SimpleBus};
use dualbus_nats::{Credentials, JetStream, JetStreamConfig, Nats, NatsConfig, Secret};
use support::{Server, server_binary};

/// The password of the tests: distinctive, so that finding it anywhere is a leak.
const PASSWORD: &str = "pw-Zq9xK7-secret";
/// A token given as user information (`nats://TOKEN@host`).
const TOKEN: &str = "tok-Wv3mR8-secret";

/// The log lines of this test binary, all levels.
fn logs() -> &'static Arc<Mutex<Vec<u8>>> {
    static LOGS: OnceLock<Arc<Mutex<Vec<u8>>>> = OnceLock::new();
    LOGS.get_or_init(|| {
        let buffer: Arc<Mutex<Vec<u8>>> = Arc::default();
        let writer = buffer.clone();
        tracing_subscriber::fmt()
            .with_max_level(tracing_subscriber::filter::LevelFilter::TRACE)
            .with_ansi(false)
            .with_writer(move || Buffer(writer.clone()))
            .try_init()
            .expect("the only tracing subscriber of this binary");
        buffer
    })
}

struct Buffer(Arc<Mutex<Vec<u8>>>);

impl Write for Buffer {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.lock().expect("log buffer").extend_from_slice(buf);
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn logged() -> String {
    String::from_utf8_lossy(&logs().lock().expect("log buffer")).into_owned()
}

#[track_caller]
fn assert_secret_free(what: &str, text: &str) {
    for secret in [PASSWORD, TOKEN] {
        assert!(!text.contains(secret), "{what} shows a secret: {text}");
    }
}

/// Both renderings of an error, checked.
#[track_caller]
fn assert_error_secret_free(what: &str, e: &Error) {
    assert_secret_free(what, &format!("{e}"));
    assert_secret_free(what, &format!("{e:?}"));
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        assert_secret_free(what, &format!("{s} / {s:?}"));
        source = s.source();
    }
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    l.local_addr().expect("addr").port()
}

/// Configuration types and every error of the connect path, with a password (and a token)
/// in the URL: no output shows it. Needs no server.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_never_show() {
    logs();
    let port = free_port(); // nobody listens
    let with_password = format!("nats://u:{PASSWORD}@127.0.0.1:{port}");
    let with_token = format!("nats://{TOKEN}@127.0.0.1:{port}");

    // Configuration types: NatsConfig (with its JetStreamConfig) in Debug.
    let config = NatsConfig::new([with_password.clone(), with_token.clone()])
        .with_jetstream(JetStreamConfig::default())
        .with_connect_timeout(Duration::from_secs(1));
    let text = format!("{config:?}");
    assert_secret_free("Debug of NatsConfig", &text);
    assert!(text.contains("nats://u:***@127.0.0.1"), "{text}");
    assert!(text.contains("nats://***@127.0.0.1"), "{text}");
    assert_secret_free("{:#?}", &format!("{config:#?}"));
    assert_eq!(
        dualbus_nats::redact_url(&with_password),
        format!("nats://u:***@127.0.0.1:{port}")
    );
    assert_eq!(
        dualbus_nats::redact_urls(&format!("found string \"{with_token}\", expected")),
        format!("found string \"nats://***@127.0.0.1:{port}\", expected")
    );

    let mut errors: Vec<(&str, Error)> = Vec::new();
    // Unreachable server, password or token in the URL.
    for url in [&with_password, &with_token] {
        let c = NatsConfig::new([url.clone()]).with_connect_timeout(Duration::from_secs(1));
        let e = Nats::connect(c.clone()).await.expect_err("nobody listens");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        errors.push(("unreachable (core)", e));
        let e = JetStream::connect(c).await.expect_err("nobody listens");
        assert_eq!(e.kind(), ErrorKind::Unavailable, "{e}");
        errors.push(("unreachable (JetStream)", e));
    }
    // Invalid URLs carrying a password: a bad port, a bad scheme, a space in the host, no
    // scheme at all, a password with a slash (not percent-encoded).
    for url in [
        format!("nats://u:{PASSWORD}@127.0.0.1:notaport"),
        format!("http://u:{PASSWORD}@127.0.0.1:{port}"),
        format!("nats://u:{PASSWORD}@bad host:{port}"),
        format!("u:{PASSWORD}@127.0.0.1:notaport"),
        format!("nats://u:{PASSWORD}/x@127.0.0.1:{port}"),
        format!("nats://{TOKEN}@[::1"),
    ] {
        let e = Nats::connect(NatsConfig::new([url.clone()]))
            .await
            .expect_err("an invalid URL");
        assert_eq!(e.kind(), ErrorKind::InvalidInput, "{url}: {e}");
        assert!(e.to_string().contains("nats.urls"), "{e}");
        errors.push(("invalid URL (core)", e));
        let e = JetStream::connect(NatsConfig::new([url]))
            .await
            .expect_err("an invalid URL");
        errors.push(("invalid URL (JetStream)", e));
    }
    // Credentials in the URL and in `credentials`: refused, naming both places.
    let mut creds = Credentials::default();
    creds.user = Some("v".into());
    creds.password = Some(Secret::new(PASSWORD));
    let e = Nats::connect(NatsConfig::new([with_password.clone()]).with_credentials(creds))
        .await
        .expect_err("credentials given twice");
    let text = e.to_string();
    assert!(
        text.contains("nats.urls") && text.contains("nats.credentials"),
        "{text}"
    );
    errors.push(("credentials twice", e));
    // Different user information in two URLs: refused.
    let e = Nats::connect(NatsConfig::new([with_password.clone(), with_token.clone()]))
        .await
        .expect_err("different user information");
    assert_eq!(e.kind(), ErrorKind::InvalidInput, "{e}");
    errors.push(("different user information", e));
    // Not percent-encoded UTF-8.
    let e = Nats::connect(NatsConfig::new([format!(
        "nats://u:{PASSWORD}%FF@127.0.0.1:{port}"
    )]))
    .await
    .expect_err("invalid percent-encoding");
    errors.push(("bad percent-encoding", e));

    for (what, e) in &errors {
        assert_error_secret_free(what, e);
    }
    assert_secret_free("the logs", &logged());
}

/// End to end: a server that requires a user and password accepts `nats://u:PASSWORD@..`
/// through our configuration (so the credentials reach the server, as connect options), on
/// both transports; the logs at TRACE level never show the password.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn url_credentials_authenticate_and_stay_out_of_logs() {
    logs();
    let Some(bin) = server_binary() else { return };
    let server = Server::start_with(
        bin,
        vec![
            "--user".into(),
            "u".into(),
            "--pass".into(),
            PASSWORD.into(),
        ],
    );
    let bare = server.url();
    let url = bare.replacen("nats://", &format!("nats://u:{PASSWORD}@"), 1);

    // Without credentials the server refuses: it does require them.
    let e =
        Nats::connect(NatsConfig::new([bare.clone()]).with_connect_timeout(Duration::from_secs(2)))
            .await
            .expect_err("the server requires a password");
    assert_error_secret_free("refused connect", &e);

    // A wrong password in the URL: refused, and the error does not show it either.
    let wrong = bare.replacen("nats://", &format!("nats://u:{TOKEN}@"), 1);
    let e = Nats::connect(NatsConfig::new([wrong]).with_connect_timeout(Duration::from_secs(2)))
        .await
        .expect_err("a wrong password");
    assert_error_secret_free("wrong password", &e);

    // The simple bus on core NATS.
    let mut config = support::fast_config(url.clone());
    config.jetstream.consumer.lease_ttl = Duration::from_secs(2);
    let nats = Nats::connect(config.clone())
        .await
        .expect("the URL's credentials authenticate");
    assert_secret_free("Debug of Nats", &format!("{nats:?}"));
    let simple = SimpleBus::builder(nats).build().expect("build");
    let topic = unique_topic("secrets");
    let reply = simple
        .serve(
            &topic,
            None,
            dualbus_core::handler_fn(|m: dualbus_core::Message| async move {
                Ok::<_, dualbus_core::HandleError>(m.payload)
            }),
        )
        .await
        .expect("serve");
    let answer = simple
        .request(&topic, "ping", Duration::from_secs(5))
        .await
        .expect("a round trip over the authenticated connection");
    assert_eq!(&answer.payload[..], b"ping");
    drop(reply);

    // The domain bus on JetStream.
    let js = JetStream::connect(config.clone())
        .await
        .expect("the URL's credentials authenticate JetStream");
    assert_secret_free("Debug of JetStream", &format!("{js:?}"));
    let domain = DomainBus::builder(js)
        .source("secrets")
        .build()
        .expect("build");
    let topic = unique_topic("secrets");
    domain
        .publish(&topic, &event("a", 1))
        .await
        .expect("publish over the authenticated connection");
    assert_eq!(domain.replay(&topic, "a").await.expect("replay").len(), 1);
    assert_secret_free("Debug of DomainBus", &format!("{domain:?}"));
    domain.close().await.expect("close");
    simple.close().await.expect("close");

    let logs = logged();
    // The capture works: the client's own debug lines are in it.
    assert!(logs.contains("DEBUG"), "nothing was logged at debug level");
    assert!(
        logs.contains("connect"),
        "the client's connect logs are missing"
    );
    assert_secret_free("the logs", &logs);
    drop(server);
}
