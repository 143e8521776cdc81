//! Signed checkpoints of the chain head, and the Ed25519 keys that sign and verify them.
//!
//! The signing key is a PKCS#8 (DER) file created by [`generate_key`] with mode 0600. Only its
//! public key is needed to verify: 32 bytes, shown as 64 hex digits. A key is named in each
//! checkpoint by its key id, the first 8 bytes of the SHA-256 of the public key in hex, so that a
//! verifier given several public keys (after a key change) can pick the one that applies.
//!
//! The signature covers a fixed text form of the checkpoint (see [`Checkpoint::signed_message`]),
//! not its JSON, so JSON spelling never matters. Every field in it has a grammar without `\n`.

use std::fmt;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;

use ring::rand::SystemRandom;
use ring::signature::{ED25519, Ed25519KeyPair, KeyPair, UnparsedPublicKey};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use zeroize::Zeroizing;

use super::files::{self, SegmentName};
use super::record::{ChainHash, timestamp};

/// The first line of every signed message, naming its purpose and version.
const SIGNED_PREFIX: &str = "callseal audit checkpoint v1\n";

/// The key that signs checkpoints. Its `Debug` output shows only the key id.
pub struct SigningKey {
    pair: Ed25519KeyPair,
    path: PathBuf,
}

/// An Ed25519 public key that verifies checkpoints.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct PublicKey([u8; 32]);

/// A problem with a signing or public key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("cannot read signing key {}: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error(
        "invalid signing key {}: expected an Ed25519 private key in PKCS#8 DER form",
        path.display()
    )]
    Invalid { path: PathBuf },
    #[error("{} already exists; keygen never overwrites a key", path.display())]
    Exists { path: PathBuf },
    #[error("cannot write signing key {}: {source}", path.display())]
    Write { path: PathBuf, source: io::Error },
    #[error("cannot generate a signing key: the system random number generator failed")]
    Random,
    #[error("invalid public key: expected 64 hex digits, or a file containing them")]
    InvalidPublicKey,
    #[error("cannot read public key file {}: {source}", path.display())]
    ReadPublicKey { path: PathBuf, source: io::Error },
}

/// A signed statement that the chain's record `seq`, in `segment`, has the line hash `hash`.
#[derive(Clone, PartialEq, Eq, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checkpoint {
    #[serde(with = "timestamp")]
    pub time: OffsetDateTime,
    /// The segment file that contains record `seq`.
    pub segment: String,
    pub seq: u64,
    /// The SHA-256 of record `seq`'s line.
    pub hash: ChainHash,
    /// The writer's `checkpoint_records` setting when it wrote this checkpoint.
    pub interval_records: u64,
    /// The writer's `checkpoint_interval` setting, in milliseconds.
    pub interval_ms: u64,
    /// The id of the key that signed this checkpoint.
    pub key: String,
    /// The Ed25519 signature of [`Checkpoint::signed_message`], in hex.
    pub signature: String,
}

impl SigningKey {
    /// Loads a PKCS#8 Ed25519 key, as written by [`generate_key`] or `openssl genpkey`.
    pub fn load(path: &Path) -> Result<Self, KeyError> {
        let document = Zeroizing::new(fs::read(path).map_err(|source| KeyError::Read {
            path: path.to_owned(),
            source,
        })?);
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&document).map_err(|_| {
            KeyError::Invalid {
                path: path.to_owned(),
            }
        })?;
        Ok(SigningKey {
            pair,
            path: path.to_owned(),
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn public_key(&self) -> PublicKey {
        let mut bytes = [0u8; 32];
        bytes.copy_from_slice(self.pair.public_key().as_ref());
        PublicKey(bytes)
    }

    /// Fills in `key` and `signature` of a checkpoint.
    pub(crate) fn sign(&self, checkpoint: &mut Checkpoint) {
        checkpoint.key = self.public_key().key_id();
        let signature = self.pair.sign(&checkpoint.signed_message());
        checkpoint.signature = hex::encode(signature.as_ref());
    }
}

impl fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SigningKey")
            .field("key_id", &self.public_key().key_id())
            .finish_non_exhaustive()
    }
}

