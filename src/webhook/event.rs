//! What callseal takes from a verified Retell event: its ids, the artifacts it derives from it,
//! its media links, and the redacted copy it forwards downstream.
//!
//! Events are kept whole and exact (the raw bytes that were signed). Fields are read only to name
//! the stored objects; unknown events and unknown fields are accepted and stored unchanged.

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::ids::{ArtifactName, CallId, InvalidId};

/// Fields of the call object that carry no PHI and may leave callseal in a forwarded copy.
/// Everything else (numbers, transcripts, analysis, timestamps, media links, metadata and any
/// field Retell adds later) is left out.
pub const FORWARDED_CALL_FIELDS: &[&str] = &[
    "call_id",
    "agent_id",
    "agent_version",
    "call_type",
    "direction",
    "call_status",
    "disconnection_reason",
    "duration_ms",
];

/// The maximum length of an event type. Every name made from it must fit the 128-byte id limit:
/// the versioned event, `event-{type}.v{13 digits}-{16 hex}.json`, and each media job,
/// `job.{artifact}.{type}.json` (see [`super::media`]). Retell's event types are about 20 bytes.
pub const MAX_EVENT_TYPE_LEN: usize = {
    let version = crate::ids::MAX_ID_LEN - "event-.v0000000000000-0000000000000000.json".len();
    let job = crate::ids::MAX_ID_LEN - "job...json".len() - longest_media_artifact();
    if version < job { version } else { job }
};

/// Returns the length of the longest media artifact name in [`MEDIA_FIELDS`].
const fn longest_media_artifact() -> usize {
    let mut longest = 0;
    let mut index = 0;
    while index < MEDIA_FIELDS.len() {
        let length = MEDIA_FIELDS[index].1.len();
        if length > longest {
            longest = length;
        }
        index += 1;
    }
    longest
}

/// Media links in a call object and the artifact each is stored as.
pub const MEDIA_FIELDS: &[(&str, &str)] = &[
    ("recording_url", "recording.wav"),
    ("recording_multi_channel_url", "recording_multichannel.wav"),
    ("scrubbed_recording_url", "scrubbed_recording.wav"),
    (
        "scrubbed_recording_multi_channel_url",
        "scrubbed_recording_multichannel.wav",
    ),
    ("public_log_url", "public_log.txt"),
    (
        "knowledge_base_retrieved_contents_url",
        "knowledge_base_retrieved_contents.txt",
    ),
];

/// Transcript fields copied into the `transcript.json` artifact.
const TRANSCRIPT_FIELDS: &[&str] = &[
    "transcript",
    "transcript_object",
    "transcript_with_tool_calls",
    "scrubbed_transcript",
    "scrubbed_transcript_object",
    "scrubbed_transcript_with_tool_calls",
    "pre_session_transcript",
    "post_session_transcript",
];

/// The reason a verified body cannot be stored.
#[derive(Debug, thiserror::Error)]
pub enum EventError {
    #[error("webhook body is not a JSON object")]
    NotJson,
    #[error("webhook body has no `event` string")]
    MissingEvent,
    #[error("webhook body has no `call.call_id` (or `data.call_id`) string")]
    MissingCallId,
    #[error("{0}")]
    InvalidId(#[from] InvalidId),
    #[error("webhook event type is longer than {MAX_EVENT_TYPE_LEN} bytes")]
    EventTypeTooLong,
}

/// A parsed, verified event.
pub struct Event {
    /// The event type, such as `call_ended`; validated so it can name an artifact.
    pub kind: String,
    pub call: CallId,
    pub agent_id: Option<String>,
    /// SHA-256 of the exact body bytes.
    pub digest: [u8; 32],
    value: Value,
}

impl Event {
    pub fn parse(body: &[u8]) -> Result<Event, EventError> {
        let value: Value = serde_json::from_slice(body).map_err(|_| EventError::NotJson)?;
        let kind = value
            .get("event")
            .and_then(Value::as_str)
            .ok_or(EventError::MissingEvent)?;
        crate::ids::validate("event type", kind)?;
        if kind.len() > MAX_EVENT_TYPE_LEN {
            return Err(EventError::EventTypeTooLong);
        }
        let call_object = call_object(&value).ok_or(EventError::MissingCallId)?;
        let call_id = call_object
            .get("call_id")
            .and_then(Value::as_str)
            .ok_or(EventError::MissingCallId)?;
        let call = CallId::new(call_id)?;
        let agent_id = call_object
            .get("agent_id")
            .and_then(Value::as_str)
            .map(str::to_owned);
        Ok(Event {
            kind: kind.to_owned(),
            call,
            agent_id,
            digest: Sha256::digest(body).into(),
            value,
        })
    }

