//! Local wrapping keys: one 256-bit key per practice and version, in a key directory.
//!
//! Layout: `{directory}/{practice}/v{N}.key`, each file exactly 32 random bytes with mode 0600
//! in a directory with mode 0700. The highest version is the current one: new data keys are
//! wrapped under it, while every older version still unwraps what it wrapped. Key files are
//! created under a temporary name and hard-linked into place, so a crash never leaves a partial
//! key file under a real name and an existing key is never overwritten.
//!
//! Wrapped data keys follow the AWS Encryption SDK's Raw AES keyring layout, so its
//! `RawMasterKeyProvider` (or Raw AES keyring) with the same namespace, key name and key bytes
//! unwraps them:
//!
//! - provider id: the namespace [`NAMESPACE`];
//! - provider info: key name `{practice}/v{N}`, u32 tag length in bits (128), u32 IV length
//!   (12), the 12-byte random IV;
//! - ciphertext: AES-256-GCM of the 32-byte data key under the wrapping key, with the serialized
//!   encryption context as AAD, followed by the 16-byte tag.

use std::collections::BTreeMap;
use std::fmt;
use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};
use zeroize::Zeroizing;

use super::{DataKey, KEY_LEN, KeyError, WrappingKey};
use crate::envelope::{EncryptedDataKey, EncryptionContext};
use crate::ids::PracticeId;

/// The Raw AES keyring namespace (EDK provider id) of callseal's local keys.
pub const NAMESPACE: &str = "callseal";

const TAG_BITS: u32 = 128;
const IV_LEN: usize = 12;
const TAG_LEN: usize = 16;
/// Provider info after the key name: tag length, IV length, IV.
const INFO_SUFFIX_LEN: usize = 4 + 4 + IV_LEN;

/// A key version: 1 for the first key of a practice, one more for each rotation.
pub type KeyVersion = u32;

/// The public name of one wrapping key, `{practice}/v{version}`, stored in each EDK.
#[derive(Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct KeyName {
    pub practice: PracticeId,
    pub version: KeyVersion,
}

impl KeyName {
    /// Parses `{practice}/v{version}`; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        let (practice, version) = name.split_once("/v")?;
        Some(KeyName {
            practice: PracticeId::new(practice).ok()?,
            version: parse_version(version)?,
        })
    }
}

impl fmt::Display for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/v{}", self.practice, self.version)
    }
}

impl fmt::Debug for KeyName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyName({self})")
    }
}

/// A directory of practices' wrapping keys.
#[derive(Debug, Clone)]
pub struct KeyDirectory {
    root: PathBuf,
}

