//! Validated identifiers: practice ids, call ids and artifact names.
//!
//! Every id that reaches a file path, a storage key, an encryption context, an HTTP header or a
//! log line is one of these types, so it has passed [`validate`] first. The grammar is:
//!
//! - 1 to [`MAX_ID_LEN`] bytes;
//! - ASCII letters, digits, `-`, `_` and `.` only, so no `/`, `\`, NUL, space or non-ASCII byte;
//! - never `.` or `..`.
//!
//! That makes each id a single, inert path component on every platform and a safe value for
//! headers and logs. Retell's call ids (`call_` followed by hex) fit the grammar.

use std::fmt;
use std::str::FromStr;

/// Maximum length of an id in bytes.
pub const MAX_ID_LEN: usize = 128;

/// An id that does not follow the grammar.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidId {
    #[error("invalid {kind}: must not be empty")]
    Empty { kind: &'static str },
    #[error("invalid {kind}: longer than {MAX_ID_LEN} bytes")]
    TooLong { kind: &'static str },
    #[error("invalid {kind}: `.` and `..` are not allowed")]
    DotSegment { kind: &'static str },
    #[error("invalid {kind}: byte {position} is not an ASCII letter, digit, `-`, `_` or `.`")]
    Character { kind: &'static str, position: usize },
}

/// Checks `value` against the id grammar in the module documentation.
///
/// `kind` names the id in the error ("practice id", "call id", "artifact name"). The error never
/// repeats the value itself, because a rejected value may be anything a client sent.
pub fn validate(kind: &'static str, value: &str) -> Result<(), InvalidId> {
    if value.is_empty() {
        return Err(InvalidId::Empty { kind });
    }
    if value.len() > MAX_ID_LEN {
        return Err(InvalidId::TooLong { kind });
    }
    if value == "." || value == ".." {
        return Err(InvalidId::DotSegment { kind });
    }
    let allowed = |b: u8| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.');
    if let Some(position) = value.bytes().position(|b| !allowed(b)) {
        return Err(InvalidId::Character { kind, position });
    }
    Ok(())
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident, $kind:literal) => {
        $(#[$doc])*
        #[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
        pub struct $name(String);

        impl $name {
            /// Validates `value` and wraps it.
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

        impl TryFrom<String> for $name {
            type Error = InvalidId;

            fn try_from(value: String) -> Result<Self, InvalidId> {
                Self::new(value)
            }
        }

        impl AsRef<str> for $name {
            fn as_ref(&self) -> &str {
                &self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(&self.0)
            }
        }

        impl fmt::Debug for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, "{}({:?})", stringify!($name), self.0)
            }
        }

        impl<'de> serde::Deserialize<'de> for $name {
            fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let value = String::deserialize(deserializer)?;
                Self::new(value).map_err(serde::de::Error::custom)
            }
        }

        impl serde::Serialize for $name {
            fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(&self.0)
            }
        }
    };
}

id_type!(
    /// The id of a practice (a tenant): names its keys, its storage prefix and its tokens.
    PracticeId,
    "practice id"
);
id_type!(
    /// The id of one call, as the voice platform assigns it.
    CallId,
    "call id"
);
id_type!(
    /// The name of one stored artifact of a call, such as `recording.wav`.
    ArtifactName,
    "artifact name"
);

/// The full address of one stored object: which practice, call and artifact it belongs to.
///
/// It is also the object's expected encryption context: see
/// [`crate::envelope::EncryptionContext::for_object`].
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct ObjectId {
    pub practice: PracticeId,
    pub call: CallId,
    pub artifact: ArtifactName,
}

impl ObjectId {
    pub fn new(practice: PracticeId, call: CallId, artifact: ArtifactName) -> Self {
        Self {
            practice,
            call,
            artifact,
        }
    }
}

impl fmt::Display for ObjectId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/calls/{}/{}", self.practice, self.call, self.artifact)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_grammar() {
        for value in [
            "a",
            "practice-1",
            "call_0123abcdef",
            "recording.wav",
            "A.b-c_d",
            "...",
        ] {
            assert!(PracticeId::new(value).is_ok(), "{value:?} should be valid");
        }
        assert!(CallId::new("x".repeat(MAX_ID_LEN)).is_ok());
    }

    #[test]
    fn rejects_length_limits() {
        assert_eq!(CallId::new(""), Err(InvalidId::Empty { kind: "call id" }));
        assert_eq!(
            CallId::new("x".repeat(MAX_ID_LEN + 1)),
            Err(InvalidId::TooLong { kind: "call id" })
        );
    }

    #[test]
    fn rejects_dot_segments() {
        for value in [".", ".."] {
            assert_eq!(
                ArtifactName::new(value),
                Err(InvalidId::DotSegment {
                    kind: "artifact name"
                })
            );
        }
    }

    #[test]
    fn rejects_bad_characters() {
        let cases = [
            ("a/b", 1),
            ("a\\b", 1),
            ("\0", 0),
            ("ab c", 2),
            ("é", 0),
            ("a%2f", 1),
            ("x:y", 1),
            ("../etc", 2),
        ];
        for (value, position) in cases {
            assert_eq!(
                PracticeId::new(value),
                Err(InvalidId::Character {
                    kind: "practice id",
                    position
                }),
                "{value:?}"
            );
        }
    }

    #[test]
    fn error_message_omits_value() {
        let error = CallId::new("secret/../value").unwrap_err().to_string();
        assert!(!error.contains("secret"), "{error}");
        assert!(error.contains("call id"), "{error}");
    }

    #[test]
    fn deserializes_with_validation() {
        #[derive(serde::Deserialize)]
        struct Doc {
            practice: PracticeId,
        }
        let ok: Doc = toml::from_str("practice = \"clinic-7\"").unwrap();
        assert_eq!(ok.practice.as_str(), "clinic-7");
        assert!(toml::from_str::<Doc>("practice = \"../x\"").is_err());
    }
}
