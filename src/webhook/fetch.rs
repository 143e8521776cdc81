//! Media downloads for Retell webhooks, hardened against server-side request forgery (SSRF).
//!
//! A Retell webhook carries links to the call's media (the recording, call logs). Each link works
//! as a bearer credential, since anyone who has it can download PHI, and it may expire 10 minutes
//! after delivery. [`Fetcher`] downloads such a link and passes the body to a [`ChunkSink`] one
//! chunk at a time, so the caller encrypts and stores each chunk as it arrives and never buffers
//! the whole body.
//!
//! Invariants:
//!
//! - Only `https` URLs whose host is on [`FetchPolicy::allowed_hosts`] are requested. Every
//!   redirect target is checked the same way before it is followed, for at most
//!   [`MAX_REDIRECTS`] redirects.
//! - A host name is resolved by this module's resolver. If any address it resolves to is not
//!   public ([`classify_address`]), the connection is rejected. Otherwise the connector receives
//!   exactly the checked addresses, so the address checked is the address connected to. A URL
//!   with a literal IP address is checked the same way. Loopback addresses pass only with
//!   [`FetchPolicy::allow_loopback_for_tests`].
//! - The client uses no proxy from the environment, keeps no cookies, sends no `Referer` header
//!   (which would carry the link to the redirect target) and decodes no `Content-Encoding`.
//! - Server certificates are verified against Mozilla's root certificates (`webpki-roots`) plus
//!   the optional [`FetchPolicy::extra_ca_file`], never against the operating system's store.
//! - Neither an error message nor a log line of this module contains the URL or any part of it.
//!   Errors state the kind of failure, and log lines add the attempt number.

use std::error::Error as StdError;
use std::fmt;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};
use reqwest::header::{ACCEPT_ENCODING, HeaderMap, HeaderValue};
use reqwest::{StatusCode, Url, redirect};
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;
use rustls::{CertificateError, ClientConfig, RootCertStore};
use tokio::time::{Instant, timeout_at};
use tracing::warn;

use crate::tls;

/// Maximum number of redirects followed for one download.
///
/// # Defaults
///
/// 5. A CDN link is redirected once or twice at most, and a longer chain is more likely a loop.
pub const MAX_REDIRECTS: usize = 5;

/// Default of [`FetchPolicy::max_bytes`]: 1 GiB.
///
/// An estimate of what a recording needs: 1 GiB stores more than 3 hours of two-channel 16-bit
/// PCM at 24 kHz.
pub const DEFAULT_MAX_BYTES: u64 = 1 << 30;

/// Default of [`FetchPolicy::connect_timeout`]: 10 seconds.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Default of [`FetchPolicy::total_timeout`]: 5 minutes per attempt, so that two full attempts
/// fit in the 10 minutes a Retell link may live.
pub const DEFAULT_TOTAL_TIMEOUT: Duration = Duration::from_secs(5 * 60);

/// Default of [`FetchPolicy::max_attempts`]: 4.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 4;

/// Default of [`FetchPolicy::initial_backoff`]: 1 second.
pub const DEFAULT_INITIAL_BACKOFF: Duration = Duration::from_secs(1);

/// Default of [`FetchPolicy::max_backoff`]: 30 seconds.
pub const DEFAULT_MAX_BACKOFF: Duration = Duration::from_secs(30);

/// The rules and limits of a [`Fetcher`]: allowed hosts, trust roots, size, time and retries.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FetchPolicy {
    /// Host names that may be requested, compared case-insensitively after IDNA normalization.
    ///
    /// An entry is an exact host name (`media.example.com`), a literal IP address (`192.0.2.1`,
    /// `[2001:db8::1]`), or `*.example.com`, which matches every name below `example.com` but not
    /// `example.com` itself. A URL host with a trailing dot (`example.com.`) matches no entry.
    /// Entries name no port, and a URL may use any port of an allowed host.
    /// An empty list is rejected by [`Fetcher::new`].
    pub allowed_hosts: Vec<String>,

    /// Lets hosts resolve to loopback addresses (127.0.0.0/8, `::1`). Only tests against a local
    /// server set this.
    pub allow_loopback_for_tests: bool,

    /// PEM file of CA certificates trusted in addition to Mozilla's root certificates.
    pub extra_ca_file: Option<PathBuf>,

    /// Maximum size of one download in bytes.
    pub max_bytes: u64,

    /// Time allowed for the TCP connection to one address.
    pub connect_timeout: Duration,

    /// Time allowed for one attempt, from sending the request until the sink has accepted the
    /// last chunk.
    pub total_timeout: Duration,

    /// Maximum number of attempts of [`Fetcher::fetch`], the first one included.
    pub max_attempts: u32,

    /// Upper bound of the delay before the second attempt. The bound doubles with each attempt.
    pub initial_backoff: Duration,

    /// Upper bound of any delay between two attempts.
    pub max_backoff: Duration,
}

impl FetchPolicy {
    /// Creates a policy for `allowed_hosts` with the default limits.
    pub fn new<I, S>(allowed_hosts: I) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Self {
            allowed_hosts: allowed_hosts.into_iter().map(Into::into).collect(),
            allow_loopback_for_tests: false,
            extra_ca_file: None,
            max_bytes: DEFAULT_MAX_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            total_timeout: DEFAULT_TOTAL_TIMEOUT,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            initial_backoff: DEFAULT_INITIAL_BACKOFF,
            max_backoff: DEFAULT_MAX_BACKOFF,
        }
    }
}

/// The destination of a download's body, typically an encryptor in front of a storage upload.
pub trait ChunkSink: Send {
    /// The error of a failed write. It becomes the source of [`FetchError::Sink`].
    type Error: StdError + Send + Sync + 'static;

    /// Writes the next chunk of the body. Chunks arrive in order, and none is empty.
    fn write_chunk(&mut self, chunk: Bytes)
    -> impl Future<Output = Result<(), Self::Error>> + Send;

    /// Discards what was written. [`Fetcher::fetch`] calls this on the sink of a failed attempt.
    /// The default drops the sink.
    fn abort(self) -> impl Future<Output = ()> + Send
    where
        Self: Sized,
    {
        async {}
    }
}

/// The result of a successful [`Fetcher::fetch`].
#[derive(Debug)]
pub struct Fetched<S> {
    /// The sink of the successful attempt, holding the whole body. The caller commits it.
    pub sink: S,
    /// Size of the body in bytes.
    pub bytes: u64,
    /// Number of attempts made, the successful one included.
    pub attempts: u32,
}

/// A download client that enforces a [`FetchPolicy`].
///
/// Cloning is cheap, and clones share one connection pool.
#[derive(Clone, Debug)]
pub struct Fetcher {
    client: reqwest::Client,
    rules: Arc<HostRules>,
    policy: Arc<FetchPolicy>,
}

impl Fetcher {
    /// Builds a fetcher for `policy`, resolving names with the operating system's resolver.
    ///
    /// Fails when the policy is invalid (no allowed hosts, a malformed host entry, a zero limit,
    /// no attempts, `initial_backoff` above `max_backoff`) or the CA file cannot be loaded.
    pub fn new(policy: FetchPolicy) -> Result<Self, FetchError> {
        Self::with_lookup(policy, Arc::new(SystemLookup))
    }

