//! The stored format: AWS Encryption SDK message format v2, algorithm suite 0x0478
//! (AES-256-GCM, HKDF-SHA512, key commitment, no signature), framed.
//!
//! This module is a pure, synchronous core: bytes in, frames out ([`Encryptor`]); frames in,
//! verified plaintext out ([`Decryptor`]). It performs no I/O and logs nothing, so async code
//! wraps it without copying whole objects; [`io`] holds blocking adapters for files.
//!
//! Invariants:
//! - Plaintext of a frame is released only after its tag verified; the header's commitment key
//!   and tag are checked before the content key is used for anything.
//! - Sequence numbers start at 1, have no gaps or repeats, and exactly one final frame ends the
//!   message; any byte after it is an error.
//! - What an untrusted header claims is bounded before it is allocated: at most [`MAX_EDKS`]
//!   encrypted data keys, [`MAX_HEADER_LEN`] header bytes and [`MAX_FRAME_LENGTH`] bytes per frame.
//!
//! Decryption errors say only what kind of rule failed; [`Error::Authentication`] carries no
//! detail at all.

mod context;
mod decrypt;
mod encrypt;
mod frame;
#[doc(hidden)]
pub mod fuzzing;
mod header;
pub mod io;
mod layout;

pub use context::{ARTIFACT_KEY, CALL_KEY, EncryptionContext, PRACTICE_KEY};
pub use decrypt::Decryptor;
pub use encrypt::Encryptor;
pub use frame::{FINAL_FRAME_OVERHEAD, REGULAR_FRAME_OVERHEAD};
pub use header::{EncryptedDataKey, Header, ParsedHeader};
pub use layout::{Layout, RangePlan};

/// Message format version 2.
pub const VERSION: u8 = 0x02;
/// AES-256-GCM with HKDF-SHA512 key derivation and key commitment, no signature.
pub const SUITE_ID: u16 = 0x0478;
/// The framed content type; the old non-framed type (0x01) is rejected.
pub const CONTENT_TYPE_FRAMED: u8 = 0x02;

/// Plaintext bytes per frame unless configured otherwise.
pub const DEFAULT_FRAME_LENGTH: u32 = 64 * 1024;
/// The largest frame length accepted, when writing and when reading: 1 MiB. Every buffer the
/// decryptor allocates is bounded by it.
pub const MAX_FRAME_LENGTH: u32 = 1024 * 1024;
/// The most encrypted data keys a header may carry. callseal writes one; AWS's SDKs write one
/// per master key.
pub const MAX_EDKS: usize = 16;
/// The longest header accepted, tag included.
pub const MAX_HEADER_LEN: usize = 128 * 1024;

pub const MESSAGE_ID_LEN: usize = 32;
pub const COMMITMENT_LEN: usize = 32;
pub const IV_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// The reason a message was rejected or could not be written.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Error {
    #[error("authentication failed")]
    Authentication,
    #[error("malformed message: {0}")]
    Malformed(&'static str),
    #[error("unsupported message: {0}")]
    Unsupported(String),
    #[error("message exceeds a limit: {0}")]
    Limit(String),
    #[error("message is truncated")]
    Truncated,
    #[error("unexpected bytes after the final frame")]
    TrailingData,
    #[error("encryption context key `{key}` does not match the expected object")]
    ContextMismatch { key: String },
    #[error("range is outside the plaintext")]
    Range,
    #[error("the operating system's random number generator failed")]
    Random,
}

/// Checks that a header's encryption context is exactly the expected one.
///
/// Callers check this before unwrapping the data key, so a message copied to another object's
/// path is rejected before any key service is asked and before any plaintext exists. The error
/// names the first differing key (keys are not secret), never a value.
pub fn check_context(header: &Header, expected: &EncryptionContext) -> Result<(), Error> {
    if &header.context == expected {
        return Ok(());
    }
    let stated = header.context.iter().map(|(key, _)| key);
    let expected_keys = expected.iter().map(|(key, _)| key);
    let key = stated
        .chain(expected_keys)
        .find(|key| header.context.get(key) != expected.get(key))
        .unwrap_or_default();
    Err(Error::ContextMismatch {
        key: key.to_owned(),
    })
}

/// Rewrites a message header so that `edks` wrap its data key, for key rotation without
/// re-encrypting the body.
///
/// The old header is authenticated with `data_key` first (commitment key and header tag), so a
/// tampered header is never re-signed. The message id, context, frame length and commitment stay
/// the same, so every frame of the body stays valid behind the new header, whose tag is computed
/// anew. Returns the new header bytes, tag included.
pub fn rewrap_header(
    parsed: &ParsedHeader,
    data_key: &crate::keys::DataKey,
    edks: Vec<EncryptedDataKey>,
) -> Result<Vec<u8>, Error> {
    if edks.is_empty() || edks.len() > MAX_EDKS {
        return Err(Error::Limit(format!(
            "a message needs 1 to {MAX_EDKS} encrypted data keys"
        )));
    }
    let (cipher, commitment) = frame::FrameCipher::derive(data_key, &parsed.header.message_id);
    frame::verify_commitment(&commitment, &parsed.header.commitment)?;
    cipher.verify_header(&parsed.body, &parsed.tag)?;

    let header = Header {
        edks,
        ..parsed.header.clone()
    };
    let mut bytes = header.serialize_body();
    if bytes.len() + TAG_LEN > MAX_HEADER_LEN {
        return Err(Error::Limit(format!(
            "header longer than {MAX_HEADER_LEN} bytes"
        )));
    }
    let tag = cipher.header_tag(&bytes);
    bytes.extend_from_slice(&tag);
    Ok(bytes)
}

#[cfg(test)]
mod tests;
