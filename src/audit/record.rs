//! Audit records: the typed fields of one access to call data and their JSON line form.
//!
//! Every field is a validated id, an enum, a number, a socket address or a [`Reason`] built from
//! a `&'static str`. There is no `String` field that request data could fill, which is how the
//! audit log keeps PHI and secrets out.

use std::borrow::Cow;
use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;

use crate::ids::{ArtifactName, CallId, InvalidId, PracticeId, validate};

macro_rules! audit_id {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Debug)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` against the id grammar of [`crate::ids`] and wraps it.
            pub fn new(value: impl Into<String>) -> Result<Self, InvalidId> {
                let value = value.into();
                validate($kind, &value)?;
                Ok(Self(value))
            }

            pub fn as_str(&self) -> &str {
                &self.0
            }
        }

        impl FromStr for $name {
            type Err = InvalidId;

            fn from_str(value: &str) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }

        impl<'de> Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }
    };
}

audit_id!(
    /// The configured name of the principal that made a request, such as a token's `name`.
    PrincipalName,
    "principal name"
);
audit_id!(
    /// The id the gateway gave a request (returned as `x-request-id` and logged).
    RequestId,
    "request id"
);

/// The role a principal acted in.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Ingest,
    Reader,
    Admin,
    Auditor,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Ingest => "ingest",
            Role::Reader => "reader",
            Role::Admin => "admin",
            Role::Auditor => "auditor",
        }
    }
}

/// The operation a request performed on call data or on the audit log.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum Action {
    #[serde(rename = "object.get")]
    ObjectGet,
    #[serde(rename = "object.head")]
    ObjectHead,
    #[serde(rename = "object.put")]
    ObjectPut,
    #[serde(rename = "object.delete")]
    ObjectDelete,
    #[serde(rename = "call.list")]
    CallList,
    #[serde(rename = "webhook.receive")]
    WebhookReceive,
    #[serde(rename = "audit.query")]
    AuditQuery,
}

impl Action {
    pub fn as_str(self) -> &'static str {
        match self {
            Action::ObjectGet => "object.get",
            Action::ObjectHead => "object.head",
            Action::ObjectPut => "object.put",
            Action::ObjectDelete => "object.delete",
            Action::CallList => "call.list",
            Action::WebhookReceive => "webhook.receive",
            Action::AuditQuery => "audit.query",
        }
    }
}

/// The TLS protocol version of the connection a request came on.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
pub enum TlsVersion {
    #[serde(rename = "TLSv1.2")]
    Tls12,
    #[serde(rename = "TLSv1.3")]
    Tls13,
}

impl TlsVersion {
    /// Maps a negotiated rustls version; `None` for versions the gateway never negotiates.
    pub fn from_rustls(version: rustls::ProtocolVersion) -> Option<Self> {
        match version {
            rustls::ProtocolVersion::TLSv1_2 => Some(TlsVersion::Tls12),
            rustls::ProtocolVersion::TLSv1_3 => Some(TlsVersion::Tls13),
            _ => None,
        }
    }
}

/// Whether a record is the authorization decision of a request or its completion.
#[derive(Clone, Copy, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Authorization,
    Completion,
}

/// A short, fixed reason for a denial or an error, such as `forbidden` or `storage_unavailable`.
///
/// Only a `&'static str` chosen by the code can become a reason. It must follow the id grammar of
/// [`crate::ids`]; [`crate::audit::AuditLog::append`] rejects one that does not.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Reason(Cow<'static, str>);

impl Reason {
    pub const fn new(reason: &'static str) -> Self {
        Reason(Cow::Borrowed(reason))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    fn validate(&self) -> Result<(), InvalidId> {
        validate("reason", &self.0)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Serialize for Reason {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.0)
    }
}

impl<'de> Deserialize<'de> for Reason {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let reason = Reason(Cow::Owned(String::deserialize(deserializer)?));
        reason.validate().map_err(serde::de::Error::custom)?;
        Ok(reason)
    }
}

/// The result of an authorization decision or of a completed request.
///
/// [`Outcome::Allowed`] and [`Outcome::Denied`] make authorization records; [`Outcome::Ok`] and
/// [`Outcome::Error`] make completion records, which carry the HTTP status and the bytes of call
/// data sent or received.
#[derive(Clone, PartialEq, Eq, Debug)]
pub enum Outcome {
    Allowed,
    Denied {
        reason: Reason,
    },
    Ok {
        status: u16,
        bytes: u64,
    },
    Error {
        status: u16,
        bytes: u64,
        reason: Reason,
    },
}