    /// Builds a fetcher whose resolver gets addresses from `lookup` before checking them.
    fn with_lookup(policy: FetchPolicy, lookup: Arc<dyn HostLookup>) -> Result<Self, FetchError> {
        validate_limits(&policy)?;
        let rules = Arc::new(HostRules::new(
            &policy.allowed_hosts,
            policy.allow_loopback_for_tests,
        )?);
        let tls = client_tls_config(policy.extra_ca_file.as_deref())?;

        let resolver = PolicyResolver {
            rules: Arc::clone(&rules),
            lookup,
        };
        let redirect_rules = Arc::clone(&rules);
        let redirect_policy = redirect::Policy::custom(move |attempt| {
            // `previous` lists every URL requested so far, the original one included.
            if attempt.previous().len() > MAX_REDIRECTS {
                return attempt.error(RedirectFailure::TooMany);
            }
            match redirect_rules.check(attempt.url()) {
                Ok(()) => attempt.follow(),
                Err(reason) => attempt.error(RedirectFailure::Rejected(reason)),
            }
        });

        // Tell servers not to compress: the body is stored as sent.
        let mut headers = HeaderMap::new();
        headers.insert(ACCEPT_ENCODING, HeaderValue::from_static("identity"));

        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .dns_resolver(resolver)
            .redirect(redirect_policy)
            .referer(false)
            .no_proxy()
            .https_only(true)
            .no_gzip()
            .no_brotli()
            .no_zstd()
            .no_deflate()
            .default_headers(headers)
            .user_agent(concat!("callseal/", env!("CARGO_PKG_VERSION")))
            .connect_timeout(policy.connect_timeout)
            .build()
            .map_err(|source| FetchError::ClientBuild {
                source: source.without_url(),
            })?;

        if policy.allow_loopback_for_tests {
            warn!("media fetch policy allows loopback addresses, which only tests should do");
        }
        Ok(Self {
            client,
            rules,
            policy: Arc::new(policy),
        })
    }

    /// Sends one `POST` of the JSON `body` to `url` under the same policy as downloads (scheme,
    /// host allowlist, address checks, redirects, timeouts) and returns the response status.
    /// The caller decides about retries.
    pub async fn post(
        &self,
        url: &str,
        body: Bytes,
        headers: &[(&str, String)],
    ) -> Result<u16, FetchError> {
        let url = self.check_url(url)?;
        let deadline = Instant::now() + self.policy.total_timeout;
        let mut request = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        let response = timeout_at(deadline, request.send())
            .await
            .map_err(|_| self.timeout())?
            .map_err(|error| self.request_error(error))?;
        Ok(response.status().as_u16())
    }

    /// Returns the policy this fetcher enforces.
    pub fn policy(&self) -> &FetchPolicy {
        &self.policy
    }

    /// Parses `url` and checks its scheme, its host against the allowlist, and a literal IP host
    /// against the address rules, without any network access.
    ///
    /// A host name passes here even if it resolves to a disallowed address: the resolver rejects
    /// that when the download connects.
    pub fn check_url(&self, url: &str) -> Result<Url, FetchError> {
        let parsed = Url::parse(url).map_err(|error| FetchError::Rejected {
            reason: UrlRejection::Invalid(error.to_string()),
        })?;
        self.rules
            .check(&parsed)
            .map_err(|reason| FetchError::Rejected { reason })?;
        Ok(parsed)
    }

    /// Downloads `url` once and writes the body to `sink`. Returns the size of the body.
    ///
    /// `sink` receives nothing unless the response is `200 OK` with no `Content-Length` above
    /// [`FetchPolicy::max_bytes`]. When the body turns out larger while streaming, the transfer
    /// stops with [`FetchError::TooLarge`] before the chunk that crosses the limit is written. On
    /// any error `sink` may hold part of the body, and the caller discards it.
    pub async fn fetch_once<S: ChunkSink>(
        &self,
        url: &str,
        sink: &mut S,
    ) -> Result<u64, FetchError> {
        let result = async {
            let url = self.check_url(url)?;
            let deadline = Instant::now() + self.policy.total_timeout;
            let response = self.open(&url, deadline).await?;
            self.stream_body(response, sink, deadline).await
        }
        .await;

        if let Err(error) = &result {
            warn!(
                attempt = 1,
                kind = error.kind(),
                error = %error,
                "media download failed"
            );
        }
        result
    }

    /// Downloads `url` with retries, and returns the sink that received the whole body.
    ///
    /// Each attempt whose response is accepted (`200 OK`, `Content-Length` within the limit)
    /// calls `start` with the attempt number, counting from 1, to get a fresh sink, so every
    /// attempt begins a new upload. The sink of a failed attempt is aborted with
    /// [`ChunkSink::abort`]. An error of `start` fails the download like a sink error.
    ///
    /// Only errors for which [`FetchError::is_retryable`] returns true are retried, at most
    /// [`FetchPolicy::max_attempts`] attempts in all. Before attempt `n + 1` the fetcher sleeps
    /// for a random delay between zero and `initial_backoff × 2^(n − 1)`, capped at
    /// `max_backoff` (exponential backoff with full jitter).
    pub async fn fetch<S, F, Fut>(&self, url: &str, mut start: F) -> Result<Fetched<S>, FetchError>
    where
        S: ChunkSink,
        F: FnMut(u32) -> Fut + Send,
        Fut: Future<Output = Result<S, S::Error>> + Send,
    {
        let url = match self.check_url(url) {
            Ok(url) => url,
            Err(error) => {
                warn!(attempt = 1, kind = error.kind(), error = %error, "media download failed");
                return Err(error);
            }
        };

        let max_attempts = self.policy.max_attempts;
        let mut attempt = 1;
        loop {
            let error = match self.attempt(&url, attempt, &mut start).await {
                Ok((sink, bytes)) => {
                    return Ok(Fetched {
                        sink,
                        bytes,
                        attempts: attempt,
                    });
                }
                Err(error) => error,
            };

            if !error.is_retryable() || attempt >= max_attempts {
                warn!(
                    attempt,
                    max_attempts,
                    kind = error.kind(),
                    error = %error,
                    "media download failed"
                );
                return Err(error);
            }

            let cap = backoff_cap(
                attempt,
                self.policy.initial_backoff,
                self.policy.max_backoff,
            );
            // Without an OS random source the delay loses its jitter, but the retry still runs.
            let delay = getrandom::u64().map_or(cap, |random| jittered(cap, random));
            warn!(
                attempt,
                max_attempts,
                kind = error.kind(),
                error = %error,
                delay_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                "media download attempt failed, retrying"
            );
            tokio::time::sleep(delay).await;
            attempt += 1;
        }
    }

    /// Runs one attempt of [`Fetcher::fetch`]: request, a fresh sink from `start`, body.
    async fn attempt<S, F, Fut>(
        &self,
        url: &Url,
        attempt: u32,
        start: &mut F,
    ) -> Result<(S, u64), FetchError>
    where
        S: ChunkSink,
        F: FnMut(u32) -> Fut + Send,
        Fut: Future<Output = Result<S, S::Error>> + Send,
    {
        let deadline = Instant::now() + self.policy.total_timeout;
        let response = self.open(url, deadline).await?;

        let mut sink = timeout_at(deadline, start(attempt))
            .await
            .map_err(|_| self.timeout())?
            .map_err(|source| FetchError::Sink {
                source: Box::new(source),
            })?;

        match self.stream_body(response, &mut sink, deadline).await {
            Ok(bytes) => Ok((sink, bytes)),
            Err(error) => {
                sink.abort().await;
                Err(error)
            }
        }
    }

    /// Sends the request and accepts the response only if it is `200 OK` with no
    /// `Content-Length` above the limit.
    async fn open(&self, url: &Url, deadline: Instant) -> Result<reqwest::Response, FetchError> {
        let response = timeout_at(deadline, self.client.get(url.clone()).send())
            .await
            .map_err(|_| self.timeout())?
            .map_err(|error| self.request_error(error))?;

        let status = response.status();
        if status != StatusCode::OK {
            return Err(FetchError::Status {
                status: status.as_u16(),
            });
        }

        let max_bytes = self.policy.max_bytes;
        if response
            .content_length()
            .is_some_and(|length| length > max_bytes)
        {
            return Err(FetchError::TooLarge { max_bytes });
        }
        Ok(response)
    }