impl KeyDirectory {
    pub fn new(root: impl Into<PathBuf>) -> Self {
        KeyDirectory { root: root.into() }
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Creates version 1 of a practice's wrapping key; fails if the practice has any key.
    pub fn generate(&self, practice: &PracticeId) -> Result<KeyName, KeyError> {
        let directory = self.practice_directory(practice);
        if !self.versions(practice)?.is_empty() {
            return Err(KeyError::AlreadyExists {
                path: display(&directory),
            });
        }
        self.create_version(practice, 1)
    }

    /// Adds the next version of a practice's wrapping key and makes it current.
    pub fn rotate(&self, practice: &PracticeId) -> Result<KeyName, KeyError> {
        let versions = self.versions(practice)?;
        let Some(current) = versions.last() else {
            return Err(self.no_key(practice));
        };
        self.create_version(practice, current + 1)
    }

    /// Lists the key versions a practice has, in ascending order.
    pub fn versions(&self, practice: &PracticeId) -> Result<Vec<KeyVersion>, KeyError> {
        let directory = self.practice_directory(practice);
        let entries = match fs::read_dir(&directory) {
            Ok(entries) => entries,
            Err(error) if error.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(source) => return Err(io_error("read", &directory, source)),
        };
        let mut versions = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| io_error("read", &directory, source))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let version = name
                .strip_prefix('v')
                .and_then(|rest| rest.strip_suffix(".key"))
                .and_then(parse_version);
            versions.extend(version);
        }
        versions.sort_unstable();
        Ok(versions)
    }

    /// Loads every key version of a practice; fails if it has none.
    pub fn load(&self, practice: &PracticeId) -> Result<PracticeKeys, KeyError> {
        let mut keys = BTreeMap::new();
        for version in self.versions(practice)? {
            let path = self.key_path(practice, version);
            keys.insert(version, read_key_file(&path)?);
        }
        if keys.is_empty() {
            return Err(self.no_key(practice));
        }
        Ok(PracticeKeys {
            practice: practice.clone(),
            keys,
        })
    }

    /// Loads the keys of the practice that an EDK's key name refers to, for callers that do
    /// not know the practice in advance (`callseal decrypt` of any message).
    pub fn load_for(&self, edks: &[EncryptedDataKey]) -> Result<PracticeKeys, KeyError> {
        let practice = edks
            .iter()
            .filter(|edk| edk.provider_id == NAMESPACE.as_bytes())
            .find_map(|edk| parse_provider_info(&edk.provider_info).ok())
            .map(|(name, _)| name.practice)
            .ok_or(KeyError::NoMatchingKey)?;
        self.load(&practice)
    }

    fn practice_directory(&self, practice: &PracticeId) -> PathBuf {
        self.root.join(practice.as_str())
    }

    fn key_path(&self, practice: &PracticeId, version: KeyVersion) -> PathBuf {
        self.practice_directory(practice)
            .join(format!("v{version}.key"))
    }

    fn no_key(&self, practice: &PracticeId) -> KeyError {
        KeyError::NoPracticeKey {
            practice: practice.to_string(),
            directory: display(&self.root),
        }
    }

    fn create_version(
        &self,
        practice: &PracticeId,
        version: KeyVersion,
    ) -> Result<KeyName, KeyError> {
        let directory = self.practice_directory(practice);
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&directory)
            .map_err(|source| io_error("create", &directory, source))?;

        let key = WrappingKey::generate()?;
        let path = self.key_path(practice, version);
        let temporary = directory.join(format!(".v{version}.key.{}.tmp", std::process::id()));
        let written = write_new_file(&temporary, key.expose());
        let linked = written.and_then(|()| fs::hard_link(&temporary, &path));
        // The temporary name is removed whatever happened; the key lives on under `path` only.
        let _ = fs::remove_file(&temporary);
        match linked {
            Ok(()) => {}
            Err(error) if error.kind() == io::ErrorKind::AlreadyExists => {
                return Err(KeyError::AlreadyExists {
                    path: display(&path),
                });
            }
            Err(source) => return Err(io_error("write", &path, source)),
        }
        sync_directory(&directory)?;
        Ok(KeyName {
            practice: practice.clone(),
            version,
        })
    }
}

/// All wrapping key versions of one practice: wraps under the current one, unwraps under any.
pub struct PracticeKeys {
    practice: PracticeId,
    keys: BTreeMap<KeyVersion, WrappingKey>,
}

impl PracticeKeys {
    pub fn practice(&self) -> &PracticeId {
        &self.practice
    }

    /// Returns the name of the key that new data keys are wrapped under.
    pub fn current(&self) -> KeyName {
        let version = self.keys.keys().next_back().copied().unwrap_or_default();
        KeyName {
            practice: self.practice.clone(),
            version,
        }
    }

    /// Generates a data key for one message and wraps it under the current key version.
    pub fn generate_data_key(
        &self,
        context: &EncryptionContext,
    ) -> Result<(DataKey, EncryptedDataKey), KeyError> {
        let data_key = DataKey::generate()?;
        let edk = self.wrap(&data_key, context)?;
        Ok((data_key, edk))
    }