impl PublicKey {
    /// Reads a public key argument: 64 hex digits, or the path of a file that contains them.
    pub fn from_arg(arg: &str) -> Result<Self, KeyError> {
        if let Ok(key) = arg.parse() {
            return Ok(key);
        }
        let path = Path::new(arg);
        let text = fs::read_to_string(path).map_err(|source| KeyError::ReadPublicKey {
            path: path.to_owned(),
            source,
        })?;
        text.trim().parse()
    }

    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// Returns the key id: the first 8 bytes of the SHA-256 of the key, in hex.
    pub fn key_id(&self) -> String {
        hex::encode(&Sha256::digest(self.0)[..8])
    }

    /// Checks a checkpoint's signature under this key.
    pub(crate) fn verifies(&self, checkpoint: &Checkpoint) -> bool {
        let Ok(signature) = hex::decode(&checkpoint.signature) else {
            return false;
        };
        UnparsedPublicKey::new(&ED25519, self.0)
            .verify(&checkpoint.signed_message(), &signature)
            .is_ok()
    }
}

impl FromStr for PublicKey {
    type Err = KeyError;

    fn from_str(text: &str) -> Result<Self, KeyError> {
        let mut bytes = [0u8; 32];
        hex::decode_to_slice(text, &mut bytes).map_err(|_| KeyError::InvalidPublicKey)?;
        Ok(PublicKey(bytes))
    }
}

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex::encode(self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl Checkpoint {
    /// Builds the bytes that the signature covers: a fixed first line, then one `name=value` line
    /// per field except `signature`.
    pub fn signed_message(&self) -> Vec<u8> {
        format!(
            "{SIGNED_PREFIX}segment={}\nseq={}\nhash={}\ntime={}\ninterval_records={}\n\
             interval_ms={}\nkey={}\n",
            self.segment,
            self.seq,
            self.hash,
            super::record::format_time(self.time),
            self.interval_records,
            self.interval_ms,
            self.key,
        )
        .into_bytes()
    }

    /// Checks the fields that the signed message relies on: a segment name and a key id, both
    /// without `\n`, and a record number from 1.
    pub(crate) fn check_fields(&self) -> Result<(), &'static str> {
        if SegmentName::parse(&self.segment).is_none() {
            return Err("`segment` is not a segment file name");
        }
        let key_id = self.key.len() == 16 && self.key.bytes().all(|b| b.is_ascii_hexdigit());
        if !key_id {
            return Err("`key` is not a key id of 16 hex digits");
        }
        if self.seq == 0 {
            return Err("`seq` must be at least 1");
        }
        Ok(())
    }

    /// Serializes the checkpoint as one line of JSON, without the final `\n`.
    pub(crate) fn to_line(&self) -> Vec<u8> {
        serde_json::to_vec(self).expect(
            "serializing a checkpoint into memory cannot fail: its fields serialize as strings \
             and numbers",
        )
    }
}

/// Creates a new Ed25519 signing key at `path` (PKCS#8 DER, mode 0600) and returns its public key.
///
/// Never overwrites: an existing file is an error. Keep the file outside the audit directory, so
/// that someone who can rewrite the audit files cannot also sign checkpoints for them.
pub fn generate_key(path: &Path) -> Result<PublicKey, KeyError> {
    let document =
        Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).map_err(|_| KeyError::Random)?;
    let pair = Ed25519KeyPair::from_pkcs8(document.as_ref()).map_err(|_| KeyError::Random)?;

    let write_error = |source| KeyError::Write {
        path: path.to_owned(),
        source,
    };
    let mut file = files::create_new(path).map_err(|source| {
        if source.kind() == io::ErrorKind::AlreadyExists {
            KeyError::Exists {
                path: path.to_owned(),
            }
        } else {
            write_error(source)
        }
    })?;
    file.write_all(document.as_ref()).map_err(write_error)?;
    file.sync_all().map_err(write_error)?;
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        files::sync_dir(parent).map_err(write_error)?;
    }

    let mut bytes = [0u8; 32];
    bytes.copy_from_slice(pair.public_key().as_ref());
    Ok(PublicKey(bytes))
}