    /// Writes the body of `response` to `sink` chunk by chunk, within the size limit and the
    /// deadline.
    async fn stream_body<S: ChunkSink>(
        &self,
        mut response: reqwest::Response,
        sink: &mut S,
        deadline: Instant,
    ) -> Result<u64, FetchError> {
        let max_bytes = self.policy.max_bytes;
        let mut received: u64 = 0;
        loop {
            let chunk = timeout_at(deadline, response.chunk())
                .await
                .map_err(|_| self.timeout())?
                .map_err(|error| self.request_error(error))?;
            let Some(chunk) = chunk else {
                return Ok(received);
            };
            if chunk.is_empty() {
                continue;
            }

            received = received.saturating_add(chunk.len() as u64);
            if received > max_bytes {
                return Err(FetchError::TooLarge { max_bytes });
            }

            timeout_at(deadline, sink.write_chunk(chunk))
                .await
                .map_err(|_| self.timeout())?
                .map_err(|source| FetchError::Sink {
                    source: Box::new(source),
                })?;
        }
    }

    fn timeout(&self) -> FetchError {
        FetchError::Timeout {
            after: self.policy.total_timeout,
        }
    }

    /// Maps a request or body error of reqwest to a [`FetchError`], dropping the URL it carries.
    fn request_error(&self, error: reqwest::Error) -> FetchError {
        let error = error.without_url();

        if let Some(failure) = find_cause::<ResolveFailure>(&error) {
            return failure.to_fetch_error();
        }
        if let Some(failure) = find_cause::<RedirectFailure>(&error) {
            return match failure {
                RedirectFailure::TooMany => FetchError::TooManyRedirects { max: MAX_REDIRECTS },
                RedirectFailure::Rejected(reason) => FetchError::RedirectRejected {
                    reason: reason.clone(),
                },
            };
        }
        if let Some(tls_error) = find_cause::<rustls::Error>(&error) {
            return FetchError::Tls {
                source: without_names(tls_error.clone()),
            };
        }
        if error.is_connect() && error.is_timeout() {
            return FetchError::ConnectTimeout {
                after: self.policy.connect_timeout,
            };
        }
        if error.is_connect() {
            return FetchError::Connect { source: error };
        }
        FetchError::Transfer { source: error }
    }
}

/// The reason a URL, or a redirect target, was rejected.
#[derive(Clone, Debug, PartialEq, Eq)]
#[non_exhaustive]
pub enum UrlRejection {
    /// The URL does not parse. The reason is the parser's message, which quotes no part of the
    /// URL.
    Invalid(String),
    /// The scheme is not `https`.
    NotHttps,
    /// The URL contains a user name or password.
    Credentials,
    /// The host is not on the allowlist.
    HostNotAllowed,
    /// The host is, or resolves to, an address that is not public.
    AddressNotAllowed(AddressClass),
}

impl fmt::Display for UrlRejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Invalid(reason) => write!(f, "invalid URL ({reason})"),
            Self::NotHttps => f.write_str("scheme is not https"),
            Self::Credentials => f.write_str("URL contains credentials"),
            Self::HostNotAllowed => f.write_str("host is not on the allowlist"),
            Self::AddressNotAllowed(class) => write!(f, "host address is {class}, not public"),
        }
    }
}

/// Errors of media downloads. No message contains the URL or a part of it.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum FetchError {
    #[error("invalid media fetch policy: {reason}")]
    InvalidPolicy { reason: String },

    #[error("failed to load CA certificates from {}: {reason}", path.display())]
    CaFile { path: PathBuf, reason: String },

    #[error("failed to build the TLS client configuration: {source}")]
    TlsConfig {
        #[source]
        source: rustls::Error,
    },

    #[error("failed to build the HTTP client: {}", root_cause(source))]
    ClientBuild {
        #[source]
        source: reqwest::Error,
    },

    #[error("media URL rejected: {reason}")]
    Rejected { reason: UrlRejection },

    #[error("media redirect rejected: {reason}")]
    RedirectRejected { reason: UrlRejection },

    #[error("media download exceeded {max} redirects")]
    TooManyRedirects { max: usize },

    #[error("failed to resolve the media host: {reason}")]
    Resolve { reason: String },

    #[error("media host resolved to no address")]
    NoAddresses,

    #[error("failed to connect to the media host: {}", root_cause(source))]
    Connect {
        #[source]
        source: reqwest::Error,
    },

    #[error("connecting to the media host timed out after {after:?}")]
    ConnectTimeout { after: Duration },

    #[error("TLS handshake with the media host failed: {source}")]
    Tls {
        #[source]
        source: rustls::Error,
    },

    #[error("media download attempt timed out after {after:?}")]
    Timeout { after: Duration },

    #[error("media host returned HTTP status {status}")]
    Status { status: u16 },

    #[error("media is larger than the limit of {max_bytes} bytes")]
    TooLarge { max_bytes: u64 },

    #[error("media transfer failed: {}", root_cause(source))]
    Transfer {
        #[source]
        source: reqwest::Error,
    },

    #[error("failed to write media to its sink: {source}")]
    Sink {
        #[source]
        source: Box<dyn StdError + Send + Sync>,
    },
}

impl FetchError {
    /// Returns whether a new attempt may succeed: connection failures, timeouts, broken transfers,
    /// DNS failures, HTTP 5xx and 429.
    ///
    /// Policy rejections, TLS failures, other HTTP statuses, the size limit and sink errors are not
    /// retryable. A sink error means storage failed, and the caller decides whether to run the
    /// whole download again later.
    pub fn is_retryable(&self) -> bool {
        match self {
            Self::Resolve { .. }
            | Self::Connect { .. }
            | Self::ConnectTimeout { .. }
            | Self::Timeout { .. }
            | Self::Transfer { .. } => true,
            Self::Status { status } => {
                *status == StatusCode::TOO_MANY_REQUESTS.as_u16() || (500..600).contains(status)
            }
            _ => false,
        }
    }

    /// Returns a short, stable name of the failure, for log fields and metric labels.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::InvalidPolicy { .. } => "invalid_policy",
            Self::CaFile { .. } => "ca_file",
            Self::TlsConfig { .. } => "tls_config",
            Self::ClientBuild { .. } => "client_build",
            Self::Rejected { .. } => "rejected",
            Self::RedirectRejected { .. } => "redirect_rejected",
            Self::TooManyRedirects { .. } => "too_many_redirects",
            Self::Resolve { .. } => "resolve",
            Self::NoAddresses => "no_addresses",
            Self::Connect { .. } => "connect",
            Self::ConnectTimeout { .. } => "connect_timeout",
            Self::Tls { .. } => "tls",
            Self::Timeout { .. } => "timeout",
            Self::Status { .. } => "status",
            Self::TooLarge { .. } => "too_large",
            Self::Transfer { .. } => "transfer",
            Self::Sink { .. } => "sink",
        }
    }
}

/// The class of an IP address, as far as outbound requests care.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum AddressClass {
    /// Globally routable unicast.
    Public,
    /// 127.0.0.0/8 and `::1`.
    Loopback,
    /// 0.0.0.0 and `::`.
    Unspecified,
    /// 10.0.0.0/8, 172.16.0.0/12 and 192.168.0.0/16 (RFC 1918).
    Private,
    /// 100.64.0.0/10, the shared address space of carrier-grade NAT (RFC 6598).
    SharedAddressSpace,
    /// 169.254.0.0/16 and fe80::/10. Cloud metadata services listen here.
    LinkLocal,
    /// 224.0.0.0/4 and ff00::/8.
    Multicast,
    /// 255.255.255.255.
    Broadcast,
    /// 192.0.2.0/24, 198.51.100.0/24, 203.0.113.0/24, 2001:db8::/32 and 3fff::/20.
    Documentation,
    /// fc00::/7 (RFC 4193).
    UniqueLocal,
    /// Any other special-purpose range: 0.0.0.0/8, 192.0.0.0/24, 192.88.99.0/24, 198.18.0.0/15,
    /// 240.0.0.0/4, 64:ff9b:1::/48, 100::/64, 2001::/23 (which contains Teredo), fec0::/10, and
    /// IPv6 addresses outside the global unicast range 2000::/3.
    Reserved,
}