impl Outcome {
    pub fn kind(&self) -> Kind {
        match self {
            Outcome::Allowed | Outcome::Denied { .. } => Kind::Authorization,
            Outcome::Ok { .. } | Outcome::Error { .. } => Kind::Completion,
        }
    }

    /// Returns the `outcome` field's value: `allowed`, `denied`, `ok` or `error`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Outcome::Allowed => "allowed",
            Outcome::Denied { .. } => "denied",
            Outcome::Ok { .. } => "ok",
            Outcome::Error { .. } => "error",
        }
    }

    pub fn status(&self) -> Option<u16> {
        match self {
            Outcome::Ok { status, .. } | Outcome::Error { status, .. } => Some(*status),
            Outcome::Allowed | Outcome::Denied { .. } => None,
        }
    }

    pub fn bytes(&self) -> Option<u64> {
        match self {
            Outcome::Ok { bytes, .. } | Outcome::Error { bytes, .. } => Some(*bytes),
            Outcome::Allowed | Outcome::Denied { .. } => None,
        }
    }

    pub fn reason(&self) -> Option<&Reason> {
        match self {
            Outcome::Denied { reason } | Outcome::Error { reason, .. } => Some(reason),
            Outcome::Allowed | Outcome::Ok { .. } => None,
        }
    }
}

/// An inclusive byte range of a read, written as `first-last` (`0-1023`), as in HTTP `Range`.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub struct ByteRange {
    pub first: u64,
    pub last: u64,
}

impl fmt::Display for ByteRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

impl FromStr for ByteRange {
    type Err = InvalidRecord;

    fn from_str(text: &str) -> Result<Self, InvalidRecord> {
        let invalid = || InvalidRecord::Range;
        let (first, last) = text.split_once('-').ok_or_else(invalid)?;
        let digits = |part: &str| !part.is_empty() && part.bytes().all(|b| b.is_ascii_digit());
        if !digits(first) || !digits(last) {
            return Err(invalid());
        }
        let range = ByteRange {
            first: first.parse().map_err(|_| invalid())?,
            last: last.parse().map_err(|_| invalid())?,
        };
        if range.first > range.last {
            return Err(invalid());
        }
        Ok(range)
    }
}

impl Serialize for ByteRange {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ByteRange {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// A SHA-256 digest in the chain: of a record's line, or [`ChainHash::GENESIS`].
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct ChainHash(pub [u8; 32]);

impl ChainHash {
    /// The `prev` of the first record of a log.
    pub const GENESIS: ChainHash = ChainHash([0; 32]);

    /// Hashes one record line, without its final `\n`.
    pub fn of_line(line: &[u8]) -> Self {
        ChainHash(Sha256::digest(line).into())
    }
}

impl fmt::Display for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for ChainHash {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "ChainHash({self})")
    }
}

impl FromStr for ChainHash {
    type Err = InvalidRecord;

    /// Parses 64 lowercase hex digits, the only form the writer produces.
    fn from_str(text: &str) -> Result<Self, InvalidRecord> {
        let lowercase = text.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'));
        let mut bytes = [0u8; 32];
        if text.len() != 64 || !lowercase || hex::decode_to_slice(text, &mut bytes).is_err() {
            return Err(InvalidRecord::Hash);
        }
        Ok(ChainHash(bytes))
    }
}

