//! Keys: the secret key types and the keyrings that wrap and unwrap data keys.
//!
//! Every object has its own random 256-bit [`DataKey`]. A keyring wraps it under the practice's
//! key-encryption key into an [`EncryptedDataKey`] stored in the message header, and unwraps it on
//! read. Secret types zeroize their bytes on drop and print `[REDACTED]`; public types (key names,
//! wrapped keys) are kept apart from them.
//!
//! - [`local`]: one 256-bit wrapping key per practice and version in a key directory, using the
//!   AWS Encryption SDK's Raw AES keyring layout so AWS's own SDKs can unwrap it.

pub mod aws;
pub mod kms;
pub mod local;

use std::fmt;

use zeroize::{Zeroize, ZeroizeOnDrop, Zeroizing};

pub use local::{KeyDirectory, KeyName, KeyVersion, PracticeKeys};

/// Length in bytes of data keys and wrapping keys (AES-256).
pub const KEY_LEN: usize = 32;

/// A message's plaintext data key. The header stores it only wrapped.
#[derive(Clone, Zeroize, ZeroizeOnDrop)]
pub struct DataKey([u8; KEY_LEN]);

impl DataKey {
    /// Draws a fresh data key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = DataKey([0; KEY_LEN]);
        getrandom::fill(&mut key.0).map_err(|_| KeyError::Random)?;
        Ok(key)
    }

    /// Wraps bytes that an unwrapping step produced; anything but 32 bytes is rejected.
    pub fn from_slice(bytes: &[u8]) -> Result<Self, KeyError> {
        let bytes: [u8; KEY_LEN] = bytes.try_into().map_err(|_| KeyError::DataKeyLength {
            length: bytes.len(),
        })?;
        Ok(DataKey(bytes))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for DataKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("DataKey([REDACTED])")
    }
}

/// A key-encryption key: wraps and unwraps data keys.
#[derive(Zeroize, ZeroizeOnDrop)]
pub struct WrappingKey([u8; KEY_LEN]);

impl WrappingKey {
    /// Draws a fresh wrapping key from the operating system's CSPRNG.
    pub fn generate() -> Result<Self, KeyError> {
        let mut key = WrappingKey([0; KEY_LEN]);
        getrandom::fill(&mut key.0).map_err(|_| KeyError::Random)?;
        Ok(key)
    }

    /// Takes ownership of key bytes read from a key file; the caller's buffer is zeroized.
    pub fn from_bytes(mut bytes: Zeroizing<Vec<u8>>) -> Result<Self, KeyError> {
        let length = bytes.len();
        let array: [u8; KEY_LEN] = bytes
            .as_slice()
            .try_into()
            .map_err(|_| KeyError::WrappingKeyLength { length })?;
        bytes.zeroize();
        Ok(WrappingKey(array))
    }

    pub fn expose(&self) -> &[u8; KEY_LEN] {
        &self.0
    }
}

impl fmt::Debug for WrappingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("WrappingKey([REDACTED])")
    }
}

/// The key-encryption key of one practice: local wrapping keys or a KMS key.
#[derive(Debug)]
pub enum Keyring {
    Local(PracticeKeys),
    Kms(kms::KmsKeyring),
}

impl Keyring {
    /// Generates a data key for one object and wraps it under the practice's current key.
    pub async fn generate_data_key(
        &self,
        context: &crate::envelope::EncryptionContext,
    ) -> Result<(DataKey, crate::envelope::EncryptedDataKey), KeyError> {
        match self {
            Keyring::Local(keys) => keys.generate_data_key(context),
            Keyring::Kms(keyring) => keyring.generate_data_key(context).await,
        }
    }

    /// Unwraps an object's data key with the practice's key.
    pub async fn unwrap(
        &self,
        edks: &[crate::envelope::EncryptedDataKey],
        context: &crate::envelope::EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        match self {
            Keyring::Local(keys) => keys.unwrap(edks, context),
            Keyring::Kms(keyring) => keyring.unwrap(edks, context).await,
        }
    }

    /// Names the key for logs: a local key name or a KMS key ARN.
    pub fn describe(&self) -> String {
        match self {
            Keyring::Local(keys) => keys.current().to_string(),
            Keyring::Kms(keyring) => keyring.key_arn().to_owned(),
        }
    }
}