impl AddressClass {
    /// Returns the lowercase name of the class, as used in messages.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Public => "public",
            Self::Loopback => "loopback",
            Self::Unspecified => "unspecified",
            Self::Private => "private",
            Self::SharedAddressSpace => "shared address space",
            Self::LinkLocal => "link-local",
            Self::Multicast => "multicast",
            Self::Broadcast => "broadcast",
            Self::Documentation => "documentation",
            Self::UniqueLocal => "unique-local",
            Self::Reserved => "reserved",
        }
    }
}

impl fmt::Display for AddressClass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Classifies `ip` for outbound requests.
///
/// An IPv6 address that embeds an IPv4 address gets the class of the IPv4 address: IPv4-mapped
/// (`::ffff:0:0/96`), IPv4-compatible (`::/96`), NAT64 (`64:ff9b::/96`) and 6to4 (`2002::/16`).
pub fn classify_address(ip: IpAddr) -> AddressClass {
    match ip {
        IpAddr::V4(ip) => classify_ipv4(ip),
        IpAddr::V6(ip) => classify_ipv6(ip),
    }
}

/// Special-purpose IPv4 ranges, checked in order, so a range comes before any range that
/// contains it.
#[rustfmt::skip]
const IPV4_RANGES: &[(Ipv4Addr, u32, AddressClass)] = &[
    (Ipv4Addr::new(0, 0, 0, 0), 32, AddressClass::Unspecified),
    (Ipv4Addr::new(0, 0, 0, 0), 8, AddressClass::Reserved),
    (Ipv4Addr::new(10, 0, 0, 0), 8, AddressClass::Private),
    (Ipv4Addr::new(100, 64, 0, 0), 10, AddressClass::SharedAddressSpace),
    (Ipv4Addr::new(127, 0, 0, 0), 8, AddressClass::Loopback),
    (Ipv4Addr::new(169, 254, 0, 0), 16, AddressClass::LinkLocal),
    (Ipv4Addr::new(172, 16, 0, 0), 12, AddressClass::Private),
    (Ipv4Addr::new(192, 0, 0, 0), 24, AddressClass::Reserved),
    (Ipv4Addr::new(192, 0, 2, 0), 24, AddressClass::Documentation),
    (Ipv4Addr::new(192, 88, 99, 0), 24, AddressClass::Reserved),
    (Ipv4Addr::new(192, 168, 0, 0), 16, AddressClass::Private),
    (Ipv4Addr::new(198, 18, 0, 0), 15, AddressClass::Reserved),
    (Ipv4Addr::new(198, 51, 100, 0), 24, AddressClass::Documentation),
    (Ipv4Addr::new(203, 0, 113, 0), 24, AddressClass::Documentation),
    (Ipv4Addr::new(224, 0, 0, 0), 4, AddressClass::Multicast),
    (Ipv4Addr::new(255, 255, 255, 255), 32, AddressClass::Broadcast),
    (Ipv4Addr::new(240, 0, 0, 0), 4, AddressClass::Reserved),
];

/// Special-purpose IPv6 ranges that embed no IPv4 address, checked in order. Addresses outside
/// all of them and outside 2000::/3 are [`AddressClass::Reserved`].
#[rustfmt::skip]
const IPV6_RANGES: &[(Ipv6Addr, u32, AddressClass)] = &[
    (Ipv6Addr::new(0x64, 0xff9b, 1, 0, 0, 0, 0, 0), 48, AddressClass::Reserved),
    (Ipv6Addr::new(0x100, 0, 0, 0, 0, 0, 0, 0), 64, AddressClass::Reserved),
    (Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0), 32, AddressClass::Documentation),
    (Ipv6Addr::new(0x2001, 0, 0, 0, 0, 0, 0, 0), 23, AddressClass::Reserved),
    (Ipv6Addr::new(0x3fff, 0, 0, 0, 0, 0, 0, 0), 20, AddressClass::Documentation),
    (Ipv6Addr::new(0xfc00, 0, 0, 0, 0, 0, 0, 0), 7, AddressClass::UniqueLocal),
    (Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0), 10, AddressClass::LinkLocal),
    (Ipv6Addr::new(0xfec0, 0, 0, 0, 0, 0, 0, 0), 10, AddressClass::Reserved),
    (Ipv6Addr::new(0xff00, 0, 0, 0, 0, 0, 0, 0), 8, AddressClass::Multicast),
];

fn classify_ipv4(ip: Ipv4Addr) -> AddressClass {
    let bits = u32::from(ip);
    IPV4_RANGES
        .iter()
        .find(|(base, prefix, _)| {
            let mask = u32::MAX.checked_shl(32 - prefix).unwrap_or(0);
            bits & mask == u32::from(*base) & mask
        })
        .map_or(AddressClass::Public, |(_, _, class)| *class)
}

fn classify_ipv6(ip: Ipv6Addr) -> AddressClass {
    if ip.is_unspecified() {
        return AddressClass::Unspecified;
    }
    if ip.is_loopback() {
        return AddressClass::Loopback;
    }
    if let Some(embedded) = embedded_ipv4(ip) {
        return classify_ipv4(embedded);
    }

    let bits = u128::from(ip);
    let in_range = |base: Ipv6Addr, prefix: u32| {
        let mask = u128::MAX.checked_shl(128 - prefix).unwrap_or(0);
        bits & mask == u128::from(base) & mask
    };
    if let Some((_, _, class)) = IPV6_RANGES
        .iter()
        .find(|(base, prefix, _)| in_range(*base, *prefix))
    {
        return *class;
    }
    if in_range(Ipv6Addr::new(0x2000, 0, 0, 0, 0, 0, 0, 0), 3) {
        AddressClass::Public
    } else {
        AddressClass::Reserved
    }
}

/// Returns the IPv4 address that an IPv4-mapped, IPv4-compatible, NAT64 (64:ff9b::/96) or 6to4
/// address carries. `::` and `::1` carry none.
fn embedded_ipv4(ip: Ipv6Addr) -> Option<Ipv4Addr> {
    let bits = u128::from(ip);
    let low32 = Ipv4Addr::from((bits & 0xffff_ffff) as u32);
    match ip.segments() {
        [0, 0, 0, 0, 0, 0xffff, _, _]
        | [0, 0, 0, 0, 0, 0, _, _]
        | [0x64, 0xff9b, 0, 0, 0, 0, _, _] => Some(low32),
        [0x2002, high, low, ..] => Some(Ipv4Addr::from((u32::from(high) << 16) | u32::from(low))),
        _ => None,
    }
}

/// The allowlist and the address rules, shared by URL checks, the redirect policy and the
/// resolver.
#[derive(Debug)]
struct HostRules {
    patterns: Vec<HostPattern>,
    allow_loopback: bool,
}

#[derive(Debug, PartialEq, Eq)]
enum HostPattern {
    /// A host as the URL parser serializes it: lowercase, IDNA-encoded, IPv6 in brackets.
    Exact(String),
    /// `.example.com` for the entry `*.example.com`.
    Subdomains(String),
}

impl HostRules {
    fn new(entries: &[String], allow_loopback: bool) -> Result<Self, FetchError> {
        if entries.is_empty() {
            return Err(FetchError::InvalidPolicy {
                reason: "allowed_hosts is empty".to_owned(),
            });
        }
        let patterns = entries
            .iter()
            .map(|entry| {
                parse_host_pattern(entry).map_err(|reason| FetchError::InvalidPolicy {
                    reason: format!("invalid entry {entry:?} in allowed_hosts: {reason}"),
                })
            })
            .collect::<Result<_, _>>()?;
        Ok(Self {
            patterns,
            allow_loopback,
        })
    }

