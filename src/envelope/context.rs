//! The encryption context: authenticated key-value pairs in the message header.
//!
//! callseal's context names the object a message belongs to (`practice`, `call`, `artifact`),
//! so a message copied to another object's path no longer matches what its reader expects.

use std::collections::BTreeMap;

use super::Error;
use crate::ids::ObjectId;

/// Keys with this prefix are reserved for the AWS Encryption SDK itself.
pub const RESERVED_PREFIX: &str = "aws-crypto-";

/// Context keys callseal writes for every stored object.
pub const PRACTICE_KEY: &str = "practice";
pub const CALL_KEY: &str = "call";
pub const ARTIFACT_KEY: &str = "artifact";

/// An encryption context: unique keys, serialized sorted by their UTF-8 bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct EncryptionContext {
    pairs: BTreeMap<String, String>,
}

impl EncryptionContext {
    /// The context of one stored object.
    pub fn for_object(id: &ObjectId) -> Self {
        let pairs = [
            (PRACTICE_KEY, id.practice.as_str()),
            (CALL_KEY, id.call.as_str()),
            (ARTIFACT_KEY, id.artifact.as_str()),
        ];
        let pairs = pairs
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v.to_owned()))
            .collect();
        EncryptionContext { pairs }
    }

    /// Builds a context from caller-supplied pairs, rejecting duplicates, empty keys and
    /// reserved keys.
    pub fn from_pairs<K, V>(pairs: impl IntoIterator<Item = (K, V)>) -> Result<Self, Error>
    where
        K: Into<String>,
        V: Into<String>,
    {
        let mut context = EncryptionContext::default();
        for (key, value) in pairs {
            context.insert(key.into(), value.into())?;
        }
        if context.serialized_len() > usize::from(u16::MAX) {
            return Err(Error::Limit(
                "encryption context longer than 65535 bytes".into(),
            ));
        }
        Ok(context)
    }

    pub fn is_empty(&self) -> bool {
        self.pairs.is_empty()
    }

    pub fn get(&self, key: &str) -> Option<&str> {
        self.pairs.get(key).map(String::as_str)
    }

    pub fn iter(&self) -> impl Iterator<Item = (&str, &str)> {
        self.pairs.iter().map(|(k, v)| (k.as_str(), v.as_str()))
    }

    /// Serializes the context as the header's AAD field and the Raw AES keyring's AAD: u16 pair
    /// count, then u16-length-prefixed key and value per pair, sorted by key. Empty for an
    /// empty context (no count at all).
    pub fn serialize(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(self.serialized_len());
        if self.pairs.is_empty() {
            return out;
        }
        // Lengths fit in u16: `from_pairs` and `parse` bound the whole serialization.
        out.extend_from_slice(&(self.pairs.len() as u16).to_be_bytes());
        for (key, value) in &self.pairs {
            for field in [key, value] {
                out.extend_from_slice(&(field.len() as u16).to_be_bytes());
                out.extend_from_slice(field.as_bytes());
            }
        }
        out
    }

    /// Parses the header's AAD field (without its outer length).
    pub fn parse(bytes: &[u8]) -> Result<Self, Error> {
        let mut context = EncryptionContext::default();
        if bytes.is_empty() {
            return Ok(context);
        }
        let mut reader = bytes;
        let count = take_u16(&mut reader)?;
        if count == 0 {
            return Err(Error::Malformed(
                "encryption context with zero pairs must be empty",
            ));
        }
        for _ in 0..count {
            let key = take_string(&mut reader)?;
            let value = take_string(&mut reader)?;
            context.insert(key, value)?;
        }
        if !reader.is_empty() {
            return Err(Error::Malformed("bytes after the encryption context"));
        }
        Ok(context)
    }

    fn insert(&mut self, key: String, value: String) -> Result<(), Error> {
        if key.is_empty() {
            return Err(Error::Malformed("empty encryption context key"));
        }
        if key.starts_with(RESERVED_PREFIX) {
            return Err(Error::Unsupported(format!(
                "reserved encryption context key `{key}` (suite 0x0478 has no signature)"
            )));
        }
        if self.pairs.contains_key(&key) {
            return Err(Error::Malformed("duplicate encryption context key"));
        }
        self.pairs.insert(key, value);
        Ok(())
    }

    fn serialized_len(&self) -> usize {
        if self.pairs.is_empty() {
            return 0;
        }
        2 + self
            .pairs
            .iter()
            .map(|(k, v)| 4 + k.len() + v.len())
            .sum::<usize>()
    }
}

fn take_u16(reader: &mut &[u8]) -> Result<u16, Error> {
    let Some((head, rest)) = reader.split_first_chunk::<2>() else {
        return Err(Error::Malformed("encryption context is truncated"));
    };
    *reader = rest;
    Ok(u16::from_be_bytes(*head))
}

fn take_string(reader: &mut &[u8]) -> Result<String, Error> {
    let length = usize::from(take_u16(reader)?);
    if reader.len() < length {
        return Err(Error::Malformed("encryption context is truncated"));
    }
    let (field, rest) = reader.split_at(length);
    *reader = rest;
    String::from_utf8(field.to_vec())
        .map_err(|_| Error::Malformed("encryption context is not UTF-8"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serialize_sorts_by_key() {
        let context = EncryptionContext::from_pairs([("b", "2"), ("a", "1")]).unwrap();
        let expected = [
            &[0, 2][..],
            &[0, 1],
            b"a",
            &[0, 1],
            b"1",
            &[0, 1],
            b"b",
            &[0, 1],
            b"2",
        ];
        assert_eq!(context.serialize(), expected.concat());
    }

    #[test]
    fn empty_serializes_to_nothing() {
        assert!(EncryptionContext::default().serialize().is_empty());
        assert_eq!(
            EncryptionContext::parse(&[]).unwrap(),
            EncryptionContext::default()
        );
    }

    #[test]
    fn parse_round_trip() {
        let context =
            EncryptionContext::from_pairs([("practice", "p"), ("call", "c"), ("artifact", "a")])
                .unwrap();
        assert_eq!(
            EncryptionContext::parse(&context.serialize()).unwrap(),
            context
        );
    }

    #[test]
    fn parse_rejects_duplicates() {
        let bytes = [&[0, 2][..], &[0, 1], b"a", &[0, 0], &[0, 1], b"a", &[0, 0]].concat();
        assert!(matches!(
            EncryptionContext::parse(&bytes),
            Err(Error::Malformed(_))
        ));
    }

    #[test]
    fn parse_rejects_truncation_and_trailing() {
        let bytes = EncryptionContext::from_pairs([("k", "v")])
            .unwrap()
            .serialize();
        for cut in 1..bytes.len() {
            assert!(
                EncryptionContext::parse(&bytes[..cut]).is_err(),
                "cut at {cut}"
            );
        }
        let mut extended = bytes.clone();
        extended.push(0);
        assert!(EncryptionContext::parse(&extended).is_err());
    }

    #[test]
    fn rejects_reserved_key() {
        let result = EncryptionContext::from_pairs([("aws-crypto-public-key", "x")]);
        assert!(matches!(result, Err(Error::Unsupported(_))));
    }
}