    /// Wraps an existing data key under the current key version (key rotation re-wraps this way).
    pub fn wrap(
        &self,
        data_key: &DataKey,
        context: &EncryptionContext,
    ) -> Result<EncryptedDataKey, KeyError> {
        let name = self.current();
        let wrapping_key = self
            .keys
            .get(&name.version)
            .ok_or(KeyError::NoMatchingKey)?;

        let mut iv = [0u8; IV_LEN];
        getrandom::fill(&mut iv).map_err(|_| KeyError::Random)?;
        let mut ciphertext = Vec::with_capacity(KEY_LEN + TAG_LEN);
        ciphertext.extend_from_slice(data_key.expose());
        let tag = cipher(wrapping_key)
            .encrypt_inout_detached(
                &Nonce::from(iv),
                &context.serialize(),
                ciphertext.as_mut_slice().into(),
            )
            .map_err(|_| KeyError::Unwrap)?;
        ciphertext.extend_from_slice(&tag);

        let name = name.to_string();
        let mut provider_info = Vec::with_capacity(name.len() + INFO_SUFFIX_LEN);
        provider_info.extend_from_slice(name.as_bytes());
        provider_info.extend_from_slice(&TAG_BITS.to_be_bytes());
        provider_info.extend_from_slice(&(IV_LEN as u32).to_be_bytes());
        provider_info.extend_from_slice(&iv);

        Ok(EncryptedDataKey {
            provider_id: NAMESPACE.as_bytes().to_vec(),
            provider_info,
            ciphertext,
        })
    }

    /// Unwraps the first EDK that names one of this practice's key versions.
    ///
    /// EDKs of other providers or other practices are skipped. An EDK that names one of our keys
    /// but fails to unwrap (wrong context, tampering) is an error rather than skipped, so a
    /// tampered message never falls through to a weaker path.
    pub fn unwrap(
        &self,
        edks: &[EncryptedDataKey],
        context: &EncryptionContext,
    ) -> Result<DataKey, KeyError> {
        for edk in edks
            .iter()
            .filter(|edk| edk.provider_id == NAMESPACE.as_bytes())
        {
            let (name, iv) = parse_provider_info(&edk.provider_info)?;
            if name.practice != self.practice {
                continue;
            }
            let Some(wrapping_key) = self.keys.get(&name.version) else {
                continue;
            };
            return unwrap_with(wrapping_key, &iv, &edk.ciphertext, context);
        }
        Err(KeyError::NoMatchingKey)
    }
}

impl fmt::Debug for PracticeKeys {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PracticeKeys")
            .field("practice", &self.practice)
            .field("versions", &self.keys.keys().collect::<Vec<_>>())
            .finish_non_exhaustive()
    }
}

/// Parses a key version: decimal digits without leading zeros, at least 1.
fn parse_version(digits: &str) -> Option<KeyVersion> {
    if digits.is_empty() || digits.starts_with('0') || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    digits.parse().ok()
}

fn unwrap_with(
    wrapping_key: &WrappingKey,
    iv: &[u8; IV_LEN],
    ciphertext: &[u8],
    context: &EncryptionContext,
) -> Result<DataKey, KeyError> {
    if ciphertext.len() != KEY_LEN + TAG_LEN {
        return Err(KeyError::MalformedEdk("wrapped key is not 48 bytes"));
    }
    let (wrapped, tag) = ciphertext.split_at(KEY_LEN);
    let tag = Tag::try_from(tag).map_err(|_| KeyError::MalformedEdk("bad tag length"))?;
    let mut plaintext = Zeroizing::new([0u8; KEY_LEN]);
    plaintext.copy_from_slice(wrapped);
    cipher(wrapping_key)
        .decrypt_inout_detached(
            &Nonce::from(*iv),
            &context.serialize(),
            plaintext.as_mut_slice().into(),
            &tag,
        )
        .map_err(|_| KeyError::Unwrap)?;
    DataKey::from_slice(plaintext.as_slice())
}

fn cipher(key: &WrappingKey) -> Aes256Gcm {
    Aes256Gcm::new(key.expose().into())
}