    /// Checks the scheme, credentials and host of `url`, and the address of a literal IP host.
    fn check(&self, url: &Url) -> Result<(), UrlRejection> {
        if url.scheme() != "https" {
            return Err(UrlRejection::NotHttps);
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(UrlRejection::Credentials);
        }
        let Some(host) = url.host_str() else {
            return Err(UrlRejection::Invalid("missing host".to_owned()));
        };
        if !self.allows_host(host) {
            return Err(UrlRejection::HostNotAllowed);
        }
        if let Some(ip) = literal_ip(host) {
            self.check_address(ip)
                .map_err(UrlRejection::AddressNotAllowed)?;
        }
        Ok(())
    }

    /// Returns whether `host`, as the URL parser serializes it, is on the allowlist.
    fn allows_host(&self, host: &str) -> bool {
        let is_ip = literal_ip(host).is_some();
        self.patterns.iter().any(|pattern| match pattern {
            HostPattern::Exact(name) => name == host,
            HostPattern::Subdomains(suffix) => {
                !is_ip && host.len() > suffix.len() && host.ends_with(suffix.as_str())
            }
        })
    }

    fn check_address(&self, ip: IpAddr) -> Result<(), AddressClass> {
        match classify_address(ip) {
            AddressClass::Public => Ok(()),
            AddressClass::Loopback if self.allow_loopback => Ok(()),
            class => Err(class),
        }
    }
}

/// Parses one entry of [`FetchPolicy::allowed_hosts`] with the same parser as request URLs, so
/// that both compare in the same normal form.
fn parse_host_pattern(entry: &str) -> Result<HostPattern, &'static str> {
    let entry = entry.trim();
    let (wildcard, name) = match entry.strip_prefix("*.") {
        Some(rest) => (true, rest),
        None => (false, entry),
    };
    if name.is_empty() {
        return Err("empty host");
    }
    if name.contains(['*', '/', '\\', '@', '?', '#']) {
        return Err("expected a host name, an IP address or *.domain");
    }

    let url = Url::parse(&format!("https://{name}/")).map_err(|_| "invalid host")?;
    let Some(host) = url.host_str() else {
        return Err("invalid host");
    };
    if url.port().is_some() || (!name.starts_with('[') && name.contains(':')) {
        return Err("a port is not allowed");
    }
    if host.ends_with('.') {
        return Err("a trailing dot is not allowed");
    }

    let is_ip = literal_ip(host).is_some();
    if !wildcard {
        return Ok(HostPattern::Exact(host.to_owned()));
    }
    if is_ip || !host.contains('.') {
        return Err("a wildcard needs a domain of two or more labels");
    }
    Ok(HostPattern::Subdomains(format!(".{host}")))
}

/// Returns the IP address of a host serialized by the URL parser, or `None` for a domain.
fn literal_ip(host: &str) -> Option<IpAddr> {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<Ipv6Addr>().ok().map(IpAddr::V6);
    }
    host.parse::<Ipv4Addr>().ok().map(IpAddr::V4)
}

fn validate_limits(policy: &FetchPolicy) -> Result<(), FetchError> {
    let invalid = |reason: &str| {
        Err(FetchError::InvalidPolicy {
            reason: reason.to_owned(),
        })
    };
    if policy.max_bytes == 0 {
        return invalid("max_bytes must be above 0");
    }
    if policy.connect_timeout.is_zero() || policy.total_timeout.is_zero() {
        return invalid("connect_timeout and total_timeout must be above 0");
    }
    if policy.max_attempts == 0 {
        return invalid("max_attempts must be 1 or more");
    }
    if policy.initial_backoff > policy.max_backoff {
        return invalid("initial_backoff must not exceed max_backoff");
    }
    Ok(())
}

/// Builds the rustls client configuration: the gateway's AEAD-only *ring* provider, TLS 1.2 and
/// 1.3, Mozilla's root certificates plus the certificates of `extra_ca_file`, ALPN `h2` and
/// `http/1.1`.
fn client_tls_config(extra_ca_file: Option<&Path>) -> Result<ClientConfig, FetchError> {
    let mut roots = RootCertStore {
        roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
    };
    if let Some(path) = extra_ca_file {
        add_ca_file(&mut roots, path)?;
    }

    let mut config = ClientConfig::builder_with_provider(Arc::new(tls::crypto_provider()))
        .with_protocol_versions(tls::PROTOCOL_VERSIONS)
        .map_err(|source| FetchError::TlsConfig { source })?
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = tls::ALPN_PROTOCOLS.iter().map(|id| id.to_vec()).collect();
    Ok(config)
}

fn add_ca_file(roots: &mut RootCertStore, path: &Path) -> Result<(), FetchError> {
    let ca_error = |reason: String| FetchError::CaFile {
        path: path.to_path_buf(),
        reason,
    };
    let pem = std::fs::read(path).map_err(|error| ca_error(error.to_string()))?;

    let mut added = 0;
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|error| ca_error(format!("invalid PEM: {error}")))?;
        roots
            .add(cert)
            .map_err(|error| ca_error(format!("invalid certificate: {error}")))?;
        added += 1;
    }
    if added == 0 {
        return Err(ca_error("no certificate found".to_owned()));
    }
    Ok(())
}

/// Returns `error` with the host names removed that a name mismatch carries.
fn without_names(error: rustls::Error) -> rustls::Error {
    match error {
        rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext { .. }) => {
            rustls::Error::InvalidCertificate(CertificateError::NotValidForName)
        }
        other => other,
    }
}

/// Returns the innermost error of `error`'s source chain, as the most specific description of a
/// transport failure. These come from hyper, h2 and the OS, and none quotes the URL.
fn root_cause(error: &reqwest::Error) -> String {
    let mut current: &(dyn StdError + 'static) = error;
    while let Some(next) = current.source() {
        current = next;
    }
    current.to_string()
}

/// Finds an error of type `T` in the source chain of `error`, looking inside `io::Error`s too,
/// whose `source` skips the error they wrap.
fn find_cause<'a, T: StdError + 'static>(error: &'a (dyn StdError + 'static)) -> Option<&'a T> {
    let mut current = Some(error);
    while let Some(error) = current {
        if let Some(found) = error.downcast_ref::<T>() {
            return Some(found);
        }
        if let Some(inner) = error
            .downcast_ref::<io::Error>()
            .and_then(io::Error::get_ref)
            && let Some(found) = find_cause::<T>(inner)
        {
            return Some(found);
        }
        current = error.source();
    }
    None
}

/// The error that the redirect policy hands to reqwest, found again by [`find_cause`].
#[derive(Clone, Debug)]
enum RedirectFailure {
    TooMany,
    Rejected(UrlRejection),
}

impl fmt::Display for RedirectFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::TooMany => write!(f, "more than {MAX_REDIRECTS} redirects"),
            Self::Rejected(reason) => write!(f, "redirect rejected: {reason}"),
        }
    }
}

impl StdError for RedirectFailure {}

/// Future of a [`HostLookup`].
type LookupFuture = Pin<Box<dyn Future<Output = io::Result<Vec<IpAddr>>> + Send>>;

/// Name resolution before the policy check, replaceable in tests.
trait HostLookup: Send + Sync + 'static {
    fn lookup(&self, host: String) -> LookupFuture;
}

/// The operating system's resolver (`getaddrinfo`, on Tokio's blocking pool).
struct SystemLookup;

impl HostLookup for SystemLookup {
    fn lookup(&self, host: String) -> LookupFuture {
        Box::pin(async move {
            let addrs = tokio::net::lookup_host((host.as_str(), 0)).await?;
            Ok(addrs.map(|addr| addr.ip()).collect())
        })
    }
}

/// The resolver reqwest connects through. It rejects a host off the allowlist, and a host with
/// any disallowed address, and otherwise returns every address it checked.
struct PolicyResolver {
    rules: Arc<HostRules>,
    lookup: Arc<dyn HostLookup>,
}