    /// The raw event's artifact base name: `event-{kind}`.
    pub fn artifact_base(&self) -> String {
        format!("event-{}", self.kind)
    }

    /// The `transcript.json` content: every transcript field the call object has, or `None`.
    pub fn transcript(&self) -> Option<Vec<u8>> {
        let call = call_object(&self.value)?;
        let fields: Map<String, Value> = TRANSCRIPT_FIELDS
            .iter()
            .filter_map(|field| {
                call.get(*field)
                    .map(|value| ((*field).to_owned(), value.clone()))
            })
            .collect();
        if fields.is_empty() {
            return None;
        }
        serde_json::to_vec(&fields).ok()
    }

    /// The `analysis.json` content: the call object's `call_analysis`, or `None`.
    pub fn analysis(&self) -> Option<Vec<u8>> {
        let analysis = call_object(&self.value)?.get("call_analysis")?;
        serde_json::to_vec(analysis).ok()
    }

    /// Media links present in the event, with the artifact each belongs in.
    pub fn media(&self) -> Vec<(ArtifactName, String)> {
        let Some(call) = call_object(&self.value) else {
            return Vec::new();
        };
        MEDIA_FIELDS
            .iter()
            .filter_map(|(field, artifact)| {
                let url = call.get(*field)?.as_str()?.trim();
                let artifact =
                    ArtifactName::new(*artifact).expect("media artifact names are valid ids");
                (!url.is_empty()).then(|| (artifact, url.to_owned()))
            })
            .collect()
    }