/// Errors from key generation, key files and wrapping.
///
/// Messages name files, practices and key names, never key bytes. Clones of an `Io` error keep
/// its kind and message but not its inner source.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("the operating system's random number generator failed")]
    Random,
    #[error("data key has {length} bytes, expected {KEY_LEN}")]
    DataKeyLength { length: usize },
    #[error("wrapping key has {length} bytes, expected {KEY_LEN}")]
    WrappingKeyLength { length: usize },
    #[error(
        "no key for practice `{practice}` in {directory}: create one with `callseal keys generate --practice {practice}`"
    )]
    NoPracticeKey { practice: String, directory: String },
    #[error("key file {path} already exists; refusing to overwrite it")]
    AlreadyExists { path: String },
    #[error(
        "practice `{practice}` already has keys in {directory}; refusing to overwrite them (add a version with `callseal keys rotate --practice {practice}`)"
    )]
    PracticeHasKeys { practice: String, directory: String },
    #[error(
        "key file {path} is accessible by group or others (mode {mode:o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    #[error("invalid key file {path}: {reason}")]
    InvalidKeyFile { path: String, reason: String },
    #[error("cannot {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: String,
        source: std::io::Error,
    },
    #[error("no encrypted data key in the message can be unwrapped with the available keys")]
    NoMatchingKey,
    #[error("malformed encrypted data key: {0}")]
    MalformedEdk(&'static str),
    #[error("unwrapping the data key failed: wrong key or tampered message")]
    Unwrap,
    #[error("the KMS key {key_id} of practice `{practice}` is unavailable ({code}); retry later")]
    KmsUnavailable {
        practice: String,
        key_id: String,
        code: String,
    },
    #[error("the KMS key {key_id} of practice `{practice}` is disabled")]
    KmsKeyDisabled { practice: String, key_id: String },
    #[error(
        "the KMS key {key_id} of practice `{practice}` is pending deletion or otherwise unusable"
    )]
    KmsKeyState { practice: String, key_id: String },
    #[error("callseal is not allowed to use the KMS key {key_id} of practice `{practice}`")]
    KmsAccessDenied { practice: String, key_id: String },
    #[error("KMS answered for key {key_id} of practice `{practice}` with {what}")]
    KmsBadResponse {
        practice: String,
        key_id: String,
        what: &'static str,
    },
}

impl Clone for KeyError {
    fn clone(&self) -> Self {
        match self {
            KeyError::Random => KeyError::Random,
            KeyError::DataKeyLength { length } => KeyError::DataKeyLength { length: *length },
            KeyError::WrappingKeyLength { length } => {
                KeyError::WrappingKeyLength { length: *length }
            }
            KeyError::NoPracticeKey {
                practice,
                directory,
            } => KeyError::NoPracticeKey {
                practice: practice.clone(),
                directory: directory.clone(),
            },
            KeyError::AlreadyExists { path } => KeyError::AlreadyExists { path: path.clone() },
            KeyError::PracticeHasKeys {
                practice,
                directory,
            } => KeyError::PracticeHasKeys {
                practice: practice.clone(),
                directory: directory.clone(),
            },
            KeyError::Permissions { path, mode } => KeyError::Permissions {
                path: path.clone(),
                mode: *mode,
            },
            KeyError::InvalidKeyFile { path, reason } => KeyError::InvalidKeyFile {
                path: path.clone(),
                reason: reason.clone(),
            },
            KeyError::Io {
                action,
                path,
                source,
            } => KeyError::Io {
                action,
                path: path.clone(),
                source: std::io::Error::new(source.kind(), source.to_string()),
            },
            KeyError::NoMatchingKey => KeyError::NoMatchingKey,
            KeyError::MalformedEdk(what) => KeyError::MalformedEdk(what),
            KeyError::Unwrap => KeyError::Unwrap,
            KeyError::KmsUnavailable {
                practice,
                key_id,
                code,
            } => KeyError::KmsUnavailable {
                practice: practice.clone(),
                key_id: key_id.clone(),
                code: code.clone(),
            },
            KeyError::KmsKeyDisabled { practice, key_id } => KeyError::KmsKeyDisabled {
                practice: practice.clone(),
                key_id: key_id.clone(),
            },
            KeyError::KmsKeyState { practice, key_id } => KeyError::KmsKeyState {
                practice: practice.clone(),
                key_id: key_id.clone(),
            },
            KeyError::KmsAccessDenied { practice, key_id } => KeyError::KmsAccessDenied {
                practice: practice.clone(),
                key_id: key_id.clone(),
            },
            KeyError::KmsBadResponse {
                practice,
                key_id,
                what,
            } => KeyError::KmsBadResponse {
                practice: practice.clone(),
                key_id: key_id.clone(),
                what,
            },
        }
    }
}
