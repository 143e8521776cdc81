//! Retell's webhook signature: `x-retell-signature: v=<unix ms>,d=<64 hex digits>`, where the
//! digest is HMAC-SHA256 keyed with the Retell API key over the raw body bytes followed by the
//! decimal timestamp.
//!
//! The header is checked (format, 5-minute window) before the body is read. The body is then fed
//! through one HMAC per configured key as it arrives, so several keys can be valid at once during
//! a key rotation. The digests are compared in constant time and every key is always tried.

use std::fmt;

use hmac::{KeyInit, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;
use zeroize::Zeroizing;

/// How far a signature's timestamp may be from the gateway's clock, either way.
pub const WINDOW_MS: u64 = 300_000;

type HmacSha256 = hmac::Hmac<Sha256>;

/// A Retell API key, which signs webhooks. Secret: never printed or logged.
#[derive(Clone)]
pub struct RetellKey(Zeroizing<String>);

impl RetellKey {
    pub fn new(key: String) -> Self {
        RetellKey(Zeroizing::new(key))
    }

    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for RetellKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("RetellKey([REDACTED])")
    }
}

impl PartialEq for RetellKey {
    fn eq(&self, other: &Self) -> bool {
        bool::from(self.0.as_bytes().ct_eq(other.0.as_bytes()))
    }
}

/// A parsed `x-retell-signature` header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Signature {
    pub timestamp_ms: u64,
    digest: [u8; 32],
}

/// Why a signature was rejected. Every variant maps to 401; none carries header bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("missing x-retell-signature header")]
    Missing,
    #[error("malformed x-retell-signature header: expected v=<unix ms>,d=<64 hex digits>")]
    Malformed,
    #[error("x-retell-signature timestamp is more than 5 minutes from the gateway's clock")]
    OutsideWindow,
    #[error("x-retell-signature does not match the body under any of the practice's keys")]
    Mismatch,
}

impl Signature {
    /// Parses a header value of the exact form `v=<digits>,d=<64 hex digits>`; hex may be
    /// uppercase.
    pub fn parse(value: Option<&[u8]>) -> Result<Signature, SignatureError> {
        let value = value.ok_or(SignatureError::Missing)?;
        let text = std::str::from_utf8(value).map_err(|_| SignatureError::Malformed)?;
        let (version, digest) = text.split_once(',').ok_or(SignatureError::Malformed)?;
        let timestamp = version
            .strip_prefix("v=")
            .ok_or(SignatureError::Malformed)?;
        let digest = digest.strip_prefix("d=").ok_or(SignatureError::Malformed)?;

        if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
            return Err(SignatureError::Malformed);
        }
        let timestamp_ms = timestamp.parse().map_err(|_| SignatureError::Malformed)?;
        if digest.len() != 64 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(SignatureError::Malformed);
        }
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(digest, &mut bytes).map_err(|_| SignatureError::Malformed)?;
        Ok(Signature {
            timestamp_ms,
            digest: bytes,
        })
    }

    /// Checks the timestamp against `now_ms`: at most [`WINDOW_MS`] away, inclusive.
    pub fn check_window(&self, now_ms: u64) -> Result<(), SignatureError> {
        if self.timestamp_ms.abs_diff(now_ms) <= WINDOW_MS {
            Ok(())
        } else {
            Err(SignatureError::OutsideWindow)
        }
    }
}

/// The running HMACs of one body, one per configured key.
pub struct BodyVerifier {
    macs: Vec<HmacSha256>,
}

impl BodyVerifier {
    pub fn new(keys: &[RetellKey]) -> Self {
        let macs = keys
            .iter()
            .map(|key| {
                HmacSha256::new_from_slice(key.expose().as_bytes())
                    .expect("HMAC accepts keys of any length")
            })
            .collect();
        BodyVerifier { macs }
    }

    pub fn update(&mut self, chunk: &[u8]) {
        for mac in &mut self.macs {
            mac.update(chunk);
        }
    }

    /// Appends the timestamp and compares every key's digest with the header's, in constant
    /// time; true if any matches.
    pub fn verify(self, signature: &Signature) -> Result<(), SignatureError> {
        let timestamp = signature.timestamp_ms.to_string();
        let mut matched = subtle::Choice::from(0);
        for mut mac in self.macs {
            mac.update(timestamp.as_bytes());
            let digest = mac.finalize().into_bytes();
            matched |= digest.as_slice().ct_eq(&signature.digest);
        }
        if bool::from(matched) {
            Ok(())
        } else {
            Err(SignatureError::Mismatch)
        }
    }
}

