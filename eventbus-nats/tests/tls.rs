//! TLS against a nats-server of its own: server verification with our own certificate
//! authority, and mutual TLS with a client certificate.

#![allow(clippy::expect_used, clippy::panic)] // Test code.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use dualbus_core::conformance::{event, unique_topic};
use dualbus_core::{DomainBus, Error};
use dualbus_nats::{JetStream, NatsConfig};
use support::{Server, fast_config, server_binary};

fn openssl(dir: &Path, args: &[&str]) {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("run openssl");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A certificate authority, a server certificate for 127.0.0.1 and a client certificate.
fn certificates(dir: &Path) -> [PathBuf; 5] {
    std::fs::create_dir_all(dir).expect("dir");
    let ec = [
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
    ];
    openssl(
        dir,
        &[
            &["req", "-x509"],
            &ec[..],
            &[
                "-keyout",
                "ca.key",
                "-out",
                "ca.pem",
                "-days",
                "2",
                "-subj",
                "/CN=dualbus test CA",
            ],
        ]
        .concat(),
    );
    std::fs::write(
        dir.join("server.ext"),
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth\n",
    )
    .expect("ext");
    std::fs::write(dir.join("client.ext"), "extendedKeyUsage=clientAuth\n").expect("ext");
    for who in ["server", "client"] {
        let (key, csr, pem, ext) = (
            format!("{who}.key"),
            format!("{who}.csr"),
            format!("{who}.pem"),
            format!("{who}.ext"),
        );
        openssl(
            dir,
            &[
                &["req"],
                &ec[..],
                &[
                    "-keyout",
                    &key,
                    "-out",
                    &csr,
                    "-subj",
                    &format!("/CN={who}"),
                ],
            ]
            .concat(),
        );
        openssl(
            dir,
            &[
                "x509",
                "-req",
                "-in",
                &csr,
                "-CA",
                "ca.pem",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-out",
                &pem,
                "-days",
                "2",
                "-extfile",
                &ext,
            ],
        );
    }
    [
        "ca.pem",
        "server.pem",
        "server.key",
        "client.pem",
        "client.key",
    ]
    .map(|f| dir.join(f))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_and_mutual_tls() {
    let Some(bin) = server_binary() else { return };
    if Command::new("openssl").arg("version").output().is_err() {
        assert!(
            std::env::var_os("DUALBUS_TEST_REQUIRE_SERVERS").is_none(),
            "openssl is needed for the TLS test"
        );
        eprintln!("skipped: no openssl");
        return;
    }
    let certs_dir =
        std::env::temp_dir().join(format!("dualbus-tls-{}", uuid::Uuid::now_v7().simple()));
    let [ca, server_cert, server_key, client_cert, client_key] = certificates(&certs_dir);
    let path = |p: &PathBuf| p.to_str().expect("utf-8 path").to_owned();
    let server = Server::start_with(
        bin,
        vec![
            "--tls".into(),
            "--tlscert".into(),
            path(&server_cert),
            "--tlskey".into(),
            path(&server_key),
            "--tlsverify".into(),
            "--tlscacert".into(),
            path(&ca),
        ],
    );
    let url = server.url();

    // Verified server, client certificate presented: works end to end.
    let config = fast_config(url.clone())
        .with_tls(Some(ca.clone()))
        .with_client_certificate(client_cert.clone(), client_key.clone());
    let bus = DomainBus::builder(JetStream::connect(config).await.expect("mutual TLS"))
        .source("tls")
        .build()
        .expect("build");
    let topic = unique_topic("tls");
    bus.publish(&topic, &event("a", 1))
        .await
        .expect("publish over TLS");
    assert_eq!(bus.replay(&topic, "a").await.expect("replay").len(), 1);
    bus.close().await.expect("close");

    // No client certificate: the server refuses.
    let e = JetStream::connect(
        fast_config(url.clone())
            .with_tls(Some(ca.clone()))
            .with_connect_timeout(std::time::Duration::from_secs(2)),
    )
    .await
    .expect_err("a client certificate is required");
    assert!(e.is_retryable() || matches!(e, Error::Config { .. }), "{e}");

    // Our CA unknown to the client: the server's certificate is not trusted.
    let e = JetStream::connect(
        fast_config(url.clone())
            .with_tls(None)
            .with_client_certificate(client_cert.clone(), client_key.clone())
            .with_connect_timeout(std::time::Duration::from_secs(2)),
    )
    .await
    .expect_err("an untrusted server certificate");
    eprintln!("untrusted server: {e}");

    // Half a client certificate or a missing file: a configuration error naming the key.
    let mut half = NatsConfig::new([url.clone()]).with_tls(Some(ca.clone()));
    half.tls_cert_file = Some(client_cert.clone());
    let e = JetStream::connect(half)
        .await
        .expect_err("cert without key");
    assert!(e.to_string().contains("tls_cert_file"), "{e}");
    let e =
        JetStream::connect(NatsConfig::new([url]).with_tls(Some(certs_dir.join("missing.pem"))))
            .await
            .expect_err("missing CA file");
    assert!(e.to_string().contains("tls_ca_file"), "{e}");
    drop(server);
    let _ = std::fs::remove_dir_all(&certs_dir);
}
