//! Connection settings (servers, credentials, TLS) and connecting with them, with secrets
//! kept out of `Debug` output, errors and logs.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use dualbus_core::{Error, Result};
use serde::Deserialize;

pub use dualbus_core::config::{Secret, redact_url, redact_urls};

use crate::{JetStreamConfig, unavailable};

/// How the client authenticates.
#[derive(Debug, Clone, PartialEq, Eq, Default, Deserialize)]
#[serde(deny_unknown_fields)]
#[non_exhaustive]
pub struct Credentials {
    /// A token.
    pub token: Option<Secret>,
    /// A user name (with `password`).
    pub user: Option<String>,
    /// The password of `user`.
    pub password: Option<Secret>,
    /// An nkey seed.
    pub nkey: Option<Secret>,
    /// A `.creds` file (JWT and nkey seed).
    pub creds_file: Option<PathBuf>,
}

/// Connection settings.
///
/// `Debug` output shows no secret: the user information of the URLs is redacted (see
/// [`redact_url`]) and [`Secret`]s print as `***`.
#[derive(Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
#[non_exhaustive]
pub struct NatsConfig {
    /// Server URLs, e.g. `nats://127.0.0.1:4222`. Default: that one.
    ///
    /// A URL may carry credentials as user information: `nats://user:password@host:4222`
    /// (user and password) or `nats://token@host:4222` (a token), percent-encoded as URLs
    /// require. They are taken out of the URL before the client sees it and sent as the
    /// client's connect options, so that neither the client's logs nor our errors and
    /// `Debug` output show them. All URLs that carry user information must carry the same,
    /// and it cannot be combined with [`NatsConfig::credentials`] (a configuration error
    /// naming both).
    pub urls: Vec<String>,
    /// The client's name in the server's monitoring. Default `dualbus`.
    pub name: String,
    /// Authentication.
    pub credentials: Credentials,
    /// Require TLS.
    pub tls: bool,
    /// PEM file of the certificate authorities that sign the server's certificate (beside
    /// the system's roots).
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (mutual TLS; with `tls_key_file`).
    pub tls_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key.
    pub tls_key_file: Option<PathBuf>,
    /// How long the first connection may take. Default 5 s.
    #[serde(with = "dualbus_core::config::duration")]
    pub connect_timeout: Duration,
    /// JetStream settings of the domain bus.
    pub jetstream: JetStreamConfig,
}

impl fmt::Debug for NatsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let urls: Vec<String> = self.urls.iter().map(|u| redact_url(u)).collect();
        f.debug_struct("NatsConfig")
            .field("urls", &urls)
            .field("name", &self.name)
            .field("credentials", &self.credentials)
            .field("tls", &self.tls)
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("connect_timeout", &self.connect_timeout)
            .field("jetstream", &self.jetstream)
            .finish()
    }
}

impl Default for NatsConfig {
    fn default() -> Self {
        Self {
            urls: vec!["nats://127.0.0.1:4222".to_owned()],
            name: "dualbus".to_owned(),
            credentials: Credentials::default(),
            tls: false,
            tls_ca_file: None,
            tls_cert_file: None,
            tls_key_file: None,
            connect_timeout: Duration::from_secs(5),
            jetstream: JetStreamConfig::default(),
        }
    }
}

impl NatsConfig {
    /// Settings for these server URLs.
    pub fn new<S: Into<String>>(urls: impl IntoIterator<Item = S>) -> Self {
        Self {
            urls: urls.into_iter().map(Into::into).collect(),
            ..Self::default()
        }
    }

    /// Same settings with a client name.
    #[must_use]
    pub fn with_name(mut self, name: impl Into<String>) -> Self {
        self.name = name.into();
        self
    }

    /// Same settings with credentials.
    #[must_use]
    pub fn with_credentials(mut self, credentials: Credentials) -> Self {
        self.credentials = credentials;
        self
    }

    /// Same settings with other JetStream settings.
    #[must_use]
    pub fn with_jetstream(mut self, jetstream: JetStreamConfig) -> Self {
        self.jetstream = jetstream;
        self
    }

    /// Same settings requiring TLS, with a certificate authority to trust (`None`: the
    /// system's roots only).
    #[must_use]
    pub fn with_tls(mut self, ca_file: Option<PathBuf>) -> Self {
        self.tls = true;
        self.tls_ca_file = ca_file;
        self
    }

    /// Same settings with a client certificate and key (mutual TLS).
    #[must_use]
    pub fn with_client_certificate(mut self, cert: PathBuf, key: PathBuf) -> Self {
        self.tls_cert_file = Some(cert);
        self.tls_key_file = Some(key);
        self
    }

    /// Same settings with another connect timeout.
    #[must_use]
    pub fn with_connect_timeout(mut self, timeout: Duration) -> Self {
        self.connect_timeout = timeout;
        self
    }