/// Signs `body` the way Retell does: for tests, and for the signature callseal puts on the
/// copies it forwards downstream.
pub fn sign(key: &[u8], body: &[u8], timestamp_ms: u64) -> String {
    let mut mac = HmacSha256::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(body);
    mac.update(timestamp_ms.to_string().as_bytes());
    format!(
        "v={timestamp_ms},d={}",
        hex::encode(mac.finalize().into_bytes())
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const KEY: &str = "key_test_not_a_real_key";
    const TIMESTAMP: u64 = 1_767_225_601_234;
    const STARTED: &str = r#"{"event":"call_started","call":{"call_id":"call_00000000000000000000000001","agent_id":"agent_000000000000000000000001","call_type":"phone_call","direction":"inbound","from_number":"+15550100001","to_number":"+15550100002","call_status":"ongoing","start_timestamp":1767225600000}}"#;
    const STARTED_DIGEST: &str = "18f12fade364e59948e93f72a9b667615dc228ffc7f4231bd0459441bc283f2b";
    const ENDED: &str = "{\"event\":\"call_ended\",\"call\":{\"call_id\":\"call_00000000000000000000000001\",\"transcript\":\"User: Me llamo Jos\u{e9} P\u{e9}rez.\"}}";
    const ENDED_DIGEST: &str = "85acb1913606bcbe741f8b353c812800cfd8285812c455aaa08424ce4e22b56e";

    fn verify(keys: &[&str], body: &[u8], header: &str) -> Result<(), SignatureError> {
        let signature = Signature::parse(Some(header.as_bytes()))?;
        let keys: Vec<_> = keys
            .iter()
            .map(|key| RetellKey::new((*key).to_owned()))
            .collect();
        let mut verifier = BodyVerifier::new(&keys);
        for chunk in body.chunks(7) {
            verifier.update(chunk);
        }
        verifier.verify(&signature)
    }

    #[test]
    fn known_vectors_verify() {
        for (body, digest) in [(STARTED, STARTED_DIGEST), (ENDED, ENDED_DIGEST)] {
            let header = format!("v={TIMESTAMP},d={digest}");
            assert_eq!(verify(&[KEY], body.as_bytes(), &header), Ok(()));
            assert_eq!(sign(KEY.as_bytes(), body.as_bytes(), TIMESTAMP), header);
        }
    }

    #[test]
    fn reserialized_body_fails() {
        let escaped = ENDED.replace('\u{e9}', "\\u00e9");
        let header = format!("v={TIMESTAMP},d={ENDED_DIGEST}");
        assert_eq!(
            verify(&[KEY], escaped.as_bytes(), &header),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn uppercase_hex_accepted() {
        let header = format!("v={TIMESTAMP},d={}", STARTED_DIGEST.to_uppercase());
        assert_eq!(verify(&[KEY], STARTED.as_bytes(), &header), Ok(()));
    }

    #[test]
    fn either_of_two_keys_verifies() {
        let header = format!("v={TIMESTAMP},d={STARTED_DIGEST}");
        assert_eq!(verify(&["other", KEY], STARTED.as_bytes(), &header), Ok(()));
        assert_eq!(verify(&[KEY, "other"], STARTED.as_bytes(), &header), Ok(()));
        assert_eq!(
            verify(&["other"], STARTED.as_bytes(), &header),
            Err(SignatureError::Mismatch)
        );
        assert_eq!(
            verify(&[], STARTED.as_bytes(), &header),
            Err(SignatureError::Mismatch)
        );
    }

    #[test]
    fn window_edges() {
        let signature =
            Signature::parse(Some(format!("v={TIMESTAMP},d={STARTED_DIGEST}").as_bytes())).unwrap();
        assert_eq!(signature.check_window(TIMESTAMP + 300_000), Ok(()));
        assert_eq!(
            signature.check_window(TIMESTAMP + 300_001),
            Err(SignatureError::OutsideWindow)
        );
        assert_eq!(signature.check_window(TIMESTAMP - 300_000), Ok(()));
        assert_eq!(
            signature.check_window(TIMESTAMP - 300_001),
            Err(SignatureError::OutsideWindow)
        );
    }

    #[test]
    fn malformed_headers_rejected() {
        let digest = STARTED_DIGEST;
        let cases = [
            format!("v={TIMESTAMP},d={digest},x=1"),
            format!("v={TIMESTAMP},d={digest} "),
            format!(" v={TIMESTAMP},d={digest}"),
            format!("v=12a4,d={digest}"),
            format!("v=,d={digest}"),
            format!("v={TIMESTAMP},d={}", &digest[..63]),
            format!("v={TIMESTAMP},d={digest}0"),
            format!("v={TIMESTAMP},d={}g", &digest[..63]),
            format!("d={digest},v={TIMESTAMP}"),
            format!("v=-{TIMESTAMP},d={digest}"),
            format!("v=99999999999999999999999,d={digest}"),
            format!("t={TIMESTAMP},d={digest}"),
            String::new(),
        ];
        for case in &cases {
            assert_eq!(
                Signature::parse(Some(case.as_bytes())),
                Err(SignatureError::Malformed),
                "{case:?}"
            );
        }
        assert_eq!(Signature::parse(None), Err(SignatureError::Missing));
        assert_eq!(
            Signature::parse(Some(&[0xff])),
            Err(SignatureError::Malformed)
        );
    }

    #[test]
    fn key_debug_redacted() {
        let text = format!("{:?}", RetellKey::new(KEY.to_owned()));
        assert!(!text.contains("key_test"), "{text}");
    }
}