impl Resolve for PolicyResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let rules = Arc::clone(&self.rules);
        let lookup = Arc::clone(&self.lookup);
        let host = name.as_str().to_ascii_lowercase();
        Box::pin(async move {
            let addrs = resolve_checked(&rules, lookup.as_ref(), host).await?;
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

/// Resolves `host` and checks every address. The port of each address is 0, which the connector
/// replaces by the port of the URL.
async fn resolve_checked(
    rules: &HostRules,
    lookup: &dyn HostLookup,
    host: String,
) -> Result<Vec<SocketAddr>, ResolveFailure> {
    if !rules.allows_host(&host) {
        return Err(ResolveFailure::HostNotAllowed);
    }
    let ips = lookup
        .lookup(host)
        .await
        .map_err(|error| ResolveFailure::Lookup(error.to_string()))?;
    if ips.is_empty() {
        return Err(ResolveFailure::NoAddresses);
    }
    for ip in &ips {
        rules
            .check_address(*ip)
            .map_err(ResolveFailure::AddressNotAllowed)?;
    }
    Ok(ips.into_iter().map(|ip| SocketAddr::new(ip, 0)).collect())
}

/// The error that [`PolicyResolver`] hands to reqwest, found again by [`find_cause`].
#[derive(Debug, PartialEq, Eq)]
enum ResolveFailure {
    Lookup(String),
    NoAddresses,
    HostNotAllowed,
    AddressNotAllowed(AddressClass),
}

impl ResolveFailure {
    fn to_fetch_error(&self) -> FetchError {
        match self {
            Self::Lookup(reason) => FetchError::Resolve {
                reason: reason.clone(),
            },
            Self::NoAddresses => FetchError::NoAddresses,
            Self::HostNotAllowed => FetchError::Rejected {
                reason: UrlRejection::HostNotAllowed,
            },
            Self::AddressNotAllowed(class) => FetchError::Rejected {
                reason: UrlRejection::AddressNotAllowed(*class),
            },
        }
    }
}

impl fmt::Display for ResolveFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Lookup(reason) => write!(f, "lookup failed: {reason}"),
            Self::NoAddresses => f.write_str("no address"),
            Self::HostNotAllowed => f.write_str("host is not on the allowlist"),
            Self::AddressNotAllowed(class) => write!(f, "address is {class}, not public"),
        }
    }
}

impl StdError for ResolveFailure {}

/// Returns the upper bound of the delay before attempt `attempt + 1`:
/// `min(max, initial × 2^(attempt − 1))`.
pub(crate) fn backoff_cap(attempt: u32, initial: Duration, max: Duration) -> Duration {
    let factor = 2u32.saturating_pow(attempt.saturating_sub(1));
    initial.saturating_mul(factor).min(max)
}