impl Serialize for ChainHash {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for ChainHash {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = Cow::<str>::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// The principal, client, action and target of a request: the fields that its authorization and
/// completion records share.
///
/// `practice` is required so that every record is found by a practice's [`crate::audit::query`].
/// `principal` and `role` are absent when the request did not authenticate.
#[derive(Clone, PartialEq, Eq, Debug)]
pub struct Access {
    pub request_id: RequestId,
    pub principal: Option<PrincipalName>,
    pub role: Option<Role>,
    pub action: Action,
    pub practice: PracticeId,
    pub call: Option<CallId>,
    pub artifact: Option<ArtifactName>,
    pub client: SocketAddr,
    pub tls_version: TlsVersion,
    pub range: Option<ByteRange>,
}

/// One record of the audit log, as read back or as written.
///
/// Its JSON line has these fields, in this order, and leaves out optional ones that are absent:
/// `time` (RFC 3339 UTC with milliseconds), `request_id`, `kind`, `principal`, `role`, `action`,
/// `practice`, `call`, `artifact`, `client`, `tls_version`, `outcome`, `status`, `bytes`,
/// `range`, `reason`, `seq`, `prev`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(try_from = "RecordLine", into = "RecordLine")]
pub struct Record {
    pub time: OffsetDateTime,
    pub access: Access,
    pub outcome: Outcome,
    /// The record's number in the chain, from 1.
    pub seq: u64,
    /// The SHA-256 of the previous record's line, or [`ChainHash::GENESIS`] for `seq` 1.
    pub prev: ChainHash,
}

/// A record or record field that breaks the format's rules.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidRecord {
    #[error("invalid range: expected FIRST-LAST with FIRST <= LAST")]
    Range,
    #[error("invalid hash: expected 64 lowercase hex digits")]
    Hash,
    #[error("outcome `{outcome}` does not belong to kind `{kind}`")]
    KindMismatch { kind: &'static str, outcome: String },
    #[error("outcome `{0}` requires `{1}`")]
    MissingField(&'static str, &'static str),
    #[error("outcome `{0}` does not allow `{1}`")]
    UnexpectedField(&'static str, &'static str),
    #[error("invalid outcome `{0}`: expected allowed, denied, ok or error")]
    UnknownOutcome(String),
    #[error("invalid status {0}: expected 100 to 599")]
    Status(u16),
    #[error("{0}")]
    Reason(InvalidId),
    #[error("seq must start at 1")]
    SeqZero,
}

impl Record {
    /// Serializes the record as one line of JSON, without the final `\n`.
    pub fn to_line(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect(
            "serializing a record into memory cannot fail: its fields serialize as strings, \
             numbers and unit enum variants, and every Display they use succeeds",
        )
    }

    pub fn kind(&self) -> Kind {
        self.outcome.kind()
    }
}

/// Checks the parts of an outcome that types cannot: the status range and the reason grammar.
pub(crate) fn check_outcome(outcome: &Outcome) -> Result<(), InvalidRecord> {
    if let Some(status) = outcome.status()
        && !(100..=599).contains(&status)
    {
        return Err(InvalidRecord::Status(status));
    }
    if let Some(reason) = outcome.reason() {
        reason.validate().map_err(InvalidRecord::Reason)?;
    }
    Ok(())
}

/// Formats a record time: RFC 3339 in UTC with exactly three fractional digits.
pub(crate) fn format_time(time: OffsetDateTime) -> String {
    let utc = time.to_offset(time::UtcOffset::UTC);
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    utc.format(&format).expect(
        "formatting into a String cannot fail: an OffsetDateTime has every component the \
         description names",
    )
}

/// Parses a time in the format of [`format_time`] only, so every stored time has one spelling.
pub(crate) fn parse_time(text: &str) -> Result<OffsetDateTime, time::error::Parse> {
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:3]Z"
    );
    Ok(time::PrimitiveDateTime::parse(text, &format)?.assume_utc())
}

/// Cuts a time to whole milliseconds in UTC, the precision that records store.
pub(crate) fn truncate_to_millis(time: OffsetDateTime) -> OffsetDateTime {
    let utc = time.to_offset(time::UtcOffset::UTC);
    let millis = utc.nanosecond() / 1_000_000 * 1_000_000;
    utc.replace_nanosecond(millis).unwrap_or(utc)
}

/// The flat JSON form of a [`Record`]: serde reads and writes records through it.
#[derive(Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecordLine {
    #[serde(with = "timestamp")]
    time: OffsetDateTime,
    request_id: RequestId,
    kind: Kind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    principal: Option<PrincipalName>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    role: Option<Role>,
    action: Action,
    practice: PracticeId,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    call: Option<CallId>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    artifact: Option<ArtifactName>,
    client: SocketAddr,
    tls_version: TlsVersion,
    outcome: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    status: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    range: Option<ByteRange>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    reason: Option<Reason>,
    seq: u64,
    prev: ChainHash,
}

impl From<Record> for RecordLine {
    fn from(record: Record) -> Self {
        let Record {
            time,
            access,
            outcome,
            seq,
            prev,
        } = record;
        RecordLine {
            time,
            request_id: access.request_id,
            kind: outcome.kind(),
            principal: access.principal,
            role: access.role,
            action: access.action,
            practice: access.practice,
            call: access.call,
            artifact: access.artifact,
            client: access.client,
            tls_version: access.tls_version,
            outcome: outcome.as_str().to_owned(),
            status: outcome.status(),
            bytes: outcome.bytes(),
            range: access.range,
            reason: outcome.reason().cloned(),
            seq,
            prev,
        }
    }
}