    /// The client's options; `from_urls` is the user information the URLs carried.
    async fn options(&self, from_urls: Option<UrlAuth>) -> Result<async_nats::ConnectOptions> {
        let c = &self.credentials;
        if let Some(auth) = from_urls {
            if *c != Credentials::default() {
                return Err(Error::config(
                    "nats.credentials",
                    "credentials are given both as user information in nats.urls and in nats.credentials: give them in one place",
                ));
            }
            let o = match auth {
                UrlAuth::UserPassword(user, password) => {
                    async_nats::ConnectOptions::with_user_and_password(user, password)
                }
                UrlAuth::Token(token) => async_nats::ConnectOptions::with_token(token),
            };
            return self.connection_options(o);
        }
        let o = match (&c.token, &c.user, &c.nkey, &c.creds_file) {
            (Some(t), None, None, None) => {
                async_nats::ConnectOptions::with_token(t.expose().to_owned())
            }
            (None, Some(u), None, None) => {
                let p = c
                    .password
                    .as_ref()
                    .map(|p| p.expose().to_owned())
                    .unwrap_or_default();
                async_nats::ConnectOptions::with_user_and_password(u.clone(), p)
            }
            (None, None, Some(seed), None) => {
                async_nats::ConnectOptions::with_nkey(seed.expose().to_owned())
            }
            (None, None, None, Some(path)) => {
                async_nats::ConnectOptions::with_credentials_file(path.clone())
                    .await
                    .map_err(|e| Error::config("nats.credentials.creds_file", e.to_string()))?
            }
            (None, None, None, None) => async_nats::ConnectOptions::new(),
            _ => {
                return Err(Error::config(
                    "nats.credentials",
                    "give one of token, user (with password), nkey or creds_file",
                ));
            }
        };
        self.connection_options(o)
    }

    /// `o` with the TLS, name and timeout settings.
    fn connection_options(
        &self,
        mut o: async_nats::ConnectOptions,
    ) -> Result<async_nats::ConnectOptions> {
        if self.tls {
            o = o.require_tls(true);
        }
        for (key, file) in [
            ("nats.tls_ca_file", &self.tls_ca_file),
            ("nats.tls_cert_file", &self.tls_cert_file),
            ("nats.tls_key_file", &self.tls_key_file),
        ] {
            if let Some(f) = file
                && !f.is_file()
            {
                return Err(Error::config(
                    key,
                    format!("{} is not a readable file", f.display()),
                ));
            }
        }
        if let Some(ca) = &self.tls_ca_file {
            o = o.add_root_certificates(ca.clone());
        }
        match (&self.tls_cert_file, &self.tls_key_file) {
            (Some(cert), Some(key)) => o = o.add_client_certificate(cert.clone(), key.clone()),
            (None, None) => {}
            _ => {
                return Err(Error::config(
                    "nats.tls_cert_file",
                    "give both tls_cert_file and tls_key_file, or neither",
                ));
            }
        }
        Ok(o.name(self.name.clone())
            .connection_timeout(self.connect_timeout))
    }
}

/// Connects a client with the connection part of `config`.
pub(crate) async fn connect_client(config: &NatsConfig) -> Result<async_nats::Client> {
    if config.urls.is_empty() {
        return Err(Error::config("nats.urls", "give at least one server URL"));
    }
    let mut urls = Vec::with_capacity(config.urls.len());
    let mut auth: Option<UrlAuth> = None;
    for u in &config.urls {
        let (addr, a) = server_addr(u)?;
        urls.push(addr);
        match (&auth, a) {
            (_, None) => {}
            (None, Some(a)) => auth = Some(a),
            (Some(have), Some(a)) => {
                if *have != a {
                    return Err(Error::config(
                        "nats.urls",
                        "the URLs carry different user information; give the same in each, or credentials in nats.credentials",
                    ));
                }
            }
        }
    }
    config
        .options(auth)
        .await?
        .connect(urls)
        .await
        .map_err(unavailable)
}

/// Credentials found as user information in a server URL.
#[derive(PartialEq, Eq)]
enum UrlAuth {
    /// `user:password@`.
    UserPassword(String, String),
    /// `token@` (a user name without password is a token, as in the other NATS clients).
    Token(String),
}

/// The server address of `url` without its user information, and that information.
fn server_addr(url: &str) -> Result<(async_nats::ServerAddr, Option<UrlAuth>)> {
    let invalid =
        |e: &dyn fmt::Display| Error::config("nats.urls", format!("{:?}: {e}", redact_url(url)));
    let addr = url
        .parse::<async_nats::ServerAddr>()
        .map_err(|e| invalid(&e))?;
    if !addr.has_user_pass() && addr.password().is_none() {
        return Ok((addr, None));
    }
    let decode = |part: &str| {
        percent_encoding::percent_decode_str(part)
            .decode_utf8()
            .map(|s| s.into_owned())
            .map_err(|_| invalid(&"the user information is not valid percent-encoded UTF-8"))
    };
    let auth = match addr.password() {
        Some(password) => UrlAuth::UserPassword(
            decode(addr.username().unwrap_or_default())?,
            decode(password)?,
        ),
        None => UrlAuth::Token(decode(addr.username().unwrap_or_default())?),
    };
    let mut bare = addr.into_inner();
    bare.set_password(None)
        .and_then(|()| bare.set_username(""))
        .map_err(|()| invalid(&"cannot take the user information out of this URL"))?;
    let addr = async_nats::ServerAddr::from_url(bare).map_err(|e| invalid(&e))?;
    Ok((addr, Some(auth)))
}