/// Maps a uniformly random `random` to a delay between zero and `cap`, both included (full
/// jitter).
pub(crate) fn jittered(cap: Duration, random: u64) -> Duration {
    let cap_nanos = u64::try_from(cap.as_nanos()).unwrap_or(u64::MAX);
    let nanos = match cap_nanos.checked_add(1) {
        Some(range) => random % range,
        None => random,
    };
    Duration::from_nanos(nanos)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::convert::Infallible;
    use std::sync::Mutex;

    use super::*;

    #[test]
    fn classify_address_table() {
        use AddressClass::*;
        let cases: &[(&str, AddressClass)] = &[
            // IPv4 special-purpose ranges, with their first and last addresses.
            ("0.0.0.0", Unspecified),
            ("0.1.2.3", Reserved),
            ("0.255.255.255", Reserved),
            ("10.0.0.0", Private),
            ("10.255.255.255", Private),
            ("100.64.0.0", SharedAddressSpace),
            ("100.127.255.255", SharedAddressSpace),
            ("127.0.0.1", Loopback),
            ("127.255.255.254", Loopback),
            ("169.254.0.0", LinkLocal),
            ("169.254.169.254", LinkLocal),
            ("169.254.255.255", LinkLocal),
            ("172.16.0.0", Private),
            ("172.31.255.255", Private),
            ("192.0.0.1", Reserved),
            ("192.0.2.0", Documentation),
            ("192.0.2.255", Documentation),
            ("192.88.99.1", Reserved),
            ("192.168.0.0", Private),
            ("192.168.255.255", Private),
            ("198.18.0.0", Reserved),
            ("198.19.255.255", Reserved),
            ("198.51.100.7", Documentation),
            ("203.0.113.200", Documentation),
            ("224.0.0.1", Multicast),
            ("239.255.255.255", Multicast),
            ("240.0.0.1", Reserved),
            ("255.255.255.254", Reserved),
            ("255.255.255.255", Broadcast),
            // Public IPv4, including the neighbors of special-purpose ranges.
            ("1.1.1.1", Public),
            ("8.8.8.8", Public),
            ("9.255.255.255", Public),
            ("11.0.0.0", Public),
            ("100.63.255.255", Public),
            ("100.128.0.0", Public),
            ("126.255.255.255", Public),
            ("128.0.0.0", Public),
            ("169.253.255.255", Public),
            ("169.255.0.0", Public),
            ("172.15.255.255", Public),
            ("172.32.0.0", Public),
            ("192.0.3.0", Public),
            ("192.167.255.255", Public),
            ("192.169.0.0", Public),
            ("198.17.255.255", Public),
            ("198.20.0.0", Public),
            ("223.255.255.255", Public),
            // IPv6 special-purpose ranges.
            ("::", Unspecified),
            ("::1", Loopback),
            ("fe80::1", LinkLocal),
            ("febf:ffff::1", LinkLocal),
            ("fec0::1", Reserved),
            ("fc00::1", UniqueLocal),
            ("fd12:3456::1", UniqueLocal),
            ("ff02::1", Multicast),
            ("ff0e::1", Multicast),
            ("2001:db8::1", Documentation),
            ("3fff::1", Documentation),
            ("3fff:fff::1", Documentation),
            ("100::1", Reserved),
            ("2001::1", Reserved),
            ("2001:1ff::1", Reserved),
            ("64:ff9b:1::1", Reserved),
            ("4000::1", Reserved),
            ("::2:0:0:1", Reserved),
            // IPv6 addresses that embed an IPv4 address take the class of that address.
            ("::ffff:10.0.0.1", Private),
            ("::ffff:127.0.0.1", Loopback),
            ("::ffff:169.254.169.254", LinkLocal),
            ("::ffff:0.0.0.0", Unspecified),
            ("::ffff:8.8.8.8", Public),
            ("::10.0.0.1", Private),
            ("::127.0.0.1", Loopback),
            ("::8.8.8.8", Public),
            ("::2", Reserved),
            ("64:ff9b::10.0.0.1", Private),
            ("64:ff9b::169.254.169.254", LinkLocal),
            ("64:ff9b::8.8.8.8", Public),
            ("2002:a00:1::", Private),
            ("2002:7f00:1::1", Loopback),
            ("2002:808:808::1", Public),
            // Public IPv6.
            ("2001:200::1", Public),
            ("2001:4860:4860::8888", Public),
            ("2606:4700:4700::1111", Public),
            ("2a00:1450:4001::1", Public),
            ("3ffe::1", Public),
        ];
        for (address, expected) in cases {
            let ip: IpAddr = address.parse().expect("test addresses parse");
            assert_eq!(classify_address(ip), *expected, "class of {address}");
        }
    }

    #[test]
    fn address_class_names_are_lowercase() {
        for class in [
            AddressClass::Public,
            AddressClass::SharedAddressSpace,
            AddressClass::LinkLocal,
            AddressClass::UniqueLocal,
        ] {
            let name = class.to_string();
            assert_eq!(name, name.to_lowercase());
        }
    }

    fn policy(hosts: &[&str]) -> FetchPolicy {
        FetchPolicy::new(hosts.iter().copied())
    }

    #[test]
    fn check_url_table() {
        let fetcher = Fetcher::new(policy(&[
            "media.example.com",
            "*.cdn.example.net",
            "Bücher.example.org",
            "10.1.2.3",
            "127.0.0.1",
            "192.0.2.10",
            "[::1]",
            "[::ffff:a00:1]",
        ]))
        .expect("valid policy");
        let rejected = |reason| Err(FetchError::Rejected { reason });
        let address = |class| rejected(UrlRejection::AddressNotAllowed(class));
        let cases: Vec<(&str, Result<(), FetchError>)> = vec![
            ("https://media.example.com/rec.wav?sig=abc", Ok(())),
            ("HTTPS://MEDIA.EXAMPLE.COM/rec.wav", Ok(())),
            ("https://media.example.com:8443/rec.wav", Ok(())),
            ("https://a.cdn.example.net/rec.wav", Ok(())),
            ("https://a.b.cdn.example.net/rec.wav", Ok(())),
            ("https://BÜCHER.example.org/rec.wav", Ok(())),
            (
                "http://media.example.com/rec.wav",
                rejected(UrlRejection::NotHttps),
            ),
            (
                "ftp://media.example.com/rec.wav",
                rejected(UrlRejection::NotHttps),
            ),
            ("file:///etc/passwd", rejected(UrlRejection::NotHttps)),
            ("wss://media.example.com/", rejected(UrlRejection::NotHttps)),
            (
                "https://user:pw@media.example.com/",
                rejected(UrlRejection::Credentials),
            ),
            (
                "https://user@media.example.com/",
                rejected(UrlRejection::Credentials),
            ),
            (
                "https://other.example.com/",
                rejected(UrlRejection::HostNotAllowed),
            ),
            (
                "https://evilmedia.example.com/",
                rejected(UrlRejection::HostNotAllowed),
            ),
            (
                "https://media.example.com.evil.test/",
                rejected(UrlRejection::HostNotAllowed),
            ),
            (
                "https://media.example.com./",
                rejected(UrlRejection::HostNotAllowed),
            ),
            (
                "https://cdn.example.net/",
                rejected(UrlRejection::HostNotAllowed),
            ),
            (
                "https://xcdn.example.net/",
                rejected(UrlRejection::HostNotAllowed),
            ),
            ("https://10.0.0.9/", rejected(UrlRejection::HostNotAllowed)),
            ("https://10.1.2.3/", address(AddressClass::Private)),
            ("https://192.0.2.10/", address(AddressClass::Documentation)),
            ("https://127.0.0.1/", address(AddressClass::Loopback)),
            ("https://2130706433/", address(AddressClass::Loopback)),
            ("https://0x7f.0.0.1/", address(AddressClass::Loopback)),
            ("https://127.1/", address(AddressClass::Loopback)),
            ("https://[::1]/", address(AddressClass::Loopback)),
            ("https://[::ffff:10.0.0.1]/", address(AddressClass::Private)),
        ];
        for (url, expected) in cases {
            let result = fetcher.check_url(url).map(|_| ());
            assert_eq!(
                format!("{result:?}"),
                format!("{expected:?}"),
                "check_url({url})"
            );
        }

        let invalid = fetcher.check_url("not a url");
        assert!(
            matches!(
                invalid,
                Err(FetchError::Rejected {
                    reason: UrlRejection::Invalid(_)
                })
            ),
            "{invalid:?}"
        );
    }

    #[test]
    fn check_url_allows_loopback_for_tests() {
        let mut policy = policy(&["127.0.0.1", "[::1]", "localhost"]);
        policy.allow_loopback_for_tests = true;
        let fetcher = Fetcher::new(policy).expect("valid policy");

        for url in [
            "https://127.0.0.1:8443/x",
            "https://[::1]:8443/x",
            "https://localhost/x",
        ] {
            assert!(fetcher.check_url(url).is_ok(), "{url}");
        }
        let private = fetcher.check_url("https://[::ffff:10.0.0.1]/");
        assert!(private.is_err(), "only loopback is allowed for tests");
    }

    #[test]
    fn policy_rejects_bad_host_entries() {
        let entries = [
            "",
            "  ",
            "*.",
            "*.com",
            "*.192.0.2.1",
            "*.*.example.com",
            "media.*.example.com",
            "example.com/path",
            "example.com:8443",
            "example.com:443",
            "user@example.com",
            "example.com?x",
            "example.com.",
            "exa mple.com",
        ];
        for entry in entries {
            let result = Fetcher::new(policy(&["ok.example.com", entry]));
            assert!(
                matches!(result, Err(FetchError::InvalidPolicy { .. })),
                "entry {entry:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn policy_rejects_bad_limits() {
        let mut cases = Vec::new();
        cases.push(policy(&[]));
        let mut p = policy(&["a.example.com"]);
        p.max_bytes = 0;
        cases.push(p);
        let mut p = policy(&["a.example.com"]);
        p.max_attempts = 0;
        cases.push(p);
        let mut p = policy(&["a.example.com"]);
        p.total_timeout = Duration::ZERO;
        cases.push(p);
        let mut p = policy(&["a.example.com"]);
        p.connect_timeout = Duration::ZERO;
        cases.push(p);
        let mut p = policy(&["a.example.com"]);
        p.initial_backoff = Duration::from_secs(2);
        p.max_backoff = Duration::from_secs(1);
        cases.push(p);

        for case in cases {
            let result = Fetcher::new(case.clone());
            assert!(
                matches!(result, Err(FetchError::InvalidPolicy { .. })),
                "{case:?} gave {result:?}"
            );
        }
    }

    #[test]
    fn policy_rejects_missing_ca_file() {
        let mut policy = policy(&["a.example.com"]);
        policy.extra_ca_file = Some(PathBuf::from("/nonexistent/ca.pem"));
        let result = Fetcher::new(policy);
        assert!(
            matches!(result, Err(FetchError::CaFile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn policy_rejects_ca_file_without_certificates() {
        let file = tempfile::NamedTempFile::new().expect("temporary file");
        std::fs::write(file.path(), "not a certificate\n").expect("write");
        let mut policy = policy(&["a.example.com"]);
        policy.extra_ca_file = Some(file.path().to_path_buf());
        let result = Fetcher::new(policy);
        assert!(
            matches!(result, Err(FetchError::CaFile { .. })),
            "{result:?}"
        );
    }

    #[test]
    fn backoff_cap_doubles_up_to_max() {
        let initial = Duration::from_millis(100);
        let max = Duration::from_millis(1000);
        let caps: Vec<u64> = (1..=6)
            .map(|attempt| backoff_cap(attempt, initial, max).as_millis() as u64)
            .collect();
        assert_eq!(caps, [100, 200, 400, 800, 1000, 1000]);
        assert_eq!(backoff_cap(u32::MAX, initial, max), max);
    }

    #[test]
    fn jittered_stays_within_cap() {
        let cap = Duration::from_millis(400);
        let cap_nanos = cap.as_nanos() as u64;
        assert_eq!(jittered(cap, 0), Duration::ZERO);
        assert_eq!(jittered(cap, cap_nanos), cap);
        assert_eq!(jittered(cap, cap_nanos + 1), Duration::ZERO);
        assert!(jittered(cap, u64::MAX) <= cap);
        assert_eq!(jittered(Duration::ZERO, u64::MAX), Duration::ZERO);
        assert_eq!(jittered(Duration::MAX, 7), Duration::from_nanos(7));
    }

    #[test]
    fn is_retryable_by_status() {
        for (status, retryable) in [
            (500, true),
            (502, true),
            (503, true),
            (599, true),
            (429, true),
            (400, false),
            (401, false),
            (403, false),
            (404, false),
            (410, false),
            (302, false),
        ] {
            let error = FetchError::Status { status };
            assert_eq!(error.is_retryable(), retryable, "status {status}");
        }
        assert!(!FetchError::TooLarge { max_bytes: 1 }.is_retryable());
        assert!(
            !FetchError::Rejected {
                reason: UrlRejection::HostNotAllowed
            }
            .is_retryable()
        );
        assert!(
            FetchError::Timeout {
                after: Duration::from_secs(1)
            }
            .is_retryable()
        );
    }

    /// Returns fixed addresses for each name, and records the names it looked up.
    #[derive(Default)]
    struct StubLookup {
        answers: HashMap<String, Vec<IpAddr>>,
        looked_up: Mutex<Vec<String>>,
    }

    impl StubLookup {
        fn with(host: &str, addresses: &[&str]) -> Self {
            let ips = addresses
                .iter()
                .map(|address| address.parse().expect("test addresses parse"))
                .collect();
            Self {
                answers: HashMap::from([(host.to_owned(), ips)]),
                looked_up: Mutex::default(),
            }
        }

        fn looked_up(&self) -> Vec<String> {
            self.looked_up.lock().expect("lock").clone()
        }
    }

    impl HostLookup for StubLookup {
        fn lookup(&self, host: String) -> LookupFuture {
            self.looked_up.lock().expect("lock").push(host.clone());
            let answer = self.answers.get(&host).cloned().ok_or_else(|| {
                io::Error::new(io::ErrorKind::NotFound, "name not known to the stub")
            });
            Box::pin(async move { answer })
        }
    }

    fn rules(hosts: &[&str], allow_loopback: bool) -> HostRules {
        let hosts: Vec<String> = hosts.iter().map(|host| (*host).to_owned()).collect();
        HostRules::new(&hosts, allow_loopback).expect("valid hosts")
    }

    #[tokio::test]
    async fn resolver_rejects_any_disallowed_address() {
        let rules = rules(&["media.test"], false);
        let cases: &[(&[&str], ResolveFailure)] = &[
            (
                &["10.0.0.1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Private),
            ),
            (
                &["8.8.8.8", "192.168.1.1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Private),
            ),
            (
                &["2606:4700:4700::1111", "fe80::1"],
                ResolveFailure::AddressNotAllowed(AddressClass::LinkLocal),
            ),
            (
                &["169.254.169.254"],
                ResolveFailure::AddressNotAllowed(AddressClass::LinkLocal),
            ),
            (
                &["100.100.100.200"],
                ResolveFailure::AddressNotAllowed(AddressClass::SharedAddressSpace),
            ),
            (
                &["::ffff:10.0.0.1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Private),
            ),
            (
                &["64:ff9b::7f00:1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Loopback),
            ),
            (
                &["127.0.0.1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Loopback),
            ),
            (
                &["::1"],
                ResolveFailure::AddressNotAllowed(AddressClass::Loopback),
            ),
            (
                &["0.0.0.0"],
                ResolveFailure::AddressNotAllowed(AddressClass::Unspecified),
            ),
            (
                &["fd00::1"],
                ResolveFailure::AddressNotAllowed(AddressClass::UniqueLocal),
            ),
            (&[], ResolveFailure::NoAddresses),
        ];
        for (addresses, expected) in cases {
            let lookup = StubLookup::with("media.test", addresses);
            let result = resolve_checked(&rules, &lookup, "media.test".to_owned()).await;
            assert_eq!(result.as_ref().err(), Some(expected), "{addresses:?}");
        }
    }

    #[tokio::test]
    async fn resolver_returns_exactly_the_checked_addresses() {
        let rules = rules(&["media.test"], false);
        let lookup = StubLookup::with("media.test", &["8.8.8.8", "2606:4700:4700::1111"]);

        let resolver = PolicyResolver {
            rules: Arc::new(rules),
            lookup: Arc::new(lookup),
        };
        let name: Name = "media.test".parse().expect("valid name");
        let addrs: Vec<SocketAddr> = resolver.resolve(name).await.expect("public").collect();

        let expected: Vec<SocketAddr> = vec![
            "8.8.8.8:0".parse().expect("address"),
            "[2606:4700:4700::1111]:0".parse().expect("address"),
        ];
        assert_eq!(addrs, expected);
    }

    #[tokio::test]
    async fn resolver_allows_loopback_only_for_tests() {
        let lookup = StubLookup::with("localhost", &["127.0.0.1", "::1"]);
        let for_tests = rules(&["localhost"], true);
        let production = rules(&["localhost"], false);

        let allowed = resolve_checked(&for_tests, &lookup, "localhost".into()).await;
        assert_eq!(allowed.map(|addrs| addrs.len()), Ok(2));

        let rejected = resolve_checked(&production, &lookup, "localhost".into()).await;
        assert_eq!(
            rejected,
            Err(ResolveFailure::AddressNotAllowed(AddressClass::Loopback))
        );
    }

    #[tokio::test]
    async fn resolver_rejects_host_off_allowlist_without_lookup() {
        let lookup = StubLookup::with("other.test", &["8.8.8.8"]);
        let result =
            resolve_checked(&rules(&["media.test"], false), &lookup, "other.test".into()).await;
        assert_eq!(result, Err(ResolveFailure::HostNotAllowed));
        assert!(lookup.looked_up().is_empty());
    }

    #[tokio::test]
    async fn resolver_reports_lookup_failure() {
        let lookup = StubLookup::default();
        let result =
            resolve_checked(&rules(&["media.test"], false), &lookup, "media.test".into()).await;
        assert!(
            matches!(result, Err(ResolveFailure::Lookup(_))),
            "{result:?}"
        );
    }

    struct VecSink(Vec<u8>);

    impl ChunkSink for VecSink {
        type Error = Infallible;

        async fn write_chunk(&mut self, chunk: Bytes) -> Result<(), Infallible> {
            self.0.extend_from_slice(&chunk);
            Ok(())
        }
    }

    /// Runs a download through a fetcher whose resolver gets its addresses from `lookup`. Every
    /// address used here is rejected before any connection.
    async fn fetch_with_stub(
        lookup: StubLookup,
        url: &str,
    ) -> (Result<u64, FetchError>, Vec<String>) {
        let lookup = Arc::new(lookup);
        let fetcher = Fetcher::with_lookup(
            policy(&["media.test"]),
            Arc::clone(&lookup) as Arc<dyn HostLookup>,
        )
        .expect("valid policy");
        let mut sink = VecSink(Vec::new());
        let result = fetcher.fetch_once(url, &mut sink).await;
        assert!(sink.0.is_empty());
        (result, lookup.looked_up())
    }

    #[tokio::test]
    async fn fetcher_connects_through_policy_resolver() {
        let cases: &[(&[&str], AddressClass)] = &[
            (&["10.0.0.1"], AddressClass::Private),
            (&["169.254.169.254"], AddressClass::LinkLocal),
            (&["127.0.0.1"], AddressClass::Loopback),
            (&["::ffff:192.168.0.1"], AddressClass::Private),
            (&["fd00::1"], AddressClass::UniqueLocal),
        ];
        for (addresses, class) in cases {
            let lookup = StubLookup::with("media.test", addresses);
            let (result, looked_up) =
                fetch_with_stub(lookup, "https://media.test/rec.wav?t=1").await;
            assert_eq!(looked_up, ["media.test"], "{addresses:?}");
            let expected = UrlRejection::AddressNotAllowed(*class);
            assert!(
                matches!(&result, Err(FetchError::Rejected { reason }) if *reason == expected),
                "{addresses:?} gave {result:?}"
            );
        }
    }

    #[tokio::test]
    async fn fetcher_reports_lookup_failure_as_retryable() {
        let (result, looked_up) =
            fetch_with_stub(StubLookup::default(), "https://media.test/x").await;
        assert_eq!(looked_up, ["media.test"]);
        let error = result.expect_err("the stub knows no name");
        assert!(matches!(error, FetchError::Resolve { .. }), "{error:?}");
        assert!(error.is_retryable());
    }

    #[test]
    fn tls_error_drops_names() {
        let error = rustls::Error::InvalidCertificate(CertificateError::NotValidForNameContext {
            expected: rustls::pki_types::ServerName::try_from("secret-host.example")
                .expect("valid name"),
            presented: vec!["other.example".to_owned()],
        });
        let cleaned = FetchError::Tls {
            source: without_names(error),
        };
        assert!(!format!("{cleaned} {cleaned:?}").contains("secret-host"));
    }
}