impl TryFrom<RecordLine> for Record {
    type Error = InvalidRecord;

    fn try_from(line: RecordLine) -> Result<Self, InvalidRecord> {
        let name = match line.outcome.as_str() {
            "allowed" => "allowed",
            "denied" => "denied",
            "ok" => "ok",
            "error" => "error",
            _ => return Err(InvalidRecord::UnknownOutcome(line.outcome)),
        };
        let required =
            |value: Option<u64>, field| value.ok_or(InvalidRecord::MissingField(name, field));
        let absent = |present: bool, field| {
            if present {
                Err(InvalidRecord::UnexpectedField(name, field))
            } else {
                Ok(())
            }
        };

        let outcome = match name {
            "allowed" | "denied" => {
                absent(line.status.is_some(), "status")?;
                absent(line.bytes.is_some(), "bytes")?;
                if name == "allowed" {
                    absent(line.reason.is_some(), "reason")?;
                    Outcome::Allowed
                } else {
                    let reason = line
                        .reason
                        .ok_or(InvalidRecord::MissingField(name, "reason"))?;
                    Outcome::Denied { reason }
                }
            }
            _ => {
                let status = required(line.status.map(u64::from), "status")? as u16;
                let bytes = required(line.bytes, "bytes")?;
                if name == "ok" {
                    absent(line.reason.is_some(), "reason")?;
                    Outcome::Ok { status, bytes }
                } else {
                    let reason = line
                        .reason
                        .ok_or(InvalidRecord::MissingField(name, "reason"))?;
                    Outcome::Error {
                        status,
                        bytes,
                        reason,
                    }
                }
            }
        };
        if outcome.kind() != line.kind {
            let kind = match line.kind {
                Kind::Authorization => "authorization",
                Kind::Completion => "completion",
            };
            return Err(InvalidRecord::KindMismatch {
                kind,
                outcome: name.to_owned(),
            });
        }
        check_outcome(&outcome)?;
        if line.seq == 0 {
            return Err(InvalidRecord::SeqZero);
        }

        Ok(Record {
            time: line.time,
            access: Access {
                request_id: line.request_id,
                principal: line.principal,
                role: line.role,
                action: line.action,
                practice: line.practice,
                call: line.call,
                artifact: line.artifact,
                client: line.client,
                tls_version: line.tls_version,
                range: line.range,
            },
            outcome,
            seq: line.seq,
            prev: line.prev,
        })
    }
}

/// Serde for record and checkpoint times, in the one spelling of [`format_time`].
pub(crate) mod timestamp {
    use serde::{Deserialize, Deserializer, Serializer};
    use time::OffsetDateTime;