/// Splits Raw AES keyring provider info into the key name and the IV.
fn parse_provider_info(info: &[u8]) -> Result<(KeyName, [u8; IV_LEN]), KeyError> {
    let name_len = info
        .len()
        .checked_sub(INFO_SUFFIX_LEN)
        .ok_or(KeyError::MalformedEdk("provider info too short"))?;
    let (name, suffix) = info.split_at(name_len);
    let (tag_bits, rest) = suffix.split_at(4);
    let (iv_len, iv) = rest.split_at(4);
    if tag_bits != TAG_BITS.to_be_bytes() || iv_len != (IV_LEN as u32).to_be_bytes() {
        return Err(KeyError::MalformedEdk("unsupported tag or IV length"));
    }
    let name = std::str::from_utf8(name)
        .ok()
        .and_then(KeyName::parse)
        .ok_or(KeyError::MalformedEdk(
            "key name is not `{practice}/v{version}`",
        ))?;
    let iv: [u8; IV_LEN] = iv
        .try_into()
        .map_err(|_| KeyError::MalformedEdk("bad IV"))?;
    Ok((name, iv))
}

fn read_key_file(path: &Path) -> Result<WrappingKey, KeyError> {
    let mut file = fs::File::open(path).map_err(|source| io_error("open", path, source))?;
    let metadata = file
        .metadata()
        .map_err(|source| io_error("stat", path, source))?;
    let mode = metadata.mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(KeyError::Permissions {
            path: display(path),
            mode,
        });
    }
    if metadata.len() != KEY_LEN as u64 {
        return Err(KeyError::InvalidKeyFile {
            path: display(path),
            reason: format!("holds {} bytes, expected {KEY_LEN}", metadata.len()),
        });
    }
    let mut bytes = Zeroizing::new(Vec::with_capacity(KEY_LEN));
    file.read_to_end(&mut bytes)
        .map_err(|source| io_error("read", path, source))?;
    WrappingKey::from_bytes(bytes)
}

fn write_new_file(path: &Path, contents: &[u8]) -> io::Result<()> {
    let mut file = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)?;
    // `mode` above is filtered by the umask; set it exactly.
    file.set_permissions(fs::Permissions::from_mode(0o600))?;
    file.write_all(contents)?;
    file.sync_all()
}

fn sync_directory(directory: &Path) -> Result<(), KeyError> {
    fs::File::open(directory)
        .and_then(|handle| handle.sync_all())
        .map_err(|source| io_error("sync", directory, source))
}

fn io_error(action: &'static str, path: &Path, source: io::Error) -> KeyError {
    KeyError::Io {
        action,
        path: display(path),
        source,
    }
}