    /// Builds the redacted copy sent downstream: the event type, the allowlisted call fields and
    /// the paths of the stored artifacts. Built up from the allowlist, never by removing fields.
    pub fn redacted(&self, practice: &str, artifacts: &[String]) -> Value {
        let mut call = Map::new();
        if let Some(source) = call_object(&self.value) {
            for field in FORWARDED_CALL_FIELDS {
                if let Some(value) = source.get(*field).filter(|value| is_plain(value)) {
                    call.insert((*field).to_owned(), value.clone());
                }
            }
        }
        serde_json::json!({
            "event": self.kind,
            "practice": practice,
            "call": call,
            "artifacts": artifacts,
        })
    }
}

/// The call object: `call`, or `data` in older payloads.
fn call_object(value: &Value) -> Option<&Map<String, Value>> {
    value
        .get("call")
        .or_else(|| value.get("data"))
        .and_then(Value::as_object)
}

/// A string, number or boolean: allowlisted fields must not smuggle nested objects out.
fn is_plain(value: &Value) -> bool {
    matches!(value, Value::String(_) | Value::Number(_) | Value::Bool(_))
}

/// The name of one stored version of a versioned artifact: `{base}.v{timestamp}-{digest}.json`,
/// where the timestamp is the signature's (milliseconds, 13 digits zero-padded so names sort in
/// time order) and the digest is the first 16 hex digits of the event body's SHA-256.
pub fn version_name(base: &str, timestamp_ms: u64, digest: &[u8; 32]) -> String {
    format!(
        "{base}.v{timestamp_ms:013}-{}.json",
        hex::encode(&digest[..8])
    )
}

/// Splits a version name back into its base, timestamp and digest prefix.
pub fn parse_version_name(name: &str) -> Option<(&str, u64, &str)> {
    let stem = name.strip_suffix(".json")?;
    let (base, version) = stem.rsplit_once(".v")?;
    let (timestamp, digest) = version.split_once('-')?;
    if digest.len() != 16 || !digest.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    if timestamp.is_empty() || !timestamp.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some((base, timestamp.parse().ok()?, digest))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ENDED: &str = include_str!("../../tests/fixtures/retell/call_ended.json");
    const ANALYZED: &str = include_str!("../../tests/fixtures/retell/call_analyzed.json");

    #[test]
    fn fixture_events_parse() {
        let ended = Event::parse(ENDED.as_bytes()).unwrap();
        assert_eq!(ended.kind, "call_ended");
        assert!(ended.transcript().is_some());
        assert!(!ended.media().is_empty());
        let analyzed = Event::parse(ANALYZED.as_bytes()).unwrap();
        assert_eq!(analyzed.kind, "call_analyzed");
        assert!(analyzed.analysis().is_some());
    }

    #[test]
    fn old_data_field_accepted() {
        let event = Event::parse(br#"{"event":"call_ended","data":{"call_id":"call_1"}}"#).unwrap();
        assert_eq!(event.call.as_str(), "call_1");
    }

    #[test]
    fn missing_or_bad_ids_rejected() {
        let cases: [&[u8]; 5] = [
            b"not json",
            br#"{"call":{"call_id":"c"}}"#,
            br#"{"event":"call_ended","call":{}}"#,
            br#"{"event":"call_ended","call":{"call_id":"../x"}}"#,
            br#"{"event":"a/b","call":{"call_id":"c"}}"#,
        ];
        for body in cases {
            assert!(
                Event::parse(body).is_err(),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn redacted_copy_keeps_only_allowlist() {
        let body = br#"{"event":"call_ended","call":{"call_id":"c1","agent_id":"a1","from_number":"+15550100001","canary_field":"CANARY-7731","duration_ms":1000,"call_status":{"nested":"CANARY-7732"}},"extra":"CANARY-7733"}"#;
        let event = Event::parse(body).unwrap();
        let copy = event
            .redacted("p1", &["p1/calls/c1/recording.wav".to_owned()])
            .to_string();
        for canary in ["CANARY", "+1555"] {
            assert!(!copy.contains(canary), "{copy}");
        }
        assert!(copy.contains("\"duration_ms\":1000"), "{copy}");
        assert!(copy.contains("\"agent_id\":\"a1\""), "{copy}");
    }

    #[test]
    fn event_type_length_limit_pair() {
        let body = |kind: &str| format!(r#"{{"event":"{kind}","call":{{"call_id":"c"}}}}"#);
        let at_limit = "e".repeat(MAX_EVENT_TYPE_LEN);
        let event = Event::parse(body(&at_limit).as_bytes()).unwrap();
        let name = version_name(&event.artifact_base(), u64::MAX / 2_000_000, &event.digest);
        assert!(ArtifactName::new(name).is_ok());
        for (_, artifact) in MEDIA_FIELDS {
            let job = format!("job.{artifact}.{at_limit}.json");
            assert!(ArtifactName::new(job.as_str()).is_ok(), "{job}");
        }
        let over = "e".repeat(MAX_EVENT_TYPE_LEN + 1);
        assert!(matches!(
            Event::parse(body(&over).as_bytes()),
            Err(EventError::EventTypeTooLong)
        ));
    }

    #[test]
    fn version_names_round_trip() {
        let name = version_name("event-call_ended", 1_767_225_601_234, &[0xab; 32]);
        assert_eq!(
            name,
            "event-call_ended.v1767225601234-abababababababab.json"
        );
        assert!(ArtifactName::new(name.as_str()).is_ok());
        assert_eq!(
            parse_version_name(&name),
            Some(("event-call_ended", 1_767_225_601_234, "abababababababab"))
        );
        assert_eq!(parse_version_name("event-call_ended.json"), None);
        assert_eq!(parse_version_name("recording.wav"), None);
    }
}