    pub fn serialize<S: Serializer>(
        time: &OffsetDateTime,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&super::format_time(*time))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<OffsetDateTime, D::Error> {
        let text = std::borrow::Cow::<str>::deserialize(deserializer)?;
        super::parse_time(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access {
            request_id: RequestId::new("0123456789abcdef").unwrap(),
            principal: Some(PrincipalName::new("back-office").unwrap()),
            role: Some(Role::Reader),
            action: Action::ObjectGet,
            practice: PracticeId::new("clinic-7").unwrap(),
            call: Some(CallId::new("call_abc").unwrap()),
            artifact: Some(ArtifactName::new("recording.wav").unwrap()),
            client: "192.0.2.10:51234".parse().unwrap(),
            tls_version: TlsVersion::Tls13,
            range: Some(ByteRange {
                first: 0,
                last: 1023,
            }),
        }
    }

    fn record(outcome: Outcome) -> Record {
        Record {
            time: parse_time("2025-01-02T03:04:05.678Z").unwrap(),
            access: access(),
            outcome,
            seq: 7,
            prev: ChainHash::of_line(b"previous"),
        }
    }

    #[test]
    fn line_has_documented_field_order() {
        let line = String::from_utf8(record(Outcome::Allowed).to_line()).unwrap();
        let expected = concat!(
            r#"{"time":"2025-01-02T03:04:05.678Z","request_id":"0123456789abcdef","#,
            r#""kind":"authorization","principal":"back-office","role":"reader","#,
            r#""action":"object.get","practice":"clinic-7","call":"call_abc","#,
            r#""artifact":"recording.wav","client":"192.0.2.10:51234","tls_version":"TLSv1.3","#,
            r#""outcome":"allowed","range":"0-1023","seq":7,"prev":""#
        );
        assert!(line.starts_with(expected), "{line}");
        assert!(line.ends_with(&format!("{}\"}}", ChainHash::of_line(b"previous"))));
    }

    #[test]
    fn every_outcome_round_trips() {
        let outcomes = [
            Outcome::Allowed,
            Outcome::Denied {
                reason: Reason::new("forbidden"),
            },
            Outcome::Ok {
                status: 206,
                bytes: 1024,
            },
            Outcome::Error {
                status: 503,
                bytes: 0,
                reason: Reason::new("storage_unavailable"),
            },
        ];
        for outcome in outcomes {
            let record = record(outcome);
            let parsed: Record = serde_json::from_slice(&record.to_line()).unwrap();
            assert_eq!(parsed, record);
        }
    }

    #[test]
    fn optional_fields_are_left_out() {
        let mut record = record(Outcome::Allowed);
        record.access.principal = None;
        record.access.role = None;
        record.access.call = None;
        record.access.artifact = None;
        record.access.range = None;
        let line = String::from_utf8(record.to_line()).unwrap();
        for field in [
            "principal",
            "role",
            "call",
            "artifact",
            "range",
            "status",
            "bytes",
        ] {
            assert!(!line.contains(&format!("\"{field}\"")), "{field} in {line}");
        }
        assert_eq!(serde_json::from_str::<Record>(&line).unwrap(), record);
    }

    #[test]
    fn inconsistent_outcome_fields_are_rejected() {
        let base = String::from_utf8(record(Outcome::Allowed).to_line()).unwrap();
        let cases = [
            (r#""outcome":"allowed""#, r#""outcome":"ok""#),
            (r#""kind":"authorization""#, r#""kind":"completion""#),
            (
                r#""outcome":"allowed""#,
                r#""outcome":"allowed","status":200"#,
            ),
            (r#""outcome":"allowed""#, r#""outcome":"denied""#),
            (r#""outcome":"allowed""#, r#""outcome":"maybe""#),
            (r#""seq":7"#, r#""seq":0"#),
            (r#""seq":7"#, r#""seq":7,"extra":1"#),
            (r#""range":"0-1023""#, r#""range":"9-1""#),
            (r#""practice":"clinic-7""#, r#""practice":"../x""#),
            (
                r#""time":"2025-01-02T03:04:05.678Z""#,
                r#""time":"2025-01-02T03:04:05Z""#,
            ),
        ];
        for (from, to) in cases {
            let edited = base.replacen(from, to, 1);
            assert_ne!(edited, base, "{from} not found");
            assert!(serde_json::from_str::<Record>(&edited).is_err(), "{edited}");
        }
    }

    #[test]
    fn reason_outside_grammar_is_rejected() {
        let outcome = Outcome::Denied {
            reason: Reason::new("not allowed"),
        };
        assert!(matches!(
            check_outcome(&outcome),
            Err(InvalidRecord::Reason(_))
        ));
        let line = String::from_utf8(record(outcome).to_line()).unwrap();
        assert!(serde_json::from_str::<Record>(&line).is_err());
    }

    #[test]
    fn status_limits() {
        for (status, valid) in [(99, false), (100, true), (599, true), (600, false)] {
            let outcome = Outcome::Ok { status, bytes: 0 };
            assert_eq!(check_outcome(&outcome).is_ok(), valid, "{status}");
        }
    }

    #[test]
    fn byte_range_parses() {
        assert_eq!(
            "0-0".parse::<ByteRange>(),
            Ok(ByteRange { first: 0, last: 0 })
        );
        for text in ["", "-", "1-", "-1", "2-1", "+1-2", "1-2-3", "a-b"] {
            assert!(text.parse::<ByteRange>().is_err(), "{text:?}");
        }
    }

    #[test]
    fn chain_hash_requires_lowercase_hex() {
        let hash = ChainHash::of_line(b"x");
        assert_eq!(hash.to_string().parse::<ChainHash>(), Ok(hash));
        assert!(
            hash.to_string()
                .to_uppercase()
                .parse::<ChainHash>()
                .is_err()
        );
        assert!("00".parse::<ChainHash>().is_err());
    }

    #[test]
    fn time_keeps_milliseconds_only() {
        let time = OffsetDateTime::from_unix_timestamp_nanos(1_735_787_045_678_901_234).unwrap();
        let truncated = truncate_to_millis(time);
        assert_eq!(format_time(truncated), "2025-01-02T03:04:05.678Z");
        assert_eq!(parse_time(&format_time(truncated)).unwrap(), truncated);
    }
}