fn display(path: &Path) -> String {
    path.display().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn practice(id: &str) -> PracticeId {
        PracticeId::new(id).unwrap()
    }

    fn context() -> EncryptionContext {
        EncryptionContext::from_pairs([("practice", "p1"), ("call", "c1"), ("artifact", "a")])
            .unwrap()
    }

    #[test]
    fn key_name_round_trip() {
        let name = KeyName::parse("clinic-1/v12").unwrap();
        assert_eq!(name.practice.as_str(), "clinic-1");
        assert_eq!(name.version, 12);
        assert_eq!(name.to_string(), "clinic-1/v12");
    }

    #[test]
    fn key_name_rejects_malformed() {
        for bad in [
            "p1", "p1/v", "p1/v0", "p1/v01", "p1/vx", "/v1", "a/b/v1", "p1/v1 ", "p1/v-1",
        ] {
            assert!(KeyName::parse(bad).is_none(), "{bad:?}");
        }
    }

    #[test]
    fn generate_writes_0600_file() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        let name = keys.generate(&practice("p1")).unwrap();
        assert_eq!(name.to_string(), "p1/v1");
        let path = dir.path().join("p1/v1.key");
        let metadata = fs::metadata(&path).unwrap();
        assert_eq!(metadata.mode() & 0o777, 0o600);
        assert_eq!(metadata.len(), 32);
        let directory_mode = fs::metadata(dir.path().join("p1")).unwrap().mode() & 0o777;
        assert_eq!(directory_mode, 0o700);
        let leftovers: Vec<_> = fs::read_dir(dir.path().join("p1")).unwrap().collect();
        assert_eq!(leftovers.len(), 1, "temporary file left behind");
    }

    #[test]
    fn generate_refuses_overwrite() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        keys.generate(&practice("p1")).unwrap();
        let before = fs::read(dir.path().join("p1/v1.key")).unwrap();
        assert!(matches!(
            keys.generate(&practice("p1")),
            Err(KeyError::AlreadyExists { .. })
        ));
        assert_eq!(fs::read(dir.path().join("p1/v1.key")).unwrap(), before);
    }

    #[test]
    fn rotate_keeps_old_versions_usable() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        let p1 = practice("p1");
        keys.generate(&p1).unwrap();
        let (old_key, old_edk) = keys
            .load(&p1)
            .unwrap()
            .generate_data_key(&context())
            .unwrap();

        assert_eq!(keys.rotate(&p1).unwrap().to_string(), "p1/v2");
        let loaded = keys.load(&p1).unwrap();
        assert_eq!(loaded.current().version, 2);
        let (_, new_edk) = loaded.generate_data_key(&context()).unwrap();
        assert!(new_edk.provider_info.starts_with(b"p1/v2"));

        let unwrapped = loaded.unwrap(&[old_edk], &context()).unwrap();
        assert_eq!(unwrapped.expose(), old_key.expose());
    }

    #[test]
    fn rotate_without_key_fails() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        assert!(matches!(
            keys.rotate(&practice("p1")),
            Err(KeyError::NoPracticeKey { .. })
        ));
    }

    #[test]
    fn load_rejects_loose_permissions() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        keys.generate(&practice("p1")).unwrap();
        let path = dir.path().join("p1/v1.key");
        fs::set_permissions(&path, fs::Permissions::from_mode(0o644)).unwrap();
        assert!(matches!(
            keys.load(&practice("p1")),
            Err(KeyError::Permissions { .. })
        ));
    }

    #[test]
    fn load_rejects_wrong_length() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        keys.generate(&practice("p1")).unwrap();
        let path = dir.path().join("p1/v1.key");
        fs::write(&path, [0u8; 31]).unwrap();
        assert!(matches!(
            keys.load(&practice("p1")),
            Err(KeyError::InvalidKeyFile { .. })
        ));
    }

    #[test]
    fn unwrap_rejects_other_context() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        keys.generate(&practice("p1")).unwrap();
        let loaded = keys.load(&practice("p1")).unwrap();
        let (_, edk) = loaded.generate_data_key(&context()).unwrap();
        let other =
            EncryptionContext::from_pairs([("practice", "p1"), ("call", "c2"), ("artifact", "a")])
                .unwrap();
        assert!(matches!(
            loaded.unwrap(&[edk], &other),
            Err(KeyError::Unwrap)
        ));
    }

    #[test]
    fn unwrap_skips_other_practice() {
        let dir = tempfile::tempdir().unwrap();
        let keys = KeyDirectory::new(dir.path());
        keys.generate(&practice("p1")).unwrap();
        keys.generate(&practice("p2")).unwrap();
        let (_, edk) = keys
            .load(&practice("p2"))
            .unwrap()
            .generate_data_key(&context())
            .unwrap();
        let p1 = keys.load(&practice("p1")).unwrap();
        assert!(matches!(
            p1.unwrap(&[edk], &context()),
            Err(KeyError::NoMatchingKey)
        ));
    }

    #[test]
    fn secrets_debug_redacted() {
        let data_key = DataKey::from_slice(&[0x41; 32]).unwrap();
        let wrapping_key = WrappingKey::from_bytes(Zeroizing::new(vec![0x42; 32])).unwrap();
        for text in [
            format!("{data_key:?}"),
            format!("{wrapping_key:?}"),
            format!("{data_key:#?}"),
        ] {
            assert!(text.contains("REDACTED"), "{text}");
            for leaked in ["41", "65", "AAAA", "42", "66"] {
                assert!(!text.contains(leaked), "{text} contains {leaked}");
            }
        }
    }
}
